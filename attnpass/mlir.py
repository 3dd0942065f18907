"""Public MLIR surface: import a model into torch-dialect MLIR, find and rewrite its attention, JIT it.

```python
mod = attnpass.mlir.import_(model, args, kwargs)     # or import_("model.onnx")
sites = attnpass.mlir.find(mod)
mod2 = attnpass.mlir.rewrite(mod, to="ssmax")        # or to="fused" (ssmax=True: fused SSMax)
fn = attnpass.mlir.compile(mod2)                     # fn(*tensors) -> tensor(s)
```

torch-mlir is imported lazily, inside these functions: ``import attnpass`` stays fast and works
without it, and a missing wheel is reported as an ``AttnpassError`` the CLI prints in one line.
Modules are ``torch_mlir.ir.Module`` objects; ``rewrite`` never edits its input (it works on a
re-parsed copy), so the original and rewritten modules can be compiled side by side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from attnpass.errors import AttnpassError
from attnpass.lowering import mlir as lowering
from attnpass.result import RewriteResult
from attnpass.spec import RewriteSpec


def import_(model: Any, args: Sequence[Any] | Any = (), kwargs: dict | None = None) -> Any:
    """torch-dialect MLIR for a torch module (via ``torch.export``) or for an ``.onnx`` file path.

    The torch import is torch-mlir's FX importer *before* its backend pipeline ("raw"), so the
    softmax is still one op; ONNX goes through ``convert-torch-onnx-to-torch`` only, for the
    same reason.  ``compile`` runs the matching backend pipeline later.
    """
    lowering.require_torch_mlir()
    if isinstance(model, str | os.PathLike):
        return _import_onnx(os.fspath(model))
    import torch
    from torch_mlir import fx as tm_fx

    if not isinstance(model, torch.nn.Module | torch.export.ExportedProgram):
        raise AttnpassError(f"import_ wants an nn.Module, an ExportedProgram or an .onnx path, got {type(model).__name__}")
    args = tuple(args) if isinstance(args, list | tuple) else (args,)
    try:
        if isinstance(model, torch.nn.Module):
            model = torch.export.export(_persistent_buffers(model), args, kwargs or {}, strict=False)
        return tm_fx.export_and_import(model, output_type="raw", decomposition_table=_decompositions())
    except AttnpassError:
        raise
    except Exception as e:
        raise AttnpassError(f"torch-mlir could not import {type(model).__name__}: {str(e).splitlines()[0][:300]}") from e


def _decompositions() -> dict:
    """torch-mlir's default decompositions, except ``scaled_dot_product_attention``.

    Decomposed, an SDPA call becomes a softmax chain plus a safe-softmax guard (still found, as an
    explicit site); kept, it stays one op that the report names as such and the rewrites replace
    whole (fused) or feed a scaled Q (SSMax).  torch-mlir lowers a kept call itself
    (``tm_tensor.attention``), so the unrewritten module still compiles.
    """
    import torch
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    keep = {torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.scaled_dot_product_attention,
            torch.ops.aten.einsum.default, torch.ops.aten.einsum}
    return {op: fn for op, fn in get_decomposition_table().items() if op not in keep}


def _persistent_buffers(model: Any) -> Any:
    """A copy of ``model`` whose buffers are all persistent.

    torch-mlir's frozen-program importer looks every buffer up in the state dict and fails on
    non-persistent ones ("Could not find state mapping for buffer": LLaMA's ``inv_freq``, BERT's
    ``position_ids``); freezing them is exactly what it should do with them anyway.
    """
    if not any(m._non_persistent_buffers_set for m in model.modules()):
        return model
    import copy as _copy

    model = _copy.deepcopy(model)
    for m in model.modules():
        m._non_persistent_buffers_set.clear()
    return model


_SHAPES = ("torch-reify-shape-calculations,inline,func.func(torch-simplify-shape-calculations),func.func(cse),"
           "func.func(torch-simplify-shape-calculations),func.func(torch-drop-abstract-interp-calculations)")
ONNX_IMPORT = ("func.func(convert-torch-onnx-to-torch)," + _SHAPES + ",func.func(torch-scalarize-shapes),"
               + _SHAPES + ",func.func(canonicalize)")
"""ONNX -> torch dialect with static shapes where the model has them, softmax still one op.

