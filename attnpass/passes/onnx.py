"""ONNX adapter for the matcher (on onnx-ir); the rewrites are in ``attnpass/rewrite/onnx/``.

What real exporters produce, and where the adapter meets it:

* ``torch.onnx.export(dynamo=True)`` (opset 18+): scale as a 0-d initializer (``Mul(QK, val_N)``),
  K^T as one ``Transpose(perm=(0, 2, 3, 1))`` straight from ``[B, S, H, D]`` (so K arrives already
  transposed), the mask as ``Where(And(...), zeros, finfo.min)`` added to the scores, GQA as
  ``Unsqueeze -> Expand -> Reshape`` (HF ``repeat_kv``), and value_info with symbolic dims
  (``s72``).  With an SDPA model at opset 23 it emits the ``Attention`` op instead of a softmax.
* ``torch.onnx.export(dynamo=False)`` (TorchScript): ``Constant`` nodes instead of initializers,
  ``Reshape`` targets built from ``Concat(Unsqueeze(Gather(Shape(x), i)), -1, 8)`` (so the head count
  is only known by evaluating that shape arithmetic: ``partial_value`` does it), ``Cast -> Cast``
  around a float32 softmax, ``Sqrt(Cast(Gather(Shape(q), -1)))`` scales (folded by ``constant``),
  and no value_info: shapes come from onnx shape inference plus our own propagation here.
* SDPA graphs from both exporters: ``Where(IsNaN(p), 0, p)`` after the softmax (a guard the matcher
  drops); optimum / onnxruntime's optimizer: ``com.microsoft.MultiHeadAttention``, ``Attention``,
  ``GroupQueryAttention`` (reported as already-fused ``sdpa`` sites).

Nodes of model-local functions and of ``If`` / ``Loop`` / ``Scan`` bodies are searched too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from attnpass.passes import onnx_kv, onnx_shapes, onnx_static, topk_ir
from attnpass.passes.match import Dim, Kind, Report, find_sites
from attnpass.passes.onnx_shapes import _at, _broadcast, _concat, _dim_equal, _ir_shape, _matmul, _reshape, _slice, _unsqueeze
from attnpass.passes.site import FusedOpInfo

MS = "com.microsoft"

_KINDS: dict[str, Kind] = {
    "MatMul": Kind.MATMUL, "Einsum": Kind.EINSUM, "Softmax": Kind.SOFTMAX,
    "Mul": Kind.MUL, "Div": Kind.DIV, "Add": Kind.ADD, "Sub": Kind.SUB, "Where": Kind.WHERE,
    "Cast": Kind.CAST, "CastLike": Kind.CAST, "Identity": Kind.IDENTITY,
    "Transpose": Kind.TRANSPOSE, "Reshape": Kind.RESHAPE, "Squeeze": Kind.RESHAPE, "Flatten": Kind.RESHAPE,
    "Expand": Kind.EXPAND, "Unsqueeze": Kind.UNSQUEEZE, "Dropout": Kind.DROPOUT, "Tanh": Kind.TANH,
    "IsNaN": Kind.ISNAN, "Not": Kind.NOT, "And": Kind.AND, "Or": Kind.OR,
    "Less": Kind.COMPARE, "LessOrEqual": Kind.COMPARE, "Greater": Kind.COMPARE, "GreaterOrEqual": Kind.COMPARE,
    "Equal": Kind.COMPARE, "Range": Kind.ARANGE, "Constant": Kind.CONSTANT, "ConstantOfShape": Kind.CONSTANT,
    "Log": Kind.LOG, "Floor": Kind.FLOOR, "Slice": Kind.SLICE,
}
#: Elements a constant-only subgraph may have at any step for ``static_value`` to compute it (a 2k x 2k mask).
_EVAL_LIMIT = 1 << 22
_COMPARE = {"Less": "lt", "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge", "Equal": "eq"}
#: Already-fused attention ops, read as SDPA-form sites: (domain, op_type).
FUSED_OPS = {(MS, "MultiHeadAttention"), (MS, "Attention"), (MS, "GroupQueryAttention"), ("", "Attention")}
_SAME_SHAPE = {"Cast", "CastLike", "Identity", "Softmax", "Tanh", "IsNaN", "Not", "Dropout", "Sqrt", "Neg",
               "Exp", "Log", "Erf", "Relu", "Sigmoid", "Reciprocal", "Abs", "LayerNormalization"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
              "Equal", "Max", "Min", "Where"}


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


class OnnxAdapter:
    """Answers the matcher's questions about an onnx-ir model (values are ``ir.Value``)."""

    #: ONNX ``Attention`` aligns ``is_causal`` top-left (no past): a proven ``key <= query`` mask means the
    #: same thing whatever S_q and S_k are, so the matcher keeps the proof for sites of any lengths.
    fused_causal_top_left = True

    def __init__(self, model: ir.Model):
        self.model = model
        self.opset = model.opset_imports.get("", 18)
        self._shapes: dict[int, tuple[Dim, ...] | None] = {}
        self._pvals: dict[int, list[Dim] | None] = {}
        self._static: dict[int, bool] = {}
        self._consts: dict[int, float | None] = {}
        self._values: dict[int, np.ndarray | None] = {}
        self._seed_function_inputs()

    def _seed_function_inputs(self) -> None:
        """Give a model-local function's inputs the shapes its callers pass (onnx shape inference leaves
        function bodies without value_info), so a site inside a function has a known rank and head count.
        Calls that disagree keep only the dims they share; calls of different ranks leave the input unknown."""
        calls: dict[tuple, list[ir.Node]] = {}
        for node in ir.traversal.RecursiveGraphIterator(self.model.graph):
            calls.setdefault((node.domain, node.op_type, node.overload), []).append(node)
        for key, fn in self.model.functions.items():
            callers = calls.get(key, [])
            for i, inp in enumerate(fn.inputs):
                shapes = [self.shape(c.inputs[i]) if i < len(c.inputs) else None for c in callers]
                if not shapes or any(x is None for x in shapes) or len({len(x) for x in shapes}) != 1:  # type: ignore[arg-type]
                    continue
                merged = tuple(d[0] if all(x == d[0] for x in d) else None for d in zip(*shapes))  # type: ignore[misc]
                self._shapes[id(inp)] = merged

    # ------------------------------------------------------------------ graph walking
    def graphs(self) -> Iterator[ir.Graph | ir.Function]:
        """The main graph, every model-local function, and (through ``nodes``) their subgraphs."""
        yield self.model.graph
        yield from self.model.functions.values()

    def nodes(self) -> Iterable[ir.Node]:
        for g in self.graphs():
            yield from ir.traversal.RecursiveGraphIterator(g)

    def kind(self, node: ir.Node) -> Kind:
        dom = _domain(node)
        if (dom, node.op_type) in FUSED_OPS:
            return Kind.SDPA
        if dom != "":
            return Kind.OTHER
        op = node.op_type
        if op == "Trilu":
            return Kind.TRIU if self.attr(node, "upper", 1) else Kind.TRIL
        if op == "Squeeze" or op == "Unsqueeze":
            if op == "Unsqueeze" and self._axes(node) is not None and len(self._axes(node) or ()) == 1:
                return Kind.UNSQUEEZE
            return Kind.RESHAPE
        if op == "Tile":
            # TorchScript's repeat_interleave: ``Tile`` of a new size-1 axis, the same as an ``Expand`` of it
            reps, s = self._tensor(node.inputs[1]), self.shape(node.inputs[0])
            if reps is not None and s is not None and reps.size == len(s) and all(
                    int(r) == 1 or d == 1 for r, d in zip(reps.reshape(-1), s)):
                return Kind.EXPAND
            return Kind.OTHER
        if op == "Softmax" and self.opset < 13:
            # Softmax-1/11 flattens to 2-D at ``axis``: the same as a last-axis softmax only there.
            rank = len(self.shape(node.inputs[0]) or ())
            axis = self._attr_raw(node, "axis", 1)
            return Kind.SOFTMAX if rank and axis % rank == rank - 1 else Kind.OTHER
        return _KINDS.get(op, Kind.OTHER)

    def inputs(self, node: ir.Node) -> list[Any]:
        dom, op = _domain(node), node.op_type
        ins = list(node.inputs)
        if (dom, op) == (MS, "MultiHeadAttention"):
            # query, key, value, bias, key_padding_mask, attention_bias, ...
            return [ins[0], _at(ins, 1) or ins[0], _at(ins, 2) or ins[0], _at(ins, 5)]
        if (dom, op) == (MS, "Attention"):
            # input (hidden states; Q/K/V are projected inside the op), weights, bias, mask_index, past, attention_bias
            return [ins[0], ins[0], ins[0], _at(ins, 5)]
        if (dom, op) == (MS, "GroupQueryAttention"):
            return [ins[0], _at(ins, 1) or ins[0], _at(ins, 2) or ins[0], _at(ins, 10)]
        if (dom, op) == ("", "Attention"):
            return [ins[0], ins[1], ins[2], _at(ins, 3)]
        if op == "Dropout":
            return ins[:1]
        return ins

    def output(self, node: ir.Node) -> ir.Value:
        return node.outputs[0]

    def producer(self, value: Any) -> ir.Node | None:
        return value.producer() if isinstance(value, ir.Value) else None

    def users(self, value: Any) -> list[ir.Node]:
        if not isinstance(value, ir.Value):
            return []
        seen: list[ir.Node] = []
        for u in value.consumers():
            if u not in seen and not self._not_a_use(u, value):
                seen.append(u)
        return seen

    def _not_a_use(self, node: ir.Node, value: ir.Value) -> bool:
        """Consumers that read no element of ``value``: its shape or size, ``CastLike``'s type input, or a node
        whose results nobody reads (the ONNX ``Attention`` body and the exporters leave all three)."""
        if _domain(node) == "" and node.op_type in ("Shape", "Size"):
            return True
        if _domain(node) == "" and node.op_type == "CastLike" and node.inputs[0] is not value:
            return True
        return not any(o.uses() or self.is_graph_output(o) for o in node.outputs)

    def is_graph_output(self, value: Any) -> bool:
        if not isinstance(value, ir.Value):
            return False
        if value.is_graph_output():
            return True
        # a function's outputs
        for f in self.model.functions.values():
            if value in f.outputs:
                return True
        return False

    # ------------------------------------------------------------------ constants
    def _tensor(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's data if it is an initializer or a ``Constant`` output."""
        if value is None:
            return None
        if value.const_value is not None:
            try:
                return value.const_value.numpy()
            except Exception:  # external data that cannot be read: treat as unknown
                return None
        p = value.producer()
        if p is not None and p.op_type == "Constant" and _domain(p) == "":
            for key, a in p.attributes.items():
                if key == "value":
                    return a.value.numpy()
                if key in ("value_float", "value_int"):
                    return np.array(a.value)
                if key in ("value_floats", "value_ints"):
                    return np.array(list(a.value))
        return None

    def constant(self, value: Any) -> float | None:
        """A scalar (or uniform) constant, folding the small arithmetic exporters leave around scales."""
        if not isinstance(value, ir.Value):
            return None
        key = id(value)
        if key not in self._consts:
            self._consts[key] = None  # cycle guard
            self._consts[key] = self._fold(value, 0)
        return self._consts[key]

    def _fold(self, value: ir.Value, depth: int) -> float | None:
        t = self._tensor(value)
        if t is not None:
            if t.size == 1:
                return float(t.reshape(()))
            if t.size > 1 and t.dtype != object and np.all(t == t.flat[0]) and t.size <= 1 << 16:
                return float(t.flat[0])
            return None
        p = value.producer()
        if p is None or depth > 12 or _domain(p) != "":
            return None
        op = p.op_type
        sub = [None if i is None else self._fold(i, depth + 1) for i in p.inputs]
        if op in ("Cast", "CastLike", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Flatten"):
            return sub[0]
        if op == "ConstantOfShape":
            a = p.attributes.get("value")
            return 0.0 if a is None else float(a.value.numpy().reshape(-1)[0])
        if op in ("Sqrt", "Reciprocal", "Neg") and sub[0] is not None:
            x = sub[0]
            if op == "Sqrt":
                return math.sqrt(x) if x >= 0 else None
            if op == "Reciprocal":
                return 1.0 / x if x else None
            return -x
        if op in ("Mul", "Div", "Add", "Sub", "Pow") and len(sub) == 2 and None not in sub:
            x, y = sub
            if op == "Div":
                return x / y if y else None
            return {"Mul": x * y, "Add": x + y, "Sub": x - y, "Pow": x**y if x > 0 or float(y).is_integer() else None}[op]
        pv = self.partial_value(value)
        if pv is not None and len(pv) == 1 and isinstance(pv[0], int):
            return float(pv[0])
        return None

    def static_value(self, value: Any, limit: int = 1 << 24) -> np.ndarray | None:
        """The data of an initializer / ``Constant`` (a causal-mask buffer), or of a constant-only subgraph
        (TorchScript's mask from static lengths), if small enough to read."""
        if not isinstance(value, ir.Value):
            return None
        t = self._tensor(value)
        if t is not None:
            return t if t.size <= limit else None
        if not self.is_static(value):
            return None
        return onnx_static.evaluate(self, value, min(limit, _EVAL_LIMIT), self._values)

    def partial_value(self, value: ir.Value | None, depth: int = 0) -> list[Dim] | None:
        """Elements of a small int64 shape tensor (``Concat(Gather(Shape(x)), -1, 8)``): ints, dim names or None."""
        if value is None:
            return None
        key = id(value)
        if key in self._pvals:
            return self._pvals[key]
        self._pvals[key] = None
        out = self._pv(value, depth)
        self._pvals[key] = out
        return out

    def _pv(self, value: ir.Value, depth: int) -> list[Dim] | None:
        t = self._tensor(value)
        if t is not None:
            if t.ndim <= 1 and t.size <= 16 and np.issubdtype(t.dtype, np.integer):
                return [int(x) for x in t.reshape(-1)]
            return None
        p = value.producer()
        if p is None or depth > 24 or _domain(p) != "":
            return None
        op = p.op_type
        if op == "Shape":
            s = self.shape(p.inputs[0])
            if s is None:
                return None
            start = self._attr_raw(p, "start", 0)
            end = self._attr_raw(p, "end", None)
            return list(s[start:end])
        if op in ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape"):
            return self.partial_value(p.inputs[0], depth + 1)
        if op == "Concat":
            parts = [self.partial_value(i, depth + 1) for i in p.inputs]
            if any(x is None for x in parts):
                return None
            return [d for x in parts for d in x]  # type: ignore[union-attr]
        if op == "Gather":
            data = self.partial_value(p.inputs[0], depth + 1)
            idx = self._tensor(p.inputs[1])
            if data is None or idx is None:
                return None
            try:
                return [data[int(i)] for i in idx.reshape(-1)]
            except IndexError:
                return None
        if op == "Slice":
            data = self.partial_value(p.inputs[0], depth + 1)
            st, en = self._tensor(_at(list(p.inputs), 1)), self._tensor(_at(list(p.inputs), 2))
            steps = self._tensor(_at(list(p.inputs), 4))
            if data is None or st is None or en is None:
                return None
            step = 1 if steps is None else int(steps.reshape(-1)[0])
            s0, e0 = int(st.reshape(-1)[0]), int(en.reshape(-1)[0])
            e0 = min(e0, 1 << 30) if e0 > 0 else e0
            return data[s0:e0:step]
        if op == "ConstantOfShape":
            # TorchScript's ``expand(-1, ...)`` handling: ``Where(Equal(shape, -1), ConstantOfShape(...) * -1, shape)``
            n = self.partial_value(p.inputs[0], depth + 1)
            a = p.attributes.get("value")
            fill = 0 if a is None else a.value.numpy().reshape(-1)[0]
            if n is None or len(n) != 1 or not isinstance(n[0], int) or n[0] > 16 or not float(fill).is_integer():
                return None
            return [int(fill)] * n[0]
        if op == "Equal":
            a, b = self.partial_value(p.inputs[0], depth + 1), self.partial_value(p.inputs[1], depth + 1)
            if a is None or b is None or len(b) not in (1, len(a)):
                return None
            return [_dim_equal(x, y) for x, y in zip(a, b * len(a) if len(b) == 1 else b)]
        if op == "Where":
            c, x, y = (self.partial_value(i, depth + 1) for i in p.inputs[:3])
            if c is None or x is None or y is None or not len(c) == len(x) == len(y):
                return None
            if any(ci is None for ci in c):
                return None
            return [xi if ci else yi for ci, xi, yi in zip(c, x, y)]
        if op == "Not":
            # the ONNX ``Attention`` body's GQA test: ``Not(Equal(q_heads, kv_heads))``
            a = self.partial_value(p.inputs[0], depth + 1)
            return None if a is None else [None if not isinstance(x, int) else int(not x) for x in a]
        if op in ("And", "Or"):
            a, b = self.partial_value(p.inputs[0], depth + 1), self.partial_value(p.inputs[1], depth + 1)
            if a is None or b is None or len(a) != len(b):
                return None
            both = [(x, y) for x, y in zip(a, b)]
            if op == "And":
                return [0 if 0 in (x, y) else (1 if x == y == 1 else None) for x, y in both]
            return [1 if 1 in (x, y) else (0 if x == y == 0 else None) for x, y in both]
        if op in ("Mul", "Add", "Sub", "Div", "Mod"):
            a, b = self.partial_value(p.inputs[0], depth + 1), self.partial_value(p.inputs[1], depth + 1)
            if a is not None and b is not None and len(a) != len(b) and 1 in (len(a), len(b)):
                a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a))  # a scalar broadcasts
            if a is None or b is None or len(a) != len(b):
                return None
            res: list[Dim] = []
            for x, y in zip(a, b):
                if isinstance(x, int) and isinstance(y, int):
                    res.append({"Mul": x * y, "Add": x + y, "Sub": x - y, "Div": x // y if y else None,
                                "Mod": x % y if y else None}[op])
                else:  # a symbolic batch times the head count (TorchScript's ``view(b * h, ...)``)
                    res.append(onnx_shapes.sym_mul(x, y) if op == "Mul" else None)
            return res
        return None

    # ------------------------------------------------------------------ attributes
    def _attr_raw(self, node: ir.Node, name: str, default: Any = None) -> Any:
        a = node.attributes.get(name)
        if a is None:
            return default
        v = a.value
        if isinstance(v, ir.TensorProtocol):
            return v.numpy()
        if isinstance(v, Iterable) and not isinstance(v, str):
            return list(v)
        return v

    def _axes(self, node: ir.Node) -> list[int] | None:
        a = self._attr_raw(node, "axes")
        if a is not None:
            return list(a)
        t = self._tensor(_at(list(node.inputs), 1))
        return None if t is None else [int(x) for x in t.reshape(-1)]

    def attr(self, node: ir.Node, name: str, default: Any = None) -> Any:
        dom, op = _domain(node), node.op_type
        if (dom, op) in FUSED_OPS:
            if name == "scale":
                s = self._attr_raw(node, "scale")
                return None if s in (None, 0.0) else float(s)
            if name == "is_causal":
                return bool(self._attr_raw(node, "is_causal", 0) or self._attr_raw(node, "unidirectional", 0)
                            or (dom == MS and op == "GroupQueryAttention"))
            if name == "softcap":
                s = self._attr_raw(node, "softcap", 0.0)
                return float(s) if s else None
            if name == "enable_gqa":
                return op == "GroupQueryAttention" or (op == "Attention" and dom == "")
            if name == "dropout_p":
                return 0.0
            return self._attr_raw(node, name, default)
        if op == "Softmax" and name == "axis":
            return self._attr_raw(node, "axis", -1 if self.opset >= 13 else 1)
        if op == "Transpose" and name == "perm":
            perm = self._attr_raw(node, "perm")
            if perm is None:
                r = len(self.shape(node.inputs[0]) or ())
                return list(reversed(range(r))) if r else None
            return [int(p) for p in perm]
        if op == "Unsqueeze" and name == "dim":
            axes = self._axes(node)
            return axes[0] if axes and len(axes) == 1 else None
        if op == "Dropout":
            if name == "p":
                r = self._fold(node.inputs[1], 0) if len(node.inputs) > 1 and node.inputs[1] is not None else None
                return r if r is not None else float(self._attr_raw(node, "ratio", 0.5))
            if name == "train":
                tm = _at(list(node.inputs), 2)
                if tm is None:
                    return False
                c = self.constant(tm)
                return None if c is None else bool(c)
        if op in _COMPARE and name == "op":
            return _COMPARE[op]
        if op == "Trilu" and name == "diagonal":
            k = _at(list(node.inputs), 1)
            if k is None:
                return 0
            c = self.constant(k)
            return None if c is None else int(c)
        if op == "Range" and name == "start":
            c = self.constant(node.inputs[0])
            return None if c is None else (int(c) if float(c).is_integer() else c)
        if name == "fill":
            if op == "ConstantOfShape":
                a = node.attributes.get("value")
                return 0.0 if a is None else float(a.value.numpy().reshape(-1)[0])
            if op == "Constant":
                return self.constant(node.outputs[0])
        if op == "Einsum" and name == "equation":
            return self._attr_raw(node, "equation")
        return self._attr_raw(node, name, default)

    # ------------------------------------------------------------------ shapes
    def shape(self, value: Any) -> tuple[Dim, ...] | None:
        if not isinstance(value, ir.Value):
            return None
        key = id(value)
        if key in self._shapes:
            return self._shapes[key]
        self._shapes[key] = _ir_shape(value)  # cycle guard and fallback
        inferred = self._infer(value)
        known = _ir_shape(value)
        if inferred is not None and known is not None and len(inferred) == len(known):
            merged = tuple(k if (isinstance(k, int) or (isinstance(k, str) and not k.startswith("unk__")) or i is None) else i
                           for k, i in zip(known, inferred))
        else:
            merged = known if known is not None else inferred
        self._shapes[key] = merged
        return merged

    def _infer(self, value: ir.Value) -> tuple[Dim, ...] | None:
        """Our own propagation for the ops between projections and attention (TorchScript graphs lack value_info)."""
        p = value.producer()
        if p is not None and p.op_type == "Constant" and _domain(p) == "":
            t = self._tensor(value)  # inside function bodies nothing else gives a Constant its shape
            return None if t is None else tuple(int(d) for d in t.shape)
        if p is None or _domain(p) != "" or value is not p.outputs[0]:
            return None
        op, ins = p.op_type, list(p.inputs)
        if op in _SAME_SHAPE:
            return self.shape(ins[0])
        if op in _BROADCAST:
            shapes = [self.shape(i) for i in ins if i is not None]
            if any(s is None for s in shapes):
                return None
            return _broadcast(shapes)  # type: ignore[arg-type]
        if op == "Transpose":
            s = self.shape(ins[0])
            perm = self.attr(p, "perm")
            return None if s is None or perm is None or len(perm) != len(s) else tuple(s[i] for i in perm)
        if op == "Reshape":
            target = self.partial_value(ins[1])
            return None if target is None else _reshape(self.shape(ins[0]), target)
        if op == "Expand":
            target = self.partial_value(ins[1])
            s = self.shape(ins[0])
            if target is None or s is None:
                return None
            return _broadcast([s, tuple(None if t == 1 and False else t for t in target)], expand=True)
        if op == "Tile":
            s, reps = self.shape(ins[0]), self.partial_value(ins[1])
            if s is None or reps is None or len(reps) != len(s):
                return None
            return tuple(d * r if isinstance(d, int) and isinstance(r, int) else (d if r == 1 else None) for d, r in zip(s, reps))
        if op == "Unsqueeze":
            s, axes = self.shape(ins[0]), self._axes(p)
            return None if s is None or axes is None else _unsqueeze(s, axes)
        if op == "MatMul":
            return _matmul(self.shape(ins[0]), self.shape(ins[1]))
        if op == "Slice":
            return _slice(self.shape(ins[0]), *(self.partial_value(_at(ins, i)) for i in (1, 2, 3, 4)))
        if op == "Concat":
            return _concat([self.shape(i) for i in ins], int(self.attr(p, "axis", 0)))
        return None

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        return value.dtype

    def is_bool(self, value: Any) -> bool:
        return isinstance(value, ir.Value) and value.dtype == ir.DataType.BOOL

    def is_static(self, value: Any) -> bool:
        """True if ``value`` is computed from initializers, constants and fixed shapes only (a weight or a
        mask built from static lengths, never an activation): see ``onnx_static``."""
        return onnx_static.is_static(self, value, self._static)

    def reduction(self, node: Any) -> Any:
        """A top-k / max / argmax / sum node described for the top-k walk (``passes/topk.py``), else None."""
        return topk_ir.onnx_reduction(self, node)

    def fused_op_info(self, node: ir.Node) -> FusedOpInfo:
        """What only the ONNX op knows: head counts as attributes, a 3-D Q, softcap, what SSMax cannot do."""
        dom, op = _domain(node), node.op_type
        nh = self.attr(node, "num_heads") or self.attr(node, "q_num_heads")
        kvh = self.attr(node, "kv_num_heads")
        notes: list[str] = []
        if (dom, op) == (MS, "Attention"):
            notes.append("Q is projected inside com.microsoft.Attention: SSMax decomposes it (projections + MultiHeadAttention)")
        if (dom, op) == (MS, "GroupQueryAttention"):
            notes.append("GroupQueryAttention counts keys from seqlens_k/total_sequence_length (causal over the KV cache)")
        three_d = _three_d(self, node)
        info: dict[str, Any] = {}
        if three_d:
            qs = self.shape(node.inputs[0])
            ks = self.shape(node.inputs[1])
            info = {"heads": nh, "kv_heads": kvh or nh, "seq_q": qs[1] if qs is not None else None,
                    "head_dim": qs[2] // nh if qs is not None and isinstance(qs[2], int) and nh else None,
                    "seq_k": ks[1] if ks is not None and len(ks) == 3 else None}
        return FusedOpInfo(three_d=three_d, softcap=self.attr(node, "softcap"), op_name=f"{dom + '.' if dom else ''}{op}",
                           notes=tuple(notes), ssmax_blocker=_op_ssmax_blocker(self, node, info.get("heads")), **info)

    def name(self, node: Any) -> str:
        if isinstance(node, ir.Node):
            return node.name or f"{node.op_type}@{id(node):x}"
        return str(node)


