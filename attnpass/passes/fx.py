"""torch.fx adapter for the matcher, and the two rewrites on fx graphs.

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

from attnpass import semantics
from attnpass.passes.aten import ATEN_KINDS
from attnpass.passes.match import AttentionSite, Dim, Kind, MaskTerm, Operand, Report, find_sites

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
    adapter = FxAdapter(gm)
    report = find_sites(adapter)
    for site in report.sites:
        _check_causal_alignment(site)
    return report


def _check_causal_alignment(site: AttentionSite) -> None:
    """A causal mask proven from its construction is top-left aligned; the op's is bottom-right.

    They agree only when ``S_q == S_k``; otherwise the mask stays explicit (still correct, no skipping).
    """
    if site.form != "explicit" or site.seq_q == site.seq_k:
        return
    for m in site.masks:
        m.causal = m.only_causal = False
    site.causal = False


# ------------------------------------------------------------------ rewriting helpers

class _Builder:
    """Inserts nodes at one place in the graph with meta['val'] kept, so later passes can read shapes."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs)


def _prepare(b: _Builder, op: Operand, transpose: bool = True) -> fx.Node:
    v = op.value
    if op.perm is not None:
        v = b.call(aten.permute.default, v, list(op.perm))
    if op.transposed and transpose:
        v = b.call(aten.transpose.int, v, -2, -1)
    for _ in range(4 - op.rank):
        v = b.call(aten.unsqueeze.default, v, 0)
    return v


def _allowed(b: _Builder, masks: list[MaskTerm], skip_only_causal: bool) -> fx.Node | None:
    """Bool tensor (broadcastable to the scores): True where a key stays attendable."""
    parts: list[fx.Node] = []
    for m in masks:
        if skip_only_causal and m.only_causal:
            continue
        if m.kind == "bool":
            parts.append(m.value if m.attend_when else b.call(aten.logical_not.default, m.value))
        else:
            t = m.value if m.coeff == 1.0 else b.call(aten.mul.Tensor, m.value, m.coeff)
            parts.append(b.call(aten.gt.Scalar, t, semantics.MASKED_BELOW))
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = b.call(aten.logical_and.default, out, p)
    return out


def _op_mask(b: _Builder, site: AttentionSite) -> fx.Node | None:
    """The single ``attn_mask`` the fused op takes: additive terms summed, bool terms applied as -inf."""
    additive = [m for m in site.masks if m.kind == "additive" and not m.only_causal]
    boolean = [m for m in site.masks if m.kind == "bool" and not m.only_causal]
    add: fx.Node | None = None
    for m in additive:
        t = m.value if m.coeff == 1.0 else b.call(aten.mul.Tensor, m.value, m.coeff)
        add = t if add is None else b.call(aten.add.Tensor, add, t)
    keep = _allowed(b, boolean, skip_only_causal=True)
    if keep is None:
        return add
    if add is None:
        return keep
    return b.call(aten.where.ScalarOther, keep, add, float("-inf"))


def _unlift(b: _Builder, out: fx.Node, site: AttentionSite) -> fx.Node:
    lifted = 4 - site.q.rank
    if lifted > 0:
        out = b.call(aten.squeeze.dims, out, list(range(lifted)))
    if site.out_perm is not None:
        out = b.call(aten.permute.default, out, list(site.out_perm))
    return out


def _remove_dead(gm: fx.GraphModule, chain: set[fx.Node] = frozenset()) -> None:
    """Drop the replaced chain, including assert-only nodes that would keep it alive.

    Nodes of a replaced ``chain`` go even when fx calls them impure (an inference-mode dropout).
    """
    graph = gm.graph
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            name = _op_name(node)
            if name in _IGNORED_USERS and node.args and isinstance(node.args[0], fx.Node):
                src = node.args[0]
                if all(_op_name(u) in _IGNORED_USERS for u in src.users) and not any(u.op == "output" for u in src.users):
                    graph.erase_node(node)
                    changed = True
                continue
            if node.op in ("call_function", "call_method") and (node in chain or not node.is_impure()):
                graph.erase_node(node)
                changed = True
    graph.lint()
    gm.recompile()


def _insert_point(site: AttentionSite) -> fx.Node:
    """The PV matmul (or the SDPA call): every input the rewrite needs is defined before it."""
    if site.form == "sdpa":
        return site.softmax
    mms = [n for n in site.nodes if _op_name(n) in ("matmul", "bmm", "einsum", "mm")]
    return mms[-1]


