"""Numerics through onnxruntime: a rewritten model against its original, on inputs that look real.

Generated inputs respect each input's type and dynamic axes: token ids stay inside the embedding
table they index (read from the ``Gather`` they feed), inputs that feed an attention site's mask
(found from the graph, whatever their name) carry real padding (the later sequences of the batch
are padded at the end) in the mask's own convention, position ids count up, floats are normal.
Outputs compare equal where both hold the same NaN/inf; a comparison that fails says why.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnpass.errors import AttnpassError
from attnpass.kvfeeds import apply as apply_kv
from attnpass.kvfeeds import kv_inputs
from attnpass.maskfeeds import MaskInput, mask_inputs
from attnpass.maskfeeds import padding as _padding
from attnpass.result import json_safe

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
    reason: str | None = None  # why the numbers could not be compared or the NaN/inf do not line up

    def as_dict(self) -> dict[str, Any]:
        return json_safe({"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel, "ok": self.ok,
                          "finite": self.finite, "reason": self.reason})


@dataclass
class ValidationReport:
    """Per-output comparison of two models on the same inputs (``passed``: every output within tolerance)."""

    outputs: list[OutputCheck] = field(default_factory=list)
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def bounded(self) -> bool:
        """Whether there was a tolerance: an SSMax model against its original has none (it differs on purpose),
        so its deviations are numbers to read, and only finiteness passes or fails."""
        return math.isfinite(self.rtol) and math.isfinite(self.atol)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.ok for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def as_dict(self) -> dict[str, Any]:
        outputs = [o.as_dict() for o in self.outputs]
        if not self.bounded:  # no tolerance, so no "ok" per output: "finite" is what was checked
            outputs = [{**o, "ok": None} for o in outputs]
        return json_safe({"passed": self.passed, "rtol": self.rtol if self.bounded else None,
                          "atol": self.atol if self.bounded else None, "bounded": self.bounded,
                          "inputs": {k: list(v) for k, v in self.input_shapes.items()}, "outputs": outputs})


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


def _vocab_sizes(model: Any) -> dict[str, int]:
    """For integer inputs that index an embedding table: the table's row count."""
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


def _graph_hints(model: Any) -> tuple[dict[str, int], dict[str, MaskInput], dict[str, tuple[str, int]]]:
    """What the graph says about its inputs: embedding sizes, the inputs that feed attention masks, and those
    that feed a KV-cache op's cache or lengths (``kvfeeds``)."""
    import onnx_ir as ir

    from attnpass.modelio import EXTERNAL_DATA_BYTES, load, weights_bytes

    try:
        loaded = model if isinstance(model, ir.Model) else load(model)
    except AttnpassError:
        return {}, {}, {}
    # the matcher reads initializer values (mask buffers, scales): on a model whose weights stay on disk that
    # would bring gigabytes into memory next to onnxruntime's copy, so those fall back to input names
    big = weights_bytes(loaded) > EXTERNAL_DATA_BYTES
    hints = _vocab_sizes(loaded), ({} if big else mask_inputs(loaded)), kv_inputs(loaded)
    if loaded is not model:
        # an onnx-ir graph is a web of cycles (nodes <-> values): collect it now, before onnxruntime loads
        # the same weights, so a model near the 2 GB limit is never held twice
        del loaded
        gc.collect()
    return hints


