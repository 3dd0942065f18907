"""The softmax_topk kernels (C++ on CPU, Triton interpreted on CPU tensors, Triton compiled on CUDA) against the reference.

Each kernel must give the reference's indices exactly (ties and NaN included: lower index first,
NaN ranking above every number), probabilities and gradients to float32 rounding, and round to
the input's dtype as the reference does for bf16/fp16.  The ``cuda`` target is marked ``gpu``;
``interp`` runs the same Triton source through the interpreter at smaller shapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

import attnpass
from attnpass import kernels
from attnpass.kernels import reference
from attnpass.kernels import topk as topk_dispatch
from attnpass.kernels.cpu import topk as cpu_topk
from attnpass.kernels.triton import topk as triton_topk

# The interpreter evaluates masked-off lanes too (numpy warns on their -inf - -inf) and the NaN rows on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


@dataclass
class Target:
    kernel: object
    device: str
    big: bool


@pytest.fixture(scope="module", params=["cpu", "interp", pytest.param("cuda", marks=pytest.mark.gpu)])
def target(request) -> Target:
    if request.param == "cpu":
        kernel = cpu_topk.load()
        assert kernel is not None, "the C++ softmax_topk kernel could not be built"
        return Target(kernel, "cpu", True)
    if request.param == "interp":
        kernel = triton_topk.load_interpreted()
        assert kernel is not None and kernel.interpreted, "Triton's interpreter softmax_topk kernel could not be built"
        return Target(kernel, "cpu", False)
    kernel = triton_topk.load()
    assert kernel is not None and not kernel.interpreted, "CUDA is present but the compiled Triton softmax_topk kernel is not"
    return Target(kernel, "cuda", True)


def _x(t: Target, rows: int, n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, n, generator=g)).to(device=t.device, dtype=dtype)


def _check(t: Target, x: torch.Tensor, k: int, renormalize: bool, seed: int = 1) -> None:
    """Forward and backward of the kernel against the reference on the same tensor."""
    probs, idx = t.kernel.softmax_topk_forward(x, k, renormalize)
    want_p, want_i = reference.softmax_topk(x, k, -1, renormalize)
    assert probs.dtype == x.dtype and idx.dtype == torch.int64
    assert torch.equal(idx, want_i)
    # reduced precision: one unit in the last place, as the two float32 values may differ by a float32 rounding
    # (exp(x - top) / sum against exp(x - lse) / sum) and round to neighbouring bf16/fp16 values
    tol = 1e-6 if x.dtype == torch.float32 else 0.0
    rtol = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps
    torch.testing.assert_close(probs.float(), want_p.float(), rtol=rtol, atol=tol, equal_nan=True)
    g = torch.randn(idx.shape, generator=torch.Generator().manual_seed(seed)).to(device=x.device, dtype=x.dtype)
    dx = t.kernel.softmax_topk_backward(g, x, idx, renormalize)
    want_dx = reference.softmax_topk_backward(g, x, idx, -1, renormalize)
    gtol = 2e-6 if x.dtype == torch.float32 else 1e-2 * max(1.0, want_dx.abs().max().item())
    torch.testing.assert_close(dx.float(), want_dx.float(), rtol=0, atol=gtol, equal_nan=True)


@pytest.mark.parametrize("n,k", [(8, 2), (64, 8), (256, 64), (5000, 1), (5000, 50)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fp32(target, n, k, renormalize):
    rows = 37 if target.big else 5
    if not target.big and n > 1000:
        rows = 2
    _check(target, _x(target, rows, n), k, renormalize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(target, dtype):
    for n, k in ((8, 2), (300, 8)):
        _check(target, _x(target, 4, n, dtype, seed=n), k, False)
        _check(target, _x(target, 4, n, dtype, seed=n + 1), k, True)


def test_ties_nan_and_infinities(target):
    """Ties lowest index first (bf16 makes many), NaN first and its row NaN, +inf and all -inf rows as softmax gives."""
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([
        [1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0, 1.0],
        [0.0] * 8,
        [1.0, nan, 3.0, nan, 0.5, -0.0, 0.0, 2.0],
        [-inf] * 8,
        [inf, 1.0, 2.0, 3.0, 4.0, inf, 0.0, -1.0],
        [-inf, -inf, 1.0, -inf, 0.0, -inf, -inf, -inf],
    ], device=target.device)
    for k in (1, 3, 5):
        for renorm in (False, True):
            _check(target, rows, k, renorm)
    wide = rows.repeat(1, 5)  # 40 wide: more than one vector, the short-row selection path of the C++ kernel
    for k in (1, 7, 16, 33):
        _check(target, wide, k, False)
    coarse = torch.randn(6, 3000, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(target.device)
    _check(target, coarse, 16, False)


def test_many_short_rows_ties_nan_and_infinities(target):
    """Router-shaped problems (many short rows: the C++ kernel's tiles, one row per vector lane, and a partial last
    tile): bf16 ties everywhere, where an entry pushed down the slots must keep its place ahead of an equal later
    one; and tiles holding a NaN, +inf, an all -inf row or fewer entries above -inf than k (redone row by row)."""
    rows = 83 if target.big else 21
    g = torch.Generator().manual_seed(7)
    # the C++ kernel keys bf16/fp16 tiles two ways: 16-bit transpose when a full tile's width is a multiple of 16
    widths = (24, 32) if target.big else (24,)
    g32 = torch.Generator().manual_seed(8)  # its own stream: the draws below stay as they were
    for dtype in (torch.bfloat16, torch.float16):
        for n in widths:
            coarse = torch.randn(rows, n, generator=g if n == 24 else g32).to(dtype).to(target.device)
            for k in (1, 2, 5, 8):
                _check(target, coarse, k, k == 2)
                _check(target, coarse, k, k != 2)
    nan, inf = float("nan"), float("inf")
    x = torch.randn(rows, 8, generator=g)
    x[rows // 2] = torch.tensor([1.0, nan, 3.0, nan, 0.5, -0.0, 0.0, 2.0])
    x[3] = torch.tensor([inf, 1.0, 2.0, 3.0, 4.0, inf, 0.0, -1.0])
    x[-1] = -inf
    x[-2] = torch.tensor([-inf, -inf, 1.0, -inf, 0.0, -inf, -inf, -inf])
    x[1, 2:6] = 0.75  # a tie in an ordinary row
    x[4] = torch.tensor([-1.0, -0.0, -2.0, 0.0, -0.0, -3.0, 0.0, -4.0])  # -0 and +0 are equal: lowest index first
    x[5], x[6] = x[-1], x[-2]  # the -inf rows in a full tile too
    for width in (8, 32) if target.big else (8,):
        xw = x.repeat(1, width // 8)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for k in (2, 3, 8):
                for renorm in (False, True):
                    _check(target, xw.to(device=target.device, dtype=dtype), k, renorm)


def test_float32_router_values_a_few_ulps_apart(target):
    """float32 router tiles select on keys that keep only the value's high bits beside the index (the C++ kernel),
    so values a few ulps apart must still come out by value: ascending and descending runs of neighbouring floats,
    one run split across the k-th place, exact ties among them, and logits that came from bf16."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, 64, generator=g)
    one = torch.tensor(1.0)
    run = torch.stack([one := torch.nextafter(one, torch.tensor(2.0)) for _ in range(12)])
    x[0, :12] = run  # ascending: the lowest index holds the smallest value
    x[1, :12] = run.flip(0)
    x[2, 20:32] = run
    x[2, 3] = run[5]  # an exact tie inside the run, at a lower index
    x[3, :12] = run
    x[3, 40] = run[-1] + 1.0  # one clear winner, the run below it crossing the k-th place
    x[4] = x[4].to(torch.bfloat16).float()
    x[5, 10:14] = 1.0  # exact ties
    x = x.to(target.device)
    for k in (5, 8):
        for renorm in (False, True):
            _check(target, x, k, renorm)


