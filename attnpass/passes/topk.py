"""The second kind of site: a softmax whose probabilities are only picked from (top-k, max, argmax).

A MoE router (``softmax -> topk -> w / w.sum(-1, keepdim=True)``), a classification head (``softmax ->
topk``), greedy decoding (``argmax(softmax(x))``) and confidence scores (``max(softmax(x))``) never need
the full probability tensor: the online normaliser computes the selected probabilities in the same single
pass that finds them.  This walk finds those chains through the same ``Adapter`` as attention sites, plus
one question only it asks: ``reduction(node)`` (a ``Reduction`` describing a top-k / max / argmax / sum
node, or None).  An adapter without that method simply has no such sites.

A softmax that feeds a selection but cannot be rewritten is still reported, with the reason
(``TopkSite.blocker``): the full probabilities are used elsewhere, the axes differ, k is not static...
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from attnpass.passes.kinds import Adapter, Kind

#: Ops between the softmax and the selection that do not change which entries are picked.
_PASS_THROUGH = {Kind.CAST, Kind.IDENTITY}
#: The largest ``eps`` in ``w / (w.sum() + eps)`` still read as the renormalisation (below float32's resolution of a
#: sum that is at least k / n).
_RENORM_EPS = 1e-12


class TopkForm(enum.StrEnum):
    """What is selected from the probabilities."""

    TOPK = "topk"
    MAX = "max"
    ARGMAX = "argmax"


@dataclass(frozen=True)
class Reduction:
    """An adapter's answer about one reduction node, in the IR's own values.

    ``op`` is ``"topk"``, ``"max"`` (values, and indices when the op also returns them), ``"argmax"``, ``"sum"``
    or ``"gather"`` (``values`` its result, ``indices`` its index input).  ``axis`` is None for a reduction over every axis; ``k`` is None when it is not static.
    ``values``/``indices`` are the node's results (None when the op has none or nobody reads them).
    """

    op: str
    x: Any
    axis: int | None
    keepdim: bool = False
    k: int | None = None
    largest: bool = True
    values: Any = None
    indices: Any = None


@dataclass(frozen=True, eq=False)
class TopkSite:
    """One softmax -> selection chain, as found.  ``blocker`` says why it is left alone (None: rewritable).

    ``x`` is the softmax input (the logits), ``probs`` the value the selection reads (the softmax output or
    a cast of it), ``reduce`` the selection node.  ``renorm`` is the division by the top-k values' sum that
    follows (Mixtral); when set, ``renorm_out`` is the value a rewrite replaces instead of ``values``.
    """

    index: int
    name: str
    softmax: Any
    form: TopkForm
    x: Any
    axis: int
    rank: int
    reduce: Any
    values: Any = None
    indices: Any = None
    k: int | None = None
    keepdim: bool = False
    renorm: Any = None
    renorm_sum: Any = None
    renorm_out: Any = None
    casts: tuple[Any, ...] = ()
    blocker: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def fusable(self) -> bool:
        return self.blocker is None

    @property
    def renormalize(self) -> bool:
        return self.renorm is not None

    def with_notes(self, notes: Iterable[str]) -> TopkSite:
        notes = tuple(notes)
        return replace(self, notes=self.notes + notes) if notes else self

    def summary(self) -> dict[str, Any]:
        """Plain-data view for tables and JSON (what ``attnpass inspect`` prints)."""
        return {
            "index": self.index,
            "node": self.name,
            "form": str(self.form),
            "k": self.k,
            "axis": self.axis,
            "renormalize": self.renormalize,
            "fusable": self.fusable,
            "why_not_fusable": self.blocker,
            "notes": list(self.notes),
        }


class TopkWalker:
    """Finds ``TopkSite``s through an adapter that can answer ``reduction``."""

    def __init__(self, adapter: Adapter, skip: Iterable[Any] = ()):
        self.a = adapter
        self.ask = getattr(adapter, "reduction", None)
        self.skip = set(id(s) for s in skip)

    def find(self) -> list[TopkSite]:
        if self.ask is None:
            return []
        sites: list[TopkSite] = []
        for node in list(self.a.nodes()):
            if id(node) in self.skip or self.a.kind(node) is not Kind.SOFTMAX:
                continue
            for site in self._softmax(node):
                sites.append(replace(site, index=len(sites)))
        return sites

    def _reduction(self, node: Any) -> Reduction | None:
        try:
            return self.ask(node)
        except (IndexError, KeyError, TypeError, ValueError):  # a malformed node is no selection
            return None

    def _softmax(self, sm: Any) -> list[TopkSite]:
        a = self.a
        ins = a.inputs(sm)
        if not ins:
            return []
        x = ins[0]
        out = a.output(sm)
        shape = a.shape(out) or a.shape(x)
        if shape is None or len(shape) == 0:
            return []
        rank = len(shape)
        axis = a.attr(sm, "axis")
        # follow single-use casts: softmax(x).float().topk(k) selects the same entries
        probs, casts = out, []
        while True:
            us = a.users(probs)
            if len(us) == 1 and a.kind(us[0]) in _PASS_THROUGH and not a.is_graph_output(probs):
                casts.append(us[0])
                probs = a.output(us[0])
                continue
            break
        users = a.users(probs)
        picks = [(u, r) for u in users if (r := self._reduction(u)) is not None and r.op in ("topk", "max", "argmax")
                 and r.x is probs]
        if not picks:
            return []
        others = [u for u in users if all(u is not p for p, _ in picks)]
        gathers = {id(u): r for u in others if (r := self._reduction(u)) is not None and r.op == "gather"}
        picks = [self._gathered(p, r, [g for g in gathers.values() if g.x is probs]) for p, r in picks]
        others = [u for u in others if not any(u is p or (id(u) in gathers and gathers[id(u)].values is r.values)
                                                for p, r in picks)]
        shared: str | None = None
        if a.is_graph_output(probs) or (probs is not out and a.is_graph_output(out)):
            shared = "the full probabilities are a graph output"
        elif others:
            shared = f"the full probabilities are used elsewhere ({a.name(others[0])})"
        sites = []
        for node, r in picks:
            sites.append(self._site(sm, x, axis, rank, node, r, tuple(casts), shared))
        return sites

    def _gathered(self, node: Any, r: Reduction, gathers: list[Reduction]) -> tuple[Any, Reduction]:
        """``_, i = p.topk(k); w = p.gather(axis, i)`` (DeepSeek-style gates): the gather reads the top-k values
        back, so with the top-k's own values unread it *is* the values result."""
        if r.op != "topk" or r.indices is None or (r.values is not None and self.a.users(r.values)):
            return node, r
        for g in gathers:
            if g.indices is r.indices and g.axis is not None and r.axis is not None:
                rank = len(self.a.shape(g.x) or ()) or 1
                if g.axis % rank == r.axis % rank:
                    return node, replace(r, values=g.values)
        return node, r

    def _site(self, sm: Any, x: Any, axis: Any, rank: int, node: Any, r: Reduction, casts: tuple[Any, ...],
              shared: str | None) -> TopkSite:
        a = self.a
        form = TopkForm(r.op)
        blocker = shared
        sm_axis = axis % rank if isinstance(axis, int) else None
        red_axis = r.axis % rank if isinstance(r.axis, int) else None
        if sm_axis is None:
            blocker = blocker or "the softmax axis is not static"
        elif r.axis is None and rank != 1:
            blocker = blocker or f"{form} over every axis, the softmax over axis {sm_axis} only"
        elif red_axis is not None and red_axis != sm_axis:
            blocker = blocker or f"axes differ: softmax over axis {sm_axis}, {form} over axis {red_axis}"
        if form is TopkForm.TOPK:
            if r.k is None:
                blocker = blocker or "k is not static"
            if not r.largest:
                blocker = blocker or "selects the smallest k, not the largest"
        renorm, rsum, rout = self._renorm(r, sm_axis) if form is TopkForm.TOPK and r.values is not None else (None, None, None)
        notes = ("renormalised top-k weights",) if renorm is not None else ()
        return TopkSite(
            index=0, name=a.name(sm), softmax=sm, form=form, x=x, axis=sm_axis if sm_axis is not None else -1,
            rank=rank, reduce=node, values=r.values, indices=r.indices, k=r.k, keepdim=r.keepdim, renorm=renorm,
            renorm_sum=rsum, renorm_out=rout, casts=casts, blocker=blocker, notes=notes,
        )

    def _renorm(self, r: Reduction, axis: int | None) -> tuple[Any, Any, Any]:
        """``w / w.sum(axis, keepdim=True)`` on the top-k values (their only reads): the division node, the sum
        node and the division's result; Nones when the values are used any other way."""
        a = self.a
        vals = r.values
        users = a.users(vals)
        if len(users) != 2 or a.is_graph_output(vals):
            return None, None, None
        div = next((u for u in users if a.kind(u) is Kind.DIV), None)
        sm = next((u for u in users if u is not div), None)
        if div is None or sm is None:
            return None, None, None
        s = self._reduction(sm)
        if s is None or s.op != "sum" or s.x is not vals or not s.keepdim:
            return None, None, None
        rank = len(a.shape(vals) or ())
        if s.axis is None or axis is None or rank == 0 or s.axis % rank != axis:
            return None, None, None
        ins = a.inputs(div)
        sum_out = s.values
        if len(ins) < 2 or ins[0] is not vals or a.users(sum_out) == [] or a.is_graph_output(sum_out):
            return None, None, None
        den = ins[1]
        if den is not sum_out:
            # ``w / (w.sum() + eps)`` (DeepSeek's 1e-20): the top-k sum is at least k / n, so an eps this small
            # changes no float32 bit of the weights
            add = a.producer(den)
            if add is None or a.kind(add) is not Kind.ADD or a.users(den) != [div] or a.users(sum_out) != [add]:
                return None, None, None
            terms = a.inputs(add)
            eps = a.constant(terms[1]) if terms[0] is sum_out else a.constant(terms[0]) if terms[1] is sum_out else None
            if eps is None or not 0.0 <= eps <= _RENORM_EPS:
                return None, None, None
        elif a.users(sum_out) != [div]:
            return None, None, None
        return div, sm, a.output(div)


def find_topk(adapter: Adapter, attention_softmaxes: Iterable[Any] = ()) -> tuple[TopkSite, ...]:
    """Every softmax -> top-k / max / argmax chain (attention sites' softmaxes excluded)."""
    return tuple(TopkWalker(adapter, attention_softmaxes).find())


__all__ = ["Reduction", "TopkForm", "TopkSite", "TopkWalker", "find_topk"]