def make_inputs(model: Any, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: dynamic axes get ``batch`` (axis 0) or ``seq``, consistently per dim name."""
    rng = np.random.default_rng(seed)
    vocab, masks, kv = ({}, {}, {}) if hasattr(model, "get_inputs") else _graph_hints(model)
    sess = model if hasattr(model, "get_inputs") else session(model)
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
        if i.name in masks:
            x = masks[i.name].values(_padding(shape), dt)
        elif "mask" in name:  # a mask the matcher did not link to a site: the usual 1 = keep convention
            x = _padding(shape).astype(dt)
        elif "logits_to_keep" in name and np.issubdtype(dt, np.integer):
            # HF's ``logits_to_keep``: 0 keeps every row; a random 1 would keep the last row only, and with
            # padding that row can be one that sees a single key, where SSMax and softmax agree
            x = np.zeros(shape, dtype=dt)
        elif "position" in name and np.issubdtype(dt, np.integer):  # position_ids, cache_position: 0..S-1
            x = np.broadcast_to(np.arange(shape[-1], dtype=dt), shape).copy()
        elif np.issubdtype(dt, np.integer):
            x = rng.integers(0, vocab.get(i.name, 2), size=shape).astype(dt)
        elif dt is np.bool_:
            x = np.ones(shape, dtype=bool)
        else:
            x = rng.standard_normal(shape).astype(dt)
        feeds[i.name] = x
    apply_kv(feeds, kv, seq)
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
    missing = sorted(wanted - set(feeds))
    if missing:
        label = Path(model).name if isinstance(model, str | Path) else "the model"
        raise AttnpassError(f"{label} takes input(s) {missing} that the feeds do not have (feeds: {sorted(feeds)})")
    try:
        outs = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as e:
        raise AttnpassError(f"onnxruntime failed to run {Path(model).name if isinstance(model, str | Path) else 'the model'}: "
                            f"{_ort_message(e)}") from e
    return dict(zip(names, outs))


def _nonfinite_mismatch(r: np.ndarray, g: np.ndarray) -> str | None:
    """Where the two disagree on NaN/inf (a NaN against a number, +inf against -inf), in words; None if they agree."""
    rn, gn = np.isnan(r), np.isnan(g)
    ri, gi = np.isinf(r), np.isinf(g)
    bad = (rn != gn) | (ri != gi) | (ri & gi & (np.sign(r) != np.sign(g)))
    if not bad.any():
        return None
    idx = tuple(int(x) for x in np.argwhere(bad)[0])
    return (f"{int(bad.sum())} value(s) are NaN/inf in one model only (first at {list(idx)}: "
            f"{r[idx]:g} vs {g[idx]:g})")


def _all_finite(x: np.ndarray) -> bool:
    return not np.issubdtype(x.dtype, np.floating) or bool(np.isfinite(x).all())


def compare_output(name: str, r: np.ndarray, g: np.ndarray, rtol: float, atol: float) -> OutputCheck:
    """One output: equal where both hold the same NaN / the same inf; the finite rest within ``atol + rtol |r|``."""
    r, g = np.asarray(r), np.asarray(g)
    if r.dtype.kind != g.dtype.kind and {r.dtype.kind, g.dtype.kind} != {"i", "u"}:  # float vs int vs bool
        return OutputCheck(name, float("inf"), float("inf"), False, _all_finite(g),
                           reason=f"dtypes differ: {r.dtype} vs {g.dtype}")
    r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
    finite_g = bool(np.isfinite(g64).all())
    if r64.shape != g64.shape:
        return OutputCheck(name, float("inf"), float("inf"), False, finite_g,
                           reason=f"shapes differ: {list(r64.shape)} vs {list(g64.shape)}")
    both = np.isfinite(r64) & np.isfinite(g64)
    diff = np.where(both, np.abs(np.where(both, r64, 0.0) - np.where(both, g64, 0.0)), 0.0)
    max_abs = float(np.max(diff, initial=0.0))
    max_rel = float(np.max(diff / np.maximum(np.abs(np.where(both, r64, 0.0)), 1e-12), initial=0.0))
    mismatch = _nonfinite_mismatch(r64, g64)
    ok = mismatch is None and bool(np.all(diff <= atol + rtol * np.abs(np.where(both, r64, 0.0))))
    return OutputCheck(name, max_abs, max_rel, ok, finite_g, reason=mismatch)


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float, atol: float) -> ValidationReport:
    """Every output of ``ref`` against the output of the same name in ``got``."""
    rep = ValidationReport(rtol=rtol, atol=atol)
    for name, r in ref.items():
        g = got.get(name)
        if g is None:
            rep.outputs.append(OutputCheck(name, float("inf"), float("inf"), False, False,
                                           reason=f"the second model has no output {name!r} (its outputs: {sorted(got)})"))
            continue
        rep.outputs.append(compare_output(name, r, g, rtol, atol))
    return rep


def nonfinite_outputs(outs: dict[str, np.ndarray]) -> dict[str, str]:
    """Output name -> "NaN" or "inf" for float outputs that hold either."""
    bad = {}
    for k, v in outs.items():
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            bad[k] = "NaN" if np.isnan(v).any() else "inf"
    return bad


def _generated_inputs_error(bad: dict[str, str]) -> AttnpassError:
    what = ", ".join(f"{kind} at output {name}" for name, kind in bad.items())
    return AttnpassError(f"the original model gives {what} on generated inputs, so they cannot validate the rewrite; "
                         "pass --inputs feeds.npz (inputs=...) with real inputs")


def check_reference(model: Any, feeds: dict[str, np.ndarray]) -> None:
    """Generated inputs must give the original finite outputs: otherwise no comparison means anything."""
    bad = nonfinite_outputs(run(model, feeds))
    if bad:
        raise _generated_inputs_error(bad)


def validate(a: Any, b: Any, inputs: dict[str, np.ndarray] | str | Path | None = None,
             rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, seq: int = 16) -> ValidationReport:
    """Run ``a`` and ``b`` in onnxruntime on the same inputs and compare every output of ``a``.

    ``a``/``b``: paths, ModelProtos or onnx-ir models.  ``inputs``: feeds, an ``.npz`` path, or None
    (generated from ``a``'s inputs).  A failure on generated inputs where ``a`` itself gives NaN/inf
    raises ``AttnpassError`` asking for real inputs rather than reporting a meaningless error.
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
    ref = run(a, feeds)
    rep = compare(ref, run(b, feeds), rtol, atol)
    rep.input_shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    if inputs is None and not rep.passed and nonfinite_outputs(ref):
        raise _generated_inputs_error(nonfinite_outputs(ref))
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
