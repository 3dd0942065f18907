"""The ONNX ``Attention`` op (opset 23) as torch-mlir's ONNX importer leaves it: ``torch.operator "onnx.Attention"``.

torch-mlir has no lowering for that op, so a module holding it cannot be compiled; attnpass sees it as an
already-fused site (``Kind.SDPA``) and the MLIR emitter replaces it by the loop nest.  Its inputs are
``Q, K, V[, attn_mask[, past_key, past_value]]`` and its attributes ``torch.onnx.<name>``; this module reads
them in the matcher's vocabulary (the same answers ``passes/onnx.py`` gives for the ONNX op itself).
"""

from __future__ import annotations

import math
from typing import Any

from attnpass.passes.site import FusedOpInfo

OP_NAME = "onnx.Attention"


def is_attention_op(node: Any) -> bool:
    """True for ``torch.operator "onnx.Attention"`` (a ``passes.mlir._Node``)."""
    return node.opname == "torch.operator" and "name" in node.op.attributes and node.op.attributes["name"].value == OP_NAME


def attr(node: Any, name: str, default: Any = None) -> Any:
    """The op's attribute in the matcher's names (``is_causal`` a bool, ``scale``/``softcap`` floats)."""
    if name in ("dropout_p",):
        return 0.0
    if name == "enable_gqa":
        return False
    key = f"torch.onnx.{name}"
    if key not in node.op.attributes:
        if name == "scale":
            return _default_scale(node)
        return default
    value = node.op.attributes[key].value
    return bool(value) if name == "is_causal" else value


