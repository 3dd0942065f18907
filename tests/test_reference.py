"""The blocked online-softmax reference against ``semantics.attention`` (forward, lse and backward)."""

from __future__ import annotations

import math

import pytest
import torch

from attnpass import semantics
from attnpass.kernels import reference

NEG_INF = float("-inf")
B, H, D = 2, 4, 8


def final_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    s: torch.Tensor | None,
    b: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    """The logits that go into the softmax, in float64, masked keys at ``-inf`` (for the expected lse)."""
    q, k = q.double(), k.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    z = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    allowed = semantics.allowed_keys(z.shape, attn_mask, is_causal)
    if attn_mask is not None and attn_mask.is_floating_point():
        z = z + torch.where(allowed, attn_mask.double(), 0.0)
    if s is not None:
        z = z * semantics.ssmax_factor(allowed.sum(-1).double(), s.double(), None if b is None else b.double()).unsqueeze(-1)
    return z.masked_fill(~allowed, NEG_INF)


def make_mask(kind: str, s_q: int, s_k: int, g: torch.Generator) -> tuple[torch.Tensor | None, bool]:
    keep = torch.rand(B, 1, s_q, s_k, generator=g) < 0.8
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "bool":
        return keep, False
    if kind == "additive":  # finite bias, -inf and finfo.min, per head
        bias = torch.randn(B, H, s_q, s_k, generator=g, dtype=torch.float64)
        fill = torch.where(torch.rand(B, 1, s_q, s_k, generator=g) < 0.5, NEG_INF, torch.tensor(torch.finfo(torch.float64).min))
        return torch.where(keep, bias, fill), False
    if kind == "causal+padding":
        lengths = torch.randint(0, s_k + 1, (B,), generator=g)
        return (torch.arange(s_k) < lengths.reshape(B, 1, 1, 1)), True
    raise AssertionError(kind)


SHAPES = [(1, 1), (1, 70), (65, 130), (130, 65), (3, 129), (64, 64)]
MASKS = ["none", "bool", "additive", "causal", "causal+padding"]
FEATURES = ["plain", "ssmax+softcap", "gqa+ssmax_scalar"]


def make_case(s_q: int, s_k: int, mask_kind: str, feature: str, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hk = 2 if feature.startswith("gqa") else H
    q = torch.randn(B, H, s_q, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, hk, s_k, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, hk, s_k, 5, generator=g, dtype=torch.float64)
    attn_mask, is_causal = make_mask(mask_kind, s_q, s_k, g)
    s = b = softcap = None
    if feature == "ssmax+softcap":
        s = torch.rand(H, generator=g, dtype=torch.float64) + 0.2
        b = torch.randn(H, generator=g, dtype=torch.float64) * 0.3
        softcap = 3.0
    elif feature == "gqa+ssmax_scalar":
        s = torch.tensor([0.6], dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(dtype)) if dtype != torch.float64 else (lambda t: t)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = cast(attn_mask)
    return {
        "q": cast(q), "k": cast(k), "v": cast(v), "attn_mask": attn_mask, "is_causal": is_causal, "scale": None,
        "ssmax_s": cast(s), "ssmax_b": cast(b), "softcap": softcap, "enable_gqa": hk != H,
    }


def expected(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    as64 = {key: (val.double() if isinstance(val, torch.Tensor) and val.is_floating_point() else val) for key, val in case.items()}
    out = semantics.attention(**as64)
    lse = torch.logsumexp(
        final_logits(as64["q"], as64["k"], as64["attn_mask"], case["is_causal"], as64["ssmax_s"], as64["ssmax_b"], case["softcap"]), -1
    )
    return out, lse


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(("s_q", "s_k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_semantics(dtype: torch.dtype, s_q: int, s_k: int, mask_kind: str, feature: str) -> None:
    case = make_case(s_q, s_k, mask_kind, feature, dtype)
    out, lse = reference.attention_forward(**case)
    want_out, want_lse = expected(case)
    assert out.dtype == dtype and out.shape == (B, H, s_q, 5)
    assert lse.dtype == dtype and lse.shape == (B, H, s_q)
    assert not out.isnan().any() and not lse.isnan().any()
    tol = {"rtol": 1e-11, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 2e-6}
    torch.testing.assert_close(out.double(), want_out, **tol)
    torch.testing.assert_close(lse.double(), want_lse, **tol)  # -inf exactly where a row has no key


@pytest.mark.parametrize("block_k", [1, 7, 16, 200])
def test_forward_block_size_does_not_matter(block_k: int) -> None:
    case = make_case(23, 41, "causal+padding", "ssmax+softcap", torch.float64, seed=3)
    out, lse = reference.attention_forward(**case, block_k=block_k)
    want_out, want_lse = expected(case)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_forward_low_precision_and_large_logits() -> None:
    """fp16/bf16 in, fp32 lse out, no NaN with logits ~1e4, close to the float64 answer."""
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        case = make_case(70, 70, "causal+padding", "ssmax+softcap", torch.float64, seed=5)
        case["softcap"] = None
        case["q"] = (case["q"] * 60).to(dtype)
        case["k"] = (case["k"] * 60).to(dtype)
        case["v"] = case["v"].to(dtype)
        case["ssmax_s"], case["ssmax_b"] = case["ssmax_s"].to(dtype), case["ssmax_b"].to(dtype)
        out, lse = reference.attention_forward(**case)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert out.isfinite().all() and not lse.isnan().any()
        want_out, want_lse = expected(case)
        assert want_lse[want_lse.isfinite()].abs().max() > 1e3
        torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-2)


def test_forward_nan_propagates() -> None:
    case = make_case(5, 70, "none", "plain", torch.float32)
    case["k"][0, 1, 66, 0] = float("nan")  # in the second key block
    out, lse = reference.attention_forward(**case)
    assert out[0, 1].isnan().all() and lse[0, 1].isnan().all()
    assert not out[1].isnan().any() and not out[0, 0].isnan().any()
    mask = torch.zeros(5, 70)
    mask[2, 3] = float("nan")
    case = make_case(5, 70, "none", "plain", torch.float32)
    out, _ = reference.attention_forward(**{**case, "attn_mask": mask})
    assert out[:, :, 2].isnan().all() and not out[:, :, [0, 1, 3, 4]].isnan().any()


def test_forward_broadcast_kv_head_and_mask_shapes() -> None:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, 9, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, 1, 12, D, generator=g, dtype=torch.float64)  # one shared K/V head, no GQA flag
    v = torch.randn(B, 1, 12, D, generator=g, dtype=torch.float64)
    for mask in (torch.randn(9, 12, generator=g, dtype=torch.float64), torch.rand(1, 1, 1, 12, generator=g) < 0.6):
        out, _ = reference.attention_forward(q, k, v, mask, True, 0.2, torch.full((H,), 0.5, dtype=torch.float64))
        want = semantics.attention(q, k, v, mask, True, 0.2, torch.full((H,), 0.5, dtype=torch.float64))
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# --- backward --------------------------------------------------------------------------------------

BACKWARD_CASES = [
    (1, 1, "none", "plain"),
    (5, 7, "bool", "ssmax+softcap"),
    (7, 7, "additive", "ssmax+softcap"),
    (6, 9, "causal", "gqa+ssmax_scalar"),
    (9, 4, "causal+padding", "ssmax+softcap"),
    (8, 70, "additive", "gqa+ssmax_scalar"),
]


def autograd_grads(case: dict, grad_out: torch.Tensor) -> list[torch.Tensor | None]:
    names = ["q", "k", "v", "attn_mask", "ssmax_s", "ssmax_b"]
    leaves = {
        n: case[n].detach().double().requires_grad_()
        for n in names
        if case[n] is not None and case[n].is_floating_point()
    }
    out = semantics.attention(**{**case, **leaves})
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.double())
    by_name = dict(zip(leaves, grads))
    return [by_name.get(n) for n in names]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("s_q", "s_k", "mask_kind", "feature"), BACKWARD_CASES)
