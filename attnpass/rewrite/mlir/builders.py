"""Small named builders for the linalg / arith text that the MLIR rewrites generate.

The rewrites build private functions as text and let the MLIR parser verify them.  Every piece of
the online-softmax recurrence and of the SSMax factor is one builder here, named for the formula
it emits (a max reduction, ``exp(x - m)``, a rescale, a matmul tile...), so the composed
functions in ``fused.py`` and ``ssmax.py`` read as the math they implement.  Builders append
lines to an ``Ssa`` buffer and return the SSA name of their result.

Iteration domains are lists of dim names (``["d0", "i", "j", "e"]``); an ``Operand`` says how a
tensor is read in that domain (its affine results, e.g. ``"(d0, i)"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from attnpass import semantics
from attnpass.passes.plan import KeepTerm

PAR, RED = "parallel", "reduction"

# The two matmul-like reductions (Q K^T over the head dim, P V over the key tile) may be reassociated
# and contracted into FMAs: that is what lets LLVM vectorise them; the sums stay within fp32 tolerance.
FASTMATH = "fastmath<reassoc,contract>"

# ``torch.finfo(torch.float32).min``: what SSMax writes for a removed key (finite, as torch's masked_fill)
F32_MIN = -3.4028234663852886e38


# ------------------------------------------------------------------ types and literals

def tensor_type(shape: Sequence[int | None], elem: str) -> str:
    """``tensor<2x?x4xf32>``; an unknown size (None) prints as ``?``, never as ``None``."""
    return "tensor<" + "".join(f"{'?' if d is None else d}x" for d in shape) + elem + ">"


def builtin_elem(dtype: str) -> str:
    """The builtin element type of a torch dtype (torch's signed ints are signless in builtin tensors)."""
    return {"si64": "i64", "si32": "i32", "si8": "i8", "ui8": "i8"}.get(dtype, dtype)


def f32(x: float) -> str:
    """An f32 literal MLIR parses exactly (hex for non-finite values)."""
    if math.isinf(x):
        return "0x7F800000" if x > 0 else "0xFF800000"
    return repr(float(x)) if math.isfinite(x) else "0x7FC00000"


def bcast_map(shape: Sequence[int | None], domain: Sequence[int | None], dims: Sequence[str], groups: int = 1,
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


def dims_of(names: Sequence[str]) -> str:
    """``(d0, i, j)``: a dim list as an affine tuple."""
    return "(" + ", ".join(names) + ")"


# ------------------------------------------------------------------ the text buffer

class Ssa:
    """A tiny SSA text emitter: fresh names, one op per line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0

    def fresh(self, hint: str = "v") -> str:
        self.n += 1
        return f"%{hint}{self.n}"

    def emit(self, line: str, indent: int = 2) -> None:
        self.lines.append("  " * indent + line)

    def op(self, hint: str, rhs: str, indent: int) -> str:
        """``%hintN = rhs``: one op with a fresh result name."""
        name = self.fresh(hint)
        self.emit(f"{name} = {rhs}", indent)
        return name

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Operand:
    """A tensor as one ``linalg.generic`` reads it: SSA name, static shape, element type, affine results."""

    name: str
    shape: tuple[int | None, ...]
    index: str
    elem: str = "f32"

    @property
    def type(self) -> str:
        return tensor_type(self.shape, self.elem)


# A region body: gets the block arguments (ins then out) and the indent, emits ops, returns the yielded value.
Body = Callable[[list[str], int], str]


def generic(t: Ssa, dims: Sequence[str], ins: Sequence[Operand], out: Operand, iterators: Sequence[str],
            body: Body, ind: int, hint: str = "g", attrs: str = "") -> str:
    """One ``linalg.generic`` over ``dims``: the general form every named builder below fills in.

    ``attrs``: extra (discardable) attributes, ``, name`` each, a mark later passes look for.
    """
    dl = dims_of(dims)
    maps = ", ".join(f"affine_map<{dl} -> {o.index}>" for o in (*ins, out))
    iters = ", ".join(f'"{it}"' for it in iterators)
    ins_txt = f" ins({', '.join(o.name for o in ins)} : {', '.join(o.type for o in ins)})" if ins else ""
    res = t.fresh(hint)
    t.emit(f"{res} = linalg.generic {{indexing_maps = [{maps}], iterator_types = [{iters}]{attrs}}}{ins_txt} "
           f"outs({out.name} : {out.type}) {{", ind)
    args = [t.fresh("a") for _ in (*ins, out)]
    t.emit("^bb0(" + ", ".join(f"{a}: {o.elem}" for a, o in zip(args, (*ins, out))) + "):", ind + 1)
    y = body(args, ind + 2)
    t.emit(f"linalg.yield {y} : {out.elem}", ind + 2)
    t.emit(f"}} -> {out.type}", ind)
    return res


def empty(t: Ssa, shape: tuple[int | None, ...], ind: int, elem: str = "f32", sizes: Sequence[str] = ()) -> str:
    """``tensor.empty``: the destination of an elementwise generic (every element is written).

    ``sizes`` are the ``index`` values of the unknown dims, in order.
    """
    return t.op("empty", f"tensor.empty({', '.join(sizes)}) : {tensor_type(shape, elem)}", ind)


def fill(t: Ssa, shape: tuple[int | None, ...], value: str, ind: int, sizes: Sequence[str] = ()) -> str:
    """``x = value`` everywhere: the initial running max (-inf), normaliser and accumulator (0).

    ``value`` is an f32 literal or an f32 SSA value (``%...``); ``sizes`` as for ``empty``.
    """
    ty = tensor_type(shape, "f32")
    e = empty(t, shape, ind, sizes=sizes)
    c = value if value.startswith("%") else t.op("c", f"arith.constant {value} : f32", ind)
    return t.op("init", f"linalg.fill ins({c} : f32) outs({e} : {ty}) -> {ty}", ind)


def constant(t: Ssa, value: float, ind: int) -> str:
    """An f32 ``arith.constant``."""
    return t.op("c", f"arith.constant {f32(value)} : f32", ind)


# ------------------------------------------------------------------ scalar bodies (inside a region)

def causal_test(t: Ssa, i_dim: int, j_dim: int, j0: str | None, ind: int, i0: str | None = None,
                j_shift: int = 0) -> str:
    """``j0 + j <= i0 + i`` (top-left causal) from the loop indices and the tile's first key / query block's first row.

    ``j_shift`` is added to the key side: a row position that may be negative (``nonpad_kv_seqlen``'s
    ``L_b - S_q + i``) is compared as ``j + S_q <= i + L_b``, every side a non-negative index."""
    return t.op("causal", f"arith.cmpi ule, {_key_index(t, j_dim, j0, j_shift, ind)}, {_row_index(t, i_dim, i0, ind)} "
                          ": index", ind)


def _key_index(t: Ssa, j_dim: int, j0: str | None, j_shift: int, ind: int) -> str:
    """The key of the iteration: ``linalg.index`` plus the tile's first key, plus ``j_shift``."""
    jj = t.op("j", f"linalg.index {j_dim} : index", ind)
    if j0 is not None:
        jj = t.op("jg", f"arith.addi {jj}, {j0} : index", ind)
    if j_shift:
        jj = t.op("jq", f"arith.addi {jj}, {t.op('c', f'arith.constant {j_shift} : index', ind)} : index", ind)
    return jj


def row_offset(t: Ssa, i0: str | None, offset: int, ind: int) -> str | None:
    """The position of a block's first row: ``i0 + offset`` (None: row 0 at position 0).  A KV cache of ``offset``
    past keys puts query row ``i`` at position ``offset + i``, where ONNX aligns its causal and window masks."""
    if not offset:
        return i0
    c = t.op("c", f"arith.constant {offset} : index", ind)
    return c if i0 is None else t.op("i0", f"arith.addi {i0}, {c} : index", ind)


def _row_index(t: Ssa, i_dim: int, i0: str | None, ind: int) -> str:
    """The query row of the iteration: ``linalg.index`` plus the query block's first row."""
    ii = t.op("i", f"linalg.index {i_dim} : index", ind)
    return ii if i0 is None else t.op("ig", f"arith.addi {ii}, {i0} : index", ind)


def window_test(t: Ssa, i_dim: int, j_dim: int, j0: str | None, window: tuple[int, int], ind: int,
                i0: str | None = None, j_shift: int = 0) -> str | None:
    """``i - left <= j0 + j <= i + right`` (the ONNX ``Attention`` window, top-left aligned); -1 leaves a side open.

    Written as ``j + left >= i`` so that no index goes below zero; ``j_shift`` as for ``causal_test``.
    """
    left, right = window
    if left < 0 and right < 0:
        return None
    ii = _row_index(t, i_dim, i0, ind)
    jj = _key_index(t, j_dim, j0, j_shift, ind)
    ok: str | None = None
    if left >= 0:
        lhs = t.op("jl", f"arith.addi {jj}, {t.op('c', f'arith.constant {left} : index', ind)} : index", ind)
        ok = t.op("inwin", f"arith.cmpi uge, {lhs}, {ii} : index", ind)
    if right >= 0:
        rhs = t.op("ir", f"arith.addi {ii}, {t.op('c', f'arith.constant {right} : index', ind)} : index", ind)
        ok = both(t, ok, t.op("inwin", f"arith.cmpi ule, {jj}, {rhs} : index", ind), ind)
    return ok


def both(t: Ssa, a: str | None, b: str, ind: int) -> str:
    """``a and b`` for i1 conditions, where ``a`` may be absent."""
    return b if a is None else t.op("ok", f"arith.andi {a}, {b} : i1", ind)


def exp_base(t: Ssa, m: str, ind: int) -> str:
    """``m == -inf ? 0 : m``: a row that has seen no attendable key subtracts 0, so ``exp(-inf - 0) = 0``."""
    ninf = constant(t, -math.inf, ind)
    none = t.op("none", f"arith.cmpf oeq, {m}, {ninf} : f32", ind)
    zero = constant(t, 0.0, ind)
    return t.op("base", f"arith.select {none}, {zero}, {m} : f32", ind)


@dataclass(frozen=True)
class MaskIn:
    """A mask term as an argument of the generated function: SSA name, static shape, element type."""

    term: KeepTerm
    arg: str
    shape: tuple[int | None, ...]
    elem: str


def mask_body(t: Ssa, masks: Sequence[MaskIn], scalars: Sequence[str], ind: int,
              bias_limits: bool = True) -> tuple[list[str], str | None]:
    """The additive terms ``c * bias`` to add to the logits, and ``allowed`` = AND of every mask's keep test.

    A bool mask keeps a key where it equals ``attend_when``; a bias keeps it where ``bias > MASKED_BELOW``
    (tested as ``not (bias <= limit)`` so that a NaN bias stays attendable and shows up in the output).
    ``bias_limits=False``: a bias is only added, never a keep test.  Plain fused attention needs that to keep
    the model's output where it is finite: a row whose keys all carry ``finfo.min`` or ``-1e9`` gives the
    mean of V in the original, and must not become a row without keys (zeros).  SSMax needs the test (the
    factor is applied first, then such keys are removed: ``docs/numerics.md``).
    """
    adds: list[str] = []
    ok: str | None = None
    for m, s in zip(masks, scalars):
        if m.term.kind == "bool":
            cond = s
            if not m.term.attend_when:
                one = t.op("true", "arith.constant true", ind)
                cond = t.op("keep", f"arith.xori {s}, {one} : i1", ind)
        else:
            val = s if m.elem == "f32" else t.op("wide", f"arith.extf {s} : {m.elem} to f32", ind)
            if m.term.coeff != 1.0:
                cc = t.op("coeff", f"arith.constant {f32(m.term.coeff)} : f32", ind)
                val = t.op("bias", f"arith.mulf {val}, {cc} : f32", ind)
            adds.append(val)
            if not bias_limits:
                continue
            lim = t.op("lim", f"arith.constant {f32(semantics.MASKED_BELOW)} : f32", ind)
            cond = t.op("keep", f"arith.cmpf ugt, {val}, {lim} : f32", ind)
        ok = both(t, ok, cond, ind)
    return adds, ok


# ------------------------------------------------------------------ named tensor builders

def matmul_tile(t: Ssa, dims: Sequence[str], a: Operand, b: Operand, acc: Operand, reduce: str, ind: int,
                hint: str = "mm", attrs: str = "") -> str:
    """``acc[out] += a[..] * b[..]`` summed over the dim ``reduce``: ``Q K^T`` over ``e``, ``P V`` over ``j``."""
    iters = [RED if d == reduce else PAR for d in dims]

    def body(x: list[str], i: int) -> str:
        p = t.op("p", f"arith.mulf {x[0]}, {x[1]} {FASTMATH} : f32", i)
        return t.op("r", f"arith.addf {x[2]}, {p} {FASTMATH} : f32", i)

    return generic(t, dims, [a, b], acc, iters, body, ind, hint, attrs)


def first_step(t: Ssa, dim: int, ind: int) -> str:
    """``i1``: whether the reduced dim ``dim`` is at index 0, where a ``*_from`` generic takes its start value instead
    of its output (a new tensor: the start is read from one buffer and the result written to another, no copy)."""
    idx = t.op("ix", f"linalg.index {dim} : index", ind)
    return t.op("first", f"arith.cmpi eq, {idx}, {t.op('c', 'arith.constant 0 : index', ind)} : index", ind)


def matmul_from(t: Ssa, dims: Sequence[str], a: Operand, b: Operand, start: Operand | None, scale: Operand | None,
                out: tuple[tuple[int, ...], str], reduce: str, ind: int, hint: str = "mm", attrs: str = "") -> str:
    """``start * scale + sum a * b`` over ``reduce`` into a new tensor of shape / index ``out`` (``start`` None: from 0).

    ``matmul_tile`` with its start folded in: the online softmax's ``acc * alpha + P V`` and ``Q K^T`` from zero need
    no rescale or fill pass, and the register blocks (``microkernel``) apply the start once per block they load.
    """
    ins = [a, b] + ([scale] if scale is not None else []) + ([start] if start is not None else [])
    iters = [RED if d == reduce else PAR for d in dims]

    def body(x: list[str], i: int) -> str:
        if start is None:
            init = t.op("c", "arith.constant 0.0 : f32", i)
        else:
            init = x[-2] if scale is None else t.op("s", f"arith.mulf {x[-2]}, {x[2]} : f32", i)
        base = t.op("b", f"arith.select {first_step(t, dims.index(reduce), i)}, {init}, {x[-1]} : f32", i)
        p = t.op("p", f"arith.mulf {x[0]}, {x[1]} {FASTMATH} : f32", i)
        return t.op("r", f"arith.addf {base}, {p} {FASTMATH} : f32", i)

    dst = Operand(empty(t, out[0], ind), out[0], out[1])
    return generic(t, dims, ins, dst, iters, body, ind, hint, attrs)


def reduce_from(t: Ssa, dims: Sequence[str], x: Operand, start: Operand, scale: Operand | None, kind: str, ind: int,
                hint: str = "rnew", attrs: str = "") -> str:
    """``start * scale (+ or max) reduce_j x`` over the last dim into a new tensor: ``reduce_max`` / ``reduce_sum``
    with the running value read, not updated in place, and ``l * alpha`` folded in (no copy, no rescale pass)."""
    op = {"add": "arith.addf", "max": "arith.maximumf"}[kind]

    def body(a: list[str], i: int) -> str:
        init = a[1] if scale is None else t.op("s", f"arith.mulf {a[1]}, {a[2]} : f32", i)
        base = t.op("b", f"arith.select {first_step(t, len(dims) - 1, i)}, {init}, {a[-1]} : f32", i)
        return t.op("r", f"{op} {base}, {a[0]} : f32", i)

    dst = Operand(empty(t, start.shape, ind), start.shape, start.index)
    ins = [x, start] + ([scale] if scale is not None else [])
    return generic(t, dims, ins, dst, [PAR] * (len(dims) - 1) + [RED], body, ind, hint, attrs)


def reduce_max(t: Ssa, dims: Sequence[str], x: Operand, init: Operand, ind: int, hint: str = "mnew",
               attrs: str = "") -> str:
    """``m'[row] = max(m[row], max_j x[row, j])`` over the last dim: the running max of online softmax.

    ``attrs``: as for ``generic`` (the fused loop nest marks it for a vector kernel, ``microkernel.ROWS``).
    """
    def body(a: list[str], i: int) -> str:
        return t.op("r", f"arith.maximumf {a[0]}, {a[1]} : f32", i)

    return generic(t, dims, [x], init, [PAR] * (len(dims) - 1) + [RED], body, ind, hint, attrs)


def reduce_sum(t: Ssa, dims: Sequence[str], x: Operand, init: Operand, ind: int, hint: str = "lnew",
               attrs: str = "") -> str:
    """``l'[row] = l[row] + sum_j x[row, j]`` over the last dim: the running normaliser (``attrs`` as ``reduce_max``)."""
    def body(a: list[str], i: int) -> str:
        return t.op("r", f"arith.addf {a[0]}, {a[1]} : f32", i)

    return generic(t, dims, [x], init, [PAR] * (len(dims) - 1) + [RED], body, ind, hint, attrs)


def exp_sub(t: Ssa, dims: Sequence[str], x: Operand, m: Operand, shape: tuple[int, ...], ind: int,
            hint: str = "e", attrs: str = "") -> str:
    """``exp(x - base(m))`` elementwise, ``m`` broadcast along the rows; ``base`` is 0 for a row max of -inf.

    With ``x`` the logits tile it is the tile's unnormalised probabilities ``p``; with ``x`` the old
    running max it is the correction ``alpha = exp(m - m')`` of the state carried so far.
    """
    def body(a: list[str], i: int) -> str:
        d = t.op("d", f"arith.subf {a[0]}, {exp_base(t, a[1], i)} : f32", i)
        return exp_poly(t, d, i)

    out = Operand(empty(t, shape, ind), shape, dims_of(dims))
    return generic(t, dims, [x, m], out, [PAR] * len(dims), body, ind, hint, attrs)


# exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (ln 2 split in two for an exact product), exp(r) by a
# degree-7 polynomial on |r| <= ln 2 / 2 (the Cephes expf coefficients); about 1 ulp over the range used here
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_MIN = -87.33654  # below: 0 (2^k would leave the normal range); the loop nest's arguments are <= 0


def exp_poly(t: Ssa, x: str, ind: int, width: int = 0) -> str:
    """``exp(x)`` for ``x <= 0`` as arithmetic only (no libm call), so LLVM vectorises the loop it sits in.

    ``-inf`` (and anything below ``_EXP_MIN``) gives exactly 0, so a removed key adds nothing; NaN stays NaN.
    ``width``: on ``vector<width x f32>`` values (the vector kernels of ``microkernel``), not scalars.
    """
    ft, it = (f"vector<{width}xf32>", f"vector<{width}xi32>") if width else ("f32", "i32")

    def c(v: float) -> str:
        return t.op("c", f"arith.constant dense<{f32(v)}> : {ft}", ind) if width else constant(t, v, ind)

    def ci(v: int) -> str:
        return t.op("c", f"arith.constant {f'dense<{v}>' if width else v} : {it}", ind)

    kl = t.op("kl", f"arith.mulf {x}, {c(1.4426950408889634)} : {ft}", ind)
    k = t.op("k", f"math.floor {t.op('kx', f'arith.addf {kl}, {c(0.5)} : {ft}', ind)} : {ft}", ind)
    r = t.op("r", f"arith.subf {x}, {t.op('kh', f'arith.mulf {k}, {c(_LN2_HI)} : {ft}', ind)} : {ft}", ind)
    r = t.op("r", f"arith.subf {r}, {t.op('kl', f'arith.mulf {k}, {c(_LN2_LO)} : {ft}', ind)} : {ft}", ind)
    p = c(_EXP_POLY[0])
    for coeff in _EXP_POLY[1:]:
        p = t.op("p", f"math.fma {p}, {r}, {c(coeff)} : {ft}", ind)
    r2 = t.op("r2", f"arith.mulf {r}, {r} : {ft}", ind)
    p = t.op("p", f"math.fma {p}, {r2}, {r} : {ft}", ind)
    p = t.op("p", f"arith.addf {p}, {c(1.0)} : {ft}", ind)
    ki = t.op("ki", f"arith.fptosi {t.op('kc', f'arith.maximumf {k}, {c(-127.0)} : {ft}', ind)} : {ft} to {it}", ind)
    bits = t.op("bits", f"arith.shli {t.op('kb', f'arith.addi {ki}, {ci(127)} : {it}', ind)}, {ci(23)} : {it}", ind)
    e = t.op("e", f"arith.mulf {p}, {t.op('two', f'arith.bitcast {bits} : {it} to {ft}', ind)} : {ft}", ind)
    low = t.op("low", f"arith.cmpf olt, {x}, {c(_EXP_MIN)} : {ft}", ind)
    mt = f"vector<{width}xi1>, {ft}" if width else "f32"
    e = t.op("e", f"arith.select {low}, {c(0.0)}, {e} : {mt}", ind)
    nan = t.op("nan", f"arith.cmpf uno, {x}, {x} : {ft}", ind)
    return t.op("e", f"arith.select {nan}, {x}, {e} : {mt}", ind)


def rescale(t: Ssa, dims: Sequence[str], x: Operand, f: Operand, shape: tuple[int, ...], ind: int,
            hint: str = "sc") -> str:
    """``x * f`` elementwise, ``f`` broadcast: ``l * alpha`` and ``acc * alpha`` (the in-place rescale)."""
    def body(a: list[str], i: int) -> str:
        return t.op("r", f"arith.mulf {a[0]}, {a[1]} : f32", i)

    out = Operand(empty(t, shape, ind), shape, dims_of(dims))
    return generic(t, dims, [x, f], out, [PAR] * len(dims), body, ind, hint)


def divide_rows(t: Ssa, dims: Sequence[str], acc: Operand, den: Operand, shape: tuple[int, ...], ind: int) -> str:
    """``den != 0 ? acc / den : 0``: a row with no attendable key is 0; a NaN row stays NaN, never hidden."""
    def body(a: list[str], i: int) -> str:
        zero = t.op("zero", "arith.constant 0.0 : f32", i)
        pos = t.op("pos", f"arith.cmpf une, {a[1]}, {zero} : f32", i)
        q = t.op("q", f"arith.divf {a[0]}, {a[1]} : f32", i)
        return t.op("r", f"arith.select {pos}, {q}, {zero} : f32", i)

    out = Operand(empty(t, shape, ind), shape, dims_of(dims))
    return generic(t, dims, [acc, den], out, [PAR] * len(dims), body, ind, "out")


def extract_keys(t: Ssa, src: str, shape: tuple[int, ...], elem: str, axis: int, j0: str, size: int, ind: int) -> tuple[str, tuple[int, ...]]:
    """``src[..., j0 : j0 + size, ...]`` along ``axis``: one key tile of K, V or a mask."""
    offs = ["0"] * len(shape)
    offs[axis] = j0
    sizes = list(shape)
    sizes[axis] = size
    out = t.op("tile", f"tensor.extract_slice {src}[{', '.join(offs)}] [{', '.join(map(str, sizes))}] "
                       f"[{', '.join(['1'] * len(shape))}] : {tensor_type(shape, elem)} to "
                       f"{tensor_type(tuple(sizes), elem)}", ind)
    return out, tuple(sizes)


def settle_mask(t: Ssa, m: MaskIn, domain: Sequence[int | None], ind: int = 2) -> MaskIn:
    """The mask at static sizes: each unknown size is settled against the (static) iteration ``domain``.

    A ``?`` read against size ``D`` is 1 or ``D`` at run time (broadcasting allows nothing else):
    against ``D = 1`` it is a ``tensor.cast``; otherwise an ``scf.if`` on ``dim == 1`` broadcasts
    the single slice to ``D`` or casts the full one.  Everything after sees only static types, and
    no unknown size is ever printed into a type but as ``?``.  Against an unknown size of the
    domain the dim stays ``?`` and is read as equal to it (torch-mlir's own assumption: a dynamic
    size is not an implicit broadcast).
    """
    shape = list(m.shape)
    name = m.arg
    off = len(domain) - len(shape)
    dims = [f"d{i}" for i in range(len(shape))]
    for a in range(len(shape)):
        if shape[a] is not None:
            continue
        want = domain[a + off]
        if want is None:
            continue
        new = [*shape[:a], want, *shape[a + 1:]]
        src, dst = tensor_type(shape, m.elem), tensor_type(new, m.elem)
        if want == 1:
            name = t.op("cast", f"tensor.cast {name} : {src} to {dst}", ind)
        else:
            axis = t.op("c", f"arith.constant {a} : index", ind)
            size = t.op("dim", f"tensor.dim {name}, {axis} : {src}", ind)
            one = t.op("c", "arith.constant 1 : index", ind)
            single = t.op("single", f"arith.cmpi eq, {size}, {one} : index", ind)
            res = t.fresh("settled")
            t.emit(f"{res} = scf.if {single} -> ({dst}) {{", ind)
            rest = [dim_size(t, name, b, src, ind + 1) for b in range(len(shape)) if new[b] is None]
            out = Operand(empty(t, tuple(new), ind + 1, m.elem, rest), tuple(new), dims_of(dims), m.elem)
            read = dims_of([*dims[:a], "0", *dims[a + 1:]])
            wide = generic(t, dims, [Operand(name, tuple(shape), read, m.elem)], out, [PAR] * len(dims),
                           lambda x, i: x[0], ind + 1, "bcast")
            t.emit(f"scf.yield {wide} : {dst}", ind + 1)
            t.emit("} else {", ind)
            t.emit(f"scf.yield {t.op('cast', f'tensor.cast {name} : {src} to {dst}', ind + 1)} : {dst}", ind + 1)
            t.emit("}", ind)
            name = res
        shape = new
    return MaskIn(m.term, name, tuple(shape), m.elem)


def dim_size(t: Ssa, tensor: str, axis: int, ty: str, ind: int) -> str:
    """``tensor.dim``: the run-time size of one axis."""
    c = t.op("c", f"arith.constant {axis} : index", ind)
    return t.op("dim", f"tensor.dim {tensor}, {c} : {ty}", ind)


def unknown_sizes(t: Ssa, src: str, shape: Sequence[int | None], elem: str, ind: int,
                  perm: Sequence[int] | None = None) -> list[str]:
    """The run-time sizes (``tensor.dim`` of ``src``) of the unknown dims of ``src.permute(perm)``, in order: what
    ``empty`` takes to build a tensor shaped like it (none for a static shape)."""
    order = list(perm) if perm is not None else list(range(len(shape)))
    ty = tensor_type(shape, elem)
    return [dim_size(t, src, a, ty, ind) for a in order if shape[a] is None]


def permuted(shape: Sequence[int], perm: Sequence[int] | None) -> tuple[int, ...]:
    """The shape of ``x.permute(perm)``."""
    return tuple(shape) if perm is None else tuple(shape[p] for p in perm)


def unpermuted(shape: Sequence[int], perm: Sequence[int] | None) -> tuple[int, ...]:
    """The shape ``y`` with ``y.permute(perm)`` of the given ``shape``: the inverse of ``permuted``."""
    if perm is None:
        return tuple(shape)
    out = [0] * len(shape)
    for c, p in enumerate(perm):
        out[p] = shape[c]
    return tuple(out)


def transpose(t: Ssa, src: str, shape: tuple[int, ...], perm: Sequence[int], ind: int, result: str | None = None,
              elem: str = "f32") -> str:
    """``x.permute(perm)`` as ``linalg.transpose``: result dim ``c`` is source dim ``perm[c]``.

    Einsum layouts (``bqhd``...) are brought to ``[batch..., S, D]`` this way before the loop nest, a
    copy of ``S x D`` per head, never of the scores.
    """
    dst = permuted(shape, perm)
    init = empty(t, dst, ind, elem, unknown_sizes(t, src, shape, elem, ind, perm))
    name = result or t.fresh("tr")
    t.emit(f"{name} = linalg.transpose ins({src} : {tensor_type(shape, elem)}) outs({init} : {tensor_type(dst, elem)}) "
           f"permutation = [{', '.join(map(str, perm))}]", ind)
    return name


#: Element types the generated code reads: computed in f32, half types widened on the way in
HALF = ("f16", "bf16")


def convert(t: Ssa, src: str, shape: tuple[int, ...], src_elem: str, dst_elem: str, ind: int,
            result: str | None = None) -> str:
    """``src`` elementwise converted (``arith.extf`` f16/bf16 -> f32, ``arith.truncf`` back).

    Half-precision inputs are widened once, ``S x D`` per head, so every product, exponential and
    running sum of the loop nest is f32; only the output is narrowed to the input's type.
    """
    if src_elem == dst_elem:
        return src
    dims = [f"d{i}" for i in range(len(shape))]
    op = "arith.extf" if dst_elem == "f32" else "arith.truncf"
    out = Operand(empty(t, shape, ind, dst_elem, unknown_sizes(t, src, shape, src_elem, ind)), shape, dims_of(dims), dst_elem)
    name = generic(t, dims, [Operand(src, shape, dims_of(dims), src_elem)], out, [PAR] * len(shape),
                   lambda a, i: t.op("cv", f"{op} {a[0]} : {src_elem} to {dst_elem}", i), ind, "cv")
    if result is not None:
        t.emit(f"{result} = tensor.cast {name} : {tensor_type(shape, dst_elem)} to {tensor_type(shape, dst_elem)}", ind)
        return result
    return name