def _default_scale(node: Any) -> float | None:
    """The schema's default ``1/sqrt(head_size)`` for a 3-D Q, whose last axis packs the heads; None for 4-D,
    where the matcher's ``1/sqrt(Q.shape[-1])`` is already the head size."""
    q, heads = node.operands[0].shape, attr(node, "q_num_heads")
    if q is None or len(q) != 3 or not isinstance(q[2], int) or not heads:
        return None
    return 1.0 / math.sqrt(q[2] // heads)


def window(node: Any, side: str) -> int:
    """``left_window_size`` / ``right_window_size`` (opset 24+); -1, the schema's default, is no window."""
    value = attr(node, f"{side}_window_size", -1)
    return -1 if value is None else int(value)


def inputs(node: Any) -> list[Any]:
    """``[Q, K, V, attn_mask or None]``: an absent optional input is a ``!torch.none`` operand or no operand."""
    ops = list(node.operands[:4]) + [None] * (4 - min(4, len(node.operands)))
    return [None if o is not None and o.type == "!torch.none" else o for o in ops]


def _present(o: Any) -> bool:
    return o is not None and o.type != "!torch.none"


def past_kv(node: Any) -> tuple[Any, Any] | None:
    """``(past_key, past_value)`` (``[B, H_kv, P, D]``), or None without a KV cache input."""
    ops = list(node.operands[4:6])
    return (ops[0], ops[1]) if len(ops) == 2 and all(_present(o) for o in ops) else None


def nonpad_kv_seqlen(node: Any) -> Any:
    """The ``[B]`` count of valid keys per batch entry (opset 24), or None."""
    ops = list(node.operands[6:7])
    return ops[0] if ops and _present(ops[0]) else None


def used(v: Any) -> bool:
    """A result somebody reads (the function's return counts)."""
    return _present(v) and (bool(v.users) or v.returned)


def presents(node: Any) -> tuple[Any, Any] | None:
    """The ``present_key`` / ``present_value`` results when either is read."""
    res = list(node.results[1:3])
    return (res[0], res[1]) if len(res) == 2 and any(used(r) for r in res) else None


def qk_output(node: Any) -> tuple[Any, int] | None:
    """``(qk_matmul_output, qk_matmul_output_mode)`` when that 4th output is read (mode 0: scaled scores,
    1: soft-capped, 2: with the mask, 3: the probabilities)."""
    if len(node.results) < 4 or not used(node.results[3]):
        return None
    return node.results[3], int(attr(node, "qk_matmul_output_mode", 0) or 0)


def _cache_blocker(node: Any) -> str | None:
    """What the loop nest cannot take around a KV cache: ``present = concat(past, new)`` is emitted, then
    attention runs over every key (causal and window masks offset by the past length); a mask narrower than the
    keys is not."""
    past = past_kv(node)
    if nonpad_kv_seqlen(node) is not None:  # a per-batch key limit in the loop nest (``rewrite/mlir/kv_len.py``)
        return "nonpad_kv_seqlen of onnx.Attention with a KV cache input is not rewritten in MLIR" if past else None
    if past is None:
        return None
    k, mask = node.operands[1], inputs(node)[3]
    shapes = [k.shape, *(p.shape for p in past)]
    if any(s is None or any(not isinstance(d, int) for d in s) for s in shapes) or any(len(p.shape) != 4 for p in past):
        return "KV cache of onnx.Attention with dynamic or non 4-D past_key/past_value is not rewritten in MLIR"
    total = past[0].shape[2] + (k.shape[1] if len(k.shape) == 3 else k.shape[2])
    if mask is not None and (mask.shape is None or mask.shape[-1] != total):
        return "onnx.Attention with an attn_mask narrower than past + new keys (padded with -inf) is not rewritten in MLIR"
    return None


#: The start of the reason an op whose probabilities are an output is not fused (SSMax still replaces it).
PROBS_OUT = "not fusable: the attention probabilities are an output"


def blockers(node: Any, fuse: str | None, ssmax: str | None) -> tuple[str | None, str | None]:
    """The op's (fuse, SSMax) blockers.  SSMax replaces the op by the loop nest too (torch-mlir cannot lower it),
    so what blocks one blocks both; returned probabilities (mode 3) block only fusing: SSMax computes them beside
    the loop nest."""
    ssmax = ssmax or fuse
    if (qk_output(node) or (None, 0))[1] == 3:
        fuse = f"{PROBS_OUT} (onnx.Attention qk_matmul_output_mode=3)" + (f"; {fuse}" if fuse else "")
    return fuse, ssmax


def info(node: Any) -> FusedOpInfo:
    """Head counts of a 3-D Q (``q_num_heads`` / ``kv_num_heads``), softcap, and what the rewrites cannot do.

    A 3-D op (``[B, S, H*D]``) is rewritten too: the loop nest unpacks the heads around itself
    (``rewrite/mlir/packed_heads.py``), so only a head count that does not split the last axis blocks it.
    A KV cache (``past_key``/``past_value`` in, ``present_*`` out) and ``qk_matmul_output`` are emitted around
    the loop nest (``rewrite/mlir/attention_op.py``).
    """
    q, k = node.operands[0].shape, node.operands[1].shape
    three_d = q is not None and len(q) == 3
    heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
    extra: dict[str, Any] = {}
    if three_d:
        extra = {"heads": heads, "kv_heads": kv_heads or heads, "seq_q": q[1], "seq_k": k[1] if k else None,
                 "head_dim": q[2] // heads if isinstance(q[2], int) and heads else None}
    blocker = _cache_blocker(node)
    if blocker is None and three_d and not (isinstance(heads, int) and heads > 0 and isinstance(q[2], int) and q[2] % heads == 0):
        blocker = "3-D onnx.Attention without a static q_num_heads dividing Q's last axis is not rewritten in MLIR"
    return FusedOpInfo(three_d=three_d, softcap=attr(node, "softcap"), op_name=OP_NAME, ssmax_blocker=blocker, **extra)


__all__ = ["OP_NAME", "is_attention_op", "attr", "inputs", "info", "window", "past_kv", "presents", "qk_output", "used",
           "blockers", "PROBS_OUT", "nonpad_kv_seqlen"]
