"""Numerics through onnxruntime: a rewritten model against its original, on inputs that look real.

Generated inputs respect each input's type and dynamic axes: token ids stay inside the embedding
table they index (read from the ``Gather`` they feed), ``*mask*`` inputs carry real padding (the
second sequence of the batch is padded at the end), position ids count up, floats are normal.
"""

from __future__ import annotations

import math
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnpass.errors import AttnpassError

#: Generated inputs stay below these: a model whose fixed sequence axis is 10^6 would have onnxruntime
#: allocate 10^12 attention scores (the fuzzer found it: 21 GB before the OOM killer).
MAX_FIXED_DIM = 16384
MAX_INPUT_ELEMENTS = 1 << 24

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4

_NP = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
}


@dataclass
class OutputCheck:
    """One output compared: the worst absolute and relative error, and whether it is within tolerance."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool
    finite: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel, "ok": self.ok, "finite": self.finite}


@dataclass
class ValidationReport:
    """Per-output comparison of two models on the same inputs (``passed``: every output within tolerance)."""

    outputs: list[OutputCheck] = field(default_factory=list)
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.ok for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rtol": self.rtol, "atol": self.atol,
                "inputs": {k: list(v) for k, v in self.input_shapes.items()},
                "outputs": [o.as_dict() for o in self.outputs]}


def session(model: Any):
    """An onnxruntime CPU session for a path, a ModelProto or an onnx-ir model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(os.environ.get("ATTNPASS_ORT_THREADS", "0"))
    if isinstance(model, str | Path):
        src: Any = str(model)
    else:
        import onnx_ir as ir

        proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
        src = proto.SerializeToString()
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        name = Path(model).name if isinstance(model, str | Path) else "the model"
        raise AttnpassError(f"onnxruntime cannot load {name}: {_ort_message(e)}") from e


def _ort_message(e: BaseException) -> str:
    """onnxruntime's message on one line, without its ``[ONNXRuntimeError] : 1 : FAIL : Load model from <path>
    failed:`` preamble (the path may be a temporary file the user never saw)."""
    import re

    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:\s*", "", text)
    return text[:300]


def _vocab_sizes(model_path: Any) -> dict[str, int]:
    """For integer inputs that index an embedding table: the table's row count."""
    import onnx_ir as ir

    from attnpass.onnx import load

    try:
        model = model_path if isinstance(model_path, ir.Model) else load(model_path)
    except AttnpassError:
        return {}
    out: dict[str, int] = {}
    for inp in model.graph.inputs:
        frontier = [inp]
        for _ in range(6):
            nxt = []
            for v in frontier:
                for u in v.consumers():
                    if u.op_type == "Gather" and len(u.inputs) > 1 and u.inputs[1] is v:
                        data = u.inputs[0]
                        if data is not None and data.shape is not None and isinstance(data.shape[0], int):
                            out[inp.name] = min(out.get(inp.name, 1 << 62), data.shape[0])
                    elif u.op_type in ("Cast", "Unsqueeze", "Reshape", "Identity", "Squeeze", "Flatten"):
                        nxt.extend(u.outputs)
            frontier = nxt
    return out


