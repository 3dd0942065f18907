"""torch-dialect MLIR adapter for the matcher, and the two rewrites as MLIR.

The adapter reads the torch dialect that users get from torch-mlir:

* ``torch_mlir.fx.export_and_import(..., output_type="raw")``: ATen after torch's core
  decompositions: ``aten.bmm`` wrapped in ``aten.expand``/``aten.view``, ``aten.permute`` for
  ``K^T``, ``aten._softmax``, ``aten.where.self`` with a ``vtensor.literal(-inf)`` for
  ``masked_fill``, ``aten.div.Scalar`` scales;
* ONNX through ``convert-torch-onnx-to-torch``: ``aten.matmul``, ``aten.transpose.int``,
  ``aten.softmax.int``, ``aten.div.Tensor`` by a 0-d literal;
* the torch *backend* form (``torch-onnx-to-torch-backend-pipeline`` or ``output_type="torch"``)
  where softmax is already decomposed into ``max.dim -> sub.Tensor -> exp -> sum.dim_IntList ->
  div.Tensor``.  The adapter presents that chain as one SOFTMAX node (anchored on the ``div``),
  so the matcher never learns about it.

The adapter builds a small Python graph (``_Node``/``_Val``) over the module once, because the
matcher compares values by identity and MLIR's Python objects are re-created on every access.

Rewrites replace a site by a ``func.call`` to a private function generated as linalg / tensor /
scf text (``torch_c.to_builtin_tensor`` / ``from_builtin_tensor`` at the boundary), parsed by the
MLIR parser and inserted with the bindings:

* ``ssmax``: the softmax input ``x`` becomes ``allowed ? (s_h log n_i + b_h) * x : finfo.min``
  with ``n_i`` counted in the IR from the site's masks (a reduction over keys), exactly
  ``semantics.ssmax_logits``;
* ``fused``: ``Q K^T -> ... -> P V`` becomes an ``scf.for`` over key tiles carrying the running
  max, normaliser and accumulator (the online-softmax recurrence); the largest tensor it builds
  is ``S_q x tile``, never ``S_q x S_k``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from attnpass import semantics
from attnpass.errors import AttnpassError
from attnpass.passes.aten import ATEN_KINDS
from attnpass.passes.match import AttentionSite, Dim, Kind, MaskTerm, Report, find_sites
from attnpass.passes.site import Notes

# ------------------------------------------------------------------ op tables

_FILLS = {"zeros": 0.0, "ones": 1.0, "new_ones": 1.0, "new_zeros": 0.0, "zeros_like": 0.0, "ones_like": 1.0}

# Ops without side effects in value semantics: safe to erase once unused.
_PURE_PREFIXES = ("torch.aten.", "torch.prim.ListConstruct", "torch.constant.", "torch.vtensor.literal",
                  "torch_c.", "torch.prims.")

# Ops that only assert on a value: not users of it, and erased with it.
_ASSERTS = ("torch.aten._assert_tensor_metadata", "torch.aten._assert_scalar", "torch.aten.sym_constrain_range_for_size")

# Ops that read only the shape and dtype of their first operand: not users of its values.
_SHAPE_ONLY = ("full_like", "zeros_like", "ones_like", "empty_like")

_VTENSOR = re.compile(r"^!torch\.vtensor<\[([^\]]*)\],([a-z0-9]+)>$")


@dataclass(eq=False)
class _Val:
    """One SSA value (compared by identity, as the matcher requires)."""

    value: Any
    type: str
    producer: _Node | None = None
    users: list[_Node] = field(default_factory=list)
    returned: bool = False

    def __repr__(self) -> str:  # the generated one walks producers and users: the whole graph
        return f"_Val({self.type})"

    @property
    def shape(self) -> tuple[Dim, ...] | None:
        m = _VTENSOR.match(self.type)
        if m is None:
            return () if self.type in ("!torch.float", "!torch.int", "!torch.bool") else None
        dims = m.group(1)
        if not dims:
            return ()
        return tuple(None if d.strip() == "?" else int(d) for d in dims.split(","))

    @property
    def dtype(self) -> str | None:
        m = _VTENSOR.match(self.type)
        return m.group(2) if m else None


@dataclass(eq=False)
class _Node:
    """One operation; ``aten`` is its ATen name without overload (``_softmax``, ``div``...)."""

    op: Any
    opname: str
    aten: str | None
    overload: str
    operands: list[_Val]
    results: list[_Val]
    label: str
    softmax_parts: list[_Node] = field(default_factory=list)  # decomposed softmax: max, sub, exp, sum

    def __repr__(self) -> str:
        return f"_Node({self.label} = {self.opname})"


def _aten_name(opname: str) -> tuple[str | None, str]:
    for prefix in ("torch.aten.", "torch.prims."):
        if opname.startswith(prefix):
            rest = opname[len(prefix):]
            base, _, overload = rest.partition(".")
            return base, overload
    return None, ""


class MlirAdapter:
    """Answers the matcher's questions about one ``func.func`` in torch dialect."""

    def no_key_test(self, cond: Any, scores: Any, zero_when: bool) -> bool:
        """A post-softmax guard that only zeroes rows with no attendable key (torch's safe-softmax).

        torch's decomposition of ``scaled_dot_product_attention`` (what ``torch_mlir.fx.export_and_import``
        applies by default) zeroes the rows whose scores are all ``-inf``:
        ``where(all(eq(x, -inf), -1, keepdim), full_like(p, 0), softmax(x))``; fx's own spelling is
        ``where(any(not(eq(x, -inf))), softmax(x), 0)``.
        """
        return _is_no_key_test(cond, scores, want_all=zero_when)

    def __init__(self, func_op: Any):
        from torch_mlir import ir

        self.func = func_op
        self._ir = ir
        self._static: dict[int, bool] = {}
        self.vals: dict[Any, _Val] = {}
        self.node_list: list[_Node] = []
        state = ir.AsmState(func_op)
        block = func_op.regions[0].blocks[0]
        for arg in block.arguments:
            self._val(arg)
        for op in block.operations:
            o = op.operation
            name = o.name
            if name == "func.return":
                for v in o.operands:
                    self._val(v).returned = True
                continue
            aten, overload = _aten_name(name)
            label = o.results[0].get_name(state) if len(o.results) else name
            node = _Node(o, name, aten, overload, [self._val(v) for v in o.operands], [], label)
            node.results = [self._val(r) for r in o.results]
            for r in node.results:
                r.producer = node
            for v in node.operands:
                if node not in v.users:
                    v.users.append(node)
            self.node_list.append(node)
        self._decomposed_softmax: dict[int, _Node] = {}
        for n in self.node_list:
            self._mark_decomposed_softmax(n)

    def _val(self, v: Any) -> _Val:
        got = self.vals.get(v)
        if got is None:
            got = _Val(v, str(v.type))
            self.vals[v] = got
        return got

    # -------------------------------------------------------------- decomposed softmax
    def _mark_decomposed_softmax(self, div: _Node) -> None:
        """``e / sum(e)`` with ``e = exp(x - max(x))``, all over one axis: torch's softmax decomposition."""
        if div.aten != "div" or div.overload != "Tensor":
            return
        e, total = div.operands[:2]
        sm_sum = total.producer
        exp = e.producer
        if exp is None or exp.aten != "exp" or sm_sum is None or sm_sum.aten != "sum" or sm_sum.operands[0] is not e:
            return
        sub = exp.operands[0].producer
        if sub is None or sub.aten != "sub" or self.constant(sub.operands[2]) != 1.0:
            return
        x, mx = sub.operands[:2]
        mnode = mx.producer
        if mnode is None or mnode.aten not in ("max", "amax") or mnode.operands[0] is not x:
            return
        axis = self._int(mnode.operands[1]) if mnode.aten == "max" else _first(self._ints(mnode.operands[1]))
        sum_axes = self._ints(sm_sum.operands[1])
        if axis is None or sum_axes is None or len(sum_axes) != 1:
            return
        rank = len(x.shape or ())
        if rank == 0 or axis % rank != sum_axes[0] % rank:
            return
        # the intermediate values must stay inside the softmax for it to be one op
        if set(map(id, e.users)) != {id(sm_sum), id(div)} or sub.results[0].users != [exp]:
            return
        if mx.users != [sub]:
            return
        div.softmax_parts = [mnode, sub, exp, sm_sum]
        self._decomposed_softmax[id(div)] = div

    # -------------------------------------------------------------- Adapter protocol
    def nodes(self) -> Iterable[_Node]:
        return self.node_list

    def kind(self, node: _Node) -> Kind:
        if node.softmax_parts:
            return Kind.SOFTMAX
        name = node.aten
        if name is None:
            if node.opname == "torch.vtensor.literal":
                return Kind.CONSTANT
            return Kind.OTHER
        if name in ("add", "sub") and len(node.operands) > 2 and self.constant(node.operands[2]) != 1.0:
            return Kind.OTHER
        if name == "to" and not self._is_cast(node):
            return Kind.IDENTITY
        if name == "convert_element_type":
            return Kind.CAST
        if name == "arange" and node.overload == "start_step" and self._int(node.operands[2]) != 1:
            return Kind.OTHER
        if name == "max" or name == "amax":
            return Kind.OTHER
        return ATEN_KINDS.get(name, Kind.OTHER)

    def _is_cast(self, node: _Node) -> bool:
        src, dst = node.operands[0].dtype, node.results[0].dtype
        return src is not None and dst is not None and src != dst

    def inputs(self, node: _Node) -> list[Any]:
        if node.softmax_parts:
            return [node.softmax_parts[1].operands[0]]
        name = node.aten
        ops = node.operands
        if name == "masked_fill":
            return [ops[1], ops[2], ops[0]]
        if name == "einsum":
            lst = ops[1].producer
            return list(lst.operands) if lst is not None else []
        if name in ("expand_as", "type_as"):
            return [ops[0]]
        return list(ops)

    def output(self, node: _Node) -> _Val:
        return node.results[0]

    def producer(self, value: Any) -> _Node | None:
        if not isinstance(value, _Val) or value.producer is None:
            return None
        p = value.producer
        if p.opname.startswith("torch.constant.") or p.opname == "torch.prim.ListConstruct":
            return None
        return p

    def users(self, value: Any) -> list[_Node]:
        if not isinstance(value, _Val):
            return []
        out: list[_Node] = []
        for u in value.users:
            if u.opname in _ASSERTS:
                continue
            if u.aten in _SHAPE_ONLY and u.operands[0] is value and value not in u.operands[1:]:
                continue  # full_like(p, 0) in the safe-softmax guard reads p's shape, not the probabilities
            owner = self._decomposed_owner(u)
            if owner is not None:
                if owner is not value.producer and owner not in out:
                    out.append(owner)
                continue
            out.append(u)
        return out

    def _decomposed_owner(self, node: _Node) -> _Node | None:
        """The decomposed softmax this max/sub/exp/sum belongs to, if any."""
        for sm in self._decomposed_softmax.values():
            if node in sm.softmax_parts:
                return sm
        return None

    def is_graph_output(self, value: Any) -> bool:
        return isinstance(value, _Val) and value.returned

    def constant(self, value: Any) -> float | None:
        if not isinstance(value, _Val) or value.producer is None:
            return None
        p = value.producer
        attrs = p.op.attributes
        if p.opname in ("torch.constant.float", "torch.constant.int", "torch.constant.bool"):
            return float(attrs["value"].value)
        if p.opname == "torch.vtensor.literal":
            return _splat(attrs["value"])
        if p.aten is not None and ATEN_KINDS.get(p.aten) is Kind.IDENTITY and p.operands:
            return self.constant(p.operands[0])  # clone / lift_fresh_copy of a literal
        if p.aten is not None and ATEN_KINDS.get(p.aten) is Kind.CONSTANT:
            # a filled tensor of any shape is its fill value, as in the fx adapter (and as a splat literal
            # is here): the safe-softmax guard's ``where(cond, full_like(p, 0), p)`` needs it
            return self.attr(p, "fill")
        return None

    def _int(self, v: _Val) -> int | None:
        c = self.constant(v)
        return None if c is None or c != int(c) else int(c)

    def _ints(self, v: _Val) -> list[int] | None:
        p = v.producer
        if p is None or p.opname != "torch.prim.ListConstruct":
            return None
        out = [self._int(x) for x in p.operands]
        return None if any(x is None for x in out) else out  # type: ignore[misc]

    def attr(self, node: _Node, name: str, default: Any = None) -> Any:
        op, ops = node.aten, node.operands
        rank = len(node.results[0].shape or ()) if node.results else 0
        if node.softmax_parts and name == "axis":
            m = node.softmax_parts[0]
            return self._int(m.operands[1]) if m.aten == "max" else _first(self._ints(m.operands[1]))
        if op in ("softmax", "_softmax", "_safe_softmax") and name == "axis":
            return self._int(ops[1])
        if op in ("transpose", "permute", "t") and name == "perm":
            if op == "t":
                return [1, 0]
            if op == "permute":
                return self._ints(ops[1])
            d0, d1 = self._int(ops[1]), self._int(ops[2])
            if d0 is None or d1 is None or rank == 0:
                return None
            perm = list(range(rank))
            perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
            return perm
        if op == "unsqueeze" and name == "dim":
            return self._int(ops[1])
        if op == "repeat_interleave":
            if name == "repeats":
                return self._int(ops[1])
            if name == "dim":
                return self._int(ops[2]) if len(ops) > 2 else None
        if op == "dropout":
            if name == "p":
                return self.constant(ops[1])
            if name == "train":
                t = self.constant(ops[2])
                return None if t is None else bool(t)
        if op == "scaled_dot_product_attention":
            idx = {"dropout_p": 4, "is_causal": 5, "scale": 6, "enable_gqa": 7}.get(name)
            if idx is not None and len(ops) > idx:
                c = self.constant(ops[idx])
                if name in ("is_causal", "enable_gqa"):
                    return default if c is None else bool(c)
                return default if c is None else c
            return default
        if op == "baddbmm" and name in ("beta", "alpha"):
            c = self.constant(ops[3 if name == "beta" else 4])
            return 1.0 if c is None else c
        if op == "einsum" and name == "equation":
            p = ops[0].producer
            return None if p is None else p.op.attributes["value"].value
        if op in ("le", "lt", "ge", "gt", "eq", "ne") and name == "op":
            return op
        if op in ("tril", "triu") and name == "diagonal":
            return self._int(ops[1]) if len(ops) > 1 else 0
        if op == "arange" and name == "start":
            return self._int(ops[0]) if node.overload in ("start", "start_step") else 0
        if name == "fill":
            if node.opname == "torch.vtensor.literal":
                return _splat(node.op.attributes["value"])
            if op in _FILLS:
                return _FILLS[op]
            if op in ("full", "new_full", "full_like"):
                return self.constant(ops[1])
            if op == "scalar_tensor":
                return self.constant(ops[0])
        return default

    def shape(self, value: Any) -> tuple[Dim, ...] | None:
        return value.shape if isinstance(value, _Val) else None

    def is_static(self, value: Any) -> bool:
        """True if ``value`` is computed from literals/constants only (never from the function's arguments)."""
        if not isinstance(value, _Val):
            return True
        key = id(value)
        if key in self._static:
            return self._static[key]
        stack: list[_Val] = [value]
        order: list[_Val] = []
        seen: set[int] = set()
        while stack:
            v = stack.pop()
            if id(v) in self._static or id(v) in seen:
                continue
            seen.add(id(v))
            order.append(v)
            if v.producer is not None:
                stack.extend(v.producer.operands)
        for v in reversed(order):
            if v.producer is None:
                self._static[id(v)] = False
            else:
                self._static[id(v)] = all(self._static.get(id(x), False) for x in v.producer.operands)
        return self._static[key]

    def name(self, node: Any) -> str:
        return node.label if isinstance(node, _Node) else str(node)

    def static_value(self, value: Any, limit: int = 1 << 24) -> Any | None:
        """A literal's elements as numpy (a mask buffer baked into the IR); None for anything computed.

        Only inline ``dense<...>`` literals are read: evaluating torch ops here would duplicate
        torch-mlir's folders, and ``dense_resource`` blobs are not exposed by the bindings.
        """
        import numpy as np

        if not isinstance(value, _Val) or value.producer is None or value.producer.opname != "torch.vtensor.literal":
            return None
        shape = value.shape
        if shape is None or any(d is None for d in shape) or math.prod(shape) > limit:
            return None
        attr = value.producer.op.attributes["value"]
        try:
            from torch_mlir import ir

            dense = ir.DenseElementsAttr(attr)
            if dense.is_splat:
                v = _splat(attr)
                return None if v is None else np.full(shape, v)
            return np.array([float(x) if not isinstance(x, bool) else x for x in dense]).reshape(shape)
        except Exception:
            return None


