"""Unknown sizes in the MLIR rewrites: never printed into a type but as ``?``, and settled before use.

The case from the issue: an ONNX model whose mask input has a symbolic dim (``["n", 6]``) while
shape inference makes the scores static.  SSMax used to emit ``tensor<Nonex6xf32>`` and fail to
parse; now the generated function takes ``tensor<?x6xf32>`` and settles it against the scores.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

from attnpass import mlir as am  # noqa: E402
from attnpass import semantics  # noqa: E402
from attnpass.lowering import mlir as lowering  # noqa: E402
from attnpass.passes.match import MaskTerm  # noqa: E402
from attnpass.rewrite.mlir import builders as bl  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
SHAPE = (1, 4, 6, 8)


def _onnx_masked_attention(path: str, mask_shape: list) -> str:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["x"]),
        helper.make_node("Softmax", ["x"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["out"]),
    ]

    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(nodes, "masked", [info(n, list(SHAPE)) for n in "qkv"] + [info("mask", mask_shape)],
                              [info("out", None)], [helper.make_tensor("scale", TensorProto.FLOAT, [], [SHAPE[-1] ** -0.5])])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def symbolic_mask(tmp_path_factory):
    return _onnx_masked_attention(str(tmp_path_factory.mktemp("dyn") / "masked.onnx"), ["n", SHAPE[-2]])


def _inputs(rows: int):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(3))
    mask = (rng.standard_normal((rows, SHAPE[-2])) * 0.5).astype(np.float32)
    mask[..., -2:] = np.finfo(np.float32).min  # two padded keys: n = 4
    return q, k, v, mask


def test_symbolic_mask_dim_ssmax_parses_and_matches(symbolic_mask):
    imported = am.import_(symbolic_mask)
    assert "[?,6]" in str(imported)
    (site,) = am.find(imported).sites
    assert site.fusable, site.fuse_blocker  # the loop nest settles the mask's unknown size against the scores
    q, k, v, mask = _inputs(SHAPE[-2])
    # SSMax(s=0, b=1) is the original model
    same, report = am.rewrite(imported, to="ssmax", s=0.0, b=1.0, with_report=True)
    assert any("SSMax via" in n for n in report.sites[0].notes)
    assert "None" not in str(same)
    want = ort.InferenceSession(symbolic_mask).run(None, dict(q=q, k=k, v=v, mask=mask))[0]
    np.testing.assert_allclose(am.compile(same)(q, k, v, mask), want, atol=2e-5, rtol=1e-5)
    # SSMax(s) is semantics.ssmax_attention: n = 4 attendable keys per row
    got = am.compile(am.rewrite(imported, to="ssmax", s=0.7))(q, k, v, mask)
    t = [torch.from_numpy(a) for a in (q, k, v, mask)]
    ref = semantics.ssmax_attention(*t[:3], attn_mask=t[3], s=0.7)
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-5, rtol=1e-5)
    # and fused=True applies the same factor inside the loop nest, with the same numbers
    fused_ssmax = am.rewrite(imported, to="ssmax", s=0.7, fused=True)
    assert "attnpass_fused" in str(fused_ssmax) and "None" not in str(fused_ssmax)
    np.testing.assert_allclose(am.compile(fused_ssmax)(q, k, v, mask), got, atol=2e-5, rtol=1e-5)
    # the fused loop nest equals onnxruntime for the mask's [6, 6] and its broadcast [1, 6] (the scf.if of both)
    fn = am.compile(am.rewrite(imported, to="fused"))
    for rows in (1, SHAPE[-2]):
        q, k, v, mask = _inputs(rows)
        want = ort.InferenceSession(symbolic_mask).run(None, dict(q=q, k=k, v=v, mask=mask))[0]
        np.testing.assert_allclose(fn(q, k, v, mask), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 6])
def test_settle_mask_broadcasts_a_single_slice_or_casts_the_full_one(rows):
    term = MaskTerm("additive", None, None)
    t = bl.Ssa()
    t.emit("func.func @f(%m: tensor<?x6xf32>) -> tensor<6x6xf32> {", 1)
    settled = bl.settle_mask(t, bl.MaskIn(term, "%m", (None, 6), "f32"), (2, 6, 6))
    assert settled.shape == (6, 6)
    t.emit(f"return {settled.arg} : tensor<6x6xf32>")
    t.emit("}", 1)
    text = t.text()
    assert "scf.if" in text and "tensor.dim" in text and "None" not in text
    m = np.arange(rows * 6, dtype=np.float32).reshape(rows, 6)
    got = lowering.compile_module(text, from_linalg=True, func_name="f", opt_level=0)(m)
    np.testing.assert_array_equal(got, np.broadcast_to(m, (6, 6)))


def test_settle_mask_against_size_one_is_a_cast():
    t = bl.Ssa()
    settled = bl.settle_mask(t, bl.MaskIn(MaskTerm("bool", None, None), "%m", (None, None), "i1"), (1, 5))
    assert settled.shape == (1, 5)
    text = t.text()
    assert "tensor.cast %m : tensor<?x?xi1> to tensor<1x?xi1>" in text  # size 1: no branch needed
    assert text.count("scf.if") == 1  # only the dim read against 5 may be a broadcast
    assert math.prod(settled.shape) == 5


class Plain(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _padded_inputs(b: int, s: int):
    g = torch.Generator().manual_seed(b * 100 + s)
    q, k, v = (torch.randn(b, 4, s, 8, generator=g) for _ in range(3))
    keep = torch.ones(b, s, dtype=torch.long)
    keep[-1, -2:] = 0
    return (q, k, v, keep), (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min


@pytest.mark.parametrize("dynamic", ["batch", "seq"])
@pytest.mark.parametrize("masked", [True, False], ids=["padded", "plain"])
def test_explicit_ssmax_with_unknown_batch_or_sequence(dynamic, masked):
    """Scores with ``?`` sizes: SSMax sizes its tensors with ``tensor.dim`` (and counts ``n = S_k`` at run time)."""
    from tests.attention_modules import PaddedAdditive

    dim = torch.export.Dim("N", min=2, max=64)
    axis = 0 if dynamic == "batch" else 2
    shapes = ({axis: dim},) * 3 + (({0 if dynamic == "batch" else 1: dim},) if masked else ())
    args, _ = _padded_inputs(2, 6)
    model = (PaddedAdditive() if masked else Plain()).eval()
    ep = torch.export.export(model, args if masked else args[:3], dynamic_shapes=shapes, strict=False)
    imported = am.import_(ep)
    assert "?" in str(imported)
    s = torch.tensor([0.5, 0.6, 0.7, 0.8])
    out, report = am.rewrite(imported, to="ssmax", s=s.tolist(), b=0.1, with_report=True)
    assert any("SSMax via" in n for n in report.sites[0].notes)
    assert "None" not in str(out)
    fn = am.compile(out)
    for size in (3, 9):
        args, mask = _padded_inputs(size if dynamic == "batch" else 2, size if dynamic == "seq" else 6)
        want = semantics.ssmax_attention(*args[:3], attn_mask=mask if masked else None, s=s, b=0.1)
        torch.testing.assert_close(fn(*(args if masked else args[:3])), want, atol=2e-5, rtol=1e-5)