def make_inputs(model: Any, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: dynamic axes get ``batch`` (axis 0) or ``seq``, consistently per dim name."""
    rng = np.random.default_rng(seed)
    sess = model if hasattr(model, "get_inputs") else session(model)
    vocab = {} if hasattr(model, "get_inputs") else _vocab_sizes(model)
    named: dict[str, int] = {}
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        shape = []
        for ax, d in enumerate(i.shape):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:
                key = d if isinstance(d, str) and d else f"{i.name}:{ax}"
                named.setdefault(key, batch if ax == 0 else seq)
                shape.append(named[key])
        big = [d for d in i.shape[1:] if isinstance(d, int) and d > MAX_FIXED_DIM]
        if big or math.prod(shape) > MAX_INPUT_ELEMENTS:
            # a fixed axis of 10^6 makes attention allocate S^2 scores: refuse, never run out of memory
            raise AttnpassError(f"input {i.name!r} has shape {list(i.shape)}: too large for generated validation "
                                f"inputs (an axis above {MAX_FIXED_DIM} or over {MAX_INPUT_ELEMENTS} elements); give "
                                "--inputs or --no-validate")
        dt = _NP.get(i.type)
        if dt is None:
            raise AttnpassError(f"input {i.name!r} has type {i.type}: give inputs with --inputs")
        name = i.name.lower()
        if "mask" in name:
            x = np.ones(shape, dtype=dt)
            if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 2:
                x[1:, ..., -max(1, shape[-1] // 4):] = 0  # real padding on the later sequences
        elif "position" in name and np.issubdtype(dt, np.integer):
            x = np.broadcast_to(np.arange(shape[-1], dtype=dt), shape).copy()
        elif np.issubdtype(dt, np.integer):
            x = rng.integers(0, vocab.get(i.name, 2), size=shape).astype(dt)
        elif dt is np.bool_:
            x = np.ones(shape, dtype=bool)
        else:
            x = rng.standard_normal(shape).astype(dt)
        feeds[i.name] = x
    return feeds


def load_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """Feeds from an ``.npz`` file (one array per input name)."""
    p = Path(path)
    if not p.is_file():
        raise AttnpassError(f"{p}: no such inputs file")
    try:
        with np.load(p) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise AttnpassError(f"{p}: not a readable .npz file ({type(e).__name__})") from e


def run(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    try:
        outs = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as e:
        raise AttnpassError(f"onnxruntime failed to run {Path(model).name if isinstance(model, str | Path) else 'the model'}: "
                            f"{_ort_message(e)}") from e
    return dict(zip(names, outs))


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float, atol: float) -> ValidationReport:
    rep = ValidationReport(rtol=rtol, atol=atol)
    for name, r in ref.items():
        g = got.get(name)
        if g is None:
            rep.outputs.append(OutputCheck(name, float("inf"), float("inf"), False, False))
            continue
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r64.shape != g64.shape:
            rep.outputs.append(OutputCheck(name, float("inf"), float("inf"), False))
            continue
        diff = np.abs(r64 - g64)
        diff = np.where(np.isnan(r64) & np.isnan(g64), 0.0, diff)
        max_abs = float(np.nanmax(diff, initial=0.0)) if not np.isnan(diff).any() else float("nan")
        rel = diff / np.maximum(np.abs(r64), 1e-12)
        max_rel = float(np.max(rel, initial=0.0)) if not np.isnan(rel).any() else float("nan")
        ok = bool(np.all(diff <= atol + rtol * np.abs(r64)))
        rep.outputs.append(OutputCheck(name, max_abs, max_rel, ok, bool(np.isfinite(g64).all())))
    return rep


def validate(a: Any, b: Any, inputs: dict[str, np.ndarray] | str | Path | None = None,
             rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, seq: int = 16) -> ValidationReport:
    """Run ``a`` and ``b`` in onnxruntime on the same inputs and compare every output of ``a``.

    ``a``/``b``: paths, ModelProtos or onnx-ir models.  ``inputs``: feeds, an ``.npz`` path, or None
    (generated from ``a``'s inputs).
    """
    for m in (a, b):
        if isinstance(m, str | Path) and not Path(m).is_file():
            raise AttnpassError(f"{m}: {'not a file' if Path(m).exists() else 'no such file'}")
    if isinstance(inputs, str | Path):
        feeds = load_inputs(inputs)
    elif inputs is None:
        feeds = make_inputs(a, seq=seq)
    else:
        feeds = dict(inputs)
    rep = compare(run(a, feeds), run(b, feeds), rtol, atol)
    rep.input_shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    return rep


def finite(model: Any, feeds: dict[str, np.ndarray]) -> list[str]:
    """Outputs of ``model`` holding NaN or inf on ``feeds`` (empty: all finite)."""
    outs = run(model, feeds)
    return [k for k, v in outs.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]


class _CallableModule(types.ModuleType):
    """``attnpass.validate(a, b, ...)`` keeps working after ``attnpass.validate`` the module is imported.

    Importing a submodule sets it as the package attribute of the same name, which would shadow
    the ``validate`` function the package exports; calling the module calls the function.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> ValidationReport:
        return validate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
