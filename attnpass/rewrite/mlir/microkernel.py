"""The key tile's two matmuls as register tiles: ``vector.contract`` on ``RI x RK`` by ``RK x RN`` blocks.

A ``linalg.generic`` matmul lowers to scalar loops that LLVM vectorises at best along one dim; here the
output is walked in ``RI x RN`` blocks held in registers across the whole reduction (one ``transfer_read``
and one ``transfer_write`` of the accumulator per block), and each step is a ``vector.contract`` that the
pipeline lowers to ``RK`` outer products (``convert-vector-to-llvm{vector-contract-lowering=outerproduct}``):
``RI`` broadcasts times one ``RN``-wide row, fused multiply-adds.  Both operands are read row-major with
the reduced dim of the right one leading (``K^T`` for ``Q K^T``: the fused function transposes K once).

Vector ops are not part of torch-mlir's linalg-on-tensors backend contract, so the fused function emits the
matmul as a ``linalg.generic`` marked ``attnpass.register_blocks`` (``MARK``).  The mark survives bufferization;
right after it (``lowering.mlir.to_llvm``) each marked generic, now over memrefs, becomes a call of
``@attnpass_contract_<shapes>`` (``define_all``) over its own buffers, cast to strided layouts, and the inliner
puts the body back in place.  Working on buffers, not tensors, is what keeps the tiles where they are: the Q
block, the K^T and V tiles are read through their subviews (a call over tensors needs identity layouts, so each
would be copied per key tile) and the accumulator is written in place.  Everything the body needs (batch
loops, broadcast batch dims, GQA groups) follows from the three shapes.  Shapes the blocks do not divide, or a
buffer whose rows are not contiguous, stay a ``linalg.generic`` (``fits``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attnpass.rewrite.mlir.builders import Ssa

PREFIX = "attnpass_contract_"
MARK_NAME = "attnpass.register_blocks"
MARK = ", " + MARK_NAME  # on a matmul linalg.generic (``builders.matmul_tile``): lowered as register blocks

RI, RN, RK = 8, 16, 8


def fits(m: int, n: int, k: int) -> bool:
    """Whether ``m x k`` by ``k x n`` splits into whole register blocks."""
    return m % RI == 0 and n % RN == 0 and k % RK == 0


def _batch_index(t: Ssa, shape: Sequence[int], domain: Sequence[int], ivs: Sequence[str], groups: int,
                 group_dim: int | None, zero: str, ind: int) -> list[str]:
    """The indices an operand of batch ``shape`` (right-aligned against ``domain``) reads at the loop's ``ivs``:
    size-1 dims broadcast (index 0), the GQA head dim reads ``h floordiv groups``."""
    out = []
    off = len(domain) - len(shape)
    for a, size in enumerate(shape):
        d = a + off
        if d == group_dim and groups > 1:
            g = t.op("c", f"arith.constant {groups} : index", ind)
            out.append(t.op("g", f"arith.divui {ivs[d]}, {g} : index", ind))
        elif size == 1 and domain[d] != 1:
            out.append(zero)
        else:
            out.append(ivs[d])
    return out


def contract(t: Ssa, batch: Sequence[int], a: tuple[str, tuple[int, ...], str], b: tuple[str, tuple[int, ...], str],
             acc: tuple[str, str], groups: tuple[int, int], group_dim: int | None, ind: int) -> None:
    """``acc[*batch, i, n] += sum_k a[.., i, k] * b[.., k, n]`` in register blocks, in place on the ``acc`` buffer.

    Operands are ``(name, shape, memref type)``; ``groups`` is the GQA group count of ``a`` and ``b`` (1: same heads
    as ``batch``).
    """
    (an, ashape, aty), (bn, bshape, bty), (accn, cty) = a, b, acc
    m, k, n = ashape[-2], ashape[-1], bshape[-1]

    def c(v: int, i: int) -> str:
        return t.op("c", f"arith.constant {v} : index", i)

    zero = c(0, ind)
    pad = t.op("c", "arith.constant 0.0 : f32", ind)
    ivs: list[str] = []
    depth = ind

    def loop(hi: int, step: int) -> str:
        nonlocal depth
        iv = t.fresh("iv")
        t.emit(f"scf.for {iv} = {zero} to {c(hi, depth)} step {c(step, depth)} {{", depth)
        depth += 1
        return iv

    for size in batch:
        ivs.append(loop(size, 1))
    i = loop(m, RI)
    n0 = loop(n, RN)
    vty = f"vector<{RI}x{RN}xf32>"
    a_at = _batch_index(t, ashape[:-2], batch, ivs, groups[0], group_dim, zero, depth)
    b_at = _batch_index(t, bshape[:-2], batch, ivs, groups[1], group_dim, zero, depth)
    inb = "{in_bounds = [true, true]}"
    v0 = t.op("v", f"vector.transfer_read {accn}[{', '.join([*ivs, i, n0])}], {pad} {inb} : {cty}, {vty}", depth)
    kres, k0, v = t.fresh("mk"), t.fresh("k0"), t.fresh("v")
    t.emit(f"{kres} = scf.for {k0} = {zero} to {c(k, depth)} step {c(RK, depth)} iter_args({v} = {v0}) -> ({vty}) {{",
           depth)
    va = t.op("va", f"vector.transfer_read {an}[{', '.join([*a_at, i, k0])}], {pad} {inb} : {aty}, "
                    f"vector<{RI}x{RK}xf32>", depth + 1)
    vb = t.op("vb", f"vector.transfer_read {bn}[{', '.join([*b_at, k0, n0])}], {pad} {inb} : {bty}, "
                    f"vector<{RK}x{RN}xf32>", depth + 1)
    maps = "affine_map<(i, j, k) -> (i, k)>, affine_map<(i, j, k) -> (k, j)>, affine_map<(i, j, k) -> (i, j)>"
    out = t.op("vc", f'vector.contract {{indexing_maps = [{maps}], iterator_types = ["parallel", "parallel", '
                     f'"reduction"], kind = #vector.kind<add>}} {va}, {vb}, {v} : vector<{RI}x{RK}xf32>, '
                     f"vector<{RK}x{RN}xf32> into {vty}", depth + 1)
    t.emit(f"scf.yield {out} : {vty}", depth + 1)
    t.emit("}", depth)
    t.emit(f"vector.transfer_write {kres}, {accn}[{', '.join([*ivs, i, n0])}] {inb} : {vty}, {cty}", depth)
    while depth > ind:  # close the n0, i and batch loops
        depth -= 1
        t.emit("}", depth)


def strided_type(shape: Sequence[int]) -> str:
    """A memref of ``shape`` with any offset and strides but a contiguous last dim: what every operand is cast to."""
    strides = ", ".join(["?"] * (len(shape) - 1) + ["1"])
    return f"memref<{''.join(f'{d}x' for d in shape)}f32, strided<[{strides}], offset: ?>>"


def _name(a: tuple[int, ...], b: tuple[int, ...], acc: tuple[int, ...]) -> str:
    return PREFIX + "_".join("x".join(map(str, s)) for s in (a, b, acc))


def _groups(shape: tuple[int, ...], batch: tuple[int, ...]) -> int:
    """GQA group count of an operand: the batch's head count over the operand's (1 when equal or broadcast)."""
    if not shape or not batch:
        return 1
    h, oh = batch[-1], shape[-1]
    return h // oh if oh not in (1, h) else 1


def definition(name: str, a: tuple[int, ...], b: tuple[int, ...], acc: tuple[int, ...]) -> str:
    """The body of ``@name``: ``acc += a @ b`` in register blocks on buffers, everything read off the three shapes."""
    t = Ssa()
    types = [strided_type(s) for s in (a, b, acc)]
    t.emit(f"func.func private @{name}(%a: {types[0]}, %b: {types[1]}, %acc: {types[2]}) {{", 1)
    batch = acc[:-2]
    groups = (_groups(a[:-2], batch), _groups(b[:-2], batch))
    contract(t, batch, ("%a", a, types[0]), ("%b", b, types[1]), ("%acc", types[2]), groups,
             len(batch) - 1 if batch else None, 2)
    t.emit("return")
    t.emit("}", 1)
    return t.text()


_MEMREF = re.compile(r"memref<((?:\d+x)*)f32(?:, strided<\[([^\]]*)\][^>]*>)?>")


def _buffer_shape(ty: object) -> tuple[int, ...] | None:
    """The static shape of an f32 buffer whose last dim is contiguous, else None (then the generic stays)."""
    m = _MEMREF.fullmatch(str(ty))
    if m is None:
        return None
    if m.group(2) is not None and m.group(2).split(",")[-1].strip() != "1":
        return None
    return tuple(int(d) for d in m.group(1).split("x") if d)


def define_all(module: object) -> int:
    """Replace every marked matmul ``linalg.generic`` of the bufferized ``module`` (in place) by a call of its
    register-block function over the same buffers, defined once per shape and appended; returns how many were
    replaced.  The pipeline's inliner puts the bodies back in place."""
    from torch_mlir import ir
    from torch_mlir.dialects import func as func_d

    marked: list = []

    def visit(op: object) -> None:
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    o = inner.operation
                    if o.name == "linalg.generic" and MARK_NAME in o.attributes:
                        marked.append(o)
                    visit(o)

    with module.context, ir.Location.unknown():
        visit(module.operation)
        defined: dict[str, str] = {}
        done = 0
        for g in marked:
            shapes = [_buffer_shape(v.type) for v in g.operands]
            if len(shapes) != 3 or any(s is None for s in shapes) or len(g.results):
                del g.attributes[MARK_NAME]  # not buffers the blocks can read: the generic's loops stay
                continue
            a, b, acc = shapes
            name = _name(a, b, acc)
            defined.setdefault(name, definition(name, a, b, acc))
            here = ir.InsertionPoint(g)
            args = [ir.Operation.create("memref.cast", results=[ir.Type.parse(strided_type(s))], operands=[v],
                                        ip=here).result for v, s in zip(g.operands, shapes)]
            func_d.CallOp([], ir.FlatSymbolRefAttr.get(name), args, ip=here)
            g.erase()
            done += 1
        if defined:
            defs = ir.Module.parse("module {\n" + "\n".join(defined.values()) + "\n}")
            for op in list(defs.body.operations):
                module.body.append(op.operation)
    return done
