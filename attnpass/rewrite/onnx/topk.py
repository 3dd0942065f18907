"""The ONNX emitter for top-k sites (``passes/topk.py``), in standard ops only, so every runtime runs it.

No V-sized probability tensor is written: the selection reads the logits and the probabilities of the
selected entries come from one ``ReduceLogSumExp`` (``p_i = exp(x_i - logsumexp(x))``):

* ``TopK(Softmax(x))`` -> ``TopK(x)`` (same order: the softmax is monotonic) and ``Exp(v - ReduceLogSumExp(x))``;
  renormalised top-k weights (``w / ReduceSum(w)``) are the softmax of the k selected logits,
  ``Exp(v - ReduceLogSumExp(v))``, and need no pass over the row at all;
* ``ArgMax(Softmax(x))`` -> ``ArgMax(x)``; ``ReduceMax(Softmax(x))`` -> ``Exp(ReduceMax(x) - ReduceLogSumExp(x))``.
"""

from __future__ import annotations

from dataclasses import replace

import onnx_ir as ir

from attnpass.passes.onnx import OnnxAdapter
from attnpass.passes.site import Report
from attnpass.passes.topk import TopkForm, TopkSite
from attnpass.rewrite.onnx.builder import _Builder, _replace_keeping_name


def _reduce(b: _Builder, op: str, x: ir.Value, axis: int, keep: bool, opset: int) -> ir.Value:
    """A one-axis ``Reduce*``: axes as an attribute before opset 18, as an input from 18 on."""
    if opset >= 18:
        return b.op(op, [x, b.ints(axis)], {"keepdims": int(keep)})
    return b.op(op, [x], {"axes": [axis], "keepdims": int(keep)})


def _like(b: _Builder, new: ir.Value, old: ir.Value | None, have: ir.DataType | None) -> ir.Value:
    """``new`` (computed in the logits' type ``have``) cast to the replaced value's type (a ``Cast`` between the
    softmax and the selection)."""
    if old is None or old.dtype is None or have == old.dtype:
        return new
    return b.op("Cast", [new], {"to": old.dtype})


def _emit_one(ad: OnnxAdapter, site: TopkSite) -> str:
    b = _Builder(site.reduce, f"{ad.name(site.softmax)}/attnpass_topk")
    x, axis, opset = site.x, site.axis, ad.opset
    if site.form is TopkForm.TOPK:
        keep_order = int(ad._attr_raw(site.reduce, "sorted", 1))  # an unsorted TopK stays unsorted: same order
        vals, idx = b.tape.op_multi_out("TopK", [x, b.ints(int(site.k))], {"axis": axis, "largest": 1, "sorted": keep_order},
                                        num_outputs=2, name=f"{b.prefix}/TopK")
        if site.renormalize:
            probs = b.op("Exp", [b.op("Sub", [vals, _reduce(b, "ReduceLogSumExp", vals, axis, True, opset)])])
            probs = _like(b, probs, site.renorm_out, x.dtype)
        else:
            probs = b.op("Exp", [b.op("Sub", [vals, _reduce(b, "ReduceLogSumExp", x, axis, True, opset)])])
            probs = _like(b, probs, site.values, x.dtype)
        b.commit()
        _replace_keeping_name(site.renorm_out if site.renormalize else site.values, probs)
        if site.indices is not None:
            _replace_keeping_name(site.indices, idx)
        return "TopK on the logits" + (", renormalised as the softmax of the k logits" if site.renormalize
                                       else " + ReduceLogSumExp")
    if site.form is TopkForm.ARGMAX:
        idx = b.op("ArgMax", [x], {"axis": axis, "keepdims": int(site.keepdim), "select_last_index": 0})
        b.commit()
        _replace_keeping_name(site.indices, idx)
        return "ArgMax(Softmax(x)) -> ArgMax(x)"
    m = _reduce(b, "ReduceMax", x, axis, site.keepdim, opset)
    p = _like(b, b.op("Exp", [b.op("Sub", [m, _reduce(b, "ReduceLogSumExp", x, axis, site.keepdim, opset)])]), site.values, x.dtype)
    b.commit()
    _replace_keeping_name(site.values, p)
    return "ReduceMax(Softmax(x)) -> Exp(ReduceMax(x) - ReduceLogSumExp(x))"


def emit_topk(model: ir.Model, report: Report) -> Report:
    """Rewrite every fusable top-k site of ``report`` in ``model``; returns the report with what was done noted.

    The caller removes the nodes left without readers (the softmax, the old selection)."""
    if not report.topk:
        return report
    ad = OnnxAdapter(model)
    done: list[TopkSite] = []
    for site in report.topk:
        if not site.fusable:
            done.append(site.with_notes([f"left alone: {site.blocker}"]))
            continue
        if site.rank == 0 or (site.form is TopkForm.MAX and site.values is None):
            done.append(replace(site, blocker="nothing to replace"))
            continue
        done.append(site.with_notes([_emit_one(ad, site)]))
    return replace(report, topk=tuple(done))


__all__ = ["emit_topk"]
