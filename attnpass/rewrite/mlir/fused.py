"""The fused attention function: online softmax as an ``scf.for`` over key tiles, built from named builders.

For each tile of keys ``[j0, j0 + T)`` the loop carries the running row max ``m``, normaliser ``l``
and unnormalised output ``acc`` (``S_q`` and ``S_q x D_v`` per batch slice) and updates them::

    s     = Q K_tile^T                       (matmul_tile, reduced over the head dim)
    z     = mask(scale * s [+ bias]) [* f]   (logits_tile: -inf where a key is removed)
    m'    = max(m, max_j z)                  (reduce_max)
    p     = exp(z - m')                      (exp_sub)
    alpha = exp(m - m')                      (exp_sub on the rows)
    l'    = l * alpha + sum_j p              (rescale, reduce_sum)
    acc'  = acc * alpha + p V_tile           (rescale, matmul_tile reduced over the key tile)

and finally ``out = l != 0 ? acc / l : 0`` (divide_rows).  The largest tensor is ``S_q x T``,
never ``S_q x S_k``.

Schedule: with at least two blocks of ``DEFAULT_QBLOCK`` query rows, an outer ``scf.for`` runs the
recurrence per block (state of ``block`` rows, not ``S_q``), and each block's key loop is bounded by
the keys its rows may attend (top-left causal: up to the block's diagonal; a window: from its first
row minus ``left``), so those tiles are skipped, not masked.  The SSMax factor is computed once, before
the blocks, and sliced per block.  f16 / bf16 operands are widened to f32 once on entry and the output
narrowed on exit.  The parallel loop is one ``scf.forall`` over batch slices (heads included) x query blocks
(``_query_blocks``; a few rows make one block, so decode still spreads its heads over the cores), which the
lowering turns into OpenMP on all cores (``lowering/omp.py``); inside, every tile is one head's ``64 x tile``.  The
two matmuls of a key tile are marked for register blocks of ``vector.contract`` (``microkernel.py``) where their dims
divide, K transposed once up front for them, packed by key tiles (``pack_keys``) when the keys are whole tiles.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from attnpass.rewrite.mlir import microkernel
from attnpass.rewrite.mlir.batch_dims import batch_index, batch_sizes, broadcast_index, trip_count
from attnpass.rewrite.mlir.builders import (
    PAR,
    MaskIn,
    Operand,
    Ssa,
    bcast_map,
    both,
    causal_test,
    constant,
    convert,
    dims_of,
    divide_rows,
    empty,
    exp_sub,
    extract_keys,
    f32,
    fill,
    generic,
    mask_body,
    matmul_from,
    matmul_tile,
    permuted,
    reduce_from,
    reduce_max,
    reduce_sum,
    rescale,
    row_offset,
    settle_mask,
    tensor_type,
    transpose,
    unknown_sizes,
    unpermuted,
    window_test,
)
from attnpass.rewrite.mlir.key_pack import pack_keys, packed_tile
from attnpass.rewrite.mlir.kv_len import KvLen, keep_test, key_bound
from attnpass.rewrite.mlir.packed_heads import pack, packed_shape, unpack
from attnpass.rewrite.mlir.ssmax import KeyMasks, SsmaxParams, emit_factor

DEFAULT_TILE = 64


def tile_for(s_k: int, tile: int) -> int:
    """The key tile: all keys when they fit in one tile."""
    return s_k if s_k <= tile else tile


@dataclass
class FusedSpec:
    """Everything the loop nest needs: static sizes but for batch dims, which may be unknown (None).

    An unknown batch size prints as ``?`` in the function's types and is read with ``tensor.dim`` of Q (``batch_sizes``):
    the tensors built before the parallel loop are sized with it, and the loop's trip count and index are computed from
    it.  Inside the loop every batch dim is 1, so the per-tile code only ever sees static sizes.
    """

    batch: tuple[int | None, ...]  # batch dims of the scores (heads included); None: known at run time only
    s_q: int
    s_k: int
    d: int
    dv: int
    q_shape: tuple[int | None, ...]
    k_shape: tuple[int | None, ...]
    v_shape: tuple[int | None, ...]
    k_transposed: bool
    k_groups: int
    v_groups: int
    scale: float
    softcap: float | None
    causal: bool
    masks: list[MaskIn]
    tile: int
    ssmax: SsmaxParams | None = None  # SSMax inside the loop nest: a per-row factor on the logits
    keys: KeyMasks = KeyMasks()  # with ``ssmax``: the plan's key factors ``n`` is counted from
    # einsum layouts: "q"/"k"/"v" arrive as raw tensors with ``raw.permute(p)`` canonical; "out" leaves as
    # ``canonical.permute(p)``
    perms: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # 3-D fused op: "q"/"k"/"v"/"out" in this set arrive / leave as [B, S, H*D] (``packed_heads``)
    packed: frozenset[str] = frozenset()
    # (left, right): key j attendable from query i when i - left <= j <= i + right (-1: that side open)
    window: tuple[int, int] | None = None
    elem: str = "f32"  # of q, k, v and the output: f16 / bf16 are widened to f32 inside and the output narrowed
    microkernel: bool = True  # the tile matmuls as vector.contract register blocks (``microkernel``) where they divide
    k_value: str = "%k"  # the SSA name K tiles are cut from (``%k_t``: K transposed once for the register blocks)
    q_value: str = "%q"  # the SSA name query blocks are cut from (``%qs``: Q times the scale, once)
    v_value: str = "%v"  # the SSA name V tiles are cut from (inside the parallel loop: the iteration's head)
    # K^T packed by key tiles, ``[kbatch..., S_k / tile, D, tile]`` (``pack_keys``): each tile's K^T is one
    # contiguous block
    k_packed: bool = False
    # query row i sits at position ``q_offset + i`` for the causal and window tests (a KV cache of ``P`` past keys)
    q_offset: int = 0
    # a per-batch key limit (``nonpad_kv_seqlen``): keys j >= L_b removed, causal / window rows at L_b - S_q + i
    kv_len: KvLen | None = None
    key_bound: str | None = None  # with ``kv_len``: an index, the end of the keys any batch entry holds (whole tiles)
    # the index values of the unknown batch sizes, one per None in ``batch``, in order (``batch_sizes``)
    sizes: tuple[str, ...] = ()

    def args(self) -> list[str]:
        """The arguments after Q, K, V: the masks, then ``L_b`` (with ``kv_len``)."""
        return [f"{m.arg}: {tensor_type(m.shape, m.elem)}" for m in self.masks] + ([self.kv_len.decl()] if self.kv_len else [])

    def key_end(self) -> int:
        """One past the last key any query row may attend: key tiles from there on are skipped, not masked.

        Top-left causal ends at ``S_q``, a right window at ``S_q - 1 + right + 1`` (both later by ``q_offset``).
        """
        end = self.s_k
        if self.kv_len is not None:  # the rows' positions are known at run time only
            return max(end, 1)
        if self.causal:
            end = min(end, self.s_q + self.q_offset)
        if self.window is not None and self.window[1] >= 0:
            end = min(end, self.s_q + self.q_offset + self.window[1])
        return max(end, 1)

    @property
    def nb(self) -> int:
        return len(self.batch)

    @property
    def bdims(self) -> list[str]:
        return [f"d{i}" for i in range(self.nb)]

    @property
    def group_dim(self) -> int | None:
        """The head dim of the batch, where GQA reads ``h floordiv groups``."""
        return self.nb - 1 if self.nb >= 1 else None


DEFAULT_QBLOCK = 64


@dataclass(frozen=True)
class Rows:
    """A block of query rows as the key loop reads it: its Q slice, the index of its first row (None: row 0)
    and its slice of the SSMax factor."""

    q: str
    i0: str | None
    factor: str | None


def query_block(sp: FusedSpec, block: int = DEFAULT_QBLOCK) -> int | None:
    """Query rows per block, or None for one block of all rows (too few rows, or not a multiple of the block).

    Blocks keep the running state small (``block`` rows, not ``S_q``) and let each block visit only the key
    tiles its rows may attend: below the diagonal (causal), inside the window.
    """
    return block if sp.s_q >= 2 * block and sp.s_q % block == 0 else None


def _static_keys(sp: FusedSpec) -> tuple[int, int]:
    """Keys ``[0, key_end)`` for one block of all rows: full tiles in the loop, then a static tail."""
    end = sp.key_end()
    n_full = end // sp.tile
    return n_full * sp.tile, end - n_full * sp.tile


def _key_loop(t: Ssa, sp: FusedSpec, rows: Rows, bounds: tuple[str, str], state: tuple[str, str, str],
              ind: int) -> tuple[str, str, str]:
    """``scf.for %j0 = lo to hi step tile`` over full key tiles, carrying (max, normaliser, accumulator)."""
    row_shape, out_shape = (*sp.batch, sp.s_q), (*sp.batch, sp.s_q, sp.dv)
    rty, oty = tensor_type(row_shape, "f32"), tensor_type(out_shape, "f32")
    step = t.op("c", f"arith.constant {sp.tile} : index", ind)
    res, m, lv, acc, j0 = t.fresh("loop"), t.fresh("m"), t.fresh("l"), t.fresh("acc"), t.fresh("j0")
    t.emit(f"{res}:3 = scf.for {j0} = {bounds[0]} to {bounds[1]} step {step} iter_args({m} = {state[0]}, "
           f"{lv} = {state[1]}, {acc} = {state[2]}) -> ({rty}, {rty}, {oty}) {{", ind)
    new = fused_tile(t, sp, j0, sp.tile, (m, lv, acc), rows, ind + 1)
    t.emit(f"scf.yield {new[0]}, {new[1]}, {new[2]} : {rty}, {rty}, {oty}", ind + 1)
    t.emit("}", ind)
    return f"{res}#0", f"{res}#1", f"{res}#2"


def _row_block(t: Ssa, sp: FusedSpec, rows: Rows, ind: int, keys: tuple[int, int] | tuple[str, str, int]) -> str:
    """``out = acc / l`` for the rows of ``sp`` (``sp.s_q`` of them), the online softmax over the key range ``keys``.

    ``keys`` is ``(full, tail)`` (static: ``[0, full)`` in tiles, then ``tail`` keys) or ``(lo, hi, 0)`` (index
    values, multiples of the tile: the block's own range).
    """
    row_shape, out_shape = (*sp.batch, sp.s_q), (*sp.batch, sp.s_q, sp.dv)
    state = (fill(t, row_shape, f32(-math.inf), ind), fill(t, row_shape, "0.0", ind), fill(t, out_shape, "0.0", ind))
    if len(keys) == 3:
        state = _key_loop(t, sp, rows, (str(keys[0]), str(keys[1])), state, ind)
    else:
        full, tail = keys
        if full > 0:
            bounds = (t.op("c", "arith.constant 0 : index", ind), t.op("c", f"arith.constant {full} : index", ind))
            if sp.key_bound is not None:  # a per-batch key limit: tiles past every entry's keys are skipped
                bounds = (bounds[0], t.op("hi", f"arith.minsi {bounds[1]}, {sp.key_bound} : index", ind))
            state = _key_loop(t, sp, rows, bounds, state, ind)
        if tail:
            jt = t.op("c", f"arith.constant {full} : index", ind)
            state = fused_tile(t, sp, jt, tail, state, rows, ind)
    dlo = [*sp.bdims, "i", "e"]
    return divide_rows(t, dlo, Operand(state[2], out_shape, dims_of(dlo)),
                       Operand(state[1], row_shape, dims_of([*sp.bdims, "i"])), out_shape, ind)


def _block_keys(t: Ssa, sp: FusedSpec, q0: str, qb: int, ind: int) -> tuple[str, str, int] | tuple[int, int]:
    """The key range of the query block at ``q0``, rounded out to whole tiles: from ``q0 - left`` (window) to
    ``q0 + qb`` (causal) or ``q0 + qb + right`` (window), each later by ``q_offset``.  Static ``[0, key_end)`` when
    ``S_k`` is not whole tiles."""
    if sp.key_bound is not None and not sp.s_k % sp.tile:  # a per-batch key limit: up to the last entry's keys
        return t.op("c", "arith.constant 0 : index", ind), sp.key_bound, 0
    skips = (sp.causal or (sp.window is not None and max(sp.window) >= 0)) and sp.kv_len is None
    if not skips or sp.s_k % sp.tile:
        return _static_keys(sp) if sp.s_k % sp.tile else (sp.s_k, 0)

    def c(v: int) -> str:
        return t.op("c", f"arith.constant {v} : index", ind)

    hi = c(sp.s_k)
    top = None
    if sp.causal:
        top = t.op("top", f"arith.addi {q0}, {c(qb + sp.q_offset)} : index", ind)
    if sp.window is not None and sp.window[1] >= 0:
        right = t.op("top", f"arith.addi {q0}, {c(qb + sp.q_offset + sp.window[1])} : index", ind)
        top = right if top is None else t.op("top", f"arith.minsi {top}, {right} : index", ind)
    if top is not None:  # rounded up to a whole tile, at most S_k
        up = t.op("up", f"arith.ceildivsi {top}, {c(sp.tile)} : index", ind)
        hi = t.op("hi", f"arith.minsi {t.op('up', f'arith.muli {up}, {c(sp.tile)} : index', ind)}, {hi} : index", ind)
    lo = c(0)
    if sp.window is not None and sp.window[0] >= 0:
        start = t.op("lo", f"arith.subi {q0}, {c(sp.window[0] - sp.q_offset)} : index", ind)
        first = t.op("lo", f"arith.maxsi {start}, {lo} : index", ind)
        down = t.op("lo", f"arith.divsi {first}, {c(sp.tile)} : index", ind)
        lo = t.op("lo", f"arith.muli {down}, {c(sp.tile)} : index", ind)
    return lo, hi, 0


def _block_start(t: Ssa, sp: FusedSpec, k: str, qb: int, nblocks: int, ind: int) -> str:
    """The first row of the block the ``k``-th parallel iteration runs.

    Causal and window blocks cost what their key range costs, so a static schedule of contiguous iterations
    would give one thread the cheap top blocks and another the expensive bottom ones: the iterations pair
    them instead (0, n-1, 1, n-2, ...), and any even run of consecutive iterations is balanced.
    """
    def c(v: int) -> str:
        return t.op("c", f"arith.constant {v} : index", ind)

    block = k
    if sp.causal or sp.window is not None:
        half = t.op("kh", f"arith.divui {k}, {c(2)} : index", ind)
        odd = t.op("ko", f"arith.cmpi ne, {t.op('kr', f'arith.remui {k}, {c(2)} : index', ind)}, {c(0)} : index", ind)
        top = t.op("kt", f"arith.subi {c(nblocks - 1)}, {half} : index", ind)
        block = t.op("kb", f"arith.select {odd}, {top}, {half} : index", ind)
    return t.op("q0", f"arith.muli {block}, {c(qb)} : index", ind)


def _batch_slice(t: Ssa, src: str, shape: tuple[int | None, ...], elem: str, sp: FusedSpec, idx: list[str],
                 rows: tuple[int, str, int] | None, groups: int, ind: int, inner: int = 2) -> tuple[str, tuple[int, ...]]:
    """``src`` at one batch slice (``idx``, one index per batch dim) and, with ``rows = (axis, start, size)``, at a
    block of query rows: size-1 (broadcast) batch dims stay whole, the GQA head dim reads ``h floordiv groups``.
    ``src`` is read right-aligned against ``(*batch, <inner dims>)``."""
    off = sp.nb + inner - len(shape)
    offs, sizes = [], []
    for a, size in enumerate(shape):
        d = a + off
        if rows is not None and a == rows[0]:
            offs.append(rows[1])
            sizes.append(rows[2])
        elif d < sp.nb and size != 1:
            at = idx[d] if size is not None else broadcast_index(t, src, shape, elem, a, idx[d], ind)
            if d == sp.group_dim and groups > 1:
                at = t.op("g", f"arith.divui {at}, {t.op('c', f'arith.constant {groups} : index', ind)} : index", ind)
            offs.append(at)
            sizes.append(1)
        else:
            offs.append("0")
            sizes.append(size)
    out = t.op("slice", f"tensor.extract_slice {src}[{', '.join(offs)}] [{', '.join(map(str, sizes))}] "
                        f"[{', '.join(['1'] * len(shape))}] : {tensor_type(shape, elem)} to "
                        f"{tensor_type(tuple(sizes), elem)}", ind)
    return out, tuple(sizes)


def parallel_blocks(sp: FusedSpec, qb: int | None) -> int | None:
    """Iterations of the parallel loop: every batch slice (heads included) times every block of ``qb`` query rows
    (one block of all rows when ``qb`` is None), so a few rows (decode) still give every core work.  None when an
    unknown batch size makes it a run-time count (``batch_dims.trip_count``)."""
    if None in sp.batch:
        return None
    return math.prod(sp.batch) * (sp.s_q // qb if qb else 1)


def _query_blocks(t: Ssa, sp: FusedSpec, qb: int | None, factor: str | None) -> str:
    """``scf.forall`` over batch slices x blocks of ``qb`` query rows (``None``: all rows), each an online softmax
    over its own key range; each block's output is inserted in parallel into the ``[batch..., S_q, D_v]`` result.

    The iterations are independent (each reads its Q rows and its head's K / V, writes its own rows), so the loop
    is a parallel one: lowered to ``scf.parallel`` and then OpenMP (``lowering.mlir``), it runs on all cores.  One
    collapsed loop, blocks innermost: a static schedule hands each thread whole heads, causal blocks paired inside
    them (``_block_start``).  Inside, every batch dim is 1: the per-iteration tiles are ``qb x tile``, small
    enough to stay in cache, and K / V are read at the head GQA maps this head to.
    """
    out_shape = (*sp.batch, sp.s_q, sp.dv)
    oty = tensor_type(out_shape, "f32")
    rows = qb or sp.s_q
    nblocks = sp.s_q // rows
    static = parallel_blocks(sp, qb)
    count = str(static) if static is not None else trip_count(t, sp, nblocks, 2)
    init = empty(t, out_shape, 2, sizes=sp.sizes)
    res, k, acc = t.fresh("blocks"), t.fresh("k"), t.fresh("o")
    t.emit(f"{res} = scf.forall ({k}) in ({count}) shared_outs({acc} = {init}) -> ({oty}) {{")

    def c(v: int) -> str:
        return t.op("c", f"arith.constant {v} : index", 3)

    kb, rest = k, k
    if nblocks > 1:
        kb = t.op("kb", f"arith.remui {k}, {c(nblocks)} : index", 3)
        rest = t.op("bh", f"arith.divui {k}, {c(nblocks)} : index", 3)
    idx = batch_index(t, sp, rest, 3)  # last dim fastest
    q0 = _block_start(t, sp, kb, rows, nblocks, 3) if nblocks > 1 else c(0)
    q, q_shape = _batch_slice(t, sp.q_value, sp.q_shape, "f32", sp, idx, (len(sp.q_shape) - 2, q0, rows), 1, 3)
    kv, k_shape = _batch_slice(t, sp.k_value, sp.k_shape, "f32", sp, idx, None, sp.k_groups, 3, 3 if sp.k_packed else 2)
    vv, v_shape = _batch_slice(t, "%v", sp.v_shape, "f32", sp, idx, None, sp.v_groups, 3)
    masks = []
    for mk in sp.masks:  # a mask with a query axis of S_q is read at the block's rows
        on_rows = len(mk.shape) >= 2 and mk.shape[-2] == sp.s_q and sp.s_q != 1
        name, shp = _batch_slice(t, mk.arg, mk.shape, mk.elem, sp, idx,
                                 (len(mk.shape) - 2, q0, rows) if on_rows else None, 1, 3)
        masks.append(MaskIn(mk.term, name, shp, mk.elem))
    fac = None
    if factor is not None:
        fac, _ = _batch_slice(t, factor, (*sp.batch, sp.s_q), "f32", sp, idx, (sp.nb, q0, rows), 1, 3, inner=1)
    ones = (1,) * sp.nb
    kv_len = sp.kv_len
    if kv_len is not None:  # L_b of this iteration's batch entry: the tile's domain has a batch of 1
        one = tensor_type((1,), "i64")
        kv_len = dataclasses.replace(kv_len, batch=1, arg=t.op(
            "kvlen", f"tensor.extract_slice {kv_len.arg}[{idx[0]}] [1] [1] : {kv_len.type} to {one}", 3))
    blk = dataclasses.replace(sp, batch=ones, sizes=(), s_q=rows, q_shape=q_shape, k_shape=k_shape, v_shape=v_shape,
                              k_groups=1, v_groups=1, masks=masks, k_value=kv, v_value=vv, kv_len=kv_len)
    keys = _block_keys(t, sp, q0, rows, 3) if nblocks > 1 else _static_keys(sp)
    out = _row_block(t, blk, Rows(q, q0 if nblocks > 1 else None, fac), 3, keys)
    offs = ", ".join([*idx, q0, "0"])
    sizes = ", ".join(map(str, (*ones, rows, sp.dv)))
    t.emit("scf.forall.in_parallel {", 3)
    t.emit(f"tensor.parallel_insert_slice {out} into {acc}[{offs}] [{sizes}] [{', '.join(['1'] * (sp.nb + 2))}] : "
           f"{tensor_type((*ones, rows, sp.dv), 'f32')} into {oty}", 4)
    t.emit("}", 3)
    t.emit("}", 2)
    return res


def _tuple(prefix: str, *tail: str) -> str:
    """``(d0, d1)`` + ``i, e`` -> ``(d0, d1, i, e)``: a broadcast batch prefix followed by named dims."""
    inner = prefix[1:-1]
    return "(" + ", ".join(([inner] if inner else []) + list(tail)) + ")"


def fused_func(name: str, sp: FusedSpec) -> str:
    """The online-softmax loop nest: ``scf.for`` over key tiles carrying (max, normaliser, accumulator)."""
    t = Ssa()
    row_shape = (*sp.batch, sp.s_q)
    out_shape = (*sp.batch, sp.s_q, sp.dv)
    raw = {"q": sp.q_shape, "k": sp.k_shape, "v": sp.v_shape}
    raw = {n: packed_shape(shape) if n in sp.packed else unpermuted(shape, sp.perms.get(n)) for n, shape in raw.items()}
    moved = set(sp.perms) | set(sp.packed)
    wide = "_in" if sp.elem != "f32" else ""
    args = [f"%{n}{'_raw' if n in moved else ''}{wide}: {tensor_type(shape, sp.elem)}" for n, shape in raw.items()]
    args += sp.args()
    args += (sp.keys.args() + sp.ssmax.args()) if sp.ssmax else []
    out_perm = sp.perms.get("out")
    ret_shape = packed_shape(out_shape) if "out" in sp.packed else permuted(out_shape, out_perm)
    ret_ty = tensor_type(ret_shape, sp.elem)
    t.emit(f"func.func private @{name}({', '.join(args)}) -> {ret_ty} {{", 1)
    for n, shape in raw.items() if wide else ():
        base = f"%{n}{'_raw' if n in moved else ''}"
        convert(t, base + wide, shape, sp.elem, "f32", 2, result=base)
    for n, shape in raw.items():
        if n in sp.packed:
            unpack(t, f"%{n}_raw", {"q": sp.q_shape, "k": sp.k_shape, "v": sp.v_shape}[n], 2, result=f"%{n}")
        elif n in sp.perms:
            transpose(t, f"%{n}_raw", shape, sp.perms[n], 2, result=f"%{n}")
    sp = batch_sizes(t, sp, 2)
    rows = query_block(sp) or sp.s_q
    # K^T once (S_k x D), so every Q K^T block reads rows of both; not where Q K^T stays a generic, which reads
    # K's rows along its innermost (head) dim
    if sp.microkernel and not sp.k_transposed and microkernel.fits(rows, sp.tile, sp.d) and sp.s_k % sp.tile == 0:
        # scale * (q . k) = q . (scale * k): folded into the packing pass, no pass over Q (and its buffer) per call
        kp, kp_shape = pack_keys(t, "%k", sp.k_shape, sp.tile, sp.scale)
        sp = dataclasses.replace(sp, k_shape=kp_shape, k_transposed=True, k_value=kp, k_packed=True, scale=1.0)
    elif sp.microkernel and not sp.k_transposed and microkernel.fits(rows, sp.tile, sp.d):
        perm = (*range(len(sp.k_shape) - 2), len(sp.k_shape) - 1, len(sp.k_shape) - 2)
        transpose(t, "%k", sp.k_shape, perm, 2, result="%k_t")
        sp = dataclasses.replace(sp, k_shape=permuted(sp.k_shape, perm), k_transposed=True, k_value="%k_t")
    if sp.scale != 1.0:  # scale * (q . k) = (scale * q) . k: once per row of Q, not once per logit
        qd = [f"d{i}" for i in range(len(sp.q_shape))]
        q0 = empty(t, sp.q_shape, 2, sizes=unknown_sizes(t, "%q", sp.q_shape, "f32", 2))
        qs = generic(t, qd, [Operand("%q", sp.q_shape, dims_of(qd))], Operand(q0, sp.q_shape, dims_of(qd)),
                     [PAR] * len(qd), lambda a, i: t.op("x", f"arith.mulf {a[0]}, {constant(t, sp.scale, i)} : f32", i), 2, "qs")
        sp = dataclasses.replace(sp, scale=1.0, q_value=qs)
    domain = (*sp.batch, sp.s_q, sp.s_k)
    sp = dataclasses.replace(sp, masks=[settle_mask(t, m, domain) for m in sp.masks])
    factor = None
    if sp.ssmax is not None:
        # n_i needs every key of the row before the first tile: one reduction over the masks up front
        sp.ssmax.emit_constants(t)
        factor = emit_factor(t, row_shape, sp.s_k, sp.keys.settled(t, domain), sp.ssmax, sp.sizes)
    if sp.kv_len is not None:
        sp = dataclasses.replace(sp, key_bound=key_bound(t, sp.kv_len, sp.s_k, sp.tile, 2))
    qb = query_block(sp)
    if parallel_blocks(sp, qb) == 1:
        out = _row_block(t, sp, Rows(sp.q_value, None, factor), 2, _static_keys(sp))
    else:
        out = _query_blocks(t, sp, qb, factor)
    if "out" in sp.packed:
        out = pack(t, out, out_shape, 2)
    elif out_perm is not None:
        out = transpose(t, out, out_shape, out_perm, 2)
    out = convert(t, out, ret_shape, "f32", sp.elem, 2)
    t.emit(f"return {out} : {ret_ty}")
    t.emit("}", 1)
    return t.text()


def logits_tile(t: Ssa, sp: FusedSpec, s: Operand, masks: list[tuple[str, tuple[int, ...], MaskIn]],
                factor: str | None, j0: str, ind: int, i0: str | None = None) -> str:
    """``z = allowed ? (cap(scale * s) + biases) * f : -inf`` on one tile.

    Soft-cap is ``c tanh(x / c)``; ``f`` (SSMax) is the ``[..., S_q]`` per-row multiplier, applied
    after the biases and before the masks, the order ``semantics.attention`` defines; ``allowed``
    ANDs the hard masks, the bias limits and (causal) ``j0 + j <= i``; with ``kv_len`` the keys ``j < L_b`` of the
    row's batch entry and causal / window tests aligned to their end (``kv_len.keep_test``).
    """
    dims4 = [*sp.bdims, "i", "j"]
    ins = [s] + [Operand(name, shp, bcast_map(shp, s.shape, dims4), mk.elem) for name, shp, mk in masks]
    if factor is not None:
        ins.append(Operand(factor, s.shape[:-1], dims_of([*sp.bdims, "i"])))
    kvi = len(ins)  # L_b's block argument
    if sp.kv_len is not None:
        ins.append(sp.kv_len.operand())

    def body(a: list[str], i: int) -> str:
        x = a[0] if sp.scale == 1.0 else t.op("x", f"arith.mulf {a[0]}, {constant(t, sp.scale, i)} : f32", i)
        if sp.softcap is not None:
            cap = constant(t, sp.softcap, i)
            th = t.op("x", f"math.tanh {t.op('x', f'arith.divf {x}, {cap} : f32', i)} : f32", i)
            x = t.op("x", f"arith.mulf {th}, {cap} : f32", i)
        adds, ok = mask_body(t, [m for _, _, m in masks], a[1:1 + len(masks)], i, bias_limits=factor is not None)
        for add in adds:
            x = t.op("x", f"arith.addf {x}, {add} : f32", i)
        if factor is not None:
            x = t.op("x", f"arith.mulf {x}, {a[1 + len(masks)]} : f32", i)
        if sp.kv_len is not None:  # the causal and window tests aligned to the end of each batch entry's keys
            ok = both(t, ok, keep_test(t, sp.kv_len, a[kvi], sp.nb, sp.nb + 1, j0, i0, sp.causal, sp.window, i), i)
            return _select(t, ok, x, i)
        r0 = row_offset(t, i0, sp.q_offset, i)
        if sp.causal:
            ok = both(t, ok, causal_test(t, sp.nb, sp.nb + 1, j0, i, r0), i)
        win = window_test(t, sp.nb, sp.nb + 1, j0, sp.window, i, r0) if sp.window is not None else None
        if win is not None:
            ok = both(t, ok, win, i)
        return _select(t, ok, x, i)

    out = Operand(empty(t, s.shape, ind), s.shape, dims_of(dims4))
    return generic(t, dims4, ins, out, [PAR] * len(dims4), body, ind, "z")


def _select(t: Ssa, ok: str | None, x: str, ind: int) -> str:
    """``ok ? x : -inf`` (``x`` where nothing removes a key)."""
    return x if ok is None else t.op("x", f"arith.select {ok}, {x}, {constant(t, -math.inf, ind)} : f32", ind)


def fused_tile(t: Ssa, sp: FusedSpec, j0: str, tile: int, state: tuple[str, str, str], rows: Rows,
               ind: int) -> tuple[str, str, str]:
    """One key tile ``[j0, j0 + tile)`` for the query rows ``rows``: new running max, rescaled normaliser and
    accumulator."""
    factor = rows.factor
    bdims = sp.bdims
    m_old, l_old, acc_old = state
    tile_shape = (*sp.batch, sp.s_q, tile)
    row_shape = (*sp.batch, sp.s_q)
    out_shape = (*sp.batch, sp.s_q, sp.dv)
    dims5 = [*bdims, "i", "j", "e"]  # e: head dim (QK) or value dim (PV)
    dims4, dims3, dimso = [*bdims, "i", "j"], [*bdims, "i"], [*bdims, "i", "e"]
    if sp.k_packed:
        kt, kt_shape = packed_tile(t, sp, j0, tile, ind)
    else:
        kt, kt_shape = extract_keys(t, sp.k_value, sp.k_shape, "f32", len(sp.k_shape) - (1 if sp.k_transposed else 2), j0,
                                    tile, ind)
    vt, vt_shape = extract_keys(t, sp.v_value, sp.v_shape, "f32", len(sp.v_shape) - 2, j0, tile, ind)
    mask_tiles: list[tuple[str, tuple[int, ...], MaskIn]] = []
    for mk in sp.masks:
        if mk.shape and mk.shape[-1] != 1 and mk.shape[-1] == sp.s_k:
            name, shp = extract_keys(t, mk.arg, mk.shape, mk.elem, len(mk.shape) - 1, j0, tile, ind)
            mask_tiles.append((name, shp, mk))
        else:
            mask_tiles.append((mk.arg, mk.shape, mk))
    # s[b.., i, j] = sum_e q[b.., i, e] * k[b.., j, e]   (GQA: k's head read as h floordiv groups)
    batch_dom = (*sp.batch,)
    q = Operand(rows.q, sp.q_shape, _tuple(bcast_map(sp.q_shape[:-2], batch_dom, bdims), "i", "e"))
    kb = bcast_map(kt_shape[:-2], batch_dom, bdims, sp.k_groups, sp.group_dim)
    k = Operand(kt, kt_shape, _tuple(kb, "e", "j") if sp.k_transposed else _tuple(kb, "j", "e"))
    if sp.microkernel and sp.k_transposed and microkernel.fits(sp.s_q, tile, sp.d):  # blocks from zero: no fill pass
        s = matmul_from(t, dims5, q, k, None, None, (tile_shape, dims_of(dims4)), "e", ind, "s", microkernel.mark("zero"))
    else:
        s = matmul_tile(t, dims5, q, k, Operand(fill(t, tile_shape, "0.0", ind), tile_shape, dims_of(dims4)), "e", ind, "s")
    # z = masked, scaled, capped logits of the tile
    plain = sp.scale == 1.0 and sp.softcap is None and not mask_tiles and factor is None and not sp.causal and sp.window is None
    z = s if plain else logits_tile(t, sp, Operand(s, tile_shape, dims_of(dims4)), mask_tiles, factor, j0, ind, rows.i0)
    zt = Operand(z, tile_shape, dims_of(dims4))
    rows = dims_of(dims3)  # a per-row value, read from any domain that starts with (batch.., i)
    # m' = max(m, max_j z)
    by_rows = sp.microkernel and microkernel.row_mark(tile, "max") != ""  # vector kernels over whole rows
    if by_rows:  # read from the old max, written to a new one: no copy of the state
        m_new = reduce_from(t, dims4, zt, Operand(m_old, row_shape, rows), None, "max", ind, "mnew",
                            microkernel.row_mark(tile, "max_from"))
    else:
        m_new = reduce_max(t, dims4, zt, Operand(m_old, row_shape, rows), ind)
    # p = exp(z - m');  alpha = exp(m - m')
    p = exp_sub(t, dims4, zt, Operand(m_new, row_shape, rows), tile_shape, ind, "p",
                microkernel.row_mark(tile, "exp") if by_rows else "")  # a vector kernel: 512-bit where the host has it
    pt = Operand(p, tile_shape, dims_of(dims4))
    alpha = exp_sub(t, dims3, Operand(m_old, row_shape, rows), Operand(m_new, row_shape, rows), row_shape, ind, "alpha")
    # l' = l * alpha + sum_j p
    at = Operand(alpha, row_shape, rows)
    if by_rows:
        l_new = reduce_from(t, dims4, pt, Operand(l_old, row_shape, rows), at, "add", ind, "lnew",
                            microkernel.row_mark(tile, "add_scaled"))
    else:
        l_scaled = rescale(t, dims3, Operand(l_old, row_shape, rows), at, row_shape, ind, "lsc")
        l_new = reduce_sum(t, dims4, pt, Operand(l_scaled, row_shape, rows), ind)
    # acc' = acc * alpha + p @ v_tile   (value dim innermost: contiguous in acc and v)
    vb = bcast_map(vt_shape[:-2], batch_dom, bdims, sp.v_groups, sp.group_dim)
    vo = Operand(vt, vt_shape, _tuple(vb, "j", "e"))
    acc_o = Operand(acc_old, out_shape, dims_of(dimso))
    if sp.microkernel and microkernel.fits(sp.s_q, sp.dv, tile):  # alpha applied as each register block is loaded
        acc_new = matmul_from(t, dims5, pt, vo, acc_o, at, (out_shape, dims_of(dimso)), "j", ind, "accnew",
                              microkernel.mark("scaled"))
    else:
        acc_scaled = rescale(t, dimso, acc_o, at, out_shape, ind, "accs")
        acc_new = matmul_tile(t, dims5, pt, vo, Operand(acc_scaled, out_shape, dims_of(dimso)), "j", ind, "accnew")
    return m_new, l_new, acc_new
