"""Model-level entry points: export a torch model, find or rewrite its attention, hand back a module.

``torch.export`` gives the ATen graph the matcher reads, with the model's parameters attached;
the rewritten ``GraphModule`` is a real module (forward, backward, ``state_dict``, export again).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import fx

from attnpass.errors import AttnpassError
from attnpass.export_inputs import cache_hint, default_dynamic_shapes, prepare_hf_export, quiet_auto_specialization
from attnpass.passes import fx as fx_pass
from attnpass.passes.match import Report
from attnpass.passes.site import Emitted
from attnpass.result import RewriteResult
from attnpass.rewrite import fx as fx_rewrite
from attnpass.spec import RewriteSpec


def _as_graph(model: Any, args: tuple | None, kwargs: dict | None, dynamic_shapes: Any = None) -> fx.GraphModule:
    """An fx GraphModule for ``model``: used as is if it already is one, else ``torch.export``ed.

    Without ``dynamic_shapes`` the batch and sequence axes of the tensor inputs are exported as
    ``Dim.AUTO`` (dynamic where the model allows), so the rewritten module serves other lengths than the
    example's; a model that cannot be exported so is exported at the example's shapes, with a warning.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, torch.nn.Module):
        raise AttnpassError(f"attnpass wants an nn.Module, a GraphModule or an ExportedProgram, got {type(model).__name__}")
    if args is None:
        raise AttnpassError("attnpass needs example inputs (args, kwargs) to trace a module")
    args = args if isinstance(args, tuple) else (args,)
    kwargs = kwargs or {}
    prepare_hf_export(model)
    if dynamic_shapes is None:
        auto = default_dynamic_shapes(model, args, kwargs)
        if auto is not None:
            try:
                with quiet_auto_specialization():
                    return torch.export.export(model, args, kwargs, dynamic_shapes=auto, strict=False).module()
            except Exception as e:  # noqa: BLE001  (retried below at fixed shapes; that error is the one reported)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                warnings.warn(f"attnpass: {type(model).__name__} could not be exported with dynamic batch/sequence axes "
                              f"({first}); exporting at the example's shapes, so the result serves those shapes only",
                              stacklevel=3)
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; the user needs the model's name and the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnpassError(f"torch.export could not trace {type(model).__name__}: {first}{cache_hint(e)}") from e
    return ep.module()


def find(model: Any, args: tuple | None = None, kwargs: dict | None = None, dynamic_shapes: Any = None) -> Report:
    """Every softmax-in-attention in ``model`` (sites), and the softmaxes left alone with the reason."""
    return fx_pass.find(_as_graph(model, args, kwargs, dynamic_shapes))


def to_ssmax(
    model: Any,
    args: tuple | None = None,
    kwargs: dict | None = None,
    s: float | None = None,
    b: float | None = None,
    train_len: int | None = None,
    fused: bool = False,
    dynamic_shapes: Any = None,
    replace_existing: bool = False,
    fit_existing: bool = False,
) -> fx.GraphModule:
    """The model with every attention softmax turned into SSMax; ``s``/``b`` are trainable ``[H]`` parameters.

    ``train_len=L`` sets ``s = 1/log(L)`` (and ``b`` unset) so a pretrained model is unchanged at
    length ``L``.  ``fused=True`` also fuses every fusable site into ``attnpass::attention`` with the
    SSMax parameters (same meaning, fused speed).  The returned module carries the ``RewriteResult``
    as ``.attnpass_result`` (and the matcher's report as ``.attnpass_report``).  A site whose Q already
    carries a relative of SSMax (Llama 4 temperature tuning, ``llama_4_scaling``, Qwen-1 log-n, an earlier
    SSMax) is left alone unless ``replace_existing=True`` (that scaling removed, SSMax at ``s``) or
    ``fit_existing=True`` (removed, SSMax at the ``(s, b)`` closest to it).
    """
    spec = RewriteSpec.of("ssmax", s=s, b=b, train_len=train_len, fused=fused, replace_existing=replace_existing,
                          fit_existing=fit_existing)
    return _attach(*fx_rewrite.emitted(_as_graph(model, args, kwargs, dynamic_shapes), spec.resolve()), spec)


def fuse(model: Any, args: tuple | None = None, kwargs: dict | None = None, dynamic_shapes: Any = None) -> fx.GraphModule:
    """The model with each fusable attention chain replaced by one ``attnpass::attention`` call, and each
    softmax -> top-k / max / argmax (MoE routers, heads) by its single-pass form (``report.topk``).

    ``dynamic_shapes`` goes to ``torch.export`` (e.g. a ``Dim`` for the sequence axis) so one
    rewritten module serves every length.  ``.attnpass_result`` says which sites were left alone and why.
    """
    spec = RewriteSpec("fused")
    return _attach(*fx_rewrite.emitted(_as_graph(model, args, kwargs, dynamic_shapes), spec.resolve()), spec)


def _attach(gm: fx.GraphModule, done: Emitted, spec: RewriteSpec) -> fx.GraphModule:
    """The module keeps its answer: callers get the module back, and ask it what was rewritten."""
    gm.attnpass_report = done.report
    gm.attnpass_result = RewriteResult(done.report, spec, dict(done.left), ir="fx")
    return gm
