"""The key tile's two matmuls as register blocks (``rewrite/mlir/microkernel.py``).

Structure: with dims the blocks divide, both matmuls of the fused loop nest are marked generics, replaced past
the backend contract by ``vector.contract`` register blocks and K is transposed once up front; with a head dim
they do not divide the generics stay.  Numerics: the blocks (GQA, a mask, causal, several query blocks, a partial
last key tile that falls back to the generic) against the reference and against the generic loop nest.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

import attnpass.mlir as am
from attnpass.kernels import reference
from attnpass.lowering import mlir as lowering
from attnpass.rewrite.mlir import microkernel
from attnpass.rewrite.mlir.fused import FusedSpec, fused_func

warnings.filterwarnings("ignore")
F = torch.nn.functional


def _spec(d: int, **kw) -> FusedSpec:
    base = FusedSpec(batch=(1, 4), s_q=128, s_k=128, d=d, dv=d, q_shape=(1, 4, 128, d), k_shape=(1, 2, 128, d),
                     v_shape=(1, 2, 128, d), k_transposed=False, k_groups=2, v_groups=2, scale=0.25, softcap=None,
                     causal=True, masks=[], tile=32)
    return dataclasses.replace(base, **kw)


def _module(body: str) -> str:
    """The fused function behind a public wrapper, as linalg-on-tensors text."""
    sp = _spec(16)
    ty = {n: f"tensor<{'x'.join(map(str, s))}xf32>" for n, s in (("q", sp.q_shape), ("k", sp.k_shape), ("o", sp.q_shape))}
    wrapper = (f"  func.func @f(%q: {ty['q']}, %k: {ty['k']}, %v: {ty['k']}) -> {ty['o']} {{\n"
               f"    %o = func.call @attn(%q, %k, %v) : ({ty['q']}, {ty['k']}, {ty['k']}) -> {ty['o']}\n"
               f"    return %o : {ty['o']}\n  }}")
    return "module {\n" + wrapper + "\n" + body + "\n}"


def _bufferized(text: str) -> object:
    """The module as the pipeline leaves it right before the register blocks go in: bufferized, not inlined."""
    passes = list(lowering.LINALG_TO_LLVM)
    return lowering.run_passes(_module(text), passes[:passes.index("inline")], "test module")


def test_both_matmuls_become_register_blocks_where_the_dims_divide() -> None:
    text = fused_func("attn", _spec(16))
    assert text.count(microkernel.MARK_NAME) == 2, "Q K^T and P V marked"
    mod = _bufferized(text)
    assert microkernel.define_all(mod) == 5, "two matmuls, the row max, the row sum and p = exp(z - m')"
    lin = str(mod)
    assert lin.count("vector.contract") == 2 and microkernel.MARK_NAME not in lin
    assert "vector<8x8xf32>, vector<8x16xf32> into vector<8x16xf32>" in lin  # P V: 16 value columns
    wide = microkernel.block_width(32)  # Q K^T over a tile of 32 keys: two vectors a row on AVX-512 hosts
    assert f"vector<8x8xf32>, vector<8x{wide}xf32> into vector<8x{wide}xf32>" in lin
    assert "vector.reduction <maximumf>" in lin and "vector.reduction <add>" in lin, "row max / sum in vectors"
    assert microkernel.ROWS_NAME not in lin
    # the blocks read the Q rows, the K^T and V tiles through their subviews: no slice is copied into a buffer of
    # its own (a call over tensors would copy all three per key tile)
    copies = [ln.split(" : ", 1)[1] for ln in lin.splitlines() if "memref.copy" in ln]
    assert copies and not [c for c in copies if "strided" in c.split(" to ")[0]], copies
    assert "strided<[?, ?, ?, 1], offset: ?>" in lin
    # a head dim of 12 is no whole number of 8-wide reduction steps: Q K^T stays a generic (P V too: 12 columns)
    odd = fused_func("attn", _spec(12, q_shape=(1, 4, 128, 12), k_shape=(1, 2, 128, 12), v_shape=(1, 2, 128, 12)))
    assert microkernel.MARK_NAME not in odd and "linalg.transpose" not in odd, "K kept row-major for the generic"


def test_k_transposed_is_packed_by_key_tiles() -> None:
    """K^T as [kv heads, S_k / tile, D, tile]: a tile's K^T is one contiguous block, not D rows 4 S_k bytes apart."""
    text = fused_func("attn", _spec(16))
    assert "tensor<1x2x4x16x32xf32>" in text and "affine_map<(d0, d1, t, e, j) -> (d0, d1, t * 32 + j, e)>" in text
    assert "tensor<1x2x4x16x32xf32> to tensor<1x1x4x16x32xf32>" in text, "the iteration's head (GQA: h floordiv 2)"
    assert "tensor<1x1x4x16x32xf32> to tensor<1x1x16x32xf32>" in text, "one tile, the tile dim dropped"
    # the scale rides on the packing pass (q . (scale k)): no pass over Q, no multiply per logit
    pack = text[text.index("%kp"):text.index("} -> tensor<1x2x4x16x32xf32>")]
    assert "arith.constant 0.25 : f32" in pack and "arith.mulf" in pack
    assert "%qs" not in text and "ins(%q :" not in text, "no pass over Q"
    # keys that are no whole number of tiles: the plain transpose
    ragged = fused_func("attn", _spec(16, s_k=120, k_shape=(1, 2, 120, 16), v_shape=(1, 2, 120, 16)))
    assert "linalg.transpose" in ragged and "t * 32 + j" not in ragged
    assert "%qs" in ragged, "K not packed: the scale stays on Q"


