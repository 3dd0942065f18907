"""Triton attention kernel (forward + backward, SSMax, soft-cap, masks, GQA) and how to get one.

``load()`` returns a ``TritonKernel`` when Triton imports and either CUDA is available (the
compiled kernels) or ``TRITON_INTERPRET=1`` is set (the same kernels run by Triton's
interpreter, for CPU tensors); otherwise None, and the caller uses the reference.
``load(interpret_ok=True)`` also hands back the interpreter kernel where there is no GPU,
and ``load_interpreted()`` always does: that is how the tests run the exact Triton code on
CPU tensors, on a CPU-only machine and next to the compiled kernel on a GPU machine.
``attnpass.kernels.backend_for`` routes only CUDA tensors here.

The kernel source lives in ``kernels.py`` and is executed as a separate module per mode,
because Triton decides compiled-versus-interpreted when ``@triton.jit`` runs, not when a
kernel is launched.  Everything shape-dependent (strides, broadcast, GQA group, which
pre-passes run, how the gradients are reduced back to the inputs' shapes) is done here.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).with_name("kernels.py")
_lock = threading.Lock()
_modules: dict[tuple[Path, bool], ModuleType | None] = {}
_kernels: dict[bool, TritonKernel | None] = {}


def _interpret_requested() -> bool:
    """``TRITON_INTERPRET`` as Triton itself reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _kernel_module(interpret: bool) -> ModuleType | None:
    """``kernels.py`` executed with Triton's interpreter switched on or off (cached per mode)."""
    return exec_kernel_source(_SOURCE, interpret)


