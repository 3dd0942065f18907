"""The compiled CPU ``softmax_topk`` kernel (``topk.cpp``), built and cached like the attention kernel.

A separate library from ``attention.cpp``, so that editing one does not rebuild the other and a
build failure of one leaves the other usable.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from attnpass.kernels import cpu

_SOURCE = Path(__file__).with_name("topk.cpp")
_lock = threading.Lock()
_loaded: dict[str, CpuTopK | None] = {}


class CpuTopK:
    """Row kernels behind ``attnpass::softmax_topk`` on CPU; same signatures as ``attnpass.kernels.topk``'s reference calls."""

    name = "cpu"

    def __init__(self, ops: object, capability: str) -> None:
        self._ops = ops
        self.capability = capability

    def softmax_topk_forward(self, x: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, indices)`` for ``x`` ``[rows, n]`` contiguous fp32/bf16/fp16, ``1 <= k <= 64``."""
        return self._ops.softmax_topk_forward(x, k, bool(renormalize))

    def softmax_topk_backward(self, grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                              renormalize: bool) -> torch.Tensor:
        """``dx`` ``[rows, n]`` in x's dtype; ``grad`` is cast to x's dtype (the op's probs already are)."""
        return self._ops.softmax_topk_backward(grad.to(x.dtype).contiguous(), x, indices.contiguous(), bool(renormalize))


def load(capability: str | None = None) -> CpuTopK | None:
    """The kernel for ``capability`` (default: this machine's), or None with one warning if it cannot be built."""
    cap = capability or cpu.machine_capability()
    if cap in _loaded:
        return _loaded[cap]
    with _lock:
        if cap not in _loaded:
            try:
                _loaded[cap] = CpuTopK(cpu.compile_library(_SOURCE, "attnpass_topk", cap), cap)
            except Exception as exc:  # a missing compiler must not break attnpass: the reference runs
                _loaded[cap] = None
                warnings.warn(f"attnpass: the C++ CPU softmax_topk kernel ({cap}) could not be built, using the "
                              f"reference instead: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
    return _loaded[cap]
