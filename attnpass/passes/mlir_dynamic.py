"""Which unknown sizes the fused MLIR loop nest takes, and the reason it gives for the others.

A dynamic batch (``torch.export`` ``dynamic_shapes``, an ONNX ``dynamic_axes`` batch) prints as ``?`` in the
imported types.  The loop nest (``rewrite.mlir.fused``) reads unknown batch dims with ``tensor.dim`` of Q and runs
its parallel loop over them; inside, every tile is one head's, at static sizes.  So it needs S_q, S_k, the head dims
and the head count known (the head count also maps GQA heads and the per-head SSMax ``s``), and Q to carry every
unknown batch dim of the output; an ONNX ``Attention`` op only in its plain 4-D form.  Masks may have any unknown
size: they are settled against the scores' sizes, and read at index 0 along an unknown batch dim that is 1 at run
time.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnpass.passes.mlir_attention_op import is_attention_op, nonpad_kv_seqlen, past_kv, presents, qk_output
from attnpass.passes.site import AttentionSite

Shape = Sequence[int | None]


def _canonical(shape: Shape, perm: Sequence[int] | None, inverse: bool = False) -> tuple[int | None, ...]:
    """``shape.permute(perm)`` (the operand as ``[batch..., S, D]``), or its inverse for the output."""
    if perm is None:
        return tuple(shape)
    if not inverse:
        return tuple(shape[p] for p in perm)
    out: list[int | None] = [None] * len(shape)
    for c, p in enumerate(perm):
        out[p] = shape[c]
    return tuple(out)


def dynamic_blocker(site: AttentionSite) -> str | None:
    """None when the loop nest can take the site's unknown sizes (none, or only batch dims), else the reason."""
    shapes = [site.q.value.shape, site.k.value.shape, site.v.value.shape, site.out.shape]
    if all(d is not None for s in shapes for d in s):
        return None
    op = site.softmax if is_attention_op(site.softmax) else None
    if op is not None and (site.three_d or past_kv(op) or presents(op) or nonpad_kv_seqlen(op) is not None or qk_output(op)):
        return ("dynamic shapes: the MLIR fused rewrite of an ONNX Attention op with 3-D inputs, a KV cache, "
                "nonpad_kv_seqlen or qk_matmul_output needs static sizes")
    q, k, v = (_canonical(o.value.shape, o.perm) for o in (site.q, site.k, site.v))
    out = _canonical(site.out.shape, site.out_perm, inverse=True)
    if any(d is None for d in (*q[-2:], *k[-2:], *v[-2:], *out[-2:])):
        return "dynamic shapes: the MLIR fused rewrite needs static S_q, S_k and head dims (only batch dims may be unknown)"
    batch = out[:-2]
    if batch and batch[-1] is None and (len(batch) >= 2 or site.gqa or site.v.groups > 1):
        return "dynamic shapes: the MLIR fused rewrite needs a static head count (only batch dims may be unknown)"
    off = len(batch) + 2 - len(q)
    if any(size is None and (d < off or q[d - off] is not None) for d, size in enumerate(batch)):
        return "dynamic shapes: an unknown batch size of the output that Q does not carry"
    return None


__all__ = ["dynamic_blocker"]