def _first(xs: list[int] | None) -> int | None:
    return xs[0] if xs and len(xs) == 1 else None


def _splat(attr: Any) -> float | None:
    """The value of a splat (or single-element) dense literal; None for anything else."""
    from torch_mlir import ir

    try:
        dense = ir.DenseElementsAttr(attr)
    except Exception:
        return None
    if not dense.is_splat and len(dense) != 1:
        return None
    v = dense.get_splat_value() if dense.is_splat else dense[0]
    try:
        return float(v.value)
    except (AttributeError, TypeError):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None


# ------------------------------------------------------------------ finding

def public_funcs(module: Any) -> list[Any]:
    """The module's public ``func.func`` ops (the ones the frontends produce and the rewrite edits)."""
    out = []
    for op in module.body.operations:
        o = op.operation
        if o.name != "func.func" or "function_type" not in o.attributes:
            continue
        vis = o.attributes["sym_visibility"].value if "sym_visibility" in o.attributes else "public"
        if vis == "public" and len(o.regions[0].blocks):
            out.append(o)
    return out


@dataclass(frozen=True)
class MlirReport(Report):
    """A ``Report`` whose sites also remember the adapter (the rewrite needs the IR objects)."""

    adapters: dict[int, MlirAdapter] = field(default_factory=dict)


def find(module: Any) -> MlirReport:
    """Attention sites in every public function of a torch-dialect module (same report as fx)."""
    sites: list[AttentionSite] = []
    skipped = []
    adapters: dict[int, MlirAdapter] = {}
    for func in public_funcs(module):
        adapter = MlirAdapter(func)
        rep = find_sites(adapter)
        for site in rep.sites:
            site = replace(site, index=len(sites))
            site = replace(site, fuse_blocker=_lowering_blocker(site))
            adapters[site.index] = adapter
            sites.append(site)
        skipped.extend(rep.skipped)
    return MlirReport(sites, skipped, adapters)


def _lowering_blocker(site: AttentionSite) -> str | None:
    """What the MLIR rewrites cannot express yet goes into the report as the reason."""
    if site.fuse_blocker is not None:
        return site.fuse_blocker
    why = None
    masks = site_masks(site)
    if any(o.perm is not None for o in (site.q, site.k, site.v)) or site.out_perm is not None:
        why = "einsum layouts are not handled by the MLIR fused rewrite"
    elif site.row_guards:
        why = "rows zeroed after the softmax by a condition other than 'no attendable key' are not handled"
    else:
        vals = [site.q.value, site.k.value, site.v.value, site.out] + [m.value for m in masks]
        if any(not isinstance(v, _Val) or v.shape is None or any(d is None for d in v.shape) for v in vals):
            why = "dynamic shapes: the MLIR fused rewrite needs static sizes"
        elif any(v.dtype != "f32" for v in (site.q.value, site.k.value, site.v.value, site.out)):
            why = "the MLIR fused rewrite computes in f32 and the site is not f32"
        elif any(m.value.dtype not in ("i1", "f32") for m in masks):
            why = "a mask that is neither bool nor f32"
        elif site.form == "sdpa" and site.k.groups == 1 and _gqa_groups(site) is None:
            why = "scaled_dot_product_attention with a head count of Q that is not a multiple of K's"
    return why


