"""The one attention matcher, shared by the torch.fx, ONNX and MLIR adapters.

It starts at every softmax over the key axis and walks *backwards* through the ops that
real exporters put between ``Q K^T`` and the softmax (casts, scale, soft-capping, masks
and biases), and *forwards* through cast / dropout / NaN guards to the matmul that
multiplies the probabilities into ``V``.  Walking from the softmax instead of matching
fixed templates is what lets one algorithm cover the orderings that template lists
(Inductor's ``fuse_attention``) miss: scale before or after the matmul, pre-scaled
``q``, ``q`` and ``k`` both pre-scaled, upcast around the softmax, boolean or additive or
``masked_fill`` masks, bias added before the scale, GQA glue, einsum and baddbmm.

An adapter only answers questions about its IR (see ``Adapter``); everything that
decides what is attention lives here, so the three IRs cannot drift apart.  The walk fills a
mutable ``Draft`` (``draft.py``); ``find`` returns frozen ``AttentionSite``s (``site.py``) that nothing
changes afterwards.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from attnpass.passes.draft import Draft, freeze
from attnpass.passes.einsum import _parse_einsum, _perm_to, _permuted, _same_tail
from attnpass.passes.kinds import Adapter, Dim, Kind, canonical_product
from attnpass.passes.masks import _MASK_FILL_LIMIT, MaskProofs
from attnpass.passes.operands import OperandFinder
from attnpass.passes.probs import ProbsWalker
from attnpass.passes.relatives import already_ssmax, find_relative
from attnpass.passes.site import (
    AttentionSite,
    Form,
    FusedOpInfo,
    Guard,
    GuardKind,
    MaskKind,
    MaskRole,
    MaskTerm,
    Operand,
    Report,
    Skipped,
)
from attnpass.passes.topk import find_topk
from attnpass.passes.walk_base import NoMatch

_GLUE = {Kind.RESHAPE, Kind.EXPAND, Kind.IDENTITY}


class Matcher(MaskProofs, OperandFinder, ProbsWalker):
    """Finds attention sites through an ``Adapter``."""

    # -------------------------------------------------------------- entry point
    def find(self) -> Report:
        sites: list[AttentionSite] = []
        skipped: list[Skipped] = []
        for node in list(self.a.nodes()):
            kind = self.a.kind(node)
            if kind not in (Kind.SOFTMAX, Kind.SDPA):
                continue
            try:
                draft = self._sdpa(node) if kind is Kind.SDPA else self._softmax(node)
            except NoMatch as e:
                why = f"already SSMax (attnpass): {e}" if already_ssmax(self.a, node) else str(e)
                skipped.append(Skipped(self.a.name(node), why))
                continue
            draft.index = len(sites)
            site = freeze(draft, self.a)
            rel = find_relative(self.a, site.q.value)
            sites.append(site if rel is None else replace(site, relative=rel, notes=site.notes + (f"q scaled by {rel.describe()}",)))
        return Report(tuple(sites), tuple(skipped))

    def _fused_op_info(self, d: Draft) -> None:
        """Ask the adapter what only the fused op's IR knows (ONNX ops carry head counts as attributes)."""
        ask = getattr(self.a, "fused_op_info", None)
        info: FusedOpInfo | None = None if ask is None else ask(d.softmax)
        if info is None:
            return
        if info.op_name is not None:
            d.notes = [n for n in d.notes if not n.startswith("already fused")] + [f"already fused ({info.op_name})"]
        if info.three_d:
            d.three_d = True
            d.heads, d.kv_heads, d.seq_q, d.head_dim, d.seq_k = info.heads, info.kv_heads, info.seq_q, info.head_dim, info.seq_k
        if d.scale is None and isinstance(d.head_dim, int):
            d.scale = 1.0 / math.sqrt(d.head_dim)
        d.softcap = info.softcap
        d.notes.extend(info.notes)
        d.ssmax_blocker = info.ssmax_blocker

    # -------------------------------------------------------------- SDPA calls
    def _sdpa(self, node: Any) -> Draft:
        a = self.a
        ins = a.inputs(node)
        q, k, v = ins[0], ins[1], ins[2]
        mask = ins[3] if len(ins) > 3 else None
        qs, ks = a.shape(q), a.shape(k)
        if qs is None or ks is None or len(qs) < 2:
            raise NoMatch("scaled_dot_product_attention with unknown input ranks")
        rank = len(qs)
        scale = a.attr(node, "scale")
        head_dim = qs[-1]
        # HF's sdpa path repeats K/V for GQA before the call; the fused op reads them unrepeated
        k_src = self._unglue(k, rank, gqa=True) or (k, 1)
        v_src = self._unglue(v, rank, gqa=True) or (v, 1)
        if k_src[1] != v_src[1]:
            k_src, v_src = (k, 1), (v, 1)
        site = Draft(
            index=0,
            name=a.name(node),
            softmax=node,
            form=Form.FUSED_OP,
            q=Operand(q, rank),
            k=Operand(k_src[0], rank, groups=k_src[1]),
            v=Operand(v_src[0], rank, groups=v_src[1]),
            out=a.output(node),
            out_rank=rank,
            scale=scale if scale is not None else (1.0 / math.sqrt(head_dim) if isinstance(head_dim, int) else None),
            causal=bool(a.attr(node, "is_causal", False)),
            dropout_p=float(a.attr(node, "dropout_p", 0.0) or 0.0),
            dropout_train=True if float(a.attr(node, "dropout_p", 0.0) or 0.0) > 0 else False,
            nodes=[node],
            sdpa_mask=mask,
            sdpa_is_causal=bool(a.attr(node, "is_causal", False)),
        )
        if rank >= 4:
            site.heads, site.kv_heads = qs[-3], (a.shape(k_src[0]) or ks)[-3]
        if k_src[1] > 1:
            site.notes.append(f"GQA {k_src[1]}:1 (K/V repeated before the call)")
        site.head_dim, site.seq_q, site.seq_k = head_dim, qs[-2], ks[-2]
        if a.attr(node, "enable_gqa", False):
            site.notes.append("enable_gqa")
        if site.dropout_p > 0:
            site.fuse_blocker = f"dropout p={site.dropout_p} inside scaled_dot_product_attention (the fused op has no dropout)"
        if mask is not None:
            site.notes.append("mask given to scaled_dot_product_attention")
        site.notes.append("already fused (scaled_dot_product_attention)")
        self._fused_op_info(site)
        return site

    # -------------------------------------------------------------- softmax chains
    def _softmax(self, sm: Any) -> Draft:
        a = self.a
        x = self._in(sm)
        shape = a.shape(x)
        if shape is None:
            raise NoMatch("softmax input has unknown rank")
        rank = len(shape)
        axis = a.attr(sm, "axis", -1)
        if axis is None or (axis % rank) != rank - 1:
            raise NoMatch(f"softmax over axis {axis}, not the last (key) axis")
        if rank < 2:
            raise NoMatch("softmax over a vector: no query rows")
        steps: list[tuple[str, Any]] = []
        chain: list[Any] = [sm]
        qk = self._walk_scores(x, steps, chain, depth=0)
        site = self._build(sm, rank, qk, steps, chain)
        site.notes.extend(self._walk_notes)
        if self._walk_blockers:
            site.fuse_blocker = "; ".join(self._walk_blockers)
        self._walk_probs(site, a.output(sm), rank)
        if site.probs_escape and site.fuse_blocker is None:
            site.fuse_blocker = site.probs_escape
        if site.dropout_train and site.dropout_p > 0 and site.fuse_blocker is None:
            site.fuse_blocker = f"dropout p={site.dropout_p} in training mode (the fused op has no dropout)"
        return site

    def _walk_scores(self, x: Any, steps: list, chain: list, depth: int) -> tuple[str, Any]:
        """Walk from the softmax input back to ``Q K^T``; ``steps`` collects what lies between, softmax-side first.

        What the walk learns that no step expresses (a dropped constant shift, a run-time tensor scale, a mask
        added in a view of another rank) goes to ``self._walk_notes`` / ``self._walk_blockers``, which
        ``_walk_probs`` moves onto the site.
        """
        a = self.a
        if depth == 0:
            self._walk_notes: list[str] = []
            self._walk_blockers: list[str] = []
            self._walk_rank = self._rank(x)
            self._walk_input = x  # the softmax input: the scores' own shape
        for _ in range(64 - depth):
            node, kind = self._producer_kind(x)
            if node is None:
                raise NoMatch("softmax input does not come from a matmul (it is a graph input)")
            if kind in (Kind.CAST, Kind.IDENTITY):
                if kind is Kind.CAST:
                    steps.append(("cast", node))
                chain.append(node)
                x = self._in(node)
                continue
            if kind in (Kind.MUL, Kind.DIV):
                lhs, rhs = a.inputs(node)[:2]
                c = self._const(rhs)
                other = lhs
                if c is None and kind is Kind.MUL:
                    c, other = self._const(lhs), rhs
                if c is None:
                    sym = self._symbolic_scale(lhs, rhs, kind)
                    tensor = None if sym is not None else self._tensor_scale(lhs, rhs, kind, x)
                    if tensor is not None:
                        # a per-head (or per-batch) factor known only at run time: moved onto q when q's layout is
                        # the scores' (``_build``), else the site stays unfused and SSMax applies
                        steps.append(("tscale", (tensor[0], kind is Kind.DIV, a.name(node))))
                        self._walk_notes.append(f"run-time tensor scale at {a.name(node)}")
                        chain.append(node)
                        x = tensor[1]
                        continue
                    if sym is None:
                        raise NoMatch(f"scores multiplied by a non-constant at {a.name(node)}")
                    scalar, other = sym
                    steps.append(("symscale", (scalar, kind is Kind.DIV)))
                    chain.append(node)
                    x = other
                    continue
                if c == 0:
                    raise NoMatch(f"scores multiplied by zero at {a.name(node)}")
                cap = self._softcap(node, kind, c, other)
                if cap is not None:
                    capval, inner = cap
                    steps.append(("softcap", capval))
                    chain.extend([node, a.producer(other), a.producer(a.inputs(a.producer(other))[0])])
                    x = inner
                    continue
                steps.append(("scale", c if kind is Kind.MUL else 1.0 / c))
                chain.append(node)
                x = other
                continue
            if kind in (Kind.ADD, Kind.SUB):
                lhs, rhs = a.inputs(node)[:2]
                order = [(lhs, rhs, 1.0)] + ([(rhs, lhs, 1.0)] if kind is Kind.ADD else [])
                last_error: NoMatch | None = None
                for on_chain, term, sign in order:
                    if self._const(on_chain) is not None or a.is_static(on_chain):
                        continue
                    shift = self._const(term)
                    if shift == 0:
                        term = None  # T5 cross-attention adds a zero "position bias"
                    elif shift is not None:
                        term = None
                    marks = len(self._walk_notes), len(self._walk_blockers)
                    sub_steps: list = []
                    sub_chain: list = []
                    try:
                        res = self._walk_scores(on_chain, sub_steps, sub_chain, depth + 1)
                    except NoMatch as e:
                        del self._walk_notes[marks[0]:], self._walk_blockers[marks[1]:]
                        last_error = last_error or e  # the first operand is the scores in every exporter seen
                        continue
                    if shift not in (None, 0.0):
                        self._walk_notes.append(
                            f"constant {shift:g} added to the scores at {a.name(node)} dropped (softmax is shift-invariant per row)")
                    view = None
                    if term is not None and shift is None and self._rank(x) != self._walk_rank:
                        view = self._head_view(x, term)
                        if view is None:
                            raise NoMatch(f"mask added at {a.name(node)} in a {self._rank(x)}-D view of the "
                                          f"{self._walk_rank}-D scores: no rewrite lays such a mask out on the scores yet")
                    if term is not None:
                        steps.append(("bias", (term, node, -sign if kind is Kind.SUB else sign, view)))
                    steps.extend(sub_steps)
                    chain.append(node)
                    chain.extend(sub_chain)
                    return res
                raise last_error or NoMatch(f"neither operand of {a.name(node)} comes from Q K^T")
            if kind is Kind.WHERE:
                cond, xa, xb = a.inputs(node)[:3]
                ca, cb = self._const(xa), self._const(xb)
                if cb is not None and cb <= _MASK_FILL_LIMIT:
                    steps.append(("boolmask", (cond, node, True)))
                    x = xa
                elif ca is not None and ca <= _MASK_FILL_LIMIT:
                    steps.append(("boolmask", (cond, node, False)))
                    x = xb
                else:
                    raise NoMatch(f"{a.name(node)} selects scores with a fill that is not a mask (-inf / very negative)")
                if self._rank(x) != self._walk_rank:
                    raise NoMatch(f"mask applied at {a.name(node)} in a {self._rank(x)}-D view of the "
                                  f"{self._walk_rank}-D scores: no rewrite lays such a mask out on the scores yet")
                chain.append(node)
                continue
            if kind is Kind.RESHAPE:
                # core ATen's 4-D matmul: bmm on [B*H, S, D] views, then a view back to [B, H, S_q, S_k];
                # fairseq / MBart: [B*H, S, S] scores viewed to [B, H, S, S] for the mask and back
                src = self._in(node)
                _, src_kind = self._producer_kind(src)
                if _same_tail(self._named_shape(src), self._named_shape(x)) and (
                        src_kind in (Kind.MATMUL, Kind.BADDBMM) or self._rank(src) == self._walk_rank
                        or self._views_back(src)):
                    chain.append(node)
                    x = src
                    continue
            if kind in (Kind.MATMUL, Kind.BADDBMM, Kind.EINSUM):
                chain.append(node)
                return ("qk", node)
            raise NoMatch(f"softmax input comes from {kind.value} node {a.name(node)}, not from Q K^T")
        raise NoMatch("too many ops between Q K^T and the softmax")

    def _head_view(self, x: Any, term: Any) -> tuple[Any, ...] | None:
        """fairseq / MBart: ``x`` is a ``[B, H, S_q, S_k]`` view of ``[B*H, S_q, S_k]`` scores and ``term`` broadcasts
        to it without growing it: the view's shape, by which emitters lay the mask out on the scores.  The head
        count must be a number; a symbolic batch or length (dynamic shapes) is kept when the sizes agree symbol for
        symbol, unless the mask varies per head but not per batch (laying it out would need the batch size)."""
        xs, ts, ss = self._named_shape(x), self.a.shape(term), self._named_shape(self._walk_input)
        if xs is None or ts is None or ss is None or len(xs) != 4 or len(ss) != 3 or len(ts) > 4:
            return None
        ask = getattr(self.a, "size_expr", None)  # an IR whose types print no symbol (MLIR's ``?``) names the sizes
        named = xs[0] is None and ss[0] is None and ask is not None
        if named and isinstance(xs[1], int):
            batch, folded = ask(x, 0), ask(self._walk_input, 0)
            if batch is None or folded is None or canonical_product(xs[1], batch) != canonical_product(folded):
                return None
            xs, ss = (batch, *xs[1:]), (folded, *ss[1:])
        if not isinstance(xs[1], int) or xs[1] <= 0 or not all(_same_size(a, b) for a, b in zip(xs[2:], ss[1:])):
            return None
        static = isinstance(xs[0], int)
        if static and (not isinstance(ss[0], int) or xs[0] * xs[1] != ss[0]):
            return None
        if not static and str(ss[0]) not in (f"{xs[1]}*{xs[0]}", f"{xs[0]}*{xs[1]}"):
            return None  # a symbolic batch: the scores' first size must be the product, written out
        pad = (1,) * (4 - len(ts)) + tuple(ts)
        if named:  # the mask's own ``?`` is the view's size (not an implicit broadcast: torch-mlir's assumption)
            pad = tuple(d if t is None else t for t, d in zip(pad, xs))
        if not all(_unit(t) or _same_size(t, d) for t, d in zip(pad, xs)):
            return None
        if not static and _unit(pad[0]) and not _unit(pad[1]):
            return None
        return tuple(xs)

    def _named_shape(self, v: Any) -> tuple[Any, ...] | None:
        """``v``'s shape with each unknown size that the adapter's ``size_expr`` reads as a number filled in (MLIR's
        ``?`` from a view's ``-1``); the shape as the adapter gives it otherwise."""
        shape, ask = self.a.shape(v), getattr(self.a, "size_expr", None)
        if shape is None or ask is None or all(d is not None for d in shape):
            return shape
        named = [ask(v, i) if d is None else d for i, d in enumerate(shape)]
        return tuple(int(n) if isinstance(n, str) and n.isdigit() else d for n, d in zip(named, shape))

    def _views_back(self, v: Any) -> bool:
        """True if ``v`` is a view of the scores that a further view brings back to the softmax's rank."""
        for _ in range(16):
            node, kind = self._producer_kind(v)
            if node is None:
                return False
            if kind is Kind.RESHAPE and self._rank(self._in(node)) == self._walk_rank:
                return True
            if kind not in (Kind.ADD, Kind.SUB, Kind.MUL, Kind.DIV, Kind.WHERE, Kind.CAST, Kind.IDENTITY):
                return False
            ins = self.a.inputs(node)
            v = ins[1] if kind is Kind.WHERE else ins[0]
        return False

    def _tensor_scale(self, lhs: Any, rhs: Any, kind: Kind, out: Any) -> tuple[Any, Any] | None:
        """``scores * t`` / ``scores / t`` with ``t`` a run-time tensor constant along the query and key axes
        (``[H, 1, 1]``): ``(t, scores)``, else None."""
        def flat_rows(t: Any) -> bool:
            s = self.a.shape(t)
            return s is not None and 0 < len(s) and all(d == 1 for d in s[-2:]) and len(s) <= (self._rank(out) or 0)
        if flat_rows(rhs) and _same_tail(self.a.shape(lhs), self.a.shape(out)):
            return rhs, lhs
        if kind is Kind.MUL and flat_rows(lhs) and _same_tail(self.a.shape(rhs), self.a.shape(out)):
            return lhs, rhs
        return None

    def _tensor_on_q(self, t: Any, q: Operand, kind: Kind, rank: int) -> str:
        """Why ``t`` (right-aligned against the scores) cannot move onto q, or "" when q is laid out as the scores'
        leading dims, so ``(q * t) . k == t * (q . k)`` broadcasts the same way."""
        if kind is Kind.EINSUM or q.perm is not None or self._rank(q.value) != rank:
            return "q is not laid out as the scores (einsum or permuted layout), the factor cannot move onto it"
        qs, ts = self.a.shape(q.value) or (), self.a.shape(t) or ()
        if any(d != 1 and d != e for d, e in zip(reversed(ts), reversed(qs))):
            return f"the factor (shape {ts}) would broadcast q (shape {qs}) beyond its own size"
        dt = getattr(self.a, "dtype", None) or (lambda v: getattr(v, "dtype", None))
        if None not in (dt(t), dt(q.value)) and dt(t) != dt(q.value):
            return f"the factor's dtype {dt(t)} is not q's {dt(q.value)}"
        return ""

    def _symbolic_scale(self, lhs: Any, rhs: Any, kind: Kind) -> tuple[Any, Any] | None:
        """A scale that is a run-time scalar (``1/sqrt(q.size(-1))`` under dynamic shapes): ``(scalar, other)``."""
        is_scalar = getattr(self.a, "is_scalar", None)
        if is_scalar is None:
            return None
        if is_scalar(rhs):
            return rhs, lhs
        if kind is Kind.MUL and is_scalar(lhs):
            return lhs, rhs
        return None

    def _softcap(self, node: Any, kind: Kind, c: float, other: Any) -> tuple[float, Any] | None:
        """``c * tanh(x / c)`` (Gemma-2 style soft-capping), with ``x / c`` as DIV or MUL by ``1/c``."""
        if kind is not Kind.MUL:
            return None
        tnode, tkind = self._producer_kind(other)
        if tkind is not Kind.TANH:
            return None
        inner_v = self._in(tnode)
        inode, ikind = self._producer_kind(inner_v)
        if ikind not in (Kind.MUL, Kind.DIV):
            return None
        lhs, rhs = self.a.inputs(inode)[:2]
        d = self._const(rhs)
        src = lhs
        if d is None and ikind is Kind.MUL:
            d, src = self._const(lhs), rhs
        if d is None or d == 0:
            return None
        cap_in = d if ikind is Kind.DIV else 1.0 / d
        if not math.isclose(cap_in, c, rel_tol=1e-4):
            return None
        return c, src

    # -------------------------------------------------------------- building the site from the walk
    def _build(self, sm: Any, rank: int, qk: tuple[str, Any], steps: list, chain: list) -> Draft:
        a = self.a
        node = qk[1]
        kind = a.kind(node)
        scale = 1.0
        masks: list[MaskTerm] = []
        softcap = None
        upcast = False
        # steps are softmax-side first; a bias is multiplied by the scales nearer the softmax than it
        pending_scale = 1.0
        seen_softcap = False
        q_scales: list[tuple[Any, bool]] = []
        t_scales: list[tuple[Any, bool, str]] = []  # run-time tensors constant along S_q and S_k
        t_late = ""
        for step, payload in steps:
            if step in ("softcap", "bias", "boolmask") and t_scales and not t_late:
                t_late = "it is applied after a mask, bias or soft-cap, which it would scale too"
            if step == "cast":
                upcast = True
            elif step == "scale":
                if seen_softcap:
                    scale *= payload
                else:
                    pending_scale *= payload
            elif step == "symscale":
                q_scales.append(payload)
            elif step == "tscale":
                t_scales.append(payload)
            elif step in ("softcap", "bias", "boolmask") and q_scales:
                raise NoMatch("a run-time scale is applied after a mask, bias or soft-cap")
            elif step == "softcap":
                if seen_softcap:
                    raise NoMatch("two soft-caps on one score chain")
                if pending_scale != 1.0:
                    raise NoMatch("scores scaled after soft-capping")
                seen_softcap = True
                softcap = payload
            elif seen_softcap:
                raise NoMatch("a mask or bias is applied before soft-capping")
            elif step == "bias":
                term, bnode, sign, view = payload
                masks.append(MaskTerm(MaskKind.ADDITIVE, term, bnode, coeff=sign * pending_scale, view=view))
            elif step == "boolmask":
                cond, wnode, attend_when = payload
                if pending_scale <= 0:
                    raise NoMatch("scores scaled by a negative number after masking")
                masks.append(MaskTerm(MaskKind.BOOL, cond, wnode, attend_when=attend_when))
        if not seen_softcap:
            scale = pending_scale
        if kind is Kind.BADDBMM:
            bias, qv, ktv = a.inputs(node)[:3]
            beta = float(a.attr(node, "beta", 1.0))
            if beta != 0:
                if seen_softcap:
                    raise NoMatch("baddbmm adds a bias before soft-capping")
                masks.append(MaskTerm(MaskKind.ADDITIVE, bias, node, coeff=beta * scale))
            scale *= float(a.attr(node, "alpha", 1.0))
            q_op, k_op, k_factor = self._qk_operands(qv, ktv, rank, node)
            scale *= k_factor
        elif kind is Kind.EINSUM:
            q_op, k_op = self._einsum_qk(node, rank)
        else:
            qv, ktv = a.inputs(node)[:2]
            q_op, k_op, k_factor = self._qk_operands(qv, ktv, rank, node)
            scale *= k_factor
        for t, divide, where in t_scales:
            why = t_late or self._tensor_on_q(t, q_op, kind, rank)
            if why:
                self._walk_blockers.append(f"scores scaled by a run-time tensor at {where} (shape {a.shape(t)}): {why}")
            else:
                q_scales.append((t, divide))
        masks = [self._classify_mask(term) for term in masks]
        causal = any(m.causal for m in masks)
        site = Draft(
            index=0,
            name=a.name(sm),
            softmax=sm,
            form=Form.EXPLICIT,
            q=q_op,
            k=k_op,
            v=q_op,  # replaced by _walk_probs
            out=None,
            out_rank=rank,
            scale=scale,
            masks=masks,
            causal=causal,
            softcap=softcap,
            upcast=upcast,
            nodes=list(chain),
            q_scales=q_scales,
        )
        if q_scales:
            site.notes.append("run-time scale (moved onto q when fused)")
        site.scale_on_q = self._prescale(q_op.value)
        if site.scale_on_q is not None:
            site.notes.append(f"q pre-scaled by {site.scale_on_q:.6g}")
        qs, ks = a.shape(q_op.value), a.shape(k_op.value)
        if qs is not None and ks is not None:
            qs_l, ks_l = _permuted(qs, q_op.perm), _permuted(ks, k_op.perm)
            site.head_dim = qs_l[-1]
            site.seq_q = qs_l[-2]
            site.seq_k = ks_l[-1] if k_op.transposed else ks_l[-2]
            if len(qs_l) >= 4:
                site.heads = qs_l[-3]
                site.kv_heads = ks_l[-3]
            else:
                site.notes.append(f"{len(qs_l)}-D attention: heads folded into the batch, one SSMax s for all")
        if k_op.groups > 1:
            site.notes.append(f"GQA {k_op.groups}:1")
        if any(m.kind == MaskKind.ADDITIVE and not m.only_causal and not m.causal for m in masks):
            site.notes.append("additive mask/bias")
        return site

    def _prescale(self, q: Any) -> float | None:
        """Report a scale already folded into ``q`` (Whisper style, or SDPA's decomposition)."""
        a = self.a
        v = q
        for _ in range(8):
            node, kind = self._producer_kind(v)
            if kind in (Kind.RESHAPE, Kind.TRANSPOSE, Kind.IDENTITY, Kind.EXPAND, Kind.CAST):
                v = self._in(node)
                continue
            if kind in (Kind.MUL, Kind.DIV):
                lhs, rhs = a.inputs(node)[:2]
                c = self._const(rhs)
                if c is None and kind is Kind.MUL:
                    c = self._const(lhs)
                if c is not None and c != 0:
                    return c if kind is Kind.MUL else 1.0 / c
            return None
        return None

    def _einsum_qk(self, node: Any, rank: int) -> tuple[Operand, Operand]:
        a = self.a
        eq = str(a.attr(node, "equation", "")).replace(" ", "")
        ops = a.inputs(node)
        parsed = _parse_einsum(eq, 2)
        if parsed is None or len(ops) != 2:
            raise NoMatch(f"einsum {eq!r} at {a.name(node)} is not a two-operand contraction")
        (la, lb), lo = parsed
        if any(a.is_static(o) for o in ops):
            raise NoMatch(f"einsum {eq!r} at {a.name(node)} multiplies by a weight")
        batch = [c for c in lo if c in la and c in lb]
        i = [c for c in la if c in lo and c not in lb]
        j = [c for c in lb if c in lo and c not in la]
        d = [c for c in la if c in lb and c not in lo]
        if len(i) != 1 or len(j) != 1 or len(d) != 1 or lo != "".join(batch) + i[0] + j[0]:
            raise NoMatch(f"einsum {eq!r} at {a.name(node)} is not Q K^T with scores laid out [batch..., q, k]")
        q_perm = _perm_to(la, "".join(batch) + i[0] + d[0])
        k_perm = _perm_to(lb, "".join(batch) + j[0] + d[0])
        return Operand(ops[0], len(la), perm=q_perm), Operand(ops[1], len(lb), perm=k_perm)


def find_sites(adapter: Adapter) -> Report:
    """All attention sites an adapter's graph holds, plus the softmaxes left alone and why.

    The report also carries the softmax -> top-k / max / argmax chains (``passes/topk.py``), a second kind
    of site found through the same adapter; attention sites are found first and never change for it."""
    report = Matcher(adapter).find()
    topk = find_topk(adapter, [s.softmax for s in report.sites])
    return replace(report, topk=topk) if topk else report


__all__ = ["Kind", "Adapter", "Dim", "Matcher", "NoMatch", "find_sites", "AttentionSite", "Operand", "MaskTerm",
           "MaskKind", "MaskRole", "Form", "Guard", "GuardKind", "FusedOpInfo", "Report", "Skipped"]


def _unit(d: Any) -> bool:
    """A size known to be 1 (a symbolic size is not)."""
    return isinstance(d, int) and d == 1


def _same_size(a: Any, b: Any) -> bool:
    """Equal numbers, or the same symbolic expression."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a is b or str(a) == str(b)
