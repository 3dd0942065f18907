"""``torch.ops.attnpass.softmax_topk``: softmax followed by top-k in one pass, the rewrite target for routers and heads.

``softmax(x, dim).topk(k, dim)`` reads and writes a full-size probability tensor and then reads
it again; the fused op reads ``x`` once (running maximum, running normaliser with rescale,
running top-k; Milakov & Gimelshein 2018) and writes only ``k`` values and indices per row.
Registering through ``torch.library`` gives it a fake implementation (torch.compile,
torch.export) and an autograd formula, so a rewritten MoE router still trains.  On CPU the
compiled kernel library registers C++ kernels for both ops and for autograd once it is loaded
(``attnpass/kernels/cpu/topk_op.h``), the same computation without Python per call; the Python
implementations below stay for other devices, for the first call and for a forced reference.

Numerics (docs/numerics.md): probabilities within 1e-6 of float64 for float32 input; indices
are ``torch.topk``'s on the logits, NaN ranking above every number, ties going to the lower
index (``torch.topk`` leaves the order among ties unspecified); a row holding a NaN has NaN
probabilities, as its softmax does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnpass.kernels import topk as topk_kernels
from attnpass.kernels.cpu import topk as cpu_topk


def _check(x: Tensor, k: int, dim: int) -> int:
    """The axis as a non-negative int; errors say what is wrong with which argument."""
    if not x.is_floating_point():
        raise TypeError(f"attnpass.softmax_topk: x must be floating point; got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("attnpass.softmax_topk: x must have at least one dimension; got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"attnpass.softmax_topk: dim {dim} is out of range for x of shape {tuple(x.shape)}")
    dim = dim % x.dim()
    if not 0 <= k <= x.shape[dim]:
        raise ValueError(f"attnpass.softmax_topk: k={k} must be in [0, {x.shape[dim]}] (the size of dim {dim} of x"
                         f"{tuple(x.shape)})")
    return dim


def _rows(x: Tensor, dim: int) -> Tensor:
    """``x`` as ``[rows, n]`` contiguous with ``dim`` last (a copy only when ``dim`` is not already last)."""
    if dim == x.dim() - 1:  # the usual case, in as few tensor ops as possible: a router's whole call is tens of us
        return x.reshape(-1, x.shape[-1]).contiguous()
    return x.movedim(dim, -1).reshape(-1, x.shape[dim]).contiguous()


def _unrows(t: Tensor, x: Tensor, dim: int) -> Tensor:
    """Inverse of ``_rows`` for a ``[rows, m]`` result: back to ``x``'s shape with ``m`` along ``dim``."""
    if dim == x.dim() - 1:
        return t.reshape(*x.shape[:-1], t.shape[-1]).contiguous()
    lead = x.movedim(dim, -1).shape[:-1]
    return t.reshape(*lead, t.shape[-1]).movedim(-1, dim).contiguous()


def _softmax_topk_impl(x: Tensor, k: int, dim: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """The op's real implementation, shared by the op and by ``softmax_topk``'s eager shortcut."""
    d = _check(x, k, dim)
    if k == 0 or x.numel() == 0:
        shape = list(x.shape)
        shape[d] = k
        return x.new_empty(shape), torch.empty(shape, dtype=torch.int64, device=x.device)
    probs, indices = topk_kernels.forward(_rows(x, d), k, renormalize)
    return _unrows(probs, x, d), _unrows(indices, x, d)


@torch.library.custom_op("attnpass::softmax_topk", mutates_args=())
def _softmax_topk(x: Tensor, k: int, dim: int = -1, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    return _softmax_topk_impl(x, k, dim, renormalize)


@_softmax_topk.register_fake
def _softmax_topk_fake(x, k, dim=-1, renormalize=False):
    d = _check(x, k, dim)
    shape = list(x.shape)
    shape[d] = k
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("attnpass::softmax_topk_backward", mutates_args=())
def _softmax_topk_backward(grad: Tensor, x: Tensor, indices: Tensor, dim: int, renormalize: bool) -> Tensor:
    d = dim % x.dim()
    if indices.shape[d] == 0 or x.numel() == 0:
        return torch.zeros_like(x)
    dx = topk_kernels.backward(_rows(grad, d), _rows(x, d), _rows(indices, d), renormalize)
    return _unrows(dx, x, d)


@_softmax_topk_backward.register_fake
def _softmax_topk_backward_fake(grad, x, indices, dim, renormalize):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, k, dim, renormalize = inputs
    _, indices = output
    ctx.mark_non_differentiable(indices)
    # x, not probs: the backward recomputes the probabilities in float32 from the logits, which
    # keeps bf16 training exact to float32 and keeps the op's outputs to the two the rewrite uses.
    ctx.save_for_backward(x, indices)
    ctx.dim, ctx.renormalize = dim, renormalize


def _backward(ctx, grad_probs, grad_indices):
    x, indices = ctx.saved_tensors
    if grad_probs is None:
        return None, None, None, None
    return _softmax_topk_backward(grad_probs.contiguous(), x, indices, ctx.dim, ctx.renormalize), None, None, None


_softmax_topk.register_autograd(_backward, setup_context=_setup_context)
_OP = torch.ops.attnpass.softmax_topk.default


def softmax_topk(x: Tensor, k: int, dim: int = -1, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """``softmax(x, dim).topk(k, dim)`` as ``(probs, indices)`` in one pass over ``x``.

    With ``renormalize`` the ``k`` probabilities are divided by their sum (Mixtral-style
    router weights), which equals the softmax over the selected logits.  Indices are int64,
    sorted by decreasing probability; ties go to the lower index and NaN ranks first (see
    the module docstring).  Gradients flow to ``x`` through the returned probabilities.
    """
    if x.is_cpu and cpu_topk.dispatching():  # the op is C++ all the way: nothing to skip
        return _OP(x, k, dim, renormalize)
    if _plain_eager(x):
        return _softmax_topk_impl(x, k, dim, renormalize)
    return _OP(x, k, dim, renormalize)


def _plain_eager(x: Tensor) -> bool:
    """Whether calling the implementation directly is indistinguishable from calling the op.

    The op's Python dispatch (custom op, autograd wrapper) costs tens of microseconds per call, as much as a
    router-sized kernel (on CPU, once the C++ kernels are loaded, they are the op's own kernels and there is no
    Python dispatch left: ``attnpass.kernels.cpu.topk``); it is skipped only for a plain CPU/CUDA tensor that needs no gradient, outside
    torch.compile, dispatch or function modes (make_fx, FakeTensorMode) and functorch transforms (vmap), so
    every tracer and every gradient still sees the op.
    """
    return (type(x) is torch.Tensor and x.device.type in ("cpu", "cuda")
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))
