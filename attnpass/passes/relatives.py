"""SSMax's relatives already in a model: position-dependent query scaling, named with its parameters.

Production models scale ``q`` by a factor that grows with the position, which is what SSMax does
with ``s log n + b``: Llama 4's attention temperature tuning (``1 + a log1p(floor((p + 1) / F))``),
Ministral 3 / Mistral 4's ``llama_4_scaling`` (``1 + beta log(1 + floor(p / M))``), Qwen-1's log-n
table (``max(1, log(p + 1) / log L)``), and an SSMax attnpass itself emitted.  A second factor on top
of one of these would scale attention twice, so the report names it and the plan refuses to stack
(``RewriteSpec.replace_existing``).

How: walk back from the site's Q operand through layout ops to each multiply; the other operand is
read as a small expression of the positions (``arange`` leaves, constants, + - * /, log, log1p,
floor, casts and views), or, when the exporter folded it, as a table of values along the sequence
axis.  The family is recognised from numbers, not op spellings (``log1p(x)`` and ``log(1 + x)``,
``/ F`` and ``* (1/F)`` are the same), so one recogniser serves fx, ONNX and MLIR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnpass.passes.kinds import Adapter, Kind

_LAYOUT = {Kind.RESHAPE, Kind.TRANSPOSE, Kind.IDENTITY, Kind.EXPAND, Kind.CAST, Kind.UNSQUEEZE}
_BINARY = {Kind.ADD: np.add, Kind.SUB: np.subtract, Kind.MUL: np.multiply, Kind.DIV: np.divide}
_UNARY = {Kind.LOG: np.log, Kind.LOG1P: np.log1p, Kind.FLOOR: np.floor}
#: What the report calls each family.
NAMES = {
    "llama4_temperature": "Llama 4 attention temperature tuning",
    "llama_4_scaling": "llama_4_scaling (Ministral 3 / Mistral 4)",
    "qwen_logn": "Qwen-1 log-n query scaling",
    "ssmax": "SSMax (attnpass)",
    "position_scale": "position-dependent query scaling",
}


@dataclass(frozen=True)
class Expr:
    """A function of the position ``p``: ``"p"`` (``p + value``), ``"c"`` (``value``), or an op on ``args``."""

    op: str
    args: tuple[Expr, ...] = ()
    value: float = 0.0

    def __call__(self, p: np.ndarray) -> np.ndarray:
        if self.op == "p":
            return p.astype(np.float64) + self.value
        if self.op == "c":
            return np.full(p.shape, self.value, dtype=np.float64)
        xs = [a(p) for a in self.args]
        with np.errstate(all="ignore"):
            return _FUNCS[self.op](*xs)

    def uses(self, op: str) -> bool:
        return self.op == op or any(a.uses(op) for a in self.args)

    def sub(self, op: str) -> Expr | None:
        """The outermost sub-expression with ``op`` (depth first)."""
        if self.op == op:
            return self
        for a in self.args:
            found = a.sub(op)
            if found is not None:
                return found
        return None


_FUNCS: dict[str, Callable[..., np.ndarray]] = {
    **{k.value: f for k, f in _BINARY.items()}, **{k.value: f for k, f in _UNARY.items()}}


@dataclass(frozen=True, eq=False)
class Relative:
    """A query scaling found on a site: its family, recovered parameters and where it is applied.

    ``node`` multiplies ``data`` (the unscaled Q) by ``factor``; a rewrite told to replace the scaling
    routes ``node``'s users to ``data``.  ``profile(p)`` gives the factor at positions ``p`` (None when
    only a table over the traced positions was seen).
    """

    family: str
    params: dict[str, float]
    node: Any
    data: Any
    factor: Any
    profile: Callable[[np.ndarray], np.ndarray] | None = None
    table: tuple[float, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return NAMES[self.family]

    def describe(self) -> str:
        ps = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        return f"{self.name}" + (f" ({ps})" if ps else "")

    def values(self, positions: np.ndarray) -> np.ndarray:
        """The factor at ``positions`` (the recognised family's formula, else the parsed expression)."""
        formula = FORMULAS.get(self.family)
        if formula is not None:
            return formula(positions, **self.params)
        if self.profile is not None:
            return self.profile(positions)
        raise ValueError(f"{self.name}: only seen at the traced positions")

    def summary(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, "params": dict(self.params), "notes": list(self.notes)}


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def llama4_temperature(p: np.ndarray, attn_scale: float, floor_scale: float) -> np.ndarray:
    return 1.0 + attn_scale * np.log1p(np.floor((p + 1.0) / floor_scale))


def llama_4_scaling(p: np.ndarray, beta: float, original_max_position_embeddings: float) -> np.ndarray:
    return 1.0 + beta * np.log(1.0 + np.floor(p / original_max_position_embeddings))


def qwen_logn(p: np.ndarray, seq_length: float) -> np.ndarray:
    return np.maximum(1.0, np.log(p + 1.0) / math.log(seq_length))


FORMULAS: dict[str, Callable[..., np.ndarray]] = {
    "llama4_temperature": llama4_temperature, "llama_4_scaling": llama_4_scaling, "qwen_logn": qwen_logn}


# ------------------------------------------------------------------ reading the factor

def _start(a: Adapter, node: Any) -> float | None:
    start = a.attr(node, "start", None)
    if isinstance(start, int | float) and not isinstance(start, bool):
        return float(start)
    ins = a.inputs(node)
    if len(ins) >= 3:  # ONNX Range(start, limit, delta)
        return a.constant(ins[0])
    return 0.0


def _whole_slice(a: Adapter, node: Any) -> bool:
    """A slice that keeps every element (start 0, step 1, end past any size), as exporters write ``x[:]``."""
    args = getattr(node, "args", ())
    if len(args) < 4 or not all(isinstance(x, int) for x in args[2:4]):
        return False
    step = args[4] if len(args) > 4 else 1
    return args[2] == 0 and args[3] >= (1 << 62) and step == 1


def parse(a: Adapter, v: Any, depth: int = 0) -> Expr | None:
    """``v`` as an expression of the position, or None when it depends on anything else."""
    c = a.constant(v)
    if c is not None:
        return Expr("c", value=c)
    node = a.producer(v)
    if node is None or depth > 24:
        return None
    kind = a.kind(node)
    ins = a.inputs(node)
    if kind in _LAYOUT and ins:
        return parse(a, ins[0], depth + 1)
    if kind is Kind.SLICE and ins and _whole_slice(a, node):
        return parse(a, ins[0], depth + 1)  # ``x[:, :, :]`` under dynamic shapes: every position kept
    if kind is Kind.ARANGE:
        start = _start(a, node)
        return None if start is None else Expr("p", value=start)
    if kind in _UNARY and ins:
        x = parse(a, ins[0], depth + 1)
        return None if x is None else Expr(kind.value, (x,))
    if kind in _BINARY and len(ins) >= 2:
        x, y = parse(a, ins[0], depth + 1), parse(a, ins[1], depth + 1)
        return None if x is None or y is None else Expr(kind.value, (x, y))
    return None


def _varying(arr: Any) -> np.ndarray | None:
    """The values of an array that varies along one axis only (the positions), else None."""
    arr = np.asarray(arr, dtype=np.float64)
    for ax in range(arr.ndim):  # a factor expanded to Q's shape repeats along batch, heads and head_dim
        if arr.shape[ax] > 1 and np.all(arr == arr.take([0], axis=ax)):
            arr = arr.take([0], axis=ax)
    long_axes = [i for i, n in enumerate(arr.shape) if n > 1]
    if len(long_axes) != 1 or arr.shape[long_axes[0]] < 3:
        return None
    return arr.reshape(-1)


def _table(a: Adapter, v: Any) -> np.ndarray | None:
    """A constant factor as a table over positions ``0..N-1`` (exporters fold it; Qwen-1 slices a buffer), else None.

    Walks through ``type_as(q)`` / ``expand_as(q)`` (they read Q's type or shape only) and through a slice
    to the whole table: the buffer is indexed by absolute position whatever the slice's start."""
    ask = getattr(a, "static_value", None)
    if ask is None:
        return None
    best = None
    for _ in range(10):
        arr = ask(v)
        found = None if arr is None else _varying(arr)
        if found is not None:
            best = found
        node = a.producer(v)
        if node is None or a.kind(node) not in _LAYOUT | {Kind.SLICE} or not a.inputs(node):
            break
        v = a.inputs(node)[0]
    return best


# ------------------------------------------------------------------ recognising the family

def _close(x: np.ndarray, y: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(x)) and np.allclose(x, y, rtol=1e-5, atol=1e-6))