def test_rows_longer_than_a_tile(target):
    n = 70000 if target.big else 9000
    x = _x(target, 3, n, seed=4)
    x[1, n - 5] = 40.0  # the winner in the last tile
    x[2, :100] = -float("inf")
    _check(target, x, 5, False)
    _check(target, x, 5, True)


def test_nan_infinities_and_ties_after_the_first_block(target):
    """Long rows whose specials sit past the first block (the C++ kernel's one-read block pass, which filters
    against the k-th value per vector and offers a block's NaNs afterwards) and in the last, partial vector."""
    n = 5000 if target.big else 2100
    nan, inf = float("nan"), float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        x = _x(target, 4, n, seed=6).cpu()
        x[0, n // 2 + 7] = nan
        x[0, n - 1] = nan
        x[1, n - 3] = inf
        x[2, 2 * n // 3:] = 9.0  # ties past the first block: lowest index first
        x[3, n // 2 :] = -inf
        x = x.to(device=target.device, dtype=dtype)
        for k in (1, 8, 50):
            _check(target, x, k, False)
        _check(target, x, 8, True)


def test_op_dispatches_cpu_tensors_to_the_cpp_kernel():
    x = torch.randn(4, 100)
    assert topk_dispatch.active_backend(x, 8) == "cpu"
    assert topk_dispatch.active_backend(x, 65) == "reference"  # above MAX_K: the sort
    assert topk_dispatch.active_backend(x.double(), 8) == "reference"
    kernels.force_backend("reference")
    try:
        assert topk_dispatch.active_backend(x, 8) == "reference"
    finally:
        kernels.force_backend(None)


def test_missing_kernel_falls_back_once_with_a_warning(monkeypatch):
    from attnpass.kernels import cpu
    from attnpass.kernels.cpu import topk as cpu_topk

    monkeypatch.setattr(cpu, "load_topk", lambda: None)
    monkeypatch.setattr(topk_dispatch, "_warned", set())
    x = torch.randn(3, 50)
    was = cpu_topk.set_dispatch(False)  # an earlier test's library owns the op's CPU kernel: as if it never built
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p1, i1 = attnpass.softmax_topk(x, 4)
            attnpass.softmax_topk(x, 4)
    finally:
        cpu_topk.set_dispatch(was)
    said = [w for w in caught if "softmax_topk kernel is unavailable" in str(w.message)]
    assert len(said) == 1
    want_p, want_i = reference.softmax_topk(x, 4)
    assert torch.equal(i1, want_i) and torch.equal(p1, want_p)


@pytest.fixture(scope="module", params=["interp", pytest.param("cuda", marks=pytest.mark.gpu)])
def triton_target(request) -> Target:
    if request.param == "interp":
        return Target(triton_topk.load_interpreted(), "cpu", False)
    return Target(triton_topk.load(), "cuda", True)


def test_triton_split_rows_merge_exactly(triton_target):
    """Rows cut into chunks (few long rows): a chunk of only -inf, a NaN row, the winner in the last chunk."""
    t = triton_target
    n = 40000 if t.big else 4500
    x = _x(t, 3, n, seed=5)
    x[0, : n // 2] = -float("inf")
    x[1, n // 3] = float("nan")
    x[2, n - 1] = 50.0
    block = t.kernel._tiles(3, n, 8)[1]
    for splits in (2, 3):
        assert triton_topk.triton_kernels.triton_cdiv(n, block) >= splits  # the chunks really are separate programs
        for renorm in (False, True):
            probs, idx = t.kernel.softmax_topk_forward(x, 8, renorm, splits)
            want_p, want_i = reference.softmax_topk(x, 8, -1, renorm)
            assert torch.equal(idx, want_i)
            torch.testing.assert_close(probs, want_p, rtol=0, atol=1e-6, equal_nan=True)
