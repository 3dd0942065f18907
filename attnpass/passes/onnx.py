"""ONNX adapter for the matcher (on onnx-ir), and the two rewrites on ONNX graphs.

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

from attnpass import semantics
from attnpass.passes.match import AttentionSite, Dim, Kind, Matcher, Report, find_sites

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
}
_COMPARE = {"Less": "lt", "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge", "Equal": "eq"}
#: Already-fused attention ops, read as SDPA-form sites: (domain, op_type).
FUSED_OPS = {(MS, "MultiHeadAttention"), (MS, "Attention"), (MS, "GroupQueryAttention"), ("", "Attention")}
_SAME_SHAPE = {"Cast", "CastLike", "Identity", "Softmax", "Tanh", "IsNaN", "Not", "Dropout", "Sqrt", "Neg",
               "Exp", "Log", "Erf", "Relu", "Sigmoid", "Reciprocal", "Abs", "LayerNormalization"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
              "Equal", "Max", "Min", "Where"}


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _dim(d: Any) -> Dim:
    if isinstance(d, int):
        return d
    if isinstance(d, ir.SymbolicDim):
        return d.value
    return None


class OnnxAdapter:
    """Answers the matcher's questions about an onnx-ir model (values are ``ir.Value``)."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.opset = model.opset_imports.get("", 18)
        self._shapes: dict[int, tuple[Dim, ...] | None] = {}
        self._pvals: dict[int, list[Dim] | None] = {}
        self._static: dict[int, bool] = {}
        self._consts: dict[int, float | None] = {}
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
        """The data of an initializer / ``Constant`` (a causal-mask buffer), if small enough to read."""
        if not isinstance(value, ir.Value):
            return None
        t = self._tensor(value)
        return t if t is not None and t.size <= limit else None

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
                else:
                    res.append(None)
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
        if op == "Unsqueeze":
            s, axes = self.shape(ins[0]), self._axes(p)
            if s is None or axes is None:
                return None
            out: list[Dim] = list(s)
            r = len(s) + len(axes)
            for a in sorted(x % r for x in axes):
                out.insert(a, 1)
            return tuple(out)
        if op == "MatMul":
            a, b = self.shape(ins[0]), self.shape(ins[1])
            if a is None or b is None or len(a) < 2 or len(b) < 2:
                return None
            batch = _broadcast([a[:-2], b[:-2]])
            return None if batch is None else (*batch, a[-2], b[-1])
        return None

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        return value.dtype

    def is_static(self, value: Any) -> bool:
        """True if ``value`` is computed from initializers/constants only (a weight, never an activation).

        Every value visited is memoised (post-order), so asking about each layer of a deep model
        stays linear in its size instead of re-walking the residual stream once per layer.
        """
        if not isinstance(value, ir.Value):
            return True
        memo = self._static
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
                memo[key] = False  # a graph / function input, or the shape of an activation
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

    def name(self, node: Any) -> str:
        if isinstance(node, ir.Node):
            return node.name or f"{node.op_type}@{id(node):x}"
        return str(node)


def _dim_equal(x: Dim, y: Dim) -> Dim:
    """``Equal`` on two shape elements: 1/0 when decidable (a run-time size is never negative), else None."""
    if isinstance(x, int) and isinstance(y, int):
        return int(x == y)
    if isinstance(x, str) and isinstance(y, int) and y < 0 or isinstance(y, str) and isinstance(x, int) and x < 0:
        return 0
    if isinstance(x, str) and x == y:
        return 1
    return None


def _at(xs: list, i: int) -> Any:
    return xs[i] if len(xs) > i else None


def _ir_shape(value: ir.Value) -> tuple[Dim, ...] | None:
    s = value.shape
    return None if s is None else tuple(_dim(d) for d in s)


def _broadcast(shapes: list[tuple[Dim, ...]], expand: bool = False) -> tuple[Dim, ...] | None:
    r = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(r):
        ds = [s[i - r + len(s)] for s in shapes if i - r + len(s) >= 0]
        non1 = [d for d in ds if d != 1]
        if not non1:
            out.append(1)
        elif any(isinstance(d, int) for d in non1):
            out.append(next(d for d in non1 if isinstance(d, int)))
        elif all(d == non1[0] for d in non1) and non1[0] is not None:
            out.append(non1[0])
        else:
            known = [d for d in non1 if d is not None]
            out.append(known[0] if known and all(d == known[0] for d in known) else None)
    return tuple(out)


