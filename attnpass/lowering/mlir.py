"""From torch-dialect MLIR to a native CPU function: torch backend -> linalg -> LLVM -> ExecutionEngine.

torch-mlir's wheel ships the passes but not its Python reference backend (``torch_mlir_e2e_test``
is not in it), so the bufferize-to-LLVM half of the pipeline and the small memref runtime live
here.  The pass order follows the same plan as torch-mlir's reference backend: one-shot
bufferization across function boundaries, ``refback-munge-calling-conventions`` (arguments become
unranked memrefs, results are handed to ``refbackend_consume_func_return_*`` callbacks), then
loops, then LLVM.  One thing differs on purpose: the ownership-based buffer deallocation runs
*after* the calling-convention munge, so result buffers are freed once the callback has copied
them, and every temporary (the ``S x S`` scores of an unfused attention included) is freed
inside the call: the benchmark's peak-memory numbers depend on it.

Every entry point takes the MLIR module as text or as a ``torch_mlir.ir.Module`` and never
mutates the caller's module (it is re-parsed in a fresh context).
"""

from __future__ import annotations

import ctypes
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnpass.errors import AttnpassError
from attnpass.lowering import half_boundary, matmul_blocks, omp


def require_torch_mlir() -> Any:
    """Import torch-mlir lazily with an actionable message: ``import attnpass`` must not need it."""
    try:
        import torch_mlir.dialects.torch  # noqa: F401
        from torch_mlir import ir
    except ImportError as e:  # pragma: no cover - exercised only where the wheel is missing
        raise AttnpassError(
            "the MLIR path needs torch-mlir (pip install torch-mlir; `make setup` tries it): " + str(e)
        ) from e
    return ir


# torch dialect (as imported) -> torch backend contract.  Which one depends on the frontend.
FX_TO_BACKEND = "torchdynamo-export-to-torch-backend-pipeline"
ONNX_TO_BACKEND = "torch-onnx-to-torch-backend-pipeline"
BACKEND_TO_LINALG = "torch-backend-to-linalg-on-tensors-backend-pipeline"

# linalg-on-tensors -> LLVM dialect.
LINALG_TO_LLVM: tuple[str, ...] = (
    "func.func(refback-generalize-tensor-pad)",
    "func.func(refback-generalize-tensor-concat)",
    "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "refback-mlprogram-bufferize",
    "inline",
    "refback-munge-calling-conventions",
    "func.func(scf-forall-to-parallel)",
    "buffer-deallocation-pipeline",
    "convert-scf-to-openmp",  # our scf.forall only: before the loops of tm_tensor / linalg (parallel reductions)
    "func.func(tm-tensor-to-loops)",
    "func.func(refback-munge-memref-copy)",
    "func.func(convert-linalg-to-loops)",
    "func.func(convert-vector-to-scf{full-unroll=true})",
    "func.func(lower-affine)",
    "convert-scf-to-cf",
    "func.func(refback-expand-ops-for-llvm)",
    "func.func(arith-expand)",
    "convert-vector-to-llvm{vector-contract-lowering=outerproduct reassociate-fp-reductions=true}",
    "func.func(convert-math-to-llvm)",
    "convert-math-to-libm",
    "expand-strided-metadata",
    "finalize-memref-to-llvm",
    "lower-affine",
    "convert-bufferization-to-memref",
    "finalize-memref-to-llvm",
    "func.func(convert-arith-to-llvm)",
    "convert-func-to-llvm",
    "convert-cf-to-llvm",
    "convert-complex-to-llvm",
    "convert-openmp-to-llvm",
    "reconcile-unrealized-casts",
)

ORIGIN_ATTR = "attnpass.origin"  # "fx" or "onnx": which torch-backend pipeline the module needs


def _text(module: Any) -> str:
    return module if isinstance(module, str) else str(module.operation)


