"""Public ONNX API: ``find`` attention in an ``.onnx`` file and ``rewrite`` it, validated in onnxruntime.

A rewrite never touches its input: the model is loaded into memory, rewritten, written to a
temporary file next to the destination, checked through onnxruntime against the original, and
only then renamed onto the destination.  Models whose weights exceed protobuf's 2 GB limit are
read with their external data and written with external data (``<out>.data``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnpass import semantics
from attnpass.errors import AttnpassError, NoAttentionFound
from attnpass.passes.match import Report

#: Above this many bytes of initializers, weights are written as external data.
EXTERNAL_DATA_BYTES = 1_800_000_000


def load(src: Any, infer: bool = True):
    """An onnx-ir model from a path, a ModelProto, bytes or an onnx-ir model (copied: the caller's stays as is).

    ``infer=False`` skips shape inference, for a copy of a model this function already loaded.
    """
    import onnx
    import onnx_ir as ir

    if isinstance(src, ir.Model):
        model = src.clone()
        if not infer:
            return model
    elif isinstance(src, onnx.ModelProto):
        _check_proto(src, "model")
        model = _from_proto(src, "model")
    elif isinstance(src, bytes):
        try:
            proto = onnx.load_from_string(src)
        except Exception as e:
            raise AttnpassError(f"not an ONNX model ({type(e).__name__})") from e
        _check_proto(proto, "model")
        model = _from_proto(proto, "model")
    elif not isinstance(src, str | os.PathLike):
        raise AttnpassError(f"wants an .onnx path, a ModelProto, bytes or an onnx_ir.Model, got {type(src).__name__}")
    else:
        path = Path(src)
        if not path.exists():
            raise AttnpassError(f"{path}: no such file")
        if not path.is_file():
            raise AttnpassError(f"{path}: not a file")
        if not os.access(path, os.R_OK):
            raise AttnpassError(f"{path}: not readable (permission denied)")
        _check_file(path)  # before loading: the checker's parse and ours never hold the weights at once
        try:
            model = ir.load(path)
        except Exception as e:
            raise AttnpassError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'truncated or corrupt'})") from e
        if model.ir_version in (None, 0) or (len(model.graph) == 0 and not model.graph.outputs):
            raise AttnpassError(f"{path}: not an ONNX model (no graph)")
        model.meta["attnpass.input_files"] = sorted({str(t.path) for t in _external_tensors(model)})
        if _weights_bytes(model) <= EXTERNAL_DATA_BYTES:
            try:
                model = ir.external_data.load_to_model(model)  # small: hold the weights in memory
            except Exception as e:
                raise AttnpassError(f"{path}: cannot read its external data ({type(e).__name__}: {str(e)[:160]})") from e
        else:
            _check_external(model, path)
        _check_model(model, str(path))
    _infer_shapes(model)
    return model


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (onnx's checker spreads node context over several)."""
    text = " ".join(str(e).replace("==> Context:", ";").split())
    return (text or type(e).__name__)[:limit]


def _check_file(path: Path) -> None:
    """onnx's checker on the file: cycles and dangling inputs (not topologically sorted), unknown ops, bad
    opsets, initializers shorter than their shape, external data missing or outside the model's folder.

    It reads the file itself (external data resolved next to it, which a checker run on a parsed proto
    cannot do), so an unparseable file is reported here as unreadable.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        msg = _one_line(e)
        if "Unable to parse" in msg or "parse proto" in msg.lower() or isinstance(e, UnicodeDecodeError):
            raise AttnpassError(f"{path}: not a readable ONNX model (truncated or corrupt protobuf)") from e
        if "ir_version set properly" in msg:  # any bytes parse as *some* protobuf: this one has no model header
            raise AttnpassError(f"{path}: not an ONNX model (no ir_version: empty, truncated or another kind of file)") from e
        raise AttnpassError(f"{path}: invalid ONNX model: {msg}") from e


def _check_proto(proto: Any, label: str) -> None:
    """The checker on an in-memory proto (external data, which it would resolve against the cwd, excepted)."""
    import onnx

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        return
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise AttnpassError(f"{label}: invalid ONNX model: {_one_line(e)}") from e


def _from_proto(proto: Any, label: str) -> Any:
    import onnx_ir as ir

    try:
        return ir.from_proto(proto)
    except Exception as e:
        raise AttnpassError(f"{label}: not a readable ONNX model ({_one_line(e, 160)})") from e


def _check_external(model: Any, path: Path) -> None:
    """Large models keep their weights on disk: each external tensor's file must hold the bytes it claims,
    checked now rather than as a crash half-way through writing the output."""
    import onnx_ir as ir

    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            data = Path(t.path)
            size = data.stat().st_size if data.is_file() else -1
            need = (t.offset or 0) + (t.length if t.length is not None else t.nbytes)
            if size < need:
                what = "missing" if size < 0 else f"{size} bytes, needs {need}"
                raise AttnpassError(f"{path}: external data of initializer {v.name!r} in {data.name}: {what}")


def _external_tensors(model: Any) -> list[Any]:
    import onnx_ir as ir

    return [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]


def _check_model(model: Any, label: str) -> None:
    """What onnx's checker lets through but onnxruntime and our report cannot use: an opset newer than
    this onnx knows, and two nodes of one graph with the same name (the report names nodes)."""
    import onnx
    import onnx_ir as ir

    opset, newest = model.opset_imports.get("", None), onnx.defs.onnx_opset_version()
    if opset is not None and not 1 <= opset <= newest:
        raise AttnpassError(f"{label}: opset {opset} of the default ONNX domain is out of range (1..{newest})")
    for graph in (model.graph, *model.functions.values()):
        seen: set[str] = set()
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name and node.graph is graph:
                if node.name in seen:
                    raise AttnpassError(f"{label}: two nodes are named {node.name!r} (node names must be unique)")
                seen.add(node.name)


def _weights_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _infer_shapes(model: Any) -> None:
    """onnx shape inference (with data propagation) where it works; the adapter infers the rest itself."""
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    except Exception:  # custom domains or huge models: fall back to the adapter's own propagation
        pass


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


@dataclass
class RewriteResult:
    """What ``rewrite`` did: the sites, those left alone (and why), the validation, and where it wrote."""

    report: Report
    to: str
    left: dict[int, str] = field(default_factory=dict)
    validation: Any = None
    self_test: Any = None
    written: Path | None = None

    @property
    def rewritten(self) -> int:
        return len(self.report.sites) - len(self.left)

    def as_dict(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "written": None if self.written is None else str(self.written),
            "sites": [{**s.summary(), "rewritten": s.index not in self.left, "why_left": self.left.get(s.index)}
                      for s in self.report.sites],
            "skipped": [{"node": k.name, "reason": k.reason} for k in self.report.skipped],
            "validation": None if self.validation is None else self.validation.as_dict(),
            "self_test": None if self.self_test is None else self.self_test.as_dict(),
        }


def _apply(model: Any, to: str, s: float, b: float | None, target: str, ssmax: bool = False) -> tuple[Report, dict[int, str]]:
    from attnpass.passes import onnx as onnx_pass
    from attnpass.rewrite import onnx as onnx_rewrite

    report = onnx_pass.find(model)
    if to == "ssmax":
        done = onnx_rewrite.to_ssmax(model, report, s=s, b=b)
    else:
        done = onnx_rewrite.fuse(model, report, target=target, ssmax=(s, b) if ssmax else None)
    return done.report, dict(done.left)


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
    _infer_shapes(out)
    return out


def save(model: Any, dst: Path) -> None:
    """Write ``model`` to ``dst``; weights above ~1.8 GB go to ``<dst>.data`` as external data."""
    import onnx_ir as ir

    if _weights_bytes(model) > EXTERNAL_DATA_BYTES:
        ir.save(model, dst, external_data=dst.name + ".data")
    else:
        ir.save(model, dst)


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
) -> RewriteResult:
    """Rewrite ``src``'s attention (``to="ssmax"`` or ``"fused"``), validate in onnxruntime, then write ``dst``.

    ``fused`` must match the original within ``rtol``/``atol``.  ``ssmax`` changes the model on
    purpose, so it is checked twice: the same rewrite with ``s=0, b=1`` (factor 1) must match the
    original, and the real one must give no NaN/inf.  ``to="fused"`` with SSMax (``ssmax=True``, or
    any of ``s``/``train_len``/``bias`` given) fuses SSMax attention (Q pre-scaled by the per-row
    factor); it is checked against the original at ``s=0, b=1`` and against the unfused
    ``to="ssmax"`` rewrite at the real ``s``.  Nothing is written when a check fails
    (``AttnpassError``) or when no attention is found (``NoAttentionFound``; ``force`` copies the model).
    ``progress`` is called with the name of each step as it starts (the CLI's progress bar).
    """
    from attnpass import validate as val

    step = progress or (lambda _name: None)

    if to not in ("ssmax", "fused"):
        raise AttnpassError(f"unknown rewrite {to!r}: use ssmax or fused")
    if ssmax is None:
        ssmax = to == "ssmax" or any(x is not None for x in (s, train_len, bias))
    fused_ssmax = to == "fused" and ssmax
    if train_len is not None:
        if s is not None:
            raise AttnpassError("give either --s or --train-len, not both")
        try:
            s = semantics.s_for_train_len(train_len)
        except ValueError as e:
            raise AttnpassError(str(e)) from e
    s = semantics.DEFAULT_S if s is None else float(s)
    dst = Path(dst)
    if isinstance(src, str | Path) and Path(src).resolve() == dst.resolve():
        raise AttnpassError(f"{dst}: refusing to overwrite the input model (give another -o)")
    _check_output(dst)
    step(f"loading {src if isinstance(src, str | os.PathLike) else 'model'}")
    original = load(src)
    _check_not_input(original, src, dst)
    model = load(original, infer=False)
    if to == "fused" and target == "onnx23":
        model = _upgrade(model, 23)
    step("finding and rewriting attention")
    report, left = _apply(model, to, s, bias, target, fused_ssmax)
    result = RewriteResult(report, "fused+ssmax" if fused_ssmax else to, left)
    if not report.sites and not force:
        raise NoAttentionFound("no attention found")
    with _staging(dst, src) as tmp:
        tmp_dst = Path(tmp) / dst.name
        step("saving to a temporary file")
        save(model, tmp_dst)
        if validate and report.sites and (result.rewritten or fused_ssmax):
            # a path is checked as the user's own file (no second copy of the weights written)
            ref_path = Path(src) if isinstance(src, str | os.PathLike) else Path(tmp) / "original.onnx"
            if ref_path.parent == Path(tmp):
                save(original, ref_path)
            feeds = val.load_inputs(inputs) if isinstance(inputs, str | Path) else (inputs or val.make_inputs(ref_path))
            step("validating in onnxruntime")
            if fused_ssmax:
                result.self_test, result.validation = _check_fused_ssmax(original, ref_path, tmp_dst, Path(tmp), feeds,
                                                                         s, bias, target, rtol, atol)
            elif to == "fused":
                result.validation = val.validate(ref_path, tmp_dst, feeds, rtol=rtol, atol=atol)
                if not result.validation.passed:
                    raise AttnpassError(f"fused model does not match the original: {_worst(result.validation)}; nothing written")
            else:
                probe = load(original, infer=False)
                _apply(probe, "ssmax", 0.0, 1.0, target)
                probe_path = Path(tmp) / "self_test.onnx"
                save(probe, probe_path)
                result.self_test = val.validate(ref_path, probe_path, feeds, rtol=rtol, atol=atol)
                if not result.self_test.passed:
                    raise AttnpassError(f"SSMax self-test (s=0, b=1) does not match the original: {_worst(result.self_test)}; nothing written")
                bad = val.finite(tmp_dst, feeds)
                result.validation = val.validate(ref_path, tmp_dst, feeds, rtol=float("inf"), atol=float("inf"))
                for o in result.validation.outputs:
                    o.ok = o.finite
                if bad:
                    raise AttnpassError(f"SSMax model gives NaN/inf in {', '.join(bad)}; nothing written")
        for name in (dst.name + ".data", dst.name):  # the weights first: the .onnx file is the commit point
            if (Path(tmp) / name).exists():
                os.replace(Path(tmp) / name, dst.parent / name)
    result.written = dst
    return result


def _check_output(dst: Path) -> None:
    """Fail before any work when ``dst`` cannot be written: a missing folder is a typo more often than a wish."""
    if dst.is_dir():
        raise AttnpassError(f"{dst}: is a directory (give a file name with -o)")
    parent = dst.parent
    if not parent.exists():
        raise AttnpassError(f"{dst}: output directory {parent} does not exist")
    if not parent.is_dir():
        raise AttnpassError(f"{dst}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AttnpassError(f"{dst}: cannot write to {parent} (permission denied)")


def _check_not_input(original: Any, src: Any, dst: Path) -> None:
    """Refuse outputs that are the input under another name (a hard link, a symlink) or one of its
    external-data files: writing them would destroy the model being read."""
    targets = [dst, dst.with_name(dst.name + ".data")]
    inputs = [Path(src)] if isinstance(src, str | os.PathLike) else []
    inputs += [Path(f) for f in original.meta.get("attnpass.input_files", ())]
    for t in targets:
        for f in inputs:
            if t.exists() and f.exists() and os.path.samefile(t, f):
                raise AttnpassError(f"{t}: refusing to overwrite the input model's file {f.name} (give another -o)")


@contextlib.contextmanager
def _staging(dst: Path, src: Any) -> Iterator[str]:
    """A temporary folder next to ``dst`` (removed whatever happens), with write failures (read-only
    folder, disk full) and validation failures reported as one-line errors naming the input model."""
    label = f"{src}" if isinstance(src, str | os.PathLike) else "model"
    try:
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".attnpass-") as tmp:
            try:
                yield tmp
            except AttnpassError as e:
                msg = str(e).replace(tmp + os.sep, "")
                if label not in msg and not Path(msg.split(":")[0]).exists():
                    msg = f"{label}: {msg}"
                if "nothing written" not in msg:
                    msg += "; nothing written"
                raise AttnpassError(msg) from e
    except OSError as e:
        raise AttnpassError(f"{dst}: cannot write ({e.strerror or type(e).__name__}); nothing written") from e


def _check_fused_ssmax(original: Any, ref_path: Path, got: Path, tmp: Path, feeds: Any, s: float, bias: float | None,
                       target: str, rtol: float, atol: float) -> tuple[Any, Any]:
    """Fused SSMax: at ``s=0, b=1`` it must equal the original; at ``s`` it must equal the unfused SSMax rewrite."""
    from attnpass import validate as val

    probe = load(original, infer=False)
    if target == "onnx23":
        probe = _upgrade(probe, 23)
    _apply(probe, "fused", 0.0, 1.0, target, ssmax=True)
    save(probe, tmp / "self_test.onnx")
    self_test = val.validate(ref_path, tmp / "self_test.onnx", feeds, rtol=rtol, atol=atol)
    if not self_test.passed:
        raise AttnpassError(f"fused SSMax self-test (s=0, b=1) does not match the original: {_worst(self_test)}; nothing written")
    unfused = load(original, infer=False)
    _apply(unfused, "ssmax", s, bias, target)
    save(unfused, tmp / "unfused_ssmax.onnx")
    rep = val.validate(tmp / "unfused_ssmax.onnx", got, feeds, rtol=rtol, atol=atol)
    if not rep.passed or not all(o.finite for o in rep.outputs):
        raise AttnpassError(f"fused SSMax does not match the unfused SSMax rewrite: {_worst(rep)}; nothing written")
    return self_test, rep


def _worst(rep: Any) -> str:
    bad = [o for o in rep.outputs if not o.ok] or rep.outputs
    o = max(bad, key=lambda x: x.max_abs if x.max_abs == x.max_abs else float("inf"))
    return f"output {o.name}: max abs error {o.max_abs:.3g}, max rel error {o.max_rel:.3g} (rtol {rep.rtol:g}, atol {rep.atol:g})"


__all__ = ["find", "rewrite", "load", "save", "OnnxReport", "RewriteResult"]
