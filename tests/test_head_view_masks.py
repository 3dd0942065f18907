"""fairseq / MBart attention: ``[B*H, T, S]`` bmm scores viewed to ``[B, H, T, S]`` for the mask add and back.

The site records the view (``MaskTerm.view``); each emitter lays the mask out on the 3-D scores (broadcast over
``B`` and ``H`` only where it varies there, then folded) and otherwise treats the site as any ``bmm`` attention.
Beyond the variant table's padding row: masks that vary per batch and query, per head, and one shared ``[T, S]``
bias, each fused (equal to the original) and SSMax'd (equal to the fx SSMax module, itself checked against
``semantics``) in ONNX and MLIR; the laid-out mask keeps its own ``[.., 1, S]`` shape (no ``S x S`` copy per head).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

import attnpass
import attnpass.mlir as am
import attnpass.onnx as aonnx
from attnpass import semantics
from attnpass.validate import run
from tests import gap_modules as G

B, H, T, D = 2, 3, 5, 4


def _inputs(kind: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    mask = {"batch_query_bias": 0.3 * torch.randn(B, 1, T, T, generator=g),
            "shared_bias": 0.3 * torch.randn(T, T, generator=g),
            "per_head_padding": torch.where(torch.rand(B, H, 1, T, generator=g) > 0.3, 0.0, -1e9)}[kind]
    return q, k, v, mask


KINDS = ["batch_query_bias", "shared_bias", "per_head_padding"]


@pytest.mark.parametrize("kind", KINDS)
def test_fx_ssmax_matches_semantics(kind: str) -> None:
    args = _inputs(kind)
    q, k, v, mask = args
    module = G.Bmm3DView4DMask().eval()
    for fused in (False, True):
        got = attnpass.to_ssmax(module, args, s=0.43, fused=fused)(*args)
        torch.testing.assert_close(got, semantics.attention(q, k, v, attn_mask=mask, ssmax_s=0.43), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_fused_and_ssmax(kind: str, tmp_path: Path) -> None:
    args = _inputs(kind)
    module = G.Bmm3DView4DMask().eval()
    src = tmp_path / "m.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(src), dynamo=False, opset_version=17, input_names=["q", "k", "v", "m"])
    feeds = dict(zip(["q", "k", "v", "m"], (x.numpy() for x in args)))
    fused = aonnx.rewrite(src, tmp_path / "fused.onnx", to="fused", inputs=feeds)
    assert fused.rewritten == [0] and fused.validation.passed
    aonnx.rewrite(src, tmp_path / "ssmax.onnx", to="ssmax", s=0.43, inputs=feeds)
    want = attnpass.to_ssmax(module, args, s=0.43)(*args).detach().numpy()
    np.testing.assert_allclose(list(run(tmp_path / "ssmax.onnx", feeds).values())[0], want, rtol=1e-4, atol=1e-5)


def test_mlir_lays_the_padding_out_per_head_not_per_query() -> None:
    args = _inputs("per_head_padding")
    module = G.Bmm3DView4DMask().eval()
    want = module(*args).detach().numpy()
    out = am.rewrite(am.import_(module, args), to="fused")
    text = str(out)
    assert "attnpass_head_view" in text and f"tensor<{B * H}x1x{T}xf32>" in text and "attnpass_fused" in text
    np.testing.assert_allclose(np.asarray(am.compile(out)(*args)), want, rtol=1e-5, atol=1e-5)
    ssmax = am.rewrite(am.import_(module, args), to="ssmax", s=0.43)
    ref = attnpass.to_ssmax(module, args, s=0.43)(*args).detach().numpy()
    np.testing.assert_allclose(np.asarray(am.compile(ssmax)(*args)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fx_fused_serves_another_batch_size(kind: str) -> None:
    """Exported with the default dynamic batch, the view's batch is a symbol: the mask is laid out with no size
    written into the graph, so the fused module answers for a batch it was not traced with."""
    module = G.Bmm3DView4DMask().eval()
    fused = attnpass.fuse(module, _inputs(kind))
    assert fused.attnpass_result.rewritten == [0], fused.attnpass_result.left
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B + 2, H, T, D, generator=g) for _ in range(3))
    mask = {"batch_query_bias": 0.3 * torch.randn(B + 2, 1, T, T, generator=g),
            "shared_bias": 0.3 * torch.randn(T, T, generator=g),
            "per_head_padding": torch.where(torch.rand(B + 2, H, 1, T, generator=g) > 0.3, 0.0, -1e9)}[kind]
    torch.testing.assert_close(fused(q, k, v, mask), module(q, k, v, mask), rtol=1e-5, atol=1e-5)


def _batch(kind: str, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``_inputs``' kind of mask at another batch size."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, H, T, D, generator=g) for _ in range(3))
    mask = {"batch_query_bias": 0.3 * torch.randn(batch, 1, T, T, generator=g),
            "shared_bias": 0.3 * torch.randn(T, T, generator=g),
            "per_head_padding": torch.where(torch.rand(batch, H, 1, T, generator=g) > 0.3, 0.0, -1e9)}[kind]
    return q, k, v, mask


def _export_dynamic_batch(kind: str, exporter: str, path: Path) -> None:
    module, args = G.Bmm3DView4DMask().eval(), _inputs(kind)
    batched_mask = kind != "shared_bias"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {n: {0: "batch"} for n in ("q", "k", "v", "m")[:4 if batched_mask else 3]}
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=["q", "k", "v", "m"],
                              dynamic_axes=axes)
        else:
            dim = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, input_names=["q", "k", "v", "m"],
                              dynamic_shapes=({0: dim},) * 3 + (({0: dim} if batched_mask else {}),), verbose=False)


@pytest.mark.parametrize("exporter,kind", [("torchscript", k) for k in KINDS] + [("dynamo", "batch_query_bias")])
def test_onnx_dynamic_batch_fused_and_ssmax_at_two_batch_sizes(exporter: str, kind: str, tmp_path: Path) -> None:
    """Exported with a dynamic batch, the view's batch is a symbol: the mask is laid out with ``Reshape(-1, ..)``
    and the factor split by ``Reshape(-1, H, ..)``, so the rewritten model answers at batch sizes it never saw."""
    src = tmp_path / "m.onnx"
    _export_dynamic_batch(kind, exporter, src)
    module = G.Bmm3DView4DMask().eval()
    feeds = dict(zip(["q", "k", "v", "m"], (x.numpy() for x in _inputs(kind))))
    fused = aonnx.rewrite(src, tmp_path / "fused.onnx", to="fused", inputs=feeds)
    assert fused.rewritten == [0] and fused.validation.passed, fused.left
    ssmax = aonnx.rewrite(src, tmp_path / "ssmax.onnx", to="ssmax", s=0.43, inputs=feeds)
    assert ssmax.rewritten == [0], ssmax.left
    for batch in (1, B + 2):
        q, k, v, mask = args = _batch(kind, batch, seed=10 + batch)
        ins = dict(zip(["q", "k", "v", "m"], (x.numpy() for x in args)))
        got = list(run(tmp_path / "fused.onnx", ins).values())[0]
        np.testing.assert_allclose(got, module(*args).detach().numpy(), rtol=1e-4, atol=1e-5)
        got = list(run(tmp_path / "ssmax.onnx", ins).values())[0]
        want = semantics.attention(q, k, v, attn_mask=mask, ssmax_s=0.43).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("source,kind", [("torch", "batch_query_bias"), ("torch", "per_head_padding"),
                                         ("onnx", "per_head_padding")])
def test_mlir_dynamic_batch_fused_and_ssmax_at_two_batch_sizes(source: str, kind: str, tmp_path: Path) -> None:
    """A dynamic batch (torch.export, or the TorchScript ONNX export imported): MLIR types print it as ``?``; the
    view is proved from the sizes the views were given (``B``, ``B*H``, a ``-1`` solved from its source), the mask
    laid out by a function sized with ``tensor.dim``.  The fused loop nest takes the ``?`` batch too (its parallel loop
    runs over the run-time ``B*H``), plain and with SSMax.  From ONNX the importer types the keys of
    ``Reshape(k, [B*H, -1, D])`` as ``?`` too: an unknown ``S_k`` leaves the fused rewrite, with that reason."""
    module, args = G.Bmm3DView4DMask().eval(), _inputs(kind)
    if source == "torch":
        dim = torch.export.Dim("batch", min=1, max=64)
        imported = am.import_(torch.export.export(module, args, dynamic_shapes=({0: dim},) * 4, strict=False))
    else:
        _export_dynamic_batch(kind, "torchscript", tmp_path / "m.onnx")
        imported = am.import_(str(tmp_path / "m.onnx"))
    fused, fres = am.rewrite(imported, to="fused", with_report=True)
    out, res = am.rewrite(imported, to="ssmax", s=0.43, with_report=True)
    text = str(out)
    assert res.rewritten == [0] and "attnpass_head_view" in text and "tensor.dim" in text and "None" not in text
    fused_ssmax = am.rewrite(imported, to="ssmax", s=0.43, fused=True)
    fns = [am.compile(m) for m in (out, fused_ssmax)]
    if source == "onnx":
        assert fres.rewritten == [] and "static S_q, S_k" in fres.left[0], fres.left
        fn_fused = None
    else:
        assert fres.rewritten == [0], fres.left
        assert "attnpass_fused" in str(fused) and "attnpass_fused" in str(fused_ssmax) and "None" not in str(fused)
        fn_fused = am.compile(fused)
    for batch in (1, B + 2):
        q, k, v, mask = batch_args = _batch(kind, batch, seed=20 + batch)
        if fn_fused is not None:
            np.testing.assert_allclose(np.asarray(fn_fused(*batch_args)), module(*batch_args).detach().numpy(),
                                       rtol=1e-5, atol=1e-5)
        want = semantics.attention(q, k, v, attn_mask=mask, ssmax_s=0.43)
        for fn in fns:
            np.testing.assert_allclose(np.asarray(fn(*batch_args)), want.numpy(), rtol=1e-5, atol=1e-5)
