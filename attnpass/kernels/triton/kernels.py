"""Triton kernels for fused online-softmax attention with SSMax: forward, backward and two pre-passes.

This file is executed twice at most, as two separate modules (see ``load`` in ``__init__``):
once compiled for CUDA and once under ``TRITON_INTERPRET=1`` for CPU tensors.  Triton reads
the interpreter switch when ``@triton.jit`` runs, so the only way to have both variants in
one process (a GPU machine running the CPU twins of the GPU tests) is two module objects
built from the same source.

The arithmetic per score, in the order of ``semantics.attention``::

    raw   = scale * (q . k)                         fp32 from the tensor-core dot
    z     = softcap * tanh(raw / softcap)           if soft-capped
    z     = z + bias                                finite part of an additive mask
    logit = f_i * z,  f_i = s_h log max(n_i, 1) + b_h   (SSMax; f_i = 1 without it)
    masked keys (causal, bool False, additive <= MASKED_BELOW) -> -inf

The kernels keep logits in base 2 (``f_i * log2 e`` is folded into one per-row factor) so
the inner loop uses ``exp2``; the log-sum-exp they store is natural, like every other
backend's, so a forward from one backend and a backward from another agree.

Backward follows FlashAttention-2: the forward saves only ``lse``; the backward recomputes
the probabilities block by block.  dK/dV and dQ are separate kernels so that neither
needs atomics: the dK/dV kernel owns a key block of one KV head (and loops over the query
heads of its GQA group), the dQ kernel owns a query block and also reduces the per-row
SSMax gradient ``dfactor_i = sum_j dlogit_ij * z_ij``, a reduction over keys that only it
sees whole.  The float-mask gradient (``dz`` on attendable entries) is written by the dK/dV
kernel, summed over rows in-kernel when the mask broadcasts over rows (a padding mask).
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl
from triton import knobs

from attnpass.kernels.triton import tuning

#: Whether this module object holds interpreter kernels (decided when it was executed).
INTERPRET: bool = bool(knobs.runtime.interpret)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

#: Tile tables and the prune hook live in ``tuning.py`` (plain Python, importable without running
#: this file); the names are bound here for the launcher, the AOT check and the tests.
HOPPER_CONFIGS = tuning.HOPPER_CONFIGS
AMPERE_CONFIGS = tuning.AMPERE_CONFIGS
CONFIG_TABLE = tuning.config_table(INTERPRET)
_prune = functools.partial(tuning.prune, interpret=INTERPRET)
_KEY = tuning.KEY


def _tuned(kernel: str, fn):
    """``fn`` autotuned over ``kernel``'s table with that kernel's pruning."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in CONFIG_TABLE[kernel]]
    return triton.autotune(configs=configs, key=_KEY,
                           prune_configs_by={"early_config_prune": functools.partial(_prune, kernel=kernel)})(fn)


# ---- element-wise helpers ------------------------------------------------------------------
@triton.jit
def _sum(x, axis: tl.constexpr):
    """``tl.sum`` spelled as ``tl.reduce`` with Triton's own combine function.

    ``tl.sum``/``tl.max``/``tl.zeros`` are themselves ``@triton.jit`` functions, built in
    whatever mode Triton was first imported; an interpreter kernel cannot call compiled
    ones.  ``tl.reduce`` is a builtin, and the interpreter recognises these combine
    functions by identity and reduces with numpy, so this works in both modes, whichever
    came first.
    """
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    """``tl.max`` without calling a jit function of ``triton.language`` (see ``_sum``)."""
    return tl.reduce(x, axis, tl.standard._elementwise_max)



