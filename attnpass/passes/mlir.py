"""torch-dialect MLIR adapter for the matcher: reads a module and reports its attention sites.

The adapter reads the torch dialect that users get from torch-mlir:

* ``torch_mlir.fx.export_and_import(..., output_type="raw")``: ATen after torch's core
  decompositions: ``aten.bmm`` wrapped in ``aten.expand``/``aten.view``, ``aten.permute`` for
  ``K^T``, ``aten._softmax``, ``aten.where.self`` with a ``vtensor.literal(-inf)`` for
  ``masked_fill``, ``aten.div.Scalar`` scales;
* ONNX through ``convert-torch-onnx-to-torch``: ``aten.matmul``, ``aten.transpose.int``,
  ``aten.softmax.int``, ``aten.div.Tensor`` by a 0-d literal;
* the torch *backend* form (``torch-onnx-to-torch-backend-pipeline`` or ``output_type="torch"``)
  where softmax is already decomposed (``max -> sub -> exp -> sum -> div``), presented as one SOFTMAX
  node anchored on the ``div``; ``torch.operator "onnx.Attention"`` is a fused op (``mlir_attention_op``).

A small Python graph (``_Node``/``_Val``) is built once: the matcher compares values by identity and
MLIR's Python objects are re-created on every access.  This module never edits the IR.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from attnpass.passes import mlir_attention_op as onnx_attention
from attnpass.passes import topk_ir
from attnpass.passes.aten import ATEN_KINDS
from attnpass.passes.match import AttentionSite, Dim, Kind, Report, find_sites
from attnpass.passes.mlir_broadcasts import is_broadcast_tile, materialized_expand
from attnpass.passes.mlir_dynamic import dynamic_blocker
from attnpass.passes.mlir_values import Evaluator, size_expr, splat

# ------------------------------------------------------------------ op tables

_FILLS = {"zeros": 0.0, "ones": 1.0, "new_ones": 1.0, "new_zeros": 0.0, "zeros_like": 0.0, "ones_like": 1.0}

# Ops without side effects in value semantics: safe to erase once unused.
_PURE_PREFIXES = ("torch.aten.", "torch.prim.ListConstruct", "torch.constant.", "torch.vtensor.literal",
                  "torch_c.", "torch.prims.")

# Ops that only assert on a value: not users of it, and erased with it.
_ASSERTS = ("torch.aten._assert_tensor_metadata", "torch.aten._assert_scalar", "torch.aten.sym_constrain_range_for_size")

# Ops that read only the shape and dtype of their first operand: not users of its values.
_SHAPE_ONLY = ("full_like", "zeros_like", "ones_like", "empty_like")

# 0-d arithmetic on literals folded to a number by ``constant``: (operands read, the function)
_SCALAR_FOLDS: dict[str, tuple[int, Any]] = {
    "pow": (2, lambda a, b: a ** b), "sqrt": (1, math.sqrt), "reciprocal": (1, lambda a: 1.0 / a),
    "mul": (2, lambda a, b: a * b), "div": (2, lambda a, b: a / b),
}

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

    def no_key_test(self, cond: Any, scores: Any, zero_when: bool, masks: tuple[Any, ...] = ()) -> bool:
        """A post-softmax guard that only zeroes rows with no attendable key: the rewrites imply it.

        torch's decomposition of ``scaled_dot_product_attention`` (what ``torch_mlir.fx.export_and_import``
        applies by default) zeroes the rows whose scores are all ``-inf``:
        ``where(all(eq(x, -inf), -1, keepdim), full_like(p, 0), softmax(x))``; fx's own spelling is
        ``where(any(not(eq(x, -inf))), softmax(x), 0)``.  The ONNX ``Attention`` schema's decomposition
        zeroes the rows where one of the site's bias ``masks`` is ``-inf`` everywhere (or tests a literal
        zero bias, a guard that never fires).
        """
        if _is_no_key_test(cond, scores, want_all=zero_when):
            return True
        return zero_when and _is_masked_bias_row_test(self, cond, list(masks))

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
            return Kind.SDPA if onnx_attention.is_attention_op(node) else Kind.OTHER
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
        if is_broadcast_tile(node, self._ints):
            return Kind.EXPAND
        return ATEN_KINDS.get(name, Kind.OTHER)

    def _is_cast(self, node: _Node) -> bool:
        src, dst = node.operands[0].dtype, node.results[0].dtype
        return src is not None and dst is not None and src != dst

    def inputs(self, node: _Node) -> list[Any]:
        if node.softmax_parts:
            return [node.softmax_parts[1].operands[0]]
        if node.aten is None and onnx_attention.is_attention_op(node):
            return onnx_attention.inputs(node)
        name = node.aten
        ops = node.operands
        if name == "masked_fill":
            return [ops[1], ops[2], ops[0]]
        if name == "einsum":
            lst = ops[1].producer
            return list(lst.operands) if lst is not None else []
        if name in ("expand_as", "type_as") or is_broadcast_tile(node, self._ints):
            return [ops[0]]
        if ATEN_KINDS.get(name) is Kind.RESHAPE and materialized_expand(ops[0]) is not None:
            return [materialized_expand(ops[0]), *ops[1:]]
        if name == "scaled_dot_product_attention":
            # an absent attn_mask is a !torch.none operand: the matcher reads it as no mask, as in fx
            return [None if isinstance(o, _Val) and o.type == "!torch.none" else o for o in ops]
        return list(ops)

    def fused_op_info(self, node: _Node) -> Any:  # only the ONNX op carries head counts / softcap
        return onnx_attention.info(node) if node.aten is None and onnx_attention.is_attention_op(node) else None

    def is_bool(self, value: Any) -> bool:
        return isinstance(value, _Val) and value.dtype == "i1"

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
            list_users = u.results[0].users if u.opname == "torch.prim.ListConstruct" else []
            if list_users and all(e.aten == "einsum" for e in list_users):
                # an einsum reads its operands through a list: the einsum is the user of the value
                out.extend(e for e in list_users if e not in out)
                continue
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
            return splat(attrs["value"])
        if p.aten is not None and ATEN_KINDS.get(p.aten) is Kind.IDENTITY and p.operands:
            return self.constant(p.operands[0])  # clone / lift_fresh_copy of a literal
        if p.aten in _SCALAR_FOLDS and len(p.results[0].shape or ()) == 0:
            # the legacy ONNX exporter spells the scale as Pow(d, -0.5) on a literal: fold it as a number
            args = [self.constant(o) for o in p.operands[:_SCALAR_FOLDS[p.aten][0]]]
            if any(x is None for x in args):
                return None
            try:
                return float(_SCALAR_FOLDS[p.aten][1](*args))
            except (ArithmeticError, ValueError):
                return None
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
        if op is None and onnx_attention.is_attention_op(node):
            return onnx_attention.attr(node, name, default)
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
                return splat(node.op.attributes["value"])
            if op in _FILLS:
                return _FILLS[op]
            if op in ("full", "new_full", "full_like"):
                return self.constant(ops[1])
            if op == "scalar_tensor":
                return self.constant(ops[0])
        return default

    def shape(self, value: Any) -> tuple[Dim, ...] | None:
        return value.shape if isinstance(value, _Val) else None

    def size_expr(self, value: Any, axis: int) -> str | None:
        """An unknown size as a product of the sizes torch.export computed it from (``mlir_values.size_expr``)."""
        return size_expr(value, axis) if isinstance(value, _Val) else None

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

    def reduction(self, node: Any) -> Any:
        """A top-k / max / argmax / sum node described for the top-k walk (``passes/topk.py``), else None."""
        return topk_ir.mlir_reduction(self, node)

    def static_value(self, value: Any, limit: int = 1 << 24) -> Any | None:
        """The elements of a constant-only value as numpy (a mask buffer, a decomposed ``triu``); None otherwise.

        torch-mlir's folders do not run on the raw import, so the few ops such masks use are evaluated here
        (``mlir_values``), every intermediate within ``limit`` elements.
        """
        if not isinstance(value, _Val) or not self.is_static(value):
            return None
        return Evaluator(self, limit).value(value)


def _first(xs: list[int] | None) -> int | None:
    return xs[0] if xs and len(xs) == 1 else None


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
    skipped, topk = [], []
    adapters: dict[int, MlirAdapter] = {}
    for func in public_funcs(module):
        adapter = MlirAdapter(func)
        rep = find_sites(adapter)
        for site in rep.sites:
            site = replace(site, index=len(sites))
            why, stop = _lowering_blocker(site), site.ssmax_blocker
            if onnx_attention.is_attention_op(site.softmax):
                why, stop = onnx_attention.blockers(site.softmax, why, stop)
            site = replace(site, fuse_blocker=why, ssmax_blocker=stop)
            adapters[site.index] = adapter
            sites.append(site)
        skipped.extend(rep.skipped)
        topk.extend(replace(t, index=len(topk)) for t in rep.topk)
    return MlirReport(sites, skipped, tuple(topk), adapters)


_FLOATS = ("f32", "f16", "bf16")  # what the loop nest reads (halves widened to f32 inside)




def _lowering_blocker(site: AttentionSite) -> str | None:
    """What the MLIR rewrites cannot express yet goes into the report as the reason."""
    if site.fuse_blocker is not None:
        return site.fuse_blocker
    why = None
    masks = _mask_values(site)
    if site.row_guards:
        why = "rows zeroed after the softmax by a condition other than 'no attendable key' are not handled"
    else:
        vals = [site.q.value, site.k.value, site.v.value, site.out, *masks]
        if any(not isinstance(v, _Val) or v.shape is None for v in vals):
            why = "dynamic shapes: the MLIR fused rewrite needs operands of known rank"
        elif (dyn := dynamic_blocker(site)) is not None:  # unknown batch dims are read at run time
            why = dyn
        elif len({v.dtype for v in (site.q.value, site.k.value, site.v.value, site.out)} - {None}) != 1 or \
                site.q.value.dtype not in _FLOATS:
            why = "the MLIR fused rewrite needs Q, K, V and the output in one of f32, f16, bf16"
        elif any(m.dtype not in ("i1", *_FLOATS) for m in masks):
            why = "a mask that is neither bool nor f32 / f16 / bf16"
        elif site.form == "sdpa" and site.k.groups == 1 and _gqa_groups(site) is None:
            why = "scaled_dot_product_attention with a head count of Q that is not a multiple of K's"
        elif onnx_attention.is_attention_op(site.softmax) and site.ssmax_blocker:
            why = site.ssmax_blocker  # the op cannot stay (torch-mlir cannot lower it), nor be replaced
    return why


def _is_masked_bias_row_test(adapter: MlirAdapter, cond: Any, masks: list[Any]) -> bool:
    """``max_j bias[.., j] == -inf`` (keepdim), ``bias`` one of the site's masks: the ONNX ``Attention`` schema's
    fully-masked-row guard, which restates the "no attendable key" rule (on a literal bias with no all ``-inf``
    row, the schema's zeros without a mask, it never fires)."""
    test = cond.producer if isinstance(cond, _Val) else None
    if test is None or test.aten != "eq" or len(test.operands) < 2:
        return False
    for red_v, lit in (test.operands[:2], test.operands[1::-1]):
        red = red_v.producer
        if adapter.constant(lit) != -math.inf or red is None or red.aten not in ("amax", "max"):
            continue
        rank = len(red.operands[0].shape or ())
        axes = adapter._ints(red.operands[1]) if red.aten == "amax" else [adapter._int(red.operands[1])]
        keep = adapter.constant(red.operands[2]) if len(red.operands) > 2 else None
        if not rank or axes is None or len(axes) != 1 or axes[0] is None or axes[0] % rank != rank - 1 or keep != 1.0:
            continue
        bias = red.operands[0]
        if any(bias is m for m in masks):
            return True
        # without a mask the schema's bias is a literal (zeros): a guard on it that never fires is no guard
        const = adapter.static_value(bias)
        if const is not None and not (const == -math.inf).all(axis=-1).any():
            return True
    return False


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


def _mask_values(site: AttentionSite) -> list[Any]:
    """The mask tensors a rewrite reads: the chain's terms, or the ``attn_mask`` of an SDPA call."""
    return [m.value for m in site.masks] if site.form != "sdpa" else [site.sdpa_mask] if site.sdpa_mask is not None else []


def _gqa_groups(site: AttentionSite) -> int | None:
    """Query heads per K/V head of an SDPA call (1 without GQA); None if they do not divide."""
    qs, ks = site.q.value.shape, site.k.value.shape
    if len(qs) < 3 or len(ks) < 3 or qs[-3] == ks[-3]:
        return 1
    if qs[-3] is None or ks[-3] is None:  # an unknown head count (the fused rewrite is then left, mlir_dynamic)
        return None
    if ks[-3] and qs[-3] % ks[-3] == 0:
        return qs[-3] // ks[-3]
    return None


__all__ = ["MlirAdapter", "MlirReport", "find", "public_funcs"]
