"""Edits a torch-dialect module with the bindings: boundary casts, calls, generated functions, arguments.

The generated functions work on builtin tensors; at a site, ``torch_c.to_builtin_tensor`` /
``from_builtin_tensor`` convert at the boundary.  After a rewrite, the chain it replaced is left
unused and ``erase_dead`` removes it (only ops without side effects in value semantics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnpass.errors import AttnpassError
from attnpass.passes.mlir import _ASSERTS, _PURE_PREFIXES, _VTENSOR, _Val, public_funcs
from attnpass.passes.plan import KeepTerm
from attnpass.passes.site import Notes
from attnpass.rewrite.mlir.builders import MaskIn, builtin_elem, tensor_type


class Editor:
    """Inserts ops with the bindings: boundary casts, calls, private functions, extra arguments."""

    def __init__(self, module: Any):
        from torch_mlir import ir

        self.ir = ir
        self.module = module
        self.ctx = module.context
        self.names: set[str] = set()
        self.notes = Notes()  # what the rewrite did, per site: returned in a new report

    def builtin(self, v: _Val, before: Any) -> Any:
        ir = self.ir
        shape = v.shape or ()
        ty = ir.Type.parse(tensor_type(tuple(shape), builtin_elem(v.dtype or "f32")), self.ctx)
        op = ir.Operation.create("torch_c.to_builtin_tensor", results=[ty], operands=[v.value],
                                 loc=ir.Location.unknown(self.ctx), ip=ir.InsertionPoint(before))
        return op.result

    def scale_by(self, v: _Val, factor: _Val, divide: bool, before: Any) -> _Val:
        """``v * factor`` (or ``/``) as a torch op, ``factor`` broadcasting into ``v`` without growing it: the matcher
        moves a run-time tensor scale of the scores onto Q this way, and torch-mlir lowers it with the rest."""
        ir = self.ir
        op = ir.Operation.create("torch.aten.div.Tensor" if divide else "torch.aten.mul.Tensor",
                                 results=[ir.Type.parse(v.type, self.ctx)], operands=[v.value, factor.value],
                                 loc=ir.Location.unknown(self.ctx), ip=ir.InsertionPoint(before))
        return _Val(op.result, v.type)

    def call(self, callee: str, args: list[Any], types: list[str], before: Any) -> list[Any]:
        """``func.call @callee(args)`` returning builtin tensors, each converted back to its vtensor type."""
        ir = self.ir
        btys = [ir.Type.parse(_builtin_of(ty), self.ctx) for ty in types]
        loc = ir.Location.unknown(self.ctx)
        call = ir.Operation.create("func.call", results=btys, operands=args,
                                   attributes={"callee": ir.FlatSymbolRefAttr.get(callee, self.ctx)},
                                   loc=loc, ip=ir.InsertionPoint(before))
        return [ir.Operation.create("torch_c.from_builtin_tensor", results=[ir.Type.parse(ty, self.ctx)],
                                    operands=[r], loc=loc, ip=ir.InsertionPoint(before)).result
                for r, ty in zip(call.results, types)]

    def add_func(self, text: str, what: str) -> None:
        """Parse one generated ``func.func`` (the MLIR parser verifies it) and append it to the module."""
        ir = self.ir
        try:
            with self.ctx:
                parsed = ir.Module.parse(text)
        except Exception as e:
            raise AttnpassError(f"internal error: generated {what} does not verify: {str(e)[:400]}") from e
        # ONNX-origin modules: the onnx->torch pass insists every function carries the opset
        opset = next((f.attributes[_OPSET] for f in public_funcs(self.module) if _OPSET in f.attributes), None)
        for op in list(parsed.body.operations):
            if opset is not None:
                op.operation.attributes[_OPSET] = opset
            self.module.body.append(op.operation)

    def fresh_symbol(self, base: str) -> str:
        taken = {o.operation.attributes["sym_name"].value for o in self.module.body.operations
                 if "sym_name" in o.operation.attributes} | self.names
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def add_argument(self, func: Any, type_text: str) -> Any:
        """Append an argument to a public function (SSMax parameters passed in by the caller)."""
        ir = self.ir
        block = func.regions[0].blocks[0]
        ty = ir.Type.parse(type_text, self.ctx)
        arg = block.add_argument(ty, ir.Location.unknown(self.ctx))
        with self.ctx:
            ftype = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value)
            func.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(list(ftype.inputs) + [ty],
                                                                                     list(ftype.results)))
        return arg


_OPSET = "torch.onnx_meta.opset_version"


def erase_dead(func: Any) -> None:
    """Drop side-effect-free ops whose results nobody uses (what the rewritten chain leaves behind)."""
    block = func.regions[0].blocks[0]
    changed = True
    while changed:
        changed = False
        for op in reversed(list(block.operations)):
            o = op.operation
            if o.name in _ASSERTS and len(o.operands) and all(u.owner.name in _ASSERTS for u in o.operands[0].uses):
                if o.operands[0].owner is not None and not isinstance(o.operands[0].owner, type(block)):
                    o.erase()
                    changed = True
                continue
            if not o.name.startswith(_PURE_PREFIXES) or not len(o.results):
                continue
            if all(_unused(r) for r in o.results):
                o.erase()
                changed = True


def _unused(v: Any) -> bool:
    for _ in v.uses:
        return False
    return True


def _builtin_of(vtensor: str) -> str:
    """``!torch.vtensor<[2,4],f32>`` -> ``tensor<2x4xf32>`` ; an unknown size stays ``?``."""
    m = _VTENSOR.match(vtensor)
    if m is None:
        raise AttnpassError(f"internal error: not a value tensor type: {vtensor}")
    dims = tuple(None if d.strip() == "?" else int(d) for d in m.group(1).split(",")) if m.group(1) else ()
    return tensor_type(dims, builtin_elem(m.group(2)))


def mask_inputs(ed: Editor, terms: Sequence[KeepTerm], before: Any, prefix: str) -> tuple[list[MaskIn], list[Any]]:
    """The masks as arguments of a generated function (``%<prefix>N``) and their builtin-tensor values at ``before``."""
    ins, vals = [], []
    for i, term in enumerate(terms):
        v: _Val = term.value
        elem = builtin_elem(v.dtype or "f32")
        val, shape = ed.builtin(v, before), tuple(v.shape or ())
        if term.view is not None:  # fairseq / MBart: added in a [B, H, S_q, S_k] view of the [B*H, S_q, S_k] scores
            val, shape = _lay_out(ed, val, shape, elem, term.view, before)
        ins.append(MaskIn(term, f"%{prefix}{i}", shape, elem))
        vals.append(val)
    return ins, vals


def _lay_out(ed: Editor, val: Any, shape: tuple, elem: str, view: tuple[int, ...], before: Any) -> tuple[Any, tuple]:
    """A head-view mask on the scores (``plan.laid_out_shape``): broadcast over the view's batch and heads where it
    varies there, then ``[B, H]`` collapsed into the scores' batch, by a generated function."""
    from attnpass.passes.plan import laid_out_shape
    from attnpass.rewrite.mlir.builders import PAR, Operand, Ssa, bcast_map, dim_size, dims_of, empty, generic

    def known(dims: Sequence[Any]) -> tuple[int | None, ...]:  # a symbolic size (``3*%arg3[0]``) is ``?`` in a type
        return tuple(d if isinstance(d, int) else None for d in dims)

    out = known(laid_out_shape(shape, view))
    dom = known((*(view[:2] if out[0] != 1 else (1, 1)), out[1], out[2]))
    t, dims = Ssa(), ["d0", "d1", "d2", "d3"]
    name = ed.fresh_symbol("attnpass_head_view")
    mty = tensor_type(shape, elem)
    t.emit(f"func.func private @{name}(%m: {mty}) -> {tensor_type(out, elem)} {{", 1)
    # an unknown size of the broadcast is the mask's own at that axis (a symbolic batch the mask does not carry
    # is never a view: the matcher refuses it), read with ``tensor.dim``
    off = 4 - len(shape)
    if any(d is None and (a < off or shape[a - off] is not None) for a, d in enumerate(dom)):
        raise AttnpassError(f"internal error: a head-view mask {shape} with no size for the view {view}")
    sizes = [dim_size(t, "%m", a - off, mty, 2) for a, d in enumerate(dom) if d is None]
    src = Operand("%m", shape, bcast_map(shape, dom, dims), elem)
    wide = generic(t, dims, [src], Operand(empty(t, dom, 2, elem, sizes), dom, dims_of(dims), elem), [PAR] * 4,
                   lambda a, i: a[0], 2, "bcast")
    folded = t.op("folded", f"tensor.collapse_shape {wide} [[0, 1], [2], [3]] : {tensor_type(dom, elem)} into "
                            f"{tensor_type(out, elem)}", 2)
    t.emit(f"return {folded} : {tensor_type(out, elem)}")
    t.emit("}", 1)
    ed.add_func(t.text(), "head-view mask layout")
    ir = ed.ir
    call = ir.Operation.create("func.call", results=[ir.Type.parse(tensor_type(out, elem), ed.ctx)], operands=[val],
                               attributes={"callee": ir.FlatSymbolRefAttr.get(name, ed.ctx)},
                               loc=ir.Location.unknown(ed.ctx), ip=ir.InsertionPoint(before))
    return call.result, out


def to_builtin_raw(ed: Editor, v: Any, ty: str, before: Any) -> Any:
    """A builtin tensor of ``ty`` from a raw value (a new function argument has no ``_Val`` yet)."""
    ir = ed.ir
    op = ir.Operation.create("torch_c.to_builtin_tensor", results=[ir.Type.parse(ty, ed.ctx)], operands=[v],
                             loc=ir.Location.unknown(ed.ctx), ip=ir.InsertionPoint(before))
    return op.result

