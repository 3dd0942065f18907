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
    largest) and the slot holds no NaN; an equal value never displaces, so ties keep the lower index.  Once
    the new entry has displaced a slot, every later slot shifts down: the entry carried on came from an
    earlier slot, so it ranks ahead of the next one even when their values are equal.
    """
    cv, ci = x, j
    out_v, out_i = [], []
    won: str | None = None
    for v, i in zip(vals, idx):
        gt = t.op("gt", f"arith.cmpf ugt, {cv}, {v} : f32", ind)
        ordered = t.op("o", f"arith.cmpf ord, {v}, {v} : f32", ind)
        free = t.op("f", f"arith.cmpi eq, {i}, %cm1 : i64", ind)
        win = t.op("w", f"arith.ori {t.op('w', f'arith.andi {gt}, {ordered} : i1', ind)}, {free} : i1", ind)
        if won is not None:
            win = t.op("w", f"arith.ori {win}, {won} : i1", ind)
        won = win
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


#: Element types the generated pass reads and writes (arithmetic is f32 whatever they are).
ELEMS = ("f32", "f16", "bf16")


def to_elem(t: Ssa, v: str, src: str, dst: str, ind: int) -> str:
    """A scalar converted between ``ELEMS`` (exact widening to f32, one rounding when narrowing)."""
    if src == dst:
        return v
    if src != "f32":
        v = t.op("cv", f"arith.extf {v} : {src} to f32", ind)
    return v if dst == "f32" else t.op("cv", f"arith.truncf {v} : f32 to {dst}", ind)


def out_shape(shape: tuple[int | None, ...], axis: int, k: int, keep_k: bool) -> tuple[int | None, ...]:
    """The results' shape: ``k`` along ``axis`` (``keep_k``), or ``axis`` dropped (a max / argmax without keepdim)."""
    return tuple(k if a == axis else d for a, d in enumerate(shape) if keep_k or a != axis)


def topk_func(name: str, shape: tuple[int | None, ...], k: int, renormalize: bool, keep_k: bool, axis: int = -1,
              elems: tuple[str, str, str] = ("f32", "f32", "f32")) -> str:
    """``func.func private @name(x) -> (probs, indices)``: the selection over ``axis`` of ``x``.

    ``elems`` are the logits', the softmax output's and the probabilities result's element types: logits are
    widened to f32 on reading, the selected probabilities computed in f32, rounded once to the softmax's type
    (what eager's softmax output holds), then converted to the result's type (a cast before the selection).
    A non-last ``axis`` needs no transpose: the row loop indexes ``x`` along it, the outer loops run over the rest.
    """
    rank = len(shape)
    axis %= rank
    x_el, sm_el, p_el = elems
    oshape = out_shape(shape, axis, k, keep_k)
    xt = tensor_type(shape, x_el)
    pt, it = tensor_type(oshape, p_el), tensor_type(oshape, "i64")
    t = Ssa()
    t.emit(f"func.func private @{name}(%x: {xt}) -> ({pt}, {it}) {{", 0)
    t.emit("%c0 = arith.constant 0 : index", 1)
    t.emit("%c1 = arith.constant 1 : index", 1)
    t.emit("%cm1 = arith.constant -1 : i64", 1)
    c = {"ninf": "%ninf", "one": "%one", "zero": "%zero"}
    t.emit(f"%ninf = arith.constant {NEG_INF} : f32", 1)
    t.emit("%one = arith.constant 1.0 : f32", 1)
    t.emit("%zero = arith.constant 0.0 : f32", 1)
    for a in range(rank):
        t.emit(f"%ca{a} = arith.constant {a} : index", 1)
        t.emit(f"%n{a} = tensor.dim %x, %ca{a} : {xt}", 1)
    outer = [a for a in range(rank) if a != axis]
    dyn = [f"%n{a}" for a in outer if shape[a] is None]
    t.emit(f"%P0 = tensor.empty({', '.join(dyn)}) : {pt}", 1)
    t.emit(f"%I0 = tensor.empty({', '.join(dyn)}) : {it}", 1)
    for p in range(k):
        t.emit(f"%cp{p} = arith.constant {p} : index", 1)
    # one scf.for per dim other than the axis, the outputs carried through
    ind, P, I_ = 1, "%P0", "%I0"
    ivs: dict[int, str] = {}
    results = []
    for a in outer:
        ivs[a] = f"%i{a}"
        res = t.fresh("r")
        results.append((res, ind))
        pa, ia = t.fresh("P"), t.fresh("I")
        t.emit(f"{res}:2 = scf.for {ivs[a]} = %c0 to %n{a} step %c1 iter_args({pa} = {P}, {ia} = {I_}) -> ({pt}, {it}) {{", ind)
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
    t.emit(f"{row}:{len(carried)} = scf.for %j = %c0 to %n{axis} step %c1 iter_args("
           + ", ".join(f"{a} = {b}" for a, b in zip(carried, init)) + f") -> ({', '.join(types)}) {{", ind)
    body = ind + 1
    at_x = ", ".join("%j" if a == axis else ivs[a] for a in range(rank))
    x = to_elem(t, t.op("x", f"tensor.extract %x[{at_x}] : {xt}", body), x_el, "f32", body)
    mn, ln = online_step(t, m, norm, x, c, body)
    j = t.op("j", "arith.index_cast %j : index to i64", body)
    nv, ni = insert_best(t, slots_v, slots_i, x, j, body)
    t.emit(f"scf.yield {', '.join([mn, ln, *nv, *ni])} : {', '.join(types)}", body)
    t.emit("}", ind)
    rv = [f"{row}#{2 + p}" for p in range(k)]
    ri = [f"{row}#{2 + k + p}" for p in range(k)]
    probs = selected_probs(t, rv, f"{row}#0", f"{row}#1", renormalize, ind)
    for p in range(k):
        at = ", ".join(f"%cp{p}" if a == axis else ivs[a] for a in range(rank) if keep_k or a != axis)
        q = to_elem(t, to_elem(t, probs[p], "f32", sm_el, ind), sm_el, p_el, ind)
        P = t.op("P", f"tensor.insert {q} into {P}[{at}] : {pt}", ind)
        I_ = t.op("I", f"tensor.insert {ri[p]} into {I_}[{at}] : {it}", ind)
    for res, lvl in reversed(results):
        t.emit(f"scf.yield {P}, {I_} : {pt}, {it}", lvl + 1)
        t.emit("}", lvl)
        P, I_ = f"{res}#0", f"{res}#1"
    t.emit(f"return {P}, {I_} : {pt}, {it}", 1)
    t.emit("}", 0)
    return "module {\n" + t.text() + "\n}"