@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; fp32 operands stay IEEE fp32 (no TF32: the contract is 1e-5).

    ``UPCAST`` is set only under the interpreter for bf16, whose ``np.matmul`` would multiply
    the raw uint16 storage; bf16 -> fp32 is exact and the GPU accumulates bf16 products in
    fp32, so the upcast computes what the tensor cores compute.  (The same flag turns on
    ``_cast``'s rounding fix: both exist only to make the interpreter's bf16 the GPU's.)
    """
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _cast(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, as the GPU converts.

    Triton's interpreter converts fp32 -> bf16 by truncation; under ``EMULATE`` (interpreter
    and bf16) the value is rounded to bf16 precision first with integer arithmetic, so the
    truncation that follows is exact and the interpreter's numbers are the GPU's.
    """
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tanh(x):
    """tanh in fp32 from ``exp`` (libdevice's tanh has no interpreter implementation).

    ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` never overflows; below |x| = 0.1 it loses
    relative accuracy to cancellation, so a degree-7 Taylor polynomial (error < 1e-9
    relative there) takes over.  NaN stays NaN.
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    r = tl.where(ax < 0.1, small, big)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def _row_factor(offs_m, n_row, s, b, S_q, S_k,
                CAUSAL: tl.constexpr, N_BUF: tl.constexpr, HAS_B: tl.constexpr):
    """SSMax factor ``f_i = s log max(n_i, 1) + b`` and ``log max(n_i, 1)`` per row, fp32.

    ``n_i`` comes from the count pre-pass when there is a mask (``N_BUF``); otherwise it is
    the causal limit (bottom-right aligned) or ``S_k``, computed here for free.
    """
    if N_BUF:
        n = tl.load(n_row + offs_m, mask=offs_m < S_q, other=1.0)
    elif CAUSAL:
        n = tl.minimum(tl.maximum(offs_m + (S_k - S_q + 1), 0), S_k).to(tl.float32)
    else:
        n = (offs_m * 0 + S_k).to(tl.float32)
    logn = tl.log(tl.maximum(n, 1.0))
    f = s * logn
    if HAS_B:
        f = f + b
    return f, logn


@triton.jit
def _attendable(mv, mask_thr):
    """Additive-mask values that do not mark a key as masked: above the threshold, or NaN.

    fp16/bf16 convert to fp32 exactly, so comparing there decides as the mask's own dtype
    does (the threshold is already rounded to it); float64 masks compare in float64.  The
    conversion also keeps the interpreter honest: it compares bf16 storage as raw integers.
    """
    if mv.dtype != tl.float64:
        mv = mv.to(tl.float32)
    return (mv > mask_thr) | (mv != mv)


@triton.jit
def _scores(qk, qi, kj, m_ptrs, f2, S_q, S_k, scale, softcap, mask_thr,
            CAUSAL_CHECK: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWB: tl.constexpr, SOFTCAP: tl.constexpr):
    """From ``q . k`` to base-2 logits for one tile; also returns ``z``, ``tanh`` and the attendable set.

    Orientation-free: ``qi`` (query index), ``kj`` (key index) and ``f2`` (the per-query factor)
    are 2-D and broadcast to the tile, ``[BM, 1]``/``[1, BN]`` for a query-major tile (forward,
    dQ) or ``[1, BM]``/``[BN, 1]`` for the key-major tile of dK/dV.

    ``z`` (pre-factor logits) and ``t`` (the tanh) are what the backward needs for the
    SSMax and soft-cap gradients.  A float mask value counts as masked when it is at or
    below ``mask_thr`` (``MASKED_BELOW`` rounded to the mask's dtype, so the decision is the
    one made in that dtype); NaN is not masked, so it reaches the output as in semantics.
    Masking is applied after the factor: no factor can unmask a key or make it NaN.
    ``MASK_ROWB``: the mask does not vary over rows (a key-padding mask, row stride 0), so
    ``m_ptrs`` is shaped like ``kj`` and one row of mask serves the whole tile: the pipeline
    then stages BLOCK_N mask values per key block, not BLOCK_M * BLOCK_N.
    """
    raw = qk * scale
    if SOFTCAP:
        t = _tanh(raw / softcap)
        z = softcap * t
    else:
        t = raw
        z = raw
    inb = (qi < S_q) & (kj < S_k)
    allowed = inb
    if CAUSAL_CHECK:
        allowed = allowed & (kj <= qi + (S_k - S_q))
    if MASK_KIND == 1:
        if MASK_ROWB:
            mv = tl.load(m_ptrs, mask=kj < S_k, other=0)
        else:
            mv = tl.load(m_ptrs, mask=inb, other=0)
        allowed = allowed & (mv != 0)
    if MASK_KIND == 2:
        if MASK_ROWB:
            mv = tl.load(m_ptrs, mask=kj < S_k, other=0.0)
        else:
            mv = tl.load(m_ptrs, mask=inb, other=0.0)
        keep = _attendable(mv, mask_thr)
        z = z + tl.where(keep, mv.to(tl.float32), 0.0)
        allowed = allowed & keep
    logit2 = tl.where(allowed, z * f2, float("-inf"))
    return logit2, z, t, allowed


# ---- pre-passes ----------------------------------------------------------------------------

@triton.jit
def count_keys_kernel(Mask, NKeys, smb, smh, smm, smn, HM, S_q, S_k, mask_thr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """``n_i`` per row of the mask's own (un-broadcast) batch and heads, as fp32 ``[BM, HM, S_q]``.

    Reads only the mask (no Q/K), and only up to the causal limit.  Run when SSMax meets a
    mask: the factor of a row must be known before its first logit is formed.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # Mask rows are S_k apart: at S = 64k a row offset overflows int32, hence the int64 row offsets.
    b = (pid_bh // HM).to(tl.int64)
    h = (pid_bh % HM).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    base = Mask + b * smb + h * smh + offs_m[:, None].to(tl.int64) * smm
    n = tl.full([BLOCK_M], 0, tl.int32)
    hi = S_k
    if CAUSAL:
        hi = tl.minimum(S_k, pid_m * BLOCK_M + BLOCK_M + S_k - S_q)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        inb = (offs_m[:, None] < S_q) & (offs_n[None, :] < S_k)
        ok = inb
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (S_k - S_q))
        mv = tl.load(base + offs_n[None, :] * smn, mask=inb, other=0)
        if MASK_KIND == 1:
            ok = ok & (mv != 0)
        else:
            ok = ok & _attendable(mv, mask_thr)
        n += _sum(ok.to(tl.int32), 1)
    tl.store(NKeys + pid_bh.to(tl.int64) * S_q + offs_m, n.to(tl.float32), mask=offs_m < S_q)


@triton.jit
def delta_kernel(Out, DO, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, S_q, DV,
                 BLOCK_M: tl.constexpr, DV_PAD: tl.constexpr):
    """``Delta_i = sum_d dO_id * O_id`` in fp32: the softmax-backward row term, shared by both kernels."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV_PAD)
    ok = (offs_m[:, None] < S_q) & (offs_d[None, :] < DV)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=ok, other=0.0)
    delta = _sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * S_q + offs_m, delta, mask=offs_m < S_q)


# ---- forward -------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, skn, skd, svn, svd, smn,
               offs_m, offs_n0, offs_d, offs_dv, f2, S_q, S_k, D, DV, scale, softcap, mask_thr, lo, hi,
               BLOCK_N: tl.constexpr, CAUSAL_CHECK: tl.constexpr, MASK_KIND: tl.constexpr,
               MASK_ROWB: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over key blocks ``[lo, hi)``: running max ``m``, normaliser ``l``, accumulator."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < S_k) & (offs_d[:, None] < D), other=0.0)
        qk = _dot(q, kt, UPCAST)
        logit2, z, t, allowed = _scores(qk, offs_m[:, None], offs_n[None, :], m_base + offs_n[None, :] * smn,
                                        f2[:, None], S_q, S_k, scale, softcap, mask_thr,
                                        CAUSAL_CHECK, MASK_KIND, MASK_ROWB, SOFTCAP)
        m_new = tl.maximum(m_i, _max(logit2, 1))
        # A row with no attendable key so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(logit2 - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + _sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < S_k) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, UPCAST), v, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(Q, K, V, Mask, NKeys, SS, SB, Out, Lse,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               smb, smh, smm, smn, snb, snh, ssh, sbh, sob, soh, som, sod,
               H, GROUP, S_q, S_k, D, DV, scale, softcap, mask_thr, S_BUCKET,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
               CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWB: tl.constexpr, SSMAX: tl.constexpr,
               HAS_B: tl.constexpr, N_BUF: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """One query block of one (batch, head): ``Out`` and natural ``Lse`` (``-inf`` for rows with no key).

    Causal problems visit only key blocks at or left of the diagonal, and only the blocks
    that straddle it pay for the causal comparison.  K/V are read through the KV head
    ``h // GROUP`` (GQA without repeating K/V) with whatever strides they have (stride 0
    for a broadcast batch).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < S_q) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if MASK_ROWB:
        m_base = Mask + b * smb + h * smh
    else:
        m_base = Mask + b * smb + h * smh + offs_m[:, None].to(tl.int64) * smm
    if SSMAX:
        s = tl.load(SS + h * ssh)
        bias = 0.0
        if HAS_B:
            bias = tl.load(SB + h * sbh)
        f, logn = _row_factor(offs_m, NKeys + b * snb + h * snh, s, bias, S_q, S_k, CAUSAL, N_BUF, HAS_B)
        f2 = f * LOG2E
    else:
        f2 = tl.full([BLOCK_M], LOG2E, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc = tl.full([BLOCK_M, DV_PAD], 0, tl.float32)
    if CAUSAL:
        hi = tl.minimum(S_k, start_m + BLOCK_M + S_k - S_q)
        # Keys left of ``full`` are visible to every row of this block: no causal compare there.
        full = tl.minimum(tl.maximum(start_m + 1 + S_k - S_q, 0), S_k)
        full = (full // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, skn, skd, svn, svd, smn,
                                   offs_m, offs_n0, offs_d, offs_dv, f2, S_q, S_k, D, DV, scale, softcap,
                                   mask_thr, 0, full, BLOCK_N, False, MASK_KIND, MASK_ROWB, SOFTCAP, UPCAST)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, skn, skd, svn, svd, smn,
                                   offs_m, offs_n0, offs_d, offs_dv, f2, S_q, S_k, D, DV, scale, softcap,
                                   mask_thr, full, hi, BLOCK_N, True, MASK_KIND, MASK_ROWB, SOFTCAP, UPCAST)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, skn, skd, svn, svd, smn,
                                   offs_m, offs_n0, offs_d, offs_dv, f2, S_q, S_k, D, DV, scale, softcap,
                                   mask_thr, 0, S_k, BLOCK_N, False, MASK_KIND, MASK_ROWB, SOFTCAP, UPCAST)
    # "!= 0" rather than "> 0": a NaN sum is a row with keys whose NaN must reach the output.
    has = l_i != 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    row_ok = offs_m < S_q
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             _cast(out, Out.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + pid_bh.to(tl.int64) * S_q + offs_m, lse, mask=row_ok)