def _unmark(op) -> None:
    """Drop every register-block mark: the same loop nest with generic matmuls."""
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if microkernel.MARK_NAME in inner.operation.attributes:
                    del inner.operation.attributes[microkernel.MARK_NAME]
                _unmark(inner.operation)


def test_register_blocks_equal_the_generic_loop_nest_and_the_reference() -> None:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 128, 16, generator=g)
    k, v = (torch.randn(1, 2, 120, 16, generator=g) for _ in range(2))  # 120 keys: a partial last tile of 24
    mask = torch.randn(1, 1, 128, 120, generator=g)

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

    fused = am.rewrite(am.import_(Sdpa(), (q, k, v, mask)), to="fused", tile=32)
    assert str(am.lower(fused, "linalg")).count(microkernel.MARK_NAME) >= 2
    got = am.compile(fused, opt_level=0)(q, k, v, mask).numpy()
    want, _ = reference.attention_forward(q, k, v, attn_mask=mask, enable_gqa=True)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=2e-6)
    plain = lowering.parse(str(am.lower(fused, "linalg")))
    _unmark(plain.operation)
    assert microkernel.MARK_NAME not in str(plain)
    ref = lowering.compile_module(plain, from_linalg=True, opt_level=0)(q, k, v, mask).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def _key_loop(text: str) -> str:
    """The body of the first key loop (the ``scf.for`` carrying the state) in the printed module."""
    lines = text.splitlines()
    at = next(n for n, ln in enumerate(lines) if "scf.for" in ln and "iter_args" in ln and "memref<" in ln)
    indent = len(lines[at]) - len(lines[at].lstrip())
    end = next(n for n in range(at + 1, len(lines)) if lines[n].strip() == "}" and len(lines[n]) - 1 - indent <= 0)
    return "\n".join(lines[at + 1:end])


def test_key_loop_has_no_fill_rescale_or_copy_pass() -> None:
    """Q K^T starts its blocks at 0, P V at ``acc * alpha`` (one load of the old accumulator per block), the row max
    and sum read the old state and write a new buffer, p is a vector kernel: per key tile no fill, no rescale
    generic, no copy."""
    text = fused_func("attn", _spec(16))
    assert 'attnpass.register_blocks = "zero"' in text and 'attnpass.register_blocks = "scaled"' in text
    assert 'attnpass.row_reduce = "max_from"' in text and 'attnpass.row_reduce = "add_scaled"' in text
    mod = _bufferized(text)
    microkernel.define_all(mod)
    body = _key_loop(str(mod))
    for kernel in ("contract_zero_", "contract_scaled_", "rows_max_from_", "rows_exp_", "rows_add_scaled_"):
        assert f"call @attnpass_{kernel}" in body, kernel
    assert "memref.copy" not in body and "linalg.fill" not in body
    # a buffer per key tile only for the state yielded to the next tile (max, normaliser, accumulator): the score
    # tile, p and alpha are allocated once before the loop
    assert body.count("memref.alloc()") == 3, body
    # what stays a generic in the loop: the causal logits and alpha = exp(m - m') (one value a row)
    assert body.count("linalg.generic") == 2, body
    lin = str(mod)
    assert "vector.outerproduct" in lin, "alpha broadcast along the block's columns"
    # p = exp(z - m') as vector<RW x f32> ops (512 bits on an AVX-512 host), not a loop left to LLVM's vectoriser
    exp = lin[lin.index("func.func private @attnpass_rows_exp_"):]
    fmas = [ln for ln in exp.split("return")[0].splitlines() if "math.fma" in ln]
    assert fmas and all(ln.endswith(f": vector<{microkernel.RW}xf32>") for ln in fmas), fmas


def test_no_copy_out_of_a_buffer_nothing_wrote() -> None:
    """``copy-before-write`` copies every ``tensor.empty`` an op overwrites (the output of the parallel loop: a pass
    over all of it and its page faults per call); ``define_all`` drops each copy whose source only copies read."""
    mod = _bufferized(fused_func("attn", _spec(16)))

    def blank_sources(text: str) -> list[str]:
        allocs = set(re.findall(r"(%\w+) = memref.alloc\(\)", text))
        sources = re.findall(r"memref.copy (%\w+), ", text)
        return [s for s in sources if s in allocs and len(re.findall(rf"{s}\b", text)) == 1 + sources.count(s)]

    assert blank_sources(str(mod)), "the pipeline copies an uninitialised buffer (else this test checks nothing)"
    microkernel.define_all(mod)
    assert not blank_sources(str(mod))
