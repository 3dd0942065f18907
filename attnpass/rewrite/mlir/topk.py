"""The MLIR emitter for top-k sites (``passes/topk.py``): softmax and selection in one pass over each row.

Each fusable site becomes ``func.call @attnpass_topk_N(x)`` on the logits; the generated function is the
online normaliser's single pass (Milakov & Gimelshein) written out: for every row, one loop over the
reduction axis carries the running max ``m``, the running normaliser ``l`` (rescaled by ``exp(m - m')``
when the max grows) and the ``k`` best entries so far as scalars (``k`` slots, filled by a branchless
insertion: each step compares and selects, no sort).  After the loop the selected probabilities are
``exp(v - m) / l``; renormalised top-k weights are the softmax of the ``k`` selected logits; a max is the
one-slot case (``1 / l``), an argmax its index.  Ties keep the lower index (a later equal value never
displaces an earlier one); a NaN ranks above every number, as in ``torch.topk``.

Builders here extend ``builders.py``'s vocabulary (``Ssa`` text, ``tensor_type``) with the scalar ops of
this loop; the MLIR parser verifies the function when it is added.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from attnpass.passes.mlir import MlirReport, _Val, public_funcs
from attnpass.passes.topk import TopkForm, TopkSite
from attnpass.rewrite.mlir.builders import Ssa, f32, tensor_type
from attnpass.rewrite.mlir.editor import Editor, erase_dead

NEG_INF = f32(float("-inf"))


# ------------------------------------------------------------------ builders (scalar ops of the single pass)

def online_step(t: Ssa, m: str, norm: str, x: str, c: dict[str, str], ind: int) -> tuple[str, str]:
    """``m' = max(m, x)``, ``l' = l * exp(m - m') + exp(x - m')``; a row still at ``-inf`` keeps ``l = 0``."""
    mn = t.op("m", f"arith.maximumf {m}, {x} : f32", ind)
    empty = t.op("e", f"arith.cmpf oeq, {mn}, {c['ninf']} : f32", ind)
    sc = t.op("sc", f"math.exp {t.op('d', f'arith.subf {m}, {mn} : f32', ind)} : f32", ind)
    sc = t.op("sc", f"arith.select {empty}, {c['one']}, {sc} : f32", ind)
    px = t.op("p", f"math.exp {t.op('d', f'arith.subf {x}, {mn} : f32', ind)} : f32", ind)
    px = t.op("p", f"arith.select {empty}, {c['zero']}, {px} : f32", ind)
    ln = t.op("l", f"arith.addf {t.op('l', f'arith.mulf {norm}, {sc} : f32', ind)}, {px} : f32", ind)
    return mn, ln


def insert_best(t: Ssa, vals: list[str], idx: list[str], x: str, j: str, ind: int) -> tuple[list[str], list[str]]:
    """Insert ``(x, j)`` into the descending slots ``vals`` / ``idx`` (index ``-1``: empty), branch-free.

    The carried entry displaces a slot when the slot is empty, or when it is larger (a NaN counts as the
    largest) and the slot holds no NaN; an equal value never displaces, so ties keep the lower index.
    """
    cv, ci = x, j
    out_v, out_i = [], []
    for v, i in zip(vals, idx):
        gt = t.op("gt", f"arith.cmpf ugt, {cv}, {v} : f32", ind)
        ordered = t.op("o", f"arith.cmpf ord, {v}, {v} : f32", ind)
        free = t.op("f", f"arith.cmpi eq, {i}, %cm1 : i64", ind)
        win = t.op("w", f"arith.ori {t.op('w', f'arith.andi {gt}, {ordered} : i1', ind)}, {free} : i1", ind)
        out_v.append(t.op("v", f"arith.select {win}, {cv}, {v} : f32", ind))
        out_i.append(t.op("i", f"arith.select {win}, {ci}, {i} : i64", ind))
        cv, ci = t.op("cv", f"arith.select {win}, {v}, {cv} : f32", ind), t.op("ci", f"arith.select {win}, {i}, {ci} : i64", ind)
    return out_v, out_i


def selected_probs(t: Ssa, vals: list[str], m: str, norm: str, renormalize: bool, ind: int) -> list[str]:
    """``exp(v - m) / l`` per slot, or with ``renormalize`` the softmax of the selected logits (max: slot 0)."""
    if not renormalize:
        out = []
        for v in vals:
            e = t.op("q", f"math.exp {t.op('d', f'arith.subf {v}, {m} : f32', ind)} : f32", ind)
            out.append(t.op("q", f"arith.divf {e}, {norm} : f32", ind))
        return out
    es = [t.op("q", f"math.exp {t.op('d', f'arith.subf {v}, {vals[0]} : f32', ind)} : f32", ind) for v in vals]
    s = es[0]
    for e in es[1:]:
        s = t.op("s", f"arith.addf {s}, {e} : f32", ind)
    return [t.op("q", f"arith.divf {e}, {s} : f32", ind) for e in es]


def topk_func(name: str, shape: tuple[int | None, ...], k: int, renormalize: bool, keep_k: bool) -> str:
    """``func.func private @name(x) -> (probs, indices)`` over the last axis of ``x`` (f32).

    The results have ``x``'s leading dims plus ``k`` along the last axis (``keep_k``), or the leading dims
    only (a max / argmax without ``keepdim``).
    """
    rank = len(shape)
    lead = shape[:-1]
    out_shape = (*lead, k) if keep_k else lead
    xt = tensor_type(shape, "f32")
    pt, it = tensor_type(out_shape, "f32"), tensor_type(out_shape, "i64")
    t = Ssa()
    t.emit(f"func.func private @{name}(%x: {xt}) -> ({pt}, {it}) {{", 0)
    t.emit("%c0 = arith.constant 0 : index", 1)
    t.emit("%c1 = arith.constant 1 : index", 1)
    t.emit("%cm1 = arith.constant -1 : i64", 1)
    c = {"ninf": "%ninf", "one": "%one", "zero": "%zero"}
    t.emit(f"%ninf = arith.constant {NEG_INF} : f32", 1)
    t.emit("%one = arith.constant 1.0 : f32", 1)
    t.emit("%zero = arith.constant 0.0 : f32", 1)
    sizes = []
    for a in range(rank):
        t.emit(f"%ca{a} = arith.constant {a} : index", 1)
        t.emit(f"%n{a} = tensor.dim %x, %ca{a} : {xt}", 1)
        sizes.append(f"%n{a}")
    dyn = [sizes[a] for a, d in enumerate(lead) if d is None]
    t.emit(f"%P0 = tensor.empty({', '.join(dyn)}) : {pt}", 1)
    t.emit(f"%I0 = tensor.empty({', '.join(dyn)}) : {it}", 1)
    for p in range(k):
        t.emit(f"%cp{p} = arith.constant {p} : index", 1)
    # one scf.for per leading dim, the outputs carried through
    ind, P, I_ = 1, "%P0", "%I0"
    ivs = []
    results = []
    for a in range(rank - 1):
        iv = f"%i{a}"
        ivs.append(iv)
        res = t.fresh("r")
        results.append((res, ind))
        pa, ia = t.fresh("P"), t.fresh("I")
        t.emit(f"{res}:2 = scf.for {iv} = %c0 to %n{a} step %c1 iter_args({pa} = {P}, {ia} = {I_}) -> ({pt}, {it}) {{", ind)
        P, I_, ind = pa, ia, ind + 1
    # the single pass over the row
    m0, l0 = "%ninf", "%zero"
    slots_v = [t.fresh("sv") for _ in range(k)]
    slots_i = [t.fresh("si") for _ in range(k)]
    m, norm = t.fresh("m"), t.fresh("l")
    row = t.fresh("row")
    carried = [m, norm, *slots_v, *slots_i]
    init = [m0, l0, *["%ninf"] * k, *["%cm1"] * k]
    types = ["f32", "f32", *["f32"] * k, *["i64"] * k]
    t.emit(f"{row}:{len(carried)} = scf.for %j = %c0 to %n{rank - 1} step %c1 iter_args("
           + ", ".join(f"{a} = {b}" for a, b in zip(carried, init)) + f") -> ({', '.join(types)}) {{", ind)
    body = ind + 1
    x = t.op("x", f"tensor.extract %x[{', '.join([*ivs, '%j'])}] : {xt}", body)
    mn, ln = online_step(t, m, norm, x, c, body)
    j = t.op("j", "arith.index_cast %j : index to i64", body)
    nv, ni = insert_best(t, slots_v, slots_i, x, j, body)
    t.emit(f"scf.yield {', '.join([mn, ln, *nv, *ni])} : {', '.join(types)}", body)
    t.emit("}", ind)
    rv = [f"{row}#{2 + p}" for p in range(k)]
    ri = [f"{row}#{2 + k + p}" for p in range(k)]
    probs = selected_probs(t, rv, f"{row}#0", f"{row}#1", renormalize, ind)
    for p in range(k):
        at = ", ".join([*ivs, f"%cp{p}"] if keep_k else ivs)
        P = t.op("P", f"tensor.insert {probs[p]} into {P}[{at}] : {pt}", ind)
        I_ = t.op("I", f"tensor.insert {ri[p]} into {I_}[{at}] : {it}", ind)
    for res, lvl in reversed(results):
        t.emit(f"scf.yield {P}, {I_} : {pt}, {it}", lvl + 1)
        t.emit("}", lvl)
        P, I_ = f"{res}#0", f"{res}#1"
    t.emit(f"return {P}, {I_} : {pt}, {it}", 1)
    t.emit("}", 0)
    return "module {\n" + t.text() + "\n}"


# ------------------------------------------------------------------ sites


def _blocker(site: TopkSite) -> str | None:
    """What the generated loop does not express (yet): the reason the site keeps its softmax."""
    x: _Val = site.x
    if site.axis != site.rank - 1:
        return "MLIR: the selection is not over the last axis"
    if x.dtype != "f32" or x.shape is None:
        return f"MLIR: logits of type {x.type} (f32 with a known rank only)"
    for v in (site.values, site.renorm_out):
        if isinstance(v, _Val) and v.dtype != "f32":
            return f"MLIR: selected probabilities of type {v.type} (f32 only)"
    if site.form is not TopkForm.TOPK and site.keepdim is False and site.rank == 1:
        return "MLIR: a max over a vector (0-d result)"
    return None


def _emit_one(ed: Editor, site: TopkSite) -> str:
    x: _Val = site.x
    k = int(site.k) if site.form is TopkForm.TOPK else 1
    keep_k = site.form is TopkForm.TOPK or site.keepdim
    name = ed.fresh_symbol(f"attnpass_topk_{site.index}")
    ed.add_func(topk_func(name, tuple(x.shape or ()), k, site.renormalize, keep_k), f"softmax + {site.form} for {site.name}")
    before = site.reduce.op
    lead = tuple(x.shape or ())[:-1]
    out_dims = (*lead, k) if keep_k else lead
    dims = ",".join("?" if d is None else str(d) for d in out_dims)
    types = [f"!torch.vtensor<[{dims}],f32>", f"!torch.vtensor<[{dims}],si64>"]
    probs, idx = ed.call(name, [ed.builtin(x, before)], types, before)
    target = site.renorm_out if site.renormalize else site.values
    if site.form is not TopkForm.ARGMAX and isinstance(target, _Val):
        target.value.replace_all_uses_with(probs)
    if isinstance(site.indices, _Val):
        site.indices.value.replace_all_uses_with(idx)
    return f"single pass via @{name} (running max, normaliser and {'top-' + str(k) if site.form is TopkForm.TOPK else str(site.form)})"


def emit_topk(ed: Editor, module: Any, report: MlirReport) -> MlirReport:
    """Rewrite every fusable top-k site of ``report`` (found on ``module``); the report with what was done."""
    if not report.topk:
        return report
    done: list[TopkSite] = []
    for site in report.topk:
        why = site.blocker or _blocker(site)
        if why is not None:
            done.append(replace(site, blocker=why).with_notes([f"left alone: {why}"]))
            continue
        done.append(site.with_notes([_emit_one(ed, site)]))
    for f in public_funcs(module):
        erase_dead(f)
    return replace(report, topk=tuple(done))


__all__ = ["emit_topk", "insert_best", "online_step", "selected_probs", "topk_func"]
