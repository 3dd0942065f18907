"""SSMax in standard ONNX ops, from a plan: Q (or the scores, or a fused op's Q) times ``s log n + b``.

``n`` comes from the plan's key factors (``keys.count``), never from the example length; the bias terms
the plan names are scaled with the factor, hard masks are not (``semantics.attention``).
"""

from __future__ import annotations

import onnx_ir as ir

from attnpass import semantics
from attnpass.passes import onnx_kv
from attnpass.passes.onnx import MS, OnnxAdapter, _at, _domain
from attnpass.passes.plan import KeepTerm, Plan
from attnpass.passes.site import MaskKind, Notes
from attnpass.rewrite.onnx import keys as K
from attnpass.rewrite.onnx import kvcache
from attnpass.rewrite.onnx.builder import _Builder, _expand_heads, _factor, _float_min, _scores_shape, _size, _to_float, to_view


def ssmax_explicit(model: ir.Model, ad: OnnxAdapter, plan: Plan, notes: Notes) -> None:
    """SSMax on an explicit chain: Q pre-scaled by the per-row factor where the chain allows, else the scores.

    ``(f_i q_i) . k_j = f_i (q_i . k_j)``: scaling Q costs ``O(S D)`` per head where scaling the scores
    costs two ``S x S`` passes (the multiply, and the ``Where`` that keeps masked keys masked when
    ``f = 0``).  Masks added after the matmul stay masks; a finite bias is scaled with the factor.
    Soft-capping applies the factor after the cap, so those chains, and layouts where Q is not
    ``[..., S_q, D]`` in the scores' rank, take the scores route.
    """
    site = plan.site
    qk = _qk_matmul(ad, plan) if plan.factor_on_q else None
    if qk is None:
        _ssmax_scores(model, plan, notes)
        return
    bld = _Builder(qk, f"attnpass/ssmax_{site.index}")
    q, kt = qk.inputs[0], qk.inputs[1]
    # the scores' shape from the operands (the scores themselves come after Q, which now depends on n)
    full = bld.op("Concat", [bld.op("Shape", [q], {"end": -1}), bld.op("Shape", [kt], {"start": -1})], {"axis": 0})
    n, how = K.count(bld, plan.keys, _size(bld, q, -2), _size(bld, kt, -1), full)
    notes.add(site, f"SSMax n counted from the {K.HOW[how]}; Q pre-scaled by the factor")
    f = _factor(model, bld, site, n, plan.s, plan.b, site.out_rank)
    new_q = bld.op("Mul", [_to_float(bld, q), f])
    if q.dtype not in (None, ir.DataType.FLOAT):
        new_q = bld.op("Cast", [new_q], {"to": q.dtype})
    scaled_terms = []
    for m in plan.bias_terms:
        t = m.value if m.coeff == 1.0 else bld.op("Mul", [m.value, bld.scalar_like(m.coeff, m.value)])
        keep = bld.op("Greater", [t, bld.scalar_like(semantics.MASKED_BELOW, t)])
        fm = f if m.view is None else to_view(bld, f, m.view, q)  # the term stays where it is added: in the head view
        scaled = bld.op("CastLike", [bld.op("Mul", [_to_float(bld, m.value), fm]), m.value])
        scaled_terms.append((m, bld.op("Where", [keep, scaled, m.value])))
    bld.commit()
    qk.replace_input_with(0, new_q)
    for m, t in scaled_terms:
        m.node.replace_input_with(list(m.node.inputs).index(m.value), t)
    qk.graph.sort()  # the masks the factor reads may come later in node order than the Q K^T matmul


def _qk_matmul(ad: OnnxAdapter, plan: Plan) -> ir.Node | None:
    """The site's ``Q K^T`` MatMul if Q can carry the factor there (see ``ssmax_explicit``), else None."""
    site = plan.site
    qk = next((n for n in site.nodes if isinstance(n, ir.Node) and n.op_type == "MatMul"), None)
    if qk is None or qk.graph is None or len(ad.shape(qk.inputs[0]) or ()) != site.out_rank:
        return None
    for m in plan.bias_terms:
        if not isinstance(m.node, ir.Node) or m.value not in list(m.node.inputs) or m.node.op_type not in ("Add", "Sub"):
            return None
    # a mask computed from the scores themselves (top-k style) would make Q depend on its own product
    if any(_reaches(m.value, qk) for m in site.masks):
        return None
    return qk


