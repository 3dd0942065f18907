"""The ONNX emitter: plans become SSMax in standard ops or one fused attention op per site.

``emit`` plans every site for a ``RewriteSpec`` on the target's ``Capabilities`` and translates each
plan (``ssmax.py``, ``fuse.py``, ``keys.py``); ``to_ssmax`` / ``fuse`` keep the old call shapes.  Results
are ``Emitted``: the report with what was done in its notes, and the sites left alone with the reason.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from attnpass.errors import AttnpassError
from attnpass.passes.onnx import MS, OnnxAdapter
from attnpass.passes.plan import TARGETS, Action, Capabilities, RewriteSpec, plan_for
from attnpass.passes.site import AttentionSite, Emitted, Form, Notes, Report
from attnpass.rewrite.onnx import body
from attnpass.rewrite.onnx.fuse import fuse_site
from attnpass.rewrite.onnx.ssmax import ssmax_explicit, ssmax_fused_op
from attnpass.rewrite.onnx.topk import emit_topk

_ORT = Capabilities(refuse_fused_ops=False, softcap=False, ssmax_softcap_fused=False, is_causal=False, scores_rank3=True,
                    any_rank=False, static_heads=True, empty_rows_zero=False, factor_on_q=True, count_keys=True, head_views=True,
                    grouped_kv=False, dynamic_head_views=True)
#: What each target's fused op expresses (MultiHeadAttention: no softcap, as many K/V heads as Q heads;
#: opset-23 Attention: both).  Rank-3 scores reach either as one head over a [B*H] batch.
CAPS = {"ort": _ORT, "onnx23": Capabilities(**{**_ORT.__dict__, "softcap": True, "grouped_kv": True})}


def emit(model: ir.Model, report: Report, spec: RewriteSpec) -> Emitted:
    """Plan and emit every site of ``report`` into ``model`` for a spec (resolved here)."""
    spec = spec.resolve()
    ad = OnnxAdapter(model)
    caps = CAPS[spec.target]
    left: dict[int, str] = {}
    notes = Notes()
    fused_any = False
    for site in report.sites:
        plan = plan_for(site, spec, caps, ad)
        if plan.action is Action.LEAVE:
            why = body.ssmax_through_body(model, site, spec, caps, notes) if spec.ssmax and body.expandable(site) else ""
            if why is None and spec.to == "fused":  # fused SSMax: the op is SSMax'd unfused, as one that takes it on Q
                left[site.index] = f"{plan.reason.split('; SSMax not applied')[0]} (SSMax applied in its function body)"
            elif why is not None:
                left[site.index] = "; ".join(x for x in (plan.reason or "left alone", why) if x)
            continue
        if plan.replaces is not None:
            _bypass(plan.replaces)
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the old factor, and its parameters' names with it
            notes.add(site, plan.replace_note)
        if plan.action is Action.SSMAX:
            if site.form is Form.EXPLICIT:
                ssmax_explicit(model, ad, plan, notes)
            else:
                ssmax_fused_op(model, ad, plan, notes)
            if plan.reason is not None:
                left[site.index] = plan.reason
            continue
        fuse_site(model, ad, plan, spec.target, notes)
        fused_any = True
    if spec.to == "fused" and not spec.fused_ssmax:
        report = emit_topk(model, report)  # softmax -> top-k / max / argmax chains (standard ops)
    if spec.to == "fused":
        if fused_any and spec.target == "ort":
            model.opset_imports.setdefault(MS, 1)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return Emitted(report.with_notes(notes.by_site), left)


def _bypass(rel: Any) -> None:
    """Remove an existing query scaling (``plan.replaces``): the ``Mul``'s users read the unscaled Q."""
    out = rel.node.outputs[0]
    if out.is_graph_output():
        raise AttnpassError(f"{rel.node.name}: the query scaling to replace is a graph output")
    ir.convenience.replace_all_uses_with(out, rel.data)


def to_ssmax(model: ir.Model, report: Report, s: float, b: float | None = None) -> Emitted:
    """Rewrite every site to SSMax in standard ONNX ops (see ``ssmax.py``); ``Emitted.left``: sites left alone."""
    return emit(model, report, RewriteSpec(to="ssmax", s=s, b=b))


def fuse(model: ir.Model, report: Report, target: str = "ort", ssmax: tuple[float, float | None] | None = None) -> Emitted:
    """Replace each fusable chain by the target's fused op; ``ssmax=(s, b)`` fuses SSMax attention.

    A site that cannot fuse still gets SSMax, unfused, so the whole model has one meaning.
    """
    s, b = ssmax if ssmax is not None else (None, None)
    return emit(model, report, RewriteSpec(to="fused", s=s, b=b, fused_ssmax=ssmax is not None, target=target))


def fuse_blocker(site: AttentionSite, target: str, ad: OnnxAdapter | None = None) -> str | None:
    """Why ``site`` stays unfused for ``target`` (None: it fuses)."""
    plan = plan_for(site, RewriteSpec(to="fused", target=target).resolve(), CAPS[target], ad)
    return plan.reason if plan.action is Action.LEAVE else None


def ssmax_blocker(ad: OnnxAdapter, site: AttentionSite) -> str | None:
    """Why a site cannot take the SSMax rewrite here (None: it can; a standard ``Attention`` op takes it in its function
    body when that body can be built, see ``body.py``)."""
    return None if body.expandable(site) else site.ssmax_blocker


__all__ = ["CAPS", "TARGETS", "emit", "to_ssmax", "fuse", "fuse_blocker", "ssmax_blocker"]
