"""What ``torch.export`` needs to take a model as users have it: HF caches, and dynamic batch/sequence axes.

A Hugging Face model arrives with ``use_cache=True`` and returns a ``DynamicCache``, which
``torch.export`` cannot flatten until it is registered as a pytree node; transformers ships that
registration for its own export path, and we call the same helper.  Example inputs fix every axis
unless told otherwise; users expect a rewritten model to serve other batch sizes and lengths, so the
batch and sequence axes are exported as ``Dim.AUTO`` (dynamic where the model allows, static where
it does not, never an error).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch


def prepare_hf_export(model: torch.nn.Module) -> None:
    """Register HF's cache classes with pytree (HF's own export helper) when ``model`` is a transformers model."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, getattr(transformers, "PreTrainedModel", ())):
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:  # older transformers: the hint in the error message says what to pass instead
        return
    register_dynamic_cache_export_support()


def no_cache_kwargs(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``use_cache=False`` for a transformers model whose config turns the cache on and whose
    caller did not choose: an exported file scores whole sequences, and a cache among its outputs would be
    per-layer tensors nobody feeds back."""
    config = getattr(model, "config", None)
    transformers = sys.modules.get("transformers")
    if (transformers is None or not isinstance(model, getattr(transformers, "PreTrainedModel", ()))
            or "use_cache" in kwargs or not getattr(config, "use_cache", False)):
        return kwargs
    return {**kwargs, "use_cache": False}


def cache_hint(e: BaseException) -> str:
    """One line saying what to pass when the export failed on a KV cache."""
    text = str(e)
    if "Cache" in text and ("pytree" in text or "not a known type" in text):
        return " (a KV cache in the outputs: pass use_cache=False in kwargs)"
    return ""


def _seq_axis(t: torch.Tensor) -> int | None:
    """The sequence axis by layout convention: ``[B, S]`` / ``[B, S, E]`` ids, masks and hidden states,
    ``[B, H, S, D]`` attention operands."""
    return {2: 1, 3: 1, 4: 2}.get(t.dim())


def _axes(t: Any) -> Any:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    axes = {0: torch.export.Dim.AUTO}
    seq = _seq_axis(t)
    if seq is not None:
        axes[seq] = torch.export.Dim.AUTO
    return axes


def default_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """``dynamic_shapes`` for ``torch.export``: batch and sequence axes of each top-level tensor input as
    ``Dim.AUTO``; ``None`` when the inputs cannot be named from ``forward``'s signature (then shapes stay fixed)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(_axes(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: _axes(v) for k, v in value.items()}
        else:
            shapes[name] = _axes(value)
    if not any(v is not None for v in shapes.values()):
        return None
    return shapes


#: torch's warning when an example input of batch 1 fixes an axis our default asked as ``Dim.AUTO``, and its logger.
SPECIALIZED = "0/1 specialized; Dim.AUTO was specified"
SPECIALIZED_LOGGER = "torch._export.non_strict_utils"


class _DropSpecialized(logging.Filter):
    """Drops that one message: ``Dim.AUTO`` is our default, not the user's request, and an axis it leaves static is
    what ``Dim.AUTO`` promises (dynamic where the model allows), so the line would only alarm someone calling ``fuse``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return SPECIALIZED not in record.getMessage()


@contextlib.contextmanager
def quiet_auto_specialization() -> Iterator[None]:
    """While our default ``dynamic_shapes`` are exported: torch's 0/1-specialization warning is dropped, every
    other record of that logger (and every other logger) is kept; the filter is removed on exit."""
    logger = logging.getLogger(SPECIALIZED_LOGGER)
    drop = _DropSpecialized()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


__all__ = ["cache_hint", "default_dynamic_shapes", "no_cache_kwargs", "prepare_hf_export", "quiet_auto_specialization"]
