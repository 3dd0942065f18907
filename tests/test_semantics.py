"""``attnpass.semantics``: the one definition of attention and SSMax, checked against independent math.

The naive implementation below is written here on purpose (not imported): it is the
textbook ``softmax(scale * QK^T + mask) @ V`` in float64, with SSMax as the paper states
it and ``n`` counted with ``torch.tril`` rather than with anything from attnpass.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnpass import semantics

NEG_INF = float("-inf")


def tril_allowed(s_q: int, s_k: int) -> torch.Tensor:
    """Bottom-right causal visibility, built from ``torch.tril`` (independent of semantics)."""
    return torch.ones(s_q, s_k, dtype=torch.bool).tril(diagonal=s_k - s_q)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    s: torch.Tensor | float | None = None,
    b: torch.Tensor | float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Float64 textbook attention: ``allowed`` says which keys count, ``bias`` is the finite additive part.

    SSMax multiplies the biased logits of row i by ``s_h log n_i + b_h`` with
    ``n_i = allowed[..., i, :].sum()``; a row with no allowed key is 0.
    """
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    z = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    allowed = torch.ones_like(z, dtype=torch.bool) if allowed is None else allowed.expand(z.shape)
    if bias is not None:
        z = z + bias.double()
    if s is not None:
        n = allowed.sum(-1).double().clamp_min(1.0)
        heads = z.shape[1]
        s_h = torch.as_tensor(s, dtype=torch.float64).reshape(-1).expand(heads).reshape(1, heads, 1)
        b_h = torch.as_tensor(0.0 if b is None else b, dtype=torch.float64).reshape(-1).expand(heads).reshape(1, heads, 1)
        z = z * (s_h * torch.log(n) + b_h).unsqueeze(-1)
    z = z.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(z, dim=-1)
    p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p))
    return p @ v


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def padding_mask(lengths: list[int], s_k: int) -> torch.Tensor:
    """Bool ``[B, 1, 1, S_k]``: True for the first ``lengths[b]`` keys (right padding)."""
    return (torch.arange(s_k) < torch.tensor(lengths).unsqueeze(-1)).reshape(len(lengths), 1, 1, s_k)


# --- plain attention: semantics == naive float64 == SDPA fp32 ------------------------------------

B, H, S_Q, S_K, D = 2, 3, 5, 7, 8


def _case(kind: str, dtype: torch.dtype) -> tuple[dict, dict, dict, dict]:
    """Inputs, semantics kwargs, naive kwargs and SDPA kwargs for one mask kind."""
    hk = 1 if kind == "gqa" else H
    s_q = S_K if kind == "causal" else S_Q
    q, k, v = rand(B, H, s_q, D, seed=1, dtype=dtype), rand(B, hk, S_K, D, seed=2, dtype=dtype), rand(B, hk, S_K, D, seed=3, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v}
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(B, 1, s_q, S_K, generator=g) < 0.7
    keep[..., 0] = True  # no fully masked row: SDPA's convention for those differs across versions
    bias = torch.randn(B, H, s_q, S_K, generator=g, dtype=dtype)
    if kind == "none":
        return inputs, {}, {}, {}
    if kind == "bool":
        return inputs, {"attn_mask": keep}, {"allowed": keep}, {"attn_mask": keep}
    if kind == "additive":
        mask = torch.where(keep, bias, torch.tensor(NEG_INF, dtype=dtype))
        return inputs, {"attn_mask": mask}, {"allowed": keep, "bias": torch.where(keep, bias, 0)}, {"attn_mask": mask}
    if kind == "causal":
        return inputs, {"is_causal": True}, {"allowed": tril_allowed(s_q, S_K)}, {"is_causal": True}
    if kind == "causal_rect":  # S_q < S_k: bottom-right; SDPA's is_causal is top-left, so give it the mask
        allowed = tril_allowed(S_Q, S_K)
        return inputs, {"is_causal": True}, {"allowed": allowed}, {"attn_mask": allowed}
    if kind == "gqa":
        return inputs, {"enable_gqa": True}, {}, {"enable_gqa": True}
    raise AssertionError(kind)


KINDS = ["none", "bool", "additive", "causal", "causal_rect", "gqa"]