def _reaches(v: ir.Value, target: ir.Node, limit: int = 4096) -> bool:
    """True if ``target`` is an ancestor of ``v``."""
    stack, seen = [v], set()
    while stack and len(seen) < limit:
        x = stack.pop()
        p = x.producer() if isinstance(x, ir.Value) else None
        if p is None or id(p) in seen:
            continue
        if p is target:
            return True
        seen.add(id(p))
        stack.extend(i for i in p.inputs if i is not None)
    return len(seen) >= limit


def _ssmax_scores(model: ir.Model, plan: Plan, notes: Notes) -> None:
    """SSMax on the softmax input: ``Where(allowed, x * f, finfo.min)`` (``semantics.ssmax_logits``)."""
    site = plan.site
    sm = site.softmax
    x = sm.inputs[0]
    bld = _Builder(sm, f"attnpass/ssmax_{site.index}")
    n, how = K.count(bld, plan.keys, _size(bld, x, -2), _size(bld, x, -1), bld.op("Shape", [x]))
    notes.add(site, f"SSMax n counted from the {K.HOW[how]}; scores scaled by the factor")
    f = _factor(model, bld, site, n, plan.s, plan.b, site.out_rank)
    z = bld.op("Mul", [_to_float(bld, x), f])
    if x.dtype not in (None, ir.DataType.FLOAT):
        z = bld.op("Cast", [z], {"to": x.dtype})
    allowed = K.allowed(bld, plan.keep_terms)
    if allowed is not None:
        z = bld.op("Where", [allowed, z, bld.scalar_like(_float_min(x), z)])
    bld.commit()
    sm.replace_input_with(0, z)


def ssmax_fused_op(model: ir.Model, ad: OnnxAdapter, plan: Plan, notes: Notes) -> None:
    """SSMax on an already-fused op: its Q times the factor, and the finite part of a float mask with it."""
    site = plan.site
    node = site.softmax
    dom, op = _domain(node), node.op_type
    if onnx_kv.is_ms_attention(node) or onnx_kv.is_gqa(node) and onnx_kv.gqa_packed(node):
        (kvcache.ssmax_ms_attention if onnx_kv.is_ms_attention(node) else kvcache.ssmax_packed_gqa)(model, ad, plan, notes)
        return
    bld = _Builder(node, f"attnpass/ssmax_{site.index}")
    q, k = node.inputs[0], node.inputs[1]
    heads = site.heads
    if site.three_d:
        kv_heads = site.kv_heads or heads
        q4 = bld.op("Transpose", [bld.op("Reshape", [q, bld.ints(0, 0, int(heads), -1)])], {"perm": [0, 2, 1, 3]})
        k4 = bld.op("Transpose", [bld.op("Reshape", [k, bld.ints(0, 0, int(kv_heads), -1)])], {"perm": [0, 2, 1, 3]})
    else:
        q4, k4 = q, k
    mask_index = 5 if (dom, op) == (MS, "MultiHeadAttention") else 3
    mask = None if onnx_kv.is_gqa(node) else _at(list(node.inputs), mask_index)
    kv = kvcache.keys_per_row(bld, ad, node, _size(bld, q4, 2), _size(bld, k4, 2))
    if kv is not None:  # the op counts its keys over a KV cache, from its own length inputs
        n, how = kv
        notes.add(site, f"SSMax n counted from the {how}")
    else:
        n, how = K.count(bld, plan.keys, _size(bld, q4, 2), _size(bld, k4, 2), _scores_shape(bld, q4, k4))
        notes.add(site, f"SSMax n counted from the {K.HOW[how]}")
    f = _factor(model, bld, site, n, plan.s, plan.b, 4)  # [B, H, S_q, 1]
    if site.three_d:
        qf = bld.op("Mul", [_to_float(bld, bld.op("Reshape", [q, bld.ints(0, 0, int(heads), -1)])),
                           bld.op("Transpose", [_expand_heads(bld, f)], {"perm": [0, 2, 1, 3]})])
        new_q = bld.op("Reshape", [qf, bld.ints(0, 0, -1)])
    else:
        new_q = bld.op("Mul", [_to_float(bld, q), f])
    if q.dtype not in (None, ir.DataType.FLOAT):
        new_q = bld.op("Cast", [new_q], {"to": q.dtype})
    new_mask = None
    if mask is not None and plan.fused_mask_bias:
        keep = K.keep(bld, KeepTerm(mask, MaskKind.ADDITIVE))
        scaled = bld.op("CastLike", [bld.op("Mul", [_to_float(bld, mask), f]), mask])
        new_mask = bld.op("Where", [keep, scaled, mask])
    bld.commit()
    node.replace_input_with(0, new_q)
    if new_mask is not None:
        node.replace_input_with(mask_index, new_mask)
