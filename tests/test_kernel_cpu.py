"""The compiled CPU attention kernel against the blocked reference and float64 semantics.

Every test goes through the compiled kernel and says so: the ``kernel`` fixture fails
(not skips) when the C++ build is unavailable, because a silent fall back to the
reference would make every comparison here compare the reference with itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnpass import kernels, semantics
from attnpass.kernels import cpu, reference
from attnpass.lowering import ops  # noqa: F401  (registers torch.ops.attnpass.attention)

torch.manual_seed(0)


@pytest.fixture(scope="module")
def kernel() -> cpu.CpuKernel:
    k = cpu.load()
    assert k is not None, "the C++ CPU kernel did not build (see the warning)"
    assert kernels.active_backend("cpu") == "cpu"
    assert k.capability == cpu.machine_capability()
    return k


def _qkv(b, h, hk, s_q, s_k, d, dtype=torch.float32, dv=None, gen=None):
    q = torch.randn(b, h, s_q, d, generator=gen).to(dtype)
    k = torch.randn(b, hk, s_k, d, generator=gen).to(dtype)
    v = torch.randn(b, hk, s_k, dv or d, generator=gen).to(dtype)
    return q, k, v


def _mask(kind: str, b: int, h: int, s_q: int, s_k: int, dtype=torch.float32) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for each mask kind the kernel must handle."""
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "bool":
        m = torch.rand(b, 1, s_q, s_k, generator=g) > 0.3
        m[..., 0] = True
        return m, False
    if kind == "padding_causal":  # [B, 1, 1, S_k]: the second batch pads most keys, whole blocks included
        m = torch.ones(b, 1, 1, s_k, dtype=torch.bool)
        m[-1, ..., max(1, s_k // 3):] = False
        return m, True
    if kind == "additive_inf":
        m = torch.randn(b, h, s_q, s_k, generator=g).to(dtype)
        m[torch.rand(b, h, s_q, s_k, generator=g) > 0.7] = float("-inf")
        return m, False
    if kind == "finfo_min":
        m = torch.zeros(1, 1, s_q, s_k, dtype=dtype)
        m[..., s_k // 2:] = torch.finfo(dtype).min
        return m, False
    if kind == "bias":  # ALiBi-like finite bias broadcast over batch
        pos = torch.arange(s_k) - torch.arange(s_q).unsqueeze(-1)
        slopes = torch.linspace(0.1, 0.5, h).reshape(h, 1, 1)
        return (-slopes * pos.abs()).unsqueeze(0).to(dtype), False
    if kind == "fully_masked_rows":
        m = torch.rand(b, h, s_q, s_k, generator=g) > 0.5
        m[:, :, ::3] = False
        return m, False
    raise AssertionError(kind)


MASK_KINDS = ["none", "causal", "bool", "padding_causal", "additive_inf", "finfo_min", "bias", "fully_masked_rows"]

# (B, H, H_kv, S_q, S_k, D): S=1, S not a multiple of any block, S_q < S_k, S_q > S_k, GQA, MQA,
# several query and key blocks.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 2, 1, 37, 16),
    (2, 2, 2, 37, 37, 16),
    (1, 2, 2, 33, 70, 8),
    (1, 2, 2, 70, 33, 8),
    (1, 4, 2, 40, 50, 16),
    (2, 4, 1, 40, 50, 16),
    (2, 2, 1, 200, 700, 32),
]


def _call(q, k, v, mask, causal, s=None, b=None, softcap=None, scale=None):
    """Through the registered op, as users reach the kernel."""
    return torch.ops.attnpass.attention(q, k, v, mask, causal, scale, s, b, softcap, k.shape[1] != q.shape[1])


def _check_against_oracles(q, k, v, mask, causal, s=None, b=None, softcap=None, scale=None):
    out, lse = _call(q, k, v, mask, causal, s, b, softcap, scale)
    gqa = k.shape[1] != q.shape[1]
    ref_out, ref_lse = reference.attention_forward(q, k, v, mask, causal, scale, s, b, softcap, gqa)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)
    m64 = None if mask is None or mask.dtype == torch.bool else mask.double()
    exact = semantics.attention(
        q.double(), k.double(), v.double(), mask if m64 is None else m64, causal, scale,
        None if s is None else s.double(), None if b is None else b.double(), softcap, gqa,
    )
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=5e-6)
    assert not out.isnan().any()
    return out, lse


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_shapes_fp32(kernel, shape, causal):
    b, h, hk, s_q, s_k, d = shape
    q, k, v = _qkv(*shape)
    _check_against_oracles(q, k, v, None, causal)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 45, 70, 16), (2, 2, 2, 300, 600, 32)], ids=["small", "blocks"])
