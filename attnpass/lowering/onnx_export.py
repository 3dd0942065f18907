"""torch -> (rewritten) -> ONNX, checked in onnxruntime against torch eager on the same inputs.

``rewrite="fused"`` exports the graph of ``attnpass.fuse``: its ``torch.ops.attnpass.attention``
calls are translated (a ``custom_translation_table`` entry for the dynamo exporter, written with
onnxscript's opset 23) into one opset-23 ``Attention`` op.  ``rewrite="ssmax"`` exports the graph
of ``attnpass.to_ssmax``, whose per-row factor is ordinary ops (n counted from the masks at run
time) with ``s`` as initializers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnpass.errors import AttnpassError
from attnpass.spec import RewriteSpec

FUSED_OPSET = 23


def _attention_onnx(q, k, v, attn_mask=None, is_causal=False, scale=None, ssmax_s=None, ssmax_b=None,
                    softcap=None, enable_gqa=False):
    """ONNX translation of ``attnpass::attention`` (trace-only onnxscript): opset-23 ``Attention``.

    The op's second output (log-sum-exp, kept for the training backward) has no ONNX counterpart;
    rewritten graphs never read it in inference.  A zeros tensor of its shape (``q.shape[:-1]``) stands in
    for it so the exporter's bookkeeping lines up; dead-code elimination removes it from the file.
    """
    from onnxscript import opset23 as op

    if ssmax_s is not None or ssmax_b is not None:
        raise AttnpassError("ONNX export of attnpass.attention with SSMax parameters: export with rewrite='ssmax' instead")
    if is_causal and _lengths_differ(q, k):
        raise AttnpassError(
            "ONNX export of attnpass.attention(is_causal=True) with queries and keys of different lengths "
            f"({_seq(q)} vs {_seq(k)}): ONNX Attention aligns is_causal top-left, attnpass bottom-right; "
            "pass the causal mask explicitly")
    kwargs: dict[str, Any] = {"is_causal": int(bool(is_causal))}
    if scale is not None:
        kwargs["scale"] = float(scale)
    if softcap:
        kwargs["softcap"] = float(softcap)
    out = op.Attention(q, k, v, attn_mask, **kwargs) if attn_mask is not None else op.Attention(q, k, v, **kwargs)
    if isinstance(out, tuple | list):
        out = out[0]  # Y; the optional present_key / present_value / qk outputs stay unused
    lse = op.ReduceMax(op.Mul(q, op.CastLike(0.0, q)), [-1], keepdims=0)
    return out, lse


def _seq(x: Any) -> Any:
    """The sequence dimension (``-2``) of a traced value, or None where its shape is unknown."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    return shape[len(shape) - 2]


def _lengths_differ(q: Any, k: Any) -> bool:
    """Queries and keys have known sequence lengths that are not the same (two numbers, or two symbols)."""
    a, b = _seq(q), _seq(k)
    if a is None or b is None:
        return False
    a_int, b_int = isinstance(a, int), isinstance(b, int)
    if a_int and b_int:
        return a != b
    if a_int or b_int:
        return False  # a number against a symbol: not known to differ
    return str(a) != str(b) and str(a) not in ("", "None") and str(b) not in ("", "None")


def translation_table() -> dict[Any, Any]:
    """The dynamo exporter's ``custom_translation_table`` entry for ``torch.ops.attnpass.attention``."""
    import attnpass.lowering.ops  # noqa: F401  (registers the op)

    return {torch.ops.attnpass.attention.default: _attention_onnx}


@dataclass
class ExportResult:
    """Where the model went and how far onnxruntime's outputs are from torch eager's."""

    path: Path
    rewrite: str | None
    max_abs: float
    ok: bool
    sites: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "rewrite": self.rewrite, "max_abs": self.max_abs, "ok": self.ok, "sites": self.sites}


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if hasattr(x, "to_tuple"):
        x = x.to_tuple()
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, list | tuple):
        return [t for item in x for t in _tensors(item)]
    return []


