"""One rewrite request for every IR: what to turn attention into, with which SSMax parameters.

The fx, ONNX and MLIR entry points, the compile backend and the CLI each used to read their
own keywords (``fused=True`` here, ``ssmax=True`` there, ``rewrite="fuse"`` in the backend) and
resolve ``train_len`` into ``s`` themselves.  They now build a ``RewriteSpec`` through
``RewriteSpec.of``; the planner (``passes/plan.py``) and the emitters read ``spec.resolve()``
(``s`` set from ``train_len`` or the default) -- the only place the old spellings and
``train_len`` are understood.  Deliberately dependency-free (semantics and errors only) so any
layer can import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from attnpass.errors import AttnpassError

#: The two rewrites; the keys of ``ALIASES`` are older spellings accepted at the API boundary.
TARGETS = ("ssmax", "fused")
ALIASES = {"fuse": "fused"}
ONNX_TARGETS = ("ort", "onnx23")

Param = float | tuple[float, ...]


class SpecError(AttnpassError, ValueError):
    """A contradictory or out-of-range rewrite request.

    Both an ``AttnpassError`` (the CLI prints it as one line, exit 2) and a ``ValueError`` (what the
    torch-level API raised for the same mistakes before the spec existed).
    """


def _param(x: Any, what: str) -> Param | None:
    """A scalar or per-head tuple, finite: a NaN ``s`` would silently turn every row into NaN."""
    if x is None:
        return None
    if isinstance(x, Sequence) and not isinstance(x, str):
        vals = tuple(float(v) for v in x)
        if not vals:
            raise SpecError(f"SSMax {what} has no values")
    else:
        try:
            vals = (float(x),)
        except (TypeError, ValueError) as e:
            raise SpecError(f"SSMax {what} must be a number or one number per head, got {x!r}") from e
    if not all(math.isfinite(v) for v in vals):
        raise SpecError(f"SSMax {what} must be finite, not NaN or inf (got {x!r})")
    return vals if isinstance(x, Sequence) and not isinstance(x, str) else vals[0]


@dataclass(frozen=True)
class RewriteSpec:
    """A validated rewrite request.

    ``to``: ``"ssmax"`` (change the model on purpose) or ``"fused"`` (same numerics, one op).
    ``fused_ssmax``: with ``to="fused"``, SSMax inside the fused op.  ``s``/``b``: per-head SSMax
    parameters as given (scalar or tuple); ``train_len`` the alternative to ``s``.  ``target``: the
    fused ONNX op (``"ort"`` MultiHeadAttention or ``"onnx23"`` Attention); other IRs ignore it.
    ``replace_existing``: a site whose Q already carries a relative of SSMax (Llama 4 temperature tuning,
    ``llama_4_scaling``, Qwen-1 log-n, an earlier SSMax; ``passes/relatives.py``) is left alone unless
    this is set, and then that scaling is removed before SSMax goes on.  ``fit_existing`` also replaces,
    with ``s``/``b`` of those sites the least-squares fit of the old factor (over ``fit_len`` positions).
    """

    to: str = "ssmax"
    s: Param | None = None
    b: Param | None = None
    train_len: int | None = None
    fused_ssmax: bool = False
    target: str = "ort"
    replace_existing: bool = False
    fit_existing: bool = False
    fit_len: int | None = None

    def __post_init__(self) -> None:
        to = ALIASES.get(self.to, self.to)
        if to not in TARGETS:
            raise SpecError(f"unknown rewrite {self.to!r}: use ssmax or fused")
        object.__setattr__(self, "to", to)
        if self.target not in ONNX_TARGETS:
            raise SpecError(f"unknown target {self.target!r}: use {' or '.join(ONNX_TARGETS)}")
        if self.fused_ssmax and to != "fused":
            raise SpecError("fused_ssmax goes with to='fused'")
        object.__setattr__(self, "s", _param(self.s, "s"))
        object.__setattr__(self, "b", _param(self.b, "b"))
        if self.train_len is not None:
            if self.s is not None:
                raise SpecError("give either s or train_len, not both")
            if isinstance(self.train_len, bool) or int(self.train_len) != self.train_len:
                raise SpecError(f"train_len must be an integer, got {self.train_len!r}")
            if self.train_len < 2:
                raise SpecError(f"train_len must be >= 2 (log(1) = 0 gives no scale), got {self.train_len}")
            object.__setattr__(self, "train_len", int(self.train_len))
        if self.fit_existing:
            if not self.ssmax:
                raise SpecError("fit_existing converts an existing scaling into SSMax: it goes with an SSMax rewrite")
            object.__setattr__(self, "replace_existing", True)
        if self.fit_len is not None and (isinstance(self.fit_len, bool) or int(self.fit_len) < 2):
            raise SpecError(f"fit_len must be an integer >= 2, got {self.fit_len!r}")

    @classmethod
    def of(
        cls,
        to: str = "ssmax",
        s: Any = None,
        b: Any = None,
        train_len: int | None = None,
        *,
        ssmax: bool | None = None,
        fused: bool = False,
        target: str = "ort",
        replace_existing: bool = False,
        fit_existing: bool = False,
        fit_len: int | None = None,
    ) -> RewriteSpec:
        """The spec for any of the historical spellings.

        ``to="ssmax", fused=True`` (``attnpass.to_ssmax``, ``attnpass.mlir.rewrite``, the backend) and
        ``to="fused", ssmax=True`` (``attnpass.onnx.rewrite``) are the same request: fused SSMax.
        With ``to="fused"`` and ``ssmax`` unset, giving any SSMax parameter asks for fused SSMax.
        ``replace_existing`` / ``fit_existing`` / ``fit_len``: what to do with a relative already on Q.
        """
        spec = cls._of(to, s, b, train_len, ssmax, fused, target)
        if replace_existing or fit_existing or fit_len is not None:
            return replace(spec, replace_existing=replace_existing, fit_existing=fit_existing, fit_len=fit_len)
        return spec

    @classmethod
    def _of(cls, to: str, s: Any, b: Any, train_len: int | None, ssmax: bool | None, fused: bool, target: str) -> RewriteSpec:
        canon = ALIASES.get(to, to)
        if canon == "ssmax" and fused:
            return cls("fused", s, b, train_len, True, target)
        if canon == "fused" and fused:
            raise SpecError("fused=True goes with to='ssmax' (to='fused' is already fused; ssmax=True adds SSMax)")
        if canon == "fused":
            if ssmax is None:
                ssmax = any(x is not None for x in (s, b, train_len))
            return cls("fused", s, b, train_len, bool(ssmax), target)
        return cls(to, s, b, train_len, False, target)

    @property
    def ssmax(self) -> bool:
        """Whether the rewrite changes the model to SSMax (plain or fused)."""
        return self.to == "ssmax" or self.fused_ssmax

    @property
    def s_value(self) -> Param:
        """``s`` as the rewrites use it: ``1/log(train_len)`` when a training length was given, else
        the given ``s`` or ``semantics.DEFAULT_S``."""
        from attnpass import semantics  # here, not at the top: the CLI builds specs' flags without loading torch

        if self.train_len is not None:
            return semantics.s_for_train_len(self.train_len)
        return semantics.DEFAULT_S if self.s is None else self.s

    @property
    def label(self) -> str:
        """``"ssmax"``, ``"fused"`` or ``"fused+ssmax"``: how reports and tables name the rewrite."""
        return "fused+ssmax" if self.fused_ssmax else self.to

    def resolve(self) -> RewriteSpec:
        """The spec the planner and emitters read: ``s`` set to ``s_value`` and ``train_len`` gone.

        Resolving is idempotent, so an emitter may resolve what its caller already resolved; the
        user-facing spec (kept on ``RewriteResult``) stays as given."""
        return replace(self, s=self.s_value, train_len=None)

    def with_params(self, s: Param, b: Param | None) -> RewriteSpec:
        """The same request at other SSMax parameters (the ``s=0, b=1`` self-test)."""
        return RewriteSpec(self.to, s, b, None, self.fused_ssmax, self.target)  # relatives are left: the self-test keeps them

    def as_dict(self) -> dict[str, Any]:
        s = self.s_value if self.ssmax else None
        return {"to": self.to, "fused_ssmax": self.fused_ssmax, "label": self.label, "target": self.target,
                "s": list(s) if isinstance(s, tuple) else s, "b": list(self.b) if isinstance(self.b, tuple) else self.b,
                "train_len": self.train_len, "replace_existing": self.replace_existing, "fit_existing": self.fit_existing}


def per_head(x: Param, heads: int | None, what: str, where: str = "") -> tuple[float, ...]:
    """``s`` or ``b`` as one value per head, the rule every emitter follows: a scalar (or a single value) is
    repeated to every head; ``H`` values are one per head, broadcast over ``[B, H, S_q, S_k]``; any other
    count, or several values where the heads are not known (folded into the batch), is an error naming ``where``."""
    vals = tuple(float(v) for v in x) if isinstance(x, Sequence) and not isinstance(x, str) else (float(x),)
    if len(vals) == 1:
        return vals * (heads if isinstance(heads, int) and heads > 0 else 1)
    if not isinstance(heads, int) or len(vals) != heads:
        known = f"{heads} heads" if isinstance(heads, int) else "heads that are not known (folded into the batch)"
        raise SpecError(f"SSMax {what} has {len(vals)} values for {known}{f' at {where}' if where else ''}")
    return vals


__all__ = ["RewriteSpec", "SpecError", "TARGETS", "ALIASES", "ONNX_TARGETS", "per_head"]
