"""The ONNX emitters' small tools: a node tape inserted before an anchor, and the glue they all use."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from attnpass.passes.site import AttentionSite, Dim
from attnpass.spec import Param, per_head


class _Builder:
    """Collects new nodes (named after the site) and inserts them before one anchor node, in order."""

    def __init__(self, anchor: ir.Node, prefix: str):
        self.anchor = anchor
        self.prefix = prefix
        self.tape = ir.tape.Tape()
        self.count = 0

    def op(self, op_type: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None, domain: str = "") -> ir.Value:
        self.count += 1
        return self.tape.op(op_type, inputs, attrs, domain=domain, name=f"{self.prefix}/{op_type}_{self.count}")

    def const(self, array: Any, dtype: Any = None) -> ir.Value:
        arr = np.asarray(array, dtype=dtype)
        return self.op("Constant", [], {"value": ir.tensor(arr, name=f"{self.prefix}/c{self.count}")})

    def ints(self, *xs: int) -> ir.Value:
        return self.const(list(xs), np.int64)

    def scalar_like(self, x: float, like: ir.Value) -> ir.Value:
        return self.op("CastLike", [self.const(x, np.float32), like])

    def commit(self) -> None:
        graph = self.anchor.graph
        assert graph is not None
        graph.insert_before(self.anchor, list(self.tape.nodes))


def _float_min(v: ir.Value) -> float:
    dt = v.dtype
    try:
        return float(np.finfo(dt.numpy()).min) if dt is not None else float(np.finfo(np.float32).min)
    except (TypeError, ValueError):
        return float(np.finfo(np.float32).min)


def _to_float(b: _Builder, v: ir.Value) -> ir.Value:
    return v if v.dtype == ir.DataType.FLOAT else b.op("Cast", [v], {"to": ir.DataType.FLOAT})


def _size(b: _Builder, x: ir.Value, axis: int) -> ir.Value:
    """``x.shape[axis]`` as an int64 scalar."""
    end = {"end": axis + 1} if axis != -1 else {}
    return b.op("Squeeze", [b.op("Shape", [x], {"start": axis, **end}), b.ints(0)])


def _and_all(b: _Builder, parts: list[ir.Value]) -> ir.Value | None:
    out = parts[0] if parts else None
    for p in parts[1:]:
        out = b.op("And", [out, p])
    return out


def _scores_shape(b: _Builder, q4: ir.Value, k4: ir.Value) -> ir.Value:
    """``[B, H, S_q, S_k]`` of 4-D Q and K (K in ``[B, H_kv, S_k, D]``)."""
    return b.op("Concat", [b.op("Shape", [q4], {"start": 0, "end": 3}), b.op("Shape", [k4], {"start": 2, "end": 3})], {"axis": 0})


def _expand_heads(b: _Builder, f: ir.Value) -> ir.Value:
    """The factor (``[S_q, 1]`` .. ``[B, H, S_q, 1]``) made rank 4 without growing it, so it can be transposed."""
    return b.op("Expand", [f, b.ints(1, 1, 1, 1)])


def _per_head(model: ir.Model, anchor: ir.Node, b: _Builder, name: str, value: Param, heads: Dim) -> ir.Value:
    """``s`` or ``b`` as a named ``[H]`` float32 initializer (a Constant inside model-local functions): a scalar
    repeated, or one value per head (``spec.per_head``)."""
    what = "b" if ".b_" in name else "s"
    data = np.asarray(per_head(value, heads if isinstance(heads, int) and heads > 0 else None, what, anchor.name or ""),
                      dtype=np.float32)
    h = len(data)
    if any(anchor.graph is f.graph for f in model.functions.values()):
        return b.const(data)
    init = ir.Value(name=name, shape=ir.Shape([h]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(data, name=name))
    model.graph.register_initializer(init)
    return init


def _factor(model: ir.Model, b: _Builder, site: AttentionSite, n: ir.Value, s: Param, bias: Param | None, rank: int) -> ir.Value:
    """``s_h * log(max(n, 1)) + b_h`` in float32; ``n`` is ``[..., H, S_q, 1]`` float32."""
    heads = site.heads if rank >= 3 else None
    s_v = _per_head(model, b.anchor, b, f"attnpass.ssmax.s_{site.index}", s, heads)
    head_shape = [-1, 1, 1] if rank >= 3 and isinstance(heads, int) else [1]
    f = b.op("Mul", [b.op("Reshape", [s_v, b.ints(*head_shape)]), b.op("Log", [b.op("Max", [n, b.const(1.0, np.float32)])])])
    if bias is not None:
        b_v = _per_head(model, b.anchor, b, f"attnpass.ssmax.b_{site.index}", bias, heads)
        f = b.op("Add", [f, b.op("Reshape", [b_v, b.ints(*head_shape)])])
    return f


def _lift_axes(rank: int) -> tuple[int, ...]:
    """Where a rank-``rank`` operand gets unit axes to become ``[B, H, S, D]``.

    Rank 3 is ``bmm`` attention with the heads folded into the batch: ``[B*H, 1, S, D]``, one head per batch
    entry (``Plan.heads`` is 1); lower ranks get leading unit axes.
    """
    return (1,) if rank == 3 else tuple(range(4 - rank))


def _lift(b: _Builder, x: ir.Value, rank: int) -> ir.Value:
    """A mask, bias or per-row value broadcastable to rank-``rank`` scores, made broadcastable to the op's 4-D ones."""
    if rank >= 4:
        return x
    x = b.op("Expand", [x, b.ints(*([1] * rank))])  # exactly rank ``rank``, nothing grown
    return b.op("Unsqueeze", [x, b.ints(*_lift_axes(rank))])


