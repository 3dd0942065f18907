"""Ahead-of-time compile checks for the Triton kernels: registers, spills, shared memory, no GPU needed.

A lent GPU gives minutes, not hours, so a kernel that spills or asks for more shared memory
than the chip has must be caught here.  Triton compiles for any ``GPUTarget`` on a machine
without one (ptxas ships in its wheel); what it cannot do is load the result, which is where
``n_regs``/``n_spills`` normally come from.  So this module:

1. runs the real launcher (``TritonKernel.attention_forward``/``attention_backward``) on CPU
   tensors of a representative problem, with the kernels swapped for recorders, so the
   argument list, strides and constexpr flags are exactly what a GPU launch would pass;
2. specialises those arguments with Triton's own binder (same ``tt.divisibility`` and
   ``== 1`` specialisations as a launch) and compiles with ``triton.compile``;
3. reads registers and local memory (spills: Triton's ``n_spills`` is the local-memory size)
   from the cubin with the wheel's ``cuobjdump -res-usage``, and shared memory from the
   compile metadata.

``python -m attnpass.kernels.triton.aot --table`` prints kernel x D x config x variant for
sm_90 and sm_80; ``--full`` walks every variant, otherwise a representative sample.
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

#: Opt-in dynamic shared memory per block, bytes (CUDA programming guide, compute capabilities table).
SHARED_LIMIT: dict[int, int] = {90: 227 * 1024, 80: 163 * 1024}
#: The attention kernels the autotuner picks configs for (the pre-passes have fixed tiles).
TUNED = ("fwd", "dq", "dkdv")
_RAW = {"fwd": "fwd_kernel", "dq": "bwd_dq_kernel", "dkdv": "bwd_dkdv_kernel"}


class AotUnavailable(RuntimeError):
    """Triton, its CUDA backend or the wheel's ptxas/cuobjdump is missing: the check cannot run at all."""


@dataclass(frozen=True)
class Variant:
    """One representative call: dtype, head dim and which optional features the kernels compile in.

    ``mask`` is ``none``, ``bool`` (``[B, 1, S, S]``), ``float`` (``[B, H, S, S]`` in the inputs'
    dtype), ``float32`` (``[1, 1, S, S]`` fp32, as HF builds it under autocast: the launcher narrows it
    to the inputs' dtype), ``float32-grad`` (the same mask requiring a gradient: staged as fp32) or
    ``padding`` (``[B, 1, 1, S]`` float, row stride 0).
    """

    dtype: str
    d: int
    causal: bool = False
    mask: str = "none"
    ssmax: bool = False
    softcap: bool = False

    @property
    def name(self) -> str:
        parts = ["causal" if self.causal else "", "" if self.mask == "none" else f"{self.mask}-mask",
                 "ssmax" if self.ssmax else "", "softcap" if self.softcap else ""]
        return "+".join(p for p in parts if p) or "plain"


#: The variants the issue names: plain, causal, bool mask + SSMax, float mask + soft-cap, padding mask.
SHAPES = (
    dict(),
    dict(causal=True),
    dict(mask="bool", ssmax=True),
    dict(mask="float", softcap=True),
    dict(mask="float32", causal=True),
    dict(mask="float32-grad", causal=True),
    dict(mask="padding", causal=True, ssmax=True),
)


def variants(dtypes: Iterable[str] = ("fp16", "bf16"), dims: Iterable[int] = (64, 128)) -> list[Variant]:
    """Every representative variant for the given dtypes and head dims."""
    return [Variant(dt, d, **shape) for dt in dtypes for d in dims for shape in SHAPES]


@dataclass(frozen=True)
class Result:
    """One compiled kernel: what it costs on the target."""

    kernel: str
    config: tuple[int, int, int, int]
    variant: Variant
    arch: int
    shared: int
    regs: int
    spills: int
    wgmma: bool
    seconds: float

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_LIMIT[self.arch] and self.spills == 0


# ---- tools from the wheel ------------------------------------------------------------------

@functools.cache
def _triton():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except Exception as exc:  # pragma: no cover - depends on the environment
        raise AotUnavailable(f"Triton with its CUDA backend is needed for AOT checks: {exc}") from exc
    return types.SimpleNamespace(triton=triton, GPUTarget=GPUTarget, ASTSource=ASTSource, make_backend=make_backend,
                                 binder=create_function_from_signature)


