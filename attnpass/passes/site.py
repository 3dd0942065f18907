"""The typed, frozen model of one attention match: what the matcher proved, nothing an emitter decided.

A site is built once, by the matcher, and never changed afterwards: adapters answer questions while it
is built, plans (``passes/plan.py``) derive per-target decisions from it, and emitters report what they
did in their own results (``Report.with_notes`` gives a new report carrying those notes).  Keeping the
match immutable is what lets the same site be planned for several targets without one plan leaking
into another.

The enums are ``StrEnum``s so that code written against the old string tags (``site.form == "sdpa"``,
``m.kind == "bool"``) keeps working while callers move to the enum members.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

Dim = int | str | None  # a static size, a symbolic size (its expression as text), or unknown


class Form(enum.StrEnum):
    """How the attention is written: a softmax chain, or an op that already fuses it."""

    EXPLICIT = "explicit"
    FUSED_OP = "sdpa"


class MaskKind(enum.StrEnum):
    """``BOOL``: keys where ``value == attend_when`` stay.  ``ADDITIVE``: ``value * coeff`` is added to the scores."""

    BOOL = "bool"
    ADDITIVE = "additive"


class MaskRole(enum.StrEnum):
    """What a mask term does to the logits, decided once so SSMax and the fused op agree.

    ``HARD`` only removes keys (bool terms; additive terms holding only 0 and very negative values):
    it is never scaled.  ``BIAS`` carries finite logits (ALiBi, relative positions), which SSMax scales
    with the scores; it may also hold hard entries.
    """

    HARD = "hard"
    BIAS = "bias"


class GuardKind(enum.StrEnum):
    """A ``where(cond, 0, p)`` after the softmax.

    ``NAN`` (``where(isnan(p), 0, p)``) only repairs rows the fused op never produces: not emitted.
    ``NO_KEY`` zeroes rows with no attendable key, which fused kernels that return 0 there imply.
    ``ROW`` is another per-row zeroing the rewrite must keep.
    """

    NAN = "nan"
    NO_KEY = "no_key"
    ROW = "row"


@dataclass(frozen=True, eq=False)
class Operand:
    """Where the op finds q, k or v: ``value`` (lifted to rank 4 by unsqueezing leading dims), an optional
    permutation to reach ``[B, H, S, D]`` (einsum layouts), and whether it holds ``K^T``."""

    value: Any
    rank: int
    perm: tuple[int, ...] | None = None
    transposed: bool = False
    groups: int = 1


@dataclass(frozen=True, eq=False)
class MaskTerm:
    """One masking or bias step between ``Q K^T`` and the softmax.

    ``causal`` says the term was proven to contain the causal constraint (top-left aligned, and trusted
    only when ``S_q == S_k``); ``only_causal`` that it is nothing else (a fused op then takes
    ``is_causal=True`` and no mask for it).
    """

    kind: MaskKind
    value: Any
    node: Any
    coeff: float = 1.0
    attend_when: bool = True
    role: MaskRole = MaskRole.HARD
    causal: bool = False
    only_causal: bool = False
    causal_offset: Any = None
    # fairseq / MBart: added in this [B, H, S_q, S_k] view of [B*H, S_q, S_k] scores (None: on the scores)
    view: tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class Guard:
    """A post-softmax zeroing: ``where(cond, 0, p)`` when ``zero_when`` (else ``where(cond, p, 0)``)."""

    kind: GuardKind
    cond: Any
    zero_when: bool = True


@dataclass(frozen=True)
class FusedOpInfo:
    """What only a fused op's own IR knows (head counts as attributes, a 3-D layout); None: keep the matcher's."""

    heads: Dim = None
    kv_heads: Dim = None
    head_dim: Dim = None
    seq_q: Dim = None
    seq_k: Dim = None
    softcap: float | None = None
    three_d: bool = False
    op_name: str | None = None
    notes: tuple[str, ...] = ()
    ssmax_blocker: str | None = None  # why SSMax cannot scale this op's Q from outside


@dataclass(frozen=True, eq=False)
class AttentionSite:
    """One softmax-in-attention, as found: what plans and emitters read and what the report shows."""

    index: int
    name: str
    softmax: Any
    form: Form
    q: Operand
    k: Operand
    v: Operand
    out: Any  # the value the rewrite replaces (same rank as the scores)
    out_rank: int
    out_perm: tuple[int, ...] | None = None
    scale: float | None = 1.0
    scale_on_q: float | None = None
    masks: tuple[MaskTerm, ...] = ()
    causal: bool = False
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_train: bool | None = False
    upcast: bool = False
    guards: tuple[Guard, ...] = ()
    heads: Dim = None
    kv_heads: Dim = None
    head_dim: Dim = None
    seq_q: Dim = None
    seq_k: Dim = None
    probs_escape: str | None = None
    fuse_blocker: str | None = None
    nodes: tuple[Any, ...] = ()
    notes: tuple[str, ...] = ()
    sdpa_mask: Any = None
    sdpa_is_causal: bool = False
    q_scales: tuple[tuple[Any, bool], ...] = ()  # run-time scalars or [.., 1, 1] tensors, applied to q (value, divide)
    three_d: bool = False  # a fused op taking [B, S, H*D] (heads in its attributes)
    ssmax_blocker: str | None = None
    relative: Any = None  # passes/relatives.Relative: a query scaling SSMax would stack on

    @property
    def row_guards(self) -> tuple[tuple[Any, bool], ...]:
        """The guards a rewrite must keep emitting, as ``(cond, zero_when)``."""
        return tuple((g.cond, g.zero_when) for g in self.guards if g.kind is GuardKind.ROW)

    @property
    def gqa(self) -> bool:
        return self.k.groups > 1 or (self.heads is not None and self.kv_heads is not None and self.heads != self.kv_heads)

    @property
    def mask_kind(self) -> str:
        kinds = sorted({str(m.kind) for m in self.masks if not m.only_causal})
        if self.form is Form.FUSED_OP and self.sdpa_mask is not None:
            kinds.append("sdpa-mask")
        return "+".join(kinds) if kinds else "none"

    @property
    def fusable(self) -> bool:
        return self.fuse_blocker is None

    def with_notes(self, notes: Sequence[str]) -> AttentionSite:
        """A copy with ``notes`` appended (what an emitter did); the site itself stays as found."""
        return replace(self, notes=self.notes + tuple(notes)) if notes else self

    def summary(self) -> dict[str, Any]:
        """Plain-data view for tables and JSON (what users and tests read)."""
        return {
            "index": self.index,
            "node": self.name,
            "form": str(self.form),
            "scale": None if self.scale is None else round(self.scale, 8),
            "scale_on_q": self.scale_on_q,
            "mask": self.mask_kind,
            "causal": self.causal,
            "softcap": self.softcap,
            "dropout": self.dropout_p,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "gqa": self.gqa,
            "head_dim": self.head_dim,
            "seq_q": self.seq_q,
            "seq_k": self.seq_k,
            "upcast": self.upcast,
            "fusable": self.fusable,
            "why_not_fusable": self.fuse_blocker,
            "notes": list(self.notes),
            "relative": None if self.relative is None else self.relative.summary(),
        }


@dataclass(frozen=True)
class Skipped:
    """A softmax that is not (rewritable) attention, and why: part of the report."""

    name: str
    reason: str


@dataclass(frozen=True)
class Report:
    """The sites of one graph and the softmaxes left alone; lists given to it are stored as tuples."""

    sites: tuple[AttentionSite, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    topk: tuple[Any, ...] = ()  # ``passes.topk.TopkSite``s: softmaxes only selected from (routers, heads)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "skipped", tuple(self.skipped))
        object.__setattr__(self, "topk", tuple(self.topk))

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self) -> Iterator[AttentionSite]:
        return iter(self.sites)

    def __getitem__(self, i: int) -> AttentionSite:
        return self.sites[i]

    def with_notes(self, notes: Mapping[int, Sequence[str]]) -> Report:
        """A copy whose sites carry what an emitter did, keyed by site index (subclass fields kept)."""
        if not any(notes.values()):
            return self
        return replace(self, sites=tuple(s.with_notes(notes.get(s.index, ())) for s in self.sites))


@dataclass
class Notes:
    """What an emitter did, per site index: collected while rewriting, returned in the result."""

    by_site: dict[int, list[str]] = field(default_factory=dict)

    def add(self, site: AttentionSite, text: str) -> None:
        self.by_site.setdefault(site.index, []).append(text)


@dataclass(frozen=True)
class Emitted:
    """What an emitter did: the report with its notes added, and the sites it left alone with the reason."""

    report: Report
    left: Mapping[int, str] = field(default_factory=dict)


__all__ = ["Emitted", "Dim", "Form", "MaskKind", "MaskRole", "GuardKind", "Operand", "MaskTerm", "Guard", "FusedOpInfo",
           "AttentionSite", "Skipped", "Report", "Notes"]
