"""The compiled CPU ``softmax_topk`` kernel (``topk.cpp``), built and cached like the attention kernel.

A separate library from ``attention.cpp``, so that editing one does not rebuild the other and a
build failure of one leaves the other usable.

Once this machine's library is loaded it also becomes the CPU (and AutogradCPU) kernel of the
``attnpass::softmax_topk`` ops themselves (``topk_op.h``): the first CPU call runs the op's Python
implementation, which loads it, and every later call, from eager code or from an fx / compiled
graph, runs C++ only.  ``sync_dispatch`` hands the op back to Python while the reference backend is
forced, and ``set_dispatch`` lets a test simulate a machine where the library could not be built.
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
_dispatching = False


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

    def register_ops(self, on: bool) -> bool:
        """Make this library the attnpass ops' CPU kernels (``on``) or give them back to Python; returns the state."""
        return bool(self._ops.set_dispatch(torch.empty(0), bool(on)))


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
            if cap == cpu.machine_capability():  # only the machine's variant may take the op
                sync_dispatch()
    return _loaded[cap]


def dispatching() -> bool:
    """Whether ``attnpass::softmax_topk`` on CPU runs the C++ kernels directly (no Python on the call path)."""
    return _dispatching


def set_dispatch(on: bool) -> bool:
    """Register (``on``) or remove this machine's C++ kernels as the ops' CPU kernels; returns the previous state.

    Only a loaded library can be registered: ``on`` before the first CPU call changes nothing.
    """
    global _dispatching
    before = _dispatching
    kernel = _loaded.get(cpu.machine_capability())
    if kernel is not None:
        _dispatching = kernel.register_ops(on)
    return before


def sync_dispatch() -> None:
    """The C++ kernels take the ops unless the reference backend is forced (``attnpass.kernels.force_backend``)."""
    from attnpass import kernels

    set_dispatch(kernels._forced != "reference")
