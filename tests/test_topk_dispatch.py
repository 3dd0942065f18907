"""``attnpass::softmax_topk`` on CPU runs C++ kernels registered by the compiled library (no Python per call):
the same results, gradients and errors as the op's Python implementation, traced the same, and handed back to
Python when the reference backend is forced."""

from __future__ import annotations

import pytest
import torch

import attnpass
from attnpass import kernels
from attnpass.kernels import topk as topk_dispatch
from attnpass.kernels.cpu import topk as cpu_topk
from attnpass.lowering import topk_ops
from tests.topk_modules import Router

OP = torch.ops.attnpass.softmax_topk.default
BWD = torch.ops.attnpass.softmax_topk_backward.default


@pytest.fixture(scope="module", autouse=True)
def cpp_dispatch():
    """The library loaded by a first call; every test here starts and ends with the C++ kernels registered."""
    attnpass.softmax_topk(torch.randn(2, 8), 2)
    if cpu_topk._loaded.get(kernels.cpu.machine_capability()) is None:
        pytest.fail("the C++ softmax_topk kernel did not build on this machine")
    cpu_topk.sync_dispatch()
    assert cpu_topk.dispatching()
    yield
    cpu_topk.sync_dispatch()


@pytest.fixture
def no_python(monkeypatch):
    """Make the op's Python implementation and kernel choice fail: whatever still works never entered them."""
    def boom(*args, **kwargs):
        raise AssertionError("the op's Python implementation ran")

    monkeypatch.setattr(topk_ops, "_softmax_topk_impl", boom)
    monkeypatch.setattr(topk_dispatch, "forward", boom)
    monkeypatch.setattr(topk_dispatch, "backward", boom)


def _both(fn):
    """``fn()`` with the op's Python implementation, then with the C++ kernels."""
    cpu_topk.set_dispatch(False)
    try:
        py = fn()
    finally:
        cpu_topk.set_dispatch(True)
    return py, fn()


# kernel cases (fp32, bf16; k <= 64; any axis) and the reference's (float64, k above 64, k = 0)
CASES = [(torch.float32, -1, 2, True), (torch.float32, 0, 3, False), (torch.bfloat16, 1, 5, True),
         (torch.float64, -1, 4, False), (torch.float32, -1, 70, True), (torch.float32, 1, 0, False)]


@pytest.mark.parametrize("dtype,dim,k,renormalize", CASES)
def test_cpp_kernels_equal_the_python_implementation(dtype, dim, k, renormalize):
    x = torch.randn(3, 6, 80, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 0, 7] = x[0, 0, 9] = x[0, 0, 11] = 4.0  # ties: the lower index first on both paths
    (wp, wi), (p, i) = _both(lambda: OP(x, k, dim, renormalize))
    assert torch.equal(i, wi) and torch.equal(p, wp) and p.stride() == wp.stride()
    if k == 0:
        return
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    want, got = _both(lambda: BWD(g, x, wi, dim, renormalize))
    assert torch.equal(got, want)

    def grad():
        xg = x.clone().requires_grad_()
        (OP(xg, k, dim, renormalize)[0] * g).sum().backward()
        return xg.grad

    assert torch.equal(grad(), want)  # through the C++ autograd kernel, the backward op's C++ kernel


def test_errors_read_the_same():
    x = torch.randn(3, 10)
    for args, error in (((x, 11, -1), ValueError), ((x, 1, 2), IndexError), ((x.long(), 1, -1), TypeError),
                        ((torch.tensor(1.0), 1, 0), ValueError)):
        said = []
        for on in (False, True):
            cpu_topk.set_dispatch(on)
            with pytest.raises(error) as caught:
                OP(*args, False)
            said.append(str(caught.value).splitlines()[0])
        assert said[0] == said[1], said


def test_no_python_on_the_call_path(no_python):
    """Eager calls, gradients and a rewritten fx graph all run with the Python implementation broken."""
    x = torch.randn(5, 8)
    p, i = attnpass.softmax_topk(x, 2, -1, True)
    assert p.shape == (5, 2) and torch.equal(i, torch.softmax(x, -1).topk(2).indices)
    xg = x.clone().requires_grad_()
    attnpass.softmax_topk(xg, 2)[0].sum().backward()
    assert xg.grad.abs().sum() > 0
    m, h = Router().eval(), torch.randn(6, 16)
    gm = attnpass.fuse(m, (h,))
    assert any(n.target is OP for n in gm.graph.nodes)
    (got_w, got_i), (want_w, want_i) = gm(h), m(h)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-6)


def test_forcing_the_reference_hands_the_op_back_to_python(monkeypatch):
    calls = []
    real = topk_dispatch.forward
    monkeypatch.setattr(topk_dispatch, "forward", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(4, 30)
    OP(x, 3, -1, False)
    assert calls == []  # C++ only
    kernels.force_backend("reference")
    try:
        assert not cpu_topk.dispatching()
        OP(x, 3, -1, False)
        assert len(calls) == 1 and topk_dispatch.active_backend(x, 3) == "reference"
    finally:
        kernels.force_backend(None)
    assert cpu_topk.dispatching()
