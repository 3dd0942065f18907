"""The ONNX emitters' small tools: a node tape inserted before an anchor, and the glue they all use."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from attnpass.errors import AttnpassError
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
        # a double's finfo.min does not fit a float32 constant (it would become -inf)
        return self.op("CastLike", [self.const(x, np.float64 if like.dtype == ir.DataType.DOUBLE else np.float32), like])

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


def lay_out(b: _Builder, v: ir.Value, view: tuple[Any, ...] | None) -> ir.Value:
    """A mask added in a ``[B, H, S_q, S_k]`` view of ``[B*H, S_q, S_k]`` scores, on the scores (``plan.laid_out_shape``).

    Made rank 4, broadcast over the heads (and the batch) only where it does not vary there already, then folded
    by a ``Reshape`` to ``[-1, S_q, S_k]`` whose sizes come from the mask itself: no batch size is written into the
    graph, so a model exported with a dynamic batch answers for any batch.  A mask with neither a batch nor a head
    axis stays ``[1, S_q, S_k]``; one with heads but no batch is tiled over a numeric batch (the matcher records
    no view for such a mask when the batch is symbolic).
    """
    if view is None:
        return v
    shape = tuple(v.shape) if v.shape is not None else (None,) * 4
    if len(shape) < 4:
        v = b.op("Unsqueeze", [v, b.ints(*range(4 - len(shape)))])
    pad = (1,) * (4 - len(shape)) + shape
    batch_unit, heads_unit = (isinstance(d, int) and d == 1 for d in pad[:2])
    if not (batch_unit and heads_unit):
        grow = (view[0] if batch_unit else 1, view[1] if heads_unit else 1)
        if not all(isinstance(d, int) for d in grow):
            raise AttnpassError(f"internal error: a head-view mask to tile over a symbolic batch ({view})")
        if grow != (1, 1):
            v = b.op("Expand", [v, b.ints(*grow, 1, 1)])
    return b.op("Reshape", [v, b.op("Concat", [b.ints(-1), b.op("Shape", [v], {"start": 2})], {"axis": 0})])


def to_view(b: _Builder, f: ir.Value, view: tuple[Any, ...], rows: ir.Value) -> ir.Value:
    """A per-row value of the ``[B*H, S_q, 1]`` scores (the SSMax factor) in their ``[B, H, S_q, 1]`` head view.

    ``rows`` is any value whose first axis is the scores' ``B*H`` (the 3-D Q): the factor is broadcast to it and
    split by a ``Reshape`` to ``[-1, H, S_q, 1]``, so only the head count (a number in every view) is written.
    """
    f = b.op("Expand", [f, b.op("Concat", [b.op("Shape", [rows], {"start": 0, "end": 1}), b.ints(1, 1)], {"axis": 0})])
    return b.op("Reshape", [f, b.op("Concat", [b.ints(-1, int(view[1])), b.op("Shape", [f], {"start": 1})], {"axis": 0})])