def tool_path(name: str) -> Path:
    """A binary from Triton's CUDA backend (``ptxas``, ``cuobjdump``); raises when the wheel lacks it."""
    from triton import knobs

    tool = getattr(knobs.nvidia, name, None)
    path = getattr(tool, "path", None) if tool is not None else None
    if not path or not Path(path).is_file():
        raise AotUnavailable(f"{name} not found in the Triton wheel (knobs.nvidia.{name} -> {path!r})")
    return Path(path)


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """``(registers, stack + local bytes, static shared bytes)`` of the kernel in a cubin (``cuobjdump -res-usage``).

    Register spills live in the stack frame; Triton's own ``n_spills`` is the driver's local
    size, which counts the stack frame too, so the two numbers are the same quantity.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool_path("cuobjdump")), "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = {}
    for name in ("REG", "STACK", "LOCAL", "SHARED"):
        m = re.search(rf"\b{name}:(\d+)", text)
        if m is None:
            raise RuntimeError(f"unexpected cuobjdump -res-usage output (no {name}):\n{text}")
        fields[name] = int(m.group(1))
    return fields["REG"], fields["STACK"] + fields["LOCAL"], fields["SHARED"]


# ---- recording the launcher's arguments ----------------------------------------------------

class _Recorder:
    """Stands in for a kernel: ``rec[grid](*args, **kwargs)`` stores the call instead of launching."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args, kwargs))


def _recording_module(mod: types.ModuleType, calls: list) -> types.SimpleNamespace:
    """The kernel module with every launchable kernel replaced by a recorder."""
    ns = types.SimpleNamespace(**vars(mod))
    for name in ("fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel", "count_keys_kernel", "delta_kernel",
                 "fwd_tuned", "bwd_dq_tuned", "bwd_dkdv_tuned"):
        setattr(ns, name, _Recorder(name, calls))
    return ns


def _problem(v: Variant, s: int = 1024, b: int = 2, h: int = 4, hk: int = 2):
    """CPU inputs shaped like a real call (contents never read: only pointers, strides and dtypes matter)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[v.dtype]
    q = torch.zeros(b, h, s, v.d, dtype=dtype)
    k = torch.zeros(b, hk, s, v.d, dtype=dtype)
    val = torch.zeros(b, hk, s, v.d, dtype=dtype)

    shape, mdt = {"none": (None, None), "bool": ((b, 1, s, s), torch.bool), "float": ((b, h, s, s), dtype),
                  "float32": ((1, 1, s, s), torch.float32), "float32-grad": ((1, 1, s, s), torch.float32),
                  "padding": ((b, 1, 1, s), dtype)}[v.mask]
    mask = None if shape is None else torch.zeros(shape, dtype=mdt, requires_grad=v.mask == "float32-grad")
    ssmax_s = torch.full((h,), 0.4) if v.ssmax else None
    return q, k, val, mask, ssmax_s


@functools.cache
def _compiled_module() -> types.ModuleType:
    from attnpass.kernels import triton as tk

    mod = tk._kernel_module(False)
    if mod is None:
        raise AotUnavailable("the compiled Triton kernel module could not be built")
    return mod


def launches(v: Variant, kernel: str, config: tuple[int, int, int, int]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` the launcher passes to ``kernel`` for this variant with tiles pinned to ``config``."""
    from attnpass.kernels import triton as tk

    calls: list = []
    kern = tk.TritonKernel(_recording_module(_compiled_module(), calls), {k: config for k in TUNED})
    q, k, val, mask, s = _problem(v)
    softcap = 30.0 if v.softcap else None
    out, lse = kern.attention_forward(q, k, val, mask, v.causal, None, s, None, softcap, True)
    if kernel != "fwd":
        kern.attention_backward(torch.zeros_like(out), q, k, val, mask, out,
                                torch.zeros(out.shape[:3]), v.causal, None, s, None, softcap, True)
    for name, args, kwargs in calls:
        if name == _RAW[kernel]:
            return args, kwargs
    raise AssertionError(f"the launcher never launched {kernel} for {v}")


def candidate_configs(v: Variant, kernel: str, arch: int = 90) -> list[tuple[int, int, int, int]]:
    """The configs the autotuner may pick for this variant on ``sm_<arch>``: the table after the kernel's prune hook."""
    mod = _compiled_module()
    triton = _triton().triton
    args, kwargs = launches(v, kernel, mod.HOPPER_CONFIGS[kernel][0])
    fn = getattr(mod, _RAW[kernel])
    named = dict(zip(fn.arg_names, args))
    flags = {k: val for k, val in kwargs.items() if k not in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
               for bm, bn, w, st in mod.CONFIG_TABLE[kernel]]
    kept = mod._prune(configs, named, kernel=kernel, smem_limit=SHARED_LIMIT[arch], arch=arch, **flags)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


_cache: dict[tuple, Result] = {}


