"""The HF corpus through torch.export: exact site counts, fuse exact, SSMax(s=0, b=1) exact."""

from __future__ import annotations

import pytest
import torch

import attnpass
from tests.hf_corpus import CORPUS, output_tensor


@pytest.fixture(scope="module", params=sorted(CORPUS))
def model_case(request):
    builder, expected = CORPUS[request.param]
    torch.manual_seed(0)
    model, args, kwargs = builder()
    model.eval()
    with torch.no_grad():
        ref = output_tensor(model(*args, **kwargs))
    return request.param, model, args, kwargs, expected, ref


def test_site_count_is_exact(model_case) -> None:
    name, model, args, kwargs, expected, _ = model_case
    report = attnpass.find(model, args, kwargs)
    assert len(report.sites) == expected, (name, [s.summary() for s in report.sites], report.skipped)
    if name == "mixtral":
        assert len(report.skipped) == 2 and all("Q K^T" in s.reason for s in report.skipped)
    if name == "gemma2":
        assert all(s.softcap == 50.0 for s in report.sites)
    if name in ("llama", "mixtral", "gemma2", "llama_sdpa"):
        assert all(s.gqa for s in report.sites)
    if name in ("gpt2", "llama", "mixtral"):
        assert all(s.causal for s in report.sites)


def test_fuse_equals_original(model_case) -> None:
    name, model, args, kwargs, expected, ref = model_case
    fused = attnpass.fuse(model, args, kwargs)
    calls = [n for n in fused.graph.nodes if n.target == torch.ops.attnpass.attention.default]
    assert len(calls) == expected
    with torch.no_grad():
        out = output_tensor(fused(*args, **kwargs))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["inplace", "fused"])
def test_ssmax_with_s0_b1_equals_original(model_case, fused: bool) -> None:
    name, model, args, kwargs, expected, ref = model_case
    ss = attnpass.to_ssmax(model, args, kwargs, s=0.0, b=1.0, fused=fused)
    params = [k for k in ss.state_dict() if k.startswith("attnpass_ssmax.s_")]
    assert len(params) == expected
    with torch.no_grad():
        out = output_tensor(ss(*args, **kwargs))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_ssmax_changes_the_model_and_stays_finite(model_case) -> None:
    name, model, args, kwargs, expected, ref = model_case
    ss = attnpass.to_ssmax(model, args, kwargs, s=0.43)
    with torch.no_grad():
        out = output_tensor(ss(*args, **kwargs))
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-6


def test_fused_ssmax_equals_inplace_ssmax(model_case) -> None:
    """Two routes to one meaning: the factor on the graph's logits vs inside the fused kernel."""
    name, model, args, kwargs, expected, ref = model_case
    inplace = attnpass.to_ssmax(model, args, kwargs, s=0.43, b=0.05)
    fused = attnpass.to_ssmax(model, args, kwargs, s=0.43, b=0.05, fused=True)
    with torch.no_grad():
        a = output_tensor(inplace(*args, **kwargs))
        b = output_tensor(fused(*args, **kwargs))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