def _onnx_export(target: Any, args: tuple, kwargs: dict, opset: int, table: Any, dynamic_shapes: Any) -> Any:
    """``torch.onnx.export`` with the batch and sequence axes dynamic unless the caller fixed them (a model that
    cannot be exported so is exported at the example's shapes, with a warning)."""
    import warnings

    from attnpass.export_inputs import default_dynamic_shapes, quiet_auto_specialization

    def once(shapes: Any) -> Any:
        # the exporter's optimizer applies onnxscript's opset-23 fusions; its RotaryEmbedding fusion gives
        # cos/sin caches of the example's length on a dynamic sequence axis (onnxruntime then rejects any
        # other length), so the fused (opset-23) export with dynamic axes is written unoptimized
        return torch.onnx.export(target, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                 custom_translation_table=table, dynamic_shapes=shapes, verbose=False,
                                 optimize=opset != FUSED_OPSET or shapes is None)

    auto = default_dynamic_shapes(target, args, kwargs) if dynamic_shapes is None else None
    if auto is None:
        return once(dynamic_shapes)
    try:
        with quiet_auto_specialization():
            return once(auto)
    except Exception as e:  # noqa: BLE001  (retried at fixed shapes; that attempt's error is the one reported)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"attnpass.export: {type(target).__name__} could not be exported with dynamic batch/sequence "
                      f"axes ({first}); the file takes the example's shapes only", stacklevel=3)
        return once(None)


def export(model: torch.nn.Module, args: Any, kwargs: dict | None, path: str | Path, rewrite: str | None = None,
           s: float | None = None, rtol: float = 1e-4, atol: float = 1e-4, dynamic_shapes: Any = None,
           spec: RewriteSpec | None = None) -> ExportResult:
    """Export ``model`` (optionally rewritten) to ONNX and check it in onnxruntime against torch eager.

    The reference is the original model for ``None`` and ``"fused"`` (same meaning), and the
    rewritten module for ``"ssmax"`` (a different model on purpose).  ``spec`` replaces ``rewrite``/``s``
    (fused SSMax cannot be exported: the opset-23 op has no SSMax factor).  Raises ``AttnpassError``
    and leaves no file if the numbers differ.  A Hugging Face model is exported without its KV cache
    (``use_cache=False`` unless ``kwargs`` says otherwise: the file scores whole sequences); batch and
    sequence axes are dynamic unless ``dynamic_shapes`` fixes them.
    """
    import attnpass
    from attnpass.export_inputs import no_cache_kwargs
    from attnpass.validate import run

    args = args if isinstance(args, tuple) else (args,)
    kwargs = no_cache_kwargs(model, kwargs or {})
    path = Path(path)
    if spec is None and rewrite is not None:
        if rewrite not in ("ssmax", "fused", "fuse"):
            raise AttnpassError(f"unknown rewrite {rewrite!r}: use ssmax, fused or None")
        spec = RewriteSpec.of(rewrite, s=s, ssmax=False)
    if spec is not None and spec.fused_ssmax:
        raise AttnpassError("fused SSMax cannot be exported to ONNX: export --to ssmax, or rewrite the exported "
                            "model with `attnpass rewrite --to fused --ssmax`")
    rewrite = None if spec is None else spec.to
    sites = 0
    table = None
    opset = 18
    if rewrite is None:
        target: torch.nn.Module = model
    elif rewrite == "fused":
        target = attnpass.fuse(model, args, kwargs)
        sites = sum(1 for s_ in target.attnpass_report.sites if s_.fusable)
        table, opset = translation_table(), FUSED_OPSET
    elif rewrite == "ssmax":
        target = attnpass.to_ssmax(model, args, kwargs, s=spec.s_value, b=spec.b)
        sites = len(target.attnpass_report.sites)
    else:
        raise AttnpassError(f"unknown rewrite {rewrite!r}: use ssmax, fused or None")
    with torch.no_grad():
        ref = _tensors((target if rewrite == "ssmax" else model)(*args, **kwargs))
    if path.is_dir():
        raise AttnpassError(f"{path}: is a directory (give a file name)")
    if not path.parent.is_dir():
        raise AttnpassError(f"{path}: output directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            onnx_program = _onnx_export(target, args, kwargs, opset, table, dynamic_shapes)
        except AttnpassError:
            raise
        except Exception as e:  # the exporter raises many types; the user needs the model and the first line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise AttnpassError(f"torch.onnx.export could not export {type(target).__name__}: {first}") from e
        try:
            onnx_program.save(str(tmp), external_data=False)
        except OSError as e:
            raise AttnpassError(f"{path}: cannot write ({e.strerror or type(e).__name__}); nothing written") from e
        sess_inputs = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        from attnpass.validate import session

        names = [i.name for i in session(tmp).get_inputs()]
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, sess_inputs)}
        got = list(run(tmp, feeds).values())
        max_abs = max(float(np.max(np.abs(g - r.detach().numpy()))) for g, r in zip(got, ref))
        ok = all(np.allclose(g, r.detach().numpy(), rtol=rtol, atol=atol) for g, r in zip(got, ref)) and len(got) == len(ref)
        if not ok:
            raise AttnpassError(f"exported model differs from torch eager: max abs error {max_abs:.3g}; nothing written")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportResult(path, rewrite, max_abs, ok, sites)