def compile_one(kernel: str, config: tuple[int, int, int, int], v: Variant, arch: int) -> Result:
    """Compile one kernel for ``sm_<arch>`` exactly as a launch would specialise it; cached per process."""
    key = (kernel, config, v, arch)
    if key in _cache:
        return _cache[key]
    t = _triton()
    tool_path("ptxas")
    fn = getattr(_compiled_module(), _RAW[kernel])
    args, kwargs = launches(v, kernel, config)
    kwargs = dict(kwargs, debug=False)
    backend = t.make_backend(t.GPUTarget("cuda", arch, 32))
    binder = t.binder(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    start = time.perf_counter()
    compiled = t.triton.compile(t.ASTSource(fn, signature, constexprs, attrs), target=t.GPUTarget("cuda", arch, 32),
                                options=options.__dict__)
    regs, spills, static_shared = resource_usage(compiled.asm["cubin"])
    res = Result(kernel, config, v, arch, int(compiled.metadata.shared) + static_shared, regs, spills,
                 "wgmma" in compiled.asm["ptx"], time.perf_counter() - start)
    _cache[key] = res
    return res


def sample(vs: list[Variant], kernel: str, arch: int = 90) -> list[tuple[tuple[int, int, int, int], Variant]]:
    """A cheap cover: every (head dim, candidate config) of ``kernel`` once, the variant rotating among ``vs``.

    Head dim and config decide the tile sizes, hence nearly all of the register and shared-memory
    cost; rotating the variant makes successive runs (and kernels) exercise different flags.
    """
    pairs: list[tuple[tuple[int, int, int, int], Variant]] = []
    for d in sorted({v.d for v in vs}):
        fits = {v: candidate_configs(v, kernel, arch) for v in vs if v.d == d}
        configs = sorted({c for cs in fits.values() for c in cs}, key=lambda c: (c[0] * c[1], c))
        for i, c in enumerate(configs):
            # only variants the autotuner would offer this config to: a pruned pair is never launched
            able = [v for v, cs in fits.items() if c in cs]
            pairs.append((c, able[(i * 5 + TUNED.index(kernel)) % len(able)]))
    return pairs


def summarise(results: list[Result], out=sys.stdout) -> None:
    """Worst case per arch x kernel x D x config over the variants compiled: max shared, regs, spills."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.arch, r.kernel, r.variant.d, r.config), []).append(r)
    print(f"{'arch':>4} {'kernel':<5} {'D':>3} {'config (BM,BN,W,S)':<19} {'builds':>6} "
          f"{'shared max':>10} {'regs max':>8} {'spill max':>9}", file=out)
    for (arch, kernel, d, c), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], TUNED.index(kv[0][1]), kv[0][2:])):
        print(f"{arch:>4} {kernel:<5} {d:>3} {str(c):<19} {len(rs):>6} {max(r.shared for r in rs):>10} "
              f"{max(r.regs for r in rs):>8} {max(r.spills for r in rs):>9}", file=out)


# ---- the table -----------------------------------------------------------------------------

def table(archs: Iterable[int] = (90, 80), full: bool = False, out=sys.stdout) -> list[Result]:
    """Compile kernel x config x variant for each arch and print one line per build."""
    vs = variants()
    results: list[Result] = []
    print(f"{'arch':>4} {'kernel':<5} {'D':>3} {'config (BM,BN,W,S)':<19} {'variant':<32} "
          f"{'shared':>7} {'regs':>4} {'spill':>5} {'ok':>3}", file=out, flush=True)
    for arch in archs:
        for kernel in TUNED:
            if full:
                pairs = [(c, v) for v in vs for c in candidate_configs(v, kernel, arch)]
            else:
                pairs = sample(vs, kernel, arch)
            for c, v in pairs:
                r = compile_one(kernel, c, v, arch)
                results.append(r)
                print(f"{arch:>4} {kernel:<5} {v.d:>3} {str(c):<19} {v.dtype + ' ' + v.name:<32} "
                      f"{r.shared:>7} {r.regs:>4} {r.spills:>5} {'yes' if r.fits else 'NO':>3}", file=out, flush=True)
    bad = [r for r in results if not r.fits]
    print(f"{len(results)} builds, {len(bad)} over the shared-memory limit or spilling", file=out)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", action="store_true", help="print kernel x D x config x variant -> shared, regs, spills")
    p.add_argument("--full", action="store_true", help="every variant x every candidate config (slow)")
    p.add_argument("--summary", action="store_true", help="also print the worst case per kernel x D x config")
    p.add_argument("--arch", type=lambda s: [int(x) for x in s.split(",")], default=[90, 80])
    args = p.parse_args(argv)
    if not args.table:
        p.print_help()
        return 2
    results = table(args.arch, args.full)
    if args.summary:
        summarise(results)
    return 0 if all(r.fits for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
