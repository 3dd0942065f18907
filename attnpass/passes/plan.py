"""One rewrite plan per site and target: what an emitter must build, decided once for every IR.

``RewriteSpec`` (``attnpass.spec``, re-exported here) is the request (``to``, ``s``/``b``/``train_len``,
fused SSMax, ONNX target), resolved in one place (``RewriteSpec.resolve``).  ``plan_for(site, spec, caps, adapter)`` turns a frozen ``AttentionSite`` into a ``Plan``: the
action (fuse, fuse with SSMax, SSMax in place, or leave with the reason), which mask terms make a key
attendable, what a fused op's mask carries, which guards are emitted, which bias terms SSMax scales, and
how ``n`` (keys per row) is counted from the masks' own small factors.  ``Capabilities`` is what an
emitter declares it can express; the per-target blockers that used to live in each emitter are plan
logic here.  Emitters translate a plan into their IR and decide nothing about masks, causality or ``n``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Any

from attnpass.passes import relatives
from attnpass.passes.kinds import Adapter, Kind
from attnpass.passes.masks import MaskProofs
from attnpass.passes.site import AttentionSite, Form, Guard, GuardKind, MaskKind, MaskRole, MaskTerm, Operand
from attnpass.semantics import MASKED_BELOW
from attnpass.spec import ONNX_TARGETS, RewriteSpec

#: The fused ONNX ops a plan can target (re-exported: emitters and tests import them from here).
TARGETS = ONNX_TARGETS


class Action(enum.StrEnum):
    FUSE = "fuse"  # one fused attention op
    SSMAX_FUSED = "ssmax_fused"  # one fused attention op with the SSMax factor
    SSMAX = "ssmax"  # SSMax where the site stands (softmax chain or fused op kept)
    LEAVE = "leave"  # nothing emitted; ``Plan.reason`` says why


@dataclass(frozen=True)
class Capabilities:
    """What an emitter can express.  A plan never asks an emitter for more."""

    refuse_fused_ops: bool = True  # re-emit an already-fused op (fx: the attnpass op replaces SDPA)
    softcap: bool = True  # a fused op with soft-capping
    ssmax_softcap_fused: bool = True  # SSMax factor inside a soft-capping fused op
    is_causal: bool = True  # a fused op's bottom-right ``is_causal`` (else causal terms stay in the mask)
    scores_rank3: bool = True  # rank-3 scores (heads folded into the batch)
    any_rank: bool = True  # scores of rank other than 3 and 4 (lifted to rank 4)
    static_heads: bool = False  # the fused op needs the head count as a number
    empty_rows_zero: bool = False  # the fused op gives 0 for a row with no attendable key
    factor_on_q: bool = False  # SSMax may scale Q instead of the scores (the emitter checks the IR too)
    count_keys: bool = True  # the emitter counts n itself from the plan's factors (fx: semantics does it)
    grouped_kv: bool = True  # the fused op takes fewer K/V heads than query heads (GQA, multi-query)
    head_views: bool = False  # lays out a mask added in a [B, H, S_q, S_k] view of [B*H, S_q, S_k] scores
    dynamic_head_views: bool = False  # ... also where the view's batch or lengths are symbolic (dynamic shapes)
    # a mask term that holds the causal constraint and others (``and(key <= query, padding)``) reaches a causal
    # fused op as its other factors only (the op tests ``key <= query`` on indices; no S x S mask is read)
    split_causal: bool = False


class FactorClass(enum.StrEnum):
    """How a factor of the "attendable" conjunction is counted per row."""

    CAUSAL = "causal"  # proven ``key <= query``: a Range
    KEYS = "keys"  # no query axis (padding): a reduction over keys
    ROW = "row"  # no key axis: a per-row flag, all keys or none
    GENERAL = "general"  # both axes (windows, arbitrary masks): counted on its own shape


@dataclass(frozen=True, eq=False)
class KeepTerm:
    """Where ``value`` leaves a key attendable: ``value == attend_when`` (bool), or ``value * coeff > MASKED_BELOW``."""

    value: Any
    kind: MaskKind
    attend_when: bool = True
    coeff: float = 1.0
    term: MaskTerm | None = None  # the site's term it comes from (None: a fused op's mask input)
    view: tuple[int, ...] | None = None  # the term's ``MaskTerm.view``: the emitter lays ``value`` out on the scores


@dataclass(frozen=True, eq=False)
class Factor:
    """One conjunct of "attendable", with how it is counted and its rank (None: unknown)."""

    keep: KeepTerm
    cls: FactorClass
    rank: int | None


@dataclass(frozen=True)
class KeyPlan:
    """How to count ``n`` per row: the factors by class, plus a fused op's own ``is_causal``."""

    factors: tuple[Factor, ...]
    causal_op: bool = False

    def of(self, cls: FactorClass) -> tuple[Factor, ...]:
        return tuple(f for f in self.factors if f.cls is cls)

    @property
    def method(self) -> str:
        """``length`` / ``keys`` / ``causal`` / ``causal+keys`` / ``mask`` / ``full`` (what the note names)."""
        general = self.of(FactorClass.GENERAL)
        if general:
            ranks = [f.rank for f in general + self.of(FactorClass.KEYS) + self.of(FactorClass.CAUSAL)]
            return "full" if any(r is None for r in ranks) else "mask"
        keys = bool(self.of(FactorClass.KEYS))
        causal = bool(self.of(FactorClass.CAUSAL)) or self.causal_op
        return ("causal+keys" if keys else "causal") if causal else ("keys" if keys else "length")


