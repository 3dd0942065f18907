"""The fx emitter: plans become ``attnpass::attention`` calls or SSMax on the softmax input.

It reads ``Plan``s only (``passes/plan.py``): which terms make a key attendable, what the fused op's
mask carries, whether ``is_causal`` is set and which guards stay.  What it did goes into the report it
returns (``Report.with_notes``); the sites it was given are not changed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from attnpass import semantics
from attnpass.passes.fx import _IGNORED_USERS, FxAdapter, _op_name, find
from attnpass.passes.plan import Action, Capabilities, KeepTerm, Plan, RewriteSpec, plan_for
from attnpass.passes.site import AttentionSite, Emitted, Form, MaskKind, Operand, Report
from attnpass.rewrite.topk_fx import emit_topk
from attnpass.spec import Param, per_head

aten = torch.ops.aten

#: What ``attnpass::attention`` and ``semantics`` express: everything the matcher finds, n counted at run time.
CAPS = Capabilities(refuse_fused_ops=True, softcap=True, ssmax_softcap_fused=True, is_causal=True,
                    scores_rank3=True, any_rank=True, static_heads=False, empty_rows_zero=False,
                    factor_on_q=False, count_keys=False, head_views=True,
                    dynamic_head_views=True)


class _Builder:
    """Inserts nodes at one place in the graph with meta['val'] kept, so later passes can read shapes."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs)


def _prepare(b: _Builder, op: Operand, transpose: bool = True) -> fx.Node:
    v = op.value
    if op.perm is not None:
        v = b.call(aten.permute.default, v, list(op.perm))
    if op.transposed and transpose:
        v = b.call(aten.transpose.int, v, -2, -1)
    for _ in range(4 - op.rank):
        v = b.call(aten.unsqueeze.default, v, 0)
    return v


def _laid_out(b: _Builder, t: KeepTerm) -> fx.Node:
    """The term's value on the scores: a mask added in a ``[B, H, S_q, S_k]`` view of ``[B*H, S_q, S_k]`` scores
    (``KeepTerm.view``) is broadcast over the view's batch and heads and folded as the scores are; its own
    ``S_q``/``S_k`` sizes (1 or full) stay, so a padding mask stays ``[B*H, 1, S_k]``.  Written with ``-1`` sizes and
    ``flatten`` so a symbolic batch or length (dynamic shapes) needs no size in the graph; the matcher only records
    a view with a symbolic batch when the mask varies over the batch itself or over neither batch nor heads."""
    if t.view is None:
        return t.value
    shape = tuple(t.value.meta["val"].shape)
    v = t.value
    for _ in range(4 - len(shape)):
        v = b.call(aten.unsqueeze.default, v, 0)
    pad = (1,) * (4 - len(shape)) + shape
    one = [isinstance(d, int) and d == 1 for d in pad[:2]]
    if one[1] and not one[0]:
        v = b.call(aten.expand.default, v, [-1, t.view[1], -1, -1])
    elif one[0] and not one[1]:
        v = b.call(aten.expand.default, v, [t.view[0], -1, -1, -1])
    return b.call(aten.flatten.using_ints, v, 0, 1)


def _term(b: _Builder, t: KeepTerm) -> fx.Node:
    """An additive term times its coefficient."""
    v = _laid_out(b, t)
    return v if t.coeff == 1.0 else b.call(aten.mul.Tensor, v, t.coeff)


def _allowed(b: _Builder, terms: Sequence[KeepTerm]) -> fx.Node | None:
    """Bool tensor (broadcastable to the scores): True where every term keeps a key attendable."""
    parts: list[fx.Node] = []
    for t in terms:
        if t.kind is MaskKind.BOOL:
            v = _laid_out(b, t)
            parts.append(v if t.attend_when else b.call(aten.logical_not.default, v))
        else:
            parts.append(b.call(aten.gt.Scalar, _term(b, t), semantics.MASKED_BELOW))
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = b.call(aten.logical_and.default, out, p)
    return out


def _op_mask(b: _Builder, plan: Plan) -> fx.Node | None:
    """The single ``attn_mask`` the fused op takes: additive terms summed, bool terms applied as -inf."""
    add: fx.Node | None = None
    for t in plan.op_mask_additive:
        x = _term(b, t)
        add = x if add is None else b.call(aten.add.Tensor, add, x)
    keep = _allowed(b, plan.op_mask_bool)
    if keep is None:
        return add
    if add is None:
        return keep
    return b.call(aten.where.ScalarOther, keep, add, float("-inf"))


def _unlift(b: _Builder, out: fx.Node, site: AttentionSite) -> fx.Node:
    lifted = 4 - site.q.rank
    if lifted > 0:
        out = b.call(aten.squeeze.dims, out, list(range(lifted)))
    if site.out_perm is not None:
        out = b.call(aten.permute.default, out, list(site.out_perm))
    return out


