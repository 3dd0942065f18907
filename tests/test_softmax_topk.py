"""``attnpass.softmax_topk``: the op against float64 eager softmax + topk, its gradient, compile and export.

The op runs whichever implementation ``attnpass.kernels.topk`` picks for CPU tensors (the C++
kernel when it builds); ``tests/test_kernel_topk.py`` checks each kernel against the reference
directly.
"""

from __future__ import annotations

import pytest
import torch

import attnpass
from attnpass.kernels import reference


def _eager(x: torch.Tensor, k: int, dim: int = -1, renormalize: bool = False):
    """Float64 ``softmax(x).topk(k)``: the meaning the op must reproduce."""
    p, i = torch.softmax(x.double(), dim).topk(k, dim)
    if renormalize:
        p = p / p.sum(dim, keepdim=True)
    return p, i


def _logits(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Random logits with no ties (a permutation scaled), so the top-k indices are unique."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(max(1, torch.Size(shape[:-1]).numel()))])
    x = perm.reshape(shape).to(torch.float64) * (8.0 / n) + 0.001 * torch.rand(shape, generator=g, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("shape,k", [((3, 17), 1), ((5, 100), 8), ((2, 3, 200), 64), ((4, 8), 2)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_matches_float64_eager(shape, k, renormalize):
    x = _logits(*shape)
    probs, idx = attnpass.softmax_topk(x, k, renormalize=renormalize)
    want_p, want_i = _eager(x, k, renormalize=renormalize)
    assert probs.dtype == x.dtype and idx.dtype == torch.int64 and probs.shape == want_p.shape
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(probs.double(), want_p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims(dim):
    x = _logits(6, 40, 5, seed=1).movedim(-1, 1).contiguous()  # ties-free along every axis after the scale
    x = x + 1e-3 * torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape).sin()
    probs, idx = attnpass.softmax_topk(x, 3, dim=dim)
    want_p, want_i = _eager(x, 3, dim=dim)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(probs.double(), want_p, rtol=0, atol=1e-6)


def test_reference_matches_float64_eager():
    x = _logits(7, 300, seed=2)
    for k, renorm in ((1, False), (50, False), (8, True)):
        p, i = reference.softmax_topk(x, k, renormalize=renorm)
        want_p, want_i = _eager(x, k, renormalize=renorm)
        assert torch.equal(i, want_i)
        torch.testing.assert_close(p.double(), want_p, rtol=0, atol=1e-6)


def test_ties_go_to_the_lower_index_and_nan_ranks_first():
    """Documents the tie rule: equal logits are taken lowest index first (``torch.topk``'s order among ties is
    unspecified, so only the values are compared with it); NaN ranks above every number and its row is NaN."""
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [0.0] * 6])
    probs, idx = attnpass.softmax_topk(x, 3)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(probs, torch.softmax(x, -1).topk(3).values)
    nan = torch.tensor([[1.0, float("nan"), 3.0, float("nan"), 0.5]])
    p_nan, i_nan = attnpass.softmax_topk(nan, 3)
    assert i_nan.tolist() == [[1, 3, 2]] == torch.topk(nan, 3).indices.tolist()
    assert torch.isnan(p_nan).all()


def test_gradcheck():
    x = _logits(3, 12, seed=3, dtype=torch.float64).requires_grad_()
    for renorm in (False, True):
        assert torch.autograd.gradcheck(lambda t, r=renorm: attnpass.softmax_topk(t, 4, -1, r)[0], (x,))
    xd = _logits(5, 4, seed=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: attnpass.softmax_topk(t, 2, 0)[0], (xd,))


@pytest.mark.parametrize("renormalize", [False, True])
def test_gradient_matches_eager_autograd(renormalize):
    x = _logits(4, 64, seed=5).requires_grad_()
    g = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    (dx,) = torch.autograd.grad(attnpass.softmax_topk(x, 8, renormalize=renormalize)[0], x, g)
    want_p, _ = _eager(x, 8, renormalize=renormalize)
    (want,) = torch.autograd.grad(want_p, x, g.double())
    torch.testing.assert_close(dx.double(), want.double(), rtol=0, atol=1e-6)


def test_bad_arguments_are_named():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="k=6"):
        attnpass.softmax_topk(x, 6)
    with pytest.raises(IndexError, match="dim 2"):
        attnpass.softmax_topk(x, 1, dim=2)
    with pytest.raises(TypeError, match="floating"):
        attnpass.softmax_topk(torch.ones(2, 5, dtype=torch.int64), 1)


class _Router(torch.nn.Module):
    """A MoE router's gate: linear, then softmax + top-k with renormalised weights."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(16, 8, bias=False)

    def forward(self, h: torch.Tensor):
        return attnpass.softmax_topk(self.gate(h), 2, -1, True)


@pytest.fixture(scope="module")
def router():
    torch.manual_seed(0)
    return _Router()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(router, backend):
    h = torch.randn(10, 16)
    compiled = torch.compile(router, fullgraph=True, backend=backend)
    (p, i), (wp, wi) = compiled(h), router(h)
    assert torch.equal(i, wi)
    torch.testing.assert_close(p, wp)


def test_export(router):
    h = torch.randn(10, 16)
    ep = torch.export.export(router, (h,))
    assert any("softmax_topk" in str(n.target) for n in ep.graph.nodes)
    (p, i), (wp, wi) = ep.module()(h), router(h)
    assert torch.equal(i, wi)
    torch.testing.assert_close(p, wp)


def test_compiled_training_step_matches_eager(router):
    """The router trains through torch.compile: the op's autograd formula and its backward op's fake both hold."""
    h = torch.randn(12, 16, generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(router, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (router, compiled):
        router.zero_grad()
        p, _ = fn(h)
        (p * torch.arange(1.0, 3.0)).sum().backward()
        grads.append(router.gate.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_eager_shortcut_and_every_tracer_still_sees_the_op():
    """``attnpass.softmax_topk`` skips the op's Python dispatch for a plain tensor needing no gradient (same
    answer); make_fx, vmap and autograd still go through the op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(11))
    p, i = attnpass.softmax_topk(x, 4, -1, True)
    wp, wi = torch.ops.attnpass.softmax_topk(x, 4, -1, True)
    assert torch.equal(i, wi) and torch.equal(p, wp)
    gm = make_fx(lambda t: attnpass.softmax_topk(t, 4))(x)
    assert any(n.target is torch.ops.attnpass.softmax_topk.default for n in gm.graph.nodes)
    vp, vi = torch.vmap(lambda t: attnpass.softmax_topk(t, 4))(x)
    assert torch.equal(vi, attnpass.softmax_topk(x, 4)[1])
    xg = x.clone().requires_grad_(True)
    attnpass.softmax_topk(xg, 4)[0].sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
