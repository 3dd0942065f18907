"""Heads packed in the last axis (``[B, S, H*D]``, the 3-D ONNX ``Attention`` layout) around the loop nest.

The loop nest works on ``[B, H, S, D]``; a packed operand is split (``tensor.expand_shape`` to
``[B, S, H, D]``, a free reshape) and transposed in, and the ``[B, H, S, Dv]`` result is transposed and
merged back (``tensor.collapse_shape``).  The copies are ``S x D`` per head, never of the scores.
"""

from __future__ import annotations

from attnpass.rewrite.mlir.builders import Ssa, tensor_type, transpose

#: ``[B, S, H, D]`` -> ``[B, H, S, D]`` and back (its own inverse).
SWAP_SH = (0, 2, 1, 3)


def packed_shape(canonical: tuple[int, ...]) -> tuple[int, ...]:
    """``[B, H, S, D]`` -> ``[B, S, H*D]``: the shape the op takes or gives for a canonical operand."""
    b, h, s, d = canonical
    return (b, s, h * d)


def unpack(t: Ssa, src: str, canonical: tuple[int, ...], ind: int, result: str, elem: str = "f32") -> str:
    """``src : [B, S, H*D]`` as ``[B, H, S, D]`` (``result``): heads split off the last axis, then moved before S."""
    b, h, s, d = canonical
    split = (b, s, h, d)
    e = t.fresh("split")
    t.emit(f"{e} = tensor.expand_shape {src} [[0], [1], [2, 3]] output_shape [{', '.join(map(str, split))}] : "
           f"{tensor_type(packed_shape(canonical), elem)} into {tensor_type(split, elem)}", ind)
    return transpose(t, e, split, SWAP_SH, ind, result=result, elem=elem)


def pack(t: Ssa, src: str, canonical: tuple[int, ...], ind: int) -> str:
    """``src : [B, H, S, D]`` as ``[B, S, H*D]``: heads moved after S, then merged into the last axis."""
    b, h, s, d = canonical
    moved = transpose(t, src, canonical, SWAP_SH, ind)
    out = t.fresh("merged")
    t.emit(f"{out} = tensor.collapse_shape {moved} [[0], [1], [2, 3]] : {tensor_type((b, s, h, d), 'f32')} into "
           f"{tensor_type(packed_shape(canonical), 'f32')}", ind)
    return out


__all__ = ["SWAP_SH", "packed_shape", "unpack", "pack"]
