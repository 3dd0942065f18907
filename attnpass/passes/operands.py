"""Finding q, k and v under the glue exporters wrap around them (views, expands, HF's ``repeat_kv``).

A mixin of the matcher: it uses the walker's ``a`` (the adapter) and its small helpers.
"""

from __future__ import annotations

from typing import Any

from attnpass.passes.einsum import _same_tail, _swaps_last_two
from attnpass.passes.kinds import Kind
from attnpass.passes.site import Operand
from attnpass.passes.walk_base import NoMatch, WalkBase


class OperandFinder(WalkBase):
    """Peels glue off matmul operands; GQA repetition becomes ``Operand.groups``."""

    def _qk_operands(self, qv: Any, ktv: Any, rank: int, mm: Any) -> tuple[Operand, Operand, float]:
        """Q and K (or K^T) under their glue, and the constant factor peeled off K.

        Exporters of SDPA pre-scale both Q and K by sqrt(scale); the Mul on K hides HF's ``repeat_kv`` behind it,
        so it is peeled here and its factor returned for the site's scale (Q keeps its own: the op reads it).
        """
        a = self.a
        if a.is_static(qv) or a.is_static(ktv):
            raise NoMatch(f"{a.name(mm)} multiplies by a weight, not Q K^T (e.g. a router or classifier)")
        q = self._unglue(qv, rank, gqa=False)
        kt = self._unglue(ktv, rank, gqa=False)
        if q is None or kt is None:
            raise NoMatch(f"operands of {a.name(mm)} do not line up with the scores' layout")
        ktv, factor = self._peel_const_scale(kt[0])
        kt = self._unglue(ktv, rank, gqa=False) if factor != 1.0 else kt
        if kt is None:
            raise NoMatch(f"K^T feeding {a.name(mm)} does not line up with the scores' layout")
        tnode, tkind = self._producer_kind(kt[0])
        if tkind is Kind.TRANSPOSE and _swaps_last_two(a.attr(tnode, "perm"), rank):
            kv, f2 = self._peel_const_scale(self._in(tnode))
            k = self._unglue(kv, rank, gqa=True)
            if k is None:
                raise NoMatch(f"K feeding {a.name(tnode)} does not line up with the scores' layout")
            return Operand(q[0], rank), Operand(k[0], rank, groups=k[1]), factor * f2
        folded = self._folded_kt(kt[0], rank)
        if folded is not None:
            return Operand(q[0], rank), Operand(folded[0], rank, groups=folded[1]), factor
        return Operand(q[0], rank), Operand(kt[0], rank, transposed=True), factor

    def _folded_kt(self, kt: Any, rank: int) -> tuple[Any, int] | None:
        """K^T transposed with the heads folded into the batch (the dynamo exporter's SDPA decomposition).

        ``reshape(transpose(reshape(K, [B*H, S, D])), [B, H, D, S])``, where K is 4-D or HF's 5-D ``repeat_kv``
        expand: returns K (or the unrepeated K) and its repetition.
        """
        a = self.a
        if rank != 4:
            return None
        n1, k1 = self._producer_kind(kt)
        if k1 is not Kind.RESHAPE:
            return None
        t = self._in(n1)
        n2, k2 = self._producer_kind(t)
        if k2 is not Kind.TRANSPOSE or self._rank(t) != 3 or not _swaps_last_two(a.attr(n2, "perm"), 3):
            return None
        f = self._in(n2)
        n3, k3 = self._producer_kind(f)
        if k3 is not Kind.RESHAPE or self._rank(f) != 3:
            return None
        src = self._in(n3)
        ks, ss = a.shape(kt), a.shape(src)
        if ks is None or ss is None:
            return None
        k_shape = [*ks[:2], ks[3], ks[2]]
        if len(ss) == rank and list(ss) == k_shape:
            return src, 1
        if len(ss) == rank + 1 and ss[0] == ks[0] and isinstance(ss[1], int) and isinstance(ss[2], int) \
                and ss[1] * ss[2] == ks[1]:
            return self._repeat_kv_from(src, k_shape, rank)
        return None

    def _peel_const_scale(self, v: Any) -> tuple[Any, float]:
        """``x * c`` or ``x / c`` with a scalar constant ``c`` that does not broadcast ``x``: ``(x, c or 1/c)``."""
        a = self.a
        total = 1.0
        for _ in range(4):
            node, kind = self._producer_kind(v)
            if kind not in (Kind.MUL, Kind.DIV):
                break
            lhs, rhs = a.inputs(node)[:2]
            c, src = self._const(rhs), lhs
            if c is None and kind is Kind.MUL:
                c, src = self._const(lhs), rhs
            if c is None or c == 0 or a.is_static(src):
                break
            ss, vs = a.shape(src), a.shape(v)
            if ss is None or vs is None or list(ss) != list(vs):
                break
            total *= c if kind is Kind.MUL else 1.0 / c
            v = src
        return v, total

    def _unglue(self, v: Any, rank: int, gqa: bool) -> tuple[Any, int] | None:
        """Peel the reshapes/expands a matmul decomposition or ``repeat_kv`` wraps around an operand."""
        a = self.a
        for _ in range(16):
            node, kind = self._producer_kind(v)
            r = self._rank(v)
            if kind is Kind.IDENTITY:
                v = self._in(node)
                continue
            if r != rank and kind in (Kind.RESHAPE, Kind.EXPAND):
                src = self._in(node)
                if _same_tail(a.shape(src), a.shape(v)) and (kind is Kind.RESHAPE or self._rank(src) == r):
                    v = src
                    continue
            if r == rank and kind is Kind.EXPAND and self._rank(self._in(node)) == rank:
                src = self._in(node)
                ss, vs = a.shape(src), a.shape(v)
                if ss is not None and vs is not None and ss[-2:] == vs[-2:] and all(x == y or x == 1 for x, y in zip(ss, vs)):
                    if not gqa and ss[:-2] != vs[:-2]:
                        # a broadcast of q over heads or batch is fine: the op broadcasts too
                        pass
                    v = src
                    continue
            break
        if self._rank(v) != rank:
            return None
        groups = 1
        if not gqa:
            return v, groups
        for _ in range(8):
            node, kind = self._producer_kind(v)
            if kind is Kind.IDENTITY:
                v = self._in(node)
                continue
            if kind is Kind.REPEAT_INTERLEAVE and self._axis(a.attr(node, "dim"), rank) == rank - 3:
                reps = a.attr(node, "repeats")
                if isinstance(reps, int) and reps > 0:
                    groups *= reps
                    v = self._in(node)
                    continue
            if kind is Kind.RESHAPE and rank >= 3:
                got = self._repeat_kv(v, node, rank)
                if got is not None:
                    v, g = got
                    groups *= g
                    continue
            break
        return v, groups

    def _repeat_kv(self, v: Any, node: Any, rank: int) -> tuple[Any, int] | None:
        """``x[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv*G, S, D)``: HF's ``repeat_kv``."""
        return self._repeat_kv_from(self._in(node), self.a.shape(v), rank)

    def _repeat_kv_from(self, src: Any, vs: Any, rank: int) -> tuple[Any, int] | None:
        """``src`` is the 5-D expand of ``repeat_kv`` whose 4-D result has shape ``vs``: (unrepeated K or V, groups)."""
        a = self.a
        ss = a.shape(src)
        if ss is None or vs is None or len(ss) != rank + 1 or list(ss[-2:]) != list(vs[-2:]):
            return None
        enode, ekind = self._producer_kind(src)
        if ekind is not Kind.EXPAND:
            return None
        pre = self._in(enode)
        ps = a.shape(pre)
        if ps is None or len(ps) != rank + 1 or ps[-3] != 1:
            return None
        g = ss[-3]
        if not isinstance(g, int):
            return None
        unode, ukind = self._producer_kind(pre)
        if ukind is Kind.UNSQUEEZE and self._axis(a.attr(unode, "dim"), rank + 1) == rank - 2:
            base = self._in(unode)
        elif ukind is Kind.RESHAPE:
            base = self._in(unode)
        else:
            return None
        bs = a.shape(base)
        if bs is None or len(bs) != rank or list(bs[-2:]) != list(vs[-2:]):
            return None
        return base, g

    @staticmethod
    def _axis(dim: Any, rank: int) -> int | None:
        return None if not isinstance(dim, int) else dim % rank