def _floor_family(expr: Expr) -> tuple[str, dict[str, float]] | None:
    """``1 + a log(1 + floor((p + c) / F))``: Llama 4 when ``c = 1``, ``llama_4_scaling`` when ``c = 0``."""
    fl = expr.sub("floor")
    if fl is None:
        return None
    g = fl.args[0]
    g0, g1 = g(np.array([0.0, 1.0]))
    slope = g1 - g0
    if not slope > 0:
        return None
    F, c = 1.0 / slope, g0 / slope
    if abs(F - round(F)) < 1e-6 * max(1.0, F):
        F = float(round(F))
    p = np.arange(0, int(8 * F) + 2, max(1, int(F) // 64), dtype=np.float64)
    steps = np.floor((p + c) / F)
    at = np.argmax(steps >= 1)
    if steps[at] < 1:
        return None
    amp = (expr(p[at:at + 1])[0] - 1.0) / math.log1p(steps[at])
    for family, shift, names in (("llama4_temperature", 1.0, ("attn_scale", "floor_scale")),
                                 ("llama_4_scaling", 0.0, ("beta", "original_max_position_embeddings"))):
        if abs(c - shift) < 1e-6:
            params = {names[0]: float(amp), names[1]: F}
            if _close(expr(p), FORMULAS[family](p, **params)):
                return family, params
    return None


def _logn_family(f: Callable[[np.ndarray], np.ndarray], positions: np.ndarray) -> dict[str, float] | None:
    """``max(1, log(p + 1) / log L)``: L from the first position where the factor exceeds 1."""
    vals = f(positions)
    above = np.nonzero(vals > 1.0 + 1e-6)[0]
    if len(above) == 0:
        return None
    i = above[0]
    L = math.exp(math.log(positions[i] + 1.0) / vals[i])
    if abs(L - round(L)) < 1e-3 * L:
        L = float(round(L))
    if _close(vals, qwen_logn(positions, L)):
        return {"seq_length": L}
    return None


def _table_family(t: np.ndarray) -> tuple[str, dict[str, float]] | None:
    """A folded factor over positions ``0..S-1``: the families whose formula reproduces it exactly."""
    p = np.arange(len(t), dtype=np.float64)
    logn = _logn_family(lambda q: t[q.astype(int)], p)
    if logn is not None:
        return "qwen_logn", logn
    if not np.all(t >= 1.0 - 1e-6) or _close(t, np.ones_like(t)):
        return None
    for F in range(1, len(t) + 1):
        for family, c, names in (("llama4_temperature", 1.0, ("attn_scale", "floor_scale")),
                                 ("llama_4_scaling", 0.0, ("beta", "original_max_position_embeddings"))):
            steps = np.floor((p + c) / F)
            if not np.any(steps >= 1):
                continue
            at = int(np.argmax(steps >= 1))
            params = {names[0]: float((t[at] - 1.0) / math.log1p(steps[at])), names[1]: float(F)}
            if _close(t, FORMULAS[family](p, **params)):
                return family, params
    return None


_PROBE = np.concatenate([np.arange(0, 4096, dtype=np.float64), np.geomspace(4096, 1 << 24, 256)])


def _classify(a: Adapter, node: Any, data: Any, factor: Any) -> Relative | None:
    expr = parse(a, factor)
    if expr is not None and expr.uses("p"):
        if not (expr.uses("log") or expr.uses("log1p")) or _close(expr(_PROBE), np.ones_like(_PROBE)):
            return None  # no log of the position, or a factor of 1 everywhere (a scaling switched off by its beta)
        found = _floor_family(expr)
        if found is not None:
            return Relative(found[0], found[1], node, data, factor, profile=expr)
        logn = _logn_family(expr, np.arange(0, 1 << 16, 7, dtype=np.float64))
        if logn is not None:
            return Relative("qwen_logn", logn, node, data, factor, profile=expr)
        return Relative("position_scale", {}, node, data, factor, profile=expr,
                        notes=("a log of the position scales q; not a family attnpass names",))
    table = _table(a, factor)
    if table is None:
        return None
    found = _table_family(table)
    if found is None:
        return None
    return Relative(found[0], found[1], node, data, factor, table=tuple(float(x) for x in table),
                    notes=(f"recognised from a constant table over {len(table)} positions",))


def _ours(a: Adapter, node: Any) -> bool:
    """Whether ``node`` is part of an SSMax attnpass emitted: by the names the emitters give (fx
    ``attnpass_ssmax.s_<i>`` parameters, ONNX ``attnpass/ssmax_<i>/...`` nodes, MLIR ``@attnpass_ssmax_<i>``)."""
    text = str(a.name(node))
    op = getattr(node, "op", None)  # an MLIR call names its callee in an attribute
    if op is not None and hasattr(op, "attributes") and "callee" in op.attributes:
        text += str(op.attributes["callee"])
    target = getattr(node, "target", None)  # an fx call of semantics.ssmax_logits / ssmax_sdpa
    if callable(target) and getattr(target, "__module__", "") == "attnpass.semantics":
        text += "attnpass_" + getattr(target, "__name__", "")
    return "attnpass_ssmax" in text.replace("/", "_").replace(".", "_")


_STOP = {Kind.MATMUL, Kind.BADDBMM, Kind.EINSUM, Kind.SOFTMAX, Kind.SDPA}


def _is_ssmax_param(a: Adapter, v: Any, budget: int = 64) -> bool:
    """Whether ``v`` is computed (within ``budget`` producers) from an SSMax attnpass emitted (``_ours``)."""
    seen: set[int] = set()
    todo = [v]
    while todo and len(seen) < budget:
        x = todo.pop(0)  # breadth first: the nearest producers, not one long chain
        node = a.producer(x)
        if node is None:  # a parameter / initializer: its own name tells
            if "attnpass_ssmax" in str(getattr(x, "name", "")).replace("/", "_").replace(".", "_"):
                return True
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if _ours(a, node):
            return True
        if a.kind(node) in _STOP:  # another attention's scores or probabilities: not this factor
            continue
        todo.extend(i for i in a.inputs(node) if i is not None and not isinstance(i, int | float | str | bool))
    return False


def already_ssmax(a: Adapter, softmax: Any) -> bool:
    """Whether a softmax the matcher did not take reads scores attnpass already turned into SSMax (fx and MLIR
    put the factor on the scores, which the walk does not step through): the report then says so."""
    ins = a.inputs(softmax)
    return bool(ins) and _is_ssmax_param(a, ins[0], budget=64)


def find_relative(a: Adapter, q: Any) -> Relative | None:
    """The query scaling on the chain that produces ``q``, if it is a relative of SSMax."""
    v = q
    for _ in range(24):
        node = a.producer(v)
        if node is None:
            return None
        kind = a.kind(node)
        ins = a.inputs(node)
        if kind in _LAYOUT and ins:
            v = ins[0]
            continue
        if kind in (Kind.MUL, Kind.DIV) and len(ins) >= 2:
            for data, factor in ((ins[0], ins[1]), (ins[1], ins[0])) if kind is Kind.MUL else ((ins[0], ins[1]),):
                if a.constant(factor) is not None:
                    continue
                if _is_ssmax_param(a, factor):
                    return Relative("ssmax", {}, node, data, factor, notes=("an SSMax factor attnpass emitted",))
                found = _classify(a, node, data, factor)
                if found is not None and kind is Kind.MUL:
                    return found
            if any(a.constant(x) is not None for x in ins[:2]):
                v = ins[0] if a.constant(ins[1]) is not None or kind is Kind.DIV else ins[1]
                continue
        return None
    return None


# ------------------------------------------------------------------ converting to SSMax

def fit_ssmax(rel: Relative, positions: np.ndarray) -> tuple[float, float, float, float]:
    """The SSMax ``(s, b)`` closest to the relative's factor in least squares over ``positions``.

    A query at position ``p`` of a causal sequence sees ``n = p + 1`` keys, so the fit is of
    ``s log(p + 1) + b`` to the factor; returns ``(s, b, rms error, max error)``."""
    target = rel.values(positions.astype(np.float64))
    x = np.log(positions.astype(np.float64) + 1.0)
    A = np.stack([x, np.ones_like(x)], 1)
    (s, b), *_ = np.linalg.lstsq(A, target, rcond=None)
    err = A @ np.array([s, b]) - target
    return float(s), float(b), float(np.sqrt(np.mean(err**2))), float(np.max(np.abs(err)))


def fit_positions(rel: Relative, length: int | None = None) -> np.ndarray:
    """Positions the fit runs over: ``0..length-1``, by default eight times the family's step length."""
    if length is None:
        step = rel.params.get("floor_scale") or rel.params.get("original_max_position_embeddings") or \
            rel.params.get("seq_length")
        length = int(8 * step) if step else max(len(rel.table), 2)
    return np.arange(length, dtype=np.float64)


__all__ = ["Expr", "Relative", "NAMES", "FORMULAS", "find_relative", "already_ssmax", "fit_ssmax", "fit_positions", "parse",
           "llama4_temperature", "llama_4_scaling", "qwen_logn"]
