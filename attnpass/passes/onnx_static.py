"""Constant-only values of an ONNX graph: which values are fixed before the model runs, and their data.

The TorchScript exporter, given static input lengths, spells a causal mask as a small subgraph over constants
and ``Shape`` of inputs whose shapes are fixed (``Where(Equal(Trilu(Expand(1, Concat(Slice(Shape(q)),
...))), 0), -inf, 0)``, or a ``LessOrEqual`` of two arange constants): nothing in it depends on the data,
so the matcher may prove causality from its values. Those values are computed here, node by node, with
onnx's reference implementation of each op, within a size limit (a mask is ``S x S``, a weight can be huge).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from attnpass.passes.onnx import OnnxAdapter

#: Ops whose output may be much larger than their inputs: their size is checked before they run.
_GROWING = {"Expand", "ConstantOfShape", "Tile", "Range"}


def static_shape(ad: OnnxAdapter, value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of ``value`` when every dim is a number (then ``Shape`` of it is a constant)."""
    s = ad.shape(value) if value is not None else None
    return None if s is None or not all(isinstance(d, int) for d in s) else tuple(int(d) for d in s)  # type: ignore[arg-type]


def _shape_is_constant(ad: OnnxAdapter, node: ir.Node) -> bool:
    return node.op_type == "Shape" and node.domain in ("", "ai.onnx") and static_shape(ad, node.inputs[0]) is not None


def is_static(ad: OnnxAdapter, value: Any, memo: dict[int, bool]) -> bool:
    """True if ``value`` is computed from initializers, constants and fixed shapes only (never an activation).

    Every value visited is memoised (post-order), so asking about each layer of a deep model stays linear in
    its size instead of re-walking the residual stream once per layer.
    """
    if not isinstance(value, ir.Value):
        return True
    visiting: set[int] = set()
    stack: list[tuple[ir.Value, bool]] = [(value, False)]
    while stack:
        v, expanded = stack.pop()
        key = id(v)
        if key in memo:
            continue
        if v.const_value is not None:
            memo[key] = True
            continue
        p = v.producer()
        if p is None or p.op_type == "Shape":
            # a graph / function input, or the shape of a value: a constant only when that shape is fixed
            memo[key] = p is not None and _shape_is_constant(ad, p)
            continue
        ins = [i for i in p.inputs if i is not None]
        if expanded or any(memo.get(id(i)) is False for i in ins):
            memo[key] = all(memo.get(id(i), False) for i in ins)
            visiting.discard(key)
            continue
        if key in visiting:  # a cycle: not computable from constants
            memo[key] = False
            continue
        visiting.add(key)
        stack.append((v, True))
        stack.extend((i, False) for i in ins if id(i) not in memo)
    return memo[id(value)]


def evaluate(ad: OnnxAdapter, value: ir.Value, limit: int, memo: dict[int, np.ndarray | None]) -> np.ndarray | None:
    """The data of a constant-only ``value`` (see ``is_static``), or None if it or any step exceeds ``limit`` elements."""
    order = _post_order(value)
    if order is None:
        return None
    for v in order:
        if id(v) not in memo:
            memo[id(v)] = _value_of(ad, v, limit, memo)
        if memo[id(v)] is None:
            return None
    got = memo[id(value)]
    return got if got is not None and got.size <= limit else None


def _post_order(value: ir.Value) -> list[ir.Value] | None:
    """The values ``value`` is computed from, each after its inputs (None on a cycle or a too-deep subgraph)."""
    order: list[ir.Value] = []
    seen: set[int] = set()
    stack: list[tuple[ir.Value, bool]] = [(value, False)]
    while stack:
        v, done = stack.pop()
        if done:
            order.append(v)
            continue
        if id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > 512:
            return None
        stack.append((v, True))
        p = v.producer()
        if v.const_value is None and p is not None and p.op_type not in ("Shape", "Constant"):
            stack.extend((i, False) for i in p.inputs if i is not None and id(i) not in seen)
    return order


def _value_of(ad: OnnxAdapter, v: ir.Value, limit: int, memo: dict[int, np.ndarray | None]) -> np.ndarray | None:
    known = static_shape(ad, v)
    if known is not None and math.prod(known) > limit:
        return None  # never load a weight (possibly external data) only to find it too large
    t = ad._tensor(v)
    if t is not None:
        return t if t.size <= limit else None
    p = v.producer()
    if p is None or p.domain not in ("", "ai.onnx") or p.op_type in ("If", "Loop", "Scan"):
        return None
    if p.op_type == "Shape":
        s = static_shape(ad, p.inputs[0])
        if s is None:
            return None
        start, end = (p.attributes.get(k) for k in ("start", "end"))
        return np.array(s[start.value if start else 0:end.value if end else None], dtype=np.int64)
    ins = [None if i is None else memo.get(id(i)) for i in p.inputs]
    if any(i is not None and x is None for i, x in zip(p.inputs, ins)):
        return None
    if p.op_type in _GROWING and _grown_size(p.op_type, ins) > limit:
        return None
    from onnx.reference import ReferenceEvaluator  # heavy: imported only when a subgraph is evaluated

    try:
        proto = ir.serde.serialize_node(p)
        feeds = {name: x for name, x in zip(proto.input, ins) if name}
        outs = ReferenceEvaluator(proto, opsets={"": ad.opset}).run(None, feeds)
    except Exception:  # noqa: BLE001 - an op the reference cannot run leaves the value unknown
        return None
    out = np.asarray(outs[list(p.outputs).index(v)])
    return out if out.size <= limit else None


def _grown_size(op: str, ins: list[np.ndarray | None]) -> float:
    """Elements an ``Expand`` / ``ConstantOfShape`` / ``Tile`` / ``Range`` will produce (inf when not computable)."""
    try:
        if op == "ConstantOfShape":
            return float(math.prod(int(d) for d in ins[0].reshape(-1)))  # type: ignore[union-attr]
        if op == "Expand":
            target = tuple(int(d) for d in ins[1].reshape(-1))  # type: ignore[union-attr]
            return float(math.prod(np.broadcast_shapes(ins[0].shape, target)))  # type: ignore[union-attr]
        if op == "Tile":
            return float(ins[0].size * math.prod(int(r) for r in ins[1].reshape(-1)))  # type: ignore[union-attr]
        start, end, step = (float(x.reshape(-1)[0]) for x in ins[:3])  # type: ignore[union-attr]
        return max(0.0, math.ceil((end - start) / step)) if step else math.inf
    except (ValueError, TypeError, AttributeError, IndexError):
        return math.inf
