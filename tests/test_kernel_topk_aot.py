"""Ahead-of-time compiles of the Triton softmax_topk kernels for sm_90 and sm_80, on the CPU (no GPU needed).

The interpreter runs the kernels' arithmetic (tests/test_kernel_topk.py) but not Triton's compiler,
which is where a data-dependent ``while`` or an int64 key can fail to lower.  The real launcher
(``TritonTopK``) is run on CPU tensors with the kernels swapped for recorders, so the arguments
and constexprs are those of a GPU launch; each is compiled with the wheel's ptxas and must spill
nothing.  Shapes: a router (4096 x 64, k = 8) and a vocabulary row (64 x 131072, k = 50); bf16 on sm_90,
fp32 on sm_80 (the dtype changes only the loads and stores).
"""

from __future__ import annotations

import types

import pytest
import torch

from attnpass.kernels.triton import aot
from attnpass.kernels.triton import topk as triton_topk

_KERNELS = ("softmax_topk_fwd", "softmax_topk_merge", "softmax_topk_bwd")


def _launches(dtype: torch.dtype, rows: int, n: int, k: int) -> dict[str, tuple[tuple, dict]]:
    """What ``TritonTopK`` passes to each kernel for this problem, recorded instead of launched."""
    mod = triton_topk.triton_kernels.exec_kernel_source(triton_topk._SOURCE, False)
    assert mod is not None, "the compiled Triton softmax_topk module could not be built"
    calls: dict[str, tuple[tuple, dict]] = {}
    ns = types.SimpleNamespace(**vars(mod))
    for name in _KERNELS:
        setattr(ns, name, _Recorder(name, calls))
    kern = triton_topk.TritonTopK(mod)
    kern._mod = ns
    x = torch.zeros(rows, n, dtype=dtype)
    kern.softmax_topk_forward(x, k, True)
    kern.softmax_topk_backward(torch.zeros(rows, k, dtype=dtype), x, torch.zeros(rows, k, dtype=torch.int64), False)
    return {name: (mod, calls[name]) for name in _KERNELS if name in calls}


class _Recorder:
    def __init__(self, name: str, calls: dict) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls[self.name] = (args, kwargs)
        return record


def _compile(mod, name: str, args: tuple, kwargs: dict, arch: int) -> tuple[int, int]:
    t = aot._triton()
    aot.tool_path("ptxas")
    fn = getattr(mod, name)
    kwargs = dict(kwargs, debug=False)
    backend = t.make_backend(t.GPUTarget("cuda", arch, 32))
    bound, specialization, options = t.binder(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = t.triton.compile(t.ASTSource(fn, signature, constexprs, attrs), target=t.GPUTarget("cuda", arch, 32),
                                options=options.__dict__)
    regs, spills, _ = aot.resource_usage(compiled.asm["cubin"])
    return regs, spills


@pytest.mark.parametrize("arch,dtype", [(90, torch.bfloat16), (80, torch.float32)])
def test_kernels_compile_without_spills(arch, dtype):
    bad, built = [], set()
    for rows, n, k in ((4096, 64, 8), (64, 131072, 50)):
        for name, (mod, (args, kwargs)) in _launches(dtype, rows, n, k).items():
            built.add(name)
            regs, spills = _compile(mod, name, args, kwargs, arch)
            assert regs > 0
            if spills:
                bad.append(f"{name} {rows}x{n} k={k} {dtype}: {regs} regs, {spills} B spilled")
    assert built == set(_KERNELS)  # the vocabulary row is split: the merge kernel is launched too
    assert not bad, "\n".join(bad)