def _is_no_key_test(cond: Any, x: _Val, want_all: bool) -> bool:
    """``all(x == -inf)`` over the key axis (``want_all``), or ``any(x != -inf)`` (its negation)."""
    red = cond.producer if isinstance(cond, _Val) else None
    if red is None or red.aten not in ("all", "any") or (red.aten == "all") != want_all:
        return False
    test = red.operands[0].producer
    if test is not None and test.aten in ("logical_not", "bitwise_not") and not want_all:
        test = test.operands[0].producer
        wanted = "eq"
    else:
        wanted = "eq" if want_all else "ne"
    if test is None or test.aten != wanted or test.operands[0] is not x:
        return False
    lit = test.operands[1].producer
    if lit is None or lit.opname != "torch.constant.float":
        return False
    return float(lit.op.attributes["value"].value) == -math.inf


def site_masks(site: AttentionSite) -> list[MaskTerm]:
    """The mask terms the rewrites apply: the chain's, or the ``attn_mask`` of an SDPA call."""
    if site.form != "sdpa":
        return list(site.masks)
    m = site.sdpa_mask
    if m is None or (isinstance(m, _Val) and m.type == "!torch.none"):
        return []
    kind = "bool" if isinstance(m, _Val) and m.dtype == "i1" else "additive"
    return [MaskTerm(kind, m, site.softmax)]


def _gqa_groups(site: AttentionSite) -> int | None:
    """Query heads per K/V head of an SDPA call (1 without GQA); None if they do not divide."""
    qs, ks = site.q.value.shape, site.k.value.shape
    if len(qs) < 3 or len(ks) < 3 or qs[-3] == ks[-3]:
        return 1
    if ks[-3] and qs[-3] % ks[-3] == 0:
        return qs[-3] // ks[-3]
    return None


# ------------------------------------------------------------------ text generation helpers

def _tensor_type(shape: tuple[int, ...], elem: str) -> str:
    return "tensor<" + "".join(f"{d}x" for d in shape) + elem + ">"


def _builtin_elem(dtype: str) -> str:
    return {"si64": "i64", "si32": "i32", "si8": "i8", "ui8": "i8"}.get(dtype, dtype)


def _f32(x: float) -> str:
    """An f32 literal MLIR parses exactly (hex for non-finite values)."""
    if math.isinf(x):
        return "0x7F800000" if x > 0 else "0xFF800000"
    return repr(float(x)).replace("inf", "0x7F800000") if math.isfinite(x) else "0x7FC00000"


def _bcast_map(shape: tuple[int, ...], domain: tuple[int, ...], dims: list[str], groups: int = 1,
               group_dim: int | None = None) -> str:
    """Affine results reading a tensor broadcast (right-aligned) against the iteration ``domain``.

    Size-1 dims read index 0; the GQA head dim reads ``h floordiv groups``.
    """
    out = []
    off = len(domain) - len(shape)
    for a, size in enumerate(shape):
        d = a + off
        if d == group_dim and groups > 1:
            out.append(f"{dims[d]} floordiv {groups}")
        elif size == 1 and domain[d] != 1:
            out.append("0")
        else:
            out.append(dims[d])
    return "(" + ", ".join(out) + ")"