# ------------------------------------------------------------------ finding

def find(model: ir.Model) -> Report:
    """Attention sites of an onnx-ir model (every graph, function and subgraph)."""
    return find_sites(OnnxAdapter(model))


def _three_d(ad: OnnxAdapter, node: ir.Node) -> bool:
    """Q is ``[B, S, H*D]``: always for com.microsoft ops, for opset-23 ``Attention`` when it names its head counts."""
    if _domain(node) == MS:
        return True
    qs = ad.shape(node.inputs[0])
    return (qs is not None and len(qs) == 3) or ad.attr(node, "q_num_heads") is not None


def _op_ssmax_blocker(ad: OnnxAdapter, node: ir.Node, heads: Dim) -> str | None:
    """Why SSMax cannot scale a fused op's Q from outside (None: it can)."""
    dom, op = _domain(node), node.op_type
    if _three_d(ad, node) and not isinstance(heads, int):
        return "the number of heads is not known"
    if (dom, op) == (MS, "Attention"):
        return onnx_kv.ms_attention_blocker(ad, node)
    if (dom, op) == (MS, "GroupQueryAttention"):
        return onnx_kv.gqa_blocker(ad, node)
    if onnx_kv.attention_kv(node):
        return onnx_kv.attention_kv_blocker(ad, node)
    if (dom, op) == ("", "Attention"):
        return onnx_kv.softcap_blocker(ad, node)
    if (dom, op) == (MS, "MultiHeadAttention"):
        ins = list(node.inputs)
        if any(_at(ins, i) is not None for i in (3, 4, 6, 7)):
            return "MultiHeadAttention with bias / key_padding_mask / past inputs"
        if ad.attr(node, "unidirectional", 0):
            return "unidirectional MultiHeadAttention"
    return None


__all__ = ["OnnxAdapter", "find", "FUSED_OPS", "MS"]
