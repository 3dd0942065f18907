"""Sliding-window masks count ``n`` as the window, not as the causal prefix: SSMax pinned to ``semantics.keys_per_row``.

The same hand-written window ``(j <= i) & (j > i - w)`` through torch.fx and ONNX (both exporters), and the
ONNX spec's opset-24 ``Attention`` local window expanded into its body.  Each SSMax output equals
``semantics.attention`` with that mask (whose ``n`` is ``keys_per_row``), and the same attention with the causal
count ``i + 1`` in place of ``n`` differs from it by far more than the tolerance, so a wrong count fails.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import attnpass
import attnpass.onnx as aonnx
from attnpass import semantics
from tests import gap_modules as G

warnings.filterwarnings("ignore")
B, H, S, D, W, SSMAX_S = 2, 4, 12, 8, 3, 1.5


def _qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, S, D, generator=g) for _ in range(3))


def _window(s_q: int, s_k: int, w: int) -> torch.Tensor:
    i, j = torch.arange(s_q)[:, None], torch.arange(s_k)[None, :]
    return (j <= i) & (j > i - w)


def _with_n(q, k, v, allowed: torch.Tensor, n: torch.Tensor, s: float) -> torch.Tensor:
    """Masked attention with SSMax using the given ``n`` (float64): what a rewrite with that count computes."""
    q, k, v = q.double(), k.double(), v.double()
    z = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    z = z * (s * torch.log(n.double().clamp(min=1))).unsqueeze(-1)
    return (torch.softmax(z.masked_fill(~allowed, float("-inf")), -1) @ v).float()


def _rewrites_match(path, feeds: dict, right: torch.Tensor, tmp_path) -> None:
    """SSMax unfused and fused, each rewritten, validated and run in onnxruntime, equal ``right``."""
    for to in ("ssmax", "fused"):
        out = tmp_path / f"{to}.onnx"
        res = aonnx.rewrite(path, out, to=to, s=SSMAX_S, inputs=feeds)
        assert len(res.rewritten) == 1, res.left
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(got, right.numpy(), rtol=1e-4, atol=1e-4)



def _references(q, k, v, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = semantics.keys_per_row((B, H, S, S), allowed)
    assert n[0, 0].tolist() == [min(i + 1, W) for i in range(S)]  # the window, not the prefix
    right = semantics.attention(q.double(), k.double(), v.double(), attn_mask=allowed, ssmax_s=SSMAX_S).float()
    torch.testing.assert_close(_with_n(q, k, v, allowed, n, SSMAX_S), right, rtol=1e-5, atol=1e-5)
    causal_n = torch.arange(1, S + 1).expand(B, H, S)
    wrong = _with_n(q, k, v, allowed, causal_n, SSMAX_S)
    assert (wrong - right).abs().max() > 1e-2  # the count matters at this s
    return right, wrong


def test_fx_window_counts_the_window() -> None:
    q, k, v = _qkv()
    right, _ = _references(q, k, v, _window(S, S, W))
    for fused in (False, True):
        gm = attnpass.to_ssmax(G.SlidingWindow(W).eval(), (q, k, v), s=SSMAX_S, fused=fused)
        torch.testing.assert_close(gm(q, k, v), right, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_onnx_window_counts_the_window(exporter: str, tmp_path: Path) -> None:
    q, k, v = _qkv()
    right, _ = _references(q, k, v, _window(S, S, W))
    path = tmp_path / "m.onnx"
    torch.onnx.export(G.SlidingWindow(W).eval(), (q, k, v), str(path), dynamo=exporter == "dynamo",
                      opset_version=18 if exporter == "dynamo" else 17, input_names=["q", "k", "v"], output_names=["y"])
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    _rewrites_match(path, feeds, right, tmp_path)


def test_onnx_spec_local_window_counts_the_window(tmp_path: Path) -> None:
    """Opset-24 ``Attention(is_causal=1, left_window_size=2)`` expanded into its body (``Q [2,3,4,8]``, ``K [2,3,6,8]``).

    The attendable keys are read off the original model itself: with ``Q = 0`` each row is uniform over its
    attendable keys, and ``V[j] = e_j`` makes output column ``j`` nonzero exactly where key ``j`` is attendable.
    """
    import onnx

    from tests.test_onnx_spec_attention import SPECS, _build

    spec = next(s for s in SPECS if s.export == "attention_local_window")
    case = next(c for c in _build(spec) if c.name.endswith("_expanded"))
    path = tmp_path / "m.onnx"
    onnx.save(case.model, path)
    names = [i.name for i in case.model.graph.input]
    q, k, v = (torch.from_numpy(x) for x in case.data_sets[0][0][:3])
    b, h, s_q, d = q.shape
    s_k = k.shape[-2]
    probe = torch.zeros(b, h, s_k, d)
    probe[..., torch.arange(s_k), torch.arange(s_k)] = 1.0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seen = sess.run(None, dict(zip(names, [np.zeros_like(q.numpy()), k.numpy(), probe.numpy()])))[0]
    allowed = torch.from_numpy(seen[..., :s_k] > 0)
    n = semantics.keys_per_row((b, h, s_q, s_k), allowed)
    causal_n = semantics.keys_per_row((b, h, s_q, s_k), semantics.causal_allowed(s_q, s_k))
    assert (n <= 3).all() and (n != causal_n).any(), (n[0, 0], causal_n[0, 0])  # a window of 2 keys back plus the key itself
    right = semantics.attention(q.double(), k.double(), v.double(), attn_mask=allowed, ssmax_s=SSMAX_S).float()
    wrong = _with_n(q, k, v, allowed, causal_n, SSMAX_S)
    assert (wrong - right).abs().max() > 1e-3
    feeds = dict(zip(names, [q.numpy(), k.numpy(), v.numpy()]))
    _rewrites_match(path, feeds, right, tmp_path)