@pytest.mark.parametrize("kind", KINDS)
def test_plain_attention_matches_naive_float64(kind: str) -> None:
    inputs, sem_kw, naive_kw, _ = _case(kind, torch.float64)
    got = semantics.attention(**inputs, **sem_kw)
    want = naive_attention(**inputs, **naive_kw)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_plain_attention_matches_sdpa_fp32(kind: str) -> None:
    inputs, sem_kw, _, sdpa_kw = _case(kind, torch.float32)
    got = semantics.attention(**inputs, **sem_kw)
    want = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], **sdpa_kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_explicit_scale_and_softcap_match_naive() -> None:
    q, k, v = rand(1, 2, 4, 3, seed=5), rand(1, 2, 6, 3, seed=6), rand(1, 2, 6, 3, seed=7)
    got = semantics.attention(q * 4, k * 4, v, scale=0.3, softcap=5.0)
    torch.testing.assert_close(got, naive_attention(q * 4, k * 4, v, scale=0.3, softcap=5.0), rtol=1e-12, atol=1e-12)


# --- n: keys each row may attend -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s_q", "s_k", "expected"),
    [
        (4, 4, [1, 2, 3, 4]),
        (2, 5, [4, 5]),  # S_q < S_k: the queries are the last two positions
        (1, 6, [6]),  # decode step: the one query sees everything
        (5, 2, [0, 0, 0, 1, 2]),  # S_q > S_k: the first rows see nothing
    ],
)
def test_keys_per_row_causal(s_q: int, s_k: int, expected: list[int]) -> None:
    n = semantics.keys_per_row((1, 2, s_q, s_k), is_causal=True)
    assert n.shape == (1, 2, s_q)
    assert n[0, 0].tolist() == expected
    assert n[0, 1].tolist() == expected
    assert semantics.causal_allowed(s_q, s_k).sum(-1).tolist() == expected


@pytest.mark.parametrize(
    "mask_for",
    [
        pytest.param(lambda keep: keep, id="bool"),
        pytest.param(lambda keep: torch.where(keep, 0.0, NEG_INF), id="-inf"),
        pytest.param(lambda keep: torch.where(keep, 0.0, torch.finfo(torch.float32).min), id="finfo.min"),
        pytest.param(lambda keep: torch.where(keep, 0.0, -10000.0), id="-10000"),
        pytest.param(lambda keep: torch.where(keep, 0.0, -10000.0).half(), id="-10000-fp16"),
        pytest.param(lambda keep: torch.where(keep, 0.0, -10000.0).bfloat16(), id="-10000-bf16"),
        pytest.param(lambda keep: torch.where(keep, 0.5, torch.finfo(torch.float16).min).half(), id="finfo.min-fp16"),
    ],
)
def test_keys_per_row_padding(mask_for) -> None:
    keep = padding_mask([3, 5], s_k=5)
    n = semantics.keys_per_row((2, 2, 4, 5), mask_for(keep))
    assert n[0].tolist() == [[3, 3, 3, 3]] * 2
    assert n[1].tolist() == [[5, 5, 5, 5]] * 2


def test_keys_per_row_causal_and_padding() -> None:
    right = padding_mask([3], s_k=5)
    assert semantics.keys_per_row((1, 1, 5, 5), right, is_causal=True)[0, 0].tolist() == [1, 2, 3, 3, 3]
    left = (torch.arange(5) >= 2).reshape(1, 1, 1, 5)  # two pad tokens first
    assert semantics.keys_per_row((1, 1, 5, 5), left, is_causal=True)[0, 0].tolist() == [0, 0, 1, 2, 3]
    # decode with a padded cache: 2 new queries over 6 keys of which the first is padding
    cache = (torch.arange(6) >= 1).reshape(1, 1, 1, 6)
    assert semantics.keys_per_row((1, 1, 2, 6), cache, is_causal=True)[0, 0].tolist() == [4, 5]


def test_keys_per_row_finite_bias_is_not_a_mask() -> None:
    alibi = -torch.arange(6, dtype=torch.float32).reshape(1, 1, 1, 6) * 100.0  # down to -500: a bias, not a mask
    assert semantics.keys_per_row((1, 1, 3, 6), alibi)[0, 0].tolist() == [6, 6, 6]


# --- the SSMax factor ------------------------------------------------------------------------------


