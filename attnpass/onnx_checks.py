"""The ONNX rewrite's own steps: apply a spec to a loaded model, and the checks it owes before it is written.

Kept apart from ``attnpass.onnx`` (the public entry points) so that ``attnpass.onnx`` and
``attnpass.validate`` never import each other: this module uses both ``validate`` and ``modelio``.
``fused`` must equal the original; ``ssmax`` must equal the original at ``s=0, b=1`` and give no
NaN/inf at the real ``s``; fused SSMax must equal the original at ``s=0, b=1`` and the unfused
SSMax rewrite at the real ``s``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from attnpass import validate as val
from attnpass.errors import AttnpassError
from attnpass.modelio import infer_shapes, load, save
from attnpass.passes.match import Report
from attnpass.result import RewriteResult
from attnpass.spec import RewriteSpec


def apply(model: Any, spec: RewriteSpec) -> tuple[Report, dict[int, str]]:
    """Rewrite ``model`` in place as ``spec`` asks; the report and {site index: why it was left alone}.

    Every model a rewrite builds (the output, the ``s=0, b=1`` probe, the unfused SSMax reference) goes
    through here, so the three can only differ by the spec they are given."""
    from attnpass.passes import onnx as onnx_pass
    from attnpass.rewrite import onnx as onnx_rewrite

    done = onnx_rewrite.emit(model, onnx_pass.find(model), spec)
    return done.report, dict(done.left)


def upgrade(model: Any, opset: int) -> Any:
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


def feeds(inputs: Any, ref_path: Path) -> dict[str, Any]:
    """The validation inputs: given (feeds or an ``.npz`` path), or generated -- and then the original must
    give finite outputs on them, or no comparison would mean anything (the error asks for ``--inputs``)."""
    if isinstance(inputs, str | Path):
        return val.load_inputs(inputs)
    if inputs:
        return dict(inputs)
    generated = val.make_inputs(ref_path)
    val.check_reference(ref_path, generated)
    return generated


#: The SSMax factor of the sensitivity probe: any value but 1 would do in exact arithmetic; 1000 makes a row that
#: sees two keys with different logits visibly sharper even when freshly initialised weights give near-equal logits.
WRONG_FACTOR = 1000.0
#: The probe's outputs must differ from the original's by more than this fraction of some value ...
PROBE_RTOL = 1e-3
#: ... and by more than this fraction of the largest output value (float noise near zero does not count).
PROBE_FLOOR = 1e-5


def check(result: RewriteResult, original: Any, ref_path: Path, got: Path, tmp: Path, feeds: Any,
          rtol: float, atol: float, generated: bool = False) -> None:
    """The checks each rewrite owes before it may be written (see ``rewrite``); raises on failure.

    ``generated``: the feeds were made up by us, so they are first shown able to fail (``sensitive``)."""
    spec = result.spec
    if generated and result.report.sites and (result.rewritten or spec.fused_ssmax):
        # only attention rewrites can pass vacuously on one-key rows (a top-k rewrite alone is compared as is)
        sensitive(original, ref_path, tmp, feeds, replace_existing=spec.replace_existing)
    if spec.fused_ssmax:
        result.self_test, result.validation = _fused_ssmax(original, ref_path, got, tmp, feeds, spec, rtol, atol)
    elif spec.to == "fused":
        result.validation = val.validate(ref_path, got, feeds, rtol=rtol, atol=atol)
        if not result.validation.passed:
            raise AttnpassError(f"fused model does not match the original: {worst(result.validation)}; nothing written")
    else:
        probe = load(original, infer=False)
        apply(probe, spec.with_params(0.0, 1.0))
        probe_path = tmp / "self_test.onnx"
        save(probe, probe_path)
        result.self_test = val.validate(ref_path, probe_path, feeds, rtol=rtol, atol=atol)
        if not result.self_test.passed:
            raise AttnpassError(f"SSMax self-test (s=0, b=1) does not match the original: {worst(result.self_test)}; nothing written")
        bad = val.finite(got, feeds)
        result.validation = val.validate(ref_path, got, feeds, rtol=float("inf"), atol=float("inf"))
        for o in result.validation.outputs:
            o.ok = o.finite
        if bad:
            raise AttnpassError(f"SSMax model gives NaN/inf in {', '.join(bad)}; nothing written")


def sensitive(original: Any, ref_path: Path, tmp: Path, feeds: Any, rtol: float = PROBE_RTOL,
              replace_existing: bool = False) -> None:
    """The feeds must tell a wrong SSMax factor from the right one, or no check on them means anything.

    The ``s=0, b=1`` self-test and the fused comparison pass vacuously on inputs where every compared query
    row sees one key (softmax of one logit is 1 whatever the factor): e.g. a ``logits_to_keep`` that keeps a
    padded row.  The same model with factor ``WRONG_FACTOR`` must differ from the original on them by more
    than ``rtol`` of some output value (relative, so freshly initialised models with tiny outputs count; the
    floor ``PROBE_FLOOR`` of the largest output keeps float noise around zeros from counting).  Models whose
    weights stay on disk are not probed: the probe would be one more copy of them."""
    from attnpass.modelio import EXTERNAL_DATA_BYTES, weights_bytes

    if weights_bytes(original) > EXTERNAL_DATA_BYTES:
        return
    probe = load(original, infer=False)
    # the sites the rewrite may scale (with ``replace_existing`` also those whose Q carries a relative of SSMax)
    apply(probe, RewriteSpec("ssmax", 0.0, WRONG_FACTOR, replace_existing=replace_existing))
    save(probe, tmp / "wrong_factor.onnx")
    ref = val.run(ref_path, feeds)
    scale = max((float(np.max(np.abs(v), initial=0.0)) for v in ref.values() if np.issubdtype(v.dtype, np.floating)),
                default=0.0)
    rep = val.compare(ref, val.run(tmp / "wrong_factor.onnx", feeds), rtol=rtol, atol=PROBE_FLOOR * scale)
    if rep.passed:
        worst_abs = max((o.max_abs for o in rep.outputs), default=0.0)
        raise AttnpassError(f"the generated inputs cannot test this rewrite: with a wrong SSMax factor (s=0, b="
                            f"{WRONG_FACTOR:g}) the outputs still equal the original's (max abs {worst_abs:.3g}), as when "
                            "every compared query row sees a single key; pass --inputs feeds.npz (inputs=...) with real inputs")


def _fused_ssmax(original: Any, ref_path: Path, got: Path, tmp: Path, feeds: Any, spec: RewriteSpec,
                       rtol: float, atol: float) -> tuple[Any, Any]:
    """Fused SSMax: at ``s=0, b=1`` it must equal the original; at ``s`` it must equal the unfused SSMax rewrite."""
    probe = load(original, infer=False)
    if spec.target == "onnx23":
        probe = upgrade(probe, 23)
    apply(probe, spec.with_params(0.0, 1.0))
    save(probe, tmp / "self_test.onnx")
    self_test = val.validate(ref_path, tmp / "self_test.onnx", feeds, rtol=rtol, atol=atol)
    if not self_test.passed:
        raise AttnpassError(f"fused SSMax self-test (s=0, b=1) does not match the original: {worst(self_test)}; nothing written")
    unfused = load(original, infer=False)
    apply(unfused, replace(spec, to="ssmax", fused_ssmax=False))  # same treatment of existing scalings
    save(unfused, tmp / "unfused_ssmax.onnx")
    rep = val.validate(tmp / "unfused_ssmax.onnx", got, feeds, rtol=rtol, atol=atol)
    if not rep.passed or not all(o.finite for o in rep.outputs):
        raise AttnpassError(f"fused SSMax does not match the unfused SSMax rewrite: {worst(rep)}; nothing written")
    return self_test, rep


def worst(rep: Any) -> str:
    """The worst failing output in words: its reason when the numbers cannot be compared, else its errors."""
    bad = [o for o in rep.outputs if not o.ok] or rep.outputs
    if not bad:
        return "no outputs to compare"
    o = max(bad, key=lambda x: x.max_abs if x.max_abs == x.max_abs else float("inf"))
    if getattr(o, "reason", None):
        return f"output {o.name}: {o.reason}"
    return f"output {o.name}: max abs error {o.max_abs:.3g}, max rel error {o.max_rel:.3g} (rtol {rep.rtol:g}, atol {rep.atol:g})"


__all__ = ["apply", "upgrade", "feeds", "check", "sensitive", "worst", "WRONG_FACTOR"]