class _Text:
    """A tiny SSA text emitter: fresh names, one op per line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0

    def fresh(self, hint: str = "v") -> str:
        self.n += 1
        return f"%{hint}{self.n}"

    def emit(self, line: str, indent: int = 2) -> None:
        self.lines.append("  " * indent + line)


def _filled(t: _Text, shape: tuple[int, ...], value: str, ind: int) -> str:
    ty = _tensor_type(shape, "f32")
    e, f, c = t.fresh("empty"), t.fresh("init"), t.fresh("c")
    t.emit(f"{e} = tensor.empty() : {ty}", ind)
    t.emit(f"{c} = arith.constant {value} : f32", ind)
    t.emit(f"{f} = linalg.fill ins({c} : f32) outs({e} : {ty}) -> {ty}", ind)
    return f


@dataclass
class _MaskIn:
    """A mask term as a function argument of the generated code."""

    term: MaskTerm
    arg: str
    shape: tuple[int, ...]
    elem: str


def _mask_body(t: _Text, masks: list[_MaskIn], scalars: list[str], ind: int) -> tuple[list[str], str | None]:
    """Inside a linalg region: the additive terms to add to the logits, and the i1 'allowed' value."""
    adds: list[str] = []
    ok: str | None = None
    for m, s in zip(masks, scalars):
        if m.term.kind == "bool":
            cond = s
            if not m.term.attend_when:
                one, neg = t.fresh("true"), t.fresh("keep")
                t.emit(f"{one} = arith.constant true", ind)
                t.emit(f"{neg} = arith.xori {s}, {one} : i1", ind)
                cond = neg
        else:
            val = s
            if m.term.coeff != 1.0:
                cc, mv = t.fresh("coeff"), t.fresh("bias")
                t.emit(f"{cc} = arith.constant {_f32(m.term.coeff)} : f32", ind)
                t.emit(f"{mv} = arith.mulf {s}, {cc} : f32", ind)
                val = mv
            lim, cond = t.fresh("lim"), t.fresh("keep")
            t.emit(f"{lim} = arith.constant {_f32(semantics.MASKED_BELOW)} : f32", ind)
            # not (v <= limit): a NaN bias stays attendable and shows up in the output
            t.emit(f"{cond} = arith.cmpf ugt, {val}, {lim} : f32", ind)
            adds.append(val)
        if ok is None:
            ok = cond
        else:
            both = t.fresh("ok")
            t.emit(f"{both} = arith.andi {ok}, {cond} : i1", ind)
            ok = both
    return adds, ok


def _region_args(t: _Text, elems: list[str]) -> list[str]:
    return [t.fresh("a") for _ in elems]


# ------------------------------------------------------------------ the SSMax factor and logits

@dataclass
class _Ssmax:
    """SSMax parameters as the generated code takes them: constants, or ``[H]`` function arguments."""

    heads: int
    s: list[float]
    b: list[float] | None
    s_arg: bool = False
    b_arg: bool = False

    def args(self) -> list[str]:
        hty = _tensor_type((self.heads,), "f32")
        return ([f"%s: {hty}"] if self.s_arg else []) + ([f"%b: {hty}"] if self.b_arg else [])

    def emit_constants(self, t: _Text) -> None:
        """Bind ``%s`` and ``%b`` for the factor code when they are not arguments."""
        hty = _tensor_type((self.heads,), "f32")
        if not self.s_arg:
            t.emit(f"%s = arith.constant dense<[{', '.join(_f32(v) for v in self.s)}]> : {hty}")
        if not self.b_arg:
            bv = self.b if self.b is not None else [0.0] * self.heads
            t.emit(f"%b = arith.constant dense<[{', '.join(_f32(v) for v in bv)}]> : {hty}")


def _emit_factor(t: _Text, row_shape: tuple[int, ...], s_k: int, masks: list[_MaskIn], causal: bool,
                 ss: _Ssmax) -> str:
    """``s_h log max(n_i, 1) + b_h`` per row, ``n_i`` counted over the keys from the masks (and causal).

    The count is a reduction over the key axis that reads the masks where they are (broadcast),
    so it builds only a ``[..., S_q]`` tensor: the fused rewrite keeps its no-``S x S`` promise.
    Causal is top-left (``j <= i``), what the fused loop nest and SDPA's ``is_causal`` apply.
    """
    rank = len(row_shape) + 1
    dims = [f"d{i}" for i in range(rank)]
    dl = "(" + ", ".join(dims) + ")"
    domain = (*row_shape, s_k)
    rty = _tensor_type(row_shape, "f32")
    hty = _tensor_type((ss.heads,), "f32")
    row = f"affine_map<{dl} -> ({', '.join(dims[:-1])})>"
    n0 = _filled(t, row_shape, "0.0", 2)
    n = t.fresh("n")
    if causal and not masks:
        # no tensor to reduce over (a generic needs one to size the key loop): n_i = min(i + 1, S_k)
        rd = "(" + ", ".join(dims[:-1]) + ")"
        par = ", ".join(['"parallel"'] * (rank - 1))
        t.emit(f"{n} = linalg.generic {{indexing_maps = [affine_map<{rd} -> {rd}>], "
               f"iterator_types = [{par}]}} outs({n0} : {rty}) {{")
        acc, ii, one, cnt, top, r, ri = (t.fresh(h) for h in ("a", "i", "one", "cnt", "top", "n", "ri"))
        t.emit(f"^bb0({acc}: f32):", 2)
        t.emit(f"{ii} = linalg.index {rank - 2} : index", 3)
        t.emit(f"{one} = arith.constant 1 : index", 3)
        t.emit(f"{cnt} = arith.addi {ii}, {one} : index", 3)
        t.emit(f"{top} = arith.constant {s_k} : index", 3)
        t.emit(f"{r} = arith.minui {cnt}, {top} : index", 3)
        t.emit(f"{ri} = arith.index_cast {r} : index to i64", 3)
        rf = t.fresh("nf")
        t.emit(f"{rf} = arith.uitofp {ri} : i64 to f32", 3)
        t.emit(f"linalg.yield {rf} : f32", 3)
        t.emit(f"}} -> {rty}")
    elif masks:
        mmaps = [f"affine_map<{dl} -> {_bcast_map(m.shape, domain, dims)}>" for m in masks]
        iters = ", ".join(['"parallel"'] * (rank - 1) + ['"reduction"'])
        ins = ""
        if masks:
            ins = (f" ins({', '.join(m.arg for m in masks)} : "
                   f"{', '.join(_tensor_type(m.shape, m.elem) for m in masks)})")
        t.emit(f"{n} = linalg.generic {{indexing_maps = [{', '.join(mmaps + [row])}], iterator_types = [{iters}]}}"
               f"{ins} outs({n0} : {rty}) {{")
        ra = _region_args(t, [m.elem for m in masks])
        acc = t.fresh("acc")
        t.emit("^bb0(" + ", ".join([f"{a}: {m.elem}" for a, m in zip(ra, masks)] + [f"{acc}: f32"]) + "):", 2)
        _, ok = _mask_body(t, masks, ra, 3)
        if causal:
            ok = _and(t, ok, _causal_test(t, rank - 2, rank - 1, None, 3), 3)
        one, zero, inc, out = t.fresh("one"), t.fresh("zero"), t.fresh("inc"), t.fresh("cnt")
        t.emit(f"{one} = arith.constant 1.0 : f32", 3)
        t.emit(f"{zero} = arith.constant 0.0 : f32", 3)
        t.emit(f"{inc} = arith.select {ok}, {one}, {zero} : f32", 3)
        t.emit(f"{out} = arith.addf {acc}, {inc} : f32", 3)
        t.emit(f"linalg.yield {out} : f32", 3)
        t.emit(f"}} -> {rty}")
    else:
        call = t.fresh("cnt_all")
        t.emit(f"{call} = arith.constant {_f32(float(s_k))} : f32")
        t.emit(f"{n} = linalg.fill ins({call} : f32) outs({n0} : {rty}) -> {rty}")
    rdims = "(" + ", ".join(dims[:-1]) + ")"
    rident = f"affine_map<{rdims} -> {rdims}>"
    head_d = dims[rank - 3] if rank >= 3 and ss.heads > 1 else "0"
    hmap_row = f"affine_map<{rdims} -> ({head_d})>"
    riters = ", ".join(['"parallel"'] * (rank - 1))
    f0, fac = t.fresh("empty"), t.fresh("factor")
    t.emit(f"{f0} = tensor.empty() : {rty}")
    t.emit(f"{fac} = linalg.generic {{indexing_maps = [{rident}, {hmap_row}, {hmap_row}, {rident}], "
           f"iterator_types = [{riters}]}} ins({n}, %s, %b : {rty}, {hty}, {hty}) outs({f0} : {rty}) {{")
    an, as_, ab, ao = (t.fresh("a") for _ in range(4))
    t.emit(f"^bb0({an}: f32, {as_}: f32, {ab}: f32, {ao}: f32):", 2)
    one, cl, lg, m1, r = (t.fresh(h) for h in ("one", "cl", "log", "sl", "f"))
    t.emit(f"{one} = arith.constant 1.0 : f32", 3)
    t.emit(f"{cl} = arith.maximumf {an}, {one} : f32", 3)
    t.emit(f"{lg} = math.log {cl} : f32", 3)
    t.emit(f"{m1} = arith.mulf {as_}, {lg} : f32", 3)
    t.emit(f"{r} = arith.addf {m1}, {ab} : f32", 3)
    t.emit(f"linalg.yield {r} : f32", 3)
    t.emit(f"}} -> {rty}")
    return fac


def _causal_test(t: _Text, i_dim: int, j_dim: int, j0: str | None, ind: int) -> str:
    """Inside a linalg region: ``j0 + j <= i`` (top-left causal) from the loop indices."""
    ii, jj, ok = t.fresh("i"), t.fresh("j"), t.fresh("causal")
    t.emit(f"{ii} = linalg.index {i_dim} : index", ind)
    t.emit(f"{jj} = linalg.index {j_dim} : index", ind)
    if j0 is not None:
        jg = t.fresh("jg")
        t.emit(f"{jg} = arith.addi {jj}, {j0} : index", ind)
        jj = jg
    t.emit(f"{ok} = arith.cmpi ule, {jj}, {ii} : index", ind)
    return ok


def _and(t: _Text, a: str | None, b: str, ind: int) -> str:
    if a is None:
        return b
    both = t.fresh("ok")
    t.emit(f"{both} = arith.andi {a}, {b} : i1", ind)
    return both


def _ssmax_func(name: str, x_shape: tuple[int, ...], masks: list[_MaskIn], ss: _Ssmax) -> str:
    """``z = allowed ? (s_h log max(n_i, 1) + b_h) * x : finfo.min`` with ``n_i`` reduced from the masks."""
    t = _Text()
    rank = len(x_shape)
    dims = [f"d{i}" for i in range(rank)]
    dl = "(" + ", ".join(dims) + ")"
    xty = _tensor_type(x_shape, "f32")
    args = [f"%x: {xty}"] + [f"{m.arg}: {_tensor_type(m.shape, m.elem)}" for m in masks] + ss.args()
    t.emit(f"func.func private @{name}({', '.join(args)}) -> {xty} {{", 1)
    ss.emit_constants(t)
    fac = _emit_factor(t, x_shape[:-1], x_shape[-1], masks, False, ss)
    ident = f"affine_map<{dl} -> {dl}>"
    row = f"affine_map<{dl} -> ({', '.join(dims[:-1])})>"
    mmaps = [f"affine_map<{dl} -> {_bcast_map(m.shape, x_shape, dims)}>" for m in masks]
    rty = _tensor_type(x_shape[:-1], "f32")
    # z = allowed ? x * factor : finfo.min
    z0 = t.fresh("empty")
    t.emit(f"{z0} = tensor.empty() : {xty}")
    z = t.fresh("z")
    iters = ", ".join(['"parallel"'] * rank)
    ins = ", ".join(["%x", fac] + [m.arg for m in masks])
    ins_ty = ", ".join([xty, rty] + [_tensor_type(m.shape, m.elem) for m in masks])
    t.emit(f"{z} = linalg.generic {{indexing_maps = [{', '.join([ident, row] + mmaps + [ident])}], "
           f"iterator_types = [{iters}]}} ins({ins} : {ins_ty}) outs({z0} : {xty}) {{")
    ax, af = t.fresh("a"), t.fresh("a")
    ra = _region_args(t, [m.elem for m in masks])
    ao = t.fresh("a")
    t.emit("^bb0(" + ", ".join([f"{ax}: f32", f"{af}: f32"] + [f"{a}: {m.elem}" for a, m in zip(ra, masks)]
                               + [f"{ao}: f32"]) + "):", 2)
    prod = t.fresh("p")
    t.emit(f"{prod} = arith.mulf {ax}, {af} : f32", 3)
    _, ok = _mask_body(t, masks, ra, 3)
    if ok is None:
        t.emit(f"linalg.yield {prod} : f32", 3)
    else:
        lo, sel = t.fresh("min"), t.fresh("sel")
        t.emit(f"{lo} = arith.constant {_f32(-3.4028234663852886e38)} : f32", 3)
        t.emit(f"{sel} = arith.select {ok}, {prod}, {lo} : f32", 3)
        t.emit(f"linalg.yield {sel} : f32", 3)
    t.emit(f"}} -> {xty}")
    t.emit(f"return {z} : {xty}")
    t.emit("}", 1)
    return "\n".join(t.lines)


def _ssmax_sdpa_func(name: str, q_shape: tuple[int, ...], s_k: int, masks: list[_MaskIn], causal: bool,
                     ss: _Ssmax, q_mult: float = 1.0) -> str:
    """SSMax for an SDPA call, as ``semantics.ssmax_sdpa``: returns ``q * f * q_mult`` and, for an additive
    mask, the mask with its attendable entries times ``f`` (``[..., S_q, S_k]``); masked entries keep their
    value, which SDPA adds after the product, so no factor can unmask a key."""
    t = _Text()
    rank = len(q_shape)
    row_shape = q_shape[:-1]
    qty = _tensor_type(q_shape, "f32")
    rty = _tensor_type(row_shape, "f32")
    mask_shape = (*row_shape, s_k)
    mty = _tensor_type(mask_shape, "f32")
    additive = [m for m in masks if m.term.kind == "additive"]
    results = [qty] + ([mty] if additive else [])
    args = [f"%q: {qty}"] + [f"{m.arg}: {_tensor_type(m.shape, m.elem)}" for m in masks] + ss.args()
    t.emit(f"func.func private @{name}({', '.join(args)}) -> ({', '.join(results)}) {{", 1)
    ss.emit_constants(t)
    fac = _emit_factor(t, row_shape, s_k, masks, causal, ss)
    dims = [f"d{i}" for i in range(rank)]
    dl = "(" + ", ".join(dims) + ")"
    ident, row = f"affine_map<{dl} -> {dl}>", f"affine_map<{dl} -> ({', '.join(dims[:-1])})>"
    iters = ", ".join(['"parallel"'] * rank)
    q0, q2 = t.fresh("empty"), t.fresh("qs")
    t.emit(f"{q0} = tensor.empty() : {qty}")
    t.emit(f"{q2} = linalg.generic {{indexing_maps = [{ident}, {row}, {ident}], iterator_types = [{iters}]}} "
           f"ins(%q, {fac} : {qty}, {rty}) outs({q0} : {qty}) {{")
    a, b, c, r = t.fresh("a"), t.fresh("a"), t.fresh("a"), t.fresh("r")
    t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", 2)
    if q_mult != 1.0:
        cm, bm = t.fresh("qmult"), t.fresh("f")
        t.emit(f"{cm} = arith.constant {_f32(q_mult)} : f32", 3)
        t.emit(f"{bm} = arith.mulf {b}, {cm} : f32", 3)
        b = bm
    t.emit(f"{r} = arith.mulf {a}, {b} : f32", 3)
    t.emit(f"linalg.yield {r} : f32", 3)
    t.emit(f"}} -> {qty}")
    outs = [q2]
    if additive:
        m = additive[0]
        mmap = f"affine_map<{dl} -> {_bcast_map(m.shape, mask_shape, dims)}>"
        m0, m2 = t.fresh("empty"), t.fresh("mask")
        t.emit(f"{m0} = tensor.empty() : {mty}")
        t.emit(f"{m2} = linalg.generic {{indexing_maps = [{mmap}, {row}, {ident}], iterator_types = [{iters}]}} "
               f"ins({m.arg}, {fac} : {_tensor_type(m.shape, 'f32')}, {rty}) outs({m0} : {mty}) {{")
        a, b, c = t.fresh("a"), t.fresh("a"), t.fresh("a")
        t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", 2)
        lim, keep, p, sel = t.fresh("lim"), t.fresh("keep"), t.fresh("p"), t.fresh("sel")
        t.emit(f"{lim} = arith.constant {_f32(semantics.MASKED_BELOW)} : f32", 3)
        t.emit(f"{keep} = arith.cmpf ogt, {a}, {lim} : f32", 3)
        t.emit(f"{p} = arith.mulf {a}, {b} : f32", 3)
        t.emit(f"{sel} = arith.select {keep}, {p}, {a} : f32", 3)
        t.emit(f"linalg.yield {sel} : f32", 3)
        t.emit(f"}} -> {mty}")
        outs.append(m2)
    t.emit(f"return {', '.join(outs)} : {', '.join(results)}")
    t.emit("}", 1)
    return "\n".join(t.lines)


# ------------------------------------------------------------------ the fused online-softmax function

DEFAULT_TILE = 64

# The two matmul-like reductions (Q K^T over the head dim, P V over the key tile) may be reassociated
# and contracted into FMAs: that is what lets LLVM vectorise them; the sums stay within fp32 tolerance.
_FM = "fastmath<reassoc,contract>"


def _tile_for(s_k: int, tile: int) -> int:
    return s_k if s_k <= tile else tile


@dataclass
class _FusedSpec:
    """Everything the loop nest needs, in static sizes."""

    batch: tuple[int, ...]  # batch dims of the scores (heads included)
    s_q: int
    s_k: int
    d: int
    dv: int
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    k_transposed: bool
    k_groups: int
    v_groups: int
    scale: float
    softcap: float | None
    causal: bool
    masks: list[_MaskIn]
    tile: int
    ssmax: _Ssmax | None = None  # SSMax inside the loop nest: a per-row factor on the logits


def _fused_func(name: str, sp: _FusedSpec) -> str:
    """The online-softmax loop nest: ``scf.for`` over key tiles carrying (max, normaliser, accumulator)."""
    t = _Text()
    nb = len(sp.batch)
    rank = nb + 2
    dims5 = [f"d{i}" for i in range(nb)] + ["i", "j", "e"]  # e: head dim (QK) or value dim (PV)
    dl5 = "(" + ", ".join(dims5) + ")"
    bdims = dims5[:nb]
    dl4 = "(" + ", ".join(bdims + ["i", "j"]) + ")"
    dl3 = "(" + ", ".join(bdims + ["i"]) + ")"
    dlo = "(" + ", ".join(bdims + ["i", "e"]) + ")"
    row_shape = (*sp.batch, sp.s_q)
    out_shape = (*sp.batch, sp.s_q, sp.dv)
    rty, oty = _tensor_type(row_shape, "f32"), _tensor_type(out_shape, "f32")
    qty, kty, vty = (_tensor_type(s, "f32") for s in (sp.q_shape, sp.k_shape, sp.v_shape))
    group_dim = nb - 1 if nb >= 1 else None
    args = [f"%q: {qty}", f"%k: {kty}", f"%v: {vty}"] + [f"{m.arg}: {_tensor_type(m.shape, m.elem)}" for m in sp.masks]
    args += sp.ssmax.args() if sp.ssmax else []
    t.emit(f"func.func private @{name}({', '.join(args)}) -> {oty} {{", 1)
    factor = None
    if sp.ssmax is not None:
        # n_i needs every key of the row before the first tile: one reduction over the masks up front
        sp.ssmax.emit_constants(t)
        factor = _emit_factor(t, row_shape, sp.s_k, sp.masks, sp.causal, sp.ssmax)
    m_init = _filled(t, row_shape, _f32(-math.inf), 2)
    l_init = _filled(t, row_shape, "0.0", 2)
    acc_init = _filled(t, out_shape, "0.0", 2)
    n_full = sp.s_k // sp.tile
    tail = sp.s_k - n_full * sp.tile
    state = (m_init, l_init, acc_init)
    if n_full > 0:
        c0, cstep, cend = t.fresh("c"), t.fresh("c"), t.fresh("c")
        t.emit(f"{c0} = arith.constant 0 : index")
        t.emit(f"{cstep} = arith.constant {sp.tile} : index")
        t.emit(f"{cend} = arith.constant {n_full * sp.tile} : index")
        res = t.fresh("loop")
        j0, m, lv, acc = "%j0", t.fresh("m"), t.fresh("l"), t.fresh("acc")
        t.emit(f"{res}:3 = scf.for {j0} = {c0} to {cend} step {cstep} iter_args({m} = {state[0]}, {lv} = {state[1]}, "
               f"{acc} = {state[2]}) -> ({rty}, {rty}, {oty}) {{")
        new = _fused_tile(t, sp, j0, sp.tile, (m, lv, acc), (dims5, dl5, dl4, dl3, dlo, group_dim), factor, 3)
        t.emit(f"scf.yield {new[0]}, {new[1]}, {new[2]} : {rty}, {rty}, {oty}", 3)
        t.emit("}")
        state = (f"{res}#0", f"{res}#1", f"{res}#2")
    if tail:
        jt = t.fresh("c")
        t.emit(f"{jt} = arith.constant {n_full * sp.tile} : index")
        state = _fused_tile(t, sp, jt, tail, state, (dims5, dl5, dl4, dl3, dlo, group_dim), factor, 2)
    # out = l != 0 ? acc / l : 0   (a row with no attendable key is 0; a NaN row stays NaN, never hidden)
    o0, out = t.fresh("empty"), t.fresh("out")
    t.emit(f"{o0} = tensor.empty() : {oty}")
    iters = ", ".join(['"parallel"'] * rank)
    t.emit(f"{out} = linalg.generic {{indexing_maps = [affine_map<{dlo} -> {dlo}>, affine_map<{dlo} -> {dl3}>, "
           f"affine_map<{dlo} -> {dlo}>], iterator_types = [{iters}]}} ins({state[2]}, {state[1]} : {oty}, {rty}) "
           f"outs({o0} : {oty}) {{")
    a, b, c = t.fresh("a"), t.fresh("a"), t.fresh("a")
    t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", 2)
    z, pos, dv, r = t.fresh("zero"), t.fresh("pos"), t.fresh("q"), t.fresh("r")
    t.emit(f"{z} = arith.constant 0.0 : f32", 3)
    t.emit(f"{pos} = arith.cmpf une, {b}, {z} : f32", 3)
    t.emit(f"{dv} = arith.divf {a}, {b} : f32", 3)
    t.emit(f"{r} = arith.select {pos}, {dv}, {z} : f32", 3)
    t.emit(f"linalg.yield {r} : f32", 3)
    t.emit(f"}} -> {oty}")
    t.emit(f"return {out} : {oty}")
    t.emit("}", 1)
    return "\n".join(t.lines)


def _fused_tile(t: _Text, sp: _FusedSpec, j0: str, tile: int, state: tuple[str, str, str],
                layout: tuple, factor: str | None, ind: int) -> tuple[str, str, str]:
    """One key tile ``[j0, j0 + tile)``: logits, new running max, rescaled normaliser and accumulator.

    ``factor`` (SSMax) is the ``[..., S_q]`` per-row multiplier, applied after the biases and before
    the masks, the order ``semantics.attention`` defines.
    """
    dims5, dl5, dl4, dl3, dlo, group_dim = layout
    nb = len(sp.batch)
    m_old, l_old, acc_old = state
    bdims = dims5[:nb]
    tile_shape = (*sp.batch, sp.s_q, tile)
    row_shape = (*sp.batch, sp.s_q)
    out_shape = (*sp.batch, sp.s_q, sp.dv)
    sty, rty, oty = _tensor_type(tile_shape, "f32"), _tensor_type(row_shape, "f32"), _tensor_type(out_shape, "f32")
    one_idx = ["1"] * len(sp.k_shape)

    def kslice(src: str, shape: tuple[int, ...], axis_from_end: int) -> tuple[str, tuple[int, ...]]:
        ax = len(shape) - axis_from_end
        offs = ["0"] * len(shape)
        offs[ax] = j0
        sizes = list(shape)
        sizes[ax] = tile
        out = t.fresh("tile")
        t.emit(f"{out} = tensor.extract_slice {src}[{', '.join(offs)}] [{', '.join(map(str, sizes))}] "
               f"[{', '.join(one_idx[:len(shape)])}] : {_tensor_type(shape, 'f32')} to "
               f"{_tensor_type(tuple(sizes), 'f32')}", ind)
        return out, tuple(sizes)

    kt, kt_shape = kslice("%k", sp.k_shape, 1 if sp.k_transposed else 2)
    vt, vt_shape = kslice("%v", sp.v_shape, 2)
    mask_tiles: list[tuple[str, tuple[int, ...], _MaskIn]] = []
    for mk in sp.masks:
        if mk.shape and mk.shape[-1] != 1 and mk.shape[-1] == sp.s_k:
            ax = len(mk.shape) - 1
            offs = ["0"] * len(mk.shape)
            offs[ax] = j0
            sizes = list(mk.shape)
            sizes[ax] = tile
            out = t.fresh("mtile")
            t.emit(f"{out} = tensor.extract_slice {mk.arg}[{', '.join(offs)}] [{', '.join(map(str, sizes))}] "
                   f"[{', '.join(['1'] * len(sizes))}] : {_tensor_type(mk.shape, mk.elem)} to "
                   f"{_tensor_type(tuple(sizes), mk.elem)}", ind)
            mask_tiles.append((out, tuple(sizes), mk))
        else:
            mask_tiles.append((mk.arg, mk.shape, mk))
    # scores tile: s[b.., i, j] = sum_e q[b.., i, e] * k[b.., j, e]
    dom5 = (*sp.batch, sp.s_q, tile, sp.d)
    qmap = _bcast_map(sp.q_shape[:-2], dom5[:nb], dims5[:nb]).rstrip(")")
    qres = (qmap + (", " if nb else "") + "i, e)") if nb else "(i, e)"
    kb = _bcast_map(kt_shape[:-2], dom5[:nb], dims5[:nb], sp.k_groups, group_dim).rstrip(")")
    ktail = "e, j)" if sp.k_transposed else "j, e)"
    kres = (kb + (", " if nb else "") + ktail) if nb else "(" + ktail
    s_init = _filled(t, tile_shape, "0.0", ind)
    s = t.fresh("s")
    iters = ", ".join(['"parallel"'] * (nb + 2) + ['"reduction"'])
    t.emit(f"{s} = linalg.generic {{indexing_maps = [affine_map<{dl5} -> {qres}>, affine_map<{dl5} -> {kres}>, "
           f"affine_map<{dl5} -> {dl4}>], iterator_types = [{iters}]}} ins(%q, {kt} : "
           f"{_tensor_type(sp.q_shape, 'f32')}, {_tensor_type(kt_shape, 'f32')}) outs({s_init} : {sty}) {{", ind)
    a, b, c, p, r = (t.fresh(h) for h in ("a", "a", "a", "p", "r"))
    t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", ind + 1)
    t.emit(f"{p} = arith.mulf {a}, {b} {_FM} : f32", ind + 2)
    t.emit(f"{r} = arith.addf {c}, {p} {_FM} : f32", ind + 2)
    t.emit(f"linalg.yield {r} : f32", ind + 2)
    t.emit(f"}} -> {sty}", ind)
    # logits: scale, soft-cap, biases, masks (-inf where a key is removed)
    dims4 = bdims + ["i", "j"]
    mmaps = [f"affine_map<{dl4} -> {_bcast_map(shp, tile_shape, dims4)}>" for _, shp, _ in mask_tiles]
    ident4 = f"affine_map<{dl4} -> {dl4}>"
    z0, z = t.fresh("empty"), t.fresh("z")
    iters_z = ", ".join(['"parallel"'] * (nb + 2))
    t.emit(f"{z0} = tensor.empty() : {sty}", ind)
    fmaps = [f"affine_map<{dl4} -> {dl3}>"] if factor else []
    ins = ", ".join([s] + [mt[0] for mt in mask_tiles] + ([factor] if factor else []))
    ins_ty = ", ".join([sty] + [_tensor_type(mt[1], mt[2].elem) for mt in mask_tiles] + ([rty] if factor else []))
    t.emit(f"{z} = linalg.generic {{indexing_maps = [{', '.join([ident4] + mmaps + fmaps + [ident4])}], "
           f"iterator_types = [{iters_z}]}} ins({ins} : {ins_ty}) outs({z0} : {sty}) {{",
           ind)
    ax = t.fresh("a")
    ra = _region_args(t, [mt[2].elem for mt in mask_tiles])
    af = [t.fresh("a")] if factor else []
    ao = t.fresh("a")
    t.emit("^bb0(" + ", ".join([f"{ax}: f32"] + [f"{x}: {mt[2].elem}" for x, mt in zip(ra, mask_tiles)]
                               + [f"{x}: f32" for x in af] + [f"{ao}: f32"]) + "):", ind + 1)
    i2 = ind + 2
    sc, x = t.fresh("scale"), t.fresh("x")
    t.emit(f"{sc} = arith.constant {_f32(sp.scale)} : f32", i2)
    t.emit(f"{x} = arith.mulf {ax}, {sc} : f32", i2)
    if sp.softcap is not None:
        cap, dvd, th, capped = t.fresh("cap"), t.fresh("x"), t.fresh("x"), t.fresh("x")
        t.emit(f"{cap} = arith.constant {_f32(sp.softcap)} : f32", i2)
        t.emit(f"{dvd} = arith.divf {x}, {cap} : f32", i2)
        t.emit(f"{th} = math.tanh {dvd} : f32", i2)
        t.emit(f"{capped} = arith.mulf {th}, {cap} : f32", i2)
        x = capped
    adds, ok = _mask_body(t, [mt[2] for mt in mask_tiles], ra, i2)
    for add in adds:
        nx = t.fresh("x")
        t.emit(f"{nx} = arith.addf {x}, {add} : f32", i2)
        x = nx
    if af:
        nx = t.fresh("x")
        t.emit(f"{nx} = arith.mulf {x}, {af[0]} : f32", i2)
        x = nx
    if sp.causal:
        ok = _and(t, ok, _causal_test(t, nb, nb + 1, j0, i2), i2)
    if ok is not None:
        ninf, sel = t.fresh("ninf"), t.fresh("x")
        t.emit(f"{ninf} = arith.constant {_f32(-math.inf)} : f32", i2)
        t.emit(f"{sel} = arith.select {ok}, {x}, {ninf} : f32", i2)
        x = sel
    t.emit(f"linalg.yield {x} : f32", i2)
    t.emit(f"}} -> {sty}", ind)
    # new running max m' = max(m, max_j z)
    row_map = f"affine_map<{dl4} -> {dl3}>"
    m_new = t.fresh("mnew")
    iters4r = ", ".join(['"parallel"'] * (nb + 1) + ['"reduction"'])
    t.emit(f"{m_new} = linalg.generic {{indexing_maps = [{ident4}, {row_map}], iterator_types = [{iters4r}]}} "
           f"ins({z} : {sty}) outs({m_old} : {rty}) {{", ind)
    a, b, r = t.fresh("a"), t.fresh("a"), t.fresh("r")
    t.emit(f"^bb0({a}: f32, {b}: f32):", ind + 1)
    t.emit(f"{r} = arith.maximumf {a}, {b} : f32", ind + 2)
    t.emit(f"linalg.yield {r} : f32", ind + 2)
    t.emit(f"}} -> {rty}", ind)

    def safe(mv: str) -> str:
        """exp base: the running max, or 0 while a row has seen no attendable key (max = -inf)."""
        ninf, isn, zero, out = t.fresh("ninf"), t.fresh("none"), t.fresh("zero"), t.fresh("base")
        t.emit(f"{ninf} = arith.constant {_f32(-math.inf)} : f32", ind + 2)
        t.emit(f"{isn} = arith.cmpf oeq, {mv}, {ninf} : f32", ind + 2)
        t.emit(f"{zero} = arith.constant 0.0 : f32", ind + 2)
        t.emit(f"{out} = arith.select {isn}, {zero}, {mv} : f32", ind + 2)
        return out

    # p = exp(z - base)
    p0, pt = t.fresh("empty"), t.fresh("p")
    t.emit(f"{p0} = tensor.empty() : {sty}", ind)
    iters4 = ", ".join(['"parallel"'] * (nb + 2))
    t.emit(f"{pt} = linalg.generic {{indexing_maps = [{ident4}, {row_map}, {ident4}], iterator_types = [{iters4}]}} "
           f"ins({z}, {m_new} : {sty}, {rty}) outs({p0} : {sty}) {{", ind)
    a, b, c = t.fresh("a"), t.fresh("a"), t.fresh("a")
    t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", ind + 1)
    base = safe(b)
    d, e = t.fresh("d"), t.fresh("e")
    t.emit(f"{d} = arith.subf {a}, {base} : f32", ind + 2)
    t.emit(f"{e} = math.exp {d} : f32", ind + 2)
    t.emit(f"linalg.yield {e} : f32", ind + 2)
    t.emit(f"}} -> {sty}", ind)
    # alpha = exp(m - base'), l' = l * alpha + sum_j p
    rid3 = "(" + ", ".join(bdims + ["i"]) + ")"
    ident3 = f"affine_map<{rid3} -> {rid3}>"
    iters3 = ", ".join(['"parallel"'] * (nb + 1))
    al0, alpha = t.fresh("empty"), t.fresh("alpha")
    t.emit(f"{al0} = tensor.empty() : {rty}", ind)
    t.emit(f"{alpha} = linalg.generic {{indexing_maps = [{ident3}, {ident3}, {ident3}], iterator_types = [{iters3}]}} "
           f"ins({m_old}, {m_new} : {rty}, {rty}) outs({al0} : {rty}) {{", ind)
    a, b, c = t.fresh("a"), t.fresh("a"), t.fresh("a")
    t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", ind + 1)
    base = safe(b)
    d, e = t.fresh("d"), t.fresh("e")
    t.emit(f"{d} = arith.subf {a}, {base} : f32", ind + 2)
    t.emit(f"{e} = math.exp {d} : f32", ind + 2)
    t.emit(f"linalg.yield {e} : f32", ind + 2)
    t.emit(f"}} -> {rty}", ind)
    ls0, ls = t.fresh("empty"), t.fresh("lsc")
    t.emit(f"{ls0} = tensor.empty() : {rty}", ind)
    t.emit(f"{ls} = linalg.generic {{indexing_maps = [{ident3}, {ident3}, {ident3}], iterator_types = [{iters3}]}} "
           f"ins({l_old}, {alpha} : {rty}, {rty}) outs({ls0} : {rty}) {{", ind)
    a, b, c, r = t.fresh("a"), t.fresh("a"), t.fresh("a"), t.fresh("r")
    t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", ind + 1)
    t.emit(f"{r} = arith.mulf {a}, {b} : f32", ind + 2)
    t.emit(f"linalg.yield {r} : f32", ind + 2)
    t.emit(f"}} -> {rty}", ind)
    l_new = t.fresh("lnew")
    t.emit(f"{l_new} = linalg.generic {{indexing_maps = [{ident4}, {row_map}], iterator_types = [{iters4r}]}} "
           f"ins({pt} : {sty}) outs({ls} : {rty}) {{", ind)
    a, b, r = t.fresh("a"), t.fresh("a"), t.fresh("r")
    t.emit(f"^bb0({a}: f32, {b}: f32):", ind + 1)
    t.emit(f"{r} = arith.addf {a}, {b} : f32", ind + 2)
    t.emit(f"linalg.yield {r} : f32", ind + 2)
    t.emit(f"}} -> {rty}", ind)
    # acc' = acc * alpha + p @ v_tile   (value dim innermost: contiguous in acc and v)
    identO = f"affine_map<{dlo} -> {dlo}>"
    as0, accs = t.fresh("empty"), t.fresh("accs")
    itersO = ", ".join(['"parallel"'] * (nb + 2))
    t.emit(f"{as0} = tensor.empty() : {oty}", ind)
    t.emit(f"{accs} = linalg.generic {{indexing_maps = [{identO}, affine_map<{dlo} -> {dl3}>, {identO}], "
           f"iterator_types = [{itersO}]}} ins({acc_old}, {alpha} : {oty}, {rty}) outs({as0} : {oty}) {{", ind)
    a, b, c, r = t.fresh("a"), t.fresh("a"), t.fresh("a"), t.fresh("r")
    t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", ind + 1)
    t.emit(f"{r} = arith.mulf {a}, {b} : f32", ind + 2)
    t.emit(f"linalg.yield {r} : f32", ind + 2)
    t.emit(f"}} -> {oty}", ind)
    dom_pv = (*sp.batch, sp.s_q, tile, sp.dv)
    vb = _bcast_map(vt_shape[:-2], dom_pv[:nb], dims5[:nb], sp.v_groups, group_dim).rstrip(")")
    vres = (vb + (", " if nb else "") + "j, e)") if nb else "(j, e)"
    acc_new = t.fresh("accnew")
    itersPV = ", ".join(['"parallel"'] * (nb + 1) + ['"reduction"', '"parallel"'])
    t.emit(f"{acc_new} = linalg.generic {{indexing_maps = [affine_map<{dl5} -> {dl4}>, affine_map<{dl5} -> {vres}>, "
           f"affine_map<{dl5} -> {dlo}>], iterator_types = [{itersPV}]}} ins({pt}, {vt} : {sty}, "
           f"{_tensor_type(vt_shape, 'f32')}) outs({accs} : {oty}) {{", ind)
    a, b, c, p, r = t.fresh("a"), t.fresh("a"), t.fresh("a"), t.fresh("p"), t.fresh("r")
    t.emit(f"^bb0({a}: f32, {b}: f32, {c}: f32):", ind + 1)
    t.emit(f"{p} = arith.mulf {a}, {b} {_FM} : f32", ind + 2)
    t.emit(f"{r} = arith.addf {c}, {p} {_FM} : f32", ind + 2)
    t.emit(f"linalg.yield {r} : f32", ind + 2)
    t.emit(f"}} -> {oty}", ind)
    return m_new, l_new, acc_new


# ------------------------------------------------------------------ rewriting the module

class _Editor:
    """Inserts ops with the bindings: boundary casts, calls, private functions, extra arguments."""

    def __init__(self, module: Any):
        from torch_mlir import ir

        self.ir = ir
        self.module = module
        self.ctx = module.context
        self.names: set[str] = set()
        self.notes = Notes()  # what the rewrite did, per site: returned in a new report

    def builtin(self, v: _Val, before: Any) -> Any:
        ir = self.ir
        shape = v.shape or ()
        ty = ir.Type.parse(_tensor_type(tuple(shape), _builtin_elem(v.dtype or "f32")), self.ctx)
        op = ir.Operation.create("torch_c.to_builtin_tensor", results=[ty], operands=[v.value],
                                 loc=ir.Location.unknown(self.ctx), ip=ir.InsertionPoint(before))
        return op.result

    def call(self, callee: str, args: list[Any], types: list[str], before: Any) -> list[Any]:
        """``func.call @callee(args)`` returning builtin tensors, each converted back to its vtensor type."""
        ir = self.ir
        btys = [ir.Type.parse(_builtin_of(ty), self.ctx) for ty in types]
        loc = ir.Location.unknown(self.ctx)
        call = ir.Operation.create("func.call", results=btys, operands=args,
                                   attributes={"callee": ir.FlatSymbolRefAttr.get(callee, self.ctx)},
                                   loc=loc, ip=ir.InsertionPoint(before))
        return [ir.Operation.create("torch_c.from_builtin_tensor", results=[ir.Type.parse(ty, self.ctx)],
                                    operands=[r], loc=loc, ip=ir.InsertionPoint(before)).result
                for r, ty in zip(call.results, types)]

    def add_func(self, text: str, what: str) -> None:
        """Parse one generated ``func.func`` (the MLIR parser verifies it) and append it to the module."""
        ir = self.ir
        try:
            with self.ctx:
                parsed = ir.Module.parse(text)
        except Exception as e:
            raise AttnpassError(f"internal error: generated {what} does not verify: {str(e)[:400]}") from e
        # ONNX-origin modules: the onnx->torch pass insists every function carries the opset
        opset = next((f.attributes[_OPSET] for f in public_funcs(self.module) if _OPSET in f.attributes), None)
        for op in list(parsed.body.operations):
            if opset is not None:
                op.operation.attributes[_OPSET] = opset
            self.module.body.append(op.operation)

    def fresh_symbol(self, base: str) -> str:
        taken = {o.operation.attributes["sym_name"].value for o in self.module.body.operations
                 if "sym_name" in o.operation.attributes} | self.names
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def add_argument(self, func: Any, type_text: str) -> Any:
        """Append an argument to a public function (SSMax parameters passed in by the caller)."""
        ir = self.ir
        block = func.regions[0].blocks[0]
        ty = ir.Type.parse(type_text, self.ctx)
        arg = block.add_argument(ty, ir.Location.unknown(self.ctx))
        with self.ctx:
            ftype = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value)
            func.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(list(ftype.inputs) + [ty],
                                                                                     list(ftype.results)))
        return arg


_OPSET = "torch.onnx_meta.opset_version"


def _erase_dead(func: Any) -> None:
    """Drop side-effect-free ops whose results nobody uses (what the rewritten chain leaves behind)."""
    block = func.regions[0].blocks[0]
    changed = True
    while changed:
        changed = False
        for op in reversed(list(block.operations)):
            o = op.operation
            if o.name in _ASSERTS and len(o.operands) and all(u.owner.name in _ASSERTS for u in o.operands[0].uses):
                if o.operands[0].owner is not None and not isinstance(o.operands[0].owner, type(block)):
                    o.erase()
                    changed = True
                continue
            if not o.name.startswith(_PURE_PREFIXES) or not len(o.results):
                continue
            if all(_unused(r) for r in o.results):
                o.erase()
                changed = True


def _unused(v: Any) -> bool:
    for _ in v.uses:
        return False
    return True


def _builtin_of(vtensor: str) -> str:
    """``!torch.vtensor<[2,4],f32>`` -> ``tensor<2x4xf32>`` (static shapes only, as the rewrites need)."""
    m = _VTENSOR.match(vtensor)
    if m is None:
        raise AttnpassError(f"internal error: not a value tensor type: {vtensor}")
    dims = tuple(int(d) for d in m.group(1).split(",")) if m.group(1) else ()
    return _tensor_type(dims, _builtin_elem(m.group(2)))


def _mask_inputs(ed: _Editor, terms: list[MaskTerm], before: Any, prefix: str) -> tuple[list[_MaskIn], list[Any]]:
    ins, vals = [], []
    for i, term in enumerate(terms):
        v: _Val = term.value
        elem = _builtin_elem(v.dtype or "f32")
        ins.append(_MaskIn(term, f"%{prefix}{i}", tuple(v.shape or ()), elem))
        vals.append(ed.builtin(v, before))
    return ins, vals


def _heads(x_shape: tuple[int, ...]) -> int:
    """Heads of ``[..., H, S_q, S_k]`` scores (1 for rank-2; rank-3 ``[B*H, ...]`` counts every slice)."""
    return x_shape[-3] if len(x_shape) >= 3 and isinstance(x_shape[-3], int) else 1


def _ssmax_params(ed: _Editor, func: Any, heads: int, s: float | list[float], b: float | list[float] | None,
                  params: str, before: Any) -> tuple[_Ssmax, list[Any]]:
    """The SSMax parameters of one site, and the builtin-tensor values to pass when they are arguments."""
    ss = _Ssmax(heads, _per_head(s, heads, "s"), None if b is None else _per_head(b, heads, "b"))
    vals = []
    if params == "argument":
        hty, bty = f"!torch.vtensor<[{heads}],f32>", f"tensor<{heads}xf32>"
        vals.append(_to_builtin_raw(ed, ed.add_argument(func, hty), bty, before))
        ss.s_arg = True
        if b is not None:
            vals.append(_to_builtin_raw(ed, ed.add_argument(func, hty), bty, before))
            ss.b_arg = True
    return ss, vals


def to_ssmax(module: Any, s: float | list[float] = semantics.DEFAULT_S, b: float | list[float] | None = None,
             params: str = "constant", fused: bool = False, tile: int = DEFAULT_TILE,
             report: MlirReport | None = None) -> MlirReport:
    """Rewrite every site to SSMax in place; ``params="argument"`` makes s (and b) trailing ``[H]``
    arguments of the public function instead of constants.

    Explicit chains get the factor on the softmax input (``semantics.ssmax_logits``); SDPA calls
    keep the call and get ``q * f`` and a scaled additive mask (``semantics.ssmax_sdpa``).
    ``fused=True`` (as ``attnpass.to_ssmax(..., fused=True)``) instead replaces each fusable site by
    the online-softmax loop nest with the factor applied inside it; unfusable sites still get SSMax.
    """
    if params not in ("constant", "argument"):
        raise AttnpassError(f"ssmax params must be 'constant' or 'argument', got {params!r}")
    report = find(module) if report is None else report
    ed = _Editor(module)
    for site in report.sites:
        adapter = report.adapters[site.index]
        if fused and site.fusable:
            _fuse_site(ed, site, tile, ssmax=(s, b, params, adapter.func))
        elif site.form == "sdpa":
            _ssmax_sdpa_site(ed, adapter, site, s, b, params)
        else:
            _ssmax_explicit_site(ed, adapter, site, s, b, params)
    for f in public_funcs(module):
        _erase_dead(f)
    return report.with_notes(ed.notes.by_site)


def _ssmax_explicit_site(ed: _Editor, adapter: MlirAdapter, site: AttentionSite, s: Any, b: Any, params: str) -> None:
    sm: _Node = site.softmax
    x: _Val = adapter.inputs(sm)[0]
    x_shape = x.shape
    if x_shape is None or any(d is None for d in x_shape) or x.dtype != "f32":
        ed.notes.add(site, "left alone: SSMax in MLIR needs static f32 scores")
        return
    if any(m.value.dtype not in ("i1", "f32") or m.value.shape is None for m in site.masks):
        ed.notes.add(site, "left alone: a mask that is neither bool nor f32")
        return
    first = sm.softmax_parts[0].op if sm.softmax_parts else sm.op
    masks, mvals = _mask_inputs(ed, site.masks, first, "m")
    xb = ed.builtin(x, first)
    ss, pvals = _ssmax_params(ed, adapter.func, _heads(tuple(x_shape)), s, b, params, first)
    name = ed.fresh_symbol(f"attnpass_ssmax_{site.index}")
    ed.add_func(_ssmax_func(name, tuple(x_shape), masks, ss), f"SSMax for {site.name}")
    z = ed.call(name, [xb, *mvals, *pvals], [x.type], first)[0]
    targets = [p.op for p in sm.softmax_parts[:2]] if sm.softmax_parts else [sm.op]
    for t in targets:
        for i, operand in enumerate(t.operands):
            if operand == x.value:
                t.operands[i] = z
    ed.notes.add(site, f"SSMax via @{name}" + (" (s, b as arguments)" if ss.s_arg else ""))


def _ssmax_sdpa_site(ed: _Editor, adapter: MlirAdapter, site: AttentionSite, s: Any, b: Any, params: str) -> None:
    """SDPA call: the call stays; its q becomes ``q * f`` and an additive mask is scaled where attendable."""
    call: _Node = site.softmax
    q: _Val = call.operands[0]
    masks_t = site_masks(site)
    qs = q.shape
    if qs is None or any(d is None for d in qs) or q.dtype != "f32" or site.seq_k is None or not isinstance(site.seq_k, int):
        ed.notes.add(site, "left alone: SSMax in MLIR needs static f32 inputs")
        return
    if any(m.value.dtype not in ("i1", "f32") or m.value.shape is None for m in masks_t):
        ed.notes.add(site, "left alone: a mask that is neither bool nor f32")
        return
    qs = tuple(qs)
    masks, mvals = _mask_inputs(ed, masks_t, call.op, "m")
    ss, pvals = _ssmax_params(ed, adapter.func, _heads((*qs[:-1], 1)), s, b, params, call.op)
    # An explicit scale moves onto q and the call gets the default: torch-mlir's lowering of an SDPA
    # call that has a mask or is_causal ignores its ``scale`` (off by ~0.5 on unit inputs), and the
    # SSMax rewrite keeps the call.  ``(q c sqrt(d)) k / sqrt(d) = c q k`` is the same logits.
    q_mult = 1.0
    has_scale = len(call.operands) > 6 and call.operands[6].type != "!torch.none"
    if has_scale and isinstance(qs[-1], int):
        q_mult = float(site.scale) * math.sqrt(qs[-1])
    name = ed.fresh_symbol(f"attnpass_ssmax_{site.index}")
    ed.add_func(_ssmax_sdpa_func(name, qs, site.seq_k, masks, site.causal, ss, q_mult), f"SSMax for {site.name}")
    additive = any(m.term.kind == "additive" for m in masks)
    types = [q.type] + ([f"!torch.vtensor<[{','.join(map(str, (*qs[:-1], site.seq_k)))}],f32>"] if additive else [])
    new = ed.call(name, [ed.builtin(q, call.op), *mvals, *pvals], types, call.op)
    call.op.operands[0] = new[0]
    if additive:
        call.op.operands[3] = new[1]
    if has_scale:
        ir = ed.ir
        none = ir.Operation.create("torch.constant.none", results=[ir.Type.parse("!torch.none", ed.ctx)],
                                   loc=ir.Location.unknown(ed.ctx), ip=ir.InsertionPoint(call.op))
        call.op.operands[6] = none.result
        ed.notes.add(site, f"scale {site.scale:g} folded into q")
    ed.notes.add(site, f"SSMax via @{name} (factor on q" + (", mask scaled" if additive else "") + ")"
                      + (" (s, b as arguments)" if ss.s_arg else ""))


def _to_builtin_raw(ed: _Editor, v: Any, ty: str, before: Any) -> Any:
    ir = ed.ir
    op = ir.Operation.create("torch_c.to_builtin_tensor", results=[ir.Type.parse(ty, ed.ctx)], operands=[v],
                             loc=ir.Location.unknown(ed.ctx), ip=ir.InsertionPoint(before))
    return op.result


def _per_head(x: float | list[float], heads: int, what: str) -> list[float]:
    if isinstance(x, int | float):
        return [float(x)] * heads
    xs = [float(v) for v in x]
    if len(xs) == 1:
        return xs * heads
    if len(xs) != heads:
        raise AttnpassError(f"SSMax {what} has {len(xs)} values for {heads} heads")
    return xs


def fuse(module: Any, tile: int = DEFAULT_TILE, report: MlirReport | None = None) -> MlirReport:
    """Replace each fusable site (explicit chain or SDPA call) by a call to a generated online-softmax
    loop nest, in place."""
    report = find(module) if report is None else report
    ed = _Editor(module)
    for site in report.sites:
        if site.fusable:
            _fuse_site(ed, site, tile)
    for f in public_funcs(module):
        _erase_dead(f)
    return report.with_notes(ed.notes.by_site)


def _fuse_site(ed: _Editor, site: AttentionSite, tile: int, ssmax: tuple | None = None) -> None:
    """One site -> ``func.call @attnpass_fused_N(q, k, v, masks..., [s, b])``; ``ssmax = (s, b, params, func)``."""
    spec = _spec(site, tile)
    out: _Val = site.out
    before = out.producer.op
    # everything the call reads is defined before the op that produces the site's output
    masks, mvals = _mask_inputs(ed, [m for m in site_masks(site) if not (m.only_causal and site.causal)], before, "m")
    spec.masks = masks
    pvals: list[Any] = []
    if ssmax is not None:
        s, b, params, func = ssmax
        spec.ssmax, pvals = _ssmax_params(ed, func, spec.batch[-1] if spec.batch else 1, s, b, params, before)
    q, k, v = (ed.builtin(o.value, before) for o in (site.q, site.k, site.v))
    name = ed.fresh_symbol(f"attnpass_fused_{site.index}")
    ed.add_func(_fused_func(name, spec), f"fused attention for {site.name}")
    new = ed.call(name, [q, k, v, *mvals, *pvals], [out.type], before)[0]
    out.value.replace_all_uses_with(new)
    ed.notes.add(site, f"fused via @{name} (tile {spec.tile})" + (" with SSMax" if ssmax is not None else ""))


def _spec(site: AttentionSite, tile: int) -> _FusedSpec:
    qs, ks, vs, os_ = (tuple(x.shape) for x in (site.q.value, site.k.value, site.v.value, site.out))
    rank = site.out_rank
    s_q = qs[-2]
    s_k = ks[-1] if site.k.transposed else ks[-2]
    batch = tuple(os_[:-2])
    if len(batch) != rank - 2:
        raise AttnpassError(f"internal error: output of {site.name} is not [batch..., S_q, D_v]")
    k_groups, v_groups = site.k.groups, site.v.groups
    if site.form == "sdpa" and k_groups == 1:
        k_groups = v_groups = _gqa_groups(site) or 1  # enable_gqa: K/V carry fewer heads, not repeated
    return _FusedSpec(
        batch=batch, s_q=s_q, s_k=s_k, d=qs[-1], dv=vs[-1], q_shape=qs, k_shape=ks, v_shape=vs,
        k_transposed=site.k.transposed, k_groups=k_groups, v_groups=v_groups,
        scale=float(site.scale), softcap=site.softcap, causal=site.causal, masks=[], tile=_tile_for(s_k, tile),
    )


def describe(report: Report) -> list[dict[str, Any]]:
    return [s.summary() for s in report.sites]


__all__ = ["MlirAdapter", "MlirReport", "find", "to_ssmax", "fuse", "describe", "public_funcs"]
