"""Pure layout helpers of the walker: einsum equations, permutations and shape tails."""

from __future__ import annotations

from collections.abc import Sequence

from attnpass.passes.site import Dim


def _same_tail(a: Sequence[Dim] | None, b: Sequence[Dim] | None) -> bool:
    return a is not None and b is not None and len(a) >= 2 and len(b) >= 2 and tuple(a[-2:]) == tuple(b[-2:])


def _swaps_last_two(perm: Sequence[int] | None, rank: int) -> bool:
    if perm is None or len(perm) != rank:
        return False
    want = list(range(rank))
    want[-1], want[-2] = want[-2], want[-1]
    return [p % rank for p in perm] == want


def _parse_einsum(eq: str, n: int) -> tuple[list[str], str] | None:
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != n or not all(p.isalpha() for p in parts) or not (out.isalpha() or out == ""):
        return None
    return parts, out


def _perm_to(src: str, dst: str) -> tuple[int, ...] | None:
    """Permutation p with ``x.permute(p)`` turning layout ``src`` into ``dst`` (None if identity)."""
    if sorted(src) != sorted(dst):
        return None
    p = tuple(src.index(c) for c in dst)
    return None if p == tuple(range(len(src))) else p


def _permuted(shape: Sequence[Dim], perm: tuple[int, ...] | None) -> tuple[Dim, ...]:
    return tuple(shape) if perm is None else tuple(shape[i] for i in perm)


__all__ = ["_same_tail", "_swaps_last_two", "_parse_einsum", "_perm_to", "_permuted"]