@dataclass(frozen=True)
class Plan:
    """What an emitter builds for one site (see the module docstring)."""

    site: AttentionSite
    action: Action
    reason: str | None = None  # LEAVE: why; SSMAX on a fuse request: why it was not fused
    s: float | None = None
    b: float | None = None
    scale: float | None = None
    factor_on_q: bool = False  # SSMax factor multiplies Q (else the scores)
    keep_terms: tuple[KeepTerm, ...] = ()  # all terms: a key is attendable where every one keeps it
    op_mask_additive: tuple[KeepTerm, ...] = ()  # summed into the fused op's mask (value * coeff)
    op_mask_bool: tuple[KeepTerm, ...] = ()  # applied to the fused op's mask as "masked"
    causal: bool = False  # the fused op's is_causal
    guards: tuple[Guard, ...] = ()  # emitted after the op
    softcap: float | None = None
    bias_terms: tuple[MaskTerm, ...] = ()  # additive logits bias that SSMax scales with the factor
    keys: KeyPlan | None = None  # SSMax only
    fused_mask_bias: bool = False  # a fused op's additive mask input holds logits SSMax must scale
    finite_fill: bool = False  # every mask term masks with a finite value: a fully masked row is the mean of V
    op_mask: KeepTerm | None = None  # a fused op's own mask input (bool or additive), as a keep term
    # times each head of the K / V operand (its repetition peeled) is repeated before a fused op that needs as
    # many K/V heads as query heads (``Capabilities.grouped_kv`` False); 1: the op reads them as they are
    k_repeat: int = 1
    v_repeat: int = 1
    # the fused op's head count: the site's, or 1 for rank-3 scores (heads folded into the batch, as ``bmm``
    # attention writes it): the op then sees ``[B*H, 1, S, D]`` and every mask term gets that unit head axis
    heads: Any = None
    # the relative of SSMax already on Q (``passes/relatives.Relative``) the emitter removes first, and what
    # the report says about it (the fit of its factor when ``fit_existing``)
    replaces: Any = None
    replace_note: str | None = None

    @property
    def is_causal_op(self) -> bool:
        """The site is a fused op that applies its own top-left ``is_causal`` and SSMax keeps that op.

        An emitter that leaves the op in place (SSMax on its Q) keeps the flag as it is; the emitter never
        reads the site's fields to find it.
        """
        return self.action is Action.SSMAX and self.site.form is Form.FUSED_OP and self.site.sdpa_is_causal

    @property
    def sdpa_causal_as_mask(self) -> bool:
        """An SDPA call's ``is_causal`` reaches ``attnpass::attention`` as an explicit mask.

        SDPA aligns ``is_causal`` top-left, ``attnpass::attention`` (like FlashAttention) bottom-right:
        the flag carries over only when ``S_q`` and ``S_k`` are provably the same size; otherwise the emitter
        passes SDPA's own mask (``semantics.sdpa_causal_mask``), exact at any sizes.
        """
        site = self.site
        return site.form is Form.FUSED_OP and site.sdpa_is_causal and not same_size(site.seq_q, site.seq_k)


