"""Compiled CPU attention kernel (C++, built on first use with ``torch.utils.cpp_extension``).

``load()`` compiles ``attention.cpp`` once per CPU capability and returns a ``CpuKernel``,
or None (with one warning saying why) when it cannot be built here, in which case the
blocked reference runs.  The variant follows torch's own cpuid probe
(``torch.backends.cpu.get_cpu_capability()``, which also honours ``ATEN_CPU_CAPABILITY``):
AVX-512 and AVX2 builds are separate libraries with separate op namespaces, so an AVX2
machine never executes an instruction compiled for AVX-512.

The build lands in torch's extension cache (``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``), never in the repository, under a name that hashes the
source, flags and torch version, so an edit rebuilds and a stale library is never loaded.
A file lock serialises concurrent builds (pytest-xdist workers, parallel sessions).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("attention.cpp")

#: Compiler flags per capability; each builds its own library.  ``CPU_CAPABILITY`` puts
#: ATen's ``Vectorized`` in a capability-named inline namespace, as ATen does for its kernels.
_CAPABILITY_FLAGS: dict[str, list[str]] = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}

_lock = threading.Lock()
_loaded: dict[str, CpuKernel | None] = {}
_warned: set[str] = set()


def machine_capability() -> str:
    """The variant this machine should run: ``AVX512``, ``AVX2`` or ``DEFAULT``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "AVX512"
    if cap.startswith("AVX2"):
        return "AVX2"
    return "DEFAULT"


