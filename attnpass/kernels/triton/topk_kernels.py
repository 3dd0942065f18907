"""Triton kernels for softmax + top-k in one read of the input: forward and backward.

Executed as its own module per mode, compiled or interpreted, like ``kernels.py`` (see
``exec_kernel_source`` in ``__init__``).  For the same reason as there, nothing here calls a
``@triton.jit`` function of ``triton.language`` (``tl.max``, ``tl.sum``, ``tl.zeros``,
``tl.sort``, ``tl.topk`` are such functions, built in whichever mode Triton was first
imported): reductions go through ``tl.reduce`` with Triton's own combine functions, and the
top-k is kept without a sort.

Forward: a program owns ``ROWS`` rows and walks them in ``[ROWS, BLOCK]`` tiles, carrying per
row the running maximum, the running normaliser (rescaled when the maximum grows) and the
running top-``K_PAD`` (``K_PAD``: k rounded up to a power of two) as an unordered set of int64
keys.  A key packs the value's order-preserving integer image above the complement of the
index, so larger keys mean larger values and, among equal values, lower indices; NaN is made
the positive quiet NaN first, whose image lies above +inf (torch.topk ranks NaN first), and
-0.0 is made +0.0 (torch compares them equal).  A tile is merged by replacing the set's
smallest key with the tile's largest while that is larger (a handful of steps per tile once
the set has warmed up); at the end the set is ordered by ``K_PAD`` maximum extractions.

Backward recomputes the log-sum-exp with the same online pass, then writes ``dx`` tile by tile
and finally the selected entries (after a barrier, so the last write wins).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

#: Whether this module object holds interpreter kernels (decided when it was executed).
INTERPRET: bool = bool(knobs.runtime.interpret)

_LOW32: tl.constexpr = tl.constexpr(4294967295)
_NEG_INF_KEY: tl.constexpr = tl.constexpr(-9223372036854775807)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even as the GPU does; the interpreter truncates fp32 -> bf16, so
    under ``EMULATE`` the value is first rounded to bf16 precision with integer arithmetic (as ``kernels._cast``)."""
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _keys(x, cols, valid):
    """int64 keys whose descending order is torch.topk's order on ``x``, lower index first among ties."""
    x = tl.where(x != x, float("nan"), x + 0.0)  # one NaN bit pattern, and -0.0 -> +0.0
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the floats
    key = (ordered.to(tl.int64) << 32) | (cols.to(tl.int64) ^ _LOW32)
    return tl.where(valid, key, _NEG_INF_KEY)


@triton.jit
def _merge(best, cand, K_PAD: tl.constexpr):
    """The ``K_PAD`` largest of ``best`` (``[ROWS, K_PAD]``, unordered) and ``cand`` (``[ROWS, BLOCK]``); keys are unique."""
    kcols = tl.arange(0, K_PAD)[None, :]
    low = _min(best, 1)
    top = _max(cand, 1)
    while _max((top > low).to(tl.int32), 0) > 0:
        take = top > low
        slot = _min(tl.where(best == low[:, None], kcols, K_PAD), 1)  # first slot holding the smallest key
        best = tl.where(take[:, None] & (kcols == slot[:, None]), top[:, None], best)
        cand = tl.where(cand == top[:, None], _NEG_INF_KEY, cand)
        low = _min(best, 1)
        top = _max(cand, 1)
    return best


