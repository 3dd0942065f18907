"""The fx emitter for top-k sites (``passes/topk.py``): one pass instead of a softmax and a selection.

* ``softmax -> topk`` (and the renormalisation after it) becomes ``attnpass::softmax_topk(x, k, dim,
  renormalize)``: the kernel reads the logits once, the V-sized probability tensor is never written;
* ``argmax(softmax(x))`` becomes ``argmax(x)``: the softmax is monotonic, so the index is the logits' own;
* ``max(softmax(x))`` becomes ``exp(max(x) - logsumexp(x))``, the largest probability by exact algebra,
  and its index (``Tensor.max(dim)`` returns both) ``argmax(x)``.

The op is looked up at emit time (``torch.ops.attnpass.softmax_topk``, registered by the lowering layer's
import), as the attention emitter does with ``attnpass::attention``.  Sites with a ``blocker`` are left.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from attnpass.passes.fx import _IGNORED_USERS, FxAdapter, _op_name
from attnpass.passes.site import Report
from attnpass.passes.topk import TopkForm, TopkSite

aten = torch.ops.aten


def _meta(new: fx.Node, old: Any) -> fx.Node:
    """Shapes stay readable for later passes: the new node means what the old value meant."""
    if isinstance(old, fx.Node):
        for key in ("val", "example_value", "stack_trace", "nn_module_stack"):
            if key in old.meta:
                new.meta[key] = old.meta[key]
    return new


def _cast_like(g: fx.Graph, ad: FxAdapter, new: fx.Node, want_of: Any, have: torch.dtype | None) -> fx.Node:
    """``new`` in the dtype the replaced value had (a cast between the softmax and the selection)."""
    want = ad.dtype(want_of)
    if want is None or have is None or want == have:
        return new
    return g.call_function(aten._to_copy.default, (new,), {"dtype": want})


def _logits(g: fx.Graph, ad: FxAdapter, site: TopkSite) -> tuple[fx.Node, torch.dtype | None]:
    """The softmax input in the dtype the softmax computed in (``softmax(x, dtype=float32)``)."""
    x = site.x
    want, have = ad.dtype(site.softmax), ad.dtype(x)
    if want is not None and have is not None and want != have:
        x = g.call_function(aten._to_copy.default, (x,), {"dtype": want})
    return x, want


def _replace(old: Any, new: fx.Node) -> None:
    if isinstance(old, fx.Node):
        _meta(new, old)
        old.replace_all_uses_with(new)


def _emit_one(gm: fx.GraphModule, ad: FxAdapter, site: TopkSite) -> str:
    g = gm.graph
    dim = site.axis
    with g.inserting_before(site.reduce):
        x, dt = _logits(g, ad, site)
        if site.form is TopkForm.TOPK:
            op = torch.ops.attnpass.softmax_topk.default
            res = g.call_function(op, (x, int(site.k), dim, site.renormalize))
            probs = g.call_function(operator.getitem, (res, 0))
            idx = g.call_function(operator.getitem, (res, 1))
            target = site.renorm_out if site.renormalize else site.values
            probs = _cast_like(g, ad, probs, target, dt)
            if site.values is not None:
                _replace(site.values, probs)  # dynamo's in-place ``w /= s`` leaves readers of ``w`` itself
            if site.renormalize:
                _replace(site.renorm_out, probs)
            _replace(site.indices, idx)
            return "fused into attnpass::softmax_topk" + (" (renormalize)" if site.renormalize else "")
        keep = site.keepdim
        if site.form is TopkForm.ARGMAX:
            _replace(site.indices, g.call_function(aten.argmax.default, (x, dim, keep)))
            return "argmax(softmax(x)) -> argmax(x)"
        m = g.call_function(aten.amax.default, (x, [dim], keep))
        lse = g.call_function(aten.logsumexp.default, (x, [dim], keep))
        p = g.call_function(aten.exp.default, (g.call_function(aten.sub.Tensor, (m, lse)),))
        _replace(site.values, _cast_like(g, ad, p, site.values, dt))
        if site.indices is not None:
            _replace(site.indices, g.call_function(aten.argmax.default, (x, dim, keep)))
        return "max(softmax(x)) -> exp(max(x) - logsumexp(x))"


def _dead(gm: fx.GraphModule, chain: set[fx.Node]) -> None:
    """Drop what the rewrites left without readers; nodes of a replaced chain go even if fx calls them impure
    (the in-place division of dynamo's ``w /= w.sum()``)."""
    for node in list(gm.graph.nodes):  # asserts on a replaced value would keep the whole chain alive
        if _op_name(node) in _IGNORED_USERS and node.args and node.args[0] in chain and not node.users:
            gm.graph.erase_node(node)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.op not in ("call_function", "call_method"):
                continue
            if node in chain or not node.is_impure():
                gm.graph.erase_node(node)
                changed = True
    gm.graph.lint()
    gm.recompile()


def emit_topk(gm: fx.GraphModule, report: Report) -> Report:
    """Rewrite every fusable top-k site of ``report`` in ``gm``; returns the report with what was done noted."""
    if not report.topk:
        return report
    ad = FxAdapter(gm)
    done: list[TopkSite] = []
    chain: set[fx.Node] = set()
    for site in report.topk:
        if not site.fusable:
            done.append(site.with_notes([f"left alone: {site.blocker}"]))
            continue
        note = _emit_one(gm, ad, site)
        chain.update(n for n in (site.softmax, site.reduce, site.renorm, site.renorm_sum, *site.casts) if n is not None)
        done.append(site.with_notes([note]))
    if chain:
        _dead(gm, chain)
    return replace(report, topk=tuple(done))


__all__ = ["emit_topk"]