def same_size(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same size for every input: equal integers, or the same symbol (``s0`` and ``s0``)."""
    if a is None or b is None:
        return False
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return a is b or (not isinstance(a, int) and not isinstance(b, int) and str(a) == str(b))


def plan_for(site: AttentionSite, spec: RewriteSpec, caps: Capabilities, adapter: Adapter) -> Plan:
    """The plan of ``site`` for a resolved ``spec`` on an emitter with ``caps``."""
    why_not_fused = _fuse_blocker(site, spec, caps) if spec.to == "fused" else "SSMax requested"
    if spec.to == "fused" and why_not_fused is None:
        action = Action.SSMAX_FUSED if spec.fused_ssmax else Action.FUSE
    elif spec.ssmax:
        action = Action.SSMAX if _ssmax_blocker(site, caps) is None else Action.LEAVE
    else:
        action = Action.LEAVE
    reason = why_not_fused if spec.to == "fused" else None
    if action is Action.LEAVE and spec.ssmax:
        why = _ssmax_blocker(site, caps)
        reason = why if reason is None else f"{reason}; SSMax not applied: {why}"
    elif action is Action.SSMAX and spec.to == "fused":
        reason = f"{reason} ({'SSMax applied unfused' if site.form is Form.EXPLICIT else 'SSMax applied to its Q'})"
    s, b, replaces, replace_note = spec.s, spec.b, None, None
    if site.relative is not None and action in (Action.SSMAX, Action.SSMAX_FUSED):
        action, reason, s, b, replaces, replace_note = _existing_scaling(site, spec, action, reason)
    fused = action in (Action.FUSE, Action.SSMAX_FUSED)
    causal = fused and caps.is_causal and site.causal
    keep = tuple(_keep(m) for m in site.masks)
    add = tuple(k for k in keep if k.kind is MaskKind.ADDITIVE and not (causal and k.term.only_causal))
    boolean = tuple(k for k in keep if k.kind is MaskKind.BOOL and not (causal and k.term.only_causal))
    if causal and caps.split_causal:
        add, boolean = _without_causal_factor(add + boolean, adapter)
    dropped = {GuardKind.NAN} | ({GuardKind.NO_KEY} if fused and caps.empty_rows_zero else set())
    uses_ssmax = action in (Action.SSMAX, Action.SSMAX_FUSED)
    return Plan(
        site=site, action=action, reason=reason,
        s=s if uses_ssmax else None, b=b if uses_ssmax else None, scale=site.scale, replaces=replaces, replace_note=replace_note,
        factor_on_q=uses_ssmax and caps.factor_on_q and site.softcap is None and site.q.perm is None,
        keep_terms=keep, op_mask_additive=add, op_mask_bool=boolean, causal=causal,
        guards=tuple(g for g in site.guards if g.kind not in dropped), softcap=site.softcap,
        bias_terms=tuple(m for m in site.masks if m.kind is MaskKind.ADDITIVE and m.role is MaskRole.BIAS),
        keys=key_plan(site, adapter) if uses_ssmax and caps.count_keys else None,
        fused_mask_bias=uses_ssmax and _fused_mask_is_bias(site, adapter),
        finite_fill=fused and bool(site.masks) and all(_finite_fill(m, adapter) for m in site.masks),
        op_mask=_op_mask(site, adapter),
        heads=_op_heads(site),
        k_repeat=1 if caps.grouped_kv or not fused else _repeat_to_heads(site, site.k, adapter),
        v_repeat=1 if caps.grouped_kv or not fused else _repeat_to_heads(site, site.v, adapter),
    )


def _without_causal_factor(terms: tuple[KeepTerm, ...], adapter: Adapter) -> tuple[tuple[KeepTerm, ...], ...]:
    """(additive, bool) terms for a causal fused op: a term that contains the causal constraint becomes its other factors.

    The exporters' ``where(and(key <= query, padding[B, 1, 1, S_k]), 0, finfo.min)`` is ``[B, 1, S, S]``; what the op
    still needs from it is the padding factor, ``O(B * S)``.  A term is split only where exactly one of its factors
    is proven causal (``_Splitter``); otherwise it stays whole (the op then reads it tile by tile).
    """
    out: list[KeepTerm] = []
    for k in terms:
        if k.term is None or not k.term.causal or k.term.only_causal:
            out.append(k)
            continue
        split = _Splitter(adapter)
        split.view = k.view
        if k.kind is MaskKind.BOOL:
            split.add_bool(k.value, k.attend_when)
        else:
            split.add_additive(k.value, k.coeff)
        factors = split.plan(causal_op=False).factors
        if sum(f.cls is FactorClass.CAUSAL for f in factors) != 1:
            out.append(k)
            continue
        out.extend(f.keep for f in factors if f.cls is not FactorClass.CAUSAL)
    return (tuple(k for k in out if k.kind is MaskKind.ADDITIVE), tuple(k for k in out if k.kind is MaskKind.BOOL))


def _existing_scaling(site: AttentionSite, spec: RewriteSpec, action: Action, reason: str | None) -> tuple:
    """SSMax on a Q that already carries a relative: refused (scaling twice), or that scaling replaced.

    ``fit_existing`` starts SSMax where the old factor was: ``(s, b)`` of the least-squares fit of
    ``s log(p + 1) + b`` to it over ``fit_len`` positions (``relatives.fit_ssmax``)."""
    rel = site.relative
    if not spec.replace_existing:
        why = (f"q is already scaled by {rel.describe()}: SSMax on top would scale attention twice "
               "(replace_existing=True / --replace-existing replaces that scaling)")
        return Action.LEAVE, why if reason is None else f"{reason}; {why}", spec.s, spec.b, None, None
    s, b, note = spec.s, spec.b, f"replaced {rel.describe()} by SSMax"
    if spec.fit_existing and rel.family != "ssmax":
        try:
            positions = relatives.fit_positions(rel, spec.fit_len)
            s, b, rms, worst = relatives.fit_ssmax(rel, positions)
        except ValueError as e:
            return Action.LEAVE, f"cannot fit SSMax to {rel.describe()}: {e}", spec.s, spec.b, None, None
        note += (f" fitted over positions 0..{len(positions) - 1}: s={s:.6g}, b={b:.6g} "
                 f"(rms error {rms:.3g}, max {worst:.3g})")
    return action, reason, s, b, rel, note


def _op_heads(site: AttentionSite) -> Any:
    """The head count a fused op is given (see ``Plan.heads``)."""
    return 1 if site.out_rank == 3 and site.form is Form.EXPLICIT else site.heads


def _repeat_to_heads(site: AttentionSite, op: Operand, adapter: Adapter) -> int:
    """How often each head of ``op`` must repeat to match the query heads.

    Counted from the operand's own head count, so a multi-query K/V (one head, broadcast by the matmul rather
    than repeated) is repeated too; where a count is unknown, the repetition the matcher peeled.
    """
    shape = adapter.shape(op.value)
    if shape is None or len(shape) != 4 or not isinstance(site.heads, int):
        return op.groups
    if op.perm is not None:
        shape = [shape[i] for i in op.perm]
    h = shape[-3]
    if not isinstance(h, int) or h <= 0 or site.heads % h:
        return op.groups
    return site.heads // h


def _op_mask(site: AttentionSite, adapter: Adapter) -> KeepTerm | None:
    """A fused op's ``attn_mask`` as a keep term: bool keeps where True, additive where above ``MASKED_BELOW``."""
    if site.form is not Form.FUSED_OP or site.sdpa_mask is None:
        return None
    kind = MaskKind.BOOL if _is_bool(adapter, site.sdpa_mask) else MaskKind.ADDITIVE
    return KeepTerm(site.sdpa_mask, kind)


