"""One fused attention op per planned site: ``com.microsoft.MultiHeadAttention`` (``ort``) or ``Attention`` (opset 23).

GQA and multi-query K/V are repeated to the query heads for MultiHeadAttention as the plan says
(onnxruntime's CPU GroupQueryAttention is decode-oriented: causal only, with seqlens/KV-cache inputs);
opset-23 ``Attention`` takes the grouped K/V as they are.  With SSMax, Q is multiplied by the per-row factor and the bias terms with it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from attnpass import semantics
from attnpass.passes.onnx import MS, OnnxAdapter
from attnpass.passes.plan import Action, Plan, key_plan
from attnpass.passes.site import AttentionSite, Notes
from attnpass.rewrite.onnx import keys as K
from attnpass.rewrite.onnx.builder import (
    _Builder,
    _factor,
    _float_min,
    _function_of,
    _lift,
    _lift_axes,
    _prepare,
    _replace_keeping_name,
    _scores_shape,
    _size,
    _to_float,
    lay_out,
)


def _op_bias(b: _Builder, plan: Plan, q4: ir.Value, k4: ir.Value, factor: ir.Value | None = None) -> ir.Value | None:
    """The fused op's additive bias: additive terms (times their coefficients) summed, bool terms as finfo.min.

    With an SSMax ``factor`` (Q pre-scaled by it), a bias term's finite, attendable entries are logits and
    are scaled by the factor too (``semantics.ssmax_sdpa``); hard masks need no scaling.
    """
    bias_terms = {id(m) for m in plan.bias_terms}
    rank = plan.site.out_rank
    add: ir.Value | None = None
    for term in plan.op_mask_additive:
        m = term.term
        v = lay_out(b, m.value, m.view)
        t = v if m.coeff == 1.0 else b.op("Mul", [v, b.scalar_like(m.coeff, v)])
        t = _lift(b, t, rank)  # laid out on the op's 4-D scores before the factor (already 4-D) meets it
        if factor is not None and id(m) in bias_terms:
            keep = b.op("Greater", [t, b.scalar_like(semantics.MASKED_BELOW, t)])
            t = b.op("Where", [keep, b.op("CastLike", [b.op("Mul", [_to_float(b, t), factor]), t]), t])
        add = t if add is None else b.op("Add", [add, t])
    keep = K.allowed(b, plan.op_mask_bool)
    keep = None if keep is None else _lift(b, keep, rank)
    if add is not None:
        add = b.op("CastLike", [add, q4])
    if keep is not None:
        base = add if add is not None else b.op("CastLike", [b.const(0.0, np.float32), q4])
        add = b.op("Where", [keep, base, b.scalar_like(_float_min(q4), q4)])
    if add is None:
        return None
    target = b.op("Concat", [b.ints(1, 1), b.op("Shape", [q4], {"start": 2, "end": 3}), b.op("Shape", [k4], {"start": 2, "end": 3})], {"axis": 0})
    return b.op("Expand", [add, target])


def fuse_site(model: ir.Model, ad: OnnxAdapter, plan: Plan, target: str, notes: Notes) -> None:
    """Replace one planned site (``FUSE`` or ``SSMAX_FUSED``) by the target's fused op."""
    site = plan.site
    mms = [n for n in site.nodes if n.op_type in ("MatMul", "Einsum")]
    anchor = mms[-1]
    b = _Builder(anchor, f"attnpass/fused_{site.index}")
    q = site.q.value
    for factor, divide in site.q_scales:  # run-time tensors right-aligned against q as against the scores
        q = b.op("Div" if divide else "Mul", [q, b.op("CastLike", [factor, q])])
    q4 = _prepare(b, replace(site.q, value=q))
    k4 = _prepare(b, replace(site.k, groups=plan.k_repeat))
    v4 = _prepare(b, replace(site.v, groups=plan.v_repeat))
    factor, n = None, None
    if plan.action is Action.SSMAX_FUSED:
        n, how = K.count(b, plan.keys, _size(b, q4, 2), _size(b, k4, 2), _scores_shape(b, q4, k4))
        n = _lift(b, n, site.out_rank)
        notes.add(site, f"SSMax n counted from the {K.HOW[how]}; Q pre-scaled by the factor")
        factor = _factor(model, b, site, n, plan.s, plan.b, 4)
        qdt = site.q.value.dtype
        scaled = b.op("Mul", [q4 if qdt in (None, ir.DataType.FLOAT) else b.op("Cast", [q4], {"to": ir.DataType.FLOAT}), factor])
        q4 = scaled if qdt in (None, ir.DataType.FLOAT) else b.op("Cast", [scaled], {"to": qdt})
    bias = _op_bias(b, plan, q4, k4, factor)
    heads = int(plan.heads)
    if target == "ort":
        to3 = [b.op("Reshape", [b.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), b.ints(0, 0, -1)]) for x in (q4, k4, v4)]
        out3 = b.op("MultiHeadAttention", [*to3, None, None, bias], {"num_heads": heads, "scale": float(plan.scale)}, domain=MS)
        out = b.op("Transpose", [b.op("Reshape", [out3, b.ints(0, 0, heads, -1)])], {"perm": [0, 2, 1, 3]})
    else:
        attrs: dict[str, Any] = {"scale": float(plan.scale)}
        if plan.softcap is not None:
            attrs["softcap"] = float(plan.softcap)
        out = b.op("Attention", [q4, k4, v4, bias], attrs)
        if plan.finite_fill:
            out = _uniform_empty_rows(b, ad, site, out, q4, k4, v4, n)
    if site.q.rank < 4:
        out = b.op("Squeeze", [out, b.ints(*_lift_axes(site.q.rank))])
    if site.out_perm is not None:
        out = b.op("Transpose", [out], {"perm": list(site.out_perm)})
    for g in plan.guards:
        c = g.cond if g.zero_when else b.op("Not", [g.cond])
        out = b.op("Where", [c, b.op("CastLike", [b.const(0.0, np.float32), out]), out])
    if site.out.dtype is not None and site.q.value.dtype not in (None, site.out.dtype):
        out = b.op("Cast", [out], {"to": site.out.dtype})
    b.commit()
    _replace_keeping_name(site.out, out)
    fn = _function_of(model, anchor)
    if fn is not None:  # a function body imports its own opsets
        if target == "ort":
            fn.opset_imports.setdefault(MS, 1)
        else:
            fn.opset_imports[""] = max(fn.opset_imports.get("", 1), 23)


