"""Plain fused MLIR attention keeps the model's output where it is finite (``docs/numerics.md``): a row whose
keys all carry a large finite negative bias (``finfo.min``, ``-1e9``) gives the mean of V over the keys it may
attend in the original, so the loop nest adds such a bias rather than treating it as a removed key (which gave
that row zeros).  SSMax still removes those keys after its factor, as ``semantics`` says.
"""

from __future__ import annotations

import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)
from torch import nn

import attnpass.mlir as am
from attnpass import semantics


class CausalBias(nn.Module):
    """Scores plus a float bias, then the causal mask as ``masked_fill(-inf)``."""

    def forward(self, q, k, v, bias):
        s = q.shape[-2]
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5) + bias
        keep = torch.ones(s, s, dtype=torch.bool).tril()
        return torch.matmul(torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1), v)


def _args(fill: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    bias = torch.zeros(1, 1, 12, 12)
    bias[..., 5, :] = fill  # row 5: every key it may attend (0..5) carries the bias
    bias[..., 9, 2] = fill  # row 9: one key
    return q, k, v, bias


@pytest.fixture(scope="module")
def imported():
    return am.import_(CausalBias().eval(), _args(-1e9))


@pytest.mark.parametrize("fill", [-1e9, torch.finfo(torch.float32).min])
def test_fused_keeps_the_mean_of_a_row_masked_by_a_finite_bias(imported, fill):
    args = _args(fill)
    with torch.no_grad():
        want = CausalBias()(*args)
    fused = am.rewrite(imported, to="fused", tile=4)
    got = am.compile(fused)(*args)
    assert want[0, :, 5].abs().sum() > 0  # the original row is the mean of v[.., :6], not zeros
    torch.testing.assert_close(want[0, :, 5], args[2][0, :, :6].mean(dim=-2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_fused_ssmax_still_removes_those_keys(imported):
    q, k, v, bias = _args(-1e9)
    ssmax = am.rewrite(imported, to="ssmax", s=0.6, b=0.1, fused=True, tile=4)
    got = am.compile(ssmax)(q, k, v, bias)
    want = semantics.ssmax_attention(q, k, v, attn_mask=bias, is_causal=True, s=0.6, b=0.1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
