"""torch.fx adapter for the matcher (the rewrites are in ``attnpass/rewrite/fx.py``).

The adapter reads both graph flavours users hand us:

* ATen graphs from ``torch.export`` (``aten.matmul``, ``aten.softmax.int``, ``aten.where.ScalarOther``
  for HF's ``finfo.min`` masks, ``aten.transpose.int`` for ``K^T``, the ``unsqueeze -> expand ->
  reshape`` of HF's ``repeat_kv``, ``aten.bmm`` with ``expand/view`` around it after core-ATen
  decomposition, ``aten._safe_softmax`` and the ``where(any(...), 0, p)`` guard of a decomposed SDPA);
* torch-level graphs from dynamo inside the ``torch.compile`` backend (``torch.matmul``,
  ``F.softmax``, ``operator.mul``, ``Tensor.masked_fill`` and friends).  These are rewritten where
  they stand rather than lowered to ATen first: lowering before the rewrite would split the
  softmax between the forward and backward graphs in training.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from attnpass.passes import topk_ir
from attnpass.passes.aten import ATEN_KINDS
from attnpass.passes.match import Dim, Kind, Report, find_sites

aten = torch.ops.aten

# ------------------------------------------------------------------ op tables

# Python-level spellings dynamo graphs use, on top of the shared ATen table
_ATEN_KINDS: dict[str, Kind] = {
    **ATEN_KINDS,
    "float": Kind.CAST,
    "detach_": Kind.IDENTITY,
    "native_dropout": Kind.OTHER,
    "__and__": Kind.AND,
    "__or__": Kind.OR,
    "tensor": Kind.CONSTANT,
}

# In-place arithmetic on the scores (``scores /= d`` in HF Falcon, ``scores.masked_fill_``): torch.export
# keeps the ``*_`` ATen ops and dynamo keeps ``operator.i*`` / ``Tensor.*_``; each is its functional twin.
_INPLACE: dict[str, str] = {
    "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "masked_fill_": "masked_fill",
    "__iadd__": "add", "__isub__": "sub", "__imul__": "mul", "__itruediv__": "div",
}

_PY_OPS: dict[Any, str] = {
    operator.matmul: "matmul", operator.mul: "mul", operator.truediv: "div", operator.add: "add",
    operator.sub: "sub", operator.iadd: "add", operator.isub: "sub", operator.imul: "mul", operator.itruediv: "div",
    operator.and_: "__and__", operator.or_: "__or__", operator.invert: "bitwise_not",
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq", operator.ne: "ne",
    F.softmax: "softmax", F.dropout: "dropout", F.scaled_dot_product_attention: "scaled_dot_product_attention",
    torch._C._nn.scaled_dot_product_attention: "scaled_dot_product_attention",
}

# Nodes that only assert on a value: they must not count as users, and go when the value goes.
_IGNORED_USERS = {"_assert_tensor_metadata", "sym_constrain_range_for_size", "_assert_scalar", "sym_size"}

_FILLS = {"zeros": 0.0, "ones": 1.0, "new_ones": 1.0, "new_zeros": 0.0, "zeros_like": 0.0, "ones_like": 1.0}


def _op_name(node: fx.Node) -> str | None:
    """The ATen-style name of what a node computes, for every graph flavour."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op != "call_function":
        return None
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    if t in _PY_OPS:
        return _PY_OPS[t]
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", None)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


