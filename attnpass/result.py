"""One answer to every rewrite: the sites found, which were rewritten, which were left alone and why.

``attnpass.onnx.rewrite`` returns it, ``attnpass.mlir.rewrite(..., with_report=True)`` returns it
next to the module, the compile backend records it, and ``attnpass.fuse`` / ``attnpass.to_ssmax``
attach it to the module they return as ``module.attnpass_result``.  It reads like the matcher's
report (``sites``, ``skipped``, ``len``, iteration) so code written against the report keeps working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnpass.spec import RewriteSpec


def json_safe(x: Any) -> Any:
    """``x`` with every non-finite float as a string (``"nan"``, ``"inf"``, ``"-inf"``).

    ``json.dumps`` writes ``NaN``/``Infinity`` by default, which is not JSON: strict parsers (jq,
    JavaScript) reject the whole document.
    """
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(x.item())
    return x


def dumps(x: Any, indent: int | None = 2) -> str:
    """Strict JSON text for ``x`` (what every ``--json`` prints): non-finite floats as strings, never ``NaN`` tokens."""
    import json

    return json.dumps(json_safe(x), indent=indent, allow_nan=False, default=str)


@dataclass
class RewriteResult:
    """What a rewrite did.

    ``report``: the matcher's report (sites found, softmaxes skipped).  ``left``: site index ->
    why it was left alone.  ``validation``: the check against the reference (None when not run);
    ``self_test``: the ``s=0, b=1`` check of an SSMax rewrite against the original (ONNX).
    ``written``: the output path (None when nothing was written).  ``ir``: "fx", "onnx" or "mlir".
    """

    report: Any
    spec: RewriteSpec
    left: dict[int, str] = field(default_factory=dict)
    validation: Any = None
    self_test: Any = None
    written: Path | None = None
    ir: str = ""
    #: The SSMax parameters the compile backend created for this graph (name -> ``[H]`` parameter):
    #: dynamo's graph is not the user's module, so this is where a training loop finds them.
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_report(cls, report: Any, spec: RewriteSpec, ir: str) -> RewriteResult:
        """For passes that do not say what they left: a fused rewrite leaves exactly the unfusable sites;
        SSMax (plain, or fused with the unfusable sites rewritten in place) leaves those whose notes say
        ``left alone: <why>`` (the MLIR emitter's words, e.g. a Q already scaled by a relative of SSMax)."""
        if spec.ssmax:
            tag = "left alone: "
            left = {s.index: n[len(tag):] for s in report.sites for n in s.notes if n.startswith(tag)}
        else:
            left = {s.index: s.fuse_blocker or "not fusable" for s in report.sites if not s.fusable}
        return cls(report, spec, left, ir=ir)

    @property
    def sites(self) -> list[Any]:
        return self.report.sites

    @property
    def skipped(self) -> list[Any]:
        return self.report.skipped

    @property
    def rewritten(self) -> list[int]:
        """Indices of the sites the rewrite changed."""
        return [s.index for s in self.report.sites if s.index not in self.left]

    @property
    def to(self) -> str:
        """The rewrite's label: ``"ssmax"``, ``"fused"`` or ``"fused+ssmax"``."""
        return self.spec.label

    def __len__(self) -> int:
        return len(self.report.sites)

    def __iter__(self):
        return iter(self.report.sites)

    def __getitem__(self, i: int) -> Any:
        return self.report.sites[i]

    def summary(self) -> list[dict[str, Any]]:
        """One row per site for tables: the site's report plus whether it was rewritten and why not."""
        return [{**s.summary(), "rewritten": s.index not in self.left, "why_left": self.left.get(s.index)}
                for s in self.report.sites]

    def headline(self) -> str:
        """One line for logs and table titles."""
        return f"{len(self.rewritten)}/{len(self.report.sites)} site(s) rewritten to {self.to}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: no NaN/Infinity (they become strings), paths as strings."""
        return json_safe({
            "ir": self.ir,
            "to": self.to,
            "spec": self.spec.as_dict(),
            "written": None if self.written is None else str(self.written),
            "rewritten": self.rewritten,
            "left": {str(k): v for k, v in sorted(self.left.items())},
            "sites": self.summary(),
            "skipped": [{"node": k.name, "reason": k.reason} for k in self.report.skipped],
            "topk": [t.summary() for t in getattr(self.report, "topk", ())],
            "validation": None if self.validation is None else self.validation.as_dict(),
            "self_test": None if self.self_test is None else self.self_test.as_dict(),
        })


__all__ = ["RewriteResult", "dumps", "json_safe"]