@triton.jit
def _lse_pass(x_ptr, rows, n, ROWS: tl.constexpr, BLOCK: tl.constexpr, row0):
    """Online log-sum-exp of rows ``row0 .. row0 + ROWS`` (float32, ``[ROWS]``)."""
    r = row0 + tl.arange(0, ROWS)
    row_ok = r < rows
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.full([ROWS], 0.0, tl.float32)
    for c0 in range(0, n, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        valid = row_ok[:, None] & (cols[None, :] < n)
        x = tl.load(x_ptr + r[:, None].to(tl.int64) * n + cols[None, :], mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, _max(x, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - safe) + _sum(tl.exp(x - safe[:, None]), 1)
        m = m_new
    return tl.where(m == float("inf"), m, m + tl.log(tl.where(s == 0.0, 1.0, s)))


@triton.jit
def softmax_topk_fwd(x_ptr, probs_ptr, idx_ptr, rows, n, k, RENORM: tl.constexpr, EMULATE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, K_PAD: tl.constexpr):
    row0 = tl.program_id(0) * ROWS
    r = row0 + tl.arange(0, ROWS)
    row_ok = r < rows
    base = r.to(tl.int64) * n
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.full([ROWS], 0.0, tl.float32)
    best = tl.full([ROWS, K_PAD], _NEG_INF_KEY, tl.int64)
    for c0 in range(0, n, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        valid = row_ok[:, None] & (cols[None, :] < n)
        x = tl.load(x_ptr + base[:, None] + cols[None, :], mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, _max(x, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - safe) + _sum(tl.exp(x - safe[:, None]), 1)
        m = m_new
        best = _merge(best, _keys(x, cols[None, :] + tl.full([ROWS, BLOCK], 0, tl.int32), valid), K_PAD)
    lse = tl.where(m == float("inf"), m, m + tl.log(tl.where(s == 0.0, 1.0, s)))
    # order the set: K_PAD extractions of its maximum
    kcols = tl.arange(0, K_PAD)[None, :]
    ordered = tl.full([ROWS, K_PAD], _NEG_INF_KEY, tl.int64)
    for t in range(K_PAD):
        top = _max(best, 1)
        ordered = tl.where(kcols == t, top[:, None], ordered)
        best = tl.where(best == top[:, None], _NEG_INF_KEY, best)
    out_ok = row_ok[:, None] & (kcols < k)
    idx = tl.where(out_ok, (ordered & _LOW32) ^ _LOW32, 0)
    v = tl.load(x_ptr + base[:, None] + idx, mask=out_ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(v - lse[:, None])
    if RENORM:
        p = p / _sum(tl.where(out_ok, p, 0.0), 1)[:, None]
    out = r.to(tl.int64)[:, None] * k + kcols
    tl.store(probs_ptr + out, _round(p, probs_ptr.dtype.element_ty, EMULATE), mask=out_ok)
    tl.store(idx_ptr + out, idx, mask=out_ok)


@triton.jit
def softmax_topk_bwd(g_ptr, x_ptr, idx_ptr, dx_ptr, rows, n, k, RENORM: tl.constexpr, EMULATE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, K_PAD: tl.constexpr):
    row0 = tl.program_id(0) * ROWS
    r = row0 + tl.arange(0, ROWS)
    row_ok = r < rows
    base = r.to(tl.int64) * n
    kcols = tl.arange(0, K_PAD)
    sel_ok = row_ok[:, None] & (kcols[None, :] < k)
    sel = r.to(tl.int64)[:, None] * k + kcols[None, :]
    idx = tl.load(idx_ptr + sel, mask=sel_ok, other=0)
    g = tl.load(g_ptr + sel, mask=sel_ok, other=0.0).to(tl.float32)
    v = tl.load(x_ptr + base[:, None] + idx, mask=sel_ok, other=float("-inf")).to(tl.float32)
    if RENORM:
        top = _max(tl.where(sel_ok, v, float("-inf")), 1)
        w = tl.where(sel_ok, tl.exp(v - top[:, None]), 0.0)
        p = w / _sum(w, 1)[:, None]
        d_sel = p * (g - _sum(g * p, 1)[:, None])  # entries off the selection get no gradient
    else:
        lse = _lse_pass(x_ptr, rows, n, ROWS, BLOCK, row0)
        p = tl.where(sel_ok, tl.exp(v - lse[:, None]), 0.0)
        coef = _sum(g * p, 1)
        d_sel = (g - coef[:, None]) * p
    for c0 in range(0, n, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        valid = row_ok[:, None] & (cols[None, :] < n)
        if RENORM:
            d = tl.full([ROWS, BLOCK], 0.0, tl.float32)
        else:
            x = tl.load(x_ptr + base[:, None] + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            d = -coef[:, None] * tl.exp(x - lse[:, None])
        tl.store(dx_ptr + base[:, None] + cols[None, :], _round(d, dx_ptr.dtype.element_ty, EMULATE), mask=valid)
    tl.debug_barrier()
    tl.store(dx_ptr + base[:, None] + idx, _round(d_sel, dx_ptr.dtype.element_ty, EMULATE), mask=sel_ok)
