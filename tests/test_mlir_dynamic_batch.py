"""The fused MLIR loop nest under a dynamic batch: ``?`` batch dims in its types, read with ``tensor.dim`` at run time.

Exported with a dynamic batch (``torch.export`` ``dynamic_shapes``, an ONNX ``dynamic_axes`` batch), attention is
fused and fused with SSMax in MLIR as it is in fx and ONNX: one compiled function answers at batch sizes it never
saw.  The parallel loop's trip count is ``batch x heads x query blocks`` computed at run time; GQA still maps
heads; a mask broadcast over the batch (size 1, or a ``?`` that is 1 at run time) is read at index 0.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)
from onnx import TensorProto, helper

import attnpass.mlir as am
from attnpass.kernels import reference

warnings.filterwarnings("ignore")
F = torch.nn.functional
H, KV, S, D = 4, 2, 128, 16  # two query blocks of 64 rows, key tiles of 32: the blocked schedule under a ? batch
S_H = [0.6, 0.5, 0.4, 0.3]  # per-head SSMax s: the head count stays static


class _GqaCausalPadded(torch.nn.Module):
    """SDPA with GQA, top-left causal and a per-batch padding mask ``[B, 1, 1, S]``."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)


class _EinsumBqhd(torch.nn.Module):
    """Explicit attention in the ``[B, S, H, D]`` layout (einsum): Q, K, V and the output are transposed around the
    loop nest, each transpose sized with the run-time batch."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + mask
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def _args(kind: str, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.where(torch.rand(batch, 1, 1, S, generator=g) > 0.25, 0.0, torch.finfo(torch.float32).min)
    if kind == "gqa":
        q = torch.randn(batch, H, S, D, generator=g)
        k, v = (torch.randn(batch, KV, S, D, generator=g) for _ in range(2))
    else:
        q, k, v = (torch.randn(batch, S, H, D, generator=g) for _ in range(3))
    return q, k, v, mask


def _want(kind: str, args: tuple[torch.Tensor, ...], ssmax: bool) -> np.ndarray:
    """``reference.attention_forward`` (SSMax with ``S_H`` per head); SDPA's ``is_causal`` is top-left."""
    q, k, v, mask = args
    s = torch.tensor(S_H) if ssmax else None
    if kind == "gqa":
        keep = torch.arange(S)[None, :] <= torch.arange(S)[:, None]
        bias = mask.masked_fill(~keep, -math.inf)
        return reference.attention_forward(q, k, v, attn_mask=bias, enable_gqa=True, ssmax_s=s)[0].numpy()
    canon = [x.transpose(1, 2) for x in (q, k, v)]
    out = reference.attention_forward(*canon, attn_mask=mask, ssmax_s=s)[0]
    return out.transpose(1, 2).numpy()


@pytest.fixture(scope="module", params=["gqa", "einsum"])
def from_torch(request: pytest.FixtureRequest) -> tuple[str, object]:
    kind = request.param
    module = (_GqaCausalPadded() if kind == "gqa" else _EinsumBqhd()).eval()
    dim = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(module, _args(kind, 2, 0), dynamic_shapes=({0: dim},) * 4, strict=False)
    return kind, am.import_(ep)


def _signature(text: str) -> str:
    (line,) = [x for x in text.splitlines() if "func.func private @attnpass_fused" in x]
    return line


def test_fused_signature_prints_the_batch_as_unknown(from_torch: tuple[str, object]) -> None:
    """``?x`` in every operand and the result, never ``None``; the sizes read with ``tensor.dim``, the parallel loop's
    trip count an SSA value computed from them (not a literal)."""
    _, imported = from_torch
    fused, res = am.rewrite(imported, to="fused", tile=32, with_report=True)
    assert res.rewritten == [0], res.left
    text = str(fused)
    sig = _signature(text)
    assert sig.count("tensor<?x") == 5 and "None" not in text, sig  # q, k, v, mask and the result
    assert "tensor.dim" in text
    assert re.search(r"scf\.forall \(%\w+\) in \(%\w+\)", text), "the trip count is computed at run time"


@pytest.mark.parametrize("ssmax", [False, True], ids=["fused", "fused_ssmax"])
def test_fused_from_torch_at_two_batch_sizes(from_torch: tuple[str, object], ssmax: bool) -> None:
    kind, imported = from_torch
    if ssmax:
        out, res = am.rewrite(imported, to="ssmax", s=S_H, fused=True, tile=32, with_report=True)
        assert "with SSMax" in " ".join(res.report.sites[0].notes)
    else:
        out, res = am.rewrite(imported, to="fused", tile=32, with_report=True)
    assert res.rewritten == [0], res.left
    fn = am.compile(out, opt_level=0)
    for batch in (1, 3):
        args = _args(kind, batch, seed=batch)
        if ssmax:
            want = _want(kind, args, ssmax)
        else:  # plain fused keeps the model's own output, also on a row whose only keys carry finfo.min
            with torch.no_grad():
                want = (_GqaCausalPadded() if kind == "gqa" else _EinsumBqhd())(*args).numpy()
        np.testing.assert_allclose(np.asarray(fn(*args)), want, rtol=1e-5, atol=2e-6)


