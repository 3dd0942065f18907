"""The matcher's vocabulary: canonical op kinds, and the questions it asks an IR (``Adapter``).

Kept apart from the walker so that the proofs (``masks.py``), the plan (``plan.py``) and the adapters
can share it without importing the walker.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from attnpass.passes.site import Dim


class Kind(enum.Enum):
    """Canonical op kinds. Adapters map their IR's ops onto these (operands in canonical order)."""

    MATMUL = "matmul"  # inputs: a, b   (a @ b with batch broadcasting; bmm too)
    EINSUM = "einsum"  # inputs: operands; attr "equation"
    BADDBMM = "baddbmm"  # inputs: bias, a, b; attrs "beta", "alpha"
    SOFTMAX = "softmax"  # inputs: x; attr "axis"
    SDPA = "sdpa"  # inputs: q, k, v, mask|None; attrs is_causal, scale, enable_gqa, dropout_p
    MUL = "mul"
    DIV = "div"
    ADD = "add"  # inputs: a, b (alpha already folded into b by the adapter, or refused)
    SUB = "sub"
    WHERE = "where"  # inputs: cond, x, y   (masked_fill(x, c, v) is WHERE(c, v, x))
    CAST = "cast"
    IDENTITY = "identity"  # clone, contiguous, alias, detach, to(same dtype)
    TRANSPOSE = "transpose"  # attr "perm" (full permutation)
    RESHAPE = "reshape"
    EXPAND = "expand"
    UNSQUEEZE = "unsqueeze"  # attr "dim"
    REPEAT_INTERLEAVE = "repeat_interleave"  # attrs "repeats", "dim"
    DROPOUT = "dropout"  # attrs "p", "train" (True / False / None = unknown)
    TANH = "tanh"
    ISNAN = "isnan"
    NOT = "not"
    AND = "and"
    OR = "or"
    COMPARE = "compare"  # attr "op" in {"le", "lt", "ge", "gt", "eq", "ne"}
    ARANGE = "arange"
    TRIL = "tril"  # attr "diagonal"
    TRIU = "triu"  # attr "diagonal"
    CONSTANT = "constant"
    LOG = "log"  # position-dependent query scaling (passes/relatives.py) reads these three
    LOG1P = "log1p"
    FLOOR = "floor"
    SLICE = "slice"  # a position table (Qwen-1's logn_tensor) sliced to the sequence
    OTHER = "other"


class Adapter(Protocol):
    """What the matcher asks of an IR.  ``Node`` and ``Value`` are the IR's own objects.

    For IRs where a node is its own output (torch.fx), ``output(n)`` is ``n`` and
    ``producer(v)`` is ``v`` when ``v`` is a node.
    """

    def nodes(self) -> Iterable[Any]: ...

    def kind(self, node: Any) -> Kind: ...

    def inputs(self, node: Any) -> list[Any]: ...

    def output(self, node: Any) -> Any: ...

    def producer(self, value: Any) -> Any | None: ...

    def users(self, value: Any) -> list[Any]: ...

    def is_graph_output(self, value: Any) -> bool: ...

    def constant(self, value: Any) -> float | None: ...

    def attr(self, node: Any, name: str, default: Any = None) -> Any: ...

    def shape(self, value: Any) -> tuple[Dim, ...] | None: ...

    def is_static(self, value: Any) -> bool: ...

    def name(self, node: Any) -> str: ...

    def static_value(self, value: Any) -> Any | None:
        """A numpy array for a value computed from constants only (a mask buffer), else None."""
        ...


__all__ = ["Kind", "Adapter", "Dim", "canonical_product", "divide_product"]


def canonical_product(*parts: str | int) -> str:
    """A symbolic size ``a*b*...`` with the numbers multiplied first and the symbols sorted, so equal products
    compare equal (an IR's named sizes, e.g. MLIR's ``3*%arg3[0]``)."""
    num, syms = _factors(parts)
    if not syms:
        return str(num)
    return "*".join(([str(num)] if num != 1 else []) + sorted(syms))


def _factors(parts: Sequence[str | int]) -> tuple[int, list[str]]:
    num, syms = 1, []
    for part in parts:
        for f in str(part).split("*"):
            if f.lstrip("-").isdigit():
                num *= int(f)
            else:
                syms.append(f)
    return num, syms


def divide_product(whole: Sequence[str | int], part: Sequence[str | int]) -> str | None:
    """``prod(whole) / prod(part)`` as a canonical product, when it divides exactly (None otherwise): a view's
    ``-1`` from its source's sizes."""
    num, syms = _factors(whole)
    den, dsyms = _factors(part)
    for d in dsyms:
        if d not in syms:
            return None
        syms.remove(d)
    if den <= 0 or num % den:
        return None
    return canonical_product(num // den, *syms)
