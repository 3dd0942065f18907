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

import functools
import re
from collections.abc import Sequence

from attnpass.rewrite.mlir.builders import Ssa, exp_base, exp_poly

PREFIX = "attnpass_contract_"
MARK_NAME = "attnpass.register_blocks"
MARK = ", " + MARK_NAME  # on a matmul linalg.generic (``builders.matmul_tile``): lowered as register blocks



def mark(start: str) -> str:
    """The mark of a ``builders.matmul_from`` generic: ``start`` is ``zero`` (operands ``a, b, out``: the blocks start
    at 0) or ``scaled`` (``a, b, f, c, out``: each block starts at ``c * f[row]``, read once per block)."""
    return f', {MARK_NAME} = "{start}"'


# 8 x 16 f32 accumulators: 8 AVX-512 / 16 AVX2 registers; 8 independent FMA chains hide the FMA latency
RI, RN, RK = 8, 16, 8

ROWS_NAME = "attnpass.row_reduce"  # on a max / sum over the last dim (``builders.reduce_max`` / ``reduce_sum``)
RW = 16  # the row kernels' vector width


def row_mark(n: int, kind: str) -> str:
    """The mark of a reduction over rows of ``n``, empty where ``RW`` does not divide.  ``kind``: ``max`` / ``add``
    (in place: ``x, r``), ``max_from`` (``x, old, r``) or ``add_scaled`` (``x, old, f, r``: ``r = old * f + sum x``),
    the forms of ``builders.reduce_from``."""
    return f', {ROWS_NAME} = "{kind}"' if n % RW == 0 else ""


def block_width(n: int) -> int:
    """Columns of a register block: two vectors of ``RN`` where they divide ``n`` and the host has 32 vector
    registers (AVX-512: 16 accumulators, two rows of the right operand and the broadcasts fit), else one.

    Two vectors halve the loads per multiply-add: each step is ``RI`` broadcasts and ``w / RN`` row loads for
    ``RI w / RN`` multiply-adds, and at one vector the loads, not the multiply-adds, bound the loop.
    """
    return 2 * RN if n % (2 * RN) == 0 and wide_registers() else RN