def _cache_root() -> Path:
    """Where torch's ``cpp_extension.load`` puts builds by default; our lock file lives there too."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root)


def compile_library(source: Path, prefix: str, capability: str) -> object:
    """Compile (or reuse) ``source`` for ``capability``; returns its ``torch.ops`` namespace.

    Shared by every C++ source here (attention, softmax_topk): one flag set per capability, a
    name that hashes source, flags and torch version, one lock for all builds.
    """
    from filelock import FileLock
    from torch.utils import cpp_extension

    flags = ["-O3", "-fopenmp", *_CAPABILITY_FLAGS[capability]]
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    digest = hashlib.sha256(
        source.read_bytes() + headers + " ".join(flags).encode() + torch.__version__.encode()
    ).hexdigest()[:10]
    name = f"{prefix}_{capability.lower()}_{digest}"
    what = "softmax_topk" if "topk" in prefix else "attention"
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "attnpass_cpu.lock")):
        # torch puts builds in <root>/<name> under TORCH_EXTENSIONS_DIR, else in <root>/py3xx_<device>/<name>
        fresh = not any(root.glob(f"{name}/{name}.so")) and not any(root.glob(f"*/{name}/{name}.so"))
        if fresh:  # a first use pauses for a compile: say why, once, on stderr (stdout may be JSON)
            print(f"attnpass: building the C++ CPU {what} kernel ({capability}) on first use, "
                  f"cached in {root} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=[*flags, f"-DATTNPASS_NS={name}"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("ATTNPASS_VERBOSE_BUILD") == "1",
        )
        if fresh:
            print(f"attnpass: C++ CPU {what} kernel built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return getattr(torch.ops, name)


def _build(capability: str) -> CpuKernel:
    """Compile (or reuse) the attention library for ``capability`` and wrap its ops."""
    return CpuKernel(compile_library(_SOURCE, "attnpass_cpu", capability), capability)


def load_topk(capability: str | None = None):
    """The compiled ``softmax_topk`` kernel (``attnpass.kernels.cpu.topk``), or None if it cannot be built."""
    from attnpass.kernels.cpu import topk

    return topk.load(capability)


def load(capability: str | None = None) -> CpuKernel | None:
    """The compiled kernel for ``capability`` (default: this machine's), or None if it cannot be built.

    Cached per capability; a failure warns once and is remembered so every call after it is free.
    """
    cap = capability or machine_capability()
    if cap not in _CAPABILITY_FLAGS:
        raise ValueError(f"attnpass cpu kernel: unknown capability {cap!r}; choose from {sorted(_CAPABILITY_FLAGS)}")
    if cap in _loaded:
        return _loaded[cap]
    with _lock:
        if cap not in _loaded:
            try:
                _loaded[cap] = _build(cap)
            except Exception as exc:  # a missing compiler or ninja must not break attnpass
                _loaded[cap] = None
                if cap not in _warned:
                    _warned.add(cap)
                    warnings.warn(
                        f"attnpass: the C++ CPU attention kernel ({cap}) could not be built, using the "
                        f"reference instead: {type(exc).__name__}: {exc}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    return _loaded[cap]


def blocks(s_q: int, s_k: int, causal: bool = False) -> tuple[int, int]:
    """Query and key block sizes.

    Large query blocks amortise each K/V tile over more rows (the GEMMs then run near
    peak); small sequences use small ones so that B*H*blocks still feeds every thread.
    A 256x512 fp32 score tile (512 KiB) fits this CPU class's L2.  Causal problems take
    128-row blocks: the diagonal tiles, half of which is masked work, shrink, which
    measured ~5% faster at S=2048 (non-causal: no difference between 64 and 512 rows).
    """
    q_block = (128 if causal else 256) if s_q >= 768 else (64 if s_q >= 192 else 32)
    kv_block = 512 if s_k >= 512 else max(s_k, 1)
    return q_block, kv_block


@dataclass
class _Prepared:
    """Inputs in the kernel's layout: compute dtype, contiguous, mask as 4-D ``[1|B, 1|H, 1|S_q, S_k]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    mask_kind: int
    mask_thr: float
    mask_shape4: tuple[int, ...]
    scale: float
    s: torch.Tensor | None
    b: torch.Tensor | None
    softcap: float


class CpuKernel:
    """The compiled kernel behind ``attnpass::attention`` on CPU; same signatures as the reference."""

    name = "cpu"

    def __init__(self, ops: object, capability: str) -> None:
        self._ops = ops
        self.capability = capability

    @property
    def uses_blas(self) -> bool:
        """True when block matmuls go through the BLAS bundled with torch (False: the loop fallback)."""
        return bool(self._ops.blas_available(torch.empty(0)))

    def _prepare(self, q, k, v, attn_mask, scale, ssmax_s, ssmax_b, softcap) -> _Prepared:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        heads, s_k = q.shape[1], k.shape[2]
        mask, kind, thr, shape4 = None, 0, 0.0, ()
        if attn_mask is not None:
            m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            shape4 = tuple(m.shape)
            if m.shape[-1] != s_k:
                m = m.expand(*m.shape[:-1], s_k)
            if m.dtype == torch.bool:
                kind, mask = 1, m.contiguous()
            else:
                # Compare in the mask's own dtype, as semantics does: -1e4 rounds to -9984 in bf16.
                kind, thr = 2, float(torch.tensor(_masked_below(), dtype=m.dtype))
                mask = m.to(cdt).contiguous()
        s = b = None
        if ssmax_s is not None:
            s = ssmax_s.detach().to(cdt).reshape(-1).expand(heads).contiguous()
            if ssmax_b is not None:
                b = ssmax_b.detach().to(cdt).reshape(-1).expand(heads).contiguous()
        return _Prepared(
            q=q.detach().to(cdt).contiguous(),
            k=k.detach().to(cdt).contiguous(),
            v=v.detach().to(cdt).contiguous(),
            mask=mask, mask_kind=kind, mask_thr=thr, mask_shape4=shape4,
            scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
            s=s, b=b,
            softcap=float(softcap) if softcap else 0.0,
        )

    def attention_forward(self, q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa):
        """``(out, lse)``: out in q's dtype, lse float32 ``[B, H, S_q]`` (``-inf`` for rows with no key)."""
        p = self._prepare(q, k, v, attn_mask, scale, ssmax_s, ssmax_b, softcap)
        q_block, kv_block = blocks(q.shape[2], k.shape[2], bool(is_causal))
        out, lse = self._ops.forward(
            p.q, p.k, p.v, p.mask, p.mask_kind, p.mask_thr, bool(is_causal), p.scale, p.s, p.b, p.softcap,
            q_block, kv_block,
        )
        return out.to(q.dtype), lse.to(torch.float32)

    def attention_backward(self, grad_out, q, k, v, attn_mask, out, lse, is_causal, scale, ssmax_s, ssmax_b, softcap,
                           enable_gqa, need_mask_grad=True):
        """``(dq, dk, dv, dmask | None, ds | None, db | None)``, each shaped and typed like its input.

        ``need_mask_grad=False`` skips the mask gradient (a padding mask): it would cost a
        ``[B, H, S_q, S_k]`` buffer, the one thing a fused backward exists to avoid.
        """
        p = self._prepare(q, k, v, attn_mask, scale, ssmax_s, ssmax_b, softcap)
        cdt = p.q.dtype
        want_dmask = attn_mask is not None and attn_mask.is_floating_point() and need_mask_grad
        q_block, kv_block = blocks(q.shape[2], k.shape[2], bool(is_causal))
        if cdt == torch.float64:
            # The op's lse is float32; float64 (gradcheck) recomputes it at full precision.
            lse = self._ops.forward(
                p.q, p.k, p.v, p.mask, p.mask_kind, p.mask_thr, bool(is_causal), p.scale, p.s, p.b, p.softcap,
                q_block, kv_block,
            )[1]
        dq, dk, dv, dmask, dfactor, dflogn = self._ops.backward(
            grad_out.detach().to(cdt).contiguous(), p.q, p.k, p.v, p.mask, p.mask_kind, p.mask_thr,
            out.detach().to(cdt).contiguous(), lse.detach().to(cdt).contiguous(), bool(is_causal), p.scale,
            p.s, p.b, p.softcap, want_dmask, q_block, kv_block,
        )
        dk, dv = _reduce_kv(dk, k), _reduce_kv(dv, v)
        grad_mask = None
        if want_dmask:
            if dmask.dim() == 5:  # one slice per thread when the mask broadcasts over batch or heads
                dmask = dmask.sum(0)
            grad_mask = dmask.sum_to_size(p.mask_shape4).reshape(attn_mask.shape).to(attn_mask.dtype)
        ds = db = None
        if ssmax_s is not None:
            ds = _per_head_grad(dflogn, ssmax_s)
            if ssmax_b is not None:
                db = _per_head_grad(dfactor, ssmax_b)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_mask, ds, db


def _masked_below() -> float:
    """``semantics.MASKED_BELOW``, imported late so that loading this module stays cheap."""
    from attnpass import semantics

    return semantics.MASKED_BELOW


def _reduce_kv(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum per-query-head K/V gradients ``[B, H, S, D]`` back to the GQA/broadcast shape of ``like``."""
    batch, heads = g.shape[:2]
    bk, hk = like.shape[:2]
    if hk != heads:
        g = g.view(batch, hk, heads // hk, *g.shape[2:]).sum(2)
    if bk != batch:
        g = g.sum(0, keepdim=True)
    return g


def _per_head_grad(per_row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a ``[B, H, S_q]`` gradient over batch and rows (and heads if ``like`` is shared)."""
    g = per_row.sum((0, 2))
    if like.numel() == 1:
        g = g.sum()
    return g.reshape(like.shape).to(like.dtype)
