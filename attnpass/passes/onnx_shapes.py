"""Shape arithmetic of the ONNX adapter's own propagation (TorchScript exports carry no value_info)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from attnpass.passes.site import Dim


def _dim(d: Any) -> Dim:
    if isinstance(d, int):
        return d
    if isinstance(d, ir.SymbolicDim):
        return d.value
    return None


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
        # (a product such as ``3*b`` counts as its factors, so ``[b, 3, 5, 4] -> [3*b, -1, 4]`` solves to 5)
        num, syms_src = _volume(src)
        den, syms_dst = _volume([d for d in out if d != -1])
        if syms_src == syms_dst and "None" not in syms_src:
            out[out.index(-1)] = num // den if den and num % den == 0 else None
        else:
            out[out.index(-1)] = None
    return tuple(None if d == -1 else d for d in out)


def _volume(dims: Any) -> tuple[int, list[str]]:
    """The numeric part of a shape's volume and its symbols, a symbolic product (``3*b``) split into its factors."""
    num, syms = 1, []
    for d in dims:
        for part in str(d).split("*") if not isinstance(d, int) else [d]:
            if isinstance(part, int) or part.strip().isdigit():
                num *= int(part)
            else:
                syms.append(part.strip())
    return num, sorted(syms)


def sym_mul(x: Dim, y: Dim) -> Dim:
    """A number times a symbolic size, written as the dynamo exporter writes it (``3*b``); None when unknown."""
    if isinstance(x, str) and isinstance(y, int):
        x, y = y, x
    if not (isinstance(x, int) and isinstance(y, str)) or x < 0:
        return None
    return y if x == 1 else f"{x}*{y}"


def _unsqueeze(s: tuple[Dim, ...], axes: list[int]) -> tuple[Dim, ...]:
    out: list[Dim] = list(s)
    r = len(s) + len(axes)
    for a in sorted(x % r for x in axes):
        out.insert(a, 1)
    return tuple(out)


def _matmul(a: tuple[Dim, ...] | None, b: tuple[Dim, ...] | None) -> tuple[Dim, ...] | None:
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    batch = _broadcast([a[:-2], b[:-2]])
    return None if batch is None else (*batch, a[-2], b[-1])


def _slice(s: tuple[Dim, ...] | None, starts: list | None, ends: list | None, axes: list | None,
           steps: list | None) -> tuple[Dim, ...] | None:
    """``Slice``: the sliced axes' lengths where their bounds are known, every other axis kept.

    Keeping the untouched axes is what matters: GPT-NeoX's rotary split slices the head dim with bounds computed
    at run time, and the head count (another axis) must survive it.
    """
    if s is None or starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if len(axes) != len(starts) or len(steps) != len(starts) or not all(isinstance(a, int) for a in axes):
        return None
    out: list[Dim] = list(s)
    for a, b, e, st in zip(axes, starts, ends, steps):
        d = out[a % len(s)]
        ok = all(isinstance(x, int) for x in (d, b, e, st)) and st != 0
        out[a % len(s)] = len(range(*slice(b, e, st).indices(d))) if ok else None
    return tuple(out)


def _concat(shapes: list[tuple[Dim, ...] | None], axis: int) -> tuple[Dim, ...] | None:
    """``Concat``: the axis summed where every part is known; other axes from whichever input knows them."""
    if not shapes or any(x is None or len(x) != len(shapes[0]) for x in shapes):  # type: ignore[arg-type]
        return None
    r = len(shapes[0])  # type: ignore[arg-type]
    ax = axis % r
    out: list[Dim] = []
    for i in range(r):
        ds = [x[i] for x in shapes]  # type: ignore[index]
        if i == ax:
            out.append(sum(ds) if all(isinstance(d, int) for d in ds) else None)
        else:
            out.append(next((d for d in ds if isinstance(d, int)), next((d for d in ds if d is not None), None)))
    return tuple(out)