def new_context() -> Any:
    """A context with the torch and torch_c dialects loaded.

    The Python bindings register only ``torch``; ``torch_c`` (the vtensor <-> builtin tensor
    casts our rewrites put at the boundary of their linalg functions) and ``tm_tensor`` (what
    torch-mlir lowers an SDPA call it keeps to) get loaded as dependent dialects of passes that
    create their ops, so those are run once on an empty module.
    """
    ir = require_torch_mlir()
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.passmanager import PassManager

    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    with ctx:
        PassManager.parse("builtin.module(torch-func-backend-type-conversion,func.func(convert-torch-to-tmtensor))").run(ir.Module.parse("module {}").operation)
    return ctx


def parse(text: str, what: str = "MLIR module") -> Any:
    """Parse MLIR text in a fresh context with the torch dialects loaded."""
    ir = require_torch_mlir()

    ctx = new_context()
    try:
        with ctx:
            return ir.Module.parse(text)
    except Exception as e:  # MLIRError: keep the diagnostics, drop the C++ noise
        raise AttnpassError(f"{what} does not parse as MLIR: {str(e).splitlines()[0] if str(e) else e}") from e


def run_passes(module: Any, passes: str | Sequence[str], what: str) -> Any:
    """Run ``passes`` on a fresh copy of ``module``; failures become one-line AttnpassErrors."""
    require_torch_mlir()
    from torch_mlir.passmanager import PassManager

    mod = parse(_text(module), what)
    spec = passes if isinstance(passes, str) else ",".join(passes)
    with mod.context as ctx:
        ctx.emit_error_diagnostics = True
        try:
            PassManager.parse(f"builtin.module({spec})").run(mod.operation)
        except Exception as e:
            diags = getattr(e, "error_diagnostics", None) or []
            first = f"{diags[0].location}: {diags[0].message}" if diags else (str(e).splitlines() or [""])[0]
            raise AttnpassError(f"lowering {what} failed: {first.strip()[:500]}") from e
    return mod


def origin(module: Any) -> str:
    """Which frontend produced the torch dialect: decides the torch-backend pipeline."""
    m = re.search(ORIGIN_ATTR.replace(".", r"\.") + r'\s*=\s*"(\w+)"', _text(module).split("\n", 3)[0] + _text(module)[:2000])
    return m.group(1) if m else "fx"


def to_torch_backend(module: Any) -> Any:
    """torch dialect as imported -> the torch backend contract (value semantics, decomposed)."""
    pipeline = ONNX_TO_BACKEND if origin(module) == "onnx" else FX_TO_BACKEND
    return run_passes(module, pipeline, "torch dialect -> torch backend")


def to_linalg(module: Any) -> Any:
    """torch dialect -> linalg-on-tensors (with our own linalg/scf functions inlined)."""
    backend = to_torch_backend(module)
    return run_passes(backend, BACKEND_TO_LINALG, "torch backend -> linalg")


def to_llvm(module: Any, from_linalg: bool = False, parallel: bool = True) -> Any:
    """torch dialect (or linalg-on-tensors if ``from_linalg``) -> LLVM dialect, ready to JIT.

    The pipeline stops after bufferization to turn the marked matmuls and the model's plain ones into register blocks
    over their buffers (``microkernel.define_all``, ``matmul_blocks.define_all``) and after ``convert-scf-to-openmp`` to drop the ``memref.alloca_scope`` it wraps
    each parallel body in (see ``inline_alloca_scopes``).  ``parallel=False``: no OpenMP, parallel loops run in order
    (for a host without a C compiler to build the runtime).
    """
    lin = module if from_linalg else to_linalg(module)
    from attnpass.rewrite.mlir import microkernel

    passes = list(LINALG_TO_LLVM)
    if "bf16>" in _text(lin):  # bf16 at a public function's boundary: passed as i16 bits (``half_boundary``)
        lin = parse(_text(lin), "linalg module")
        if half_boundary.wrap(lin):
            passes.insert(0, half_boundary.PASS)
    if not parallel:
        passes.remove("convert-scf-to-openmp")
    # edits between two passes, each run on the module as the passes before it left it
    hooks: dict[int, Callable[[Any], object]] = {}
    text = _text(lin)
    blocks = [f for f, on in ((microkernel.define_all, microkernel.MARK_NAME in text),
                              (matmul_blocks.define_all, "linalg.matmul" in text or "linalg.batch_matmul" in text)) if on]
    if blocks:  # the register-block matmuls (fused tiles, the model's own): vector code on the bufferized module
        hooks[passes.index("inline")] = lambda m: [f(m) for f in blocks]
    if parallel:
        hooks[passes.index("convert-scf-to-openmp") + 1] = inline_alloca_scopes
    mod, start = lin, 0
    for at in sorted(hooks):
        mod = run_passes(mod, passes[start:at], "linalg -> LLVM")
        hooks[at](mod)
        start = at
    return run_passes(mod, passes[start:], "linalg -> LLVM")


