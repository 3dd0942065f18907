"""``torch.ops.attnpass.attention``: fake impl, autograd, torch.compile, torch.export, validation.

These run on whichever backend ``attnpass.kernels`` picks for CPU, except where a test
pins the reference explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from attnpass import kernels, semantics
from attnpass.lowering import ops


@pytest.fixture
def reference_backend() -> Iterator[None]:
    kernels.force_backend("reference")
    try:
        yield
    finally:
        kernels.force_backend(None)


@pytest.fixture(params=["default", "reference"])
def either_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The backend CPU picks (a compiled kernel where one builds), then the reference it falls back to."""
    kernels.force_backend(None if request.param == "default" else request.param)
    try:
        yield request.param
    finally:
        kernels.force_backend(None)


def qkv(
    b: int = 1, h: int = 2, s_q: int = 5, s_k: int = 7, d: int = 4, hk: int | None = None,
    dtype: torch.dtype = torch.float32, requires_grad: bool = False, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hk = h if hk is None else hk
    q = torch.randn(b, h, s_q, d, generator=g, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, hk, s_k, d, generator=g, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, hk, s_k, 3, generator=g, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def opcheck_cases() -> list[tuple[str, tuple]]:
    q, k, v = qkv(requires_grad=True)
    q64, k64, v64 = qkv(dtype=torch.float64, requires_grad=True, seed=1)
    qg, kg, vg = qkv(h=4, hk=2, s_q=6, s_k=6, requires_grad=True, seed=2)
    s2 = torch.tensor([0.4, 0.9], requires_grad=True)
    b2 = torch.tensor([0.1, -0.2], requires_grad=True)
    keep = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(3)) < 0.7
    bias = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    return [
        ("plain", (q, k, v)),
        ("bool mask, causal, scale", (q, k, v, keep, True, 0.3)),
        ("float64 float mask, ssmax s and b, softcap", (q64, k64, v64, bias, False, None, s2.double(), b2.double(), 4.0, False)),
        ("gqa, causal, ssmax s only", (qg, kg, vg, None, True, None, torch.tensor([0.5, 0.6, 0.7, 0.8]), None, None, True)),
        ("no grad", tuple(t.detach() for t in (q, k, v))),
    ]


@pytest.mark.parametrize("args", [c[1] for c in opcheck_cases()], ids=[c[0] for c in opcheck_cases()])
def test_opcheck_attention(args: tuple, either_backend: str) -> None:
    result = torch.library.opcheck(torch.ops.attnpass.attention.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_attention_backward() -> None:
    q, k, v = qkv(dtype=torch.float64)
    mask = torch.randn(1, 1, 5, 7, dtype=torch.float64)
    s = torch.tensor([0.4, 0.5], dtype=torch.float64)
    out, lse = torch.ops.attnpass.attention(q, k, v, mask, True, None, s, None, None, False)
    args = (torch.ones_like(out), q, k, v, mask, out, lse, True, None, s, None, None, False)
    result = torch.library.opcheck(torch.ops.attnpass.attention_backward.default, args, test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result


def test_op_matches_semantics_and_lse_is_not_differentiable(either_backend: str) -> None:
    q, k, v = qkv(requires_grad=True)
    s = torch.tensor([0.4, 0.9])
    out, lse = torch.ops.attnpass.attention(q, k, v, None, True, None, s, None, None, False)
    torch.testing.assert_close(out, semantics.attention(q, k, v, None, True, None, s), rtol=1e-5, atol=2e-6)
    assert out.requires_grad and not lse.requires_grad  # the backward takes no lse gradient, so lse must not claim one
    assert lse.shape == (1, 2, 5) and lse.dtype == torch.float32


def test_gradcheck_all_differentiable_inputs(either_backend: str) -> None:
    q, k, v = qkv(b=1, h=2, s_q=3, s_k=4, d=2, dtype=torch.float64, requires_grad=True, seed=4)
    g = torch.Generator().manual_seed(5)
    mask = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    mask[0, 0, 1, 2] = float("-inf")  # a masked key inside a float mask: its gradient is 0
    mask.requires_grad_()
    s = torch.tensor([0.5, 0.8], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, s, b, finite_mask):
        full = torch.where(mask.isfinite(), finite_mask, mask.detach())
        return ops.attention(q, k, v, full, True, 0.7, s, b, 3.0)

    finite = torch.where(mask.isfinite(), mask, 0.0).detach().requires_grad_()
    assert torch.autograd.gradcheck(f, (q, k, v, s, b, finite))
    gqa = qkv(b=1, h=4, hk=2, s_q=2, s_k=3, d=2, dtype=torch.float64, requires_grad=True, seed=6)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, None, True, None, None, None, None, True), gqa)


def test_backward_reference_matches_autograd_through_semantics(reference_backend: None) -> None:
    assert kernels.active_backend("cpu") == "reference"
    q, k, v = qkv(h=4, hk=2, dtype=torch.float64, requires_grad=True, seed=7)
    mask = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.4, 0.5, 0.6, 0.7], dtype=torch.float64, requires_grad=True)
    leaves = (q, k, v, mask, s)
    got = torch.autograd.grad(ops.attention(q, k, v, mask, False, None, s, None, 2.0, True).sum(), leaves)
    want = torch.autograd.grad(semantics.attention(q, k, v, mask, False, None, s, None, 2.0, True).sum(), leaves)
    for gv, wv in zip(got, want):
        torch.testing.assert_close(gv, wv, rtol=1e-10, atol=1e-10)


