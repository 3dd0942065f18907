"""Values of constant-only torch-dialect subgraphs, computed with numpy, for the MLIR adapter's ``static_value``.

The matcher proves a mask causal "by value" when the mask is built from constants only.  torch-mlir spells such
masks as small op chains on literals: a ``tril`` buffer is a ``dense_resource`` literal cast and sliced to the
sequence, ``triu(full(-inf), 1)`` decomposes to ``where(arange - arange >= 1, full_like(-inf), 0)``.  The
adapter cannot answer without evaluating them, and torch-mlir's folders do not run on the raw import, so the
few ops these masks use are evaluated here, each intermediate within an element budget; any other op makes the
value unknown (None), never a guess.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from attnpass.passes.kinds import canonical_product, divide_product

_DTYPES = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "bf16": np.float32, "si64": np.int64,
           "si32": np.int32, "si16": np.int16, "si8": np.int8, "ui8": np.uint8, "i1": np.bool_}

_RESOURCE_KEY = re.compile(r"dense_resource<([^>]+)>")
_TENSOR_ELT = re.compile(r"tensor<(?:[0-9?]+x)*([a-z0-9]+)>")

_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal}
_LOGICAL: dict[str, Callable[[Any, Any], Any]] = {
    "logical_and": np.logical_and, "bitwise_and": np.logical_and, "logical_or": np.logical_or, "bitwise_or": np.logical_or}
_CASTS = ("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "to", "_to_copy", "convert_element_type", "type_as")
_RESHAPES = ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze")
_BROADCASTS = ("expand", "expand_as", "broadcast_to")  # the result's broadcast to its static shape does it
_FILLS = {"zeros": 0, "ones": 1, "zeros_like": 0, "ones_like": 1, "new_zeros": 0, "new_ones": 1}


class _Unknown(Exception):
    """The value depends on an op (or a size) this evaluator does not take."""


def _np_dtype(elt: str | None) -> Any:
    if elt not in _DTYPES:
        raise _Unknown(elt)
    return _DTYPES[elt]


def literal_array(node: Any, shape: tuple[int, ...], elt: str | None) -> np.ndarray | None:
    """A ``torch.vtensor.literal``'s elements: inline ``dense<...>`` or a ``dense_resource`` blob.

    The bindings expose no reader for resource blobs; a clone of the literal printed in a module of its own
    carries only its own blob, in hex (4 bytes of alignment, then the raw little-endian elements).
    """
    from torch_mlir import ir

    attr = node.op.attributes["value"]
    try:
        dense = ir.DenseElementsAttr(attr)
    except Exception:
        dense = None
    if dense is not None:
        if dense.is_splat:
            v = dense.get_splat_value()
            v = getattr(v, "value", v)
            return np.full(shape, v, dtype=_np_dtype(elt))
        return np.array(dense).reshape(shape).astype(_np_dtype(elt))  # the attribute's buffer
    key, src_elt = _RESOURCE_KEY.search(str(attr)), _TENSOR_ELT.search(str(attr.type) if hasattr(attr, "type") else "")
    if key is None or src_elt is None:
        return None
    with node.op.context, ir.Location.unknown():
        holder = ir.Module.create()
        with ir.InsertionPoint(holder.body):
            node.op.clone()
        text = holder.operation.get_asm()
    blob = re.search(re.escape(key.group(1)) + r'\s*:\s*"0x([0-9A-Fa-f]*)"', text)
    if blob is None:
        return None
    raw = bytes.fromhex(blob.group(1))[4:]
    src = np.dtype(np.uint8 if src_elt.group(1) == "i1" else _np_dtype(src_elt.group(1))).newbyteorder("<")
    if len(raw) != math.prod(shape) * src.itemsize:
        return None
    return np.frombuffer(raw, dtype=src).reshape(shape).astype(_np_dtype(elt))


class Evaluator:
    """Evaluates ``_Val``s of one adapter; ``limit`` bounds the elements of every intermediate tensor."""

    def __init__(self, adapter: Any, limit: int):
        self.a = adapter
        self.limit = limit
        self.memo: dict[int, Any] = {}

    def value(self, v: Any) -> np.ndarray | None:
        try:
            out = self._eval(v, 0)
        except (_Unknown, ValueError, TypeError, IndexError, ArithmeticError):
            return None
        return out if isinstance(out, np.ndarray) else None

    def scalar(self, v: Any) -> int | float | bool | None:
        """A constant-only scalar (``!torch.int``...): a size read with ``item`` from a constant shape; None otherwise."""
        try:
            out = self._eval(v, 0)
        except (_Unknown, ValueError, TypeError, IndexError, ArithmeticError):
            return None
        return out if isinstance(out, int | float | bool) else None

    def _eval(self, v: Any, depth: int) -> Any:
        if id(v) not in self.memo:
            self.memo[id(v)] = self._compute(v, depth)
        return self.memo[id(v)]

    def _compute(self, v: Any, depth: int) -> Any:
        p = v.producer
        if p is None or depth > 64:
            raise _Unknown("an argument")
        if p.opname == "torch.constant.none":
            return None
        if p.opname.startswith("torch.constant."):
            c = self.a.constant(v)
            if c is None:
                raise _Unknown(p.opname)
            return int(c) if p.opname != "torch.constant.float" else c
        if p.opname == "torch.prim.ListConstruct":
            return [self._eval(x, depth + 1) for x in p.operands]
        shape, elt = v.shape, v.dtype
        if p.aten == "item" and v.type in ("!torch.int", "!torch.float", "!torch.bool"):  # a size read from a tensor
            x = np.asarray(self._arg(p, 0, depth))
            if x.size != 1:
                raise _Unknown("item of a tensor of more than one element")
            return {"!torch.int": int, "!torch.float": float, "!torch.bool": bool}[v.type](x.reshape(()).item())
        if shape == () and elt is None:
            raise _Unknown(v.type)  # a scalar computed by an op
        if shape is None or any(d is None for d in shape) or math.prod(shape) > self.limit:
            raise _Unknown("a dynamic or large shape")
        if p.opname == "torch.vtensor.literal":
            got = literal_array(p, shape, elt)
            if got is None:
                raise _Unknown("a literal")
            return got
        out = self._aten(p, shape, depth)
        return np.broadcast_to(np.asarray(out), shape).astype(_np_dtype(elt))

    def _arg(self, p: Any, i: int, depth: int) -> Any:
        return self._eval(p.operands[i], depth + 1) if i < len(p.operands) else None

    def _aten(self, p: Any, shape: tuple[int, ...], depth: int) -> Any:
        name, ops = p.aten, p.operands
        arg = lambda i: self._arg(p, i, depth)  # noqa: E731
        if name in _CASTS or name in _BROADCASTS:
            return arg(0)
        if name in _RESHAPES:
            return np.reshape(arg(0), shape)
        if name in ("full", "full_like", "new_full"):
            return np.full(shape, arg(2 if name == "new_full" else 1))
        if name in _FILLS:
            return np.full(shape, _FILLS[name])
        if name == "scalar_tensor":
            return np.full(shape, arg(0))
        if name == "arange":
            lo, hi, step = (0, arg(0), 1) if p.overload in ("", "default") else (
                arg(0), arg(1), arg(2) if p.overload == "start_step" else 1)
            return np.arange(lo, hi, step)
        if name == "index_select":  # ONNX ``Gather`` of a shape: torch-mlir leaves it on the raw import
            return np.take(arg(0), np.asarray(arg(2)).astype(np.int64), axis=arg(1))
        if name in ("permute", "transpose"):
            x = arg(0)
            return np.transpose(x, arg(1)) if name == "permute" else np.swapaxes(x, arg(1), arg(2))
        if name == "slice":
            x, dim, start, end, step = arg(0), arg(1), arg(2), arg(3), arg(4)
            index = [slice(None)] * x.ndim
            index[dim] = slice(start, None if end is None else min(end, x.shape[dim]), step)
            return x[tuple(index)]
        if name in ("add", "sub", "mul", "div", "rsub"):
            x, y = arg(0), arg(1)
            if name in ("add", "sub", "rsub") and len(ops) > 2:
                y = y * arg(2)
            return {"add": lambda: x + y, "sub": lambda: x - y, "rsub": lambda: y - x, "mul": lambda: x * y,
                    "div": lambda: np.true_divide(x, y)}[name]()
        if name == "neg":
            return -arg(0)
        if name in _COMPARE:
            return _COMPARE[name](arg(0), arg(1))
        if name in _LOGICAL:
            return _LOGICAL[name](arg(0), arg(1))
        if name in ("logical_not", "bitwise_not"):
            return np.logical_not(arg(0))
        if name == "where":
            return np.where(np.asarray(arg(0)).astype(bool), arg(1), arg(2))
        if name == "masked_fill":
            return np.where(np.asarray(arg(1)).astype(bool), arg(2), arg(0))
        if name in ("tril", "triu"):
            k = arg(1) if len(ops) > 1 else 0
            return np.tril(arg(0), k) if name == "tril" else np.triu(arg(0), k)
        raise _Unknown(p.opname)


__all__ = ["Evaluator", "literal_array"]


def splat(attr: Any) -> float | None:
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


# ------------------------------------------------------------------ symbolic sizes

_SIZE_ELEMENTWISE = ("add", "sub", "mul", "div", "where", "masked_fill", *_CASTS)


def size_expr(v: Any, axis: int, depth: int = 0) -> str | None:
    """A dynamic size as a canonical product (``3*%arg3[0]``), read from the ``aten.view`` size lists torch.export
    leaves (``torch.aten.size.int`` / ``torch.aten.mul.int``); None where it cannot be read.

    The types print an unknown size as ``?`` only, so two ``?`` cannot be compared; the sizes a view was given can.
    Elementwise ops take the size from the first operand that has it (a ``?`` is not an implicit broadcast, as
    torch-mlir assumes).  Values are the adapter's ``_Val``s; a function argument is named by its position.
    """
    shape = getattr(v, "shape", None)
    if shape is None or depth > 32 or not -len(shape) <= axis < len(shape):
        return None
    axis %= len(shape)
    if isinstance(shape[axis], int):
        return str(shape[axis])
    p = v.producer
    if p is None:
        return f"%arg{_arg_number(v.value)}[{axis}]"
    if p.aten in ("view", "reshape", "_unsafe_view") and len(p.operands) > 1:
        lst = p.operands[1].producer
        if lst is None or lst.opname != "torch.prim.ListConstruct" or len(lst.operands) != len(shape):
            return None
        got = _int_expr(lst.operands[axis], depth + 1)
        if got != "-1":
            return got
        # ``-1``: the source's volume over the other sizes, when they divide it (``[b, 3, 5, 5] -> [3*b, 5, -1]``)
        src_shape = getattr(p.operands[0], "shape", None)
        if src_shape is None:
            return None
        whole = [size_expr(p.operands[0], a, depth + 1) for a in range(len(src_shape))]
        rest = [_int_expr(x, depth + 1) for i, x in enumerate(lst.operands) if i != axis]
        return None if None in whole or None in rest else divide_product(whole, rest)  # type: ignore[arg-type]
    if p.aten in _SIZE_ELEMENTWISE:
        for x in p.operands:
            xs = getattr(x, "shape", None)
            if xs is not None and len(xs) == len(shape) and xs[axis] != 1:
                return size_expr(x, axis, depth + 1)
    return None


def _arg_number(value: Any) -> str:
    from torch_mlir import ir

    try:
        return str(ir.BlockArgument(value).arg_number)
    except (TypeError, ValueError):
        return f"v{id(value):x}"


def _int_expr(iv: Any, depth: int) -> str | None:
    """A ``!torch.int`` as a canonical product: a constant, a ``size.int`` of a tensor, or a product of those."""
    p = iv.producer
    if p is None or depth > 32:
        return None
    if p.opname == "torch.constant.int":
        return str(p.op.attributes["value"].value)
    if p.aten == "size" and len(p.operands) == 2:
        axis = _int_expr(p.operands[1], depth + 1)
        return None if axis is None or not axis.lstrip("-").isdigit() else size_expr(p.operands[0], int(axis), depth + 1)
    if p.aten == "mul" and len(p.operands) == 2:
        parts = [_int_expr(x, depth + 1) for x in p.operands]
        return None if None in parts else canonical_product(*parts)  # type: ignore[arg-type]
    return None