class FxAdapter:
    """Answers the matcher's questions about a torch.fx graph (values are nodes)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self._static: dict[fx.Node, bool] = {}
        self._versions: dict[fx.Node, dict[fx.Node, fx.Node]] | None = None
        self._version_users: dict[fx.Node, list[fx.Node]] = {}

    def _version_map(self) -> dict[fx.Node, dict[fx.Node, fx.Node]]:
        """Which in-place result each node really reads.

        dynamo keeps ``scores.mul_(c)`` as a method call whose result nobody uses: later nodes read
        ``scores`` itself, already mutated.  For the walk that reference must mean the last in-place op on
        ``scores`` before the reader, so the chain reads functionally (``softmax(mul_(scores))``).
        torch.export graphs read the in-place results directly, so nothing is remapped there.
        """
        if self._versions is None:
            versions: dict[fx.Node, dict[fx.Node, fx.Node]] = {}
            latest: dict[fx.Node, fx.Node] = {}
            for n in self.graph.nodes:
                remap = {x: latest[x] for x in n.all_input_nodes if x in latest and latest[x] is not n}
                if remap:
                    versions[n] = remap
                    for new in remap.values():
                        self._version_users.setdefault(new, []).append(n)
                name = _op_name(n)
                if name in _INPLACE and n.args and isinstance(n.args[0], fx.Node):
                    base = n.args[0]
                    latest[base] = n
                    for root, cur in list(latest.items()):
                        if cur is base:
                            latest[root] = n
            self._versions = versions
        return self._versions

    def _read(self, node: fx.Node, value: Any) -> Any:
        """``value`` as ``node`` reads it (see ``_version_map``)."""
        if not isinstance(value, fx.Node):
            return value
        return self._version_map().get(node, {}).get(value, value)

    def nodes(self) -> Iterable[fx.Node]:
        return self.graph.nodes

    def _name(self, node: fx.Node) -> str | None:
        return _op_name(node)

    def kind(self, node: fx.Node) -> Kind:
        name = _op_name(node)
        name = _INPLACE.get(name, name) if name is not None else None
        if name is None:
            return Kind.OTHER
        if name == "getitem":
            src = node.args[0]
            if isinstance(src, fx.Node) and _op_name(src) == "native_dropout" and node.args[1] == 0:
                return Kind.DROPOUT
            return Kind.OTHER
        if name == "view" and len(node.args) > 1 and isinstance(node.args[1], torch.dtype):
            return Kind.OTHER  # a bit-cast, not a reshape
        if name in ("to", "type") and not self._is_cast(node):
            return Kind.IDENTITY
        if name == "add" and _arg(node, 2, "alpha", 1) != 1:
            return Kind.OTHER
        if name == "arange" and len(node.args) > 2 and _arg(node, 2, "step", 1) not in (1, None):
            return Kind.OTHER
        return _ATEN_KINDS.get(name, Kind.OTHER)

    def _is_cast(self, node: fx.Node) -> bool:
        for a in list(node.args[1:]) + list(node.kwargs.values()):
            if isinstance(a, torch.dtype):
                return True
        return False

    def inputs(self, node: fx.Node) -> list[Any]:
        return [self._read(node, x) if isinstance(x, fx.Node) else x for x in self._raw_inputs(node)]

    def _raw_inputs(self, node: fx.Node) -> list[Any]:
        name = _op_name(node)
        name = _INPLACE.get(name, name) if name is not None else None
        if name == "getitem":
            return self.inputs(node.args[0])
        if name == "masked_fill":
            return [node.args[1], node.args[2], node.args[0]]
        if name == "where":
            return list(node.args[:3])
        if name == "einsum":
            ops = node.args[1:]
            if len(ops) == 1 and isinstance(ops[0], list | tuple):
                ops = ops[0]
            return list(ops)
        if name == "scaled_dot_product_attention":
            return [node.args[0], node.args[1], node.args[2], _arg(node, 3, "attn_mask")]
        if name in ("expand_as", "type_as"):
            return [node.args[0]]
        return [a for a in node.args]

    def output(self, node: fx.Node) -> fx.Node:
        return node

    def producer(self, value: Any) -> fx.Node | None:
        if isinstance(value, fx.Node) and value.op in ("call_function", "call_method"):
            return value
        return None

    def users(self, value: Any) -> list[fx.Node]:
        if not isinstance(value, fx.Node):
            return []
        versions = self._version_map()
        direct = [u for u in value.users if versions.get(u, {}).get(value, value) is value]
        found = direct + [u for u in self._version_users.get(value, []) if u not in direct]
        return [u for u in found if u.op != "output" and _op_name(u) not in _IGNORED_USERS]

    def is_graph_output(self, value: Any) -> bool:
        if not isinstance(value, fx.Node):
            return False
        versions = self._version_map()
        outs = [u for u in value.users if u.op == "output" and versions.get(u, {}).get(value, value) is value]
        return bool(outs) or any(u.op == "output" for u in self._version_users.get(value, []))

    def constant(self, value: Any) -> float | None:
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, fx.Node):
            name = _op_name(value)
            if value.op == "call_function" and _ATEN_KINDS.get(name or "") is Kind.CONSTANT:
                return self.attr(value, "fill")
            if value.op in ("call_function", "call_method") and self.kind(value) in (Kind.IDENTITY, Kind.CAST):
                return self.constant(value.args[0]) if value.args else None
            if value.op == "get_attr":
                t = _fetch_attr(self.gm, str(value.target))
                if isinstance(t, torch.Tensor) and t.numel() == 1 and not isinstance(t, torch.nn.Parameter):
                    return float(t.item())
        return None

    def attr(self, node: fx.Node, name: str, default: Any = None) -> Any:
        op = _op_name(node)
        rank = len(self.shape(node) or ())
        if op in ("softmax", "_softmax", "_safe_softmax") and name == "axis":
            return _arg(node, 1, "dim", default)
        if op in ("transpose", "permute", "t") and name == "perm":
            if op == "t":
                return [1, 0]
            if op == "permute":
                dims = node.args[1:] if not isinstance(node.args[1], list | tuple) else node.args[1]
                return list(dims)
            d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
            if not isinstance(d0, int) or not isinstance(d1, int) or rank == 0:
                return None
            perm = list(range(rank))
            perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
            return perm
        if op == "unsqueeze" and name == "dim":
            return _arg(node, 1, "dim")
        if op == "repeat_interleave":
            if name == "repeats":
                r = _arg(node, 1, "repeats")
                return r if isinstance(r, int) else None
            if name == "dim":
                return _arg(node, 2, "dim")
        if op in ("dropout", "getitem"):
            src = node.args[0] if op == "getitem" else node
            if name == "p":
                return _arg(src, 1, "p", 0.5)
            if name == "train":
                t = _arg(src, 2, "train", _arg(src, 2, "training", None))
                return t if isinstance(t, bool) else None
        if op == "scaled_dot_product_attention":
            idx = {"dropout_p": 4, "is_causal": 5, "scale": 6, "enable_gqa": 7}.get(name)
            if idx is not None:
                return _arg(node, idx, name, default)
        if op == "baddbmm" and name in ("beta", "alpha"):
            return node.kwargs.get(name, default if default is not None else 1.0)
        if op == "einsum" and name == "equation":
            return node.args[0]
        if op in ("le", "lt", "ge", "gt", "eq", "ne") and name == "op":
            return op
        if op in ("tril", "triu") and name == "diagonal":
            return _arg(node, 1, "diagonal", 0)
        if op == "arange" and name == "start":
            return node.args[0] if len(node.args) >= 2 else 0
        if name == "fill":
            if op in _FILLS:
                return _FILLS[op]
            if op in ("full", "new_full"):
                v = node.args[-1] if op == "full" and len(node.args) >= 2 else _arg(node, 2, "fill_value")
                return float(v) if isinstance(v, int | float) else None
            if op == "full_like":
                v = _arg(node, 1, "fill_value")
                return float(v) if isinstance(v, int | float) else None
            if op in ("scalar_tensor", "tensor"):
                v = node.args[0] if node.args else None
                return float(v) if isinstance(v, int | float) else None
        return default

    def shape(self, value: Any) -> tuple[Dim, ...] | None:
        if not isinstance(value, fx.Node):
            return () if isinstance(value, int | float) else None
        val = value.meta.get("val", value.meta.get("example_value"))
        if isinstance(val, torch.Tensor):
            return tuple(d if isinstance(d, int) else str(d) for d in val.shape)
        return None

    def is_scalar(self, value: Any) -> bool:
        """A symbolic Python scalar (SymInt/SymFloat from ``q.size(-1)`` under dynamic shapes)."""
        if not isinstance(value, fx.Node):
            return False
        val = value.meta.get("val", value.meta.get("example_value"))
        return isinstance(val, torch.SymInt | torch.SymFloat | int | float)

    def dtype(self, value: Any) -> torch.dtype | None:
        if not isinstance(value, fx.Node):
            return None
        val = value.meta.get("val", value.meta.get("example_value"))
        return val.dtype if isinstance(val, torch.Tensor) else None

    def is_bool(self, value: Any) -> bool:
        return self.dtype(value) == torch.bool

    def is_static(self, value: Any) -> bool:
        """True if ``value`` is computed from parameters/buffers/constants only (never from the inputs)."""
        if not isinstance(value, fx.Node):
            return True
        if value in self._static:
            return self._static[value]
        stack = [value]
        order: list[fx.Node] = []
        while stack:
            n = stack.pop()
            if n in self._static or n in order:
                continue
            order.append(n)
            stack.extend(x for x in n.all_input_nodes if x not in self._static)
        for n in reversed(order):
            if n.op == "placeholder":
                self._static[n] = False
            elif n.op == "get_attr":
                self._static[n] = True
            else:
                self._static[n] = all(self._static.get(x, False) for x in n.all_input_nodes)
        return self._static[value]

    def name(self, node: Any) -> str:
        return node.name if isinstance(node, fx.Node) else str(node)

    def reduction(self, node: Any) -> Any:
        """A top-k / max / argmax / sum node described for the top-k walk (``passes/topk.py``), else None."""
        return topk_ir.fx_reduction(self, node)

    def static_value(self, value: Any, limit: int = 1 << 24) -> Any | None:
        """Evaluate a constant-only subgraph (e.g. ``bias[:s, :s]`` of a ``tril`` buffer) to numpy."""
        if not isinstance(value, fx.Node) or not self.is_static(value):
            return None
        env: dict[fx.Node, Any] = {}
        order: list[fx.Node] = []
        stack = [value]
        while stack:
            n = stack.pop()
            if n in env or n in order:
                continue
            order.append(n)
            stack.extend(n.all_input_nodes)
        try:
            for n in sorted(order, key=_position(self.graph)):
                if n.op == "get_attr":
                    env[n] = _fetch_attr(self.gm, str(n.target))
                elif n.op == "call_function":
                    args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda x: env[x])
                    env[n] = n.target(*args, **kwargs)
                else:
                    return None
        except Exception:
            return None
        out = env[value]
        if not isinstance(out, torch.Tensor) or out.numel() > limit:
            return None
        return out.detach().cpu().numpy()


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# ------------------------------------------------------------------ finding

def find(gm: fx.GraphModule) -> Report:
    """Attention sites in an fx graph (ATen or torch level)."""
    return find_sites(FxAdapter(gm))


__all__ = ["FxAdapter", "find"]
