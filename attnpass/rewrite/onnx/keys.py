"""``n`` (keys per row) and "attendable" in ONNX ops, translated from a plan's ``KeyPlan`` and keep terms.

Which factors there are and how each is counted was decided in ``passes/plan.py``; this module only
spells it: a reduction for key-only factors, a ``Range`` for a proven causal factor, a ``CumSum`` read
at ``i`` for both together, a reduction on a factor's own (unbroadcast) shape for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from attnpass import semantics
from attnpass.passes.plan import FactorClass, KeepTerm, KeyPlan
from attnpass.passes.site import MaskKind
from attnpass.rewrite.onnx.builder import _and_all, _Builder, lay_out

#: What the note says for each ``KeyPlan.method``.
HOW = {"length": "key length (no mask)", "keys": "key-only mask factor", "causal": "causal structure (Range)",
       "causal+keys": "cumulative sum of the key-only mask factor under the causal structure",
       "mask": "mask at its own (unbroadcast) shape", "full": "mask broadcast to the scores (rank unknown)"}


def keep(b: _Builder, t: KeepTerm) -> ir.Value:
    """Bool, True where ``t`` leaves a key attendable."""
    if t.kind is MaskKind.BOOL:
        v = lay_out(b, t.value, t.view)
        if v.dtype not in (None, ir.DataType.BOOL):
            v = b.op("Cast", [v], {"to": ir.DataType.BOOL})
        return v if t.attend_when else b.op("Not", [v])
    v = lay_out(b, t.value, t.view)
    x = v if t.coeff == 1.0 else b.op("Mul", [v, b.scalar_like(t.coeff, v)])
    return b.op("Greater", [x, b.scalar_like(semantics.MASKED_BELOW, x)])


def causal_bool(b: _Builder, sq: ir.Value, sk: ir.Value) -> ir.Value:
    """``[S_q, S_k]`` bool of a top-left ``is_causal``: built only where a factor forces a joint count."""
    i = b.op("Unsqueeze", [b.op("Range", [b.const(0, np.int64), sq, b.const(1, np.int64)]), b.ints(-1)])
    j = b.op("Range", [b.const(0, np.int64), sk, b.const(1, np.int64)])
    return b.op("LessOrEqual", [j, i])


def allowed(b: _Builder, terms: Sequence[KeepTerm]) -> ir.Value | None:
    """Bool, broadcastable to the scores: True where every term keeps the key (None: everywhere)."""
    return _and_all(b, [keep(b, t) for t in terms])


def count(b: _Builder, kp: KeyPlan, sq: ir.Value, sk: ir.Value, full_shape: ir.Value) -> tuple[ir.Value, str]:
    """``(n, how)``: float32 keys per row, broadcastable to ``[..., S_q, 1]``.

    ``sq``/``sk`` are int64 scalars; ``full_shape`` is the scores' shape (used only when a factor's
    rank is unknown, the one case that counts on the broadcast tensor).
    """
    n = _count(b, kp, sq, sk, full_shape)
    flags = _and_all(b, [keep(b, f.keep) for f in kp.of(FactorClass.ROW)])
    if flags is not None:  # a per-row flag (``query >= 0`` in HF's padding masks): all keys or none
        n = b.op("Mul", [n, b.op("Cast", [flags], {"to": ir.DataType.FLOAT})])
    return n, kp.method


def _count(b: _Builder, kp: KeyPlan, sq: ir.Value, sk: ir.Value, full_shape: ir.Value) -> ir.Value:
    causal, keys, general = kp.of(FactorClass.CAUSAL), kp.of(FactorClass.KEYS), kp.of(FactorClass.GENERAL)
    sk1 = b.op("Unsqueeze", [sk, b.ints(0)])
    if general:
        parts = [keep(b, f.keep) for f in general + keys + causal]
        if kp.causal_op:
            parts.append(causal_bool(b, sq, sk))
        g = _and_all(b, parts)
        if kp.method == "full":
            target = full_shape
        else:
            r = max([f.rank or 0 for f in general + keys + causal] + ([2] if kp.causal_op else []))
            target = b.op("Concat", [b.ints(*([1] * (r - 1))), sk1], {"axis": 0}) if r > 1 else sk1
        full = b.op("Expand", [g, target])
        return b.op("ReduceSum", [b.op("Cast", [full], {"to": ir.DataType.FLOAT}), b.ints(-1)], {"keepdims": 1})
    p = _and_all(b, [keep(b, f.keep) for f in keys])
    if p is not None:
        r = max(f.rank or 0 for f in keys)
        if r < 2:  # ``[S_k]`` or a scalar: give it a query axis of 1 to squeeze after the gather
            p, r = b.op("Reshape", [p, b.ints(1, -1)]), 2
        pf = b.op("Cast", [b.op("Expand", [p, b.op("Concat", [b.ints(*([1] * (r - 1))), sk1], {"axis": 0})])], {"to": ir.DataType.FLOAT})
    if not causal and not kp.causal_op:
        if p is None:
            return b.op("Cast", [sk1], {"to": ir.DataType.FLOAT})
        return b.op("ReduceSum", [pf, b.ints(-1)], {"keepdims": 1})
    last = b.op("Unsqueeze", [b.op("Range", [b.const(0, np.int64), sq, b.const(1, np.int64)]), b.ints(-1)])  # [S_q, 1]
    if p is None:  # the last attendable key of row i is i
        n = b.op("Min", [b.op("Max", [b.op("Add", [last, b.ints(1)]), b.ints(0)]), sk1])
        return b.op("Cast", [n], {"to": ir.DataType.FLOAT})
    idx = b.op("Max", [b.op("Min", [last, b.op("Sub", [sk1, b.ints(1)])]), b.ints(0)])
    c = b.op("CumSum", [pf, b.const(-1, np.int64)])
    return b.op("Squeeze", [b.op("Gather", [c, idx], {"axis": -1}), b.ints(-3)])  # [..., 1, S_q, 1] -> [..., S_q, 1]
