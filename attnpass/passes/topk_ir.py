"""Each IR's answer to the top-k walk's one question, ``reduction(node)`` (see ``passes/topk.py``).

Kept out of the adapters themselves so they stay small: each adapter's ``reduction`` method calls the
function for its IR here.  A reduction is a top-k, a max / amax, an argmax or a sum; what each IR spells
differently is where k, the axis and ``keepdim`` live and how a node hands out its two results.
"""

from __future__ import annotations

from typing import Any

from attnpass.passes.topk import Reduction

# ------------------------------------------------------------------ torch.fx


def _fx_arg(node: Any, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _one_axis(dim: Any) -> tuple[bool, int | None]:
    """(understood, axis): an int, or a one-element list; ``None`` means every axis."""
    if dim is None:
        return True, None
    if isinstance(dim, int):
        return True, dim
    if isinstance(dim, list | tuple) and len(dim) == 1 and isinstance(dim[0], int):
        return True, dim[0]
    return False, None


def _fx_results(node: Any) -> tuple[Any, Any]:
    """The values / indices results of a tuple-returning fx node (``getitem`` users), None where unread."""
    import operator

    got: dict[int, Any] = {}
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
            got.setdefault(u.args[1], u)
    return got.get(0), got.get(1)


def fx_reduction(ad: Any, node: Any) -> Reduction | None:
    """torch.fx, ATen (``aten.topk``, ``aten.max.dim``, ``aten.amax``, ``aten.argmax``, ``aten.sum.dim_IntList``)
    and torch level (``torch.topk``, ``Tensor.max(dim)``, ``Tensor.sum(-1, keepdim=True)``...)."""
    from attnpass.passes.fx import _op_name

    if node.op not in ("call_function", "call_method"):
        return None
    name = _op_name(node)
    if name not in ("topk", "max", "amax", "argmax", "sum", "gather") or not node.args:
        return None
    x = ad.inputs(node)[0]
    if name == "gather":  # gather(x, dim, index): the selected entries read back from the probabilities
        dim, index = _fx_arg(node, 1, "dim"), _fx_arg(node, 2, "index")
        return Reduction("gather", x, dim, indices=index, values=node) if isinstance(dim, int) else None
    if name == "topk":
        k = _fx_arg(node, 1, "k")
        ok, axis = _one_axis(_fx_arg(node, 2, "dim", -1))
        if not ok:
            return None
        vals, idx = _fx_results(node)
        return Reduction("topk", x, axis, True, k if isinstance(k, int) else None,
                         bool(_fx_arg(node, 3, "largest", True)), vals, idx)
    if name == "max":
        dim = _fx_arg(node, 1, "dim")
        if dim is None:  # max over everything: one value
            return Reduction("max", x, None, False, values=node)
        if not isinstance(dim, int):
            return None  # max(a, b): elementwise
        vals, idx = _fx_results(node)
        return Reduction("max", x, dim, bool(_fx_arg(node, 2, "keepdim", False)), values=vals, indices=idx)
    if name in ("amax", "argmax", "sum"):
        ok, axis = _one_axis(_fx_arg(node, 1, "dim", [] if name == "amax" else None))
        if not ok:
            if name == "amax" and _fx_arg(node, 1, "dim", []) in ([], ()):
                return Reduction("max", x, None, False, values=node)
            return None
        if name == "sum" and _fx_arg(node, 3, "dtype") is not None:
            return None
        keep = bool(_fx_arg(node, 2, "keepdim", False))
        if name == "argmax":
            return Reduction("argmax", x, axis, keep, indices=node)
        return Reduction("max" if name == "amax" else "sum", x, axis, keep, values=node)
    return None


# ------------------------------------------------------------------ ONNX


def onnx_reduction(ad: Any, node: Any) -> Reduction | None:
    """ONNX ``TopK`` (k an input), ``ReduceMax`` / ``ReduceSum`` (axes an attribute or, newer opsets, an
    input), ``ArgMax`` (``select_last_index=0`` only: the first maximum, as torch)."""
    from attnpass.passes.onnx import _domain

    if _domain(node) != "":
        return None
    op = node.op_type
    x = node.inputs[0] if node.inputs else None
    if x is None:
        return None
    if op == "TopK":
        k = ad.constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if k is None and ad.opset < 10:
            k = ad._attr_raw(node, "k")
        return Reduction("topk", x, int(ad._attr_raw(node, "axis", -1)), True,
                         int(k) if k is not None else None, bool(ad._attr_raw(node, "largest", 1)),
                         node.outputs[0], node.outputs[1] if len(node.outputs) > 1 else None)
    if op == "GatherElements" and len(node.inputs) > 1:
        return Reduction("gather", x, int(ad._attr_raw(node, "axis", 0)), indices=node.inputs[1], values=node.outputs[0])
    if op == "ArgMax":
        if ad._attr_raw(node, "select_last_index", 0):
            return None
        return Reduction("argmax", x, int(ad._attr_raw(node, "axis", 0)), bool(ad._attr_raw(node, "keepdims", 1)),
                         indices=node.outputs[0])
    if op in ("ReduceMax", "ReduceSum"):
        axes = ad._axes(node)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            return None  # axes computed at run time
        if axes is None or axes == []:
            if ad._attr_raw(node, "noop_with_empty_axes", 0):
                return None
            axis = None
        elif len(axes) == 1:
            axis = int(axes[0])
        else:
            return None
        return Reduction("max" if op == "ReduceMax" else "sum", x, axis, bool(ad._attr_raw(node, "keepdims", 1)),
                         values=node.outputs[0])
    return None


# ------------------------------------------------------------------ torch-dialect MLIR


def _nonneg(index: Any) -> Any:
    """The index under ONNX ``GatherElements``' negative-index wrap, ``where(i < 0, i + n, i)`` (a no-op for top-k
    indices, which are never negative), else ``index`` itself."""
    p = index.producer
    if p is None or p.aten != "where" or len(p.operands) != 3:
        return index
    i = p.operands[2]
    lt, add = p.operands[0].producer, p.operands[1].producer
    is_lt = lt is not None and lt.aten == "lt" and lt.operands[0] is i
    is_add = add is not None and add.aten == "add" and add.operands[0] is i
    return i if is_lt and is_add else index


def mlir_reduction(ad: Any, node: Any) -> Reduction | None:
    """``torch.aten.topk`` / ``max.dim`` / ``amax`` / ``argmax`` / ``sum.dim_IntList`` with constant operands."""
    name, ops = node.aten, node.operands
    if name not in ("topk", "max", "amax", "argmax", "sum", "gather") or not ops:
        return None
    x = ops[0]
    if name == "gather":
        dim = ad.constant(ops[1]) if len(ops) > 2 else None
        return None if dim is None else Reduction("gather", x, int(dim), indices=_nonneg(ops[2]), values=node.results[0])

    def const(i: int) -> Any:
        return ad.constant(ops[i]) if len(ops) > i else None

    def is_none(i: int) -> bool:
        return len(ops) <= i or ops[i].type == "!torch.none"

    if name == "topk":
        k, dim, largest = const(1), const(2), const(3)
        if dim is None:
            return None
        return Reduction("topk", x, int(dim), True, None if k is None else int(k),
                         True if largest is None else bool(largest), node.results[0], node.results[1])
    if name == "max":
        if node.overload == "dim":
            dim, keep = const(1), const(2)
            if dim is None:
                return None
            return Reduction("max", x, int(dim), bool(keep), values=node.results[0], indices=node.results[1])
        if node.overload == "" and len(ops) == 1:
            return Reduction("max", x, None, False, values=node.results[0])
        return None
    if name == "argmax":
        keep = bool(const(2))
        if is_none(1):
            return Reduction("argmax", x, None, keep, indices=node.results[0])
        dim = const(1)
        return None if dim is None else Reduction("argmax", x, int(dim), keep, indices=node.results[0])
    # amax / sum over a list of dims
    if name == "sum" and node.overload != "dim_IntList":
        return None
    if name == "sum" and not is_none(3):
        return None  # a dtype
    dims = ad._ints(ops[1]) if len(ops) > 1 and not is_none(1) else []
    if dims is None or len(dims) > 1:
        return None
    keep = bool(const(2))
    return Reduction("max" if name == "amax" else "sum", x, dims[0] if dims else None, keep, values=node.results[0])


__all__ = ["fx_reduction", "mlir_reduction", "onnx_reduction"]
