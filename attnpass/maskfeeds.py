"""Which graph inputs feed an attention mask, and what values make them a realistic mask.

Validating on Gaussian noise for a mask input tests nothing (and a float mask of noise can make the
original model itself give NaN).  The matcher already knows each site's mask terms; walking from
those values back to the graph inputs finds the mask inputs whatever their name ("attn_bias",
"key_padding", ...).  An input that reaches a term only through layout ops (Cast, Reshape,
Unsqueeze, Expand, ...) IS the mask, so it gets the term's own convention: booleans that equal
``attend_when`` where keys stay, or an additive bias of 0 and ``finfo.min``.  One that goes
through arithmetic first (HF's ``(1 - mask) * min``) is a keep-mask: 1 where keys stay, 0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Ops that move or retype a mask without changing what it says.
LAYOUT_OPS = frozenset({"Cast", "CastLike", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten", "Expand",
                        "Slice", "Transpose", "Tile", "Gather"})
#: Ops whose output depends on their input's shape or type only: a mask built from ``Shape(x)`` says nothing
#: about ``x``'s values, so ``x`` is not a mask input.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range", "EyeLike"})
#: How far back from a mask term an input is looked for (masks are built in a handful of ops).
MAX_DEPTH = 24


@dataclass(frozen=True)
class MaskInput:
    """How to generate one mask-feeding input: ``style`` is "bool" (the input is the boolean term),
    "bias" (the input is the additive term) or "keep" (1 = attend, 0 = padding, any dtype)."""

    style: str
    attend_when: bool = True

    def values(self, keep: np.ndarray, dtype: Any) -> np.ndarray:
        """The input for a keep pattern (True where a key is attended)."""
        if self.style == "bool":
            return (keep if self.attend_when else ~keep).astype(dtype)
        if self.style == "bias" and np.issubdtype(dtype, np.floating):
            return np.where(keep, 0.0, np.finfo(dtype).min).astype(dtype)
        return keep.astype(dtype)


def padding(shape: list[int]) -> np.ndarray:
    """A keep pattern with real padding: every key of the first sequence, the later ones padded at the end."""
    keep = np.ones(shape, dtype=bool)
    if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 2:
        keep[1:, ..., -max(1, shape[-1] // 4):] = False
    return keep


def _is_float(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and dtype.is_floating_point()


def _is_bool(value: Any) -> bool:
    import onnx_ir as ir

    return getattr(value, "dtype", None) == ir.DataType.BOOL


def _inputs_of(value: Any, graph_inputs: dict[int, Any]) -> list[tuple[Any, bool, bool]]:
    """Graph inputs ``value`` is computed from: (input, reached through layout ops only, polarity flipped)."""
    found: list[tuple[Any, bool, bool]] = []
    seen: set[int] = set()
    stack: list[tuple[Any, bool, bool, int]] = [(value, True, False, 0)]
    while stack:
        v, plain, flipped, depth = stack.pop()
        if v is None or id(v) in seen or depth > MAX_DEPTH:
            continue
        seen.add(id(v))
        if id(v) in graph_inputs:
            found.append((v, plain, flipped))
            continue
        node = v.producer()
        if node is None:
            continue
        op = node.op_type
        if op in SHAPE_ONLY_OPS:
            continue
        layout = op in LAYOUT_OPS and (op != "Cast" or _is_bool(v) == _is_bool(node.inputs[0]))
        # only the data operand of a layout op carries the mask; its shapes, indices and types do not
        for src in node.inputs[:1] if layout else node.inputs:
            stack.append((src, plain and layout, flipped != (op == "Not"), depth + 1))
    return found


def mask_inputs(model: Any) -> dict[str, MaskInput]:
    """Graph input name -> how to generate it, for every input that feeds a site's mask in ``model``."""
    from attnpass.passes import onnx as onnx_pass

    try:
        report = onnx_pass.find(model)
    except Exception:  # a model the matcher cannot read validates with the generic inputs
        return {}
    graph_inputs = {id(v): v for v in model.graph.inputs}
    out: dict[str, MaskInput] = {}
    for site in report.sites:
        terms = [(m.value, m.kind, m.attend_when) for m in site.masks]
        if site.sdpa_mask is not None:
            terms.append((site.sdpa_mask, "bool" if _is_bool(site.sdpa_mask) else "additive", True))
        for value, kind, attend_when in terms:
            for inp, plain, flipped in _inputs_of(value, graph_inputs):
                if plain and kind == "bool" and _is_bool(inp):
                    how = MaskInput("bool", attend_when != flipped)
                elif plain and kind == "additive" and _is_float(inp):
                    how = MaskInput("bias")
                else:
                    how = MaskInput("keep")
                out.setdefault(inp.name, how)
    return out


__all__ = ["MaskInput", "mask_inputs", "padding"]
