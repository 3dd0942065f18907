"""``torch.ops.attnpass.attention``: the fused attention op that rewrites target.

The op returns ``(out, lse)`` so that the backward can reuse the forward's log-sum-exp
instead of recomputing it (as ATen's own flash kernels do); the Python wrapper
``attention`` returns ``out`` only.  Registering through ``torch.library`` gives the op a
fake implementation (torch.compile, torch.export) and an autograd formula, so a
rewritten module trains, exports and compiles like the original.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnpass import kernels


@torch.library.custom_op("attnpass::attention", mutates_args=())
def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    ssmax_s: Tensor | None = None,
    ssmax_b: Tensor | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    _check(q, k, v, attn_mask, ssmax_s, ssmax_b, enable_gqa)
    backend = kernels.backend_for(q.device)
    out, lse = backend.attention_forward(q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa)
    # lse is float32 whatever the inputs (the fake says so); the reference keeps float64 internally.
    return out.contiguous(), lse.to(torch.float32).contiguous()


@_attention.register_fake
def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, ssmax_s=None, ssmax_b=None, softcap=None, enable_gqa=False):
    _check(q, k, v, attn_mask, ssmax_s, ssmax_b, enable_gqa)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnpass::attention_backward", mutates_args=())
def _attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    is_causal: bool,
    scale: float | None,
    ssmax_s: Tensor | None,
    ssmax_b: Tensor | None,
    softcap: float | None,
    enable_gqa: bool,
    need_mask_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    backend = kernels.backend_for(q.device)
    grads = backend.attention_backward(grad_out, q, k, v, attn_mask, out, lse, is_causal, scale, ssmax_s, ssmax_b, softcap,
                                       enable_gqa, need_mask_grad=need_mask_grad)
    if not need_mask_grad:
        grads = (*grads[:3], None, *grads[4:])
    # custom ops cannot return None: an absent gradient travels as an empty tensor.
    return tuple(g.contiguous() if g is not None else q.new_empty(0) for g in grads)


@_attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, attn_mask, out, lse, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa,
                             need_mask_grad=True):
    def like(t, wanted):
        return torch.empty_like(t) if t is not None and wanted else q.new_empty(0)

    mask_grad = attn_mask is not None and attn_mask.is_floating_point() and need_mask_grad
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        like(attn_mask, mask_grad), like(ssmax_s, True), like(ssmax_b, True),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa = inputs
    out, lse = output
    # lse is returned for reuse by the backward, not as a differentiable result: the
    # backward kernels take no gradient for it, so it must not pretend to have one.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, ssmax_s, ssmax_b)
    ctx.flags = (is_causal, scale, softcap, enable_gqa)
    # an HF padding mask needs no [B, H, S, S] gradient buffer
    ctx.mask_grad = attn_mask is not None and attn_mask.requires_grad


def _backward(ctx, grad_out, grad_lse):
    q, k, v, attn_mask, out, lse, ssmax_s, ssmax_b = ctx.saved_tensors
    is_causal, scale, softcap, enable_gqa = ctx.flags
    dq, dk, dv, dmask, ds, db = _attention_backward(
        grad_out.contiguous(), q, k, v, attn_mask, out, lse, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa,
        ctx.mask_grad,
    )

    def present(g, t):
        return g if t is not None and g.numel() == t.numel() and g.numel() > 0 else None

    return (dq, dk, dv, present(dmask, attn_mask), None, None, present(ds, ssmax_s), present(db, ssmax_b), None, None)


_attention.register_autograd(_backward, setup_context=_setup_context)


def _check(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, ssmax_s: Tensor | None, ssmax_b: Tensor | None, enable_gqa: bool) -> None:
    """Reject shapes the kernels would silently misread; messages name the argument and the shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attnpass.attention: {name} must be [B, H, S, D]; got {name}{tuple(t.shape)}")
    shapes = f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"attnpass.attention: k's head dim must equal q's; got {shapes}")
    if k.shape[-2] != v.shape[-2] or k.shape[1] != v.shape[1]:
        raise ValueError(f"attnpass.attention: v must have k's heads and sequence length; got {shapes}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"attnpass.attention: {name}'s batch must be 1 or q's; got {shapes}")
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk and not (enable_gqa and hk > 0 and hq % hk == 0) and hk != 1:
        raise ValueError(
            f"attnpass.attention: q has {hq} heads and k/v have {hk}; that needs enable_gqa=True and {hq} % {hk} == 0"
        )
    if ssmax_b is not None and ssmax_s is None:
        raise ValueError("attnpass.attention: ssmax_b given without ssmax_s (b is the SSMax offset; pass ssmax_s too)")
    for name, t in (("ssmax_s", ssmax_s), ("ssmax_b", ssmax_b)):
        if t is not None and t.numel() not in (1, hq):
            raise ValueError(f"attnpass.attention: {name} has {t.numel()} values; wants 1 or one per query head ({hq})")
    if attn_mask is not None:
        try:
            torch.broadcast_shapes(attn_mask.shape, (q.shape[0], hq, q.shape[2], k.shape[2]))
        except RuntimeError:
            raise ValueError(
                f"attnpass.attention: attn_mask{tuple(attn_mask.shape)} does not broadcast to [B, H, S_q, S_k] = "
                f"{[q.shape[0], hq, q.shape[2], k.shape[2]]}"
            ) from None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    ssmax_s: Tensor | None = None,
    ssmax_b: Tensor | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Fused attention with ``F.scaled_dot_product_attention``'s conventions, plus SSMax and soft-capping.

    ``ssmax_s``/``ssmax_b`` are per query head (``[H]``); ``n`` is counted per row from the
    causal limit and the mask.  See ``attnpass.semantics.attention`` for the exact meaning.
    """
    return torch.ops.attnpass.attention(q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa)[0]
