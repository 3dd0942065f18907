"""SSMax as generated MLIR functions: the per-row factor ``s_h log n_i + b_h`` and where it is applied.

``n_i`` (the keys row ``i`` may attend) is counted in the IR by a reduction over the key axis that
reads the masks where they are, so only an ``[..., S_q]`` tensor is built; the factor then
multiplies the softmax input (explicit chains), ``q`` (SDPA calls) or the fused loop's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from attnpass import semantics
from attnpass.rewrite.mlir.builders import (
    F32_MIN,
    PAR,
    RED,
    MaskIn,
    Operand,
    Ssa,
    bcast_map,
    both,
    causal_test,
    dim_size,
    dims_of,
    empty,
    f32,
    fill,
    generic,
    mask_body,
    row_offset,
    settle_mask,
    tensor_type,
    window_test,
)
from attnpass.rewrite.mlir.kv_len import KvLen, keep_test

#: ``torch.finfo(dtype).min`` as an MLIR literal of that type (bit patterns for the half types: exact)
FINFO_MIN = {"f32": f32(F32_MIN), "f16": "0xFBFF", "bf16": "0xFF7F", "f64": "0xFFEFFFFFFFFFFFFF"}


@dataclass
class SsmaxParams:
    """SSMax parameters as the generated code takes them: constants, or ``[H]`` function arguments."""

    heads: int
    s: list[float]
    b: list[float] | None
    s_arg: bool = False
    b_arg: bool = False

    def args(self) -> list[str]:
        hty = tensor_type((self.heads,), "f32")
        return ([f"%s: {hty}"] if self.s_arg else []) + ([f"%b: {hty}"] if self.b_arg else [])

    def emit_constants(self, t: Ssa) -> None:
        """Bind ``%s`` and ``%b`` for the factor code when they are not arguments."""
        hty = tensor_type((self.heads,), "f32")
        if not self.s_arg:
            t.emit(f"%s = arith.constant dense<[{', '.join(f32(v) for v in self.s)}]> : {hty}")
        if not self.b_arg:
            bv = self.b if self.b is not None else [0.0] * self.heads
            t.emit(f"%b = arith.constant dense<[{', '.join(f32(v) for v in bv)}]> : {hty}")


@dataclass(frozen=True)
class KeyMasks:
    """A plan's ``KeyPlan`` as the generated code reads it: ``n`` counted from the masks' small factors.

    ``counted`` (key-only and general factors) are read at their own shapes inside one key reduction;
    a causal factor (or a fused op's own ``is_causal``) is proven ``key <= query``, so it is an index
    test and never a tensor read; ``rows`` are per-row flags (all keys or none), applied to ``n`` after.
    """

    counted: tuple[MaskIn, ...] = ()
    rows: tuple[MaskIn, ...] = ()
    causal: bool = False
    window: tuple[int, int] | None = None  # a fused op's own window (``FusedSpec.window``): an index test too
    q_offset: int = 0  # ``FusedSpec.q_offset``: row i at position ``q_offset + i`` for the causal and window tests
    kv_len: KvLen | None = None  # ``FusedSpec.kv_len``: keys j < L_b count, causal / window rows at L_b - S_q + i

    @property
    def masks(self) -> tuple[MaskIn, ...]:
        return (*self.counted, *self.rows)

    def args(self) -> list[str]:
        return [f"{m.arg}: {tensor_type(m.shape, m.elem)}" for m in self.masks]

    def settled(self, t: Ssa, domain: Sequence[int | None]) -> KeyMasks:
        """The factors at the static sizes of ``domain`` (see ``settle_mask``)."""
        return KeyMasks(tuple(settle_mask(t, m, domain) for m in self.counted),
                        tuple(settle_mask(t, m, (*domain[:-1], 1)) for m in self.rows), self.causal, self.window,
                        self.q_offset, self.kv_len)


def count_keys(t: Ssa, row_shape: tuple[int | None, ...], s_k: int | None, keys: KeyMasks,
               sizes: Sequence[str] = (), s_k_size: str | None = None) -> str:
    """``n_i``, the attendable keys of each row, as f32 ``[..., S_q]``, translated from ``keys``.

    No factor: ``S_k``.  Causal alone: ``min(q_offset + i + 1, S_k)`` (an index range).  Otherwise one reduction
    over the key axis of ``allowed ? 1 : 0``, reading each counted factor through its broadcast map
    (at its own shape) and testing causal as ``j <= q_offset + i``.  Row flags then zero the rows they remove.
    ``sizes`` are the unknown sizes of the rows and ``s_k_size`` the key count when ``s_k`` is unknown.
    """
    n = _count(t, row_shape, s_k, keys.counted, keys.causal, sizes, s_k_size, keys.window, keys.q_offset, keys.kv_len)
    if not keys.rows:
        return n
    rdims = [f"d{i}" for i in range(len(row_shape))]
    ins = [Operand(n, row_shape, dims_of(rdims))]
    ins += [Operand(m.arg, m.shape, _row_map(m.shape, row_shape, rdims), m.elem) for m in keys.rows]

    def flag(a: list[str], i: int) -> str:
        _, ok = mask_body(t, keys.rows, a[1:1 + len(keys.rows)], i)
        zero = t.op("zero", "arith.constant 0.0 : f32", i)
        return t.op("nrow", f"arith.select {ok}, {a[0]}, {zero} : f32", i)

    out = Operand(empty(t, row_shape, 2, sizes=sizes), row_shape, dims_of(rdims))
    return generic(t, rdims, ins, out, [PAR] * len(row_shape), flag, 2, "n")


def _row_map(shape: tuple[int | None, ...], row_shape: tuple[int | None, ...], rdims: list[str]) -> str:
    """A ``[..., S_q, 1]`` flag read over the rows: its row axes broadcast, its key axis (size 1) at 0."""
    lead = bcast_map(shape[:-1], row_shape, rdims)[1:-1]
    return "(" + (f"{lead}, 0" if lead else "0") + ")"


def _count(t: Ssa, row_shape: tuple[int | None, ...], s_k: int | None, masks: Sequence[MaskIn], causal: bool,
           sizes: Sequence[str], s_k_size: str | None, window: tuple[int, int] | None = None, offset: int = 0,
           kv_len: KvLen | None = None) -> str:
    rank = len(row_shape) + 1
    dims = [f"d{i}" for i in range(rank)]
    rows = dims_of(dims[:-1])
    n0 = Operand(fill(t, row_shape, "0.0", 2, sizes), row_shape, rows)
    if kv_len is not None:  # a per-batch key limit: always the reduction
        return _count_reduce(t, row_shape, s_k, masks, causal, window, offset, kv_len, n0, s_k_size)
    if window is not None and not masks and s_k is not None:
        return _count_range(t, dims[:-1], n0, s_k, causal, window, offset)
    if causal and not masks:
        def upto_diagonal(a: list[str], i: int) -> str:
            ii = t.op("i", f"linalg.index {rank - 2} : index", i)
            one = t.op("one", f"arith.constant {1 + offset} : index", i)
            top = s_k_size if s_k is None else t.op("top", f"arith.constant {s_k} : index", i)
            r = t.op("n", f"arith.minui {t.op('cnt', f'arith.addi {ii}, {one} : index', i)}, {top} : index", i)
            return t.op("nf", f"arith.uitofp {t.op('ri', f'arith.index_cast {r} : index to i64', i)} : i64 to f32", i)

        return generic(t, dims[:-1], [], n0, [PAR] * (rank - 1), upto_diagonal, 2, "n")
    if not masks:
        if s_k is None:
            keys = t.op("keys", f"arith.index_cast {s_k_size} : index to i64", 2)
            return fill(t, row_shape, t.op("keysf", f"arith.uitofp {keys} : i64 to f32", 2), 2, sizes)
        return fill(t, row_shape, f32(float(s_k)), 2, sizes)
    return _count_reduce(t, row_shape, s_k, masks, causal, window, offset, None, n0)


def _count_reduce(t: Ssa, row_shape: tuple[int | None, ...], s_k: int | None, masks: Sequence[MaskIn], causal: bool,
                  window: tuple[int, int] | None, offset: int, kv_len: KvLen | None, n0: Operand,
                  s_k_size: str | None = None) -> str:
    """``n_i = sum_j allowed(i, j)``: one reduction over the key axis reading the masks (and ``L_b``)."""
    rank = len(row_shape) + 1
    dims = [f"d{i}" for i in range(rank)]
    domain = (*row_shape, s_k)
    ins = [Operand(m.arg, m.shape, bcast_map(m.shape, domain, dims), m.elem) for m in masks]
    if kv_len is not None:
        ins.append(kv_len.operand())
        if not any(m.shape and m.shape[-1] not in (1,) for m in masks):  # nothing else spans (sizes) the key axis
            keys = empty(t, (s_k,), 2, sizes=[s_k_size] if s_k is None and s_k_size else [])
            ins.append(Operand(keys, (s_k,), f"({dims[-1]})"))

    def count(a: list[str], i: int) -> str:
        _, ok = mask_body(t, masks, a[:len(masks)], i)
        r0 = row_offset(t, None, offset, i)
        if kv_len is not None:
            ok = both(t, ok, keep_test(t, kv_len, a[len(masks)], rank - 2, rank - 1, None, None, causal, window, i), i)
        else:
            if causal:
                ok = both(t, ok, causal_test(t, rank - 2, rank - 1, None, i, r0), i)
            win = window_test(t, rank - 2, rank - 1, None, window, i, r0) if window is not None else None
            if win is not None:
                ok = both(t, ok, win, i)
        if ok is None:
            ok = t.op("true", "arith.constant true", i)
        one = t.op("one", "arith.constant 1.0 : f32", i)
        zero = t.op("zero", "arith.constant 0.0 : f32", i)
        inc = t.op("inc", f"arith.select {ok}, {one}, {zero} : f32", i)
        return t.op("cnt", f"arith.addf {a[-1]}, {inc} : f32", i)

    return generic(t, dims, ins, n0, [PAR] * (rank - 1) + [RED], count, 2, "n")


def _count_range(t: Ssa, rdims: list[str], n0: Operand, s_k: int, causal: bool, window: tuple[int, int],
                 offset: int = 0) -> str:
    """``n_i = max(0, hi_i - lo_i + 1)`` for the key range ``[max(0, p - left), min(S_k - 1, p + right[, p])]`` of
    the row at position ``p = offset + i``."""
    left, right = window

    def body(a: list[str], ind: int) -> str:
        ii = t.op("i", f"linalg.index {len(rdims) - 1} : index", ind)
        if offset:
            ii = t.op("ig", f"arith.addi {ii}, {t.op('c', f'arith.constant {offset} : index', ind)} : index", ind)

        def c(v: int) -> str:
            return t.op("c", f"arith.constant {v} : index", ind)

        hi = c(s_k - 1)
        if causal:
            hi = t.op("hi", f"arith.minsi {hi}, {ii} : index", ind)
        if right >= 0:
            hi = t.op("hi", f"arith.minsi {hi}, {t.op('ir', f'arith.addi {ii}, {c(right)} : index', ind)} : index", ind)
        lo = c(0)
        if left >= 0:
            lo = t.op("lo", f"arith.maxsi {lo}, {t.op('il', f'arith.subi {ii}, {c(left)} : index', ind)} : index", ind)
        span = t.op("span", f"arith.subi {t.op('h1', f'arith.addi {hi}, {c(1)} : index', ind)}, {lo} : index", ind)
        span = t.op("span", f"arith.maxsi {span}, {c(0)} : index", ind)
        return t.op("nf", f"arith.sitofp {t.op('ri', f'arith.index_cast {span} : index to i64', ind)} : i64 to f32", ind)

    return generic(t, rdims, [], n0, [PAR] * len(rdims), body, 2, "n")


def log_factor(t: Ssa, row_shape: tuple[int | None, ...], n: str, ss: SsmaxParams, sizes: Sequence[str] = ()) -> str:
    """``f_i = s_h log max(n_i, 1) + b_h`` with ``h`` the head of row ``i`` (``%s``, ``%b`` are ``[H]``)."""
    rank = len(row_shape) + 1
    rdims = [f"d{i}" for i in range(rank - 1)]
    head = f"({rdims[rank - 3]})" if rank >= 3 and ss.heads > 1 else "(0)"
    hshape = (ss.heads,)
    ins = [Operand(n, row_shape, dims_of(rdims)), Operand("%s", hshape, head), Operand("%b", hshape, head)]

    def body(a: list[str], i: int) -> str:
        one = t.op("one", "arith.constant 1.0 : f32", i)
        lg = t.op("log", f"math.log {t.op('cl', f'arith.maximumf {a[0]}, {one} : f32', i)} : f32", i)
        return t.op("f", f"arith.addf {t.op('sl', f'arith.mulf {a[1]}, {lg} : f32', i)}, {a[2]} : f32", i)

    out = Operand(empty(t, row_shape, 2, sizes=sizes), row_shape, dims_of(rdims))
    return generic(t, rdims, ins, out, [PAR] * (rank - 1), body, 2, "factor")


def emit_factor(t: Ssa, row_shape: tuple[int | None, ...], s_k: int | None, keys: KeyMasks,
                ss: SsmaxParams, sizes: Sequence[str] = (), s_k_size: str | None = None) -> str:
    """``s_h log max(n_i, 1) + b_h`` per row, ``n_i`` counted from the plan's key factors (``keys``)."""
    return log_factor(t, row_shape, count_keys(t, row_shape, s_k, keys, sizes, s_k_size), ss, sizes)


def ssmax_func(name: str, x_shape: tuple[int | None, ...], masks: list[MaskIn], keys: KeyMasks, ss: SsmaxParams,
               elem: str = "f32") -> str:
    """``z = allowed ? (s_h log max(n_i, 1) + b_h) * x : finfo.min``; ``allowed`` from the plan's keep terms
    (``masks``), ``n_i`` from its key factors (``keys``).

    Unknown sizes of ``x`` are read with ``tensor.dim`` and size every tensor built here.  Half-precision scores
    (``elem`` f16 / bf16) are multiplied in f32 and rounded once back to their type, and a removed key gets that
    type's ``finfo.min``: the ONNX emitter's ``Cast(Mul(Cast(x, f32), f), x.dtype)``, so both IRs agree.  f64
    scores (ONNX ``softmax_precision`` double) take the f32 factor widened, so nothing is rounded to f32.
    """
    t = Ssa()
    rank = len(x_shape)
    dims = [f"d{i}" for i in range(rank)]
    xty = tensor_type(x_shape, elem)
    args = [f"%x: {xty}"] + [f"{m.arg}: {tensor_type(m.shape, m.elem)}" for m in masks] + keys.args() + ss.args()
    t.emit(f"func.func private @{name}({', '.join(args)}) -> {xty} {{", 1)
    masks = [settle_mask(t, m, x_shape) for m in masks]
    keys = keys.settled(t, x_shape)
    sizes = {a: dim_size(t, "%x", a, xty, 2) for a, d in enumerate(x_shape) if d is None}
    row_sizes = [sizes[a] for a in sorted(sizes) if a < rank - 1]
    ss.emit_constants(t)
    fac = emit_factor(t, x_shape[:-1], x_shape[-1], keys, ss, row_sizes, sizes.get(rank - 1))
    ins = [Operand("%x", x_shape, dims_of(dims), elem), Operand(fac, x_shape[:-1], dims_of(dims[:-1]))]
    ins += [Operand(m.arg, m.shape, bcast_map(m.shape, x_shape, dims), m.elem) for m in masks]

    def body(a: list[str], i: int) -> str:
        if elem == "f64":  # double scores (ONNX softmax_precision): the factor widened, the product in f64
            prod = t.op("p", f"arith.mulf {a[0]}, {t.op('fw', f'arith.extf {a[1]} : f32 to f64', i)} : f64", i)
        else:
            x = a[0] if elem == "f32" else t.op("xw", f"arith.extf {a[0]} : {elem} to f32", i)
            prod = t.op("p", f"arith.mulf {x}, {a[1]} : f32", i)
            if elem != "f32":
                prod = t.op("pn", f"arith.truncf {prod} : f32 to {elem}", i)
        _, ok = mask_body(t, masks, a[2:2 + len(masks)], i)
        if ok is None:
            return prod
        lo = t.op("min", f"arith.constant {FINFO_MIN[elem]} : {elem}", i)
        return t.op("sel", f"arith.select {ok}, {prod}, {lo} : {elem}", i)

    z0 = empty(t, x_shape, 2, elem, sizes=[sizes[a] for a in sorted(sizes)])
    z = generic(t, dims, ins, Operand(z0, x_shape, dims_of(dims), elem), [PAR] * rank, body, 2, "z")
    t.emit(f"return {z} : {xty}")
    t.emit("}", 1)
    return t.text()


def ssmax_sdpa_func(name: str, q_shape: tuple[int, ...], s_k: int, bias: MaskIn | None, keys: KeyMasks,
                    ss: SsmaxParams, q_mult: float = 1.0, elem: str = "f32") -> str:
    """SSMax for an SDPA call, as ``semantics.ssmax_sdpa``: returns ``q * f * q_mult`` and, when the op's
    additive mask holds logits bias (``bias``), that mask with its attendable entries times ``f``
    (``[..., S_q, S_k]``); masked entries keep their value, which SDPA adds after the product, so no
    factor can unmask a key.  ``n`` comes from the plan's key factors (``keys``).  A half-precision ``q``
    (``elem``) or mask is multiplied in f32 and rounded once back to its type, as the ONNX emitter does."""
    t = Ssa()
    rank = len(q_shape)
    row_shape = q_shape[:-1]
    mask_shape = (*row_shape, s_k)
    melem = bias.elem if bias is not None else "f32"
    qty, mty = tensor_type(q_shape, elem), tensor_type(mask_shape, melem)
    results = [qty] + ([mty] if bias is not None else [])
    args = [f"%q: {qty}"] + ([f"{bias.arg}: {tensor_type(bias.shape, bias.elem)}"] if bias is not None else [])
    args += keys.args() + ss.args()
    t.emit(f"func.func private @{name}({', '.join(args)}) -> ({', '.join(results)}) {{", 1)
    bias = None if bias is None else settle_mask(t, bias, mask_shape)
    keys = keys.settled(t, mask_shape)
    ss.emit_constants(t)
    fac = emit_factor(t, row_shape, s_k, keys, ss)
    dims = [f"d{i}" for i in range(rank)]
    ident, row = dims_of(dims), dims_of(dims[:-1])

    def scale_q(a: list[str], i: int) -> str:
        f = a[1]
        if q_mult != 1.0:
            f = t.op("f", f"arith.mulf {f}, {t.op('qmult', f'arith.constant {f32(q_mult)} : f32', i)} : f32", i)
        return _narrow(t, t.op("r", f"arith.mulf {_widen(t, a[0], elem, i)}, {f} : f32", i), elem, i)

    q2 = generic(t, dims, [Operand("%q", q_shape, ident, elem), Operand(fac, row_shape, row)],
                 Operand(empty(t, q_shape, 2, elem), q_shape, ident, elem), [PAR] * rank, scale_q, 2, "qs")
    outs = [q2]
    if bias is not None:
        m = bias

        def scale_mask(a: list[str], i: int) -> str:
            x = _widen(t, a[0], melem, i)
            lim = t.op("lim", f"arith.constant {f32(semantics.MASKED_BELOW)} : f32", i)
            keep = t.op("keep", f"arith.cmpf ogt, {x}, {lim} : f32", i)
            p = t.op("p", f"arith.mulf {x}, {a[1]} : f32", i)
            return _narrow(t, t.op("sel", f"arith.select {keep}, {p}, {x} : f32", i), melem, i)

        ins = [Operand(m.arg, m.shape, bcast_map(m.shape, mask_shape, dims), melem), Operand(fac, row_shape, row)]
        outs.append(generic(t, dims, ins, Operand(empty(t, mask_shape, 2, melem), mask_shape, ident, melem), [PAR] * rank,
                            scale_mask, 2, "mask"))
    t.emit(f"return {', '.join(outs)} : {', '.join(results)}")
    t.emit("}", 1)
    return t.text()


def _widen(t: Ssa, x: str, elem: str, ind: int) -> str:
    """An f16 / bf16 scalar as f32 (f32 as it is)."""
    return x if elem == "f32" else t.op("xw", f"arith.extf {x} : {elem} to f32", ind)


def _narrow(t: Ssa, x: str, elem: str, ind: int) -> str:
    """An f32 scalar rounded once to ``elem``."""
    return x if elem == "f32" else t.op("xn", f"arith.truncf {x} : f32 to {elem}", ind)