def inline_alloca_scopes(module: Any) -> int:
    """Inline every result-less ``memref.alloca_scope`` that holds no ``memref.alloca``; returns how many.

    ``convert-scf-to-openmp`` puts the body of a parallel loop in such a scope, and ``convert-scf-to-cf`` then
    leaves it with several blocks, which its verifier refuses.  Without a stack allocation inside, the scope
    (a stack save / restore) does nothing, so its body moves out in front of it.  Our loop nests allocate on
    the heap (bufferization's ``memref.alloc``), so every scope they produce goes.
    """
    scopes: list[Any] = []

    def visit(op: Any) -> None:
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "memref.alloca_scope":
                        scopes.append(inner.operation)
                    visit(inner.operation)

    with module.context:
        visit(module.operation)
        done = 0
        for scope in scopes:
            if len(scope.results) or "memref.alloca " in str(scope) or len(scope.regions[0].blocks) != 1:
                continue
            body = list(scope.regions[0].blocks[0].operations)
            for op in body[:-1]:  # the last one is memref.alloca_scope.return
                op.operation.move_before(scope)
            scope.erase()
            done += 1
    return done


# ------------------------------------------------------------------ runtime

_NP_OF_SUFFIX = {"f32": np.float32, "f64": np.float64, "i1": np.bool_, "i8": np.int8, "i16": np.int16, "i32": np.int32,
                 "i64": np.int64, "f16": np.float16}


@dataclass
class _Result:
    """Where a consume-return callback drops the copied results of the latest call."""

    values: list[np.ndarray] | None = None


def _as_numpy(x: Any) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()
        return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()  # bf16: its bits (half_boundary)
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        return x.view(np.int16) if x.dtype.name == "bfloat16" else x
    raise TypeError(f"JIT function arguments must be torch tensors or numpy arrays, got {type(x).__name__}")


class JitFunction:
    """A JIT-compiled ``main``: call it with torch tensors or numpy arrays, get the same kind back.

    Arguments are passed as unranked memref descriptors over the caller's buffers (no copy);
    results are copied out of the JIT's buffers inside the return callback, after which the
    generated code frees them.
    """

    def __init__(self, llvm_module: Any, func_name: str = "main", opt_level: int = 3, shared_libs: Sequence[str] = (),
                 bf16_results: Sequence[bool] = ()):
        require_torch_mlir()
        from torch_mlir.execution_engine import ExecutionEngine
        from torch_mlir.runtime import np_to_memref as m2n

        self._m2n = m2n
        self.func_name = func_name
        self.bf16_results = list(bf16_results)  # results that come back as i16 bits of bf16 values
        self.llvm_text = _text(llvm_module)
        self._result = _Result()
        self._callbacks: list[Any] = []  # keep the ctypes thunks alive as long as the engine
        self.engine = ExecutionEngine(llvm_module, opt_level=opt_level, shared_libs=list(shared_libs))
        for name, suffixes in _consume_symbols(self.llvm_text):
            self._register(name, suffixes)

    def _register(self, name: str, suffixes: list[str]) -> None:
        m2n = self._m2n
        ptr = ctypes.POINTER(m2n.UnrankedMemRefDescriptor)
        dtypes = [_NP_OF_SUFFIX[s] for s in suffixes]

        def consume(*descs: Any) -> None:
            self._result.values = [np.array(m2n.unranked_memref_to_numpy(d, dt), copy=True) for d, dt in zip(descs, dtypes)]

        thunk = ctypes.CFUNCTYPE(None, *([ptr] * len(suffixes)))(consume)
        self._callbacks.append(thunk)
        self.engine.register_runtime(name, thunk)

    def __call__(self, *args: Any) -> Any:
        arrays = [_as_numpy(a) for a in args]
        descs = [self._m2n.get_unranked_memref_descriptor(a) for a in arrays]
        self._result.values = None
        self.engine.invoke(self.func_name, *[ctypes.pointer(ctypes.pointer(d)) for d in descs])
        out = self._result.values
        if out is None:
            raise AttnpassError(f"JIT function {self.func_name} returned nothing")
        out = [_bf16_from_bits(o, args) if i < len(self.bf16_results) and self.bf16_results[i] else o
               for i, o in enumerate(out)]
        if args and _is_torch(args[0]):
            import torch

            out = [o if isinstance(o, torch.Tensor) else torch.from_numpy(o) for o in out]
        return out[0] if len(out) == 1 else tuple(out)