def test_masks_fp32(kernel, kind, shape):
    b, h, hk, s_q, s_k, d = shape
    q, k, v = _qkv(*shape)
    mask, causal = _mask(kind, b, h, s_q, s_k)
    out, lse = _check_against_oracles(q, k, v, mask, causal)
    if kind == "fully_masked_rows":
        assert (out[:, :, ::3] == 0).all()
        assert torch.isneginf(lse[:, :, ::3]).all()


@pytest.mark.parametrize("kind", ["none", "causal", "padding_causal", "additive_inf", "bias", "fully_masked_rows"])
@pytest.mark.parametrize("per_head", [False, True])
def test_ssmax_softcap_fp32(kernel, kind, per_head):
    b, h, hk, s_q, s_k, d = 2, 4, 2, 50, 90, 16
    q, k, v = _qkv(b, h, hk, s_q, s_k, d)
    mask, causal = _mask(kind, b, h, s_q, s_k)
    n = h if per_head else 1
    s = torch.linspace(0.2, 0.6, n)
    bias = torch.linspace(-0.3, 0.4, n)
    _check_against_oracles(q, k, v, mask, causal, s, bias, softcap=None)
    _check_against_oracles(q, k, v, mask, causal, s, None, softcap=4.0)
    _check_against_oracles(q, k, v, mask, causal, None, None, softcap=2.5, scale=0.3)


def test_ssmax_factor_zero_keeps_masks(kernel):
    """s*log(1)+0 = 0 must not turn a -inf or finfo.min key into an attended one (or NaN)."""
    q, k, v = _qkv(1, 2, 2, 6, 6, 8)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 1:] = float("-inf")
    mask[..., 0, 1:] = torch.finfo(torch.float32).min
    out, _ = _check_against_oracles(q, k, v, mask, False, torch.tensor([0.5, 0.4]), None)
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out))


def test_float64_matches_semantics_exactly(kernel):
    q, k, v = _qkv(2, 4, 2, 37, 70, 8, dtype=torch.float64)
    mask, causal = _mask("additive_inf", 2, 4, 37, 70, torch.float64)
    s, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    out, _ = _call(q, k, v, mask, True, s, b, 3.0)
    exact = semantics.attention(q, k, v, mask, True, None, s, b, 3.0, True)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)


def _sdpa_error(q, k, v, mask, causal, exact):
    """How far SDPA itself lands from float64 on the same low-precision inputs: our tolerance."""
    if mask is not None and causal:
        mask = mask & semantics.causal_allowed(q.shape[-2], k.shape[-2])
        causal = False
    with torch.no_grad():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["none", "causal", "padding_causal", "bool"])
def test_low_precision_within_sdpa_tolerance(kernel, dtype, kind):
    b, h, s_q, s_k, d = 2, 4, 70, 600, 32
    q, k, v = _qkv(b, h, h, s_q, s_k, d, dtype=dtype)
    mask, causal = _mask(kind, b, h, s_q, s_k)
    out, lse = _call(q, k, v, mask, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exact = semantics.attention(q.double(), k.double(), v.double(), mask, causal)
    ours = (out.double() - exact).abs().max().item()
    assert ours <= max(1.25 * _sdpa_error(q, k, v, mask, causal, exact), 1e-3), ours


def test_fp16_huge_logits_no_nan(kernel):
    """Logits of 1e4 in fp16 (and SSMax on top) must stay finite: the kernel works in fp32."""
    d = 16
    q = torch.full((1, 2, 8, d), 50.0, dtype=torch.float16)
    k = torch.full((1, 2, 16, d), 50.0, dtype=torch.float16)
    k[..., ::2, :] = -50.0
    v = torch.randn(1, 2, 16, d).half()
    out, lse = _call(q, k, v, None, True, torch.tensor([0.5, 1.0]).half(), None)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    exact = semantics.attention(q.double(), k.double(), v.double(), None, True, None, torch.tensor([0.5, 1.0]).double())
    torch.testing.assert_close(out.double(), exact, rtol=2e-3, atol=2e-3)


def test_low_precision_float_mask_threshold(kernel):
    """-1e4 rounds to -9984 in bf16; 'at or below MASKED_BELOW' is decided in the mask's dtype like semantics."""
    q, k, v = _qkv(1, 1, 1, 4, 8, 8)
    mask = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    mask[..., 3] = -1e4
    mask[..., 5] = -9000.0
    out, _ = _call(q, k, v, mask, False)
    exact = semantics.attention(q.double(), k.double(), v.double(), mask, False)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=5e-6)