def test_forced_unknown_backend_raises() -> None:
    kernels.force_backend("no-such-kernel")
    try:
        with pytest.raises(RuntimeError, match="no-such-kernel"):
            kernels.backend_for(torch.device("cpu"))
    finally:
        kernels.force_backend(None)


class SSMaxAttention(nn.Module):
    """What a rewrite produces: the op with ``s`` as a trainable parameter."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((heads,), 0.43))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ops.attention(q, k, v, mask, True, None, self.s) * 2.0


def test_torch_compile_fullgraph_eager_backend_trains() -> None:
    torch._dynamo.reset()
    module = SSMaxAttention(2)
    q, k, v = qkv(requires_grad=True, seed=8)
    mask = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(9)) < 0.8
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    got = compiled(q, k, v, mask)
    want = module(q, k, v, mask)
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, module.s)]
    for t in (q, k, v, module.s):
        t.grad = None
    want.square().sum().backward()
    for gv, t in zip(grads, (q, k, v, module.s)):
        torch.testing.assert_close(gv, t.grad)


def test_torch_compile_fullgraph_inductor() -> None:
    """Inference only: an Inductor backward compile would cost this suite seconds for nothing more."""
    torch._dynamo.reset()
    q, k, v = qkv(seed=13)
    s = torch.tensor([0.5, 0.6])

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.relu(ops.attention(q * 2.0, k, v, None, True, None, s, None, None)) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_torch_export() -> None:
    module = SSMaxAttention(2)
    q, k, v = qkv(seed=10)
    mask = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(11)) < 0.8
    exported = torch.export.export(module, (q, k, v, mask))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnpass.attention.default in targets
    assert "s" in exported.state_dict  # s stays a parameter
    torch.testing.assert_close(exported.module()(q, k, v, mask), module(q, k, v, mask))
    q2, k2, v2 = qkv(seed=12)
    torch.testing.assert_close(exported.module()(q2, k2, v2, mask), module(q2, k2, v2, mask))


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"q": torch.zeros(2, 5, 4)}, r"q must be \[B, H, S, D\]; got q\(2, 5, 4\)"),
        ({"k": torch.zeros(1, 2, 1, 7, 4)}, "k must be"),
        ({"v": torch.zeros(2, 7, 3)}, "v must be"),
        ({"k": torch.zeros(1, 2, 7, 5)}, "k's head dim"),
        ({"v": torch.zeros(1, 2, 6, 3)}, "v must have k's heads and sequence length"),
        ({"v": torch.zeros(1, 3, 7, 3)}, "v must have k's heads"),
        ({"k": torch.zeros(3, 2, 7, 4), "v": torch.zeros(3, 2, 7, 3)}, "k's batch"),
        ({"q": torch.zeros(1, 3, 5, 4), "enable_gqa": True}, "q has 3 heads and k/v have 2"),  # 3 query heads over 2 key heads
        ({"q": torch.zeros(1, 4, 5, 4)}, "needs enable_gqa=True"),  # 4 over 2 without the flag
        ({"ssmax_s": torch.zeros(3)}, "ssmax_s has 3 values"),
        ({"ssmax_s": torch.zeros(2), "ssmax_b": torch.zeros(3)}, "ssmax_b has 3 values"),
        ({"ssmax_b": torch.zeros(2)}, "ssmax_b given without ssmax_s"),
        ({"attn_mask": torch.zeros(5, 6)}, r"attn_mask\(5, 6\) does not broadcast"),
    ],
)
def test_validation_errors_name_the_argument(kwargs: dict, names: str) -> None:
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, **kwargs}
    with pytest.raises(ValueError, match=names):
        ops.attention(**args)


def test_validation_runs_under_torch_compile() -> None:
    torch._dynamo.reset()
    q, k, v = qkv()
    compiled = torch.compile(lambda q, k, v, s: ops.attention(q, k, v, ssmax_s=s), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="ssmax_s has 3 values"):
        compiled(q, k, v, torch.zeros(3))


def test_mask_without_grad_gets_no_gradient_buffer() -> None:
    """A padding mask that needs no gradient must not make the backward build a [B, H, S, S] one."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., -2:] = float("-inf")
    out, lse = torch.ops.attnpass.attention(q, k, v, mask)
    args = (torch.ones_like(out), q, k, v, mask, out, lse, False, None, None, None, None, False)
    skipped = torch.ops.attnpass.attention_backward(*args, False)
    wanted = torch.ops.attnpass.attention_backward(*args, True)
    assert skipped[3].numel() == 0 and wanted[3].shape == mask.shape
    torch.testing.assert_close(skipped[0], wanted[0])
    # through autograd: no gradient for a plain mask, a gradient for a trainable bias
    qg = q.clone().requires_grad_(True)
    ops.attention(qg, k, v, attn_mask=mask).sum().backward()
    assert qg.grad is not None and mask.grad is None
    bias = (0.1 * torch.randn(1, 1, 6, 6, generator=g)).requires_grad_(True)
    ops.attention(q, k, v, attn_mask=bias).sum().backward()
    assert bias.grad is not None and bias.grad.shape == bias.shape
