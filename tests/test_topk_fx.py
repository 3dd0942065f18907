"""Top-k sites in torch.fx: found through the attention adapters, rewritten by ``attnpass.fuse`` and the compile
backend, equal to the original; left alone with the reason when the chain cannot be fused."""

from __future__ import annotations

import pytest
import torch

import attnpass
from attnpass.lowering import backend
from tests import hf_corpus
from tests.topk_modules import LEAVE, REWRITE, Router


def _dynamo(m: torch.nn.Module, x: torch.Tensor) -> tuple[object, object]:
    """Run ``m`` through the attnpass backend (eager inner); the output and the graph's result."""
    torch._dynamo.reset()
    out = torch.compile(m, backend="attnpass", options={"inner": "eager"})(x)
    return out, backend.reports[-1].report


def _ops(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name", sorted(REWRITE))
def test_export_graph_rewritten_equals_original(name: str) -> None:
    make, x, form, k, renorm = REWRITE[name]
    m, x = make().eval(), x()
    ref = m(x)
    gm = attnpass.fuse(m, (x,))
    (site,) = gm.attnpass_report.topk
    assert (str(site.form), site.k, site.renormalize, site.blocker) == (form, k, renorm, None)
    assert not any("softmax.int" in o or "_softmax" in o for o in _ops(gm)), "the softmax must be gone"
    if form == "topk":
        assert "attnpass.softmax_topk.default" in _ops(gm)
    torch.testing.assert_close(gm(x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REWRITE))
def test_compile_backend_rewrites_by_default(name: str) -> None:
    make, x, form, k, _ = REWRITE[name]
    m, x = make().eval(), x()
    ref = m(x)
    out, rep = _dynamo(m, x)
    (site,) = rep.topk
    assert str(site.form) == form and site.k == k and site.fusable
    assert any(n.startswith(("fused into", "argmax(softmax", "max(softmax")) for n in site.notes)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LEAVE))
def test_left_alone_with_reason(name: str) -> None:
    make, x, why = LEAVE[name]
    m, x = make().eval(), x()
    gm = attnpass.fuse(m, (x,))
    (site,) = gm.attnpass_report.topk
    assert not site.fusable and why in site.blocker
    assert "attnpass.softmax_topk.default" not in _ops(gm)
    torch.testing.assert_close(gm(x), m(x))


def test_backend_option_keeps_routers() -> None:
    """``options={"topk": False}``: attention still fused, routers left as written (found, noted nowhere)."""
    m, x = Router().eval(), REWRITE["router"][1]()
    torch._dynamo.reset()
    out = torch.compile(m, backend="attnpass", options={"inner": "eager", "topk": False})(x)
    (site,) = backend.reports[-1].report.topk
    assert site.fusable and not any(n.startswith("fused into") for n in site.notes)
    torch.testing.assert_close(out, m(x))


def test_ssmax_rewrite_leaves_topk_sites() -> None:
    """Only a plain fuse applies the top-k rewrite: ``to_ssmax`` changes attention and nothing else."""
    m, x = Router().eval(), REWRITE["router"][1]()
    gm = attnpass.to_ssmax(m, (x,))
    assert "attnpass.softmax_topk.default" not in _ops(gm)


def test_router_gradients_through_fused_op() -> None:
    """Router training: the gate's gradient through the selected, renormalised weights is the original's."""
    x = REWRITE["router"][1]()
    m = Router()
    w, _ = m(x)
    (w * torch.arange(1.0, 3.0)).sum().backward()
    want = m.gate.weight.grad.clone()
    gm = attnpass.fuse(Router(), (x,))
    w2, _ = gm(x)
    (w2 * torch.arange(1.0, 3.0)).sum().backward()
    torch.testing.assert_close(gm.gate.weight.grad, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Hugging Face MoE families


@pytest.mark.parametrize("family", sorted(hf_corpus.MOE))
def test_hf_moe_routers_found_and_fused(family: str) -> None:
    build, routers = hf_corpus.MOE[family]
    torch.manual_seed(0)
    model, args, kwargs = build()
    model.eval()
    ref = hf_corpus.output_tensor(model(*args, **kwargs))
    gm = attnpass.fuse(model, args, kwargs)
    rep = gm.attnpass_report
    assert len(rep.sites) == 2, "attention sites must not change"
    assert len(rep.topk) == routers and all(t.fusable and str(t.form) == "topk" for t in rep.topk)
    assert all(any(n.startswith("fused into attnpass::softmax_topk") for n in t.notes) for t in rep.topk)
    assert sum(str(n.target) == "attnpass.softmax_topk.default" for n in gm.graph.nodes) == routers
    torch.testing.assert_close(hf_corpus.output_tensor(gm(*args, **kwargs)), ref, rtol=1e-5, atol=1e-5)


LMS = {"mixtral": hf_corpus.mixtral_lm, "qwen2_moe": lambda: hf_corpus.qwen2_moe(causal_lm=True),
       "olmoe": lambda: hf_corpus.olmoe(causal_lm=True)}


@pytest.mark.parametrize("family", sorted(LMS))
def test_hf_moe_greedy_generation_same_tokens(family: str) -> None:
    """Greedy generation with the routers fused (compile backend) picks the same tokens as the original."""
    build = LMS[family]
    torch.manual_seed(0)
    model, (ids,), _ = build()
    model.eval()
    ids = ids[:1, :4]
    want = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    torch._dynamo.reset()
    before = len(backend.reports)
    model.forward = torch.compile(model.forward, backend="attnpass", options={"inner": "eager"})
    got = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    fused = [t for r in list(backend.reports)[before:] for t in r.report.topk if t.fusable]
    assert fused, "the routers must have been fused"
    assert torch.equal(got, want)
