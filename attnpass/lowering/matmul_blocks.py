"""A model's own matmuls (projections, MLP) as register blocks, on the bufferized module.

torch-mlir lowers ``aten.mm`` / ``aten.bmm`` to ``linalg.matmul`` / ``linalg.batch_matmul``, and the pipeline's
``convert-linalg-to-loops`` makes them three scalar loops that store the accumulator at every step: in a whole
model (a GPT's QKV / output projections and MLP) those loops, not the fused attention, take most of the time.
Once bufferized, each such op whose f32 buffers split into whole blocks (``microkernel.fits``) becomes a call of
the same register-block body the fused attention's tiles use (``microkernel.definition``: ``acc += a @ b``, the
accumulator held in vector registers across the whole reduction); the inliner puts it back in place.  Other
matmuls (transposed or mixed-type variants, odd sizes, non-contiguous rows) keep their loops.
"""

from __future__ import annotations

import re
from typing import Any

from attnpass.rewrite.mlir import microkernel

PREFIX = "attnpass_matmul_"
#: the ops' own (default) indexing maps, as printed: anything else transposes or broadcasts an operand
_PLAIN = {
    "linalg.matmul": "[affine_map<(d0, d1, d2) -> (d0, d2)>, affine_map<(d0, d1, d2) -> (d2, d1)>, "
                     "affine_map<(d0, d1, d2) -> (d0, d1)>]",
    "linalg.batch_matmul": "[affine_map<(d0, d1, d2, d3) -> (d0, d1, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d3, d2)>, "
                           "affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>]",
}
_MEMREF = re.compile(r"memref<((?:\d+x)*)f32(?:, strided<\[([^\]]*)\][^>]*>)?>")


_OPS = tuple(_PLAIN)
_PARALLEL = ("scf.forall", "scf.parallel", "omp.parallel")


def _shape(ty: Any) -> tuple[int, ...] | None:
    """The static shape of an f32 buffer whose last dim is contiguous; None for anything else."""
    m = _MEMREF.fullmatch(str(ty))
    if m is None or m.group(2) is not None and m.group(2).split(",")[-1].strip() != "1":
        return None
    return tuple(int(d) for d in m.group(1).split("x") if d)


def blockable(op: Any) -> tuple[tuple[int, ...], ...] | None:
    """The (a, b, acc) buffer shapes of a plain ``linalg.matmul`` / ``batch_matmul`` the register blocks can run; else None.

    Plain: the op's default ``indexing_maps`` (none transposed or broadcast), f32 throughout, static, contiguous rows,
    and sizes the blocks divide.
    """
    if op.name not in _OPS or len(op.operands) != 3 or len(op.results):
        return None
    if "indexing_maps" in op.attributes and str(op.attributes["indexing_maps"]) != _PLAIN[op.name]:
        return None
    shapes = tuple(_shape(v.type) for v in op.operands)
    rank = 2 if op.name == "linalg.matmul" else 3
    if any(s is None or len(s) != rank for s in shapes):
        return None
    a, b, acc = shapes
    if a[:-2] != b[:-2] or a[:-2] != acc[:-2] or a[-1] != b[-2] or acc[-2:] != (a[-2], b[-1]):
        return None
    return shapes if microkernel.fits(a[-2], b[-1], a[-1]) else None  # type: ignore[return-value]