def _copy_meta(new: fx.Node, old: fx.Node) -> None:
    for key in ("val", "example_value", "stack_trace", "nn_module_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


# ------------------------------------------------------------------ fuse

def _fuse_site(gm: fx.GraphModule, site: AttentionSite, ssmax: tuple[fx.Node, fx.Node | None] | None) -> None:
    """Replace one site by ``attnpass::attention`` (with SSMax parameters when ``ssmax`` is given)."""
    op = torch.ops.attnpass.attention.default
    ad = FxAdapter(gm)
    s_node, b_node = ssmax if ssmax is not None else (None, None)
    b = _Builder(gm.graph)
    with gm.graph.inserting_before(_insert_point(site)):
        q, k, v = (_prepare(b, o) for o in (site.q, site.k, site.v))
        for scalar, divide in site.q_scales:
            q = b.call(operator.truediv if divide else operator.mul, q, scalar)
        if site.form == "sdpa":
            node = site.softmax
            gqa = bool(ad.attr(node, "enable_gqa", False)) or site.k.groups > 1
            res = b.call(op, q, k, v, site.sdpa_mask, site.sdpa_is_causal, ad.attr(node, "scale"), s_node, b_node, None, gqa)
            out = _unlift(b, b.call(operator.getitem, res, 0), site)
        else:
            mask = _op_mask(b, site)
            gqa = site.k.groups > 1 or site.v.groups > 1 or (site.heads != site.kv_heads and site.kv_heads not in (None, 1))
            res = b.call(op, q, k, v, mask, site.causal, float(site.scale), s_node, b_node, site.softcap, gqa)
            out = _unlift(b, b.call(operator.getitem, res, 0), site)
            for cond, zero_when in site.row_guards:
                keep_zero = cond if zero_when else b.call(aten.logical_not.default, cond)
                out = b.call(aten.where.ScalarSelf, keep_zero, 0.0, out)
            want = ad.dtype(site.out)
            if want is not None and ad.dtype(site.q.value) not in (None, want):
                out = b.call(aten._to_copy.default, out, dtype=want)
    _copy_meta(out, site.out)
    site.out.replace_all_uses_with(out)


def fuse(gm: fx.GraphModule, report: Report | None = None) -> tuple[fx.GraphModule, Report]:
    """Replace each fusable site by one ``attnpass::attention`` call; returns the graph and the report."""
    report = find(gm) if report is None else report
    replaced: set[fx.Node] = set()
    for site in report.sites:
        if site.fusable:
            _fuse_site(gm, site, None)
            replaced.update(site.nodes)
    _remove_dead(gm, replaced)
    return gm, report


# ------------------------------------------------------------------ SSMax

SSMAX_MODULE = "attnpass_ssmax"


def _ssmax_params(gm: fx.GraphModule, site: AttentionSite, s: float, b: float | None, device: torch.device) -> tuple[fx.Node, fx.Node | None]:
    holder = getattr(gm, SSMAX_MODULE, None)
    if holder is None:
        holder = torch.nn.Module()
        gm.add_submodule(SSMAX_MODULE, holder)
    heads = site.heads if isinstance(site.heads, int) and site.q.rank == 4 else 1
    holder.register_parameter(f"s_{site.index}", torch.nn.Parameter(torch.full((heads,), float(s), device=device)))
    s_node = gm.graph.get_attr(f"{SSMAX_MODULE}.s_{site.index}")
    b_node = None
    if b is not None:
        holder.register_parameter(f"b_{site.index}", torch.nn.Parameter(torch.full((heads,), float(b), device=device)))
        b_node = gm.graph.get_attr(f"{SSMAX_MODULE}.b_{site.index}")
    return s_node, b_node


def _ssmax_site(gm: fx.GraphModule, site: AttentionSite, params: tuple[fx.Node, fx.Node | None]) -> None:
    """SSMax in the graph as it stands: the softmax input times the per-row factor (or Q, for SDPA calls)."""
    s_node, b_node = params
    bld = _Builder(gm.graph)
    if site.form == "sdpa":
        node = site.softmax
        ad = FxAdapter(gm)
        with gm.graph.inserting_before(node):
            new = bld.call(
                semantics.ssmax_sdpa, site.q.value, site.k.value, site.v.value, site.sdpa_mask,
                float(ad.attr(node, "dropout_p", 0.0) or 0.0), site.sdpa_is_causal, ad.attr(node, "scale"),
                bool(ad.attr(node, "enable_gqa", False)) or site.k.groups > 1, s_node, b_node,
            )
        _copy_meta(new, node)
        node.replace_all_uses_with(new)
        return
    sm = site.softmax
    x = sm.args[0]
    with gm.graph.inserting_before(sm):
        allowed = _allowed(bld, site.masks, skip_only_causal=False)
        new_x = bld.call(semantics.ssmax_logits, x, allowed, s_node, b_node)
    _copy_meta(new_x, x)
    sm.replace_input_with(x, new_x)


def to_ssmax(gm: fx.GraphModule, s: float = semantics.DEFAULT_S, b: float | None = None,
             report: Report | None = None, fused: bool = False) -> tuple[fx.GraphModule, Report]:
    """Turn every attention site's softmax into SSMax, with ``s`` (and ``b``) as trainable ``[H]`` parameters.

    ``fused=True`` emits ``attnpass::attention`` with the SSMax parameters for every fusable site
    (SSMax at the speed of fused attention) and rewrites the others in place.
    """
    report = find(gm) if report is None else report
    device = _graph_device(gm)
    replaced: set[fx.Node] = set()
    for site in report.sites:
        with gm.graph.inserting_before(_insert_point(site) if fused and site.fusable else site.softmax):
            params = _ssmax_params(gm, site, s, b, device)
        if fused and site.fusable:
            _fuse_site(gm, site, params)
            replaced.update(site.nodes)
        else:
            _ssmax_site(gm, site, params)
    _remove_dead(gm, replaced)
    return gm, report


def _graph_device(gm: fx.GraphModule) -> torch.device:
    for p in gm.parameters():
        return p.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


__all__ = ["FxAdapter", "find", "fuse", "to_ssmax"]