def _finite_fill(m: MaskTerm, adapter: Adapter) -> bool:
    """True if ``m`` masks with a known, finite value (``finfo.min``, not ``-inf``).

    The original softmax of a row whose every key is masked that way is uniform (its output is the mean
    of V), where a fused op gives 0: the emitter puts the mean back (the numerics contract).
    """
    proofs = MaskProofs(adapter)
    node, kind = (m.node, adapter.kind(m.node)) if m.kind is MaskKind.BOOL else (None, Kind.OTHER)
    if m.kind is MaskKind.ADDITIVE:
        v = m.value
        for _ in range(8):
            node, kind = proofs._producer_kind(v)
            if kind not in (Kind.CAST, Kind.IDENTITY, Kind.EXPAND):
                break
            v = proofs._in(node)
    if node is None or kind is not Kind.WHERE:
        return False
    fills = [adapter.constant(x) for x in adapter.inputs(node)[1:3]]
    masked = [f for f in fills if f is not None and f <= MASKED_BELOW]
    return len(masked) == 1 and math.isfinite(masked[0])


def _fused_mask_is_bias(site: AttentionSite, adapter: Adapter) -> bool:
    """A fused op's float mask input, classified like a site's additive term (hard mask vs logits bias)."""
    if site.form is not Form.FUSED_OP or site.sdpa_mask is None or _is_bool(adapter, site.sdpa_mask):
        return False
    term = MaskTerm(MaskKind.ADDITIVE, site.sdpa_mask, site.softmax)
    return MaskProofs(adapter)._role(term) is MaskRole.BIAS


