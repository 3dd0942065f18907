"""The site while the matcher builds it, and the one step that freezes it.

Freezing is where the decisions that hold for every IR are taken once: causal alignment, and what each
post-softmax guard is (NaN repair, "no attendable key", or a row zeroing the rewrite must keep).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from attnpass.passes.kinds import Adapter, Dim
from attnpass.passes.site import AttentionSite, Form, Guard, GuardKind, MaskTerm, Operand


@dataclass
class Draft:
    """The site while the walk fills it in (same field names as ``AttentionSite``); frozen by ``freeze``."""

    index: int
    name: str
    softmax: Any
    form: Form
    q: Operand
    k: Operand
    v: Operand
    out: Any
    out_rank: int
    out_perm: tuple[int, ...] | None = None
    scale: float | None = 1.0
    scale_on_q: float | None = None
    masks: list[MaskTerm] = field(default_factory=list)
    causal: bool = False
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_train: bool | None = False
    upcast: bool = False
    row_guards: list[tuple[Any, bool]] = field(default_factory=list)  # (cond, zero_when)
    nan_guards: list[Any] = field(default_factory=list)
    heads: Dim = None
    kv_heads: Dim = None
    head_dim: Dim = None
    seq_q: Dim = None
    seq_k: Dim = None
    probs_escape: str | None = None
    fuse_blocker: str | None = None
    nodes: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sdpa_mask: Any = None
    sdpa_is_causal: bool = False
    q_scales: list[tuple[Any, bool]] = field(default_factory=list)
    three_d: bool = False
    ssmax_blocker: str | None = None


def freeze(d: Draft, adapter: Adapter) -> AttentionSite:
    """The frozen site: causal alignment and post-softmax guards decided here, for every IR alike."""
    masks = tuple(d.masks)
    causal = d.causal
    top_left = bool(getattr(adapter, "fused_causal_top_left", False))
    if d.form is Form.EXPLICIT and d.seq_q != d.seq_k and not top_left and (causal or any(m.causal for m in masks)):
        # a causal mask proven from its construction is top-left aligned; torch's is_causal (fx, MLIR) is
        # bottom-right: they agree only when S_q == S_k (otherwise the mask stays explicit, still exact).
        # An IR whose fused ops align is_causal top-left (ONNX Attention) says so and keeps the proof.
        masks = tuple(replace(m, causal=False, only_causal=False) for m in masks)
        causal = False
    guards = [Guard(GuardKind.NAN, c) for c in d.nan_guards]
    notes = list(d.notes)
    no_key = getattr(adapter, "no_key_test", None)
    scores = adapter.inputs(d.softmax)[0] if d.form is Form.EXPLICIT else None
    for cond, zero_when in d.row_guards:
        if no_key is not None and scores is not None and no_key(cond, scores, zero_when, masks=tuple(m.value for m in masks)):
            guards.append(Guard(GuardKind.NO_KEY, cond, zero_when))
            notes.append("safe-softmax guard: implied (a row with no attendable key is 0)")
        else:
            guards.append(Guard(GuardKind.ROW, cond, zero_when))
    return AttentionSite(
        index=d.index, name=d.name, softmax=d.softmax, form=d.form, q=d.q, k=d.k, v=d.v, out=d.out,
        out_rank=d.out_rank, out_perm=d.out_perm, scale=d.scale, scale_on_q=d.scale_on_q, masks=masks,
        causal=causal, softcap=d.softcap, dropout_p=d.dropout_p, dropout_train=d.dropout_train, upcast=d.upcast,
        guards=tuple(guards), heads=d.heads, kv_heads=d.kv_heads, head_dim=d.head_dim, seq_q=d.seq_q,
        seq_k=d.seq_k, probs_escape=d.probs_escape, fuse_blocker=d.fuse_blocker, nodes=tuple(d.nodes),
        notes=tuple(notes), sdpa_mask=d.sdpa_mask, sdpa_is_causal=d.sdpa_is_causal, q_scales=tuple(d.q_scales),
        three_d=d.three_d, ssmax_blocker=d.ssmax_blocker,
    )
