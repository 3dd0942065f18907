"""Public ONNX API: ``find`` attention in an ``.onnx`` file and ``rewrite`` it, validated in onnxruntime.

A rewrite never touches its input: the model is loaded into memory, rewritten, written to a
temporary file next to the destination, checked through onnxruntime against the original, and
only then renamed onto the destination (file handling and model checks: ``attnpass.modelio``).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnpass import onnx_checks
from attnpass.errors import AttnpassError, NoAttentionFound, NothingRewritten
from attnpass.modelio import check_not_input as _check_not_input
from attnpass.modelio import check_output as _check_output
from attnpass.modelio import had_external_data, load, save
from attnpass.modelio import staging as _staging
from attnpass.passes.match import Report
from attnpass.result import RewriteResult, json_safe
from attnpass.spec import RewriteSpec


@dataclass
class OnnxReport:
    """``find``'s answer: the matcher's report plus the loaded model it describes."""

    report: Report
    model: Any = None

    @property
    def sites(self):
        return self.report.sites

    @property
    def skipped(self):
        return self.report.skipped

    def __len__(self) -> int:
        return len(self.report.sites)

    def __iter__(self):
        return iter(self.report.sites)

    def __getitem__(self, i: int):
        return self.report.sites[i]

    def as_dict(self) -> dict[str, Any]:
        return json_safe({"sites": [s.summary() for s in self.report.sites],
                          "skipped": [{"node": k.name, "reason": k.reason} for k in self.report.skipped],
                          "topk": [t.summary() for t in self.report.topk]})


def find(src: Any) -> OnnxReport:
    """Attention sites of an ONNX model (path or proto), and the softmaxes left alone with the reason."""
    from attnpass.passes import onnx as onnx_pass

    model = load(src)
    return OnnxReport(onnx_pass.find(model), model)


def rewrite(
    src: Any,
    dst: str | Path,
    to: str = "ssmax",
    s: float | None = None,
    train_len: int | None = None,
    bias: float | None = None,
    target: str = "ort",
    validate: bool = True,
    inputs: Any = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    force: bool = False,
    ssmax: bool | None = None,
    progress: Callable[[str], None] | None = None,
    spec: RewriteSpec | None = None,
    replace_existing: bool = False,
    fit_existing: bool = False,
) -> RewriteResult:
    """Rewrite ``src``'s attention (``to="ssmax"`` or ``"fused"``), validate in onnxruntime, then write ``dst``.

    ``fused`` must match the original within ``rtol``/``atol``.  ``ssmax`` changes the model on
    purpose, so it is checked twice: the same rewrite with ``s=0, b=1`` (factor 1) must match the
    original, and the real one must give no NaN/inf.  ``to="fused"`` with SSMax (``ssmax=True``, or
    any of ``s``/``train_len``/``bias`` given) fuses SSMax attention (Q pre-scaled by the per-row
    factor); it is checked against the original at ``s=0, b=1`` and against the unfused
    ``to="ssmax"`` rewrite at the real ``s``.  ``spec`` replaces the request keywords.  Nothing is
    written when a check fails (``AttnpassError``), when the original itself gives NaN/inf on
    generated inputs (give ``inputs``), when no attention is found (``NoAttentionFound``), or when none of it
    could be rewritten (``NothingRewritten``, e.g. nothing fusable); ``force`` writes the model anyway.  ``replace_existing`` / ``fit_existing``: see ``RewriteSpec``.  ``progress`` is called with the name of each step as it starts.
    """
    step = progress or (lambda _name: None)
    if spec is None:
        spec = RewriteSpec.of(to, s=s, b=bias, train_len=train_len, ssmax=ssmax, target=target,
                              replace_existing=replace_existing, fit_existing=fit_existing)
    dst = Path(dst)
    if isinstance(src, str | Path) and Path(src).resolve() == dst.resolve():
        raise AttnpassError(f"{dst}: refusing to overwrite the input model (give another -o)")
    _check_output(dst)
    step(f"loading {src if isinstance(src, str | os.PathLike) else 'model'}")
    # a model the caller loaded and dropped (``find`` just before) is a web of cycles that only a full collection
    # frees; on a model of gigabytes, collect it before loading a second one
    gc.collect()
    original = load(src)
    _check_not_input(original, src, dst)
    model = load(original, infer=False)
    if spec.to == "fused" and spec.target == "onnx23":
        model = onnx_checks.upgrade(model, 23)
    step("finding and rewriting attention")
    report, left = onnx_checks.apply(model, spec)
    result = RewriteResult(report, spec, left, ir="onnx")
    # routers / heads rewritten (a plain fuse only, as in ``rewrite/onnx``), with or without attention
    topk_done = spec.to == "fused" and not spec.fused_ssmax and any(t.fusable for t in report.topk)
    if not report.sites and not topk_done and not force:
        raise NoAttentionFound("no attention found")
    if report.sites and not result.rewritten and not spec.fused_ssmax and not topk_done and not force:
        why = "; ".join(f"site {i}: {r}" for i, r in sorted(left.items()))
        raise NothingRewritten(f"{len(report.sites)} attention site(s) found but none could be rewritten to "
                               f"{spec.label} ({why})")
    with _staging(dst, src) as tmp:
        tmp_dst = Path(tmp) / dst.name
        step("saving to a temporary file")
        save(model, tmp_dst, external=had_external_data(original))
        if validate and ((report.sites and (result.rewritten or spec.fused_ssmax)) or topk_done):
            # a path is checked as the user's own file (no second copy of the weights written)
            ref_path = Path(src) if isinstance(src, str | os.PathLike) else Path(tmp) / "original.onnx"
            if ref_path.parent == Path(tmp):
                save(original, ref_path)
            feeds = onnx_checks.feeds(inputs, ref_path)
            step("validating in onnxruntime")
            generated = not isinstance(inputs, str | os.PathLike) and not inputs
            onnx_checks.check(result, original, ref_path, tmp_dst, Path(tmp), feeds, rtol, atol, generated=generated)
        for name in (dst.name + ".data", dst.name):  # the weights first: the .onnx file is the commit point
            if (Path(tmp) / name).exists():
                os.replace(Path(tmp) / name, dst.parent / name)
    result.written = dst
    return result

__all__ = ["find", "rewrite", "load", "save", "OnnxReport", "RewriteResult"]
