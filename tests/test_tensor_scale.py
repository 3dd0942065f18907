"""Scores scaled by a run-time tensor constant along S_q and S_k (a per-head temperature): the factor moves onto Q.

``(q * t) . k == t * (q . k)`` when ``t`` right-aligned against Q broadcasts as it does against the scores.  The
variant table checks found / fused / SSMax per IR; here, fused SSMax through ONNX and MLIR, and the layouts where
the factor must stay on the scores (the site is then unfused, with the reason).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import attnpass
from attnpass import semantics
from tests import gap_modules as G

B, H, S, D = 2, 3, 7, 8
S_SSMAX = 0.43
ATTN = torch.ops.attnpass.attention.default


def _qkv(layout: str = "bhsd") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    return tuple(x.transpose(1, 2).contiguous() for x in (q, k, v)) if layout == "bshd" else (q, k, v)


def _temp() -> torch.Tensor:
    return torch.rand(H, 1, 1, generator=torch.Generator().manual_seed(4)) + 0.5


def _want_ssmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SSMax of the module's attention: scores ``(q . k) / t``, i.e. q divided by t, scale 1."""
    qd, kd, vd = (x.double() for x in (q, k, v))
    return semantics.attention(qd / t.double(), kd, vd, scale=1.0, ssmax_s=S_SSMAX).float()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> tuple[Path, tuple[torch.Tensor, ...]]:
    args = (*_qkv(), _temp())
    path = tmp_path_factory.mktemp("tscale") / "tensor_scale.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(G.TensorScaleInput().eval(), args, str(path), dynamo=False, opset_version=17,
                          input_names=[f"in{i}" for i in range(len(args))])
    return path, args


def test_onnx_fused_ssmax_moves_the_factor_onto_q(onnx_model, tmp_path) -> None:
    from attnpass import onnx as aonnx

    path, args = onnx_model
    feeds = {f"in{i}": x.numpy() for i, x in enumerate(args)}
    res = aonnx.rewrite(path, tmp_path / "fused_ssmax.onnx", to="fused", s=S_SSMAX, inputs=feeds)
    assert len(res.rewritten) == 1 and res.validation.passed, res.left
    (got,) = ort.InferenceSession(str(tmp_path / "fused_ssmax.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got, _want_ssmax(*args).numpy(), rtol=1e-4, atol=1e-4)


def test_mlir_fused_ssmax_moves_the_factor_onto_q() -> None:
    from attnpass import mlir as am

    args = (*_qkv(), _temp())
    mod, res = am.rewrite(am.import_(G.TensorScaleInput().eval(), args), to="fused", s=S_SSMAX, with_report=True)
    assert len(res.rewritten) == 1, res.left
    got = am.compile(mod, opt_level=0)(*args)
    torch.testing.assert_close(torch.as_tensor(got[0] if isinstance(got, tuple | list) else got), _want_ssmax(*args),
                               rtol=1e-4, atol=1e-4)


class _EinsumBSHD(torch.nn.Module):
    """Q in ``[B, S, H, D]``: a ``[H, 1, 1]`` factor right-aligned against Q would meet S, not H."""

    def forward(self, q, k, v, t):
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / t, -1), v)


class _MaskThenScale(torch.nn.Module):
    """The factor scales the mask too: moved onto Q it would leave the mask unscaled."""

    def forward(self, q, k, v, t, m):
        return torch.softmax((q @ k.transpose(-2, -1) + m) / t, -1) @ v


class _GrowsQ(torch.nn.Module):
    """A per-batch factor with Q broadcast over the batch: on Q it would change Q's shape."""

    def forward(self, q, k, v, t):
        return torch.softmax((q[:1] @ k.transpose(-2, -1)) / t[:B].reshape(B, 1, 1, 1), -1) @ v


@pytest.mark.parametrize("module,layout,extra,why", [
    (_EinsumBSHD(), "bshd", (), "einsum or permuted"),
    (_MaskThenScale(), "bhsd", (torch.randn(B, 1, 1, S),), "after a mask"),
    (_GrowsQ(), "bhsd", (), "beyond its own size"),
], ids=["einsum_bshd", "mask_then_scale", "grows_q"])
def test_factor_that_cannot_move_onto_q_keeps_the_site_unfused(module, layout, extra, why) -> None:
    args = (*_qkv(layout), torch.rand(max(B, H), 1, 1) + 0.5 if isinstance(module, _GrowsQ) else _temp(), *extra)
    (site,) = attnpass.find(module, args).sites
    assert site.fuse_blocker is not None and "run-time tensor" in site.fuse_blocker and why in site.fuse_blocker
    gm = attnpass.fuse(module, args)
    assert not any(n.target is ATTN for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*args), module(*args))
