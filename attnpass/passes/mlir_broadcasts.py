"""torch-dialect spellings of a broadcast that the MLIR adapter presents as the matcher's ``EXPAND``.

HF ``repeat_kv`` and ``repeat_interleave`` repeat K/V heads as ``unsqueeze -> expand -> reshape``.  torch-mlir's
import of the ATen graph copies the expand before the reshape (``clone``), and the ONNX path spells the expand as
``Tile`` (``aten.tile``) of the unsqueezed size-1 axis.  Both are the expand's values, so the adapter answers with
the expand: the matcher then reads the K/V repetition (GQA) as it does in torch.fx.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def materialized_expand(v: Any) -> Any | None:
    """The ``expand`` result that ``v = clone(expand(...))`` copies; None for anything else."""
    p = v.producer
    if p is None or p.aten != "clone" or not p.operands:
        return None
    src = p.operands[0].producer
    return p.operands[0] if src is not None and src.aten == "expand" else None


def is_broadcast_tile(node: Any, ints: Callable[[Any], list[int] | None]) -> bool:
    """``tile``/``repeat`` that repeats only size-1 axes (same rank): a broadcast, the values of an ``expand``."""
    if node.aten not in ("tile", "repeat") or len(node.operands) < 2:
        return False
    shape, reps = node.operands[0].shape, ints(node.operands[1])
    if shape is None or reps is None or len(reps) != len(shape):
        return False
    return all(r == 1 or d == 1 for d, r in zip(shape, reps))


__all__ = ["is_broadcast_tile", "materialized_expand"]