def definition(name: str, a: tuple[int, ...], b: tuple[int, ...], acc: tuple[int, ...]) -> str:
    """``@name(a, b, acc)``: ``acc += a @ b`` in ``microkernel``'s register blocks, its batch x row-block loop an
    ``scf.parallel`` (``convert-scf-to-openmp`` runs it on the team; in order where the pipeline has no OpenMP).

    The fused tiles' own body (``microkernel.definition``) is sequential: it runs inside the attention's parallel loop,
    where the model's matmuls run alone.
    """
    ta, tb, tc = (microkernel.strided_type(x) for x in (a, b, acc))
    (m, k), n, batch = a[-2:], b[-1], acc[:-2]
    rn, ri, rk = microkernel.block_width(n), microkernel.RI, microkernel.RK
    ivs = [f"%b{d}" for d in range(len(batch))] + ["%i"]
    uppers = [f"%cb{d}" for d in range(len(batch))] + ["%cm"]
    steps = ["%c1"] * len(batch) + ["%cri"]
    consts = {"%c0": 0, "%c1": 1, "%cm": m, "%cn": n, "%ck": k, "%cri": ri, "%crn": rn, "%crk": rk,
              **{f"%cb{d}": size for d, size in enumerate(batch)}}
    vty, inb = f"vector<{ri}x{rn}xf32>", "{in_bounds = [true, true]}"
    at = ", ".join(ivs)
    maps = "affine_map<(i, j, k) -> (i, k)>, affine_map<(i, j, k) -> (k, j)>, affine_map<(i, j, k) -> (i, j)>"
    lines = [f"func.func private @{name}(%a: {ta}, %b: {tb}, %acc: {tc}) {{",
             *(f"  {c} = arith.constant {v} : index" for c, v in consts.items()),
             "  %pad = arith.constant 0.0 : f32",
             f"  scf.parallel ({at}) = ({', '.join(['%c0'] * len(ivs))}) to ({', '.join(uppers)}) step ({', '.join(steps)}) {{",
             "    scf.for %n0 = %c0 to %cn step %crn {",
             f"      %v0 = vector.transfer_read %acc[{at}, %n0], %pad {inb} : {tc}, {vty}",
             f"      %r = scf.for %k0 = %c0 to %ck step %crk iter_args(%v = %v0) -> ({vty}) {{",
             f"        %va = vector.transfer_read %a[{at}, %k0], %pad {inb} : {ta}, vector<{ri}x{rk}xf32>",
             f"        %vb = vector.transfer_read %b[{', '.join([*ivs[:-1], '%k0', '%n0'])}], %pad {inb} : {tb}, "
             f"vector<{rk}x{rn}xf32>",
             f'        %vc = vector.contract {{indexing_maps = [{maps}], iterator_types = ["parallel", "parallel", '
             f'"reduction"], kind = #vector.kind<add>}} %va, %vb, %v : vector<{ri}x{rk}xf32>, vector<{rk}x{rn}xf32> '
             f"into {vty}",
             f"        scf.yield %vc : {vty}",
             "      }",
             f"      vector.transfer_write %r, %acc[{at}, %n0] {inb} : {vty}, {tc}",
             "    }",
             "    scf.reduce",
             "  }",
             "  return",
             "}"]
    return "\n".join(lines)


def define_all(module: Any) -> int:
    """Replace every blockable matmul of the bufferized ``module`` (in place) by a call of its register-block function
    over the same buffers, defined once per shape and appended; returns how many were replaced."""
    from torch_mlir import ir
    from torch_mlir.dialects import func as func_d

    found: list[tuple[Any, tuple[tuple[int, ...], ...], bool]] = []

    def visit(op: Any, nested: bool) -> None:
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    o = inner.operation
                    shapes = blockable(o)
                    if shapes is not None:
                        found.append((o, shapes, nested))
                    visit(o, nested or o.name in _PARALLEL)

    with module.context, ir.Location.unknown():
        visit(module.operation, False)
        defined: dict[str, str] = {}
        for op, shapes, nested in found:  # inside a parallel loop already: the sequential body (no nested team)
            name = PREFIX + ("seq_" if nested else "") + "_".join("x".join(map(str, s)) for s in shapes)
            defined.setdefault(name, (microkernel.definition if nested else definition)(name, *shapes))
            here = ir.InsertionPoint(op)
            args = [ir.Operation.create("memref.cast", results=[ir.Type.parse(microkernel.strided_type(s))], operands=[v],
                                        ip=here).result for v, s in zip(op.operands, shapes)]
            func_d.CallOp([], ir.FlatSymbolRefAttr.get(name), args, ip=here)
            op.erase()
        if defined:
            defs = ir.Module.parse("module {\n" + "\n".join(defined.values()) + "\n}")
            for d in list(defs.body.operations):
                module.body.append(d.operation)
    return len(found)
