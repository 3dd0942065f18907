"""K^T packed by key tiles for the fused loop nest's ``Q K^T`` register blocks (``fused.fused_func``).

A module of its own so that ``fused.py`` stays the loop nest's structure; the packing is one pass over K per call,
and the attention scale rides along in it (``scale * (q . k) = q . (scale * k)``), so Q needs no pass of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnpass.rewrite.mlir.builders import PAR, Operand, Ssa, constant, dims_of, empty, generic, tensor_type, unknown_sizes

if TYPE_CHECKING:
    from attnpass.rewrite.mlir.fused import FusedSpec


def pack_keys(t: Ssa, k: str, shape: tuple[int, ...], tile: int, scale: float = 1.0) -> tuple[str, tuple[int, ...]]:
    """``K^T`` packed by key tiles: ``kp[..., jt, e, j] = scale * k[..., jt * tile + j, e]``, shape ``[..., S_k / tile,
    D, tile]``; returns its name and shape.

    The ``Q K^T`` register blocks read ``RK`` rows of a tile's ``K^T`` per step.  In a plain ``[D, S_k]`` transpose
    those rows lie ``4 S_k`` bytes apart, a multiple of 4 KiB at the usual lengths, so every row of a tile falls in
    the same L1 set and they evict each other; packed, a tile is one contiguous ``D x tile`` block.  One pass over
    K per call, as the transpose was.
    """
    *kb, s_k, d = shape
    out = (*kb, s_k // tile, d, tile)
    dims = [f"d{i}" for i in range(len(kb))]
    src = Operand(k, tuple(shape), dims_of([*dims, f"t * {tile} + j", "e"]))
    dst = Operand(empty(t, out, 2, sizes=unknown_sizes(t, k, shape, "f32", 2)), out, dims_of([*dims, "t", "e", "j"]))

    def body(a: list[str], i: int) -> str:
        return a[0] if scale == 1.0 else t.op("x", f"arith.mulf {a[0]}, {constant(t, scale, i)} : f32", i)

    return generic(t, [*dims, "t", "e", "j"], [src], dst, [PAR] * len(out), body, 2, "kp"), out


def packed_tile(t: Ssa, sp: FusedSpec, j0: str, tile: int, ind: int) -> tuple[str, tuple[int, ...]]:
    """The ``K^T`` of the key tile at ``j0`` (its first ``tile`` keys) from the packed ``K^T``: one contiguous block."""
    *kb, _, d, full = sp.k_shape
    jt = t.op("jt", f"arith.divui {j0}, {t.op('c', f'arith.constant {full} : index', ind)} : index", ind)
    rank = len(sp.k_shape)
    offs = ", ".join(["0"] * len(kb) + [jt, "0", "0"])
    out = (*kb, d, tile)
    name = t.op("ktile", f"tensor.extract_slice {sp.k_value}[{offs}] [{', '.join(map(str, (*kb, 1, d, tile)))}] "
                         f"[{', '.join(['1'] * rank)}] : {tensor_type(sp.k_shape, 'f32')} to {tensor_type(out, 'f32')}", ind)
    return name, out


__all__ = ["pack_keys", "packed_tile"]
