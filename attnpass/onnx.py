"""Public ONNX API: ``find`` attention in an ``.onnx`` file and ``rewrite`` it, validated in onnxruntime.

A rewrite never touches its input: the model is loaded into memory, rewritten, written to a
temporary file next to the destination, checked through onnxruntime against the original, and
only then renamed onto the destination (file handling and model checks: ``attnpass.modelio``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnpass.errors import AttnpassError, NoAttentionFound
from attnpass.modelio import check_not_input as _check_not_input
from attnpass.modelio import check_output as _check_output
from attnpass.modelio import infer_shapes, load, save
from attnpass.modelio import staging as _staging
from attnpass.passes.match import Report
from attnpass.result import RewriteResult
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
        return {"sites": [s.summary() for s in self.report.sites],
                "skipped": [{"node": k.name, "reason": k.reason} for k in self.report.skipped]}


def find(src: Any) -> OnnxReport:
    """Attention sites of an ONNX model (path or proto), and the softmaxes left alone with the reason."""
    from attnpass.passes import onnx as onnx_pass

    model = load(src)
    return OnnxReport(onnx_pass.find(model), model)


def _apply(model: Any, spec: RewriteSpec) -> tuple[Report, dict[int, str]]:
    from attnpass.passes import onnx as onnx_pass

    report = onnx_pass.find(model)
    s, b = spec.s_value, spec.b
    if spec.to == "ssmax":
        return report, onnx_pass.to_ssmax(model, report, s=s, b=b)
    return report, onnx_pass.fuse(model, report, target=spec.target, ssmax=(s, b) if spec.fused_ssmax else None)


def _upgrade(model: Any, opset: int) -> Any:
    """The model converted to ``opset`` (opset-23 ``Attention`` needs the default domain at 23)."""
    import onnx_ir as ir
    from onnx import version_converter

    if model.opset_imports.get("", 1) >= opset:
        return model
    src = ir.to_proto(model)
    try:
        proto = version_converter.convert_version(src, opset)
    except Exception as e:
        raise AttnpassError(f"cannot convert the model to opset {opset} for --target onnx23: {str(e).splitlines()[0][:200]}") from e
    if not proto.functions and src.functions:
        # the converter drops model-local functions; their bodies keep their own opset imports
        proto.functions.extend(src.functions)
    out = ir.from_proto(proto)
    infer_shapes(out)
    return out


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
) -> RewriteResult:
    """Rewrite ``src``'s attention (``to="ssmax"`` or ``"fused"``), validate in onnxruntime, then write ``dst``.

    ``fused`` must match the original within ``rtol``/``atol``.  ``ssmax`` changes the model on
    purpose, so it is checked twice: the same rewrite with ``s=0, b=1`` (factor 1) must match the
    original, and the real one must give no NaN/inf.  ``to="fused"`` with SSMax (``ssmax=True``, or
    any of ``s``/``train_len``/``bias`` given) fuses SSMax attention (Q pre-scaled by the per-row
    factor); it is checked against the original at ``s=0, b=1`` and against the unfused
    ``to="ssmax"`` rewrite at the real ``s``.  ``spec`` replaces the request keywords.  Nothing is
    written when a check fails (``AttnpassError``), when the original itself gives NaN/inf on
    generated inputs (give ``inputs``), or when no attention is found (``NoAttentionFound``;
    ``force`` copies the model).  ``progress`` is called with the name of each step as it starts.
    """
    from attnpass import validate as val

    step = progress or (lambda _name: None)
    if spec is None:
        spec = RewriteSpec.of(to, s=s, b=bias, train_len=train_len, ssmax=ssmax, target=target)
    dst = Path(dst)
    if isinstance(src, str | Path) and Path(src).resolve() == dst.resolve():
        raise AttnpassError(f"{dst}: refusing to overwrite the input model (give another -o)")
    _check_output(dst)
    step(f"loading {src if isinstance(src, str | os.PathLike) else 'model'}")
    original = load(src)
    _check_not_input(original, src, dst)
    model = load(original, infer=False)
    if spec.to == "fused" and spec.target == "onnx23":
        model = _upgrade(model, 23)
    step("finding and rewriting attention")
    report, left = _apply(model, spec)
    result = RewriteResult(report, spec, left, ir="onnx")
    if not report.sites and not force:
        raise NoAttentionFound("no attention found")
    with _staging(dst, src) as tmp:
        tmp_dst = Path(tmp) / dst.name
        step("saving to a temporary file")
        save(model, tmp_dst)
        if validate and report.sites and (result.rewritten or spec.fused_ssmax):
            # a path is checked as the user's own file (no second copy of the weights written)
            ref_path = Path(src) if isinstance(src, str | os.PathLike) else Path(tmp) / "original.onnx"
            if ref_path.parent == Path(tmp):
                save(original, ref_path)
            if isinstance(inputs, str | Path):
                feeds = val.load_inputs(inputs)
            elif inputs:
                feeds = dict(inputs)
            else:
                feeds = val.make_inputs(ref_path)
                val.check_reference(ref_path, feeds)
            step("validating in onnxruntime")
            _validate(result, original, ref_path, tmp_dst, Path(tmp), feeds, rtol, atol)
        for name in (dst.name + ".data", dst.name):  # the weights first: the .onnx file is the commit point
            if (Path(tmp) / name).exists():
                os.replace(Path(tmp) / name, dst.parent / name)
    result.written = dst
    return result


def _validate(result: RewriteResult, original: Any, ref_path: Path, got: Path, tmp: Path, feeds: Any,
              rtol: float, atol: float) -> None:
    """The checks each rewrite owes before it may be written (see ``rewrite``); raises on failure."""
    from attnpass import validate as val

    spec = result.spec
    if spec.fused_ssmax:
        result.self_test, result.validation = _check_fused_ssmax(original, ref_path, got, tmp, feeds, spec, rtol, atol)
    elif spec.to == "fused":
        result.validation = val.validate(ref_path, got, feeds, rtol=rtol, atol=atol)
        if not result.validation.passed:
            raise AttnpassError(f"fused model does not match the original: {_worst(result.validation)}; nothing written")
    else:
        probe = load(original, infer=False)
        _apply(probe, spec.with_params(0.0, 1.0))
        probe_path = tmp / "self_test.onnx"
        save(probe, probe_path)
        result.self_test = val.validate(ref_path, probe_path, feeds, rtol=rtol, atol=atol)
        if not result.self_test.passed:
            raise AttnpassError(f"SSMax self-test (s=0, b=1) does not match the original: {_worst(result.self_test)}; nothing written")
        bad = val.finite(got, feeds)
        result.validation = val.validate(ref_path, got, feeds, rtol=float("inf"), atol=float("inf"))
        for o in result.validation.outputs:
            o.ok = o.finite
        if bad:
            raise AttnpassError(f"SSMax model gives NaN/inf in {', '.join(bad)}; nothing written")


def _check_fused_ssmax(original: Any, ref_path: Path, got: Path, tmp: Path, feeds: Any, spec: RewriteSpec,
                       rtol: float, atol: float) -> tuple[Any, Any]:
    """Fused SSMax: at ``s=0, b=1`` it must equal the original; at ``s`` it must equal the unfused SSMax rewrite."""
    from attnpass import validate as val

    probe = load(original, infer=False)
    if spec.target == "onnx23":
        probe = _upgrade(probe, 23)
    _apply(probe, spec.with_params(0.0, 1.0))
    save(probe, tmp / "self_test.onnx")
    self_test = val.validate(ref_path, tmp / "self_test.onnx", feeds, rtol=rtol, atol=atol)
    if not self_test.passed:
        raise AttnpassError(f"fused SSMax self-test (s=0, b=1) does not match the original: {_worst(self_test)}; nothing written")
    unfused = load(original, infer=False)
    _apply(unfused, RewriteSpec("ssmax", spec.s_value, spec.b, target=spec.target))
    save(unfused, tmp / "unfused_ssmax.onnx")
    rep = val.validate(tmp / "unfused_ssmax.onnx", got, feeds, rtol=rtol, atol=atol)
    if not rep.passed or not all(o.finite for o in rep.outputs):
        raise AttnpassError(f"fused SSMax does not match the unfused SSMax rewrite: {_worst(rep)}; nothing written")
    return self_test, rep


def _worst(rep: Any) -> str:
    """The worst failing output in words: its reason when the numbers cannot be compared, else its errors."""
    bad = [o for o in rep.outputs if not o.ok] or rep.outputs
    if not bad:
        return "no outputs to compare"
    o = max(bad, key=lambda x: x.max_abs if x.max_abs == x.max_abs else float("inf"))
    if getattr(o, "reason", None):
        return f"output {o.name}: {o.reason}"
    return f"output {o.name}: max abs error {o.max_abs:.3g}, max rel error {o.max_rel:.3g} (rtol {rep.rtol:g}, atol {rep.atol:g})"


__all__ = ["find", "rewrite", "load", "save", "OnnxReport", "RewriteResult"]