def test_backward_matches_autograd_through_semantics(dtype: torch.dtype, s_q: int, s_k: int, mask_kind: str, feature: str) -> None:
    case = make_case(s_q, s_k, mask_kind, feature, dtype, seed=11)
    if feature == "ssmax+softcap" and mask_kind == "additive":
        case["ssmax_s"] = case["ssmax_s"][:1].reshape(())  # a 0-dim s: its gradient keeps that shape
        case["ssmax_b"] = case["ssmax_b"][:1]
    grad_out = torch.randn(B, H, s_q, 5, generator=torch.Generator().manual_seed(12), dtype=dtype)
    got = reference.attention_backward(grad_out, **case)
    want = autograd_grads(case, grad_out)
    assert len(got) == 6
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for name, g, w in zip(["dq", "dk", "dv", "dmask", "ds", "db"], got, want):
        if w is None:
            assert g is None, name
            continue
        assert g is not None, name
        assert not g.isnan().any(), name
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m, name=name: f"{name}: {m}")
    inputs = [case[n] for n in ("q", "k", "v", "attn_mask", "ssmax_s", "ssmax_b")]
    for g, t in zip(got, inputs):
        if g is not None:
            assert g.shape == t.shape and g.dtype == t.dtype


def test_backward_bool_mask_and_absent_ssmax_give_none() -> None:
    case = make_case(4, 6, "bool", "plain", torch.float64)
    grads = reference.attention_backward(torch.ones(B, H, 4, 5, dtype=torch.float64), **case)
    assert [g is None for g in grads] == [False, False, False, True, True, True]


def test_backward_broadcast_mask_and_kv_head() -> None:
    g = torch.Generator().manual_seed(13)
    q = torch.randn(B, H, 6, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 8, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 8, 3, generator=g, dtype=torch.float64)
    mask = torch.randn(1, 1, 6, 8, generator=g, dtype=torch.float64)
    mask[..., 0, :3] = NEG_INF
    grad_out = torch.randn(B, H, 6, 3, generator=g, dtype=torch.float64)
    case = {"q": q, "k": k, "v": v, "attn_mask": mask, "is_causal": False, "scale": 0.3,
            "ssmax_s": torch.tensor(0.7, dtype=torch.float64), "ssmax_b": None, "softcap": None, "enable_gqa": False}
    got = reference.attention_backward(grad_out, **case)
    want = autograd_grads(case, grad_out)
    for gv, wv in zip(got, want):
        if wv is None:
            assert gv is None
        else:
            assert gv is not None and gv.shape == wv.shape
            torch.testing.assert_close(gv, wv, rtol=1e-10, atol=1e-10)
