"""Fused attention kernels and the choice between them.

``forward``/``backward`` pick the fastest implementation available for the tensors'
device (compiled CPU kernel, Triton on CUDA) and fall back to the blocked reference,
so callers never need to know which one ran; ``active_backend`` says which did.
"""

from __future__ import annotations

from typing import Protocol

import torch

from attnpass.kernels import reference


class Backend(Protocol):
    """What a kernel implementation provides; ``reference`` is the model implementation."""

    def attention_forward(self, q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa): ...

    def attention_backward(self, grad_out, q, k, v, attn_mask, out, lse, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa,
                           need_mask_grad=True): ...


class _Reference:
    """Adapter so the reference has the same signature as the compiled kernels."""

    name = "reference"

    @staticmethod
    def attention_forward(q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa):
        return reference.attention_forward(q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa)

    @staticmethod
    def attention_backward(grad_out, q, k, v, attn_mask, out, lse, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa,
                           need_mask_grad=True):
        return reference.attention_backward(grad_out, q, k, v, attn_mask, is_causal, scale, ssmax_s, ssmax_b, softcap, enable_gqa)


REFERENCE = _Reference()
_forced: str | None = None


def force_backend(name: str | None) -> None:
    """Pin the backend (``"reference"`` or a kernel's name) for tests and benchmarks; None restores the default."""
    global _forced
    _forced = name
    from attnpass.kernels.cpu import topk as cpu_topk

    cpu_topk.sync_dispatch()  # the softmax_topk ops' C++ CPU kernels bypass this module: hand them back to Python


def backend_for(device: torch.device) -> Backend:
    """The implementation used for tensors on ``device``."""
    if _forced == "reference":
        return REFERENCE
    kernel = None
    if device.type == "cpu":
        from attnpass.kernels import cpu

        kernel = cpu.load()
    elif device.type == "cuda":
        from attnpass.kernels import triton as triton_kernels

        kernel = triton_kernels.load()
    # A forced name must be the kernel that runs: forcing "triton" must not hand back the CPU kernel.
    if kernel is not None and _forced in (None, _name(kernel, device)):
        return kernel
    if _forced is not None:
        raise RuntimeError(f"attnpass: kernel backend {_forced!r} is not available on {device}")
    return REFERENCE


def _name(kernel: Backend, device: torch.device) -> str:
    """A kernel's ``name``, defaulting to its family (``cpu`` or ``triton``) rather than to ``reference``."""
    return getattr(kernel, "name", "cpu" if device.type == "cpu" else "triton")


def active_backend(device: torch.device | str = "cpu") -> str:
    """Name of the implementation that ``attnpass::attention`` runs on ``device``."""
    dev = torch.device(device)
    return _name(backend_for(dev), dev)
