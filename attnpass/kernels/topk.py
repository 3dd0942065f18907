"""Which implementation runs ``attnpass::softmax_topk``: the C++ kernel on CPU, Triton on CUDA, else the reference.

The kernels see rows only: ``x`` as ``[rows, n]`` contiguous with the softmax axis last; the
op (``attnpass.lowering.topk_ops``) moves the axis there and back.  A kernel that cannot be
loaded, or a problem outside what the kernels handle (k above ``MAX_K``, a dtype they do not
take), runs the reference instead; the first fallback for a missing kernel says so once.
"""

from __future__ import annotations

import warnings

import torch

from attnpass.kernels import reference

#: The running top-k lives in a small sorted buffer per row; beyond this the reference (a sort) runs.
MAX_K = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned: set[str] = set()


def _kernel_for(x: torch.Tensor, k: int):
    """The kernel object for ``x``'s device, or None for the reference."""
    from attnpass import kernels

    if kernels._forced == "reference" or k > MAX_K or k < 1 or x.dtype not in _DTYPES or x.shape[-1] == 0:
        return None
    kernel = None
    if x.device.type == "cpu":
        from attnpass.kernels import cpu

        kernel = cpu.load_topk()
        family = "cpu"
    elif x.device.type == "cuda":
        from attnpass.kernels.triton import topk as triton_topk

        kernel = triton_topk.load()
        family = "triton"
    else:
        return None
    if kernel is None and family not in _warned:
        _warned.add(family)
        warnings.warn(f"attnpass: the {family} softmax_topk kernel is unavailable on {x.device}; using the reference",
                      RuntimeWarning, stacklevel=3)
    return kernel


def active_backend(x: torch.Tensor, k: int) -> str:
    """Name of what ``softmax_topk`` runs for ``x`` and ``k`` (``"cpu"``, ``"triton"`` or ``"reference"``)."""
    kernel = _kernel_for(x, k)
    return "reference" if kernel is None else kernel.name


def forward(x: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [rows, k] in x's dtype, indices [rows, k] int64)`` for ``x`` ``[rows, n]`` contiguous."""
    kernel = _kernel_for(x, k)
    if kernel is None:
        return reference.softmax_topk(x, k, -1, renormalize)
    return kernel.softmax_topk_forward(x, k, renormalize)


def backward(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """``dx [rows, n]`` in x's dtype from ``grad [rows, k]``."""
    kernel = _kernel_for(x, indices.shape[-1])
    if kernel is None:
        return reference.softmax_topk_backward(grad, x, indices, -1, renormalize)
    return kernel.softmax_topk_backward(grad, x, indices, renormalize)
