"""Generated validation inputs for the KV-cache attention ops: an empty cache, and lengths that agree with it.

Random values for ``past_key``, ``seqlens_k`` or ``total_sequence_length`` describe no state a generation loop
can be in (onnxruntime refuses most of them: a mask shorter than past + new keys, a total shorter than the keys).
A graph input that reaches one of those op inputs through layout ops gets instead: a past of length 0 (the
first prompt, whatever its dimension is named), ``seqlens_k = S - 1`` and ``total_sequence_length = S`` for
the generated query length ``S``.  A decode step over a real cache needs ``--inputs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnpass.maskfeeds import LAYOUT_OPS

MS = "com.microsoft"
#: (domain, op) -> (input index, role, the axis a "past" input is long on)
ROLES: dict[tuple[str, str], tuple[tuple[int, str, int], ...]] = {
    (MS, "GroupQueryAttention"): ((3, "past", 2), (4, "past", 2), (5, "seqlens", 0), (6, "total", 0)),
    (MS, "Attention"): ((4, "past", 3),),
    (MS, "MultiHeadAttention"): ((6, "past", 2), (7, "past", 2)),
    ("", "Attention"): ((4, "past", 2), (5, "past", 2)),
}


def _graph_input(model: Any, v: Any) -> Any:
    """The graph input ``v`` is, or comes from through layout ops (None: computed)."""
    for _ in range(8):
        if v is None:
            return None
        if v in model.graph.inputs:
            return v
        p = v.producer()
        if p is None or p.op_type not in LAYOUT_OPS or not p.inputs:
            return None
        v = p.inputs[0]
    return None


def kv_inputs(model: Any) -> dict[str, tuple[str, int]]:
    """``{graph input name: (role, axis)}`` for the inputs that feed a KV-cache op's cache or lengths."""
    import onnx_ir as ir

    out: dict[str, tuple[str, int]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        dom = "" if node.domain in ("", "ai.onnx") else node.domain
        for idx, role, axis in ROLES.get((dom, node.op_type), ()):
            src = _graph_input(model, node.inputs[idx] if idx < len(node.inputs) else None)
            if src is not None and src.name:
                out[src.name] = (role, axis)
    return out


def apply(feeds: dict[str, np.ndarray], kv: dict[str, tuple[str, int]], seq: int) -> None:
    """Make the generated ``feeds`` a first prompt of ``seq`` tokens for the inputs ``kv_inputs`` found."""
    for name, (role, axis) in kv.items():
        x = feeds.get(name)
        if x is None:
            continue
        if role == "past" and x.ndim > axis:
            shape = list(x.shape)
            shape[axis] = 0
            feeds[name] = np.zeros(shape, x.dtype)
        elif role in ("seqlens", "total"):
            feeds[name] = np.full(x.shape, seq - 1 if role == "seqlens" else seq, x.dtype)


__all__ = ["kv_inputs", "apply"]