def _reshape(src: tuple[Dim, ...] | None, target: list[Dim]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for i, t in enumerate(target):
        if t == 0 and src is not None and i < len(src):
            out.append(src[i])
        else:
            out.append(t)
    if -1 in out and src is not None:
        # solve -1: the static part of the source volume over the static part of the target, when symbols cancel
        syms_src = sorted(str(d) for d in src if not isinstance(d, int))
        syms_dst = sorted(str(d) for d in out if not isinstance(d, int) and d != -1)
        if syms_src == syms_dst and "None" not in syms_src:
            num = math.prod(d for d in src if isinstance(d, int))
            den = math.prod(d for d in out if isinstance(d, int) and d != -1)
            out[out.index(-1)] = num // den if den and num % den == 0 else None
        else:
            out[out.index(-1)] = None
    return tuple(None if d == -1 else d for d in out)


# ------------------------------------------------------------------ finding

def find(model: ir.Model) -> Report:
    """Attention sites of an onnx-ir model (every graph, function and subgraph)."""
    adapter = OnnxAdapter(model)
    report = find_sites(adapter)
    for site in report.sites:
        _finish_site(adapter, site)
    return report


def _finish_site(ad: OnnxAdapter, site: AttentionSite) -> None:
    """Fill in what only the ONNX op knows (fused ops carry head counts as attributes, Q may be 3-D)."""
    if site.form != "sdpa":
        return
    node = site.softmax
    dom, op = _domain(node), node.op_type
    site.notes = [n for n in site.notes if not n.startswith("already fused")]
    site.notes.append(f"already fused ({dom + '.' if dom else ''}{op})")
    nh = ad.attr(node, "num_heads") or ad.attr(node, "q_num_heads")
    kvh = ad.attr(node, "kv_num_heads")
    qs = ad.shape(node.inputs[0])
    if _three_d(ad, node):
        site.heads = nh
        site.kv_heads = kvh or nh
        site.seq_q = qs[1] if qs is not None else None
        site.head_dim = qs[2] // nh if qs is not None and isinstance(qs[2], int) and nh else None
        ks = ad.shape(site.k.value)
        site.seq_k = ks[1] if ks is not None and len(ks) == 3 else None
    if site.scale is None and isinstance(site.head_dim, int):
        site.scale = 1.0 / math.sqrt(site.head_dim)
    site.softcap = ad.attr(node, "softcap")
    if (dom, op) == (MS, "Attention"):
        site.notes.append("Q is projected inside com.microsoft.Attention: SSMax cannot scale it from outside")
    if (dom, op) == (MS, "GroupQueryAttention"):
        site.notes.append("GroupQueryAttention counts keys from seqlens_k/past: not rewritten to SSMax")


def _three_d(ad: OnnxAdapter, node: ir.Node) -> bool:
    """Q is ``[B, S, H*D]``: always for com.microsoft ops, for opset-23 ``Attention`` when it names its head counts."""
    if _domain(node) == MS:
        return True
    qs = ad.shape(node.inputs[0])
    return (qs is not None and len(qs) == 3) or ad.attr(node, "q_num_heads") is not None


def ssmax_blocker(ad: OnnxAdapter, site: AttentionSite) -> str | None:
    """Why a site cannot take the SSMax rewrite here (None: it can)."""
    if site.form == "explicit":
        return None
    node = site.softmax
    dom, op = _domain(node), node.op_type
    if (dom, op) == (MS, "Attention"):
        return "com.microsoft.Attention projects Q inside the op (no Q to scale)"
    if (dom, op) == (MS, "GroupQueryAttention"):
        return "GroupQueryAttention (keys per row come from seqlens_k and the KV cache)"
    if _three_d(ad, node) and not isinstance(site.heads, int):
        return "the number of heads is not known"
    if (dom, op) == (MS, "MultiHeadAttention"):
        ins = list(node.inputs)
        if any(_at(ins, i) is not None for i in (3, 4, 6, 7)):
            return "MultiHeadAttention with bias / key_padding_mask / past inputs"
        if ad.attr(node, "unidirectional", 0):
            return "unidirectional MultiHeadAttention"
    if (dom, op) == ("", "Attention"):
        ins = list(node.inputs)
        if any(_at(ins, i) is not None for i in (4, 5)) or len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return "Attention with a KV cache"
    return None




# ------------------------------------------------------------------ rewriting helpers

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


def _allowed(b: _Builder, site: AttentionSite) -> ir.Value | None:
    """Bool tensor (broadcastable to the scores): True where the site's masks leave a key attendable."""
    parts: list[ir.Value] = []
    for m in site.masks:
        if m.kind == "bool":
            parts.append(m.value if m.attend_when else b.op("Not", [m.value]))
        else:
            t = m.value if m.coeff == 1.0 else b.op("Mul", [m.value, b.scalar_like(m.coeff, m.value)])
            parts.append(b.op("Greater", [t, b.scalar_like(semantics.MASKED_BELOW, t)]))
    out = parts[0] if parts else None
    for p in parts[1:]:
        out = b.op("And", [out, p])
    return out


def _float_min(v: ir.Value) -> float:
    dt = v.dtype
    try:
        return float(np.finfo(dt.numpy()).min) if dt is not None else float(np.finfo(np.float32).min)
    except (TypeError, ValueError):
        return float(np.finfo(np.float32).min)


def _per_head(model: ir.Model, anchor: ir.Node, b: _Builder, name: str, value: float, heads: Dim) -> ir.Value:
    """``s`` or ``b`` as a named ``[H]`` float32 initializer (a Constant inside model-local functions)."""
    h = heads if isinstance(heads, int) and heads > 0 else 1
    data = np.full((h,), value, dtype=np.float32)
    if any(anchor.graph is f.graph for f in model.functions.values()):
        return b.const(data)
    init = ir.Value(name=name, shape=ir.Shape([h]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(data, name=name))
    model.graph.register_initializer(init)
    return init


def _factor(model: ir.Model, b: _Builder, site: AttentionSite, n: ir.Value, s: float, bias: float | None, rank: int) -> ir.Value:
    """``s_h * log(max(n, 1)) + b_h`` in float32; ``n`` is ``[..., H, S_q, 1]`` float32."""
    heads = site.heads if rank >= 3 else None
    s_v = _per_head(model, b.anchor, b, f"attnpass.ssmax.s_{site.index}", s, heads)
    head_shape = [-1, 1, 1] if rank >= 3 and isinstance(heads, int) else [1]
    f = b.op("Mul", [b.op("Reshape", [s_v, b.ints(*head_shape)]), b.op("Log", [b.op("Max", [n, b.const(1.0, np.float32)])])])
    if bias is not None:
        b_v = _per_head(model, b.anchor, b, f"attnpass.ssmax.b_{site.index}", bias, heads)
        f = b.op("Add", [f, b.op("Reshape", [b_v, b.ints(*head_shape)])])
    return f


def _to_float(b: _Builder, v: ir.Value) -> ir.Value:
    return v if v.dtype == ir.DataType.FLOAT else b.op("Cast", [v], {"to": ir.DataType.FLOAT})


class _Keys:
    """Which keys each query row may attend, kept as the small factors the masks were built from.

    Exporters build a mask as ``Where(And(key <= query, padding[B, 1, 1, S_k]), 0, finfo.min)`` and
    broadcast it to ``[B, H, S_q, S_k]`` only when it meets the scores.  Counting ``n`` on the broadcast
    tensor costs an ``S x S`` float pass per head (3x the attention's time at S=4096); counting on the
    factors costs ``O(B * S)``: a key-only factor gives ``n`` by a reduction, a proven-causal factor by
    a ``Range``, both together by a cumulative sum of the key-only factor read at ``i``.  Factors that
    depend on both axes (sliding windows, arbitrary masks) are counted on their own, unbroadcast, shape.
    """

    def __init__(self, b: _Builder, ad: OnnxAdapter):
        self.b, self.ad = b, ad
        self.matcher = Matcher(ad)
        self.leaves: list[tuple[ir.Value, bool]] = []  # (bool tensor, attend_when): a conjunction
        self.terms: list[ir.Value] = []  # per mask term, a bool tensor True where attendable (for Where)
        self.causal_op: tuple[ir.Value, ir.Value, ir.Value | None] | None = None  # is_causal: S_q, S_k, offset

    # -------------------------------------------------------------- collecting
    def add_bool(self, v: ir.Value, attend_when: bool) -> None:
        self.terms.append(v if attend_when else self.b.op("Not", [v]))
        self._conjuncts(v, attend_when, 0)

    def add_additive(self, v: ir.Value, coeff: float = 1.0) -> None:
        """An additive term: a pure ``Where(cond, 0, very negative)`` mask splits into ``cond``'s factors."""
        src = v
        for _ in range(8):
            p = src.producer()
            if p is not None and _domain(p) == "" and p.op_type in ("Cast", "CastLike", "Identity", "Expand"):
                src = p.inputs[0]
                continue
            break
        p = src.producer()
        if p is not None and _domain(p) == "" and p.op_type == "Where" and coeff > 0:
            cond, xa, xb = p.inputs[:3]
            ca, cb = self.ad.constant(xa), self.ad.constant(xb)
            if ca == 0 and cb is not None and cb * coeff <= semantics.MASKED_BELOW:
                self.add_bool(cond, True)
                return
            if cb == 0 and ca is not None and ca * coeff <= semantics.MASKED_BELOW:
                self.add_bool(cond, False)
                return
        t = v if coeff == 1.0 else self.b.op("Mul", [v, self.b.scalar_like(coeff, v)])
        keep = self.b.op("Greater", [t, self.b.scalar_like(semantics.MASKED_BELOW, t)])
        self.terms.append(keep)
        self.leaves.append((keep, True))

    def add_causal_op(self, sq: ir.Value, sk: ir.Value, offset: ir.Value | None = None) -> None:
        """``is_causal`` of a fused op: ``j <= i + offset`` (None: 0); ``sq``/``sk``/``offset`` int64 scalars.

        Opset-23 ``Attention`` without ``past_key`` aligns it top-left (offset 0: the spec's
        ``past_sequence_length``), which onnxruntime 1.32 follows for ``S_q != S_k`` too.
        """
        self.causal_op = (sq, sk, offset)

    def _conjuncts(self, v: ir.Value, aw: bool, depth: int) -> None:
        c = self.ad.constant(v)
        if c is not None and (c != 0) == aw and self.ad.static_value(v) is not None:
            return  # attendable everywhere: no constraint
        p = v.producer()
        op = p.op_type if p is not None and _domain(p) == "" and depth < 32 else None
        if op == "And" and aw or op == "Or" and not aw:
            for x in p.inputs[:2]:
                self._conjuncts(x, aw, depth + 1)
            return
        if op == "Not":
            self._conjuncts(p.inputs[0], not aw, depth + 1)
            return
        if op in ("Expand", "Identity") or op == "Cast" and p.inputs[0].dtype == ir.DataType.BOOL:
            self._conjuncts(p.inputs[0], aw, depth + 1)  # a broadcast keeps each row's count
            return
        if aw and self.matcher.all_true(v):
            return
        self.leaves.append((v, aw))

    # -------------------------------------------------------------- answering
    def _bool(self, v: ir.Value, aw: bool) -> ir.Value:
        if v.dtype not in (None, ir.DataType.BOOL):
            v = self.b.op("Cast", [v], {"to": ir.DataType.BOOL})
        return v if aw else self.b.op("Not", [v])

    def allowed(self) -> ir.Value | None:
        """Bool, broadcastable to the scores: True where attendable (None: everywhere).  Reuses the graph's masks."""
        parts = list(self.terms)
        if self.causal_op is not None:
            parts.append(self._causal_bool())
        return _and_all(self.b, parts)

    def count(self, sq: ir.Value, sk: ir.Value, full_shape: ir.Value) -> tuple[ir.Value, str]:
        n, how, rows = self._count(sq, sk, full_shape)
        flags = _and_all(self.b, [self._bool(v, aw) for v, aw in rows])
        if flags is not None:
            n = self.b.op("Mul", [n, self.b.op("Cast", [flags], {"to": ir.DataType.FLOAT})])
        return n, how

    def _count(self, sq: ir.Value, sk: ir.Value, full_shape: ir.Value) -> tuple[ir.Value, str, list]:
        """``(n, how)``: float32 keys per row, broadcastable to ``[..., S_q, 1]``; ``how`` names the method.

        ``sq``/``sk`` are int64 scalars; ``full_shape`` is the scores' shape (used only when a factor's
        rank is unknown, the one case that still counts on the broadcast tensor).
        """
        b = self.b
        causal, keys, rows, general = [], [], [], []
        for v, aw in self.leaves:
            shape = self.ad.shape(v)
            if self.matcher.proves_causal(v, aw):
                causal.append((v, aw))
            elif shape is not None and (len(shape) < 2 or shape[-2] == 1):
                keys.append((v, aw, len(shape)))
            elif shape is not None and shape[-1] == 1:
                rows.append((v, aw))  # a per-row flag (``query >= 0`` in HF's padding masks): all keys or none
            else:
                general.append((v, aw, None if shape is None else len(shape)))
        sk1 = b.op("Unsqueeze", [sk, b.ints(0)])
        if len(causal) + (self.causal_op is not None) > 1:  # two causal constraints (aligned differently?): jointly
            general += [(v, aw, len(self.ad.shape(v) or ())) for v, aw in causal]
            causal = []
        # the last attendable key of row i is i + offset: 0 for a proven ``key <= query`` and top-left is_causal
        causal_offset = None if self.causal_op is None else self.causal_op[2]
        is_causal = bool(causal) or self.causal_op is not None
        if general:
            ranks = [r for *_, r in general] + [r for *_, r in keys] + [len(self.ad.shape(v) or ()) for v, _ in causal]
            parts = [self._bool(v, aw) for v, aw, _ in general] + [self._bool(v, aw) for v, aw, _ in keys]
            parts += [self._bool(v, aw) for v, aw in causal]
            if self.causal_op is not None:
                parts.append(self._causal_bool())
                ranks.append(2)
            g = _and_all(b, parts)
            if any(r is None for r in ranks):
                target, how = full_shape, "full"
            else:
                r = max(ranks)
                target = b.op("Concat", [b.ints(*([1] * (r - 1))), sk1], {"axis": 0}) if r > 1 else sk1
                how = "mask"
            full = b.op("Expand", [g, target])
            return b.op("ReduceSum", [b.op("Cast", [full], {"to": ir.DataType.FLOAT}), b.ints(-1)], {"keepdims": 1}), how, rows
        p = _and_all(b, [self._bool(v, aw) for v, aw, _ in keys])
        if p is not None:
            r = max(r for *_, r in keys)
            if r < 2:  # ``[S_k]`` or a scalar: give it a query axis of 1 to squeeze after the gather
                p, r = b.op("Reshape", [p, b.ints(1, -1)]), 2
            pf = b.op("Cast", [b.op("Expand", [p, b.op("Concat", [b.ints(*([1] * (r - 1))), sk1], {"axis": 0})])], {"to": ir.DataType.FLOAT})
        if not is_causal:
            if p is None:
                return b.op("Cast", [sk1], {"to": ir.DataType.FLOAT}), "length", rows
            return b.op("ReduceSum", [pf, b.ints(-1)], {"keepdims": 1}), "keys", rows
        i = b.op("Unsqueeze", [b.op("Range", [b.const(0, np.int64), sq, b.const(1, np.int64)]), b.ints(-1)])  # [S_q, 1]
        last = i if causal_offset is None else b.op("Add", [i, causal_offset])  # last attendable key index
        if p is None:
            n = b.op("Min", [b.op("Max", [b.op("Add", [last, b.ints(1)]), b.ints(0)]), sk1])
            return b.op("Cast", [n], {"to": ir.DataType.FLOAT}), "causal", rows
        idx = b.op("Max", [b.op("Min", [last, b.op("Sub", [sk1, b.ints(1)])]), b.ints(0)])
        c = b.op("CumSum", [pf, b.const(-1, np.int64)])
        n = b.op("Squeeze", [b.op("Gather", [c, idx], {"axis": -1}), b.ints(-3)])  # [..., 1, S_q, 1] -> [..., S_q, 1]
        if causal_offset is not None:
            n = b.op("Where", [b.op("Less", [last, b.ints(0)]), b.const(np.zeros(1, np.float32)), n])
        return n, "causal+keys", rows

    def _causal_bool(self) -> ir.Value:
        """``[S_q, S_k]`` bool of ``is_causal``: built only where a factor forces a joint count."""
        assert self.causal_op is not None
        b = self.b
        sq, sk, offset = self.causal_op
        i = b.op("Unsqueeze", [b.op("Range", [b.const(0, np.int64), sq, b.const(1, np.int64)]), b.ints(-1)])
        j = b.op("Range", [b.const(0, np.int64), sk, b.const(1, np.int64)])
        return b.op("LessOrEqual", [j, i if offset is None else b.op("Add", [i, offset])])


def _size(b: _Builder, x: ir.Value, axis: int) -> ir.Value:
    """``x.shape[axis]`` as an int64 scalar."""
    end = {"end": axis + 1} if axis != -1 else {}
    return b.op("Squeeze", [b.op("Shape", [x], {"start": axis, **end}), b.ints(0)])


def _and_all(b: _Builder, parts: list[ir.Value]) -> ir.Value | None:
    out = parts[0] if parts else None
    for p in parts[1:]:
        out = b.op("And", [out, p])
    return out


def _site_keys(b: _Builder, ad: OnnxAdapter, site: AttentionSite) -> _Keys:
    """The keys of an explicit site: its mask terms, split into factors."""
    keys = _Keys(b, ad)
    for m in site.masks:
        if m.kind == "bool":
            keys.add_bool(m.value, m.attend_when)
        else:
            keys.add_additive(m.value, m.coeff)
    return keys


def _pure_mask(ad: OnnxAdapter, v: ir.Value, coeff: float) -> bool:
    """True if additive ``v`` is only 0 or a masking value (``Where(cond, 0, finfo.min)``): nothing for SSMax to scale."""
    for _ in range(8):
        p = v.producer()
        if p is None or _domain(p) != "":
            return False
        if p.op_type in ("Cast", "CastLike", "Identity", "Expand"):
            v = p.inputs[0]
            continue
        if p.op_type == "Where" and coeff > 0:
            ca, cb = ad.constant(p.inputs[1]), ad.constant(p.inputs[2])
            return (ca == 0 and cb is not None and cb * coeff <= semantics.MASKED_BELOW) or (
                cb == 0 and ca is not None and ca * coeff <= semantics.MASKED_BELOW)
        return False
    return False


# ------------------------------------------------------------------ SSMax

def to_ssmax(model: ir.Model, report: Report, s: float, b: float | None = None) -> dict[int, str]:
    """Rewrite every site to SSMax in standard ONNX ops; returns {site index: why it was left alone}.

    Explicit chains: Q entering the ``Q K^T`` matmul is multiplied by the per-row factor
    ``s log n + b`` (soft-capped chains: the softmax input ``x`` becomes ``Where(allowed, x * f, finfo.min)``),
    with ``n`` counted per row from the masks in the graph (never from the example length), on the
    masks' own small factors where they allow it (``_Keys``).  Fused ops: Q is scaled by the per-row factor and the finite part of an additive
    mask with it (``semantics.ssmax_sdpa``).
    """
    ad = OnnxAdapter(model)
    left: dict[int, str] = {}
    for site in report.sites:
        why = ssmax_blocker(ad, site)
        if why is not None:
            left[site.index] = why
            continue
        if site.form == "explicit":
            _ssmax_explicit(model, ad, site, s, b)
        else:
            _ssmax_fused_op(model, ad, site, s, b)
    return left


def _ssmax_explicit(model: ir.Model, ad: OnnxAdapter, site: AttentionSite, s: float, bias: float | None) -> None:
    """SSMax on an explicit chain: Q pre-scaled by the per-row factor where the chain allows, else the scores.

    ``(f_i q_i) . k_j = f_i (q_i . k_j)``: scaling Q costs ``O(S D)`` per head where scaling the scores
    costs two ``S x S`` passes (the multiply, and the ``Where`` that keeps masked keys masked when
    ``f = 0``).  Masks added after the matmul stay masks; a finite bias is scaled with the factor
    (``semantics.attention``).  Soft-capping applies the factor after the cap, so those chains, and
    layouts where Q is not ``[..., S_q, D]`` in the scores' rank, take the scores route.
    """
    qk = _qk_matmul(ad, site)
    if qk is None:
        _ssmax_scores(model, ad, site, s, bias)
        return
    bld = _Builder(qk, f"attnpass/ssmax_{site.index}")
    q, kt = qk.inputs[0], qk.inputs[1]
    keys = _site_keys(bld, ad, site)
    # the scores' shape from the operands (the scores themselves come after Q, which now depends on n)
    full = bld.op("Concat", [bld.op("Shape", [q], {"end": -1}), bld.op("Shape", [kt], {"start": -1})], {"axis": 0})
    n, how = keys.count(_size(bld, q, -2), _size(bld, kt, -1), full)
    site.notes.append(f"SSMax n counted from the {_HOW[how]}; Q pre-scaled by the factor")
    f = _factor(model, bld, site, n, s, bias, site.out_rank)
    new_q = bld.op("Mul", [_to_float(bld, q), f])
    if q.dtype not in (None, ir.DataType.FLOAT):
        new_q = bld.op("Cast", [new_q], {"to": q.dtype})
    scaled_terms = []
    for m in site.masks:
        if m.kind == "additive" and not _pure_mask(ad, m.value, m.coeff):
            t = m.value if m.coeff == 1.0 else bld.op("Mul", [m.value, bld.scalar_like(m.coeff, m.value)])
            keep = bld.op("Greater", [t, bld.scalar_like(semantics.MASKED_BELOW, t)])
            scaled = bld.op("CastLike", [bld.op("Mul", [_to_float(bld, m.value), f]), m.value])
            scaled_terms.append((m, bld.op("Where", [keep, scaled, m.value])))
    bld.commit()
    qk.replace_input_with(0, new_q)
    for m, t in scaled_terms:
        m.node.replace_input_with(list(m.node.inputs).index(m.value), t)
    qk.graph.sort()  # the masks the factor reads may come later in node order than the Q K^T matmul


def _qk_matmul(ad: OnnxAdapter, site: AttentionSite) -> ir.Node | None:
    """The site's ``Q K^T`` MatMul if Q can carry the factor there (see ``_ssmax_explicit``), else None."""
    if site.softcap is not None or site.q.perm is not None:
        return None
    qk = next((n for n in site.nodes if isinstance(n, ir.Node) and n.op_type == "MatMul"), None)
    if qk is None or qk.graph is None or len(ad.shape(qk.inputs[0]) or ()) != site.out_rank:
        return None
    for m in site.masks:
        if m.kind != "additive" or _pure_mask(ad, m.value, m.coeff):
            continue
        if not isinstance(m.node, ir.Node) or m.value not in list(m.node.inputs) or m.node.op_type not in ("Add", "Sub"):
            return None
    # a mask computed from the scores themselves (top-k style) would make Q depend on its own product
    if any(_reaches(m.value, qk) for m in site.masks):
        return None
    return qk


def _reaches(v: ir.Value, target: ir.Node, limit: int = 4096) -> bool:
    """True if ``target`` is an ancestor of ``v``."""
    stack, seen = [v], set()
    while stack and len(seen) < limit:
        x = stack.pop()
        p = x.producer() if isinstance(x, ir.Value) else None
        if p is None or id(p) in seen:
            continue
        if p is target:
            return True
        seen.add(id(p))
        stack.extend(i for i in p.inputs if i is not None)
    return len(seen) >= limit


def _ssmax_scores(model: ir.Model, ad: OnnxAdapter, site: AttentionSite, s: float, bias: float | None) -> None:
    """SSMax on the softmax input: ``Where(allowed, x * f, finfo.min)`` (``semantics.ssmax_logits``)."""
    sm = site.softmax
    x = sm.inputs[0]
    bld = _Builder(sm, f"attnpass/ssmax_{site.index}")
    keys = _site_keys(bld, ad, site)
    n, how = keys.count(_size(bld, x, -2), _size(bld, x, -1), bld.op("Shape", [x]))
    site.notes.append(f"SSMax n counted from the {_HOW[how]}; scores scaled by the factor")
    f = _factor(model, bld, site, n, s, bias, site.out_rank)
    z = bld.op("Mul", [_to_float(bld, x), f])
    if x.dtype not in (None, ir.DataType.FLOAT):
        z = bld.op("Cast", [z], {"to": x.dtype})
    allowed = keys.allowed()
    if allowed is not None:
        z = bld.op("Where", [allowed, z, bld.scalar_like(_float_min(x), z)])
    bld.commit()
    sm.replace_input_with(0, z)


def _scores_shape(b: _Builder, q4: ir.Value, k4: ir.Value) -> ir.Value:
    """``[B, H, S_q, S_k]`` of 4-D Q and K (K in ``[B, H_kv, S_k, D]``)."""
    return b.op("Concat", [b.op("Shape", [q4], {"start": 0, "end": 3}), b.op("Shape", [k4], {"start": 2, "end": 3})], {"axis": 0})


_HOW = {"length": "key length (no mask)", "keys": "key-only mask factor", "causal": "causal structure (Range)",
        "causal+keys": "cumulative sum of the key-only mask factor under the causal structure",
        "mask": "mask at its own (unbroadcast) shape", "full": "mask broadcast to the scores (rank unknown)"}


def _ssmax_fused_op(model: ir.Model, ad: OnnxAdapter, site: AttentionSite, s: float, bias: float | None) -> None:
    node = site.softmax
    dom, op = _domain(node), node.op_type
    bld = _Builder(node, f"attnpass/ssmax_{site.index}")
    q, k = node.inputs[0], node.inputs[1]
    heads = site.heads
    three_d = _three_d(ad, node)
    if three_d:
        kv_heads = site.kv_heads or heads
        q4 = bld.op("Transpose", [bld.op("Reshape", [q, bld.ints(0, 0, int(heads), -1)])], {"perm": [0, 2, 1, 3]})
        k4 = bld.op("Transpose", [bld.op("Reshape", [k, bld.ints(0, 0, int(kv_heads), -1)])], {"perm": [0, 2, 1, 3]})
    else:
        q4, k4 = q, k
    mask_index = 5 if (dom, op) == (MS, "MultiHeadAttention") else 3
    mask = _at(list(node.inputs), mask_index)
    keys = _Keys(bld, ad)
    if mask is not None:
        if mask.dtype == ir.DataType.BOOL:
            keys.add_bool(mask, True)
        else:
            keys.add_additive(mask)
    sq, sk = _size(bld, q4, 2), _size(bld, k4, 2)
    if ad.attr(node, "is_causal"):
        keys.add_causal_op(sq, sk)
    n, how = keys.count(sq, sk, _scores_shape(bld, q4, k4))
    site.notes.append(f"SSMax n counted from the {_HOW[how]}")
    f = _factor(model, bld, site, n, s, bias, 4)  # [B, H, S_q, 1]
    if three_d:
        qf = bld.op("Mul", [_to_float(bld, bld.op("Reshape", [q, bld.ints(0, 0, int(heads), -1)])),
                           bld.op("Transpose", [_expand_heads(bld, f)], {"perm": [0, 2, 1, 3]})])
        new_q = bld.op("Reshape", [qf, bld.ints(0, 0, -1)])
    else:
        new_q = bld.op("Mul", [_to_float(bld, q), f])
    if q.dtype not in (None, ir.DataType.FLOAT):
        new_q = bld.op("Cast", [new_q], {"to": q.dtype})
    new_mask = None
    if mask is not None and mask.dtype != ir.DataType.BOOL and not _pure_mask(ad, mask, 1.0):
        keep = bld.op("Greater", [mask, bld.scalar_like(semantics.MASKED_BELOW, mask)])
        scaled = bld.op("CastLike", [bld.op("Mul", [_to_float(bld, mask), f]), mask])
        new_mask = bld.op("Where", [keep, scaled, mask])
    bld.commit()
    node.replace_input_with(0, new_q)
    if new_mask is not None:
        node.replace_input_with(mask_index, new_mask)


def _expand_heads(b: _Builder, f: ir.Value) -> ir.Value:
    """The factor (``[S_q, 1]`` .. ``[B, H, S_q, 1]``) made rank 4 without growing it, so it can be transposed."""
    return b.op("Expand", [f, b.ints(1, 1, 1, 1)])


# ------------------------------------------------------------------ fused

TARGETS = ("ort", "onnx23")


def fuse_blocker(site: AttentionSite, target: str) -> str | None:
    """Why a site stays unfused for ``target`` (None: it fuses)."""
    if site.form != "explicit":
        return "already fused"
    if site.fuse_blocker:
        return site.fuse_blocker
    if target == "ort" and site.softcap is not None:
        return "soft-capping: com.microsoft.MultiHeadAttention has no softcap (use --target onnx23)"
    if not isinstance(site.heads, int):
        return "the number of heads is not known statically"
    if site.q.rank not in (3, 4) or site.q.rank == 3 and target == "ort":
        return f"scores of rank {site.out_rank}: heads are not a separate axis"
    return None


def _prepare(b: _Builder, op: Any, transpose: bool = True) -> ir.Value:
    v = op.value
    if op.perm is not None:
        v = b.op("Transpose", [v], {"perm": list(op.perm)})
    if op.rank < 4:
        v = b.op("Unsqueeze", [v, b.ints(*range(4 - op.rank))])
    if op.transposed and transpose:
        v = b.op("Transpose", [v], {"perm": [0, 1, 3, 2]})
    if op.groups > 1:
        g = op.groups
        x = b.op("Expand", [b.op("Unsqueeze", [v, b.ints(2)]), b.ints(1, 1, g, 1, 1)])
        target = b.op("Concat", [b.op("Shape", [v], {"start": 0, "end": 1}), b.ints(-1), b.op("Shape", [v], {"start": 2, "end": 4})], {"axis": 0})
        v = b.op("Reshape", [x, target])
    return v


def _op_bias(b: _Builder, ad: OnnxAdapter, site: AttentionSite, q4: ir.Value, k4: ir.Value,
             factor: ir.Value | None = None) -> ir.Value | None:
    """The fused op's additive bias: additive terms (times their coefficients) summed, bool terms as finfo.min.

    With an SSMax ``factor`` (Q pre-scaled by it), a term's finite, attendable entries are logits and are
    scaled by the factor too (``semantics.ssmax_sdpa``); pure ``0 / finfo.min`` masks need no scaling.
    """
    add: ir.Value | None = None
    for m in site.masks:
        if m.kind != "additive":
            continue
        t = m.value if m.coeff == 1.0 else b.op("Mul", [m.value, b.scalar_like(m.coeff, m.value)])
        if factor is not None and not _pure_mask(ad, m.value, m.coeff):
            keep = b.op("Greater", [t, b.scalar_like(semantics.MASKED_BELOW, t)])
            t = b.op("Where", [keep, b.op("CastLike", [b.op("Mul", [_to_float(b, t), factor]), t]), t])
        add = t if add is None else b.op("Add", [add, t])
    keep = _allowed(b, type(site)(**{**site.__dict__, "masks": [m for m in site.masks if m.kind == "bool"]}))
    if add is not None:
        add = b.op("CastLike", [add, q4])
    if keep is not None:
        base = add if add is not None else b.op("CastLike", [b.const(0.0, np.float32), q4])
        add = b.op("Where", [keep, base, b.scalar_like(_float_min(q4), q4)])
    if add is None:
        return None
    target = b.op("Concat", [b.ints(1, 1), b.op("Shape", [q4], {"start": 2, "end": 3}), b.op("Shape", [k4], {"start": 2, "end": 3})], {"axis": 0})
    return b.op("Expand", [add, target])


def fuse(model: ir.Model, report: Report, target: str = "ort",
         ssmax: tuple[float, float | None] | None = None) -> dict[int, str]:
    """Replace each fusable chain by ``com.microsoft.MultiHeadAttention`` (``ort``) or ``Attention`` (``onnx23``).

    Returns {site index: why it stayed unfused}.  GQA K/V are repeated to the query heads for
    MultiHeadAttention (onnxruntime's CPU GroupQueryAttention is decode-oriented: causal only,
    with seqlens/KV-cache inputs); opset-23 ``Attention`` takes the grouped K/V as they are.

    ``ssmax=(s, b)`` fuses SSMax attention: Q is multiplied by the per-row factor ``s log n + b``
    (``n`` counted from the site's masks, as in ``to_ssmax``) and the finite part of an additive
    mask with it.  A site that cannot fuse still gets SSMax, unfused, so the whole model has one meaning.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown fused target {target!r} (choose from {', '.join(TARGETS)})")
    ad = OnnxAdapter(model)
    left: dict[int, str] = {}
    for site in report.sites:
        why = fuse_blocker(site, target)
        if why is None and ssmax is not None and site.softcap is not None:
            why = "soft-capping with SSMax: the factor multiplies the capped scores, a pre-scaled Q would be capped too"
        if why is not None:
            if ssmax is not None:
                blocked = ssmax_blocker(ad, site)
                if blocked is not None:
                    why = f"{why}; SSMax not applied: {blocked}"
                elif site.form == "explicit":
                    _ssmax_explicit(model, ad, site, *ssmax)
                    why = f"{why} (SSMax applied unfused)"
                else:
                    _ssmax_fused_op(model, ad, site, *ssmax)
                    why = f"{why} (SSMax applied to its Q)"
            left[site.index] = why
            continue
        mms = [n for n in site.nodes if n.op_type in ("MatMul", "Einsum")]
        anchor = mms[-1]
        b = _Builder(anchor, f"attnpass/fused_{site.index}")
        q4 = _prepare(b, site.q)
        k4 = _prepare(b, site.k, transpose=True) if target == "ort" else _prepare_gqa(b, site.k)
        v4 = _prepare(b, site.v) if target == "ort" else _prepare_gqa(b, site.v)
        factor, n = None, None
        if ssmax is not None:
            keys = _site_keys(b, ad, site)
            n, how = keys.count(_size(b, q4, 2), _size(b, k4, 2), _scores_shape(b, q4, k4))
            site.notes.append(f"SSMax n counted from the {_HOW[how]}; Q pre-scaled by the factor")
            factor = _factor(model, b, site, n, ssmax[0], ssmax[1], 4)
            qdt = site.q.value.dtype
            scaled = b.op("Mul", [q4 if qdt in (None, ir.DataType.FLOAT) else b.op("Cast", [q4], {"to": ir.DataType.FLOAT}), factor])
            q4 = scaled if qdt in (None, ir.DataType.FLOAT) else b.op("Cast", [scaled], {"to": qdt})
        bias = _op_bias(b, ad, site, q4, k4, factor)
        heads = int(site.heads)  # type: ignore[arg-type]
        if target == "ort":
            to3 = [b.op("Reshape", [b.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), b.ints(0, 0, -1)]) for x in (q4, k4, v4)]
            out3 = b.op("MultiHeadAttention", [*to3, None, None, bias], {"num_heads": heads, "scale": float(site.scale)}, domain=MS)
            out = b.op("Transpose", [b.op("Reshape", [out3, b.ints(0, 0, heads, -1)])], {"perm": [0, 2, 1, 3]})
        else:
            attrs: dict[str, Any] = {"scale": float(site.scale)}
            if site.softcap is not None:
                attrs["softcap"] = float(site.softcap)
            out = b.op("Attention", [q4, k4, v4, bias], attrs)
            if site.masks and _finite_fill(ad, site):
                out = _uniform_empty_rows(b, ad, site, out, q4, k4, v4, n)
        if site.q.rank < 4:
            out = b.op("Squeeze", [out, b.ints(*range(4 - site.q.rank))])
        if site.out_perm is not None:
            out = b.op("Transpose", [out], {"perm": list(site.out_perm)})
        for cond, zero_when in site.row_guards:
            c = cond if zero_when else b.op("Not", [cond])
            out = b.op("Where", [c, b.op("CastLike", [b.const(0.0, np.float32), out]), out])
        if site.out.dtype is not None and site.q.value.dtype not in (None, site.out.dtype):
            out = b.op("Cast", [out], {"to": site.out.dtype})
        b.commit()
        _replace_keeping_name(site.out, out)
        fn = _function_of(model, anchor)
        if fn is not None:  # a function body imports its own opsets
            if target == "ort":
                fn.opset_imports.setdefault(MS, 1)
            else:
                fn.opset_imports[""] = max(fn.opset_imports.get("", 1), 23)
    if len(left) < len(report.sites) and target == "ort":
        model.opset_imports.setdefault(MS, 1)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return left


def _finite_fill(ad: OnnxAdapter, site: AttentionSite) -> bool:
    """True if every mask term of the site masks with a known, finite value (``finfo.min``, not ``-inf``)."""
    for m in site.masks:
        node = m.node if m.kind == "bool" else None
        if m.kind == "additive":
            v = m.value
            for _ in range(8):
                p = v.producer()
                if p is None or p.op_type not in ("Cast", "CastLike", "Identity", "Expand"):
                    break
                v = p.inputs[0]
            node = v.producer()
        if not isinstance(node, ir.Node) or node.op_type != "Where":
            return False
        fills = [ad.constant(x) for x in node.inputs[1:3]]
        masked = [f for f in fills if f is not None and f <= semantics.MASKED_BELOW]
        if len(masked) != 1 or not math.isfinite(masked[0]):
            return False
    return True


def _uniform_empty_rows(b: _Builder, ad: OnnxAdapter, site: AttentionSite, out: ir.Value, q4: ir.Value,
                        k4: ir.Value, v4: ir.Value, n: ir.Value | None) -> ir.Value:
    """Rows with no attendable key, as the original graph computes them.

    With a finite mask value (``finfo.min``) every logit of such a row rounds to the same number, so the
    original softmax is uniform and the row is the mean of V (a sliding window over right padding does
    this in Gemma-2).  Opset-23 ``Attention`` gives those rows zeros instead; this puts the mean back.
    """
    if n is None:
        n, _ = _site_keys(b, ad, site).count(_size(b, q4, 2), _size(b, k4, 2), _scores_shape(b, q4, k4))
    mean_v = b.op("ReduceMean", [v4, b.ints(2)], {"keepdims": 1})  # [B, H_kv, 1, D]
    g = site.v.groups
    if g > 1:
        x = b.op("Expand", [b.op("Unsqueeze", [mean_v, b.ints(2)]), b.ints(1, 1, g, 1, 1)])
        target = b.op("Concat", [b.op("Shape", [mean_v], {"start": 0, "end": 1}), b.ints(-1), b.op("Shape", [mean_v], {"start": 2, "end": 4})], {"axis": 0})
        mean_v = b.op("Reshape", [x, target])
    empty = b.op("Equal", [n, b.const(np.zeros(1, np.float32))])
    return b.op("Where", [empty, b.op("CastLike", [mean_v, out]), out])


def _function_of(model: ir.Model, node: ir.Node) -> ir.Function | None:
    """The model-local function whose body holds ``node`` (None for the main graph and its subgraphs)."""
    return next((f for f in model.functions.values() if node.graph is f.graph), None)


def _prepare_gqa(b: _Builder, op: Any) -> ir.Value:
    """K or V for opset-23 ``Attention``: grouped heads stay grouped (the op repeats them itself)."""
    return _prepare(b, type(op)(**{**op.__dict__, "groups": 1}))


__all__ = ["OnnxAdapter", "find", "fuse", "to_ssmax", "fuse_blocker", "ssmax_blocker", "FUSED_OPS", "TARGETS"]


def _replace_keeping_name(old: ir.Value, new: ir.Value) -> None:
    """Replace ``old`` everywhere; a graph output keeps its name, which is the model's interface."""
    if old.is_graph_output():
        name = old.name
        old.name = f"{name}__replaced"
        new.name = name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