The shape half of ``torch-onnx-to-torch-backend-pipeline`` without its op decompositions: the
TorchScript exporter computes ``Expand`` targets from ``Shape`` ops, which the plain conversion
leaves as ``?`` dims (GPT-2's mask ``[2,?,7,7]``) that the fused rewrite cannot size.
"""


def _import_onnx(path: str) -> Any:
    try:
        import onnx
    except ImportError as e:
        raise AttnpassError("importing ONNX into MLIR needs the onnx package") from e
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras import onnx_importer

    if not os.path.isfile(path):
        raise AttnpassError(f"{path}: no such file")
    try:
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
        # the TorchScript exporter leaves some value types out (its Identity outputs): without them
        # torch-mlir's importer types those values !torch.none and onnx->torch cannot convert the op
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:
        raise AttnpassError(f"{path}: not a valid ONNX model ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from e
    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    try:
        info = onnx_importer.ModelInfo(proto)
        module = info.create_module(context=ctx).operation
        onnx_importer.NodeImporter.define_function(info.main_graph, module).import_all()
    except Exception as e:
        raise AttnpassError(f"{path}: torch-mlir's ONNX importer failed: {str(e).splitlines()[0][:200]}") from e
    converted = lowering.run_passes(module, ONNX_IMPORT, f"{path} (ONNX -> torch)")
    from attnpass.rewrite.mlir.fold import fold_static_aranges

    if fold_static_aranges(converted):  # a size torch-mlir left dynamic, fixed by the model: static again
        converted = lowering.run_passes(converted, _SHAPES + ",func.func(canonicalize)", f"{path} (static sizes)")
    _set_origin(converted, "onnx")
    return converted


def _set_origin(module: Any, origin: str) -> None:
    from torch_mlir import ir

    with module.context:
        module.operation.attributes[lowering.ORIGIN_ATTR] = ir.StringAttr.get(origin)


def copy(module: Any) -> Any:
    """A deep copy in a fresh context (rewrites edit in place; the user's module stays as it was)."""
    return lowering.parse(str(module.operation) if not isinstance(module, str) else module)


def find(module: Any) -> Any:
    """The attention report for a torch-dialect module: same ``Report`` (sites, skipped) as for fx."""
    lowering.require_torch_mlir()
    from attnpass.passes import mlir as mlir_pass

    return mlir_pass.find(_as_module(module))


def rewrite(
    module: Any,
    to: str = "ssmax",
    s: float | Sequence[float] | None = None,
    b: float | Sequence[float] | None = None,
    train_len: int | None = None,
    params: str = "constant",
    tile: int | None = None,
    with_report: bool = False,
    fused: bool = False,
    ssmax: bool | None = None,
    spec: RewriteSpec | None = None,
    replace_existing: bool = False,
    fit_existing: bool = False,
) -> Any:
    """A rewritten copy of ``module``: ``to="ssmax"`` (model change) or ``to="fused"`` (same numerics).

    SSMax: ``s`` / ``b`` per head (a scalar is broadcast), ``train_len=L`` sets ``s = 1/log L``;
    ``params="argument"`` passes them as extra ``[H]`` arguments of the public function instead of
    constants.  Fused SSMax (each fusable site fused with the SSMax factor inside the online-softmax
    loop nest, the others SSMax'd in place) is ``to="fused", ssmax=True`` or, as in
    ``attnpass.to_ssmax``, ``to="ssmax", fused=True``.  Fused: ``tile`` keys per loop iteration
    (default 64).  ``spec`` replaces the request keywords.  ``with_report=True`` returns
    ``(module, RewriteResult)``: which sites were rewritten, which were left alone and why.
    ``replace_existing`` / ``fit_existing``: see ``RewriteSpec`` (a Q already scaled by a relative of SSMax).
    """
    lowering.require_torch_mlir()
    from attnpass.rewrite import mlir as mlir_pass

    if spec is None:
        spec = RewriteSpec.of(to, s=s, b=b, train_len=train_len, ssmax=ssmax, fused=fused, replace_existing=replace_existing,
                              fit_existing=fit_existing)
    out = copy(_as_module(module))
    tile = tile or mlir_pass.DEFAULT_TILE
    if spec.ssmax:
        s_val, b_val = spec.s_value, spec.b
        report = mlir_pass.to_ssmax(out, s=list(s_val) if isinstance(s_val, tuple) else s_val,
                                    b=list(b_val) if isinstance(b_val, tuple) else b_val, params=params,
                                    fused=spec.fused_ssmax, tile=tile, replace_existing=spec.replace_existing,
                                    fit_existing=spec.fit_existing, fit_len=spec.fit_len)
    else:
        report = mlir_pass.fuse(out, tile=tile)
    result = RewriteResult.from_report(report, spec, "mlir")
    if spec.ssmax:  # what SSMax cannot take is left as it was (the planner's rule), not counted as rewritten
        result.left.update({site.index: site.ssmax_blocker for site in report.sites if site.ssmax_blocker})
    return (out, result) if with_report else out


def lower(module: Any, emit: str = "linalg") -> Any:
    """The module lowered to ``emit``: "torch" (as is), "backend" (torch backend contract), "linalg", "llvm"."""
    module = _as_module(module)
    if emit == "torch":
        return module
    if emit == "backend":
        return lowering.to_torch_backend(module)
    if emit == "linalg":
        return lowering.to_linalg(module)
    if emit == "llvm":
        return lowering.to_llvm(module)
    raise AttnpassError(f"unknown emit level {emit!r}: use torch, backend, linalg or llvm")


def compile(module: Any, opt_level: int = 3) -> lowering.JitFunction:  # noqa: A001 - the documented name
    """JIT the module's public function for the host CPU: torch -> linalg -> LLVM -> ExecutionEngine."""
    lowering.require_torch_mlir()
    from attnpass.passes import mlir as mlir_pass

    module = _as_module(module)
    funcs = mlir_pass.public_funcs(module)
    if len(funcs) != 1:
        raise AttnpassError(f"compile wants a module with one public function, found {len(funcs)}")
    name = funcs[0].attributes["sym_name"].value
    return lowering.compile_module(module, func_name=name, opt_level=opt_level)


def compile_library(module: Any, path: str | os.PathLike, opt_level: int = 3) -> Any:
    """Compile the module's public function into a native shared library at ``path``; returns its ``Signature``.

    The same lowering and LLVM code as ``compile`` (so the same numbers), written out as the JIT's object
    code linked with a small C shim by the system C compiler.  The library needs libc and libm only; its C
    entry point is ``attnpass_run`` (docs/native_library.md), and ``load_library`` calls it from Python.
    """
    lowering.require_torch_mlir()
    from attnpass.lowering import native
    from attnpass.passes import mlir as mlir_pass

    module = copy(_as_module(module))
    funcs = mlir_pass.public_funcs(module)
    if len(funcs) != 1:
        raise AttnpassError(f"compile_library wants a module with one public function, found {len(funcs)}")
    from torch_mlir import ir

    func = funcs[0]
    sig = native.signature_of(str(func.attributes["function_type"]), func.attributes["sym_name"].value)
    with module.context:
        func.attributes["sym_name"] = ir.StringAttr.get(native.ENTRY)
    jit = lowering.compile_module(module, func_name=native.ENTRY, opt_level=opt_level)
    jit.engine.lookup(native.ENTRY)  # compiles the module: the object code exists from here on
    native.link(jit.engine, sig, os.fspath(path))
    return sig


def load_library(path: str | os.PathLike) -> Any:
    """A library built by ``compile_library`` as a callable over numpy arrays (ctypes; no torch-mlir, no torch call)."""
    from attnpass.lowering import native

    return native.load_library(path)


def _as_module(module: Any) -> Any:
    if isinstance(module, str):
        return lowering.parse(module)
    if not hasattr(module, "operation"):
        raise AttnpassError(f"expected a torch_mlir.ir.Module or MLIR text, got {type(module).__name__}")
    return module


__all__ = ["import_", "find", "rewrite", "lower", "compile", "copy", "compile_library", "load_library"]