fwd_tuned = _tuned("fwd", fwd_kernel)


# ---- backward: dQ (and the SSMax row gradient) ----------------------------------------------

@triton.jit
def _dq_inner(dq, dfac, q, do, lse2, delta, f, f2, k_base, v_base, m_base, skn, skd, svn, svd, smn,
              offs_m, offs_n0, offs_d, offs_dv, S_q, S_k, D, DV, scale, softcap, mask_thr, lo, hi,
              BLOCK_N: tl.constexpr, CAUSAL_CHECK: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWB: tl.constexpr,
              SOFTCAP: tl.constexpr, SSMAX: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < S_k) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < S_k) & (offs_dv[None, :] < DV), other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST)
        logit2, z, t, allowed = _scores(qk, offs_m[:, None], offs_n[None, :], m_base + offs_n[None, :] * smn,
                                        f2[:, None], S_q, S_k, scale, softcap, mask_thr,
                                        CAUSAL_CHECK, MASK_KIND, MASK_ROWB, SOFTCAP)
        p = tl.exp2(logit2 - lse2[:, None])
        dp = _dot(do, tl.trans(v), UPCAST)
        dlogit = p * (dp - delta[:, None])
        if SSMAX:
            dfac += _sum(tl.where(allowed, dlogit * z, 0.0), 1)
            dz = dlogit * f[:, None]
        else:
            dz = dlogit
        if SOFTCAP:
            dz = dz * (1.0 - t * t)
        dq += _dot(_cast(dz, k.dtype, UPCAST), k, UPCAST)
    return dq, dfac


