"""The forward half of the walk: from the softmax's probabilities to the matmul that multiplies them into V.

Cast, dropout, views and ``where(cond, 0, p)`` guards lie on the way; every other reader of the
probabilities is an escape that the report names (the site then cannot be fused, SSMax still applies).
Type-only readers never reach here: adapters do not report them as users.
"""

from __future__ import annotations

from typing import Any

from attnpass.passes.draft import Draft
from attnpass.passes.einsum import _parse_einsum, _perm_to
from attnpass.passes.kinds import Kind
from attnpass.passes.site import Operand
from attnpass.passes.walk_base import NoMatch, WalkBase


class ProbsWalker(WalkBase):
    """Mixed into ``Matcher``; relies on ``OperandFinder._unglue`` for V's GQA glue."""

    def _walk_probs(self, site: Draft, p: Any, rank: int) -> None:
        a = self.a
        y = p
        escapes: list[str] = []
        for _ in range(32):
            users = a.users(y)
            if a.is_graph_output(y):
                escapes.append("the return value (a graph output)")  # the same words as a node that is one
            nxt = [u for u in users if self._continues(u, y)]
            if len(nxt) > 1:
                # e.g. the ONNX Attention body's ``Identity -> qk_matmul_output``: a copy that leaves, not the path to V
                nxt = [u for u in nxt if self._leads_to_pv(u, y, 8)] or nxt
            others = [u for u in users if u not in nxt and not self._nan_test_of_guard(u, y)]
            escapes.extend(a.name(u) + (" (a graph output)" if a.is_graph_output(a.output(u)) else "") for u in others)
            if len(nxt) != 1:
                raise NoMatch("softmax output is never multiplied into V" if not nxt else "softmax output feeds two matmuls")
            node = nxt[0]
            kind = a.kind(node)
            site.nodes.append(node)
            if kind in (Kind.MATMUL, Kind.EINSUM):
                self._pv(site, node, y, rank)
                if kind is Kind.MATMUL and site.v.groups > 1 and site.k.groups == 1:
                    # K reached Q K^T through a scale (both pre-scaled by sqrt(scale)), so its repetition was not
                    # peeled: V must reach the op repeated the same way, or the op sees two different head counts
                    plain = self._unglue(a.inputs(node)[1], rank, gqa=False)
                    if plain is not None:
                        site.v = Operand(plain[0], rank)
                break
            if kind is Kind.DROPOUT:
                site.dropout_p = float(a.attr(node, "p", 0.0) or 0.0)
                site.dropout_train = a.attr(node, "train", None)
            elif kind is Kind.WHERE:
                self._guard(site, node, y, p)
            y = a.output(node)
        else:
            raise NoMatch("softmax output is never multiplied into V")
        if escapes:
            site.probs_escape = "the attention probabilities are also used by " + ", ".join(sorted(set(escapes)))

    def _leads_to_pv(self, node: Any, y: Any, budget: int) -> bool:
        """True if ``node`` (which continues the probabilities ``y``) reaches a matmul with V through more such steps."""
        a = self.a
        if a.kind(node) in (Kind.MATMUL, Kind.EINSUM):
            return True
        if budget <= 0:
            return False
        out = a.output(node)
        return any(self._continues(u, out) and self._leads_to_pv(u, out, budget - 1) for u in a.users(out))

    def _nan_test_of_guard(self, node: Any, y: Any) -> bool:
        """``IsNaN(y)`` read only by ``Where(IsNaN(y), 0, y)`` guards: part of the guard, not a use of the probabilities."""
        a = self.a
        if a.kind(node) is not Kind.ISNAN or a.is_graph_output(a.output(node)):
            return False
        readers = a.users(a.output(node))
        return bool(readers) and all(a.kind(w) is Kind.WHERE and self._continues(w, y) for w in readers)

    def _continues(self, node: Any, y: Any) -> bool:
        a = self.a
        kind = a.kind(node)
        ins = a.inputs(node)
        if kind in (Kind.CAST, Kind.IDENTITY, Kind.DROPOUT):
            return ins[0] is y
        if kind in (Kind.RESHAPE, Kind.EXPAND):
            return ins[0] is y
        if kind is Kind.MATMUL:
            return ins[0] is y and not a.is_static(ins[1])
        if kind is Kind.EINSUM:
            return len(ins) == 2 and ins[0] is y
        if kind is Kind.WHERE:
            cond, xa, xb = ins[:3]
            return (xb is y and self._const(xa) == 0) or (xa is y and self._const(xb) == 0)
        return False

    def _guard(self, site: Draft, node: Any, y: Any, p: Any) -> None:
        """A ``where(cond, 0, probs)`` after the softmax: a NaN guard (dropped) or a per-row zeroing (kept)."""
        a = self.a
        cond, xa, xb = a.inputs(node)[:3]
        zero_when = xa is not y  # where(cond, 0, y): zero when cond is True
        if self._derives_isnan(cond, y, p):
            site.notes.append("NaN guard after softmax")
            site.nan_guards.append(cond)
            return
        cs, ys = a.shape(cond), a.shape(y)
        if cs is not None and ys is not None and len(cs) <= len(ys) and cs[-1] == 1:
            site.row_guards.append((cond, zero_when))
            site.notes.append("rows zeroed after softmax (safe-softmax guard)")
            return
        if site.fuse_blocker is None:
            site.fuse_blocker = f"probabilities are masked elementwise after the softmax at {a.name(node)}"

    def _derives_isnan(self, cond: Any, y: Any, p: Any) -> bool:
        node, kind = self._producer_kind(cond)
        if kind is Kind.ISNAN:
            src = self._in(node)
            for _ in range(4):
                if src is y or src is p:
                    return True
                n2, k2 = self._producer_kind(src)
                if k2 not in (Kind.CAST, Kind.IDENTITY):
                    return False
                src = self._in(n2)
        return False

    def _pv(self, site: Draft, mm: Any, y: Any, rank: int) -> None:
        a = self.a
        kind = a.kind(mm)
        if kind is Kind.EINSUM:
            eq = str(a.attr(mm, "equation", "")).replace(" ", "")
            parsed = _parse_einsum(eq, 2)
            if parsed is None:
                raise NoMatch(f"einsum {eq!r} at {a.name(mm)} is not P @ V")
            (lp, lv), lo = parsed
            # probabilities laid out [batch..., i, j]
            batch, i, j = lp[:-2], lp[-2], lp[-1]
            e = [c for c in lv if c not in lp]
            if len(e) != 1 or sorted(lv) != sorted(batch + j + e[0]) or sorted(lo) != sorted(batch + i + e[0]):
                raise NoMatch(f"einsum {eq!r} at {a.name(mm)} is not P @ V")
            site.v = Operand(a.inputs(mm)[1], len(lv), perm=_perm_to(lv, batch + j + e[0]))
            canonical = batch + i + e[0]
            site.out_perm = _perm_to(canonical, lo)
            site.out = a.output(mm)
            return
        vv = a.inputs(mm)[1]
        if a.is_static(vv):
            raise NoMatch(f"{a.name(mm)} multiplies the probabilities by a weight, not by V")
        v = self._unglue(vv, rank, gqa=True)
        if v is None:
            raise NoMatch(f"V feeding {a.name(mm)} does not line up with the scores' layout")
        site.v = Operand(v[0], rank, groups=v[1])
        out = a.output(mm)
        if self._rank(out) != rank:
            users = a.users(out)
            if len(users) == 1 and a.kind(users[0]) is Kind.RESHAPE and self._rank(a.output(users[0])) == rank:
                site.nodes.append(users[0])
                out = a.output(users[0])
            else:
                raise NoMatch(f"output of {a.name(mm)} is not reshaped back to the scores' layout")
        site.out = out
        if site.v.groups != site.k.groups and site.k.groups > 1:
            site.notes.append("K and V repeated differently")