def _bf16_from_bits(bits: np.ndarray, args: Sequence[Any]) -> Any:
    """A bf16 result from its i16 bits: a torch bf16 tensor for torch callers, else an ``ml_dtypes.bfloat16`` array
    (the bits as int16 where ml_dtypes is missing)."""
    if args and _is_torch(args[0]):
        import torch

        return torch.from_numpy(bits).view(torch.bfloat16)
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover
        return bits
    return bits.view(ml_dtypes.bfloat16)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _consume_symbols(llvm_text: str) -> list[tuple[str, list[str]]]:
    """The ``refbackend_consume_func_return_*`` callbacks the munged module declares, with element types.

    The munge pass names each callback after its result types (``mrf32``, ``mri1_mrf32``...), so
    the element types are read back from the name rather than from a table of known signatures.
    """
    found = []
    for name in sorted(set(re.findall(r"@(refbackend_consume_func_return_[A-Za-z0-9_]+)", llvm_text))):
        if name.startswith("_mlir_ciface_"):
            continue
        parts = name[len("refbackend_consume_func_return_"):].split("_")
        suffixes = [p[2:] for p in parts if p.startswith("mr")]
        if suffixes and all(s in _NP_OF_SUFFIX for s in suffixes):
            found.append((name, suffixes))
    return found


def compile_module(module: Any, from_linalg: bool = False, func_name: str = "main", opt_level: int = 3) -> JitFunction:
    """torch dialect (or linalg-on-tensors) -> a Python-callable native function."""
    # calls that convert-math-to-libm leaves resolve against the host process, which has libm loaded; the
    # __kmpc_* calls of a parallel loop against our own runtime (``lowering.omp``), loaded with the thread count.
    # Without a C compiler to build that runtime the parallel loops run in order, with a warning.
    try:
        runtime = omp.load_runtime()
    except AttnpassError as e:
        warnings.warn(f"attnpass: parallel loops run on one thread: {e}", RuntimeWarning, stacklevel=2)
        runtime = None
    lin = module if from_linalg else to_linalg(module)
    lin = parse(_text(lin), "linalg module")
    bf16 = half_boundary.bf16_results(lin, func_name)
    llvm = to_llvm(lin, from_linalg=True, parallel=runtime is not None)
    libs = [runtime] if runtime is not None and uses_openmp(llvm) else []
    return JitFunction(llvm, func_name=func_name, opt_level=opt_level, shared_libs=libs, bf16_results=bf16)


def uses_openmp(module: Any) -> bool:
    """Whether the LLVM-dialect module has a parallel region (then it calls the OpenMP runtime)."""
    return "omp.parallel" in _text(module)


Runner = Callable[..., Any]