@triton.jit
def bwd_dq_kernel(Q, K, V, Mask, NKeys, SS, SB, DO, Lse, Delta, DQ, DFacLogn, DFac,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  smb, smh, smm, smn, snb, snh, ssh, sbh, sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd,
                  H, GROUP, S_q, S_k, D, DV, scale, softcap, mask_thr, S_BUCKET,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                  CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWB: tl.constexpr, SSMAX: tl.constexpr,
                  HAS_B: tl.constexpr, N_BUF: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """dQ for one query block, plus ``dfactor * log n`` and ``dfactor`` per row (the s and b gradients).

    Visits the same key blocks as the forward (causal block skipping included) and
    recomputes ``P = exp(logit - lse)`` from the saved lse.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < S_q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * S_q + offs_m, mask=row_ok, other=0.0)
    # A row with no key has lse = -inf and every logit -inf: shift by 0 so P is 0, not NaN.
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    delta = tl.load(Delta + pid_bh.to(tl.int64) * S_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if MASK_ROWB:
        m_base = Mask + b * smb + h * smh
    else:
        m_base = Mask + b * smb + h * smh + offs_m[:, None].to(tl.int64) * smm
    if SSMAX:
        s = tl.load(SS + h * ssh)
        bias = 0.0
        if HAS_B:
            bias = tl.load(SB + h * sbh)
        f, logn = _row_factor(offs_m, NKeys + b * snb + h * snh, s, bias, S_q, S_k, CAUSAL, N_BUF, HAS_B)
        f2 = f * LOG2E
    else:
        f = tl.full([BLOCK_M], 1.0, tl.float32)
        logn = f
        f2 = tl.full([BLOCK_M], LOG2E, tl.float32)
    dq = tl.full([BLOCK_M, D_PAD], 0, tl.float32)
    dfac = tl.full([BLOCK_M], 0, tl.float32)
    if CAUSAL:
        hi = tl.minimum(S_k, start_m + BLOCK_M + S_k - S_q)
        full = tl.minimum(tl.maximum(start_m + 1 + S_k - S_q, 0), S_k)
        full = (full // BLOCK_N) * BLOCK_N
        dq, dfac = _dq_inner(dq, dfac, q, do, lse2, delta, f, f2, k_base, v_base, m_base, skn, skd, svn, svd, smn,
                             offs_m, offs_n0, offs_d, offs_dv, S_q, S_k, D, DV, scale, softcap, mask_thr, 0, full,
                             BLOCK_N, False, MASK_KIND, MASK_ROWB, SOFTCAP, SSMAX, UPCAST)
        dq, dfac = _dq_inner(dq, dfac, q, do, lse2, delta, f, f2, k_base, v_base, m_base, skn, skd, svn, svd, smn,
                             offs_m, offs_n0, offs_d, offs_dv, S_q, S_k, D, DV, scale, softcap, mask_thr, full, hi,
                             BLOCK_N, True, MASK_KIND, MASK_ROWB, SOFTCAP, SSMAX, UPCAST)
    else:
        dq, dfac = _dq_inner(dq, dfac, q, do, lse2, delta, f, f2, k_base, v_base, m_base, skn, skd, svn, svd, smn,
                             offs_m, offs_n0, offs_d, offs_dv, S_q, S_k, D, DV, scale, softcap, mask_thr, 0, S_k,
                             BLOCK_N, False, MASK_KIND, MASK_ROWB, SOFTCAP, SSMAX, UPCAST)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             _cast(dq, DQ.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (offs_d[None, :] < D))
    if SSMAX:
        tl.store(DFacLogn + pid_bh.to(tl.int64) * S_q + offs_m, dfac * logn, mask=row_ok)
        tl.store(DFac + pid_bh.to(tl.int64) * S_q + offs_m, dfac, mask=row_ok)


bwd_dq_tuned = _tuned("dq", bwd_dq_kernel)


# ---- backward: dK, dV (and the float-mask gradient) -----------------------------------------

@triton.jit
def _dkdv_inner(dk, dv, colsum, k, v, q_base, do_base, lse_row, delta_row, n_row, dm_base, s, bias,
                sqm, sqd, sdom, sdod, m_base, smm, smn, sdmm, sdmn,
                offs_n, offs_m0, offs_d, offs_dv, S_q, S_k, D, DV, scale, softcap, mask_thr, lo, hi,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_CHECK: tl.constexpr, MASK_KIND: tl.constexpr,
                MASK_ROWB: tl.constexpr, SSMAX: tl.constexpr, HAS_B: tl.constexpr, N_BUF: tl.constexpr, SOFTCAP: tl.constexpr,
                ROW_BCAST: tl.constexpr, UPCAST: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < S_q
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(lse_row + offs_m, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
        delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
        if SSMAX:
            f, logn = _row_factor(offs_m, n_row, s, bias, S_q, S_k, CAUSAL, N_BUF, HAS_B)
            f2 = f * LOG2E
        else:
            f = tl.full([BLOCK_M], 1.0, tl.float32)
            f2 = tl.full([BLOCK_M], LOG2E, tl.float32)
        # Key-major tile [BLOCK_N, BLOCK_M]: P^T and dZ^T come out of their dots in the layout the dV
        # and dK dots take as their register operand, so no tile is transposed through shared memory.
        qkT = _dot(k, tl.trans(q), UPCAST)
        # dP^T before the element-wise work: the mask, tanh and "allowed" tiles then die before the
        # dV/dK dots instead of living across them (measured: fewer registers, fewer spills).
        dpT = _dot(v, tl.trans(do), UPCAST)
        if MASK_ROWB:
            m_ptrs = m_base + offs_n[:, None] * smn
        else:
            m_ptrs = m_base + offs_m[None, :].to(tl.int64) * smm + offs_n[:, None] * smn
        logit2, z, t, allowed = _scores(qkT, offs_m[None, :], offs_n[:, None], m_ptrs, f2[None, :], S_q, S_k, scale,
                                        softcap, mask_thr, CAUSAL_CHECK, MASK_KIND, MASK_ROWB, SOFTCAP)
        pT = tl.exp2(logit2 - lse2[None, :])
        dlogit = pT * (dpT - delta[None, :])
        if SSMAX:
            dz = dlogit * f[None, :]
        else:
            dz = dlogit
        if MASK_KIND == 2:
            dm = tl.where(allowed, dz, 0.0)
            if ROW_BCAST:
                colsum += _sum(dm, 1)
            else:
                tl.store(dm_base + offs_m[None, :].to(tl.int64) * sdmm + offs_n[:, None] * sdmn, dm,
                         mask=row_ok[None, :] & (offs_n[:, None] < S_k))
        if SOFTCAP:
            dz = dz * (1.0 - t * t)
        dv += _dot(_cast(pT, do.dtype, UPCAST), do, UPCAST)
        dk += _dot(_cast(dz, q.dtype, UPCAST), q, UPCAST)
    return dk, dv, colsum


@triton.jit
def bwd_dkdv_kernel(Q, K, V, Mask, NKeys, SS, SB, DO, Lse, Delta, DK, DVout, DMask,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    smb, smh, smm, smn, snb, snh, ssh, sbh, sdob, sdoh, sdom, sdod,
                    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sdmb, sdmh, sdmm, sdmn,
                    H, GROUP, S_q, S_k, D, DV, scale, softcap, mask_thr, S_BUCKET,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWB: tl.constexpr, SSMAX: tl.constexpr,
                    HAS_B: tl.constexpr, N_BUF: tl.constexpr, SOFTCAP: tl.constexpr, ROW_BCAST: tl.constexpr, UPCAST: tl.constexpr):
    """dK and dV for one key block of one (batch, KV head), summed over the query heads of its group.

    Looping over the GQA group inside the program is what keeps this atomic-free: every
    query head that reads this K/V block contributes here, and nowhere else.  Causal
    problems start at the first query block that can see the key block.  With a float mask
    it also writes ``dmask = dz`` on attendable entries (zeros elsewhere come from the
    caller's zero-filled buffer); a mask that broadcasts over rows gets its row sum here.
    """
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    HK = H // GROUP
    b = (pid_bk // HK).to(tl.int64)
    hk = (pid_bk % HK).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    col_ok = offs_n < S_k
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.full([BLOCK_N, D_PAD], 0, tl.float32)
    dv = tl.full([BLOCK_N, DV_PAD], 0, tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        lse_row = Lse + bh * S_q
        delta_row = Delta + bh * S_q
        n_row = NKeys + b * snb + h * snh
        m_base = Mask + b * smb + h * smh
        dm_base = DMask + b * sdmb + h * sdmh
        s = 0.0
        bias = 0.0
        if SSMAX:
            s = tl.load(SS + h * ssh)
            if HAS_B:
                bias = tl.load(SB + h * sbh)
        colsum = tl.full([BLOCK_N], 0, tl.float32)
        if CAUSAL:
            # Row i sees key j when j <= i + (S_k - S_q): rows above ``lo`` see nothing of this
            # block, rows from ``mid`` on see all of it (no causal compare needed).
            lo = tl.maximum(start_n - (S_k - S_q), 0)
            lo = (lo // BLOCK_M) * BLOCK_M
            mid = tl.maximum(start_n + BLOCK_N - 1 - (S_k - S_q), lo)
            mid = tl.minimum(((mid + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, S_q)
            mid = tl.maximum(mid, lo)
            dk, dv, colsum = _dkdv_inner(dk, dv, colsum, k, v, q_base, do_base, lse_row, delta_row, n_row, dm_base,
                                         s, bias, sqm, sqd, sdom, sdod, m_base, smm, smn, sdmm, sdmn,
                                         offs_n, offs_m0, offs_d, offs_dv, S_q, S_k, D, DV, scale, softcap, mask_thr,
                                         lo, mid, BLOCK_M, CAUSAL, True, MASK_KIND, MASK_ROWB, SSMAX, HAS_B, N_BUF, SOFTCAP,
                                         ROW_BCAST, UPCAST)
            dk, dv, colsum = _dkdv_inner(dk, dv, colsum, k, v, q_base, do_base, lse_row, delta_row, n_row, dm_base,
                                         s, bias, sqm, sqd, sdom, sdod, m_base, smm, smn, sdmm, sdmn,
                                         offs_n, offs_m0, offs_d, offs_dv, S_q, S_k, D, DV, scale, softcap, mask_thr,
                                         mid, S_q, BLOCK_M, CAUSAL, False, MASK_KIND, MASK_ROWB, SSMAX, HAS_B, N_BUF, SOFTCAP,
                                         ROW_BCAST, UPCAST)
        else:
            dk, dv, colsum = _dkdv_inner(dk, dv, colsum, k, v, q_base, do_base, lse_row, delta_row, n_row, dm_base,
                                         s, bias, sqm, sqd, sdom, sdod, m_base, smm, smn, sdmm, sdmn,
                                         offs_n, offs_m0, offs_d, offs_dv, S_q, S_k, D, DV, scale, softcap, mask_thr,
                                         0, S_q, BLOCK_M, CAUSAL, False, MASK_KIND, MASK_ROWB, SSMAX, HAS_B, N_BUF, SOFTCAP,
                                         ROW_BCAST, UPCAST)
        if MASK_KIND == 2:
            if ROW_BCAST:
                tl.store(dm_base + offs_n * sdmn, colsum, mask=col_ok)
    dk = dk * scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             _cast(dk, DK.dtype.element_ty, UPCAST), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DVout + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             _cast(dv, DVout.dtype.element_ty, UPCAST), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


bwd_dkdv_tuned = _tuned("dkdv", bwd_dkdv_kernel)