# ------------------------------------------------------------------ sites


def _elems(site: TopkSite) -> tuple[str | None, str | None, str | None]:
    """The logits', the softmax output's and the replaced probabilities' element types (see ``topk_func``)."""
    x: _Val = site.x
    sm = site.softmax.results[0].dtype if getattr(site.softmax, "results", None) else x.dtype
    target = site.renorm_out if site.renormalize else site.values
    out = target.dtype if isinstance(target, _Val) and site.form is not TopkForm.ARGMAX else sm
    return x.dtype, sm, out


def _blocker(site: TopkSite) -> str | None:
    """What the generated loop does not express (yet): the reason the site keeps its softmax."""
    x: _Val = site.x
    if x.shape is None:
        return f"MLIR: logits of type {x.type} (a known rank only)"
    names = ("logits", "softmax output", "selected probabilities")
    for what, el in zip(names, _elems(site)):
        if el not in ELEMS:
            return f"MLIR: {what} of element type {el} (f32, f16 or bf16 only)"
    if site.form is not TopkForm.TOPK and site.keepdim is False and site.rank == 1:
        return "MLIR: a max over a vector (0-d result)"
    return None


def _emit_one(ed: Editor, site: TopkSite) -> str:
    x: _Val = site.x
    k = int(site.k) if site.form is TopkForm.TOPK else 1
    keep_k = site.form is TopkForm.TOPK or site.keepdim
    elems = _elems(site)
    name = ed.fresh_symbol(f"attnpass_topk_{site.index}")
    shape = tuple(x.shape or ())
    ed.add_func(topk_func(name, shape, k, site.renormalize, keep_k, site.axis, elems),  # type: ignore[arg-type]
                f"softmax + {site.form} for {site.name}")
    before = site.reduce.op
    dims = ",".join("?" if d is None else str(d) for d in out_shape(shape, site.axis % len(shape), k, keep_k))
    types = [f"!torch.vtensor<[{dims}],{elems[2]}>", f"!torch.vtensor<[{dims}],si64>"]
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


__all__ = ["ELEMS", "emit_topk", "insert_best", "online_step", "out_shape", "selected_probs", "to_elem", "topk_func"]