def _uniform_empty_rows(b: _Builder, ad: OnnxAdapter, site: AttentionSite, out: ir.Value, q4: ir.Value,
                        k4: ir.Value, v4: ir.Value, n: ir.Value | None) -> ir.Value:
    """Rows with no attendable key, as the original graph computes them.

    With a finite mask value (``finfo.min``) every logit of such a row rounds to the same number, so the
    original softmax is uniform and the row is the mean of V (a sliding window over right padding does
    this in Gemma-2).  Opset-23 ``Attention`` gives those rows zeros instead; this puts the mean back.
    """
    if n is None:
        n, _ = K.count(b, key_plan(site, ad), _size(b, q4, 2), _size(b, k4, 2), _scores_shape(b, q4, k4))
        n = _lift(b, n, site.out_rank)
    mean_v = b.op("ReduceMean", [v4, b.ints(2)], {"keepdims": 1})  # [B, H_kv, 1, D]
    g = site.v.groups
    if g > 1:
        x = b.op("Expand", [b.op("Unsqueeze", [mean_v, b.ints(2)]), b.ints(1, 1, g, 1, 1)])
        target = b.op("Concat", [b.op("Shape", [mean_v], {"start": 0, "end": 1}), b.ints(-1), b.op("Shape", [mean_v], {"start": 2, "end": 4})], {"axis": 0})
        mean_v = b.op("Reshape", [x, target])
    empty = b.op("Equal", [n, b.const(np.zeros(1, np.float32))])
    return b.op("Where", [empty, b.op("CastLike", [mean_v, out]), out])
