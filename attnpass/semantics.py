"""The one definition of SSMax and of the attention the rest of attnpass rewrites into.

Every kernel, every IR rewrite and every test refers back to the functions here, so the
meaning of "SSMax attention" lives in exactly one place.  Conventions follow
``F.scaled_dot_product_attention``: tensors are ``[B, H, S, D]``, a boolean mask is True
where a key may be attended, an additive mask is added to the scores.  One difference: here a
causal mask with ``S_q < S_k`` is aligned bottom-right (the queries are the last rows of the keys,
as in a KV cache; FlashAttention's convention), while SDPA's ``is_causal`` is aligned top-left.
``ssmax_sdpa`` and ``sdpa_causal_mask`` speak SDPA's convention, for rewriting SDPA calls.

Masking is a hard constraint, not a score: an additive mask value at or below
``MASKED_BELOW`` (``-inf``, ``finfo.min``, the BERT-era ``-10000``) marks the key as not
attendable.  Finite additive values above it (ALiBi, T5 relative bias) are part of the
logits and are scaled by the SSMax factor like the rest of the logits.  This split is
what keeps a factor of 0 (``n = 1``, ``b = 0``) from turning ``-inf`` into NaN or
``finfo.min`` into an attended key.

This module imports nothing from attnpass; it is plain torch.
"""

from __future__ import annotations

import math

import torch

#: Additive mask values at or below this mark a key as not attendable.
MASKED_BELOW = -1.0e4

#: Default SSMax scale per head (the paper's learned values cluster around 0.43).
DEFAULT_S = 0.43


def s_for_train_len(train_len: int) -> float:
    """``s`` such that the SSMax factor is exactly 1 at the training length.

    Converting a pretrained model with this ``s`` (and ``b = 0``) leaves it unchanged for
    rows that see ``train_len`` keys and sharpens rows that see more.
    """
    if train_len < 2:
        raise ValueError(f"train_len must be >= 2 (log(1) = 0 gives no scale), got {train_len}")
    return 1.0 / math.log(train_len)