@functools.cache
def wide_registers() -> bool:
    """Whether the host CPU has AVX-512 (32 vector registers): the JIT and the native library compile for the host."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


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
             acc: tuple[str, str], groups: tuple[int, int], group_dim: int | None, ind: int,
             start: tuple[str, str, str, str] | None = None) -> None:
    """``acc[*batch, i, n] += sum_k a[.., i, k] * b[.., k, n]`` in register blocks, in place on the ``acc`` buffer.

    Operands are ``(name, shape, memref type)``; ``groups`` is the GQA group count of ``a`` and ``b`` (1: same heads
    as ``batch``).  ``start``: ``("zero", ...)`` starts each block at 0 (``acc`` only written), ``("scaled", f, fty,
    c)`` at ``c * f[row]`` (``c`` of ``acc``'s type, ``f`` one value per row): the fill or rescale pass folded into
    the one load of the block.
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
    rn = block_width(n)
    n0 = loop(n, rn)
    vty = f"vector<{RI}x{rn}xf32>"
    a_at = _batch_index(t, ashape[:-2], batch, ivs, groups[0], group_dim, zero, depth)
    b_at = _batch_index(t, bshape[:-2], batch, ivs, groups[1], group_dim, zero, depth)
    inb = "{in_bounds = [true, true]}"
    if start is None:
        v0 = t.op("v", f"vector.transfer_read {accn}[{', '.join([*ivs, i, n0])}], {pad} {inb} : {cty}, {vty}", depth)
    elif start[0] == "zero":
        v0 = t.op("v", f"arith.constant dense<0.0> : {vty}", depth)
    else:
        _, fn, fty, cn = start
        c0 = t.op("v", f"vector.transfer_read {cn}[{', '.join([*ivs, i, n0])}], {pad} {inb} : {cty}, {vty}", depth)
        fs = t.op("f", f"vector.transfer_read {fn}[{', '.join([*ivs, i])}], {pad} {{in_bounds = [true]}} : {fty}, "
                       f"vector<{RI}xf32>", depth)
        # f[row] along the block's columns: an outer product with ones (a broadcast read or a chain of row inserts
        # is scalarised by the vector lowering)
        ones = t.op("one", f"arith.constant dense<1.0> : vector<{rn}xf32>", depth)
        zeros = t.op("z", f"arith.constant dense<0.0> : {vty}", depth)
        fb = t.op("fb", f"vector.outerproduct {fs}, {ones}, {zeros} {{kind = #vector.kind<add>}} : vector<{RI}xf32>, "
                        f"vector<{rn}xf32>", depth)
        v0 = t.op("v", f"arith.mulf {c0}, {fb} : {vty}", depth)
    kres, k0, v = t.fresh("mk"), t.fresh("k0"), t.fresh("v")
    t.emit(f"{kres} = scf.for {k0} = {zero} to {c(k, depth)} step {c(RK, depth)} iter_args({v} = {v0}) -> ({vty}) {{",
           depth)
    va = t.op("va", f"vector.transfer_read {an}[{', '.join([*a_at, i, k0])}], {pad} {inb} : {aty}, "
                    f"vector<{RI}x{RK}xf32>", depth + 1)
    vb = t.op("vb", f"vector.transfer_read {bn}[{', '.join([*b_at, k0, n0])}], {pad} {inb} : {bty}, "
                    f"vector<{RK}x{rn}xf32>", depth + 1)
    maps = "affine_map<(i, j, k) -> (i, k)>, affine_map<(i, j, k) -> (k, j)>, affine_map<(i, j, k) -> (i, j)>"
    out = t.op("vc", f'vector.contract {{indexing_maps = [{maps}], iterator_types = ["parallel", "parallel", '
                     f'"reduction"], kind = #vector.kind<add>}} {va}, {vb}, {v} : vector<{RI}x{RK}xf32>, '
                     f"vector<{RK}x{rn}xf32> into {vty}", depth + 1)
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


def _name(a: tuple[int, ...], b: tuple[int, ...], acc: tuple[int, ...], start: str = "") -> str:
    return PREFIX + (f"{start}_" if start else "") + "_".join("x".join(map(str, s)) for s in (a, b, acc))


def _groups(shape: tuple[int, ...], batch: tuple[int, ...]) -> int:
    """GQA group count of an operand: the batch's head count over the operand's (1 when equal or broadcast)."""
    if not shape or not batch:
        return 1
    h, oh = batch[-1], shape[-1]
    return h // oh if oh not in (1, h) else 1


def definition(name: str, a: tuple[int, ...], b: tuple[int, ...], acc: tuple[int, ...], start: str = "") -> str:
    """The body of ``@name``: ``acc += a @ b`` in register blocks on buffers, everything read off the three shapes.

    ``start`` (``mark``): ``zero`` writes ``acc = a @ b``; ``scaled`` takes ``(%a, %b, %f, %c, %acc)`` and writes
    ``acc = c * f[row] + a @ b``, ``c`` of ``acc``'s shape and ``f`` of its rows'.
    """
    t = Ssa()
    types = [strided_type(s) for s in (a, b, acc)]
    fty = strided_type(acc[:-1])
    extra = f"%f: {fty}, %c: {types[2]}, " if start == "scaled" else ""
    t.emit(f"func.func private @{name}(%a: {types[0]}, %b: {types[1]}, {extra}%acc: {types[2]}) {{", 1)
    batch = acc[:-2]
    groups = (_groups(a[:-2], batch), _groups(b[:-2], batch))
    init = None if not start else ("zero", "", "", "") if start == "zero" else ("scaled", "%f", fty, "%c")
    contract(t, batch, ("%a", a, types[0]), ("%b", b, types[1]), ("%acc", types[2]), groups,
             len(batch) - 1 if batch else None, 2, init)
    t.emit("return")
    t.emit("}", 1)
    return t.text()


def rows_definition(name: str, x: tuple[int, ...], kind: str) -> str:
    """The body of ``@name``: ``r[row] = r[row] (+ or max) reduce(x[row, :])`` in vectors of ``RW``.

    A ``linalg.generic`` reduction lowers to a scalar chain that stores the running value at every step (LLVM cannot
    keep it in a register: it cannot tell the two buffers apart); here each row is ``n / RW`` vector loads and ops
    and one horizontal reduction (reassociated: ``convert-vector-to-llvm{reassociate-fp-reductions}``).
    """
    t = Ssa()
    tx, tr = strided_type(x), strided_type(x[:-1])
    base = kind.split("_")[0]
    op = {"add": "arith.addf", "max": "arith.maximumf"}[base]
    red = {"add": "add", "max": "maximumf"}[base]
    extra = {"max_from": f"%old: {tr}, ", "add_scaled": f"%old: {tr}, %f: {tr}, "}.get(kind, "")
    t.emit(f"func.func private @{name}(%x: {tx}, {extra}%r: {tr}) {{", 1)

    def c(v: int, i: int) -> str:
        return t.op("c", f"arith.constant {v} : index", i)

    zero, pad, ivs, depth = _row_loops(t, x)
    vty = f"vector<{RW}xf32>"
    inb = "{in_bounds = [true]}"
    v = t.op("v", f"vector.transfer_read %x[{', '.join([*ivs, zero])}], {pad} {inb} : {tx}, {vty}", depth)
    if x[-1] > RW:
        res, j0, acc = t.fresh("rows"), t.fresh("j0"), t.fresh("acc")
        t.emit(f"{res} = scf.for {j0} = {c(RW, depth)} to {c(x[-1], depth)} step {c(RW, depth)} iter_args({acc} = {v}) "
               f"-> ({vty}) {{", depth)
        w = t.op("w", f"vector.transfer_read %x[{', '.join([*ivs, j0])}], {pad} {inb} : {tx}, {vty}", depth + 1)
        t.emit(f"scf.yield {t.op('v', f'{op} {acc}, {w} : {vty}', depth + 1)} : {vty}", depth + 1)
        t.emit("}", depth)
        v = res
    total = t.op("s", f"vector.reduction <{red}>, {v} : {vty} into f32", depth)
    old = t.op("old", f"memref.load {'%old' if extra else '%r'}[{', '.join(ivs)}] : {tr}", depth)
    if kind == "add_scaled":
        old = t.op("old", f"arith.mulf {old}, {t.op('f', f'memref.load %f[{chr(44).join(ivs)}] : {tr}', depth)} : f32", depth)
    t.emit(f"memref.store {t.op('new', f'{op} {old}, {total} : f32', depth)}, %r[{', '.join(ivs)}] : {tr}", depth)
    return _close_rows(t, depth)


def _row_loops(t: Ssa, x: tuple[int, ...]) -> tuple[str, str, list[str], int]:
    """Opens one ``scf.for`` per row dim of ``x`` (all but the last) for a row kernel: the index 0, the f32 0.0
    that pads vector reads, the loops' induction variables and the depth inside them (closed by the caller)."""
    zero, one = (t.op("c", f"arith.constant {v} : index", 2) for v in (0, 1))
    pad = t.op("c", "arith.constant 0.0 : f32", 2)
    ivs, depth = [], 2
    for size in x[:-1]:
        iv = t.fresh("iv")
        t.emit(f"scf.for {iv} = {zero} to {t.op('c', f'arith.constant {size} : index', depth)} step {one} {{", depth)
        ivs.append(iv)
        depth += 1
    return zero, pad, ivs, depth


def _close_rows(t: Ssa, depth: int) -> str:
    """Closes what ``_row_loops`` opened and the function; the function's text."""
    while depth > 2:
        depth -= 1
        t.emit("}", depth)
    t.emit("return", 2)
    t.emit("}", 1)
    return t.text()


def exp_definition(name: str, x: tuple[int, ...]) -> str:
    """The body of ``@name``: ``p[row, :] = exp(x[row, :] - base(m[row]))`` in vectors of ``RW``.

    The generic's loop is vectorised by LLVM at its preferred width (256 bits on AVX-512 hosts); written as
    ``vector<RW x f32>`` ops the polynomial runs at 512 bits there, half the instructions for the ``S_q x tile``
    exponentials of every key tile.
    """
    t = Ssa()
    tx, tr = strided_type(x), strided_type(x[:-1])
    t.emit(f"func.func private @{name}(%x: {tx}, %m: {tr}, %p: {tx}) {{", 1)

    def c(v: int, i: int) -> str:
        return t.op("c", f"arith.constant {v} : index", i)

    zero, pad, ivs, depth = _row_loops(t, x)
    vty = f"vector<{RW}xf32>"
    base = exp_base(t, t.op("m", f"memref.load %m[{', '.join(ivs)}] : {tr}", depth), depth)
    bb = t.op("bb", f"vector.broadcast {base} : f32 to {vty}", depth)
    j0 = t.fresh("j0")
    t.emit(f"scf.for {j0} = {zero} to {c(x[-1], depth)} step {c(RW, depth)} {{", depth)
    at = ", ".join([*ivs, j0])
    v = t.op("v", f"vector.transfer_read %x[{at}], {pad} {{in_bounds = [true]}} : {tx}, {vty}", depth + 1)
    e = exp_poly(t, t.op("d", f"arith.subf {v}, {bb} : {vty}", depth + 1), depth + 1, RW)
    t.emit(f"vector.transfer_write {e}, %p[{at}] {{in_bounds = [true]}} : {vty}, {tx}", depth + 1)
    t.emit("}", depth)
    return _close_rows(t, depth)


_MEMREF = re.compile(r"memref<((?:\d+x)*)f32(?:, strided<\[([^\]]*)\][^>]*>)?>")


def _buffer_shape(ty: object) -> tuple[int, ...] | None:
    """The static shape of an f32 buffer whose last dim is contiguous, else None (then the generic stays)."""
    m = _MEMREF.fullmatch(str(ty))
    if m is None:
        return None
    if m.group(2) is not None and m.group(2).split(",")[-1].strip() != "1":
        return None
    return tuple(int(d) for d in m.group(1).split("x") if d)


def _call(g: object, name: str, shapes: list) -> None:
    """Replace the bufferized generic ``g`` by ``call @name`` over its buffers cast to ``strided_type``."""
    from torch_mlir import ir
    from torch_mlir.dialects import func as func_d

    here = ir.InsertionPoint(g)
    args = [ir.Operation.create("memref.cast", results=[ir.Type.parse(strided_type(s))], operands=[v], ip=here).result
            for v, s in zip(g.operands, shapes)]
    func_d.CallOp([], ir.FlatSymbolRefAttr.get(name), args, ip=here)
    g.erase()


def _start(attr: object) -> str:
    """A matmul mark's start: the string of ``mark`` or, for the unit attribute ``MARK``, "" (in place)."""
    from torch_mlir import ir

    try:
        return ir.StringAttr(attr).value
    except ValueError:
        return ""


def _drop_uninitialised_copies(copies: list) -> int:
    """Erase every copy out of a buffer nothing writes (a ``memref.alloc`` whose only uses are copies from it).

    Bufferizing with ``copy-before-write`` copies a ``tensor.empty`` (hoisted out of the key loop, or the parallel
    loop's output) into a fresh buffer before the op that overwrites it: per key tile a pass over a tile, per call a
    pass over the whole output and its page faults, copying values no one wrote.  Returns how many went.
    """
    gone = 0
    for c in copies:
        src = c.operands[0]
        owner = src.owner
        if getattr(owner, "name", None) != "memref.alloc":
            continue
        if all(u.owner.name == "memref.copy" and u.operand_number == 0 for u in src.uses):
            c.erase()
            gone += 1
            if not list(src.uses):  # the buffer itself is dead now
                owner.erase()
    return gone


_VIEWS = ("memref.cast", "memref.subview", "memref.expand_shape", "memref.collapse_shape", "memref.reinterpret_cast")


def _escapes(value: object) -> bool:
    """Whether a buffer (or a view of it) leaves its loop iteration: yielded to the next one."""
    for use in value.uses:
        op = use.owner
        if op.name == "scf.yield" or (op.name in _VIEWS and any(_escapes(r) for r in op.results)):
            return True
    return False


def _hoist_allocs(loops: list) -> int:
    """Move each static ``memref.alloc`` of a key loop's body that stays in its iteration to right before the loop.

    A fresh buffer holds nothing a program may read before writing it, so one buffer serves every iteration: the
    score tile, ``p`` and ``alpha`` are allocated once per query block instead of once per key tile (a malloc and
    a free each).  The running state is yielded to the next iteration and keeps its buffers.  Returns how many moved.
    """
    moved = 0
    for loop in loops:
        for op in list(loop.regions[0].blocks[0].operations):
            o = op.operation
            if o.name == "memref.alloc" and not len(o.operands) and not _escapes(o.results[0]):
                o.move_before(loop)
                moved += 1
    return moved


def define_all(module: object) -> int:
    """Replace every marked matmul ``linalg.generic`` of the bufferized ``module`` (in place) by a call of its
    register-block function over the same buffers, defined once per shape and appended; returns how many were
    replaced.  The pipeline's inliner puts the bodies back in place."""
    from torch_mlir import ir

    marked: list = []
    copies: list = []

    def visit(op: object) -> None:
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    o = inner.operation
                    if o.name == "linalg.generic" and (MARK_NAME in o.attributes or ROWS_NAME in o.attributes):
                        marked.append(o)
                    elif o.name == "memref.copy":
                        copies.append(o)
                    visit(o)

    with module.context, ir.Location.unknown():
        visit(module.operation)
        loops: list = []  # the key loops: around a marked generic
        for g in marked:
            parent = g.parent
            if parent is not None and parent.name == "scf.for" and all(parent != x for x in loops):
                loops.append(parent)
        defined: dict[str, str] = {}
        done = 0
        for g in marked:
            shapes = [_buffer_shape(v.type) for v in g.operands]
            if ROWS_NAME in g.attributes:
                kind = ir.StringAttr(g.attributes[ROWS_NAME]).value
                arity = {"max_from": 3, "add_scaled": 4, "exp": 3}.get(kind, 2)
                rows = shapes[1:-1] if kind == "exp" else shapes[1:]  # exp: its output is of the input's shape
                if (len(shapes) != arity or None in shapes or len(g.results) or any(s != shapes[0][:-1] for s in rows)
                        or (kind == "exp" and shapes[-1] != shapes[0])):
                    del g.attributes[ROWS_NAME]
                    continue
                name = f"attnpass_rows_{kind}_" + "x".join(map(str, shapes[0]))
                defined.setdefault(name, exp_definition(name, shapes[0]) if kind == "exp"
                                   else rows_definition(name, shapes[0], kind))
                _call(g, name, shapes)
                done += 1
                continue
            start = _start(g.attributes[MARK_NAME])
            if len(shapes) != (5 if start == "scaled" else 3) or any(s is None for s in shapes) or len(g.results):
                del g.attributes[MARK_NAME]  # not buffers the blocks can read: the generic's loops stay
                continue
            a, b, acc = shapes[0], shapes[1], shapes[-1]
            if start == "scaled" and (shapes[2] != acc[:-1] or shapes[3] != acc):
                del g.attributes[MARK_NAME]
                continue
            name = _name(a, b, acc, start)
            defined.setdefault(name, definition(name, a, b, acc, start))
            _call(g, name, shapes)
            done += 1
        _drop_uninitialised_copies(copies)
        _hoist_allocs(loops)
        if defined:
            defs = ir.Module.parse("module {\n" + "\n".join(defined.values()) + "\n}")
            for op in list(defs.body.operations):
                module.body.append(op.operation)
    return done
