"""A model's own matmuls (``aten.mm`` / ``aten.bmm`` -> ``linalg.matmul`` / ``batch_matmul``) run as register blocks.

Structural: on the bufferized module, the plain matmuls whose sizes the blocks divide become calls of a block body and
the others keep their loops; numerical: the compiled function equals torch on all of them.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

import attnpass.mlir as am
from attnpass.lowering import matmul_blocks
from attnpass.lowering import mlir as lowering


class Mixed(torch.nn.Module):
    """Two MLP matmuls and a bmm that fit the blocks, one matmul whose 5 columns do not."""

    def forward(self, x, w1, w2, a, b, odd):
        return torch.tanh(x @ w1) @ w2, torch.bmm(a, b), x @ odd


@pytest.fixture(scope="module")
def mixed() -> tuple[object, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 64), (64, 48), (48, 32), (2, 16, 24), (2, 24, 32), (64, 5)]
    args = tuple(torch.randn(*s, generator=g) for s in shapes)
    return am.import_(Mixed(), args), args


def test_plain_fitting_matmuls_become_block_calls_and_the_rest_keep_their_loops(mixed) -> None:
    module, _ = mixed
    passes = list(lowering.LINALG_TO_LLVM)
    buffers = lowering.run_passes(lowering.to_linalg(module), passes[:passes.index("inline")], "bufferize")
    assert len(re.findall(r"linalg\.(?:batch_)?matmul ", str(buffers))) == 4
    assert matmul_blocks.define_all(buffers) == 3
    text = str(buffers)
    left = re.findall(r"linalg\.matmul ins\([^)]*: (memref<[^)]*)\)", text)
    assert len(left) == 1 and "64x5xf32" in left[0], left  # 5 columns: not whole 16-wide blocks
    calls = sorted(set(re.findall(r"call @(" + matmul_blocks.PREFIX + r"\w+)\(", text)))
    assert calls == ["attnpass_matmul_2x16x24_2x24x32_2x16x32", "attnpass_matmul_32x48_48x32_32x32",
                     "attnpass_matmul_32x64_64x48_32x48"], calls
    assert text.count("vector.contract") == 3  # one body per shape
    assert text.count("scf.parallel") == 3  # its batch x row blocks on the team (the model's matmuls run alone)


def test_compiled_model_equals_torch(mixed) -> None:
    """The pipeline runs the blocks (vector code in the LLVM module: nothing else here is vector code) and their result
    is torch's."""
    module, args = mixed
    assert re.search(r"vector<(?:16|32)xf32>", str(lowering.to_llvm(module)))
    got = am.compile(module, opt_level=0)(*args)
    for g, w in zip(got, Mixed()(*args)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
