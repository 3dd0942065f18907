"""Site-level MLIR rewrites: each found site becomes a call to a generated SSMax or fused function.

``find`` (in ``attnpass.passes.mlir``) reads the module; the functions here edit it in place
through ``Editor`` and the generators in ``ssmax.py`` / ``fused.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from attnpass import semantics
from attnpass.errors import AttnpassError
from attnpass.passes.match import Report
from attnpass.passes.mlir import MlirAdapter, MlirReport, _gqa_groups, _Node, _Val, find, public_funcs
from attnpass.passes.mlir_attention_op import is_attention_op, window
from attnpass.passes.plan import Action, Capabilities, FactorClass, KeepTerm, Plan, RewriteSpec, plan_for
from attnpass.rewrite.mlir.attention_op import with_cache, with_qk_output
from attnpass.rewrite.mlir.builders import HALF, builtin_elem, permuted, unpermuted
from attnpass.rewrite.mlir.editor import Editor, erase_dead, mask_inputs, to_builtin_raw
from attnpass.rewrite.mlir.fused import DEFAULT_TILE, FusedSpec, fused_func, tile_for
from attnpass.rewrite.mlir.kv_len import with_kv_len
from attnpass.rewrite.mlir.ssmax import KeyMasks, SsmaxParams, ssmax_func, ssmax_sdpa_func
from attnpass.rewrite.mlir.topk import emit_topk

#: What the generated linalg / scf code expresses.  The loop nest applies top-left causal itself and
#: gives 0 for a row with no attendable key (so the "no attendable key" guard is implied); it cannot
#: re-apply other row guards (``passes.mlir`` reports those as the reason).  ``n`` is counted in the
#: generated code from the plan's key factors (``Plan.keys``).
CAPS = Capabilities(refuse_fused_ops=True, softcap=True, ssmax_softcap_fused=True, is_causal=True,
                    scores_rank3=True, any_rank=True, static_heads=False, empty_rows_zero=True,
                    factor_on_q=False, count_keys=True, head_views=True,
                    dynamic_head_views=True, split_causal=True)


def _heads(x_shape: tuple[int, ...]) -> int:
    """Heads of ``[..., H, S_q, S_k]`` scores (1 for rank-2; rank-3 ``[B*H, ...]`` counts every slice)."""
    return x_shape[-3] if len(x_shape) >= 3 and isinstance(x_shape[-3], int) else 1


def _ssmax_params(ed: Editor, func: Any, heads: int, s: float | list[float], b: float | list[float] | None,
                  params: str, before: Any) -> tuple[SsmaxParams, list[Any]]:
    """The SSMax parameters of one site, and the builtin-tensor values to pass when they are arguments."""
    ss = SsmaxParams(heads, _per_head(s, heads, "s"), None if b is None else _per_head(b, heads, "b"))
    vals = []
    if params == "argument":
        hty, bty = f"!torch.vtensor<[{heads}],f32>", f"tensor<{heads}xf32>"
        vals.append(to_builtin_raw(ed, ed.add_argument(func, hty), bty, before))
        ss.s_arg = True
        if b is not None:
            vals.append(to_builtin_raw(ed, ed.add_argument(func, hty), bty, before))
            ss.b_arg = True
    return ss, vals


def _readable(terms: Any) -> bool:
    """The generated code reads bool and f32 (or f16 / bf16, widened) masks of known rank."""
    return all(m.value.dtype in ("i1", "f32", *HALF) and m.value.shape is not None for m in terms)


def _key_masks(ed: Editor, plan: Plan, before: Any) -> tuple[KeyMasks, list[Any]] | None:
    """``plan.keys`` as arguments of a generated function (None: a factor the generated code cannot read)."""
    kp = plan.keys
    counted = [f.keep for f in kp.of(FactorClass.KEYS) + kp.of(FactorClass.GENERAL)]
    rows = [f.keep for f in kp.of(FactorClass.ROW)]
    if not _readable(counted + rows):
        return None
    cin, cvals = mask_inputs(ed, counted, before, "n")
    rin, rvals = mask_inputs(ed, rows, before, "r")
    causal = bool(kp.of(FactorClass.CAUSAL)) or kp.causal_op
    return KeyMasks(tuple(cin), tuple(rin), causal, _window(plan)), cvals + rvals


def _window(plan: Plan) -> tuple[int, int] | None:
    """The (left, right) window of an ONNX ``Attention`` op site, None for no window (or another site)."""
    node = plan.site.softmax
    if not is_attention_op(node):
        return None
    w = (window(node, "left"), window(node, "right"))
    return None if w == (-1, -1) else w


def to_ssmax(module: Any, s: float | list[float] = semantics.DEFAULT_S, b: float | list[float] | None = None,
             params: str = "constant", fused: bool = False, tile: int = DEFAULT_TILE,
             report: MlirReport | None = None, replace_existing: bool = False, fit_existing: bool = False,
             fit_len: int | None = None) -> MlirReport:
    """Rewrite every site to SSMax in place; ``params="argument"`` makes s (and b) trailing ``[H]``
    arguments of the public function instead of constants.

    Explicit chains get the factor on the softmax input (``semantics.ssmax_logits``); SDPA calls
    keep the call and get ``q * f`` and a scaled additive mask (``semantics.ssmax_sdpa``).
    ``fused=True`` (as ``attnpass.to_ssmax(..., fused=True)``) instead replaces each fusable site by
    the online-softmax loop nest with the factor applied inside it; unfusable sites still get SSMax.
    """
    if params not in ("constant", "argument"):
        raise AttnpassError(f"ssmax params must be 'constant' or 'argument', got {params!r}")
    spec = RewriteSpec(to="fused", fused_ssmax=True) if fused else RewriteSpec(to="ssmax")
    if replace_existing or fit_existing:
        spec = replace(spec, replace_existing=replace_existing, fit_existing=fit_existing, fit_len=fit_len)
    return emit(module, spec.resolve(), report, tile=tile, ssmax=(s, b, params))


def emit(module: Any, spec: RewriteSpec, report: MlirReport | None = None, tile: int = DEFAULT_TILE,
         ssmax: tuple[Any, Any, str] | None = None) -> MlirReport:
    """Plan every site of ``report`` (found here when None) for ``spec`` and emit the plans into ``module``.

    ``ssmax = (s, b, params)``: MLIR takes per-head lists for ``s`` / ``b`` and can pass them as function
    arguments, more than ``RewriteSpec`` carries, so the values travel beside the spec (which decides the action).
    """
    report = find(module) if report is None else report
    ed = Editor(module)
    s, b, params = ssmax if ssmax is not None else (spec.s, spec.b, "constant")
    given = s, b
    for site in report.sites:
        adapter = report.adapters[site.index]
        plan = plan_for(site, spec, CAPS, adapter)
        s, b = given
        if plan.action is Action.LEAVE:
            if spec.ssmax and plan.reason:
                ed.notes.add(site, f"left alone: {plan.reason}")
            continue
        if plan.replaces is not None:
            why = _bypass(plan.replaces)
            if why is not None:
                ed.notes.add(site, f"left alone: {why}")
                continue
            ed.notes.add(site, plan.replace_note)
            if spec.fit_existing:
                s, b = plan.s, plan.b
        if plan.action is Action.SSMAX and is_attention_op(site.softmax):
            # torch-mlir cannot lower the op SSMax would keep: the loop nest with the factor replaces it
            _fuse_site(ed, plan, tile, ssmax=(s, b, params, adapter.func))
        elif plan.action is Action.SSMAX and site.form == "sdpa":
            _ssmax_sdpa_site(ed, adapter, plan, s, b, params)
        elif plan.action is Action.SSMAX:
            _ssmax_explicit_site(ed, adapter, plan, s, b, params)
        else:
            _fuse_site(ed, plan, tile, ssmax=(s, b, params, adapter.func) if plan.action is Action.SSMAX_FUSED else None)
    if spec.to == "fused" and not spec.fused_ssmax:
        report = emit_topk(ed, module, report)  # softmax -> top-k / max / argmax: one pass per row (topk.py)
    for f in public_funcs(module):
        erase_dead(f)
    return report.with_notes(ed.notes.by_site)


def _bypass(rel: Any) -> str | None:
    """Remove an existing query scaling (``plan.replaces``): the multiply's users read the unscaled Q.

    Only where the two have the same type (a broadcasting factor leaves Q's type as it is); else the reason."""
    out, data = rel.node.results[0], rel.data
    if out.type != data.type:
        return f"the query scaling to replace changes Q's type ({data.type} -> {out.type})"
    out.value.replace_all_uses_with(data.value)
    return None


def _ssmax_explicit_site(ed: Editor, adapter: MlirAdapter, plan: Plan, s: Any, b: Any, params: str) -> None:
    site = plan.site
    sm: _Node = site.softmax
    x: _Val = adapter.inputs(sm)[0]
    x_shape = x.shape
    if x_shape is None or x.dtype not in ("f32", "f64", *HALF):
        ed.notes.add(site, "left alone: SSMax in MLIR needs float scores (f32, f64, f16, bf16) of known rank")
        return
    first = sm.softmax_parts[0].op if sm.softmax_parts else sm.op
    keys = _key_masks(ed, plan, first) if _readable(plan.keep_terms) else None
    if keys is None:
        ed.notes.add(site, "left alone: a mask that is neither bool nor f32")
        return
    masks, mvals = mask_inputs(ed, plan.keep_terms, first, "m")
    xb = ed.builtin(x, first)
    ss, pvals = _ssmax_params(ed, adapter.func, _heads(tuple(x_shape)), s, b, params, first)
    name = ed.fresh_symbol(f"attnpass_ssmax_{site.index}")
    ed.add_func(ssmax_func(name, tuple(x_shape), masks, keys[0], ss, x.dtype), f"SSMax for {site.name}")
    z = ed.call(name, [xb, *mvals, *keys[1], *pvals], [x.type], first)[0]
    targets = [p.op for p in sm.softmax_parts[:2]] if sm.softmax_parts else [sm.op]
    for t in targets:
        for i, operand in enumerate(t.operands):
            if operand == x.value:
                t.operands[i] = z
    ed.notes.add(site, f"SSMax via @{name}" + (" (s, b as arguments)" if ss.s_arg else ""))


def _ssmax_sdpa_site(ed: Editor, adapter: MlirAdapter, plan: Plan, s: Any, b: Any, params: str) -> None:
    """SDPA call: the call stays; its q becomes ``q * f`` and an additive mask is scaled where attendable."""
    site = plan.site
    call: _Node = site.softmax
    q: _Val = call.operands[0]
    bias_t: list[KeepTerm] = [plan.op_mask] if plan.fused_mask_bias and plan.op_mask is not None else []
    qs = q.shape
    if qs is None or any(d is None for d in qs) or q.dtype not in ("f32", *HALF) or not isinstance(site.seq_k, int):
        ed.notes.add(site, "left alone: SSMax in MLIR needs static f32, f16 or bf16 inputs")
        return
    keys = _key_masks(ed, plan, call.op) if _readable(bias_t) else None
    if keys is None:
        ed.notes.add(site, "left alone: a mask that is neither bool nor f32")
        return
    qs = tuple(qs)
    bias, bvals = mask_inputs(ed, bias_t, call.op, "m")
    ss, pvals = _ssmax_params(ed, adapter.func, _heads((*qs[:-1], 1)), s, b, params, call.op)
    # An explicit scale moves onto q and the call gets the default: torch-mlir's lowering of an SDPA
    # call that has a mask or is_causal ignores its ``scale`` (off by ~0.5 on unit inputs), and the
    # SSMax rewrite keeps the call.  ``(q c sqrt(d)) k / sqrt(d) = c q k`` is the same logits.
    q_mult = 1.0
    has_scale = len(call.operands) > 6 and call.operands[6].type != "!torch.none"
    if has_scale and isinstance(qs[-1], int):
        q_mult = float(site.scale) * math.sqrt(qs[-1])
    name = ed.fresh_symbol(f"attnpass_ssmax_{site.index}")
    func = ssmax_sdpa_func(name, qs, site.seq_k, bias[0] if bias else None, keys[0], ss, q_mult, q.dtype)
    ed.add_func(func, f"SSMax for {site.name}")
    additive = bool(bias)
    types = [q.type] + ([f"!torch.vtensor<[{','.join(map(str, (*qs[:-1], site.seq_k)))}],{bias[0].elem}>"] if additive else [])
    new = ed.call(name, [ed.builtin(q, call.op), *bvals, *keys[1], *pvals], types, call.op)
    call.op.operands[0] = new[0]
    if additive:
        call.op.operands[3] = new[1]
    if has_scale:
        ir = ed.ir
        none = ir.Operation.create("torch.constant.none", results=[ir.Type.parse("!torch.none", ed.ctx)],
                                   loc=ir.Location.unknown(ed.ctx), ip=ir.InsertionPoint(call.op))
        call.op.operands[6] = none.result
        ed.notes.add(site, f"scale {site.scale:g} folded into q")
    ed.notes.add(site, f"SSMax via @{name} (factor on q" + (", mask scaled" if additive else "") + ")"
                       + (" (s, b as arguments)" if ss.s_arg else ""))


def _per_head(x: float | list[float], heads: int, what: str) -> list[float]:
    if isinstance(x, int | float):
        return [float(x)] * heads
    xs = [float(v) for v in x]
    if len(xs) == 1:
        return xs * heads
    if len(xs) != heads:
        raise AttnpassError(f"SSMax {what} has {len(xs)} values for {heads} heads")
    return xs


def fuse(module: Any, tile: int = DEFAULT_TILE, report: MlirReport | None = None) -> MlirReport:
    """Replace each fusable site (explicit chain or SDPA call) by a call to a generated online-softmax
    loop nest, in place."""
    return emit(module, RewriteSpec(to="fused").resolve(), report, tile=tile)


def _fuse_site(ed: Editor, plan: Plan, tile: int, ssmax: tuple | None = None) -> None:
    """One site -> ``func.call @attnpass_fused_N(q, k, v, masks..., [s, b])``; ``ssmax = (s, b, params, func)``."""
    site = plan.site
    if plan.guards:
        raise AttnpassError(f"internal error: {site.name} planned fused with guards the loop nest cannot apply")
    spec = _spec(plan, tile)
    out: _Val = site.out
    before = out.producer.op
    op = site.softmax if is_attention_op(site.softmax) else None
    kv, lengths = None, []
    if op is not None:  # the ONNX op's KV cache: present = concat(past, new), attended over
        spec, kv = with_cache(ed, op, spec, tile, before)
        spec, lengths = with_kv_len(ed, op, spec, before)  # nonpad_kv_seqlen: keys j < L_b per batch entry
    # everything the call reads is defined before the op that produces the site's output
    terms = [plan.op_mask] if plan.op_mask is not None else [*plan.op_mask_additive, *plan.op_mask_bool]
    masks, mvals = mask_inputs(ed, terms, before, "m")
    spec.masks = masks
    pvals: list[Any] = []
    if ssmax is not None:
        s, b, params, func = ssmax
        keys = _key_masks(ed, plan, before)
        if keys is None:
            raise AttnpassError(f"internal error: {site.name} planned fused with a mask the loop nest cannot read")
        spec.keys = replace(keys[0], q_offset=spec.q_offset, kv_len=spec.kv_len)  # a KV cache's keys (with_cache)
        spec.ssmax, pvals = _ssmax_params(ed, func, _heads_of(spec), s, b, params, before)
        pvals = keys[1] + pvals
    qv = site.q.value
    for factor, divide in site.q_scales:  # run-time tensors right-aligned against q as against the scores
        qv = ed.scale_by(qv, factor, divide, before)
    q, k, v = (ed.builtin(x, before) for x in (qv, site.k.value, site.v.value))
    if kv is not None:
        k, v = kv
    name = ed.fresh_symbol(f"attnpass_fused_{site.index}")
    ed.add_func(fused_func(name, spec), f"fused attention for {site.name}")
    if op is not None:  # the op's qk_matmul_output, computed beside the loop nest
        with_qk_output(ed, op, spec, [q, k, *mvals, *lengths, *pvals], before)
    new = ed.call(name, [q, k, v, *mvals, *lengths, *pvals], [out.type], before)[0]
    out.value.replace_all_uses_with(new)
    if op is not None:
        site.softmax.op.erase()  # not a pure op for erase_dead, and torch-mlir cannot lower it
    ed.notes.add(site, f"fused via @{name} (tile {spec.tile})" + (" with SSMax" if ssmax is not None else ""))


def _spec(plan: Plan, tile: int) -> FusedSpec:
    """The loop nest's sizes in the canonical ``[batch..., S, D]`` layout; einsum layouts become ``perms``."""
    site = plan.site
    if site.three_d:
        return _spec_packed(plan, tile)
    perms = {name: p for name, p in (("q", site.q.perm), ("k", site.k.perm), ("v", site.v.perm), ("out", site.out_perm))
             if p is not None}
    qs, ks, vs = (permuted(tuple(o.value.shape), o.perm) for o in (site.q, site.k, site.v))
    os_ = unpermuted(tuple(site.out.shape), site.out_perm)
    rank = site.out_rank
    s_q = qs[-2]
    s_k = ks[-1] if site.k.transposed else ks[-2]
    batch = tuple(os_[:-2])
    if len(batch) != rank - 2:
        raise AttnpassError(f"internal error: output of {site.name} is not [batch..., S_q, D_v]")
    k_groups, v_groups = site.k.groups, site.v.groups
    if site.form == "sdpa" and k_groups == 1:
        k_groups = v_groups = _gqa_groups(site) or 1  # enable_gqa: K/V carry fewer heads, not repeated
    return FusedSpec(
        batch=batch, s_q=s_q, s_k=s_k, d=qs[-1], dv=vs[-1], q_shape=qs, k_shape=ks, v_shape=vs,
        k_transposed=site.k.transposed, k_groups=k_groups, v_groups=v_groups,
        scale=float(plan.scale), softcap=plan.softcap, causal=plan.causal or plan.is_causal_op, masks=[], tile=tile_for(s_k, tile),
        perms=perms, window=_window(plan), elem=_elem(site),
    )


def _heads_of(spec: FusedSpec) -> int:
    """The head count SSMax's per-head ``s`` / ``b`` are read by: 1 (one value for every head) when it is unknown."""
    heads = spec.batch[-1] if spec.batch else 1
    return heads if isinstance(heads, int) else 1


def _elem(site: Any) -> str:
    """The loop nest's input / output element type: the site's (f32, or f16 / bf16 computed in f32)."""
    return builtin_elem(site.q.value.dtype or "f32")


def _spec_packed(plan: Plan, tile: int) -> FusedSpec:
    """A 3-D fused op (``[B, S, H*D]``, heads from its attributes): the loop nest sees ``[B, H, S, D]``."""
    site = plan.site
    heads, kv_heads = site.heads, site.kv_heads or site.heads
    (b, s_q, hd), (_, s_k, khd), (_, _, vhd) = (tuple(o.value.shape) for o in (site.q, site.k, site.v))
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
        raise AttnpassError(f"internal error: {site.name} is 3-D with head counts {heads}/{kv_heads}")
    groups = heads // kv_heads
    qs, ks, vs = (b, heads, s_q, hd // heads), (b, kv_heads, s_k, khd // kv_heads), (b, kv_heads, s_k, vhd // kv_heads)
    return FusedSpec(
        batch=(b, heads), s_q=s_q, s_k=s_k, d=qs[-1], dv=vs[-1], q_shape=qs, k_shape=ks, v_shape=vs,
        k_transposed=False, k_groups=groups, v_groups=groups, scale=float(plan.scale), softcap=plan.softcap,
        causal=plan.causal or plan.is_causal_op, masks=[], tile=tile_for(s_k, tile),
        packed=frozenset(("q", "k", "v", "out")), window=_window(plan), elem=_elem(site),
    )


def describe(report: Report) -> list[dict[str, Any]]:
    return [s.summary() for s in report.sites]

