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

    def softmax_topk_forward(self, x: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, indices)`` for ``x`` ``[rows, n]`` contiguous fp32/bf16/fp16, ``1 <= k <= 64``."""
        rows, n = x.shape
        probs = x.new_empty((rows, k))
        idx = torch.empty((rows, k), dtype=torch.int64, device=x.device)
        rows_per, block, k_pad = self._tiles(rows, n, k)
        grid = (triton_kernels.triton_cdiv(rows, rows_per),)
        self._mod.softmax_topk_fwd[grid](x, probs, idx, rows, n, k, RENORM=bool(renormalize), EMULATE=self._emulate(x), ROWS=rows_per, BLOCK=block,
                                         K_PAD=k_pad)
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
