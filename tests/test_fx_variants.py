"""torch.fx behaviour beyond the variant table (``test_variant_table``): SSMax edge rows, parameters, training,
export again, blocked fusion, non-attention softmaxes, reported scale, dynamic lengths."""

from __future__ import annotations

import math

import pytest
import torch

import attnpass
from attnpass import semantics
from tests import attention_modules as M

B, H, S, D = 2, 4, 9, 8


def _qkv(sq: int = S, sk: int = S, hk: int = H, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, sq, D, generator=g)
    k = torch.randn(B, hk, sk, D, generator=g)
    v = torch.randn(B, hk, sk, D, generator=g)
    return q, k, v


def _key_keep(sk: int = S) -> torch.Tensor:
    keep = torch.ones(B, sk, dtype=torch.bool)
    keep[1, sk - 3:] = False
    return keep


@pytest.mark.parametrize("fused", [False, True], ids=["inplace", "fused"])
def test_ssmax_first_causal_row_has_no_nan_and_keeps_its_one_key(fused: bool) -> None:
    """Row 0 of a causal mask has n=1: factor 0 with b=0; it must attend exactly key 0."""
    q, k, v = _qkv()
    ss = attnpass.to_ssmax(M.CausalTril().eval(), (q, k, v), s=0.43, fused=fused)
    out = ss(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["inplace", "fused"])
def test_ssmax_parameters_are_per_head_trainable_and_saved(tmp_path, fused: bool) -> None:
    q, k, v = _qkv()
    ss = attnpass.to_ssmax(M.CausalTril().eval(), (q, k, v), s=0.3, b=0.1, fused=fused)
    state = ss.state_dict()
    assert state["attnpass_ssmax.s_0"].shape == (H,)
    assert torch.allclose(state["attnpass_ssmax.b_0"], torch.full((H,), 0.1))
    ss(q, k, v).square().sum().backward()
    grad = ss.get_submodule("attnpass_ssmax").s_0.grad
    assert grad is not None and grad.abs().sum() > 0
    # a reloaded state dict reproduces the model; and the rewritten module exports again
    ss2 = attnpass.to_ssmax(M.CausalTril().eval(), (q, k, v), b=0.0, fused=fused)
    torch.save(state, tmp_path / "sd.pt")
    ss2.load_state_dict(torch.load(tmp_path / "sd.pt"))
    torch.testing.assert_close(ss2(q, k, v), ss(q, k, v))
    again = torch.export.export(ss2, (q, k, v), strict=False)
    torch.testing.assert_close(again.module()(q, k, v), ss(q, k, v))


def test_fused_module_trains_and_exports_again() -> None:
    q, k, v = _qkv()
    q.requires_grad_(True)
    m = M.PaddedAdditive().eval()
    keep = _key_keep()
    fused = attnpass.fuse(m, (q, k, v, keep))
    fused(q, k, v, keep).sum().backward()
    g_fused = q.grad.clone()
    q.grad = None
    m(q, k, v, keep).sum().backward()
    torch.testing.assert_close(g_fused, q.grad, rtol=1e-5, atol=1e-5)
    again = torch.export.export(fused, (q.detach(), k, v, keep), strict=False)
    assert any(n.target == torch.ops.attnpass.attention.default for n in again.graph.nodes)


def test_returned_probabilities_block_fusion_but_not_ssmax() -> None:
    q, k, v = _qkv()
    m = M.ReturnsProbs().eval()
    report = attnpass.find(m, (q, k, v))
    assert len(report.sites) == 1
    assert not report.sites[0].fusable
    assert "also used" in report.sites[0].fuse_blocker
    fused = attnpass.fuse(m, (q, k, v))  # left alone, still correct
    torch.testing.assert_close(fused(q, k, v)[0], m(q, k, v)[0])
    ss = attnpass.to_ssmax(m, (q, k, v), s=0.43)
    out, probs = ss(q, k, v)
    torch.testing.assert_close(out, semantics.ssmax_attention(q, k, v, s=0.43), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, S))


def test_training_dropout_blocks_fusion() -> None:
    q, k, v = _qkv()
    m = M.PaddedAdditive().train()
    report = attnpass.find(m, (q, k, v, _key_keep()))
    assert len(report.sites) == 1
    assert "dropout" in (report.sites[0].fuse_blocker or "")


def test_classifier_and_router_softmax_are_not_attention() -> None:
    q, k, v = _qkv()
    report = attnpass.find(M.NotAttention(D).eval(), (q, k, v))
    assert report.sites == ()  # sites are a tuple: a report is frozen
    assert len(report.skipped) == 2
    assert all(s.reason for s in report.skipped)


def test_scale_reported() -> None:
    q, k, v = _qkv()
    site = attnpass.find(M.CausalTril().eval(), (q, k, v)).sites[0]
    assert math.isclose(site.scale, 1 / math.sqrt(D), rel_tol=1e-6)
    site = attnpass.find(M.SoftcapPrescaled().eval(), (q, k, v)).sites[0]
    assert site.scale == 1.0 and math.isclose(site.scale_on_q, D ** -0.5, rel_tol=1e-6)


def test_exported_with_dynamic_length_works_at_other_lengths() -> None:
    m = M.CausalTril(64).eval()
    q, k, v = _qkv()
    dim = torch.export.Dim("S", min=2, max=63)
    ep = torch.export.export(m, (q, k, v), dynamic_shapes=({2: dim}, {2: dim}, {2: dim}), strict=False)
    report = attnpass.find(ep)
    assert len(report.sites) == 1 and report.sites[0].seq_q == report.sites[0].seq_k
    fused, ss = attnpass.fuse(ep), attnpass.to_ssmax(ep, s=0.43)
    q2, k2, v2 = _qkv(sq=21, sk=21, seed=3)
    torch.testing.assert_close(fused(q2, k2, v2), m(q2, k2, v2), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ss(q2, k2, v2), semantics.ssmax_attention(q2, k2, v2, is_causal=True, s=0.43), rtol=1e-5, atol=2e-5)
