"""Each pattern variant: found once, fused exactly, SSMax equal to ``semantics`` (n counted per row)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Case:
    name: str
    module: torch.nn.Module
    args: tuple
    sem: dict[str, Any]  # what semantics.attention call the module means
    causal: bool = False
    gqa: bool = False
    softcap: float | None = None


def _cases() -> list[Case]:
    q, k, v = _qkv()
    keep = _key_keep()
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    causal_pad = semantics.causal_allowed(S, S) & keep[:, None, None, :]
    qg, kg, vg = _qkv(hk=2)
    qc, kc, vc = _qkv(sq=5, sk=11)
    cross_keep = _key_keep(11)
    cross_mask = torch.where(cross_keep, 0.0, float("-inf"))[:, None, None, :] + 0.1 * torch.randn(1, H, 5, 11)
    bias = 0.5 * torch.randn(B, H, S, S)
    return [
        Case("causal_tril", M.CausalTril(), (q, k, v), dict(is_causal=True), causal=True),
        Case("padded_additive", M.PaddedAdditive(), (q, k, v, keep), dict(attn_mask=additive)),
        Case("gqa_where", M.GQARepeatInterleave(), (qg, kg, vg, causal_pad), dict(attn_mask=causal_pad, enable_gqa=True), gqa=True),
        Case("cross_einsum", M.CrossEinsum(), (qc, kc, vc, cross_mask), dict(attn_mask=cross_mask)),
        Case("baddbmm_3d", M.Baddbmm3D(), (q, k, v, bias), dict(attn_mask=bias)),
        Case("softcap_prescaled", M.SoftcapPrescaled(), (q, k, v), dict(is_causal=True, softcap=5.0), causal=True, softcap=5.0),
        Case("sdpa_mask", M.SDPACall(), (q, k, v, causal_pad), dict(attn_mask=causal_pad)),
        Case("sdpa_causal", M.SDPACausal(), (q, k, v), dict(is_causal=True), causal=True),
    ]


CASES = _cases()


def _sem_out(case: Case, **extra: Any) -> torch.Tensor:
    q, k, v = case.args[:3]
    kw = dict(case.sem)
    if case.softcap is not None:
        # the module pre-scales q and caps the scaled scores: same as scale then cap
        kw["softcap"] = case.softcap
    return semantics.attention(q.double(), k.double(), v.double(), **{
        key: (val.double() if isinstance(val, torch.Tensor) and val.is_floating_point() else val) for key, val in kw.items()
    }, **extra).float()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_found_once_with_the_right_facts(case: Case) -> None:
    report = attnpass.find(case.module.eval(), case.args)
    assert len(report.sites) == 1, [s.reason for s in report.skipped]
    site = report.sites[0]
    assert site.causal == case.causal
    assert site.softcap == case.softcap
    assert site.gqa == case.gqa
    assert site.fusable
    assert site.heads == (None if case.name == "baddbmm_3d" else H)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_module_means_what_semantics_says(case: Case) -> None:
    """Guards the test itself: the module and its semantics description agree."""
    torch.testing.assert_close(case.module.eval()(*case.args), _sem_out(case), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fuse_equals_original(case: Case) -> None:
    m = case.module.eval()
    fused = attnpass.fuse(m, case.args)
    ops = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnpass.attention.default in ops
    assert not any("softmax" in str(t) for t in ops), "the softmax chain must be gone"
    torch.testing.assert_close(fused(*case.args), m(*case.args), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["inplace", "fused"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ssmax_identity_when_s0_b1(case: Case, fused: bool) -> None:
    m = case.module.eval()
    ss = attnpass.to_ssmax(m, case.args, s=0.0, b=1.0, fused=fused)
    has_op = any(n.target == torch.ops.attnpass.attention.default for n in ss.graph.nodes)
    assert has_op == fused
    torch.testing.assert_close(ss(*case.args), m(*case.args), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["inplace", "fused"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ssmax_matches_semantics(case: Case, fused: bool) -> None:
    ss = attnpass.to_ssmax(case.module.eval(), case.args, s=0.43, fused=fused)
    out = ss(*case.args)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, _sem_out(case, ssmax_s=0.43), rtol=1e-5, atol=2e-5)


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