def exec_kernel_source(source: Path, interpret: bool) -> ModuleType | None:
    """A kernel source file executed with Triton's interpreter switched on or off (cached per file and mode).

    ``TRITON_INTERPRET`` is set only while the module body runs (the ``@triton.jit``
    decorators read it then) and restored afterwards, so nothing else in the process — other
    Triton users, torch.compile — sees a changed environment.  The file must define ``INTERPRET``
    (``knobs.runtime.interpret`` as it read it).
    """
    with _lock:
        if (source, interpret) in _modules:
            return _modules[(source, interpret)]
        name = f"{__name__}._{source.stem}_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, source)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        sys.modules[name] = mod  # Triton reads the kernels' source through their module
        try:
            spec.loader.exec_module(mod)
            if mod.INTERPRET != interpret:
                raise RuntimeError("triton.knobs.runtime.interpret is pinned; cannot build the other mode")
        except Exception as exc:
            sys.modules.pop(name, None)
            warnings.warn(f"attnpass: Triton kernels ({'interpreter' if interpret else 'compiled'}) unavailable: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
            mod = None
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        _modules[(source, interpret)] = mod
        return mod


def _kernel(interpret: bool) -> TritonKernel | None:
    if interpret not in _kernels:
        mod = _kernel_module(interpret)
        _kernels[interpret] = None if mod is None else TritonKernel(mod)
    return _kernels[interpret]


def load(interpret_ok: bool = False) -> TritonKernel | None:
    """The Triton kernel for this process, or None (the caller then uses the reference).

    Compiled when CUDA is available, the interpreter variant when ``TRITON_INTERPRET=1`` is
    set or, with ``interpret_ok``, when there is no GPU to compile for.
    """
    if not _triton_importable():
        return None
    if _interpret_requested():
        return _kernel(True)
    if torch.cuda.is_available():
        return _kernel(False)
    return _kernel(True) if interpret_ok else None


def load_interpreted() -> TritonKernel | None:
    """The interpreter variant whatever the machine (CPU tensors in, CPU tensors out); None without Triton."""
    return _kernel(True) if _triton_importable() else None


def _pow2_pad(d: int) -> int:
    """Head dims are tiled as a power of two, at least 16 (the smallest ``tl.dot`` K); extra lanes load 0."""
    return max(16, 1 << max(0, (d - 1).bit_length()))


def _masked_below() -> float:
    from attnpass import semantics

    return semantics.MASKED_BELOW


def _narrowed_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask in the inputs' (narrower) dtype that masks exactly the keys ``mask`` masks.

    Rounding alone could move an entry across ``MASKED_BELOW`` (-10001 rounds to -9984 in bf16,
    -9997 to -10000 in fp16), so the decision is taken in the mask's own dtype first: masked
    entries become -inf, and the kernels are given a threshold of -inf.  The finite bias is
    rounded to ``dtype``, which is what SDPA itself requires of a float mask; it is clamped to
    ``dtype``'s finite range so that a large bias does not round to inf (NaN and inf stay as they are).
    Broadcast (stride-0) dimensions are converted once and expanded again, so a key-padding mask
    keeps the row stride 0 that lets the kernels stage it as a vector.
    """
    one = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(mask.stride(), mask.shape))
    src = mask[one]
    big = torch.finfo(dtype).max
    finite = torch.where(torch.isfinite(src), src.clamp(-big, big), src)
    masked = src <= _masked_below()
    out = torch.where(masked, torch.full((), float("-inf"), dtype=src.dtype, device=src.device), finite).to(dtype)
    return out.expand(mask.shape)


class _Problem:
    """Shapes, strides and flags shared by the forward and backward launches."""

    def __init__(self, q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, interpreted):
        self.B, self.H, self.S_q, self.D = q.shape
        self.HK, self.S_k, self.DV = k.shape[1], k.shape[2], v.shape[-1]
        self.group = self.H // self.HK
        # expand turns a batch of 1 into stride 0: K/V are read, never copied, per query batch.
        self.k = k.detach().expand(self.B, self.HK, self.S_k, self.D)
        self.v = v.detach().expand(self.B, self.HK, self.S_k, self.DV)
        self.q = q.detach()
        self.causal = bool(is_causal)
        self.scale = 1.0 / math.sqrt(self.D) if scale is None else float(scale)
        self.softcap = float(softcap) if softcap else 0.0
        self.d_pad, self.dv_pad = _pow2_pad(self.D), _pow2_pad(self.DV)
        self.bucket = 1 << max(self.S_q, self.S_k, 1).bit_length() - 1
        self.upcast = interpreted and q.dtype == torch.bfloat16
        self.dummy = q  # pointer for absent optional inputs; the kernels never dereference it

        self.mask_kind, self.mask_thr, self.mask = 0, 0.0, None
        self.mask4: torch.Tensor | None = None
        if attn_mask is not None:
            m4 = attn_mask.detach().reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            self.mask4 = m4
            if m4.dtype == torch.bool:
                self.mask_kind, m4 = 1, m4.view(torch.uint8)
            elif m4.is_floating_point():
                self.mask_kind = 2
                if m4.element_size() > q.element_size() and not attn_mask.requires_grad:
                    # Converted once here rather than staged at its own width per pipeline stage in
                    # every kernel; only -inf marks a masked key in the result, so the threshold is -inf.
                    m4, self.mask_thr = _narrowed_mask(m4, q.dtype), float("-inf")
                else:
                    # Decided in the mask's dtype, as semantics does: -1e4 is -9984 in bf16.
                    self.mask_thr = float(torch.tensor(_masked_below(), dtype=m4.dtype))
                self.mask4 = m4
            else:
                raise TypeError(f"attnpass triton kernel: attn_mask must be bool or floating, got {attn_mask.dtype}")
            self.mask_own = m4.expand(m4.shape[0], m4.shape[1], self.S_q, self.S_k)
            self.mask = m4.expand(self.B, self.H, self.S_q, self.S_k)

        self.ssmax = ssmax_s is not None
        self.s = self.b = None
        if self.ssmax:
            self.s = ssmax_s.detach().to(device=q.device, dtype=torch.float32).reshape(-1)
            if ssmax_b is not None:
                self.b = ssmax_b.detach().to(device=q.device, dtype=torch.float32).reshape(-1)

    def mask_strides(self) -> tuple[int, int, int, int]:
        return tuple(self.mask.stride()) if self.mask is not None else (0, 0, 0, 0)

    def common_flags(self) -> dict:
        return dict(D_PAD=self.d_pad, DV_PAD=self.dv_pad, CAUSAL=self.causal, MASK_KIND=self.mask_kind,
                    MASK_ROWB=self.mask_rowb, SSMAX=self.ssmax, HAS_B=self.b is not None, N_BUF=self.nkeys_from_buffer,
                    SOFTCAP=self.softcap != 0.0, UPCAST=self.upcast)

    @property
    def mask_rowb(self) -> bool:
        """The mask is the same for every query row (row stride 0, e.g. ``[B, 1, 1, S_k]`` key padding).

        The kernels then load it as one ``[BLOCK_N]`` vector per key block instead of a
        ``[BLOCK_M, BLOCK_N]`` tile: a padding mask costs shared memory in proportion to what it holds.
        """
        return self.mask is not None and (self.mask.stride(2) == 0 or self.S_q == 1)

    @property
    def nkeys_from_buffer(self) -> bool:
        return self.ssmax and self.mask is not None


class TritonKernel:
    """The Triton implementation behind ``attnpass::attention``; same signatures as the reference.

    ``blocks`` pins the tiles, ``{"fwd" | "dq" | "dkdv": (BLOCK_M, BLOCK_N, num_warps, num_stages)}``,
    instead of autotuning; tests use it to run every Hopper tiling under the interpreter.
    float64 inputs (gradcheck) and mixed input dtypes go to the reference: the kernels
    compute in fp32 and would only fake float64 precision.
    """

    name = "triton"

    def __init__(self, module: ModuleType, blocks: dict[str, tuple[int, int, int, int]] | None = None) -> None:
        self._k = module
        self.interpreted = bool(module.INTERPRET)
        self.blocks = blocks

    def with_blocks(self, blocks: dict[str, tuple[int, int, int, int]]) -> TritonKernel:
        """The same kernels with fixed tiles (no autotuning)."""
        return TritonKernel(self._k, blocks)

    @property
    def configs(self) -> dict[str, list[tuple[int, int, int, int]]]:
        """The autotuning space per kernel: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``."""
        return {name: list(v) for name, v in self._k.CONFIG_TABLE.items()}

    @property
    def hopper_configs(self) -> dict[str, list[tuple[int, int, int, int]]]:
        """The table the compiled variant tunes over (also readable from the interpreter variant, for tests)."""
        return {name: list(v) for name, v in self._k.HOPPER_CONFIGS.items()}

    @property
    def ampere_configs(self) -> dict[str, list[tuple[int, int, int, int]]]:
        """The configs the compiled variant keeps on sm_8x (its autotuner is given both tables)."""
        return {name: list(v) for name, v in self._k.AMPERE_CONFIGS.items()}

    # -- launching ------------------------------------------------------------------------

    def _launch(self, which: str, tuned, raw, grid_rows: int, grid_cols: int, args: tuple, flags: dict) -> None:
        """Autotuned launch, or the raw kernel with pinned tiles; the grid depends on BLOCK_M or BLOCK_N."""
        axis = "BLOCK_N" if which == "dkdv" else "BLOCK_M"
        if self.blocks is None:
            tuned[lambda meta: (triton_cdiv(grid_rows, meta[axis]), grid_cols)](*args, **flags)
            return
        bm, bn, warps, stages = self.blocks[which]
        size = bn if which == "dkdv" else bm
        raw[(triton_cdiv(grid_rows, size), grid_cols)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn,
                                                       num_warps=warps, num_stages=stages)

    def _count_keys(self, p: _Problem) -> tuple[torch.Tensor, int, int]:
        """``n_i`` from the mask (and the causal limit) over the mask's own batch/heads; strides to broadcast it."""
        m = p.mask_own
        bm_, hm = m.shape[0], m.shape[1]
        nkeys = torch.empty((bm_, hm, p.S_q), dtype=torch.float32, device=p.q.device)
        self._k.count_keys_kernel[(triton_cdiv(p.S_q, 32), bm_ * hm)](
            m, nkeys, *m.stride(), hm, p.S_q, p.S_k, p.mask_thr,
            BLOCK_M=32, BLOCK_N=64, CAUSAL=p.causal, MASK_KIND=p.mask_kind,
        )
        return nkeys, (hm * p.S_q if bm_ > 1 else 0), (p.S_q if hm > 1 else 0)

    def _inputs(self, p: _Problem) -> tuple:
        """Pointer and stride arguments common to all three attention kernels (through ``sbh``)."""
        if p.nkeys_from_buffer:
            nkeys, snb, snh = self._count_keys(p)
        else:
            nkeys, snb, snh = p.dummy, 0, 0
        s = p.s if p.s is not None else p.dummy
        b = p.b if p.b is not None else p.dummy
        ssh = 1 if p.s is not None and p.s.numel() > 1 else 0
        sbh = 1 if p.b is not None and p.b.numel() > 1 else 0
        mask = p.mask if p.mask is not None else p.dummy
        return (p.q, p.k, p.v, mask, nkeys, s, b), (
            *p.q.stride(), *p.k.stride(), *p.v.stride(), *p.mask_strides(), snb, snh, ssh, sbh,
        )

    def _sizes(self, p: _Problem) -> tuple:
        return (p.H, p.group, p.S_q, p.S_k, p.D, p.DV, p.scale, p.softcap or 1.0, p.mask_thr, p.bucket)

    # -- the Backend interface ------------------------------------------------------------

    def _unsupported(self, q, k, v) -> bool:
        """Cases the fp32-accumulating kernels do not serve: float64, mixed dtypes, empty problems."""
        return (q.dtype == torch.float64 or k.dtype != q.dtype or v.dtype != q.dtype
                or q.numel() == 0 or k.shape[2] == 0)

    def attention_forward(self, q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa):
        """``(out, lse)``: out in q's dtype ``[B, H, S_q, Dv]``, lse float32 ``[B, H, S_q]`` (``-inf``: no key)."""
        if self._unsupported(q, k, v):
            from attnpass.kernels import reference

            out, lse = reference.attention_forward(q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa)
            return out, lse.to(torch.float32)
        p = _Problem(q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, self.interpreted)
        out = torch.empty((p.B, p.H, p.S_q, p.DV), dtype=q.dtype, device=q.device)
        lse = torch.empty((p.B, p.H, p.S_q), dtype=torch.float32, device=q.device)
        ptrs, strides = self._inputs(p)
        args = (*ptrs, out, lse, *strides, *out.stride(), *self._sizes(p))
        self._launch("fwd", self._k.fwd_tuned, self._k.fwd_kernel, p.S_q, p.B * p.H, args, p.common_flags())
        return out, lse

    def attention_backward(self, grad_out, q, k, v, attn_mask, out, lse, is_causal, scale, ssmax_s, ssmax_b, softcap,
                           enable_gqa, need_mask_grad=True):
        """``(dq, dk, dv, dmask | None, ds | None, db | None)``, each shaped and typed like its input."""
        if self._unsupported(q, k, v):
            from attnpass.kernels import reference

            return reference.attention_backward(grad_out, q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b,
                                                softcap, enable_gqa)
        p = _Problem(q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, self.interpreted)
        dev = q.device
        do = grad_out.detach().to(q.dtype)
        out = out.detach()
        lse = lse.detach().to(torch.float32).contiguous()

        delta = torch.empty((p.B, p.H, p.S_q), dtype=torch.float32, device=dev)
        self._k.delta_kernel[(triton_cdiv(p.S_q, 32), p.B * p.H)](
            out, do, delta, *out.stride(), *do.stride(), p.H, p.S_q, p.DV, BLOCK_M=32, DV_PAD=p.dv_pad,
        )
        ptrs, strides = self._inputs(p)
        flags = p.common_flags()
        sizes = self._sizes(p)

        dq = torch.empty((p.B, p.H, p.S_q, p.D), dtype=q.dtype, device=dev)
        dfac_logn = dfac = p.dummy
        if p.ssmax:
            dfac_logn = torch.empty((p.B, p.H, p.S_q), dtype=torch.float32, device=dev)
            dfac = torch.empty_like(dfac_logn)
        self._launch("dq", self._k.bwd_dq_tuned, self._k.bwd_dq_kernel, p.S_q, p.B * p.H,
                     (*ptrs, do, lse, delta, dq, dfac_logn, dfac, *strides, *do.stride(), *dq.stride(), *sizes), flags)

        # A K/V shared across the batch gets one gradient slice per query batch, summed below.
        kv_dtype = k.dtype if k.shape[0] == p.B else torch.float32
        dk = torch.empty((p.B, p.HK, p.S_k, p.D), dtype=kv_dtype, device=dev)
        dv = torch.empty((p.B, p.HK, p.S_k, p.DV), dtype=kv_dtype, device=dev)
        want_dmask = p.mask_kind == 2 and need_mask_grad
        # The kernel writes a mask gradient for every float mask; one that needs none (a padding mask) is
        # handed the row-summed [B, H, 1, S_k] form, so no [B, H, S_q, S_k] buffer is ever allocated.
        row_bcast = p.mask_kind == 2 and ((p.mask4.shape[2] == 1 and p.S_q > 1) or not need_mask_grad)
        if p.mask_kind == 2:
            dmask = torch.zeros((p.B, p.H, 1 if row_bcast else p.S_q, p.S_k), dtype=torch.float32, device=dev)
        else:
            dmask = torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=dev)
        self._launch("dkdv", self._k.bwd_dkdv_tuned, self._k.bwd_dkdv_kernel, p.S_k, p.B * p.HK,
                     (*ptrs, do, lse, delta, dk, dv, dmask, *strides, *do.stride(), *dk.stride(), *dv.stride(),
                      *dmask.stride(), *sizes), {**flags, "ROW_BCAST": row_bcast})

        if k.shape[0] != p.B:
            dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
        grad_mask = None
        if want_dmask:
            grad_mask = dmask.sum_to_size(p.mask4.shape).reshape(attn_mask.shape).to(attn_mask.dtype)
        ds = db = None
        if p.ssmax:
            ds = _per_head(dfac_logn, ssmax_s)
            if ssmax_b is not None:
                db = _per_head(dfac, ssmax_b)
        return dq, dk.to(k.dtype), dv.to(v.dtype), grad_mask, ds, db


def _per_head(per_row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a ``[B, H, S_q]`` row gradient to ``s``/``b``'s shape (one per head, or one shared)."""
    g = per_row.sum((0, 2))
    if like.numel() == 1:
        g = g.sum()
    return g.reshape(like.shape).to(like.dtype)


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division (``triton.cdiv`` without importing Triton where it may be missing)."""
    return -(-a // b)
