"""What the ONNX adapter knows about the decode-time attention ops (a KV cache, counted lengths).

``com.microsoft.GroupQueryAttention`` (causal, keys counted from ``seqlens_k``), ``com.microsoft.Attention``
(Q/K/V projected inside from packed weights, ``mask_index``, a packed ``past``) and the standard ``Attention``
with ``past_key``/``past_value`` (opset 23) or ``nonpad_kv_seqlen`` (opset 24) count the keys of a row from
their own inputs, not from a mask the matcher can read.  This module says which inputs each reads and when
SSMax cannot be applied to one; ``rewrite/onnx/kvcache.py`` counts ``n`` the way the op does and scales Q.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from attnpass.passes.onnx_shapes import _at

MS = "com.microsoft"

#: Input positions of the ops' KV-cache inputs.
GQA_PAST_KEY, GQA_SEQLENS_K, GQA_TOTAL_LEN, GQA_BIAS, GQA_HEAD_SINK = 3, 5, 6, 10, 11
MSA_MASK_INDEX, MSA_PAST, MSA_BIAS, MSA_PAST_LEN = 3, 4, 5, 6
ATT_MASK, ATT_PAST_KEY, ATT_PAST_VALUE, ATT_NONPAD = 3, 4, 5, 6


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def is_gqa(node: ir.Node) -> bool:
    return (_domain(node), node.op_type) == (MS, "GroupQueryAttention")


def is_ms_attention(node: ir.Node) -> bool:
    return (_domain(node), node.op_type) == (MS, "Attention")


def gqa_packed(node: ir.Node) -> bool:
    """Q, K and V packed in the query input (``key``/``value`` absent)."""
    return _at(list(node.inputs), 1) is None


def window(node: ir.Node) -> tuple[int, int]:
    """The standard ``Attention``'s ``(left_window_size, right_window_size)`` (opset 25; -1: no limit)."""
    def get(name: str) -> int:
        a = node.attributes.get(name)
        return -1 if a is None else int(a.value)
    return get("left_window_size"), get("right_window_size")


def attention_kv(node: ir.Node) -> bool:
    """A standard ``Attention`` that counts its keys itself: a ``past_key`` or ``nonpad_kv_seqlen`` input (keys
    beyond its own K), or a sliding window (a limit no mask input shows)."""
    if (_domain(node), node.op_type) != ("", "Attention"):
        return False
    ins = list(node.inputs)
    return _at(ins, ATT_PAST_KEY) is not None or _at(ins, ATT_NONPAD) is not None or max(window(node)) >= 0


def _int_attr(ad: Any, node: ir.Node, name: str, default: int = 0) -> int:
    v = ad._attr_raw(node, name, default)
    return int(v) if v is not None else default


def gqa_blocker(ad: Any, node: ir.Node) -> str | None:
    """Why SSMax cannot scale a ``GroupQueryAttention``'s Q (None: it can; rotary and packed QKV are fine,
    a per-row factor commutes with the rotation)."""
    ins = list(node.inputs)
    if float(ad._attr_raw(node, "softcap", 0.0) or 0.0) > 0:
        return "GroupQueryAttention with softcap (the factor multiplies the capped scores)"
    if _int_attr(ad, node, "smooth_softmax") or _at(ins, GQA_HEAD_SINK) is not None:
        return "GroupQueryAttention with smooth softmax / head sink (an extra logit SSMax does not define)"
    if _at(ins, GQA_BIAS) is not None:
        return "GroupQueryAttention with attention_bias"
    if _at(ins, GQA_SEQLENS_K) is None or _at(ins, GQA_TOTAL_LEN) is None:
        return "GroupQueryAttention without seqlens_k / total_sequence_length"
    if any(k.endswith("quant_type") and str(a.value) not in ("NONE", "") for k, a in node.attributes.items()):
        return "GroupQueryAttention with a quantized KV cache"
    return None


def ms_attention_blocker(ad: Any, node: ir.Node) -> str | None:
    """Why ``com.microsoft.Attention`` cannot be decomposed into its projections and a ``MultiHeadAttention``
    that takes the scaled Q (None: it can)."""
    ins = list(node.inputs)
    if _int_attr(ad, node, "do_rotary"):
        return "com.microsoft.Attention with do_rotary (rotary inside the op)"
    if _int_attr(ad, node, "past_present_share_buffer") or _at(ins, MSA_PAST_LEN) is not None:
        return "com.microsoft.Attention sharing its past/present buffer"
    if _at(ins, MSA_BIAS) is not None:
        return "com.microsoft.Attention with attention_bias"
    sizes = ad._attr_raw(node, "qkv_hidden_sizes")
    if sizes is not None and int(sizes[0]) != int(sizes[1]):
        return "com.microsoft.Attention with Q and K of different hidden sizes"
    ws = ad.shape(ins[1])
    if sizes is None and (ws is None or len(ws) != 2 or not isinstance(ws[1], int)):
        return "com.microsoft.Attention weights of unknown width"
    mask = _at(ins, MSA_MASK_INDEX)
    if mask is not None:
        ms, xs = ad.shape(mask), ad.shape(ins[0])
        if ms is None or len(ms) not in (1, 2):
            return "com.microsoft.Attention mask_index other than [B] key lengths or a [B, T] key mask"
        if len(ms) == 1 and (xs is None or ms[0] != xs[0] or ms[0] is None):
            return "com.microsoft.Attention 1-D mask_index not known to be [B] (it may be [2B] end/start positions)"
    return None


def attention_kv_blocker(ad: Any, node: ir.Node) -> str | None:
    """Why SSMax cannot scale the Q of a standard ``Attention`` with a KV cache or a window (None: it can).

    A read ``qk_matmul_output`` does not block: the op computes it from the scaled Q, so afterwards it is the
    SSMax model's own intermediate, as in MLIR's rewrite of the op: the SSMax scores (mode 0), those plus the mask
    (mode 1, a logits bias scaled with them) or the SSMax probabilities (mode 3).  Soft-capping blocks: the op caps
    ``f * scores`` where SSMax multiplies the capped scores.
    """
    return softcap_blocker(ad, node)


def softcap_blocker(ad: Any, node: ir.Node) -> str | None:
    """A soft-capping ``Attention`` (with or without a KV cache): SSMax multiplies the capped scores, a factor on Q
    would be capped with them (``semantics.attention``), so the op cannot take it from outside."""
    if float(ad._attr_raw(node, "softcap", 0.0) or 0.0) > 0:
        return "Attention with softcap (the factor on Q would be capped with the scores)"
    return None


__all__ = ["is_gqa", "is_ms_attention", "gqa_packed", "attention_kv", "window", "gqa_blocker", "ms_attention_blocker",
           "attention_kv_blocker", "softcap_blocker"]