def _fuse_blocker(site: AttentionSite, spec: RewriteSpec, caps: Capabilities) -> str | None:
    """Why ``site`` cannot become one fused op on this emitter (None: it can)."""
    if site.form is Form.FUSED_OP and not caps.refuse_fused_ops:
        return "already fused"
    if site.fuse_blocker:
        return site.fuse_blocker
    if _view_blocker(site, caps):
        return _view_blocker(site, caps)
    if site.form is Form.FUSED_OP:
        return None
    if site.softcap is not None and not caps.softcap:
        return "soft-capping: com.microsoft.MultiHeadAttention has no softcap (use --target onnx23)"
    if caps.static_heads and not isinstance(_op_heads(site), int):
        return "the number of heads is not known statically"
    if site.q.rank not in (3, 4) and not caps.any_rank or site.q.rank == 3 and not caps.scores_rank3:
        return f"scores of rank {site.out_rank}: heads are not a separate axis"
    if spec.fused_ssmax and site.softcap is not None and not caps.ssmax_softcap_fused:
        return "soft-capping with SSMax: the factor multiplies the capped scores, a pre-scaled Q would be capped too"
    return None


def laid_out_shape(shape: Any, view: tuple[int, ...] | None) -> Any:
    """A mask's shape on the scores: a head-view mask (``MaskTerm.view``) becomes ``[B*H or 1, S_q or 1, S_k or 1]``
    (broadcast over the view's batch and heads only where it varies there, then folded as the scores are)."""
    if view is None or shape is None:
        return shape
    pad = (1,) * (4 - len(shape)) + tuple(shape)
    folded = view[0] * view[1] if isinstance(view[0], int) else f"{view[1]}*{view[0]}"
    return (1 if _unit(pad[0]) and _unit(pad[1]) else folded, pad[2], pad[3])


def _unit(d: Any) -> bool:
    """A size known to be 1 (a symbolic size is not)."""
    return isinstance(d, int) and d == 1


def _view_blocker(site: AttentionSite, caps: Capabilities) -> str | None:
    """A mask added in a head view of 3-D scores, on an emitter that cannot lay it out (None: none, or it can)."""
    views = [m.view for m in site.masks if m.view]
    if not views:
        return None
    if caps.head_views and (caps.dynamic_head_views or all(isinstance(d, int) for v in views for d in v)):
        return None
    if caps.head_views:
        return ("a mask added in a [B, H, S_q, S_k] view of [B*H, S_q, S_k] scores with dynamic sizes is not laid out on "
                "the scores by this rewrite yet (export with static shapes)")
    return "a mask added in a [B, H, S_q, S_k] view of [B*H, S_q, S_k] scores is not laid out on the scores by this rewrite yet"


def _ssmax_blocker(site: AttentionSite, caps: Capabilities) -> str | None:
    return site.ssmax_blocker or _view_blocker(site, caps)


def _keep(m: MaskTerm) -> KeepTerm:
    return KeepTerm(m.value, m.kind, m.attend_when, m.coeff, m, m.view)


# ------------------------------------------------------------------ counting keys per row

def key_plan(site: AttentionSite, adapter: Adapter) -> KeyPlan:
    """The factors ``n`` is counted from: the site's masks (or a fused op's mask and ``is_causal``)."""
    split = _Splitter(adapter)
    if site.form is Form.FUSED_OP:
        if site.sdpa_mask is not None:
            if _is_bool(adapter, site.sdpa_mask):
                split.add_bool(site.sdpa_mask, True)
            else:
                split.add_additive(site.sdpa_mask, 1.0)
        return split.plan(causal_op=site.sdpa_is_causal)
    for m in site.masks:
        split.view = m.view
        if m.kind is MaskKind.BOOL:
            split.add_bool(m.value, m.attend_when)
        else:
            split.add_additive(m.value, m.coeff)
    return split.plan(causal_op=False)