def test_ssmax_factor_values() -> None:
    n = torch.tensor([[[1.0, 2.0, 8.0]], [[0.0, 4.0, 16.0]]]).reshape(1, 2, 3)
    s = torch.tensor([0.5, 2.0])
    b = torch.tensor([0.25, -1.0])
    got = semantics.ssmax_factor(n, s, b)
    want = torch.tensor([[[0.25, 0.5 * math.log(2) + 0.25, 0.5 * math.log(8) + 0.25], [-1.0, 2 * math.log(4) - 1, 2 * math.log(16) - 1]]])
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32
    assert semantics.ssmax_factor(n.double(), 0.5).dtype == torch.float64
    assert semantics.ssmax_factor(n.bfloat16(), 0.5).dtype == torch.float32  # log n never in bf16


def test_ssmax_factor_uses_n_not_padded_length() -> None:
    """Row by row by hand: causal + right padding, per-head s and b."""
    b_, h, s_len, d = 2, 2, 6, 4
    q, k, v = rand(b_, h, s_len, d, seed=10), rand(b_, h, s_len, d, seed=11), rand(b_, h, s_len, d, seed=12)
    lengths = [4, 6]
    mask = padding_mask(lengths, s_len)
    s = torch.tensor([0.4, 0.9], dtype=torch.float64)
    bb = torch.tensor([0.1, -0.2], dtype=torch.float64)
    got = semantics.ssmax_attention(q, k, v, attn_mask=mask, is_causal=True, s=s, b=bb)
    want = torch.zeros_like(got)
    for bi in range(b_):
        for hi in range(h):
            for i in range(s_len):
                n_i = min(i + 1, lengths[bi])  # keys 0..min(i, len-1)
                factor = s[hi] * math.log(n_i) + bb[hi]
                logits = factor * (q[bi, hi, i] @ k[bi, hi, :n_i].T) / math.sqrt(d)
                want[bi, hi, i] = torch.softmax(logits, -1) @ v[bi, hi, :n_i]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    naive = naive_attention(q, k, v, s=s, b=bb, allowed=tril_allowed(s_len, s_len) & mask)
    torch.testing.assert_close(naive, want, rtol=1e-12, atol=1e-12)
    # the padded length would give a different answer (the test can tell the two apart)
    wrong = semantics.attention(q, k, v, mask, True, None, s * 0, bb + s * math.log(s_len))
    assert not torch.allclose(wrong, want)


def test_ssmax_s0_b1_is_plain_attention() -> None:
    q, k, v = rand(2, 3, 5, 4, seed=20), rand(2, 3, 5, 4, seed=21), rand(2, 3, 5, 4, seed=22)
    mask = padding_mask([3, 5], 5)
    plain = semantics.attention(q, k, v, attn_mask=mask, is_causal=True)
    got = semantics.ssmax_attention(q, k, v, attn_mask=mask, is_causal=True, s=0.0, b=1.0)
    torch.testing.assert_close(got, plain, rtol=1e-14, atol=1e-14)
    per_head = semantics.ssmax_attention(q, k, v, attn_mask=mask, is_causal=True, s=torch.zeros(3, dtype=torch.float64), b=torch.ones(3))
    torch.testing.assert_close(per_head, plain, rtol=1e-14, atol=1e-14)