# ---- backward ------------------------------------------------------------------------------

def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wrt, grad_out)


@pytest.mark.parametrize(
    "case",
    [
        dict(shape=(2, 4, 2, 45, 70, 16), kind="additive_inf", ssmax=True, softcap=3.0),
        dict(shape=(2, 4, 1, 70, 45, 16), kind="causal", ssmax=True, softcap=None),
        dict(shape=(2, 2, 2, 300, 600, 32), kind="padding_causal", ssmax=True, softcap=None),
        dict(shape=(2, 4, 4, 33, 33, 8), kind="bias", ssmax=False, softcap=5.0),
        dict(shape=(1, 2, 2, 40, 60, 8), kind="fully_masked_rows", ssmax=True, softcap=None),
    ],
    ids=["inf-ssmax-cap-gqa", "causal-mqa-sq>sk", "padding-blocks", "bias-cap", "fully-masked"],
)
def test_backward_fp32_matches_reference(kernel, case):
    b, h, hk, s_q, s_k, d = case["shape"]
    q, k, v = _qkv(b, h, hk, s_q, s_k, d)
    mask, causal = _mask(case["kind"], b, h, s_q, s_k)
    s = torch.linspace(0.3, 0.5, h) if case["ssmax"] else None
    sb = torch.linspace(-0.2, 0.2, h) if case["ssmax"] else None
    grad_out = torch.randn(b, h, s_q, d)
    inputs = [q, k, v, mask, s, sb]

    def ours(q, k, v, mask, s, sb):
        return _call(q, k, v, mask, causal, s, sb, case["softcap"])[0]

    def exact(q, k, v, mask, s, sb):
        return semantics.attention(q, k, v, mask, causal, None, s, sb, case["softcap"], hk != h)

    got = _grads(ours, inputs, grad_out)
    want = _grads(exact, [None if t is None else t.double() if t.is_floating_point() else t for t in inputs], grad_out.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize(
    "case",
    [
        dict(b=1, h=2, hk=1, s_q=5, s_k=7, kind="additive", causal=True, per_head=True, softcap=2.0),
        dict(b=2, h=2, hk=2, s_q=6, s_k=4, kind="bool", causal=True, per_head=False, softcap=None),
        dict(b=1, h=4, hk=2, s_q=3, s_k=9, kind="padding", causal=False, per_head=True, softcap=None),
    ],
    ids=["float-mask-mqa-cap", "bool-sq>sk-shared-s", "padding-gqa"],
)
def test_gradcheck_float64(kernel, case):
    d = 4
    q, k, v = _qkv(case["b"], case["h"], case["hk"], case["s_q"], case["s_k"], d, dtype=torch.float64)
    if case["kind"] == "additive":
        mask = torch.randn(1, case["h"], case["s_q"], case["s_k"], dtype=torch.float64)
        mask[..., 0, 1] = float("-inf")
        mask[..., 2, 3] = torch.finfo(torch.float64).min
    elif case["kind"] == "padding":
        mask = torch.zeros(case["b"], 1, 1, case["s_k"], dtype=torch.float64)
        mask[..., -3:] = float("-inf")
    else:
        mask = torch.rand(case["b"], 1, case["s_q"], case["s_k"]) > 0.3
    n = case["h"] if case["per_head"] else 1
    s = (torch.rand(n, dtype=torch.float64) + 0.3)
    sb = torch.rand(n, dtype=torch.float64) - 0.5
    leaves = [t.requires_grad_(t.is_floating_point()) for t in (q, k, v, mask, s, sb)]
    gqa = case["hk"] != case["h"]

    def fn(q, k, v, mask, s, sb):
        return torch.ops.attnpass.attention(q, k, v, mask, case["causal"], None, s, sb, case["softcap"], gqa)[0]

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_fully_masked_rows_have_zero_finite_gradients(kernel):
    q, k, v = _qkv(1, 2, 2, 6, 5, 8)
    mask = torch.zeros(1, 1, 6, 5)
    mask[..., 2, :] = float("-inf")
    leaves = [t.requires_grad_() for t in (q, k, v, mask)]
    out = _call(*leaves[:3], leaves[3], False, torch.tensor([0.4, 0.5], requires_grad=True))[0]
    out.sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    assert (q.grad[..., 2, :] == 0).all() and (mask.grad[..., 2, :] == 0).all()


def test_opcheck(kernel):
    q, k, v = _qkv(1, 4, 2, 9, 13, 8)
    mask = torch.randn(1, 1, 9, 13)
    s, sb = torch.rand(4), torch.rand(4)
    for args in [
        (q, k, v, mask, True, None, s, sb, 3.0, True),
        (q, k[:, :1], v[:, :1], mask > 0, False, 0.5, s[:1], None, None, False),
    ]:
        args = tuple(a.clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.attnpass.attention.default, args)


def test_avx2_variant_matches(kernel):
    """The AVX2 build (what a machine without AVX-512 runs) gives the same answers."""
    avx2 = cpu.load("AVX2")
    assert avx2 is not None and avx2.capability == "AVX2"
    q, k, v = _qkv(2, 4, 2, 70, 300, 16)
    mask, _ = _mask("additive_inf", 2, 4, 70, 300)
    args = (q, k, v, mask, True, None, torch.rand(4), torch.rand(4), 3.0, True)
    out, lse = avx2.attention_forward(*args)
    want, want_lse = kernel.attention_forward(*args)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    g = torch.randn_like(out)
    for a, b in zip(avx2.attention_backward(g, *args[:4], out, lse, *args[4:]),
                    kernel.attention_backward(g, *args[:4], want, want_lse, *args[4:])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_block_sizes_cover_every_shape():
    for s_q, s_k in [(1, 1), (191, 5), (192, 511), (5000, 9000)]:
        q_block, kv_block = cpu.blocks(s_q, s_k)
        assert q_block >= 1 and 1 <= kv_block <= max(s_k, 1)


# ---- NaN: propagated to the rows it reaches, never hidden ------------------------------------
#
# The contract (semantics.attention): a NaN in q, k, v or an additive mask reaches the output
# of every row that attends it; a NaN mask entry is not "masked" (semantics keeps keys with
# ``~(mask <= MASKED_BELOW)``); a fully masked row still gives 0.  A NaN in v at a key a row
# does *not* attend is left unspecified (0 * NaN in the P @ V product: semantics and the
# reference give NaN, the kernel skips wholly masked tiles), so the v cases put their NaN at
# key 0, which every row that has keys attends.

NAN_SHAPES = {"small": (1, 2, 2, 9, 13, 8), "blocks": (2, 2, 2, 300, 600, 32)}
NAN = float("nan")


def _nan_inputs(where: str, shape, causal: bool):
    """q, k, v and an additive mask with fully masked rows (every 7th), NaN placed per ``where``."""
    b, h, hk, s_q, s_k, d = shape
    q, k, v = _qkv(*shape, gen=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    mask = torch.randn(b, 1, s_q, s_k, generator=g) * 0.5
    mask[torch.rand(b, 1, s_q, s_k, generator=g) > 0.8] = float("-inf")
    mask[..., 0] = 0.0  # key 0 stays attendable, so the v case below reaches every live row
    mask[:, :, ::7] = float("-inf")  # fully masked rows, which must stay exactly 0
    last = s_q - 1
    if where == "q":
        q[0, 1, 3, 2] = NAN
        q[0, 1, 7, 0] = NAN  # a fully masked row: its NaN reaches nothing, output stays 0
        q[-1, 0, last, :] = NAN
    elif where == "k":
        k[0, 0, 1, 2] = NAN  # seen by every live row of batch 0, head 0 (unless masked there)
        k[-1, 1, s_k - 1, 0] = NAN  # the last key: with causal, only the last row sees it
    elif where == "v":
        v[0, 1, 0, 3] = NAN  # key 0, one feature: NaN in that column of every live row
    elif where == "mask":
        mask[0, 0, 1, 1] = NAN  # an attended position: row 1 becomes NaN (the key is not dropped)
        mask[0, 0, 7, 4] = NAN  # inside a fully masked row: NaN is not "masked", the row is NaN
        mask[-1, 0, 2, s_k - 1] = NAN  # causally hidden (S_q < S_k, row 2): stays out of the row
        if s_k > 512:  # NaN in a key tile that is otherwise wholly masked: the tile must still run
            mask[-1, 0, last, 512:] = float("-inf")
            mask[-1, 0, last, 550] = NAN
    return q, k, v, mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["q", "k", "v", "mask"])
@pytest.mark.parametrize("size", list(NAN_SHAPES))
def test_nan_propagates_like_reference_and_semantics(kernel, size, where, causal):
    shape = NAN_SHAPES[size]
    q, k, v, mask = _nan_inputs(where, shape, causal)
    s = torch.linspace(0.3, 0.5, shape[1]) if size == "blocks" else None  # SSMax counts NaN keys as attendable
    out, lse = _call(q, k, v, mask, causal, s)
    ref_out, ref_lse = reference.attention_forward(q, k, v, mask, causal, None, s)
    exact = semantics.attention(q.double(), k.double(), v.double(), mask.double(), causal, None,
                                None if s is None else s.double())
    dead = torch.isneginf(ref_lse)  # rows with no attendable key
    nan_rows = out.isnan().any(-1)
    assert nan_rows.any() and not nan_rows.all(), "the case must have both NaN and clean rows"
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(lse.isnan(), ref_lse.isnan())
    # lse is NaN exactly where the output is, except that v does not enter the logits.
    assert torch.equal(lse.isnan(), nan_rows if where != "v" else torch.zeros_like(nan_rows))
    # semantics' P @ V turns a NaN in v into NaN even in rows whose P is all 0; the contract says 0 there.
    live = ~dead.unsqueeze(-1).expand_as(out)
    assert torch.equal(out.isnan()[live], exact.isnan()[live])
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=5e-6, equal_nan=True)
    torch.testing.assert_close(out.double()[live], exact[live], rtol=1e-5, atol=5e-6, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("where", ["q", "k", "v", "mask"])
@pytest.mark.parametrize("size", list(NAN_SHAPES))
def test_nan_reaches_gradients(kernel, size, where):
    """A row whose output is NaN has an all-NaN dq (not the 0 a 'fully masked' row gets), and
    fully masked rows keep exactly zero dq and dmask whatever NaN sits in v or their q, as the
    autograd of semantics.attention gives."""
    shape = NAN_SHAPES[size]
    q, k, v, mask = _nan_inputs(where, shape, True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    out = _call(*leaves, True)[0]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    dq, dk, dv, dmask = torch.autograd.grad(out, leaves, grad_out)
    nan_rows = out.isnan().any(-1)
    assert nan_rows.any()
    assert dq.isnan().all(-1)[nan_rows].all()
    exact = [t.double().requires_grad_() for t in (q, k, v, mask)]
    want = torch.autograd.grad(semantics.attention(*exact, True), exact, grad_out.double())
    if where != "k":  # a NaN key enters every row's dq through dq = dS @ K (0 * NaN), in semantics too
        dead = torch.isneginf(reference.attention_forward(q, k, v, mask, True)[1])
        assert (dq[dead] == 0).all() and (dmask.expand(*dead.shape, -1)[dead] == 0).all()
        assert torch.equal(dq.isnan().all(-1), want[0].isnan().all(-1))
    for g, w in zip((dq, dk, dv, dmask), want):
        assert bool(g.isnan().any()) == bool(w.isnan().any())  # a NaN gradient is never silently zeroed
