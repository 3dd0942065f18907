"""Unknown batch sizes in the fused loop nest: read once with ``tensor.dim``, then used by the parallel loop.

A model exported with a dynamic batch (``torch.export`` ``dynamic_shapes``, an ONNX ``dynamic_axes`` batch) has
``?`` batch dims in its MLIR types.  The loop nest keeps them ``?`` in its signature and in the tensors it builds
before the parallel loop (sized with these values), computes the loop's trip count from them and delinearises the
loop index with them; inside, every batch dim is 1, so the per-tile code sees only static sizes.  S_q, S_k and the
head dims stay static (``passes.mlir`` says so in the reason when they are not).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from attnpass.errors import AttnpassError
from attnpass.rewrite.mlir.builders import Ssa, dim_size, tensor_type

if TYPE_CHECKING:
    from attnpass.rewrite.mlir.fused import FusedSpec


def batch_sizes(t: Ssa, sp: FusedSpec, ind: int) -> FusedSpec:
    """``sp`` with ``sizes``: ``tensor.dim`` of Q at each unknown batch dim.

    Q carries every batch dim of the output that is unknown (``passes.mlir`` leaves a site unfused otherwise), read
    right-aligned against ``(*batch, S_q, D)`` as the parallel loop's slices read it."""
    if None not in sp.batch:
        return sp
    off = sp.nb + 2 - len(sp.q_shape)
    sizes = []
    for d, size in enumerate(sp.batch):
        if size is not None:
            continue
        if d < off or sp.q_shape[d - off] is not None:
            raise AttnpassError(f"internal error: batch dim {d} is unknown but Q {sp.q_shape} does not carry it")
        sizes.append(dim_size(t, "%q", d - off, tensor_type(sp.q_shape, "f32"), ind))
    return dataclasses.replace(sp, sizes=tuple(sizes))


def batch_size(t: Ssa, sp: FusedSpec, d: int, ind: int) -> str:
    """Batch dim ``d``'s size as an index value: a constant, or its ``tensor.dim`` (``sp.sizes``)."""
    size = sp.batch[d]
    if size is not None:
        return t.op("c", f"arith.constant {size} : index", ind)
    return sp.sizes[sp.batch[:d].count(None)]


def trip_count(t: Ssa, sp: FusedSpec, blocks: int, ind: int) -> str:
    """The parallel loop's trip count under unknown batch sizes: the known sizes times ``blocks`` query blocks,
    times each unknown size."""
    count = t.op("c", f"arith.constant {math.prod(s for s in sp.batch if s is not None) * blocks} : index", ind)
    for size in sp.sizes:
        count = t.op("n", f"arith.muli {count}, {size} : index", ind)
    return count


def batch_index(t: Ssa, sp: FusedSpec, flat: str, ind: int) -> list[str]:
    """One index per batch dim from the linear batch index ``flat``, the last dim fastest: size-1 dims read 0, the
    leading non-1 dim takes what is left, the others ``rem`` / ``div`` by their (constant or run-time) size."""
    idx: list[str] = []
    rest = flat
    for d in reversed(range(sp.nb)):
        if sp.batch[d] == 1:
            idx.append(t.op("c", "arith.constant 0 : index", ind))
        elif all(s == 1 for s in sp.batch[:d]):
            idx.append(rest)
        else:
            size = batch_size(t, sp, d, ind)
            idx.append(t.op("b", f"arith.remui {rest}, {size} : index", ind))
            rest = t.op("bh", f"arith.divui {rest}, {size} : index", ind)
    idx.reverse()
    return idx


def broadcast_index(t: Ssa, src: str, shape: tuple[int | None, ...], elem: str, axis: int, at: str, ind: int) -> str:
    """The index to read ``src`` at along its unknown ``axis`` for batch index ``at``: ``at``, or 0 where that size is
    1 at run time (a mask or K / V broadcast over a batch whose own size is unknown too)."""
    size = dim_size(t, src, axis, tensor_type(shape, elem), ind)
    one = t.op("c", "arith.constant 1 : index", ind)
    single = t.op("single", f"arith.cmpi eq, {size}, {one} : index", ind)
    return t.op("at", f"arith.select {single}, {t.op('c', 'arith.constant 0 : index', ind)}, {at} : index", ind)


__all__ = ["batch_index", "batch_size", "batch_sizes", "broadcast_index", "trip_count"]