def _prepare(b: _Builder, op: Any, transpose: bool = True) -> ir.Value:
    v = op.value
    if op.perm is not None:
        v = b.op("Transpose", [v], {"perm": list(op.perm)})
    if op.rank < 4:
        v = b.op("Unsqueeze", [v, b.ints(*_lift_axes(op.rank))])
    if op.transposed and transpose:
        v = b.op("Transpose", [v], {"perm": [0, 1, 3, 2]})
    if op.groups > 1:
        g = op.groups
        x = b.op("Expand", [b.op("Unsqueeze", [v, b.ints(2)]), b.ints(1, 1, g, 1, 1)])
        target = b.op("Concat", [b.op("Shape", [v], {"start": 0, "end": 1}), b.ints(-1), b.op("Shape", [v], {"start": 2, "end": 4})], {"axis": 0})
        v = b.op("Reshape", [x, target])
    return v


def _prepare_gqa(b: _Builder, op: Any) -> ir.Value:
    """K or V for opset-23 ``Attention``: grouped heads stay grouped (the op repeats them itself)."""
    return _prepare(b, replace(op, groups=1))


def _function_of(model: ir.Model, node: ir.Node) -> ir.Function | None:
    """The model-local function whose body holds ``node`` (None for the main graph and its subgraphs)."""
    return next((f for f in model.functions.values() if node.graph is f.graph), None)


def _replace_keeping_name(old: ir.Value, new: ir.Value) -> None:
    """Replace ``old`` everywhere; a graph output keeps its name, which is the model's interface."""
    if old.is_graph_output():
        name = old.name
        old.name = f"{name}__replaced"
        new.name = name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


def lay_out(b: _Builder, v: ir.Value, view: tuple[int, ...] | None) -> ir.Value:
    """A mask added in a ``[B, H, S_q, S_k]`` view of ``[B*H, S_q, S_k]`` scores, on the scores: made rank 4,
    broadcast over the view's batch and heads, folded as the scores are; its own ``S_q``/``S_k`` sizes stay."""
    if view is None:
        return v
    rank = len(v.shape) if v.shape is not None else 4
    if rank < 4:
        v = b.op("Unsqueeze", [v, b.ints(*range(4 - rank))])
    v = b.op("Expand", [v, b.ints(view[0], view[1], 1, 1)])
    return b.op("Reshape", [v, b.op("Concat", [b.ints(view[0] * view[1]), b.op("Shape", [v], {"start": 2})], {"axis": 0})])


def to_view(b: _Builder, f: ir.Value, view: tuple[int, ...]) -> ir.Value:
    """A per-row value of the ``[B*H, S_q, 1]`` scores (the SSMax factor) in their ``[B, H, S_q, 1]`` head view."""
    f = b.op("Expand", [f, b.ints(view[0] * view[1], 1, 1)])
    return b.op("Reshape", [f, b.ints(view[0], view[1], -1, 1)])
