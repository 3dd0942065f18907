"""What the ONNX ``Attention`` op gives besides ``Y``, emitted around the loop nest that replaces it.

``present_key`` / ``present_value``: ``concat(past, new)`` along the sequence axis (``[B, H_kv, P + S, D]``;
a 3-D op's new K/V are unpacked to that layout first), and the loop nest then attends over every key, so
``S_k`` (and SSMax's ``n``) counts past and new keys; query row ``i`` sits at position ``P + i``
(``FusedSpec.q_offset``), where the op's causal and window masks are aligned.
``qk_matmul_output``: a second, unfused function computes the scores the op's mode asks for (0: ``scale Q K^T``; 1: soft-capped; 2: with the masks; 3: the
probabilities, with the SSMax factor when SSMax replaces the op), from the same ``FusedSpec`` as the loop nest.
The planner leaves a mode-3 op unfused (the probabilities escape); only SSMax computes them here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from attnpass.errors import AttnpassError
from attnpass.passes.mlir_attention_op import past_kv, presents, qk_output, used
from attnpass.rewrite.mlir.builders import (
    PAR,
    Operand,
    Ssa,
    bcast_map,
    builtin_elem,
    constant,
    convert,
    dims_of,
    divide_rows,
    empty,
    exp_sub,
    f32,
    fill,
    generic,
    matmul_tile,
    reduce_max,
    reduce_sum,
    settle_mask,
    tensor_type,
)
from attnpass.rewrite.mlir.editor import Editor, to_builtin_raw
from attnpass.rewrite.mlir.fused import FusedSpec, logits_tile, tile_for
from attnpass.rewrite.mlir.packed_heads import packed_shape, unpack
from attnpass.rewrite.mlir.ssmax import emit_factor


def _row(prefix: str, *tail: str) -> str:
    """``(d0, d1)`` + ``i, e`` -> ``(d0, d1, i, e)``."""
    inner = prefix[1:-1]
    return "(" + ", ".join(([inner] if inner else []) + list(tail)) + ")"


def kv_concat_func(name: str, past: tuple[int, ...], new: tuple[int, ...], packed: bool, elem: str = "f32") -> str:
    """``present = concat(past, new)`` on the sequence axis (2) of ``[B, H, S, D]``; a packed ``new``
    (``[B, S, H*D]``) is unpacked first.  ``past`` may have no keys (``P = 0``: ``present`` is ``new``).
    The cache keeps the op's element type (``elem``: a float16 cache is copied, never widened)."""
    t = Ssa()
    b, h, p, d = past
    canon_new = new if not packed else (new[0], h, new[1], new[2] // h)
    total = (b, h, p + canon_new[2], d)
    src_ty = tensor_type(packed_shape(canon_new) if packed else canon_new, elem)
    args = ([f"%past: {tensor_type(past, elem)}"] if p else []) + [f"%new_raw: {src_ty}"]
    t.emit(f"func.func private @{name}({', '.join(args)}) -> {tensor_type(total, elem)} {{", 1)
    cur = unpack(t, "%new_raw", canon_new, 2, result="%new", elem=elem) if packed else "%new_raw"
    if p:
        e = empty(t, total, 2, elem)
        ones = ", ".join(["1"] * 4)
        a = t.op("cat", f"tensor.insert_slice %past into {e}[0, 0, 0, 0] [{', '.join(map(str, past))}] [{ones}] : "
                        f"{tensor_type(past, elem)} into {tensor_type(total, elem)}", 2)
        cur = t.op("cat", f"tensor.insert_slice {cur} into {a}[0, 0, {p}, 0] [{', '.join(map(str, canon_new))}] [{ones}] : "
                          f"{tensor_type(canon_new, elem)} into {tensor_type(total, elem)}", 2)
    t.emit(f"return {cur} : {tensor_type(total, elem)}")
    t.emit("}", 1)
    return t.text()


def qk_output_func(name: str, sp: FusedSpec, mode: int, out_elem: str = "f32") -> str:
    """The op's ``qk_matmul_output`` ``[batch..., S_q, S_k]`` for ``mode``, unfused (the whole score matrix):
    the arguments are the loop nest's, less V.  Half-precision Q and K (``sp.elem``) are widened as the loop nest
    widens them, and the scores are computed in f32 and rounded once to the output's type (``out_elem``)."""
    t = Ssa()
    row_shape, tile_shape = (*sp.batch, sp.s_q), (*sp.batch, sp.s_q, sp.s_k)
    raw = {"q": sp.q_shape, "k": sp.k_shape}
    wide = "_in" if sp.elem != "f32" else ""
    shapes = {n: packed_shape(s) if n in sp.packed else s for n, s in raw.items()}
    args = [f"%{n}{'_raw' if n in sp.packed else ''}{wide}: {tensor_type(shapes[n], sp.elem)}" for n in raw]
    args += sp.args()  # masks, then nonpad_kv_seqlen's L_b
    args += (sp.keys.args() + sp.ssmax.args()) if sp.ssmax else []
    out_ty = tensor_type(tile_shape, out_elem)
    t.emit(f"func.func private @{name}({', '.join(args)}) -> {out_ty} {{", 1)
    for n in raw if wide else ():
        base = f"%{n}{'_raw' if n in sp.packed else ''}"
        convert(t, base + wide, shapes[n], sp.elem, "f32", 2, result=base)
    for n, s in raw.items():
        if n in sp.packed:
            unpack(t, f"%{n}_raw", s, 2, result=f"%{n}")
    sp = dataclasses.replace(sp, masks=[settle_mask(t, m, tile_shape) for m in sp.masks])
    bd = sp.bdims
    dims4, dims5, rows = [*bd, "i", "j"], [*bd, "i", "j", "e"], dims_of([*bd, "i"])
    q = Operand("%q", sp.q_shape, _row(bcast_map(sp.q_shape[:-2], sp.batch, bd), "i", "e"))
    kb = bcast_map(sp.k_shape[:-2], sp.batch, bd, sp.k_groups, sp.group_dim)
    k = Operand("%k", sp.k_shape, _row(kb, "e", "j") if sp.k_transposed else _row(kb, "j", "e"))
    s = matmul_tile(t, dims5, q, k, Operand(fill(t, tile_shape, "0.0", 2), tile_shape, dims_of(dims4)), "e", 2, "s")
    so = Operand(s, tile_shape, dims_of(dims4))
    if mode in (0, 1):
        def scaled(a: list[str], i: int) -> str:
            x = t.op("x", f"arith.mulf {a[0]}, {constant(t, sp.scale, i)} : f32", i)
            if mode == 1 and sp.softcap is not None:
                cap = constant(t, sp.softcap, i)
                th = t.op("x", f"math.tanh {t.op('x', f'arith.divf {x}, {cap} : f32', i)} : f32", i)
                x = t.op("x", f"arith.mulf {th}, {cap} : f32", i)
            return x

        out = generic(t, dims4, [so], Operand(empty(t, tile_shape, 2), tile_shape, dims_of(dims4)), [PAR] * len(dims4),
                      scaled, 2, "qk")
    else:
        factor = None
        if mode == 3 and sp.ssmax is not None:
            sp.ssmax.emit_constants(t)
            factor = emit_factor(t, row_shape, sp.s_k, sp.keys.settled(t, tile_shape), sp.ssmax)
        masks = [(m.arg, m.shape, m) for m in sp.masks]
        out = logits_tile(t, sp, so, masks, factor, None, 2)  # type: ignore[arg-type]
        if mode == 3:  # softmax; a row with no attendable key is 0, as the op's fully-masked-row guard
            z = Operand(out, tile_shape, dims_of(dims4))
            m = reduce_max(t, dims4, z, Operand(fill(t, row_shape, f32(-math.inf), 2), row_shape, rows), 2)
            p = exp_sub(t, dims4, z, Operand(m, row_shape, rows), tile_shape, 2, "p")
            den = reduce_sum(t, dims4, Operand(p, tile_shape, dims_of(dims4)),
                             Operand(fill(t, row_shape, "0.0", 2), row_shape, rows), 2)
            out = divide_rows(t, dims4, Operand(p, tile_shape, dims_of(dims4)), Operand(den, row_shape, rows), tile_shape, 2)
    out = convert(t, out, tile_shape, "f32", out_elem, 2)
    t.emit(f"return {out} : {out_ty}")
    t.emit("}", 1)
    return t.text()


def with_cache(ed: Editor, node: Any, sp: FusedSpec, tile: int, before: Any) -> tuple[FusedSpec, list[Any] | None]:
    """``present_key``/``present_value`` emitted and their uses replaced; the spec now attends over them.

    Returns the spec and the builtin K, V the loop nest reads (None: K and V as the op took them)."""
    past, pres = past_kv(node), presents(node)
    if past is None and pres is None:
        return sp, None
    k_op, v_op = node.operands[1], node.operands[2]
    packed = len(k_op.shape) == 3
    kv_heads = sp.k_shape[-3]
    outs = []
    for new, canon, i in ((k_op, sp.k_shape, 0), (v_op, sp.v_shape, 1)):
        b, h, _, d = canon
        p_shape = tuple(past[i].shape) if past is not None else (b, h, 0, d)
        name = ed.fresh_symbol(f"attnpass_present_{'kv'[i]}")
        ed.add_func(kv_concat_func(name, p_shape, tuple(new.shape), packed, sp.elem), "KV cache concat")
        total = (b, h, p_shape[2] + canon[2], d)
        vty = f"!torch.vtensor<[{','.join(map(str, total))}],{sp.elem}>"
        args = ([ed.builtin(past[i], before)] if past is not None else []) + [ed.builtin(new, before)]
        val = ed.call(name, args, [vty], before)[0]
        if pres is not None and used(pres[i]):
            pres[i].value.replace_all_uses_with(val)
        outs.append((to_builtin_raw(ed, val, tensor_type(total, sp.elem), before), total))
    (kb, ks), (vb, vs) = outs
    if ks[-3] != kv_heads:
        raise AttnpassError(f"internal error: KV cache of {node} has {ks[-3]} heads, K {kv_heads}")
    # ONNX aligns causal and window masks to the cache: query row i sits at position P + i
    offset = past[0].shape[2] if past is not None else 0
    sp = dataclasses.replace(sp, k_shape=ks, v_shape=vs, s_k=ks[2], tile=tile_for(ks[2], tile),
                             k_transposed=False, packed=sp.packed - {"k", "v"}, q_offset=offset)
    return sp, [kb, vb]


def with_qk_output(ed: Editor, node: Any, sp: FusedSpec, args: list[Any], before: Any) -> None:
    """Emit the op's ``qk_matmul_output`` (when read) from ``args`` (q, k, masks..., [L_b], [keys..., s, b]) and
    replace its uses."""
    qk = qk_output(node)
    if qk is None:
        return
    value, mode = qk
    if mode == 3 and sp.ssmax is None:
        raise AttnpassError(f"internal error: {node} planned fused with its probabilities as an output")
    name = ed.fresh_symbol("attnpass_qk_output")
    ed.add_func(qk_output_func(name, sp, mode, builtin_elem(value.dtype or "f32")), f"qk_matmul_output (mode {mode})")
    new = ed.call(name, args, [value.type], before)[0]
    value.value.replace_all_uses_with(new)


__all__ = ["kv_concat_func", "qk_output_func", "with_cache", "with_qk_output"]
