"""Proofs about masks, from how they were built: causal structure, all-true fills, hard mask vs bias.

A mixin of the matcher; rewrites' key counting (``plan.py``) asks the same proofs on mask factors.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from attnpass.passes.kinds import Kind
from attnpass.passes.site import MaskKind, MaskRole, MaskTerm
from attnpass.passes.walk_base import WalkBase
from attnpass.semantics import MASKED_BELOW

_MASK_FILL_LIMIT = MASKED_BELOW


class MaskProofs(WalkBase):
    """Causal / all-true / hard-or-bias proofs through the adapter (no IR code here)."""

    def proves_causal(self, v: Any, attend_when: bool = True) -> bool:
        """True if bool ``v`` (attendable where it equals ``attend_when``) is exactly ``key <= query``.

        Rewrites use it on the factors of a mask to count keys per row without materialising the mask.
        """
        causal, only = self._causal_bool(v, attend_when, 0)
        return causal and only

    def all_true(self, v: Any) -> bool:
        """True if ``v`` is a constant (or a fill/expand of one) that is non-zero everywhere."""
        return self._all_true(v)

    def _classify_mask(self, term: MaskTerm) -> MaskTerm:
        """The term with what its construction proves: causal (or containing it), and hard mask vs bias."""
        if term.kind == MaskKind.BOOL:
            causal, only = self._causal_bool(term.value, term.attend_when, 0)
        else:
            causal, only = self._causal_additive(term.value, 0)
        if not causal:
            causal = only = self._causal_by_value(term.value, term.kind, term.attend_when, term.coeff)
        return replace(term, causal=causal, only_causal=only, role=self._role(term))

    def _role(self, term: MaskTerm) -> MaskRole:
        """``HARD`` when every entry is 0 or masks the key (after ``coeff``): nothing for SSMax to scale.

        Asked once, here, through the adapter: a constant, a constant-only value, or a
        ``where(cond, 0, very negative)`` seen through casts and broadcasts.
        """
        if term.kind == MaskKind.BOOL:
            return MaskRole.HARD
        if term.coeff <= 0:
            return MaskRole.BIAS
        c = self._const(term.value)
        if c is not None:
            return MaskRole.HARD if c == 0 or c * term.coeff <= MASKED_BELOW else MaskRole.BIAS
        v = term.value
        for _ in range(8):
            node, kind = self._producer_kind(v)
            if kind in (Kind.CAST, Kind.IDENTITY, Kind.EXPAND, Kind.RESHAPE, Kind.UNSQUEEZE):
                v = self._in(node)
                continue
            if kind is Kind.WHERE:
                ca, cb = (self._const(x) for x in self.a.inputs(node)[1:3])
                if (ca == 0 and cb is not None and cb * term.coeff <= MASKED_BELOW) or (
                        cb == 0 and ca is not None and ca * term.coeff <= MASKED_BELOW):
                    return MaskRole.HARD
            break
        if self.a.is_static(term.value):
            value = self.a.static_value(term.value)
            if value is not None and bool(((value == 0) | (value * term.coeff <= MASKED_BELOW)).all()):
                return MaskRole.HARD
        return MaskRole.BIAS

    def _causal_by_value(self, v: Any, kind: str, attend_when: bool = True, coeff: float = 1.0) -> bool:
        """A constant mask (a ``tril`` buffer sliced to the sequence) is causal if its values say so."""
        if not self.a.is_static(v):
            return False
        value = self.a.static_value(v)
        if value is None or value.ndim < 2 or value.shape[-1] != value.shape[-2]:
            return False
        if kind == MaskKind.BOOL:
            allowed = value.astype(bool) == attend_when
        else:
            allowed = value * coeff > MASKED_BELOW
        n = value.shape[-1]
        rows = np.arange(n)[:, None]
        return bool((allowed.reshape(-1, n, n) == (np.arange(n)[None, :] <= rows)).all())

    def _causal_additive(self, v: Any, depth: int) -> tuple[bool, bool]:
        a = self.a
        if depth > 24:
            return False, False
        node, kind = self._producer_kind(v)
        if kind in (Kind.CAST, Kind.IDENTITY, Kind.EXPAND, Kind.UNSQUEEZE, Kind.RESHAPE):
            return self._causal_additive(self._in(node), depth + 1)
        if kind is Kind.WHERE:
            cond, xa, xb = a.inputs(node)[:3]
            ca, cb = self._const(xa), self._const(xb)
            if ca == 0 and cb is not None and cb <= _MASK_FILL_LIMIT:
                return self._causal_bool(cond, True, depth + 1)
            if cb == 0 and ca is not None and ca <= _MASK_FILL_LIMIT:
                return self._causal_bool(cond, False, depth + 1)
            return False, False
        if kind is Kind.TRIU:
            fill = self._fill_value(self._in(node))
            if fill is not None and fill <= _MASK_FILL_LIMIT and a.attr(node, "diagonal", 0) == 1:
                return True, True
        if kind is Kind.ADD:
            lhs, rhs = a.inputs(node)[:2]
            c1, _ = self._causal_additive(lhs, depth + 1)
            c2, _ = self._causal_additive(rhs, depth + 1)
            return c1 or c2, False
        return False, False

    def _fill_value(self, v: Any) -> float | None:
        c = self._const(v)
        if c is not None:
            return c
        node, kind = self._producer_kind(v)
        if kind is Kind.CONSTANT:
            return self.a.attr(node, "fill")
        return None

    def _causal_bool(self, v: Any, attend_when: bool, depth: int) -> tuple[bool, bool]:
        """(contains causal, is exactly causal) for a bool tensor whose ``attend_when`` entries attend."""
        a = self.a
        if depth > 24:
            return False, False
        node, kind = self._producer_kind(v)
        if kind in (Kind.CAST, Kind.IDENTITY, Kind.EXPAND, Kind.UNSQUEEZE, Kind.RESHAPE):
            return self._causal_bool(self._in(node), attend_when, depth + 1)
        if kind is Kind.NOT:
            return self._causal_bool(self._in(node), not attend_when, depth + 1)
        if kind is Kind.AND and attend_when:
            parts = [self._causal_bool(x, True, depth + 1) for x in a.inputs(node)[:2]]
            trivially = [self._all_true(x) for x in a.inputs(node)[:2]]
            causal = any(p[0] for p in parts)
            only = all(p[1] or t for p, t in zip(parts, trivially)) and causal
            return causal, only
        if kind is Kind.OR and not attend_when:
            parts = [self._causal_bool(x, False, depth + 1) for x in a.inputs(node)[:2]]
            causal = any(p[0] for p in parts)
            return causal, all(p[1] for p in parts) and causal
        if kind is Kind.TRIL and attend_when and a.attr(node, "diagonal", 0) == 0 and self._all_true(self._in(node)):
            return True, True
        if kind is Kind.TRIU and not attend_when and a.attr(node, "diagonal", 0) == 1 and self._all_true(self._in(node)):
            return True, True
        if kind is Kind.COMPARE:
            op = a.attr(node, "op")
            lhs, rhs = a.inputs(node)[:2]
            if not attend_when:
                op = {"le": "gt", "lt": "ge", "ge": "lt", "gt": "le"}.get(op)
            # attend iff key <= query  (or query >= key; or key < query + 1)
            if op in ("le", "ge", "lt", "gt"):
                key_side, query_side = (lhs, rhs) if op in ("le", "lt") else (rhs, lhs)
                kidx, qidx = self._index_along(key_side, -1), self._index_along(query_side, -2)
                if kidx is not None and qidx is not None:
                    koff, qoff = kidx, qidx
                    strict = op in ("lt", "gt")
                    if isinstance(koff, int | float) and isinstance(qoff, int | float):
                        if qoff - koff == (1 if strict else 0):
                            return True, True
        if self._causal_by_value(v, "bool", attend_when):
            return True, True
        return False, False

    def _all_true(self, v: Any) -> bool:
        node, kind = self._producer_kind(v)
        c = self._const(v)
        if c is not None:
            return c != 0
        if kind is Kind.CONSTANT:
            f = self.a.attr(node, "fill")
            return f is not None and f != 0
        if kind in (Kind.CAST, Kind.IDENTITY, Kind.EXPAND):
            return self._all_true(self._in(node))
        return False

    def _index_along(self, v: Any, axis: int) -> float | None:
        """If ``v`` is ``arange(S) + offset`` laid out along ``axis`` (other dims 1), return the offset."""
        a = self.a
        s = a.shape(v)
        if s is None or len(s) < 2:
            return None
        other = [d for i, d in enumerate(s) if i != len(s) + axis]
        if any(d != 1 for d in other):
            return None
        offset = 0.0
        for _ in range(16):
            node, kind = self._producer_kind(v)
            if kind in (Kind.UNSQUEEZE, Kind.RESHAPE, Kind.CAST, Kind.IDENTITY, Kind.EXPAND):
                v = self._in(node)
                continue
            if kind in (Kind.ADD, Kind.SUB):
                lhs, rhs = a.inputs(node)[:2]
                c = self._const(rhs)
                if c is None:
                    return None
                offset += c if kind is Kind.ADD else -c
                v = lhs
                continue
            if kind is Kind.ARANGE:
                start = a.attr(node, "start", 0)
                if not isinstance(start, int | float):
                    return None
                return offset + start
            start = self._arange_literal(v, s[axis])
            return None if start is None else offset + start
        return None

    def _arange_literal(self, v: Any, n: Any) -> float | None:
        """The start of a constant that holds ``start, start + 1, ...`` (``n`` of them): an ``arange`` an exporter folded
        (the TorchScript exporter leaves GPT-2's as literals).  Read in ``O(n)``, where proving the mask by value
        evaluates ``n x n`` elements (and gives up past the evaluator's budget)."""
        if not isinstance(n, int) or n < 1 or not self.a.is_static(v):
            return None
        value = self.a.static_value(v)
        if value is None or value.size != n:
            return None
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
        return float(flat[0]) if np.array_equal(flat - flat[0], np.arange(n)) else None
