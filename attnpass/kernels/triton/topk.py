"""The Triton ``softmax_topk`` kernels (``topk_kernels.py``) and their launch.

``load()`` follows ``attnpass.kernels.triton.load``: compiled kernels when CUDA is available,
the interpreter variant when ``TRITON_INTERPRET=1`` is set; ``load_interpreted()`` always
gives the interpreter variant (CPU tensors), which is how the tests run the exact Triton code
on a CPU-only machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnpass.kernels import triton as triton_kernels

_SOURCE = Path(__file__).with_name("topk_kernels.py")
_kernels: dict[bool, TritonTopK | None] = {}

#: Elements per program tile: enough to keep a wide row streaming, small enough for registers.
_TILE = 4096
#: Programs that keep a large GPU busy (about two per SM of an H100/H200); fewer rows than this are split.
_PROGRAMS = 264
#: At most this many chunks per row (the merge holds ``splits * K_PAD`` keys per row).
_MAX_SPLITS = 64


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonTopK:
    """Row kernels behind ``attnpass::softmax_topk`` on CUDA (or interpreted on CPU tensors)."""

    name = "triton"

    def __init__(self, module) -> None:
        self._mod = module
        self.interpreted = bool(module.INTERPRET)

    def _tiles(self, rows: int, n: int, k: int) -> tuple[int, int, int]:
        """``(ROWS, BLOCK, K_PAD)``: short rows (routers) are batched several to a program, long ones walked in tiles."""
        k_pad = _pow2(k)
        block = max(min(_pow2(n), 1024 if self.interpreted else _TILE), k_pad)
        rows_per = max(1, min(_TILE // block, _pow2(rows)))
        return rows_per, block, k_pad

    def _emulate(self, x: torch.Tensor) -> bool:
        """Round fp32 -> bf16 to nearest in-kernel: the interpreter would truncate (see ``topk_kernels._round``)."""
        return self.interpreted and x.dtype == torch.bfloat16

    def splits(self, rows: int, n: int, k: int) -> int:
        """Chunks per row: enough programs to fill the GPU (about 2 per SM of a large part) when rows are few and long."""
        rows_per, block, _ = self._tiles(rows, n, k)
        programs = triton_kernels.triton_cdiv(rows, rows_per)
        if programs >= _PROGRAMS or n < 4 * block:
            return 1
        return max(1, min(triton_kernels.triton_cdiv(n, 2 * block), triton_kernels.triton_cdiv(_PROGRAMS, programs), _MAX_SPLITS))

    def softmax_topk_forward(self, x: torch.Tensor, k: int, renormalize: bool,
                             splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, indices)`` for ``x`` ``[rows, n]`` contiguous fp32/bf16/fp16, ``1 <= k <= 64``.

        ``splits`` (default: ``self.splits``) cuts each row into that many chunks walked by separate
        programs and combined by a second, small kernel (the online normaliser's partials merge exactly).
        """
        rows, n = x.shape
        probs = x.new_empty((rows, k))
        idx = torch.empty((rows, k), dtype=torch.int64, device=x.device)
        rows_per, block, k_pad = self._tiles(rows, n, k)
        n_split = max(1, min(self.splits(rows, n, k) if splits is None else splits, triton_kernels.triton_cdiv(n, block)))
        chunk = triton_kernels.triton_cdiv(triton_kernels.triton_cdiv(n, n_split), block) * block
        n_split = triton_kernels.triton_cdiv(n, chunk)
        flags = dict(RENORM=bool(renormalize), EMULATE=self._emulate(x), K_PAD=k_pad)
        programs = triton_kernels.triton_cdiv(rows, rows_per)
        if n_split == 1:
            self._mod.softmax_topk_fwd[(programs, 1)](x, probs, idx, x, x, idx, rows, n, k, n, 1, SPLIT=False,
                                                       ROWS=rows_per, BLOCK=block, **flags)
            return probs, idx
        part_m = torch.empty((rows, n_split), dtype=torch.float32, device=x.device)
        part_s = torch.empty_like(part_m)
        part_key = torch.empty((rows, n_split, k_pad), dtype=torch.int64, device=x.device)
        self._mod.softmax_topk_fwd[(programs, n_split)](x, probs, idx, part_m, part_s, part_key, rows, n, k, chunk, n_split,
                                                         SPLIT=True, ROWS=rows_per, BLOCK=block, **flags)
        self._mod.softmax_topk_merge[(rows,)](x, probs, idx, part_m, part_s, part_key, rows, n, k, n_split, ROWS=1,
                                              SPLIT_PAD=_pow2(n_split), **flags)
        return probs, idx

    def softmax_topk_backward(self, grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                              renormalize: bool) -> torch.Tensor:
        """``dx`` ``[rows, n]`` in x's dtype from ``grad`` ``[rows, k]``."""
        rows, n = x.shape
        k = indices.shape[1]
        dx = torch.empty_like(x)
        rows_per, block, k_pad = self._tiles(rows, n, k)
        grid = (triton_kernels.triton_cdiv(rows, rows_per),)
        self._mod.softmax_topk_bwd[grid](grad.contiguous(), x, indices.contiguous(), dx, rows, n, k, RENORM=bool(renormalize), EMULATE=self._emulate(x),
                                         ROWS=rows_per, BLOCK=block, K_PAD=k_pad)
        return dx


def _kernel(interpret: bool) -> TritonTopK | None:
    if interpret not in _kernels:
        mod = triton_kernels.exec_kernel_source(_SOURCE, interpret)
        _kernels[interpret] = None if mod is None else TritonTopK(mod)
    return _kernels[interpret]


def load() -> TritonTopK | None:
    """The kernel for CUDA tensors (the interpreter one under ``TRITON_INTERPRET=1``), or None."""
    if not triton_kernels._triton_importable():
        return None
    if triton_kernels._interpret_requested():
        return _kernel(True)
    return _kernel(False) if torch.cuda.is_available() else None


def load_interpreted() -> TritonTopK | None:
    """The interpreter variant whatever the machine (CPU tensors in and out); None without Triton."""
    return _kernel(True) if triton_kernels._triton_importable() else None
