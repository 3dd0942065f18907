"""Plans derived from fx-found sites: key factors, guards, bias terms, blockers, and the spec's one resolution."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnpass import spec as spec_module
from attnpass.errors import AttnpassError
from attnpass.passes import fx as fx_pass
from attnpass.passes.plan import Action, Capabilities, FactorClass, RewriteSpec, plan_for
from attnpass.passes.site import GuardKind, MaskKind, MaskRole

B, H, S, D = 2, 4, 6, 8
MIN = torch.finfo(torch.float32).min


def _qkv(sq: int = S, sk: int = S):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, H, sq, D, generator=g), torch.randn(B, H, sk, D, generator=g), torch.randn(B, H, sk, D, generator=g)


def _keep() -> torch.Tensor:
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, -2:] = False
    return keep


class Padding(nn.Module):
    def forward(self, q, k, v, keep):
        x = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        x = x.masked_fill(~keep[:, None, None, :], float("-inf"))
        return F.softmax(x, dim=-1) @ v


class CausalPadding(nn.Module):
    """HF v5 style: ``where(and(key <= query, padding), 0, finfo.min)`` added to the scores."""

    def forward(self, q, k, v, keep):
        sq, sk = q.shape[-2], k.shape[-2]
        causal = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None]
        allowed = causal[None, None] & keep[:, None, None, :]
        mask = torch.where(allowed, 0.0, MIN)
        x = q @ k.transpose(-2, -1) * D ** -0.5 + mask
        return F.softmax(x, dim=-1) @ v


class NanGuarded(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * D ** -0.5, dim=-1)
        p = torch.where(torch.isnan(p), 0.0, p)
        return p @ v


class Biased(nn.Module):
    """A finite logits bias (ALiBi-like): SSMax must scale it with the scores."""

    def forward(self, q, k, v, bias):
        return F.softmax(q @ k.transpose(-2, -1) * D ** -0.5 + bias, dim=-1) @ v


class Softcapped(nn.Module):
    def forward(self, q, k, v):
        x = q @ k.transpose(-2, -1) * D ** -0.5
        return F.softmax(30.0 * torch.tanh(x / 30.0), dim=-1) @ v


def _found(module: nn.Module, *args):
    gm = torch.export.export(module, args, strict=False).module()
    report = fx_pass.find(gm)
    assert len(report) == 1, report.skipped
    return report[0], fx_pass.FxAdapter(gm)


SSMAX = RewriteSpec(to="ssmax").resolve()


def test_padding_mask_is_one_key_only_factor() -> None:
    site, ad = _found(Padding(), *_qkv(), _keep())
    plan = plan_for(site, SSMAX, Capabilities(), ad)
    assert plan.action is Action.SSMAX
    assert [f.cls for f in plan.keys.factors] == [FactorClass.KEYS]
    assert plan.keys.method == "keys"
    assert plan.bias_terms == ()  # a bool mask only removes keys


def test_hf_causal_and_padding_is_causal_plus_keys() -> None:
    site, ad = _found(CausalPadding(), *_qkv(), _keep())
    assert site.causal and site.masks[0].role is MaskRole.HARD
    plan = plan_for(site, SSMAX, Capabilities(), ad)
    assert sorted(f.cls for f in plan.keys.factors) == sorted([FactorClass.CAUSAL, FactorClass.KEYS])
    assert plan.keys.method == "causal+keys"
    assert plan.bias_terms == ()  # where(cond, 0, finfo.min) holds no logits to scale
    fused = plan_for(site, RewriteSpec(to="fused").resolve(), Capabilities(), ad)
    assert fused.action is Action.FUSE and fused.causal
    # the term is causal AND padding: is_causal is set and the term still goes into the op's mask
    assert [k.kind for k in fused.op_mask_additive] == [MaskKind.ADDITIVE]
    onnx_like = plan_for(site, RewriteSpec(to="fused").resolve(), Capabilities(is_causal=False), ad)
    assert not onnx_like.causal and len(onnx_like.op_mask_additive) == 1


def test_causal_proof_is_not_trusted_when_query_and_key_lengths_differ() -> None:
    q, _, _ = _qkv(sq=3)
    _, k, v = _qkv()
    site, _ = _found(CausalPadding(), q, k, v, _keep())
    assert not site.causal and not any(m.causal for m in site.masks)
    square, _ = _found(CausalPadding(), *_qkv(), _keep())
    assert square.masks[0].causal  # the same construction with S_q == S_k is proven causal


def test_nan_guard_is_part_of_the_site_and_never_emitted() -> None:
    site, ad = _found(NanGuarded(), *_qkv())
    assert [g.kind for g in site.guards] == [GuardKind.NAN]
    assert site.row_guards == ()  # not a guard any rewrite keeps
    plan = plan_for(site, SSMAX, Capabilities(), ad)
    assert plan.action is Action.SSMAX and plan.guards == ()


def test_finite_bias_is_scaled_by_ssmax() -> None:
    q, k, v = _qkv()
    site, ad = _found(Biased(), q, k, v, torch.randn(1, H, S, S))
    assert site.masks[0].role is MaskRole.BIAS
    plan = plan_for(site, SSMAX, Capabilities(), ad)
    assert plan.bias_terms == (site.masks[0],)
    assert [f.cls for f in plan.keys.factors] == [FactorClass.GENERAL] and plan.keys.method == "mask"


def test_no_mask_counts_the_key_length() -> None:
    site, ad = _found(NanGuarded(), *_qkv())
    assert plan_for(site, SSMAX, Capabilities(), ad).keys.method == "length"


def test_emitter_capabilities_block_fusion_with_the_reason() -> None:
    site, ad = _found(Softcapped(), *_qkv())
    no_softcap = Capabilities(softcap=False)
    plan = plan_for(site, RewriteSpec(to="fused").resolve(), no_softcap, ad)
    assert plan.action is Action.LEAVE and "soft-capping" in plan.reason
    both = plan_for(site, RewriteSpec(to="fused", fused_ssmax=True).resolve(), Capabilities(ssmax_softcap_fused=False), ad)
    assert both.action is Action.SSMAX and both.reason.endswith("(SSMax applied unfused)")
    assert not both.factor_on_q  # the factor multiplies capped scores, never Q
    ok = plan_for(site, RewriteSpec(to="fused").resolve(), Capabilities(), ad)
    assert ok.action is Action.FUSE and ok.softcap == pytest.approx(30.0)


def test_train_len_is_resolved_once() -> None:
    assert RewriteSpec is spec_module.RewriteSpec  # one request type: the planner re-exports attnpass.spec's
    spec = RewriteSpec(to="ssmax", train_len=512).resolve()
    assert spec.s == pytest.approx(1 / math.log(512)) and spec.train_len is None
    assert spec.resolve() == spec  # resolving again changes nothing
    with pytest.raises(AttnpassError, match="either s or train_len"):
        RewriteSpec(s=0.3, train_len=512).resolve()
    with pytest.raises(AttnpassError, match="finite"):
        RewriteSpec(b=float("nan")).resolve()
    with pytest.raises(AttnpassError, match="train_len"):
        RewriteSpec(train_len=1).resolve()
    with pytest.raises(AttnpassError, match="target"):
        RewriteSpec(to="fused", target="tensorrt").resolve()


def test_sites_and_reports_are_frozen() -> None:
    site, _ = _found(Padding(), *_qkv(), _keep())
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.causal = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.masks[0].causal = True  # type: ignore[misc]
    noted = site.with_notes(["emitted"])
    assert noted.notes[-1] == "emitted" and "emitted" not in site.notes


def test_finite_fill_is_known_only_for_finite_mask_values() -> None:
    site, ad = _found(CausalPadding(), *_qkv(), _keep())  # where(allowed, 0, finfo.min)
    assert plan_for(site, RewriteSpec(to="fused").resolve(), Capabilities(), ad).finite_fill
    site, ad = _found(Padding(), *_qkv(), _keep())  # masked_fill(..., -inf): a fully masked row is NaN anyway
    assert not plan_for(site, RewriteSpec(to="fused").resolve(), Capabilities(), ad).finite_fill


def test_the_same_attention_plans_the_same_in_fx_and_onnx(tmp_path) -> None:
    """One plan for every IR: the TorchScript ONNX export of a module splits its mask into the same factors."""
    from attnpass import onnx as aonnx
    from attnpass.passes import onnx as onnx_pass

    args = (*_qkv(), _keep())
    fx_site, fx_ad = _found(CausalPadding(), *args)
    path = tmp_path / "causal_padding.onnx"
    # dynamic lengths keep the Range ops (static ones fold the causal structure into a constant)
    axes = {"q": {2: "s"}, "k": {2: "s"}, "v": {2: "s"}, "keep": {1: "s"}}
    torch.onnx.export(CausalPadding(), args, str(path), dynamo=False, opset_version=17,
                      input_names=["q", "k", "v", "keep"], dynamic_axes=axes)
    model = aonnx.load(path)
    report = onnx_pass.find(model)
    assert len(report) == 1, report.skipped
    onnx_site = report[0]
    plans = [plan_for(s, SSMAX, Capabilities(), ad) for s, ad in ((fx_site, fx_ad), (onnx_site, onnx_pass.OnnxAdapter(model)))]
    assert [sorted(f.cls for f in p.keys.factors) for p in plans] == [[FactorClass.CAUSAL, FactorClass.KEYS]] * 2
    assert [p.keys.method for p in plans] == ["causal+keys"] * 2
    assert [m.role for m in onnx_site.masks] == [m.role for m in fx_site.masks] == [MaskRole.HARD]


class MultiQuery(nn.Module):
    """One K/V head broadcast over the query heads by the matmul itself (Falcon), not repeated."""

    def forward(self, q, k, v):
        return F.softmax((q @ k.transpose(-2, -1)) / math.sqrt(D), dim=-1) @ v


class RepeatKV(nn.Module):
    """HF's ``repeat_kv``: two K/V heads expanded and reshaped to four."""

    def forward(self, q, k, v):
        def rep(x):
            b, h, s, d = x.shape
            return x[:, :, None].expand(b, h, 2, s, d).reshape(b, h * 2, s, d)
        return F.softmax((q @ rep(k).transpose(-2, -1)) / math.sqrt(D), dim=-1) @ rep(v)


@pytest.mark.parametrize("module, kv, repeat", [(MultiQuery(), 1, 4), (RepeatKV(), 2, 2)], ids=["mqa", "repeat_kv"])
def test_kv_heads_are_repeated_only_for_an_op_that_needs_them_equal(module, kv, repeat) -> None:
    q, k, v = _qkv()
    site, ad = _found(module, q, k[:, :kv], v[:, :kv])
    assert (site.heads, site.kv_heads) == (H, kv)
    fuse = RewriteSpec(to="fused").resolve()
    equal = plan_for(site, fuse, Capabilities(grouped_kv=False), ad)
    assert (equal.k_repeat, equal.v_repeat) == (repeat, repeat)
    grouped = plan_for(site, fuse, Capabilities(grouped_kv=True), ad)
    assert (grouped.k_repeat, grouped.v_repeat) == (1, 1)
    unfused = plan_for(site, SSMAX, Capabilities(grouped_kv=False), ad)
    assert (unfused.k_repeat, unfused.v_repeat) == (1, 1)