def test_s_for_train_len_gives_factor_one_at_train_len() -> None:
    for train_len in (2, 7, 512, 4096):
        s = semantics.s_for_train_len(train_len)
        factor = semantics.ssmax_factor(torch.tensor([float(train_len)], dtype=torch.float64), s)
        torch.testing.assert_close(factor, torch.ones(1, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    q, k, v = rand(1, 2, 9, 4, seed=23), rand(1, 2, 9, 4, seed=24), rand(1, 2, 9, 4, seed=25)
    torch.testing.assert_close(semantics.ssmax_attention(q, k, v, s=semantics.s_for_train_len(9)), semantics.attention(q, k, v))
    with pytest.raises(ValueError, match="train_len"):
        semantics.s_for_train_len(1)


@pytest.mark.parametrize("masked", [NEG_INF, torch.finfo(torch.float32).min, -10000.0])
def test_factor_zero_keeps_masks_and_gives_no_nan(masked: float) -> None:
    """n = 1 and b = 0: the factor is exactly 0, so the mask must be applied after it."""
    s_len = 4
    q, k, v = rand(1, 2, s_len, 3, seed=30), rand(1, 2, s_len, 3, seed=31), rand(1, 2, s_len, 3, seed=32)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    only = torch.arange(s_len).reshape(1, s_len) == torch.tensor([2, 0, 3, 1]).reshape(s_len, 1)  # row i sees one key
    mask = torch.where(only, 0.0, masked).reshape(1, 1, s_len, s_len)
    assert (semantics.keys_per_row((1, 2, s_len, s_len), mask) == 1).all()
    out = semantics.ssmax_attention(q, k, v, attn_mask=mask, s=0.43, b=0.0)
    assert not out.isnan().any()
    torch.testing.assert_close(out[0, :, :, :], v[0][:, [2, 0, 3, 1], :])  # each row is its one key's value
    out.sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
    # causal: row 0 has n = 1 and must be v[0] exactly
    causal = semantics.ssmax_attention(q, k, v, is_causal=True, s=torch.tensor([0.5, 1.5]), b=0.0)
    assert not causal.isnan().any()
    torch.testing.assert_close(causal[:, :, 0], v[:, :, 0])


@pytest.mark.parametrize("ssmax", [False, True])
def test_fully_masked_rows_are_zero(ssmax: bool) -> None:
    q, k, v = rand(1, 2, 4, 3, seed=40).requires_grad_(), rand(1, 2, 5, 3, seed=41).requires_grad_(), rand(1, 2, 5, 3, seed=42)
    kw = {"ssmax_s": torch.tensor([0.5, 0.7], dtype=torch.float64)} if ssmax else {}
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[1] = False
    for mask in (keep, torch.where(keep, 0.0, NEG_INF), torch.where(keep, 0.3, torch.tensor(torch.finfo(torch.float64).min))):
        out = semantics.attention(q, k, v, attn_mask=mask, **kw)
        assert not out.isnan().any()
        assert (out[:, :, 1] == 0).all()
        assert (out[:, :, [0, 2, 3]].abs().sum(-1) > 0).all()
        (gq, gk) = torch.autograd.grad(out.sum(), (q, k))
        assert gq.isfinite().all() and gk.isfinite().all()
        assert (gq[:, :, 1] == 0).all()
    # causal with more queries than keys: the first rows see nothing
    out = semantics.attention(rand(1, 1, 6, 3, seed=43), rand(1, 1, 3, 3, seed=44), rand(1, 1, 3, 3, seed=45), is_causal=True, **kw)
    assert (out[0, 0, :3] == 0).all() and not out.isnan().any()
    assert (out[0, 0, 3:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("ssmax", [False, True])
def test_fp16_large_logits_give_no_nan(ssmax: bool) -> None:
    d = 16
    q = (rand(1, 2, 8, d, seed=50) * 60).half()
    k = (rand(1, 2, 8, d, seed=51) * 60).half()
    v = rand(1, 2, 8, d, seed=52).half()
    kw = {"ssmax_s": torch.tensor([0.43, 1.0], dtype=torch.float16)} if ssmax else {}
    logits = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(d)
    assert logits.abs().max() > 5e3  # really ~1e4, far past fp16 exp range
    mask = torch.where(padding_mask([6], 8), 0.0, torch.finfo(torch.float16).min).half()
    out = semantics.attention(q, k, v, attn_mask=mask, is_causal=True, **kw)
    assert out.dtype == torch.float16
    assert out.isfinite().all()
    allowed = tril_allowed(8, 8) & padding_mask([6], 8)
    s = kw.get("ssmax_s")
    want = naive_attention(q, k, v, allowed=allowed, s=None if s is None else s.double())
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


def test_nan_in_inputs_propagates() -> None:
    q, k, v = rand(1, 1, 3, 2, seed=60), rand(1, 1, 4, 2, seed=61), rand(1, 1, 4, 2, seed=62)
    q_nan = q.clone()
    q_nan[0, 0, 1, 0] = float("nan")
    out = semantics.attention(q_nan, k, v)
    assert out[0, 0, 1].isnan().all() and not out[0, 0, [0, 2]].isnan().any()
    k_nan = k.clone()
    k_nan[0, 0, 2, 1] = float("nan")
    assert semantics.attention(q, k_nan, v).isnan().all()
    assert semantics.ssmax_attention(q, k_nan, v).isnan().all()
    v_nan = v.clone()
    v_nan[0, 0, 3, 0] = float("nan")
    assert semantics.attention(q, k, v_nan)[..., 0].isnan().all()
    mask = torch.zeros(3, 4, dtype=torch.float64)
    mask[2, 1] = float("nan")  # a NaN in the mask is not a masked key
    out = semantics.attention(q, k, v, attn_mask=mask)
    assert out[0, 0, 2].isnan().all() and not out[0, 0, :2].isnan().any()
    assert semantics.keys_per_row((1, 1, 3, 4), mask)[0, 0].tolist() == [4, 4, 4]


def test_gradients_reach_ssmax_parameters_and_mask() -> None:
    q, k, v = rand(1, 2, 4, 3, seed=70), rand(1, 2, 4, 3, seed=71), rand(1, 2, 4, 3, seed=72)
    s = torch.tensor([0.4, 0.6], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    bias = rand(1, 2, 4, 4, seed=73).requires_grad_()
    out = semantics.attention(q, k, v, attn_mask=bias, is_causal=True, ssmax_s=s, ssmax_b=b)
    gs, gb, gbias = torch.autograd.grad(out.square().sum(), (s, b, bias))
    assert gs.shape == (2,) and gb.shape == (2,) and gbias.shape == bias.shape
    assert (gs != 0).all() and (gb != 0).all()
    assert (gbias[..., ~tril_allowed(4, 4)] == 0).all()  # causally masked entries of the bias get no gradient


# --- property test ---------------------------------------------------------------------------------


@st.composite
def attention_cases(draw: st.DrawFn) -> dict:
    return {
        "batch": draw(st.integers(1, 2)),
        "kv_heads": draw(st.integers(1, 2)),
        "group": draw(st.integers(1, 3)),
        "s_q": draw(st.integers(1, 6)),
        "s_k": draw(st.integers(1, 6)),
        "d": draw(st.integers(1, 4)),
        "mask": draw(st.sampled_from(["none", "bool", "additive", "finfo"])),
        "mask_heads": draw(st.booleans()),
        "causal": draw(st.booleans()),
        "ssmax": draw(st.sampled_from(["none", "scalar", "per_head"])),
        "softcap": draw(st.sampled_from([None, 2.0])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=80, deadline=None, derandomize=True)
@given(case=attention_cases())
def test_semantics_matches_naive_property(case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    heads = case["kv_heads"] * case["group"]
    s_q, s_k = case["s_q"], case["s_k"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = randn(case["batch"], heads, s_q, case["d"]), randn(case["batch"], case["kv_heads"], s_k, case["d"]), randn(case["batch"], case["kv_heads"], s_k, 3)
    mask_shape = (case["batch"], heads if case["mask_heads"] else 1, s_q, s_k)
    keep = torch.rand(mask_shape, generator=g) < 0.7
    bias = randn(*mask_shape)
    allowed = tril_allowed(s_q, s_k) if case["causal"] else torch.ones(s_q, s_k, dtype=torch.bool)
    attn_mask = naive_bias = None
    if case["mask"] == "bool":
        attn_mask, allowed = keep, allowed & keep
    elif case["mask"] in ("additive", "finfo"):
        fill = NEG_INF if case["mask"] == "additive" else torch.finfo(torch.float64).min
        attn_mask = torch.where(keep, bias, torch.tensor(fill, dtype=torch.float64))
        allowed = allowed & keep
        naive_bias = torch.where(keep, bias, 0.0)
    s = b = None
    if case["ssmax"] == "scalar":
        s, b = 0.43, None
    elif case["ssmax"] == "per_head":
        s, b = randn(heads).abs() + 0.1, randn(heads) * 0.1
    got = semantics.attention(
        q, k, v, attn_mask, case["causal"], None, s, b, case["softcap"], enable_gqa=case["kv_heads"] != heads
    )
    want = naive_attention(q, k, v, allowed=allowed, bias=naive_bias, s=s, b=b, softcap=case["softcap"])
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    empty_rows = ~allowed.expand(case["batch"], heads, s_q, s_k).any(-1)
    assert (got[empty_rows] == 0).all()
