"""Blocked online-softmax attention in plain torch: the oracle every fused kernel is tested against.

It walks the keys in blocks, carrying per row a running maximum ``m``, normaliser ``l``
and accumulator ``acc`` (Milakov & Gimelshein 2018; the FlashAttention recurrence), so
it exercises exactly the arithmetic a fused kernel does, while staying readable.  It
is itself checked against ``semantics.attention`` in float64.
"""

from __future__ import annotations

import math

import torch

from attnpass import semantics


def rows_keys(
    s_q: int,
    s_k: int,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    batch: int,
    heads: int,
    device: torch.device,
) -> torch.Tensor:
    """``n_i`` as ``[B, H, S_q]`` float32, from the causal limit and the mask only (no scores needed)."""
    return semantics.keys_per_row((batch, heads, s_q, s_k), attn_mask, is_causal, device).to(torch.float32)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    ssmax_s: torch.Tensor | None = None,
    ssmax_b: torch.Tensor | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
    block_k: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, lse)``; ``lse`` is the log-sum-exp of the final logits per row (``-inf`` if none).

    Accumulates in float32 (float64 if the inputs are float64).
    """
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, s_q, d = q.shape
    s_k = k.shape[-2]
    if enable_gqa and k.shape[-3] != heads:
        rep = heads // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    k = k.expand(batch, heads, s_k, d)
    v = v.expand(batch, heads, s_k, v.shape[-1])
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.to(acc_dtype)
    factor = None
    if ssmax_s is not None:
        n = rows_keys(s_q, s_k, attn_mask, is_causal, batch, heads, q.device)
        factor = semantics.ssmax_factor(n.to(acc_dtype), ssmax_s.to(acc_dtype), None if ssmax_b is None else ssmax_b.to(acc_dtype))
        factor = factor.expand(batch, heads, s_q).unsqueeze(-1)
    mask = None if attn_mask is None else attn_mask.expand(batch, heads, s_q, s_k)
    m = torch.full((batch, heads, s_q, 1), float("-inf"), dtype=acc_dtype, device=q.device)
    l_sum = torch.zeros((batch, heads, s_q, 1), dtype=acc_dtype, device=q.device)
    acc = torch.zeros((batch, heads, s_q, v.shape[-1]), dtype=acc_dtype, device=q.device)
    rows = torch.arange(s_q, device=q.device).unsqueeze(-1) + (s_k - s_q)
    for start in range(0, s_k, block_k):
        stop = min(start + block_k, s_k)
        kb = k[..., start:stop, :].to(acc_dtype)
        vb = v[..., start:stop, :].to(acc_dtype)
        z = (qf @ kb.transpose(-2, -1)) * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        allowed = torch.ones_like(z, dtype=torch.bool)
        if is_causal:
            allowed = allowed & (torch.arange(start, stop, device=q.device) <= rows)
        if mask is not None:
            mb = mask[..., start:stop]
            if mb.dtype == torch.bool:
                allowed = allowed & mb
            else:
                keep = ~(mb <= semantics.MASKED_BELOW)  # NaN stays in (and propagates), as in semantics
                allowed = allowed & keep
                z = z + torch.where(keep, mb.to(acc_dtype), torch.zeros((), dtype=acc_dtype, device=q.device))
        if factor is not None:
            z = z * factor
        z = z.masked_fill(~allowed, float("-inf"))
        m_new = torch.maximum(m, z.amax(-1, keepdim=True))
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(z - safe)
        alpha = torch.exp(m - safe)
        l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p @ vb
        m = m_new
    has_keys = l_sum != 0  # not "> 0": a NaN sum is a row with keys, and its NaN must reach the output
    out = torch.where(has_keys, acc / torch.where(has_keys, l_sum, torch.ones_like(l_sum)), torch.zeros_like(acc))
    lse = torch.where(has_keys, m + torch.log(torch.where(has_keys, l_sum, torch.ones_like(l_sum))), torch.full_like(m, float("-inf")))
    return out.to(q.dtype), lse.squeeze(-1).to(torch.float32 if acc_dtype == torch.float32 else acc_dtype)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    ssmax_s: torch.Tensor | None,
    ssmax_b: torch.Tensor | None,
    softcap: float | None,
    enable_gqa: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for ``(q, k, v, attn_mask, ssmax_s, ssmax_b)`` of ``semantics.attention``.

    Written out by hand (no autograd): it runs inside ``attnpass::attention_backward``,
    where the dispatcher has switched autograd off, so it cannot recompute through
    ``semantics.attention`` and differentiate.  It materialises the scores in float32
    (float64 for float64 inputs): it is the oracle for the fused backward kernels, not
    a fast path.  Entries are None for a bool or absent mask and for absent ``s``/``b``.
    """
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, s_q, d = q.shape
    s_k = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf, gof = (t.to(acc_dtype) for t in (q, k, v, grad_out))
    rep = heads // k.shape[-3] if enable_gqa and k.shape[-3] != heads else 1
    if rep > 1:
        kf = kf.repeat_interleave(rep, dim=-3)
        vf = vf.repeat_interleave(rep, dim=-3)
    kf = kf.expand(batch, heads, s_k, d)
    vf = vf.expand(batch, heads, s_k, v.shape[-1])
    zero = torch.zeros((), dtype=acc_dtype, device=q.device)

    # Forward, materialised, in the order of semantics.attention.
    z = (qf @ kf.transpose(-2, -1)) * scale
    tanh_z = None
    if softcap is not None:
        tanh_z = torch.tanh(z / softcap)
        z = softcap * tanh_z
    allowed = semantics.allowed_keys((batch, heads, s_q, s_k), attn_mask, is_causal, q.device)
    float_mask = attn_mask is not None and attn_mask.is_floating_point()
    if float_mask:
        z = z + torch.where(allowed, attn_mask.to(acc_dtype), zero)
    factor = logn = None
    if ssmax_s is not None:
        n = allowed.sum(-1).to(acc_dtype)
        logn = torch.log(n.clamp_min(1.0))
        b = None if ssmax_b is None else ssmax_b.to(acc_dtype)
        factor = semantics.ssmax_factor(n, ssmax_s.to(acc_dtype), b).expand(batch, heads, s_q).unsqueeze(-1)
    logits = z if factor is None else z * factor
    logits = logits.masked_fill(~allowed, float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    p = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))

    # Backward: softmax, then each step above in reverse.
    dv = p.transpose(-2, -1) @ gof
    dp = gof @ vf.transpose(-2, -1)
    d_logits = p * (dp - (p * dp).sum(-1, keepdim=True))
    ds = db = None
    if factor is not None:
        d_factor = (d_logits * z).sum(-1)  # [B, H, S_q]
        ds = _per_head_sum(d_factor * logn, ssmax_s)
        if ssmax_b is not None:
            db = _per_head_sum(d_factor, ssmax_b)
        d_z = d_logits * factor
    else:
        d_z = d_logits
    dmask = torch.where(allowed, d_z, zero).sum_to_size(attn_mask.shape).to(attn_mask.dtype) if float_mask else None
    if tanh_z is not None:
        d_z = d_z * (1.0 - tanh_z * tanh_z)
    dq = (d_z @ kf) * scale
    dk = (d_z.transpose(-2, -1) @ qf) * scale
    if rep > 1:
        dk = dk.unflatten(-3, (heads // rep, rep)).sum(-3)
        dv = dv.unflatten(-3, (heads // rep, rep)).sum(-3)
    dk = dk.sum_to_size(k.shape)
    dv = dv.sum_to_size(v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask, ds, db


def _per_head_sum(grad_rows: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Reduce a ``[B, H, S_q]`` gradient to a per-head (``[H]``) or single ``s``/``b``."""
    dims = (0, 2) if param.numel() > 1 else (0, 1, 2)
    return grad_rows.sum(dims).reshape(param.shape).to(param.dtype)


def softmax_topk(x: torch.Tensor, k: int, dim: int = -1, renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, indices)``: the ``k`` largest entries of ``softmax(x, dim)``, the oracle for the fused kernels.

    Selection is made on the logits (softmax is monotone, so it is the same set as on the
    probabilities, without the ties that rounding the probabilities can create) by a stable
    descending sort: NaN ranks above every number, as in ``torch.topk``, and among equal
    values the lower index comes first, a deterministic rule that every kernel follows
    (``torch.topk``'s own order among ties is unspecified).  ``probs`` is
    ``exp(x_i - logsumexp(x))`` computed in float32 (float64 for float64 input), with
    ``renormalize`` divided by their sum (Mixtral's router weights), as eager code does.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    indices = torch.sort(xf, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    picked = xf.gather(dim, indices)
    probs = torch.exp(picked - torch.logsumexp(xf, dim, keepdim=True))
    if renormalize:
        probs = probs / probs.sum(dim, keepdim=True)
    return probs.to(x.dtype), indices


def softmax_topk_backward(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, dim: int = -1,
                          renormalize: bool = False) -> torch.Tensor:
    """``dL/dx`` for ``softmax_topk`` given ``dL/dprobs``; the probabilities are recomputed from ``x`` in float32.

    Without renormalisation ``p_j = exp(x_j - lse)`` gives ``dx = scatter(g * p) - softmax(x) * sum(g * p)``
    (every entry of the row moves the normaliser); with it the weights depend on the selected
    logits only, so ``dx`` is ``w * (g - sum(g * w))`` at the indices and 0 elsewhere.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, gf = x.to(acc), grad.to(acc)
    picked = xf.gather(dim, indices)
    if renormalize:
        w = torch.softmax(picked, dim)
        return torch.zeros_like(xf).scatter(dim, indices, w * (gf - (gf * w).sum(dim, keepdim=True))).to(x.dtype)
    lse = torch.logsumexp(xf, dim, keepdim=True)
    p = torch.exp(picked - lse)
    dx = -torch.exp(xf - lse) * (gf * p).sum(dim, keepdim=True)
    return dx.scatter_add(dim, indices, gf * p).to(x.dtype)