def ssmax_factor(n: torch.Tensor, s: torch.Tensor | float, b: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-row SSMax multiplier ``s_h * log(n_i) + b_h``, computed in float32 or wider.

    ``n`` is ``[..., H or 1, S_q]``; ``s`` and ``b`` are scalars or ``[H]``.  ``n`` is
    clamped to 1 so a fully masked row (``n = 0``) gives a finite factor; such a row's
    output is zero whatever the factor is.  ``log n`` is taken in fp32 (or fp64) because
    bf16 has too few bits to tell ``log 4000`` from ``log 4096``.
    """
    dtype = torch.float64 if n.dtype == torch.float64 else torch.float32
    logn = torch.log(n.to(dtype).clamp_min(1.0))
    s_t = torch.as_tensor(s, dtype=dtype, device=n.device)
    out = s_t.reshape(-1, 1) * logn if s_t.dim() == 1 else s_t * logn
    if b is not None:
        b_t = torch.as_tensor(b, dtype=dtype, device=n.device)
        out = out + (b_t.reshape(-1, 1) if b_t.dim() == 1 else b_t)
    return out


def causal_allowed(s_q: int, s_k: int, device: torch.device | None = None, top_left: bool = False) -> torch.Tensor:
    """Bool ``[S_q, S_k]``: key j visible to query i under a bottom-right causal mask (SDPA's top-left with
    ``top_left``; the two agree when ``S_q == S_k``)."""
    i = torch.arange(s_q, device=device).unsqueeze(-1)
    j = torch.arange(s_k, device=device)
    return j <= i + (0 if top_left else s_k - s_q)


def sdpa_causal_mask(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``[S_q, S_k]``: SDPA's ``is_causal`` (top-left: query i sees keys ``j <= i``) as a mask.

    A rewrite of an SDPA call whose ``S_q`` and ``S_k`` may differ passes this mask instead of the
    bottom-right ``is_causal`` of ``attnpass::attention``; the two agree only when ``S_q == S_k``.
    """
    return causal_allowed(q.shape[-2], k.shape[-2], q.device, top_left=True)


def allowed_keys(
    scores_shape: torch.Size | tuple[int, ...],
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Bool mask broadcast to ``scores_shape`` (``[B, H, S_q, S_k]``): which keys each row may attend."""
    s_q, s_k = scores_shape[-2], scores_shape[-1]
    allowed = torch.ones(scores_shape, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed & causal_allowed(s_q, s_k, device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            # ``not <=`` rather than ``>``: a NaN in the mask is not a masked key, so it
            # reaches the logits and the output instead of silently dropping the key.
            allowed = allowed & ~(attn_mask <= MASKED_BELOW)
    return allowed


def keys_per_row(
    scores_shape: torch.Size | tuple[int, ...],
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``n_i``: how many keys row i may attend, ``[B, H, S_q]`` (never the padded length)."""
    if attn_mask is None:
        s_q, s_k = scores_shape[-2], scores_shape[-1]
        if is_causal:
            n = (torch.arange(s_q, device=device) + (s_k - s_q + 1)).clamp(0, s_k)
        else:
            n = torch.full((s_q,), s_k, device=device)
        return n.expand(*scores_shape[:-1])
    return allowed_keys(scores_shape, attn_mask, is_causal, device).sum(-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    ssmax_s: torch.Tensor | float | None = None,
    ssmax_b: torch.Tensor | float | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Naive (materialising) attention with optional SSMax: the meaning of ``attnpass::attention``.

    Order of operations, which every rewrite must reproduce:
    ``z = scale * q k^T``; ``z = softcap * tanh(z / softcap)``; ``z = z + bias`` (the finite
    part of an additive mask); ``z = (s log n + b) * z`` (SSMax, if ``ssmax_s`` is given);
    masked keys are removed; ``softmax``; ``@ v``.  A row with no attendable key is 0.
    Differentiable in every tensor argument; computed in the inputs' dtype promoted to at
    least float32.
    """
    out_dtype = q.dtype
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(work), k.to(work), v.to(work)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    z = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    shape = torch.broadcast_shapes(z.shape, attn_mask.shape) if attn_mask is not None else z.shape
    allowed = allowed_keys(shape, attn_mask, is_causal, device=q.device)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        z = z + torch.where(allowed, attn_mask.to(work), torch.zeros((), dtype=work, device=q.device))
    if ssmax_s is not None:
        n = allowed.sum(-1).to(work)  # float64 inputs get log n in float64, not float32
        factor = ssmax_factor(n, _per_head(ssmax_s, work), None if ssmax_b is None else _per_head(ssmax_b, work))
        z = z * factor.to(work).unsqueeze(-1)
    z = z.masked_fill(~allowed, float("-inf"))
    row_max = z.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    p = torch.exp(z - row_max)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = p @ v
    # a row with no attendable key is 0 even if v holds NaN (0 * NaN would otherwise leak in)
    has_keys = allowed.any(-1, keepdim=True)
    return torch.where(has_keys, out, torch.zeros((), dtype=out.dtype, device=out.device)).to(out_dtype)


def _per_head(x: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Scalars stay scalars; ``[H]`` tensors keep their gradient while being cast."""
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)


def ssmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    s: torch.Tensor | float = DEFAULT_S,
    b: torch.Tensor | float | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scalable-Softmax attention (arXiv 2501.19399) with ``n`` counted per row from the masks."""
    return attention(q, k, v, attn_mask, is_causal, scale, s, b, softcap, enable_gqa)


def ssmax_logits(
    x: torch.Tensor,
    allowed: torch.Tensor | None,
    s: torch.Tensor | float,
    b: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """SSMax applied to a softmax input that already holds its masks (the explicit-graph rewrite).

    ``x`` is ``[..., H, S_q, S_k]`` scores with additive masks folded in; ``allowed`` says which
    keys are attendable (None: all).  Attendable logits are multiplied by the row's factor;
    the rest are pinned to ``finfo.min`` *after* the multiply, so no factor can unmask or NaN
    them, and a fully masked row stays as the original softmax treats a ``finfo.min`` row.
    """
    if allowed is None:
        n = torch.full(x.shape[:-1], x.shape[-1], dtype=torch.float32, device=x.device)
    else:
        allowed = allowed.expand(x.shape)
        n = allowed.sum(-1, dtype=torch.float32)
        # zero the masked logits before the product: -inf * dfactor would make the gradient NaN
        x = torch.where(allowed, x, torch.zeros((), dtype=x.dtype, device=x.device))
    factor = ssmax_factor(n, s, b).unsqueeze(-1)
    z = (x.to(factor.dtype) * factor).to(x.dtype)
    if allowed is None:
        return z
    return torch.where(allowed, z, torch.finfo(x.dtype).min)


def ssmax_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    s: torch.Tensor | float,
    b: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """SSMax on top of ``F.scaled_dot_product_attention`` through the per-row factor on Q.

    ``(f_i q_i) . k_j = f_i (q_i . k_j)``, so the fused kernel needs only a scaled Q.  A finite
    additive bias must be scaled by ``f_i`` too (it is part of the logits); masked entries keep
    their mask value, which SDPA adds after the product, so a factor of 0 unmasks nothing.
    """
    shape = (*q.shape[:-1], k.shape[-2])
    if is_causal and q.shape[-2] != k.shape[-2]:
        # SDPA's is_causal is top-left, ``keys_per_row``'s bottom-right: state SDPA's mask (SDPA takes
        # either a mask or is_causal, never both, so there is no mask to combine it with)
        attn_mask, is_causal = sdpa_causal_mask(q, k), False
    n = keys_per_row(shape, attn_mask, is_causal, device=q.device)
    factor = ssmax_factor(n, s, b).unsqueeze(-1)
    q = (q.to(factor.dtype) * factor).to(q.dtype)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        keep = attn_mask > MASKED_BELOW
        attn_mask = torch.where(keep, (attn_mask.to(factor.dtype) * factor).to(attn_mask.dtype), attn_mask)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