def _remove_dead(gm: fx.GraphModule, chain: set[fx.Node] = frozenset()) -> None:
    """Drop the replaced chain, including assert-only nodes that would keep it alive.

    Nodes of a replaced ``chain`` go even when fx calls them impure (an inference-mode dropout).
    """
    graph = gm.graph
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            name = _op_name(node)
            if name in _IGNORED_USERS and node.args and isinstance(node.args[0], fx.Node):
                src = node.args[0]
                if all(_op_name(u) in _IGNORED_USERS for u in src.users) and not any(u.op == "output" for u in src.users):
                    graph.erase_node(node)
                    changed = True
                continue
            if node.op in ("call_function", "call_method") and (node in chain or not node.is_impure()):
                graph.erase_node(node)
                changed = True
    graph.lint()
    gm.recompile()


def _insert_point(site: AttentionSite) -> fx.Node:
    """The PV matmul (or the SDPA call): every input the rewrite needs is defined before it."""
    if site.form is Form.FUSED_OP:
        return site.softmax
    mms = [n for n in site.nodes if _op_name(n) in ("matmul", "bmm", "einsum", "mm")]
    return mms[-1]


def _copy_meta(new: fx.Node, old: fx.Node) -> None:
    for key in ("val", "example_value", "stack_trace", "nn_module_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


# ------------------------------------------------------------------ fuse

def _fuse_site(gm: fx.GraphModule, plan: Plan, ssmax: tuple[fx.Node, fx.Node | None] | None) -> None:
    """Replace one site by ``attnpass::attention`` (with SSMax parameters when ``ssmax`` is given)."""
    site = plan.site
    op = torch.ops.attnpass.attention.default
    ad = FxAdapter(gm)
    s_node, b_node = ssmax if ssmax is not None else (None, None)
    b = _Builder(gm.graph)
    with gm.graph.inserting_before(_insert_point(site)):
        q = site.q.value
        for factor, divide in site.q_scales:  # scalars, or tensors right-aligned against q as against the scores
            if isinstance(factor, fx.Node) and isinstance(factor.meta.get("val", factor.meta.get("example_value")), torch.Tensor):
                q = b.call(aten.div.Tensor if divide else aten.mul.Tensor, q, factor)
            else:
                q = b.call(operator.truediv if divide else operator.mul, q, factor)
        q, k, v = (_prepare(b, o) for o in (replace(site.q, value=q), site.k, site.v))
        if site.form is Form.FUSED_OP:
            node = site.softmax
            gqa = bool(ad.attr(node, "enable_gqa", False)) or site.k.groups > 1
            mask, causal = site.sdpa_mask, site.sdpa_is_causal
            if plan.sdpa_causal_as_mask:
                mask, causal = b.call(semantics.sdpa_causal_mask, q, k), False
            res = b.call(op, q, k, v, mask, causal, ad.attr(node, "scale"), s_node, b_node, None, gqa)
            out = _unlift(b, b.call(operator.getitem, res, 0), site)
        else:
            mask = _op_mask(b, plan)
            gqa = site.k.groups > 1 or site.v.groups > 1 or (site.heads != site.kv_heads and site.kv_heads not in (None, 1))
            res = b.call(op, q, k, v, mask, plan.causal, float(plan.scale), s_node, b_node, plan.softcap, gqa)
            out = _unlift(b, b.call(operator.getitem, res, 0), site)
            for g in plan.guards:
                keep_zero = g.cond if g.zero_when else b.call(aten.logical_not.default, g.cond)
                out = b.call(aten.where.ScalarSelf, keep_zero, 0.0, out)
            want = ad.dtype(site.out)
            if want is not None and ad.dtype(site.q.value) not in (None, want):
                out = b.call(aten._to_copy.default, out, dtype=want)
    _copy_meta(out, site.out)
    site.out.replace_all_uses_with(out)


def fuse(gm: fx.GraphModule, report: Report | None = None) -> tuple[fx.GraphModule, Report]:
    """Replace each fusable site by one ``attnpass::attention`` call; returns the graph and the report."""
    return emit(gm, RewriteSpec(to="fused").resolve(), report)


# ------------------------------------------------------------------ SSMax

SSMAX_MODULE = "attnpass_ssmax"


def _ssmax_params(gm: fx.GraphModule, site: AttentionSite, s: Param, b: Param | None,
                  device: torch.device) -> tuple[fx.Node, fx.Node | None]:
    """``s`` (and ``b``) as trainable ``[H]`` parameters: a scalar repeated, or one value per head
    (``spec.per_head``); rank-3 scores fold the heads into the batch, so they take one value."""
    holder = getattr(gm, SSMAX_MODULE, None)
    if holder is None:
        holder = torch.nn.Module()
        gm.add_submodule(SSMAX_MODULE, holder)
    heads = site.heads if isinstance(site.heads, int) and site.q.rank == 4 else None
    nodes: list[fx.Node | None] = []
    for what, x in (("s", s), ("b", b)):
        if x is None:
            nodes.append(None)
            continue
        vals = torch.tensor(per_head(x, heads, what, site.name), dtype=torch.float32, device=device)
        holder.register_parameter(f"{what}_{site.index}", torch.nn.Parameter(vals))
        nodes.append(gm.graph.get_attr(f"{SSMAX_MODULE}.{what}_{site.index}"))
    return nodes[0], nodes[1]  # type: ignore[return-value]


def _ssmax_site(gm: fx.GraphModule, plan: Plan, params: tuple[fx.Node, fx.Node | None]) -> None:
    """SSMax in the graph as it stands: the softmax input times the per-row factor (or Q, for SDPA calls)."""
    site = plan.site
    s_node, b_node = params
    bld = _Builder(gm.graph)
    if site.form is Form.FUSED_OP:
        node = site.softmax
        ad = FxAdapter(gm)
        with gm.graph.inserting_before(node):
            new = bld.call(
                semantics.ssmax_sdpa, site.q.value, site.k.value, site.v.value, site.sdpa_mask,
                float(ad.attr(node, "dropout_p", 0.0) or 0.0), site.sdpa_is_causal, ad.attr(node, "scale"),
                bool(ad.attr(node, "enable_gqa", False)) or site.k.groups > 1, s_node, b_node,
            )
        _copy_meta(new, node)
        node.replace_all_uses_with(new)
        return
    sm = site.softmax
    x = sm.args[0]
    with gm.graph.inserting_before(sm):
        allowed = _allowed(bld, plan.keep_terms)
        new_x = bld.call(semantics.ssmax_logits, x, allowed, s_node, b_node)
    _copy_meta(new_x, x)
    sm.replace_input_with(x, new_x)


def to_ssmax(gm: fx.GraphModule, s: float = semantics.DEFAULT_S, b: float | None = None,
             report: Report | None = None, fused: bool = False) -> tuple[fx.GraphModule, Report]:
    """Turn every attention site's softmax into SSMax, with ``s`` (and ``b``) as trainable ``[H]`` parameters.

    ``fused=True`` emits ``attnpass::attention`` with the SSMax parameters for every fusable site
    (SSMax at the speed of fused attention) and rewrites the others in place.
    """
    spec = RewriteSpec(to="fused", s=s, b=b, fused_ssmax=True) if fused else RewriteSpec(to="ssmax", s=s, b=b)
    return emit(gm, spec.resolve(), report)


def emit(gm: fx.GraphModule, spec: RewriteSpec, report: Report | None = None) -> tuple[fx.GraphModule, Report]:
    """Plan every site of ``report`` (found here when None) for ``spec`` and emit the plans into ``gm``."""
    gm, done = emitted(gm, spec, report)
    return gm, done.report


def emitted(gm: fx.GraphModule, spec: RewriteSpec, report: Report | None = None,
            topk: bool | None = None) -> tuple[fx.GraphModule, Emitted]:
    """``emit``, also saying which sites were left alone and why (what ``RewriteResult.left`` reports).

    The same rule as the ONNX emitter: a site is left when its plan is LEAVE, or when a fuse request
    fell back to SSMax in place (the plan's reason says so).  ``topk`` (default: plain ``to="fused"``) also
    fuses the report's softmax -> top-k / max / argmax sites (``rewrite/topk_fx.py``), after the attention."""
    report = find(gm) if report is None else report
    ad = FxAdapter(gm)
    device = _graph_device(gm)
    replaced: set[fx.Node] = set()
    left: dict[int, str] = {}
    notes: dict[int, list[str]] = {}
    for site in report.sites:
        plan = plan_for(site, spec, CAPS, ad)
        if plan.action is Action.LEAVE:
            left[site.index] = plan.reason or "left alone"
            continue
        params = None
        if plan.replaces is not None:
            _bypass(plan.replaces)
            notes[site.index] = [plan.replace_note]
        if plan.action in (Action.SSMAX, Action.SSMAX_FUSED):
            fused = plan.action is Action.SSMAX_FUSED
            with gm.graph.inserting_before(_insert_point(site) if fused else site.softmax):
                params = _ssmax_params(gm, site, plan.s, plan.b, device)
        if plan.action is Action.SSMAX:
            _ssmax_site(gm, plan, params)
            if plan.reason is not None:
                left[site.index] = plan.reason
        else:
            _fuse_site(gm, plan, params)
            replaced.update(site.nodes)
    _remove_dead(gm, replaced)
    report = report.with_notes(notes)
    if topk if topk is not None else (spec.to == "fused" and not spec.fused_ssmax):
        report = emit_topk(gm, report)
    return gm, Emitted(report, left)


def _bypass(rel: Any) -> None:
    """Remove an existing query scaling (``plan.replaces``): the multiply's users read the unscaled Q."""
    node, data = rel.node, rel.data
    if isinstance(node, fx.Node) and isinstance(data, fx.Node):
        node.replace_all_uses_with(data)


def _graph_device(gm: fx.GraphModule) -> torch.device:
    for p in gm.parameters():
        return p.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


__all__ = ["CAPS", "SSMAX_MODULE", "emit", "emitted", "fuse", "to_ssmax"]
