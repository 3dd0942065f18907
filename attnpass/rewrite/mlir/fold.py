"""Sizes the ONNX import leaves dynamic although the model fixes them: an ``arange`` over a length read from a
constant shape.

The ONNX ``Attention`` function body builds its causal mask from ``Range(0, Gather(Shape(Q), -2))``.  onnx's shape
inference turns ``Shape(Q)`` into a literal, but torch-mlir folds neither ``index_select`` of that literal nor the
``item`` read of the result, so ``arange`` (and after it the mask, the scores and the attention output) carries a
``?`` query dim, which the fused rewrite cannot size (the expanded ``attention_4d_gqa_causal_nonpad_decode``).
Each such ``arange`` whose bounds evaluate from constants (``passes/mlir_values``) is replaced by its literal; the
import's shape passes, run again, then carry the static sizes to every value computed from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnpass.passes.mlir import MlirAdapter, public_funcs
from attnpass.passes.mlir_values import Evaluator

#: The longest ``arange`` written as a literal (a mask's row or key indices).
LIMIT = 1 << 16
_INTS = ("si64", "si32")


def _bounds(ev: Evaluator, node: Any) -> tuple[int, int, int] | None:
    """``(start, end, step)`` of ``arange`` / ``arange.start`` / ``arange.start_step`` when constant."""
    n = {"start": 2, "start_step": 3}.get(node.overload, 1)
    got = [ev.scalar(o) for o in node.operands[:n]]
    if any(not isinstance(x, int) or isinstance(x, bool) for x in got):
        return None
    start, end, step = (0, got[0], 1) if n == 1 else (got[0], got[1], got[2] if n == 3 else 1)
    return (start, end, step) if step else None


def fold_static_aranges(module: Any) -> int:
    """Replace every dynamic-length integer ``arange`` with constant bounds by a ``torch.vtensor.literal``, in
    place; returns how many were replaced (then the shape passes must run again)."""
    from torch_mlir import ir

    folded = 0
    for func in public_funcs(module):
        adapter = MlirAdapter(func)
        ev = Evaluator(adapter, LIMIT)
        for node in adapter.node_list:
            res = node.results[0] if node.aten == "arange" and len(node.results) == 1 else None
            if res is None or res.shape is None or len(res.shape) != 1 or res.shape[0] is not None or res.dtype not in _INTS:
                continue
            bounds = _bounds(ev, node)
            values = np.arange(*bounds) if bounds is not None else None
            if values is None or not 0 < values.size <= LIMIT:
                continue
            with module.context:
                attr = ir.Attribute.parse(f"dense<[{', '.join(map(str, values.tolist()))}]> : "
                                          f"tensor<{values.size}x{res.dtype}>")
                lit = ir.Operation.create("torch.vtensor.literal", results=[ir.Type.parse(f"!torch.vtensor<[{values.size}],"
                                                                                           f"{res.dtype}>")],
                                          attributes={"value": attr}, loc=ir.Location.unknown(), ip=ir.InsertionPoint(node.op))
            res.value.replace_all_uses_with(lit.result)
            node.op.erase()
            folded += 1
    return folded


__all__ = ["fold_static_aranges", "LIMIT"]
