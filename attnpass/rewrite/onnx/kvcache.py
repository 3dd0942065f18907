"""SSMax for the decode-time attention ops: ``n`` counted over the KV cache the way each op counts its keys.

A decode step's query sees every cached key, so ``n`` must come from the op's own length inputs, never from
the length of the K it is handed (one new key per step).  Measured against onnxruntime's CPU kernels:

* ``com.microsoft.GroupQueryAttention`` (always causal): query ``i`` of batch entry ``b`` sits at
  ``pos = seqlens_k[b] + 1 - S + i`` (``pos = i`` on the first prompt, ``S == total_sequence_length``) and
  sees keys ``pos - W < j <= pos`` with ``local_window_size = W`` (all ``j <= pos`` without one):
  ``n = min(pos + 1, W)``.  Rotary and packed QKV take the same scaled Q (a per-row factor commutes with the
  rotation); packed QKV scales only the query heads of the packed input.
* ``Attention`` (opset 23+) with ``past_key``: query ``i`` sits at ``p = P + i`` (``is_causal``: ``j <= p``); with
  ``nonpad_kv_seqlen`` (opset 24, K/V a cache buffer) keys ``j < L_b`` count and ``p = L_b - S + i``; without
  either ``p = i``.  ``left_window_size``/``right_window_size`` (opset 25) keep ``p - left <= j <= p + right``.
  A mask input or a window is counted on the broadcast ``[.., S, T]`` bool.
* ``com.microsoft.Attention`` projects Q inside, so no factor can reach it: it is decomposed into its
  projections (``MatMul`` + ``Add`` + ``Slice``) and a ``com.microsoft.MultiHeadAttention`` that takes the scaled
  Q, the same ``mask_index`` (``[B]`` key lengths or a ``[B, T]`` key mask) and the packed ``past`` split into
  ``past_key``/``past_value``; ``present`` is stacked back from the op's ``present_key``/``present_value``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from attnpass.passes import onnx_kv
from attnpass.passes.onnx_shapes import _at
from attnpass.passes.plan import KeepTerm, Plan
from attnpass.passes.site import MaskKind, Notes
from attnpass.rewrite.onnx import keys as K
from attnpass.rewrite.onnx.builder import _and_all, _Builder, _factor, _replace_keeping_name, _size, _to_float

I64 = ir.DataType.INT64


def _i64(b: _Builder, v: ir.Value) -> ir.Value:
    return v if v.dtype == I64 else b.op("Cast", [v], {"to": I64})


def _row_major(b: _Builder, x: ir.Value) -> ir.Value:
    """``[B|1, S|1]`` per-row values as ``[B|1, 1, S|1, 1]`` float32 (the factor's layout)."""
    return b.op("Unsqueeze", [b.op("Cast", [x], {"to": ir.DataType.FLOAT}), b.ints(1, 3)])


def keys_per_row(b: _Builder, ad: Any, node: ir.Node, sq: ir.Value, skv: ir.Value) -> tuple[ir.Value, str] | None:
    """``(n, how)`` for a GroupQueryAttention or a KV-cache ``Attention`` (None: another op).

    ``sq`` is the query length and ``skv`` the length of the K the op is given (int64 scalars); ``n`` is
    float32 ``[B|1, 1|H, S|1, 1]``.
    """
    ins = list(node.inputs)
    i = b.op("Unsqueeze", [b.op("Range", [b.const(0, np.int64), sq, b.const(1, np.int64)]), b.ints(0)])  # [1, S]
    sq1 = b.op("Unsqueeze", [sq, b.ints(0)])
    if onnx_kv.is_gqa(node):
        seq = _i64(b, ins[onnx_kv.GQA_SEQLENS_K])
        total = b.op("Reshape", [_i64(b, ins[onnx_kv.GQA_TOTAL_LEN]), b.ints(1)])
        later = b.op("Sub", [b.op("Add", [seq, b.ints(1)]), sq1])  # a later step: the queries are the last S keys
        off = b.op("Where", [b.op("Equal", [sq1, total]), b.ints(0), later])
        n = b.op("Add", [b.op("Add", [b.op("Unsqueeze", [off, b.ints(1)]), i]), b.ints(1)])  # [B, S]
        window = int(ad._attr_raw(node, "local_window_size", -1) or -1)
        how = "GroupQueryAttention's seqlens_k and total_sequence_length (causal over the KV cache)"
        if window > 0:
            n = b.op("Min", [n, b.ints(window)])
            how += f", local window {window}"
        return _row_major(b, n), how
    if not onnx_kv.attention_kv(node):
        return None
    past, nonpad = _at(ins, onnx_kv.ATT_PAST_KEY), _at(ins, onnx_kv.ATT_NONPAD)
    if nonpad is not None:
        length = _i64(b, nonpad)  # [B]
        off = b.op("Sub", [length, sq1])
        total, how = skv, "nonpad_kv_seqlen"
    elif past is not None:
        p = b.op("Unsqueeze", [_size(b, past, 2), b.ints(0)])
        off, length = p, b.op("Add", [p, b.op("Unsqueeze", [skv, b.ints(0)])])  # [1]
        total, how = b.op("Add", [_size(b, past, 2), skv]), "past length"
    else:
        off, length, total, how = b.ints(0), b.op("Unsqueeze", [skv, b.ints(0)]), skv, "key length"
    causal = bool(ad._attr_raw(node, "is_causal", 0))
    left, right = onnx_kv.window(node)
    rows = b.op("Add", [b.op("Unsqueeze", [off, b.ints(1)]), i])  # [B|1, S]: each row's own position among the keys
    mask = _at(ins, onnx_kv.ATT_MASK)
    how += "".join(f", {w} window {n}" for w, n in (("left", left), ("right", right)) if n >= 0)
    if mask is None and left < 0 and right < 0:
        len1 = b.op("Unsqueeze", [length, b.ints(1)])
        n = b.op("Min", [b.op("Max", [b.op("Add", [rows, b.ints(1)]), b.ints(0)]), len1]) if causal else len1
        return _row_major(b, n), f"{how}{' under is_causal' if causal else ''}"
    parts = []
    if mask is not None:
        keep = K.keep(b, KeepTerm(mask, MaskKind.BOOL if ad.is_bool(mask) else MaskKind.ADDITIVE))
        parts.append(b.op("Expand", [keep, b.ints(1, 1, 1, 1)]))  # rank 4 without growing it
        how += " and the mask"
    j = b.op("Range", [b.const(0, np.int64), total, b.const(1, np.int64)])  # [T]
    rows4 = b.op("Unsqueeze", [rows, b.ints(1, 3)])  # [B|1, 1, S, 1]
    if causal:
        parts.append(b.op("LessOrEqual", [j, rows4]))
    if left >= 0:
        parts.append(b.op("GreaterOrEqual", [j, b.op("Sub", [rows4, b.ints(left)])]))
    if right >= 0:
        parts.append(b.op("LessOrEqual", [j, b.op("Add", [rows4, b.ints(right)])]))
    if nonpad is not None:
        parts.append(b.op("Less", [j, b.op("Unsqueeze", [length, b.ints(1, 2, 3)])]))  # [B, 1, 1, T]
    allowed = _and_all(b, parts)
    full = b.op("Expand", [allowed, b.op("Concat", [b.ints(1, 1, 1), b.op("Unsqueeze", [total, b.ints(0)])], {"axis": 0})])
    n = b.op("ReduceSum", [b.op("Cast", [full], {"to": ir.DataType.FLOAT}), b.ints(-1)], {"keepdims": 1})
    return n, f"{how}{' under is_causal' if causal else ''}"


def _scale_heads(b: _Builder, x: ir.Value, f: ir.Value, heads: int, groups: int = 0) -> ir.Value:
    """``x`` (``[B, S, (H + groups) * D]``) with its first ``H`` heads times the factor ``f`` (``[.., H, S, 1]``)."""
    ft = b.op("Transpose", [b.op("Expand", [f, b.ints(1, 1, 1, 1)])], {"perm": [0, 2, 1, 3]})  # [B|1, S|1, H, 1]
    x4 = b.op("Reshape", [x, b.ints(0, 0, heads + groups, -1)])
    if groups:
        lead = b.op("Shape", [x4], {"end": 2})
        ft = b.op("Expand", [ft, b.op("Concat", [lead, b.ints(1, 1)], {"axis": 0})])  # [B, S, H, 1]
        ones = b.op("ConstantOfShape", [b.op("Concat", [lead, b.ints(groups, 1)], {"axis": 0})],
                    {"value": ir.tensor(np.ones(1, np.float32))})
        ft = b.op("Concat", [ft, ones], {"axis": 2})
    out = b.op("Reshape", [b.op("Mul", [_to_float(b, x4), ft]), b.ints(0, 0, -1)])
    return out if x.dtype in (None, ir.DataType.FLOAT) else b.op("Cast", [out], {"to": x.dtype})


def ssmax_packed_gqa(model: ir.Model, ad: Any, plan: Plan, notes: Notes) -> None:
    """GroupQueryAttention with Q, K and V packed in one input: only the query heads take the factor."""
    site, node = plan.site, plan.site.softmax
    bld = _Builder(node, f"attnpass/ssmax_{site.index}")
    q = node.inputs[0]
    heads, kv_heads = int(site.heads), int(site.kv_heads or site.heads)
    n, how = keys_per_row(bld, ad, node, _size(bld, q, 1), _size(bld, q, 1))  # type: ignore[misc]
    notes.add(site, f"SSMax n counted from the {how}; packed QKV: the query heads pre-scaled by the factor")
    f = _factor(model, bld, site, n, plan.s, plan.b, 4)
    new_q = _scale_heads(bld, q, f, heads, 2 * kv_heads)
    bld.commit()
    node.replace_input_with(0, new_q)


def ssmax_ms_attention(model: ir.Model, ad: Any, plan: Plan, notes: Notes) -> None:
    """``com.microsoft.Attention`` decomposed so the factor reaches Q (see the module docstring)."""
    site, node = plan.site, plan.site.softmax
    ins = list(node.inputs)
    x, w, bias = ins[0], ins[1], _at(ins, 2)
    mask, past = _at(ins, onnx_kv.MSA_MASK_INDEX), _at(ins, onnx_kv.MSA_PAST)
    heads = int(site.heads)
    sizes = ad._attr_raw(node, "qkv_hidden_sizes")
    sizes = [int(s) for s in sizes] if sizes is not None else [int(ad.shape(w)[1]) // 3] * 3
    bld = _Builder(node, f"attnpass/ssmax_{site.index}")
    qkv = bld.op("MatMul", [x, w])
    if bias is not None:
        qkv = bld.op("Add", [qkv, bias])
    bounds = np.cumsum([0, *sizes])
    q, k, v = (bld.op("Slice", [qkv, bld.ints(int(bounds[t])), bld.ints(int(bounds[t + 1])), bld.ints(-1)]) for t in range(3))
    sq = _size(bld, x, 1)
    p = _size(bld, bld.op("Gather", [past, bld.const(0, np.int64)], {"axis": 0}), 2) if past is not None else bld.const(0, np.int64)
    total = bld.op("Add", [p, sq])
    causal = bool(ad._attr_raw(node, "unidirectional", 0))
    i = bld.op("Unsqueeze", [bld.op("Range", [bld.const(0, np.int64), sq, bld.const(1, np.int64)]), bld.ints(0)])  # [1, S]
    rows = bld.op("Add", [i, p])  # the last key each row may see
    if mask is None:
        t1 = bld.op("Unsqueeze", [total, bld.ints(0, 1)])
        n = _row_major(bld, bld.op("Min", [bld.op("Add", [rows, bld.ints(1)]), t1]) if causal else t1)
    else:
        j = bld.op("Range", [bld.const(0, np.int64), total, bld.const(1, np.int64)])
        if len(ad.shape(mask) or ()) == 1:  # key lengths
            keep = bld.op("Less", [j, bld.op("Unsqueeze", [_i64(bld, mask), bld.ints(1)])])
        else:
            keep = bld.op("Not", [bld.op("Equal", [mask, bld.op("CastLike", [bld.const(0, np.int64), mask])])])
        allowed = bld.op("Unsqueeze", [keep, bld.ints(1, 2)])  # [B, 1, 1, T]
        if causal:
            allowed = bld.op("And", [allowed, bld.op("LessOrEqual", [j, bld.op("Unsqueeze", [rows, bld.ints(1, 3)])])])
        n = bld.op("ReduceSum", [bld.op("Cast", [allowed], {"to": ir.DataType.FLOAT}), bld.ints(-1)], {"keepdims": 1})
    notes.add(site, "SSMax n counted from the past length, mask_index and unidirectional; com.microsoft.Attention "
                    "decomposed into its projections and a MultiHeadAttention taking the pre-scaled Q")
    f = _factor(model, bld, site, n, plan.s, plan.b, 4)
    new_q = _scale_heads(bld, q, f, heads)
    attrs: dict[str, Any] = {"num_heads": heads, "unidirectional": int(causal)}
    for name in ("scale", "mask_filter_value"):
        if ad._attr_raw(node, name) is not None:
            attrs[name] = float(ad._attr_raw(node, name))
    pk = pv = None
    if past is not None:
        pk, pv = (bld.op("Gather", [past, bld.const(t, np.int64)], {"axis": 0}) for t in (0, 1))
    present = node.outputs[1] if len(node.outputs) > 1 else None
    want_present = present is not None and (bool(present.uses()) or present.is_graph_output())
    n_out = 3 if want_present else 1
    outs = bld.tape.op_multi_out("MultiHeadAttention", [new_q, k, v, None, mask, None, pk, pv], attrs, domain=onnx_kv.MS,
                                 num_outputs=n_out, name=f"{bld.prefix}/MultiHeadAttention")
    stacked = None
    if want_present:
        stacked = bld.op("Concat", [bld.op("Unsqueeze", [outs[1], bld.ints(0)]), bld.op("Unsqueeze", [outs[2], bld.ints(0)])], {"axis": 0})
    bld.commit()
    _replace_keeping_name(node.outputs[0], outs[0])
    if stacked is not None:
        _replace_keeping_name(present, stacked)
    node.graph.remove(node, safe=True)


__all__ = ["keys_per_row", "ssmax_packed_gqa", "ssmax_ms_attention"]
