"""A per-batch key limit in the loop nest: the ONNX ``Attention`` op's ``nonpad_kv_seqlen`` (opset 24).

K and V are then a cache buffer of ``S_k`` keys of which batch entry ``b`` holds ``L_b``: keys ``j >= L_b`` are
padding, and the op's causal and window masks are aligned to the end of the valid keys, query row ``i`` sitting at
position ``p = L_b - S_q + i`` (the onnx reference's ``offset[b] = nonpad_kv_seqlen[b] - q_len``, not clamped: a
negative position leaves its row with no attendable key, whose output is 0).

``L_b`` is a run-time ``[B]`` i64 tensor, so it is read per batch entry inside the tile's generic and tested
against the indices (``j < L_b``, ``j <= p``, ``p - left <= j <= p + right``) in signed index compares.  The
batch shares one key loop, so the loop ends at the largest ``L_b`` rounded up to a tile (``key_bound``), and the
test removes each entry's own padding before it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attnpass.passes.mlir_attention_op import nonpad_kv_seqlen
from attnpass.rewrite.mlir.builders import Operand, Ssa, both, causal_test, tensor_type, window_test

if TYPE_CHECKING:
    from attnpass.rewrite.mlir.editor import Editor
    from attnpass.rewrite.mlir.fused import FusedSpec


@dataclass(frozen=True)
class KvLen:
    """``L_b`` as an argument of a generated function: its SSA name, batch size and the full query length."""

    arg: str
    batch: int | None
    s_q: int  # every query row's position is ``L_b - s_q + i``: the whole query length, never a block's

    @property
    def type(self) -> str:
        return tensor_type((self.batch,), "i64")

    def decl(self) -> str:
        """The function argument ``%kvlen: tensor<Bxi64>``."""
        return f"{self.arg}: {self.type}"

    def operand(self) -> Operand:
        """``L_b`` read in a domain whose first dim is the batch (``[B, H, ..., S_q, S_k]``)."""
        return Operand(self.arg, (self.batch,), "(d0)", "i64")


def keep_test(t: Ssa, kv: KvLen, length: str, i_dim: int, j_dim: int, j0: str | None, i0: str | None,
              causal: bool, window: tuple[int, int] | None, ind: int) -> str:
    """``j < L_b`` and (causal) ``j <= p`` and the window around ``p = L_b - S_q + i``, for the iteration's query
    row ``i0 + i`` and key ``j0 + j``; ``length`` is the scalar ``L_b`` (i64) the generic reads.  The causal and
    window tests are the loop nest's own (``builders.causal_test`` / ``window_test``), with the rows at ``L_b + i``
    and the keys shifted by ``S_q``."""
    lb = t.op("lb", f"arith.index_cast {length} : i64 to index", ind)
    jj = t.op("j", f"linalg.index {j_dim} : index", ind)
    if j0 is not None:
        jj = t.op("jg", f"arith.addi {jj}, {j0} : index", ind)
    ok = t.op("valid", f"arith.cmpi slt, {jj}, {lb} : index", ind)
    base = lb if i0 is None else t.op("ib", f"arith.addi {i0}, {lb} : index", ind)
    if causal:
        ok = both(t, ok, causal_test(t, i_dim, j_dim, j0, ind, base, kv.s_q), ind)
    win = window_test(t, i_dim, j_dim, j0, window, ind, base, kv.s_q) if window is not None else None
    return both(t, ok, win, ind) if win is not None else ok


def key_bound(t: Ssa, kv: KvLen, s_k: int, tile: int, ind: int) -> str:
    """``min(S_k, ceil(max_b L_b / tile) * tile)`` as an index: key tiles from there on are padding in every batch
    entry, so the key loop ends there (the batch shares one loop, so a single entry's ``L_b`` cannot bound it)."""
    i64 = tensor_type((), "i64")
    zero = t.op("c", "arith.constant 0 : i64", ind)
    init = t.op("init", f"linalg.fill ins({zero} : i64) outs({t.op('empty', f'tensor.empty() : {i64}', ind)} : {i64}) -> {i64}",
                ind)
    mx, a, acc = t.fresh("lmax"), t.fresh("a"), t.fresh("a")
    t.emit(f"{mx} = linalg.generic {{indexing_maps = [affine_map<(d0) -> (d0)>, affine_map<(d0) -> ()>], "
           f'iterator_types = ["reduction"]}} ins({kv.arg} : {kv.type}) outs({init} : {i64}) {{', ind)
    t.emit(f"^bb0({a}: i64, {acc}: i64):", ind + 1)
    t.emit(f"linalg.yield {t.op('m', f'arith.maxsi {a}, {acc} : i64', ind + 2)} : i64", ind + 2)
    t.emit(f"}} -> {i64}", ind)

    def c(v: int) -> str:
        return t.op("c", f"arith.constant {v} : index", ind)

    top = t.op("lm", f"arith.index_cast {t.op('lm', f'tensor.extract {mx}[] : {i64}', ind)} : i64 to index", ind)
    up = t.op("up", f"arith.ceildivsi {t.op('lm', f'arith.maxsi {top}, {c(0)} : index', ind)}, {c(tile)} : index", ind)
    return t.op("kend", f"arith.minsi {t.op('up', f'arith.muli {up}, {c(tile)} : index', ind)}, {c(s_k)} : index", ind)


def with_kv_len(ed: Editor, node: Any, sp: FusedSpec, before: Any) -> tuple[FusedSpec, list[Any]]:
    """The op's ``nonpad_kv_seqlen`` as the loop nest's ``kv_len`` and the builtin value the call passes (none
    without that input)."""
    lengths = nonpad_kv_seqlen(node)
    if lengths is None:
        return sp, []
    shape = lengths.shape
    batch = shape[0] if shape is not None and len(shape) == 1 and isinstance(shape[0], int) else None
    kv = KvLen("%kvlen", batch, sp.s_q)
    return dataclasses.replace(sp, kv_len=kv), [ed.builtin(lengths, before)]


__all__ = ["KvLen", "keep_test", "key_bound", "with_kv_len"]