def _explicit_onnx(path: Path, mask_batch: str) -> str:
    """Explicit attention with a ``batch`` dim on Q, K, V and the mask's own symbolic first dim ``mask_batch``: equal
    to the batch, or 1 at run time (a broadcast the loop nest reads at index 0)."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["x"]),
        helper.make_node("Softmax", ["x"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["out"]),
    ]

    def info(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    qkv = ["batch", 2, 6, 8]
    graph = helper.make_graph(nodes, "dyn", [info(n, qkv) for n in "qkv"] + [info("mask", [mask_batch, 1, 1, 6])],
                              [info("out", qkv)], [helper.make_tensor("scale", TensorProto.FLOAT, [], [8 ** -0.5])])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.save(model, path)
    return str(path)


class _Padded(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask, dim=-1) @ v


def _onnx_export(path: Path, exporter: str) -> str:
    """An ONNX export (TorchScript or dynamo) with a dynamic batch on every input."""
    args = _args("gqa", 2, 0)
    args = (args[0], args[0] + 0.5, args[0] - 0.5, args[3])
    names = ["q", "k", "v", "mask"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(_Padded().eval(), args, str(path), dynamo=False, opset_version=17, input_names=names,
                              dynamic_axes={n: {0: "batch"} for n in names})
        else:
            dim = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(_Padded().eval(), args, str(path), dynamo=True, opset_version=18, input_names=names,
                              dynamic_shapes=({0: dim},) * 4, verbose=False)
    return str(path)


@pytest.mark.parametrize("source", ["torchscript", "dynamo", "mask_broadcast"])
def test_fused_from_onnx_at_two_batch_sizes(source: str, tmp_path: Path) -> None:
    """Fused equals onnxruntime and fused SSMax(s=0, b=1) equals it too, at two batch sizes; with the mask's own
    ``?`` first dim fed as 1, every batch entry reads the one mask."""
    exported = source != "mask_broadcast"
    path = _onnx_export(tmp_path / "m.onnx", source) if exported else _explicit_onnx(tmp_path / "m.onnx", "mb")
    imported = am.import_(path)
    fused, res = am.rewrite(imported, to="fused", with_report=True)
    assert res.rewritten == [0], res.left
    assert "tensor<?x" in _signature(str(fused)) and "None" not in str(fused)
    same = am.rewrite(imported, to="ssmax", s=0.0, b=1.0, fused=True)
    assert "attnpass_fused" in str(same)
    fns = [am.compile(fused), am.compile(same)]
    session = ort.InferenceSession(path)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        shape = (batch, H, S, D) if exported else (batch, 2, 6, 8)
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        mask_rows = 1 if source == "mask_broadcast" else batch
        mask = np.where(rng.random((mask_rows, 1, 1, shape[2])) > 0.3, 0.0, -1e9).astype(np.float32)
        want = session.run(None, dict(q=q, k=k, v=v, mask=mask))[0]
        for fn in fns:
            np.testing.assert_allclose(np.asarray(fn(q, k, v, mask)), want, rtol=1e-5, atol=2e-6)


class _CausalSdpa(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_half_precision_under_a_dynamic_batch() -> None:
    """f16 operands are widened and the output narrowed by generics sized with the run-time batch."""
    def args(batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(batch)
        return tuple(torch.randn(batch, 2, S, D, generator=g).to(torch.float16) for _ in range(3))

    dim = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(_CausalSdpa().eval(), args(2), dynamic_shapes=({0: dim},) * 3, strict=False)
    fused, res = am.rewrite(am.import_(ep), to="fused", tile=32, with_report=True)
    assert res.rewritten == [0], res.left
    assert _signature(str(fused)).count("tensor<?x2x128x16xf16>") == 4
    fn = am.compile(fused, opt_level=0)
    for batch in (1, 3):
        q, k, v = args(batch)
        got = fn(q, k, v)
        assert got.dtype == torch.float16 and got.shape == q.shape
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def _attention_op(path: Path) -> str:
    """The ONNX ``Attention`` op (opset 23) with GQA, ``is_causal`` and a ``[batch, 1, S, S]`` bias, batch dynamic."""
    def info(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], is_causal=1)
    ins = [info("q", ["batch", H, S, D]), info("k", ["batch", KV, S, D]), info("v", ["batch", KV, S, D]),
           info("mask", ["batch", 1, S, S])]
    model = helper.make_model(helper.make_graph([node], "attn", ins, [info("y", ["batch", H, S, D])]),
                              opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    onnx.save(model, path)
    return str(path)


def test_attention_op_under_a_dynamic_batch(tmp_path: Path) -> None:
    """The op itself (which torch-mlir leaves as ``torch.operator``) is replaced by the loop nest with a ``?`` batch:
    fused and fused SSMax(s=0, b=1) equal onnxruntime at two batch sizes."""
    path = _attention_op(tmp_path / "attn.onnx")
    imported = am.import_(path)
    fused, res = am.rewrite(imported, to="fused", with_report=True)
    assert res.rewritten == [0], res.left
    assert "tensor<?x" in _signature(str(fused)) and "onnx.Attention" not in str(fused)
    fns = [am.compile(fused), am.compile(am.rewrite(imported, to="ssmax", s=0.0, b=1.0, fused=True))]
    session = ort.InferenceSession(path)
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        q = rng.standard_normal((batch, H, S, D), dtype=np.float32)
        k, v = (rng.standard_normal((batch, KV, S, D), dtype=np.float32) for _ in range(2))
        mask = np.where(rng.random((batch, 1, S, S)) > 0.3, 0.0, -1e9).astype(np.float32)
        mask[..., 0] = 0.0  # every row keeps key 0 (the one its causal window always holds)
        want = session.run(None, dict(q=q, k=k, v=v, mask=mask))[0]
        for fn in fns:
            np.testing.assert_allclose(np.asarray(fn(q, k, v, mask)), want, rtol=1e-5, atol=2e-6)
