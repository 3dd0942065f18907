"""ONNX files in and out, and the checks that make a model safe to read or a path safe to write.

One module for both ``attnpass.onnx`` (rewrite) and ``attnpass.validate`` (onnxruntime numerics):
each imports this, neither imports the other.  A model is loaded into memory (copied when given
as an object), checked with onnx's checker and our own rules, and written through a temporary
folder next to its destination that is renamed into place only when everything passed.  Models
whose weights exceed protobuf's 2 GB limit are read and written with external data (``<out>.data``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnpass.errors import AttnpassError

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
        if weights_bytes(model) <= EXTERNAL_DATA_BYTES:
            try:
                model = ir.external_data.load_to_model(model)  # small: hold the weights in memory
            except Exception as e:
                raise AttnpassError(f"{path}: cannot read its external data ({type(e).__name__}: {str(e)[:160]})") from e
        else:
            _check_external(model, path)
        _check_model(model, str(path))
    infer_shapes(model)
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


def weights_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def infer_shapes(model: Any) -> None:
    """onnx shape inference (with data propagation) where it works; the adapter infers the rest itself."""
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    except Exception:  # custom domains or huge models: fall back to the adapter's own propagation
        pass


def had_external_data(model: Any) -> bool:
    """Whether ``model`` was read from a file that kept (some of) its weights in external data files."""
    return bool(model.meta.get("attnpass.input_files"))


def save(model: Any, dst: Path, external: bool = False) -> None:
    """Write ``model`` to ``dst``; weights go to ``<dst>.data`` as external data when ``external`` (the
    input kept them so: same layout out as in) or above ~1.8 GB (protobuf's limit)."""
    import onnx_ir as ir

    if external or weights_bytes(model) > EXTERNAL_DATA_BYTES:
        ir.save(model, dst, external_data=dst.name + ".data")
    else:
        ir.save(model, dst)


def check_output(dst: Path) -> None:
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


def check_not_input(original: Any, src: Any, dst: Path) -> None:
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
def staging(dst: Path, src: Any) -> Iterator[str]:
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


__all__ = ["load", "save", "had_external_data", "infer_shapes", "weights_bytes", "check_output", "check_not_input", "staging", "EXTERNAL_DATA_BYTES"]