def _is_bool(adapter: Adapter, v: Any) -> bool:
    ask = getattr(adapter, "is_bool", None)
    return bool(ask(v)) if ask is not None else False


class _Splitter(MaskProofs):
    """Splits "attendable" into the small factors masks are built from, through the adapter's kinds.

    Exporters build a mask as ``where(and(key <= query, padding[B, 1, 1, S_k]), 0, finfo.min)`` and
    broadcast it to ``[B, H, S_q, S_k]`` only when it meets the scores; counting on the factors costs
    ``O(B * S)`` where the broadcast tensor costs an ``S x S`` pass per head.
    """

    def __init__(self, adapter: Adapter):
        super().__init__(adapter)
        self.leaves: list[KeepTerm] = []
        self.view: tuple[int, ...] | None = None  # the head view of the term being split (``MaskTerm.view``)

    def add_bool(self, v: Any, attend_when: bool) -> None:
        self._conjuncts(v, attend_when, 0)

    def add_additive(self, v: Any, coeff: float) -> None:
        """A pure ``where(cond, 0, very negative)`` splits into ``cond``'s factors; anything else is one leaf."""
        src = v
        for _ in range(8):
            node, kind = self._producer_kind(src)
            if kind in (Kind.CAST, Kind.IDENTITY, Kind.EXPAND):
                src = self._in(node)
                continue
            if kind is Kind.WHERE and coeff > 0:
                cond, xa, xb = self.a.inputs(node)[:3]
                ca, cb = self._const(xa), self._const(xb)
                if ca == 0 and cb is not None and cb * coeff <= MASKED_BELOW:
                    return self.add_bool(cond, True)
                if cb == 0 and ca is not None and ca * coeff <= MASKED_BELOW:
                    return self.add_bool(cond, False)
            break
        self.leaves.append(KeepTerm(v, MaskKind.ADDITIVE, True, coeff, view=self.view))

    def _conjuncts(self, v: Any, aw: bool, depth: int) -> None:
        c = self._const(v)
        if c is not None and (c != 0) == aw and self.a.static_value(v) is not None:
            return  # attendable everywhere: no constraint
        node, kind = self._producer_kind(v)
        if depth < 32:
            if kind is Kind.AND and aw or kind is Kind.OR and not aw:
                for x in self.a.inputs(node)[:2]:
                    self._conjuncts(x, aw, depth + 1)
                return
            if kind is Kind.NOT:
                return self._conjuncts(self._in(node), not aw, depth + 1)
            if kind in (Kind.EXPAND, Kind.IDENTITY) or kind is Kind.CAST and _is_bool(self.a, self._in(node)):
                return self._conjuncts(self._in(node), aw, depth + 1)  # a broadcast keeps each row's count
        if aw and self.all_true(v):
            return
        self.leaves.append(KeepTerm(v, MaskKind.BOOL, aw, view=self.view))

    def plan(self, causal_op: bool) -> KeyPlan:
        factors: list[Factor] = []
        for leaf in self.leaves:
            shape = laid_out_shape(self.a.shape(leaf.value), leaf.view)
            rank = None if shape is None else len(shape)
            if leaf.kind is MaskKind.BOOL and self.proves_causal(leaf.value, leaf.attend_when):
                cls = FactorClass.CAUSAL
            elif shape is not None and (len(shape) < 2 or shape[-2] == 1):
                cls = FactorClass.KEYS
            elif shape is not None and shape[-1] == 1:
                cls = FactorClass.ROW
            else:
                cls = FactorClass.GENERAL
            factors.append(Factor(leaf, cls, rank))
        if sum(f.cls is FactorClass.CAUSAL for f in factors) + causal_op > 1:
            # two causal constraints (aligned differently?): counted jointly
            factors = [replace(f, cls=FactorClass.GENERAL) if f.cls is FactorClass.CAUSAL else f for f in factors]
        return KeyPlan(tuple(factors), causal_op)


__all__ = ["Action", "RewriteSpec", "Capabilities", "FactorClass", "KeepTerm", "Factor", "KeyPlan", "Plan", "plan_for",
           "key_plan", "laid_out_shape", "TARGETS"]
