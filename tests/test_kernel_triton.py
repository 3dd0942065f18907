"""The Triton attention kernel against the blocked reference and float64 semantics, forward and backward.

Every test runs twice: ``interp`` runs the exact Triton source through Triton's interpreter
on CPU tensors at small shapes (always), ``cuda`` runs the compiled kernels at real sizes
(marked ``gpu``; deselected by ``conftest.py`` where there is no CUDA).  The interpreter
variant is built in-process without touching ``TRITON_INTERPRET`` for anyone else (see
``attnpass.kernels.triton``), so the order in which test files import Triton does not matter.

Comparisons scale with the reference's magnitude (``_close``) so one tolerance serves a
37-row problem and a 2048-row one, whose gradients sum over 50 times more terms.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from attnpass import kernels, semantics
from attnpass.kernels import reference
from attnpass.kernels import triton as triton_kernels


@dataclass
class Target:
    """Which kernel variant runs, on which device, at which problem sizes."""

    kernel: triton_kernels.TritonKernel
    device: str
    big: bool

    def pick(self, small, big):
        return big if self.big else small


@pytest.fixture(
    scope="module",
    params=["interp", pytest.param("cuda", marks=pytest.mark.gpu)],
)
def target(request) -> Target:
    if request.param == "interp":
        kernel = triton_kernels.load_interpreted()
        assert kernel is not None and kernel.interpreted, "Triton's interpreter kernel could not be built"
        return Target(kernel, "cpu", False)
    kernel = triton_kernels.load()
    assert kernel is not None and not kernel.interpreted, "CUDA is present but the compiled Triton kernel is not"
    return Target(kernel, "cuda", True)


def _qkv(t: Target, b, h, hk, s_q, s_k, d, dtype=torch.float32, dv=None, kv_batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s_q, d, generator=g)
    k = torch.randn(kv_batch or b, hk, s_k, d, generator=g)
    v = torch.randn(kv_batch or b, hk, s_k, dv or d, generator=g)
    return tuple(x.to(device=t.device, dtype=dtype) for x in (q, k, v))


def _mask(kind: str, b: int, h: int, s_q: int, s_k: int, device: str, dtype=torch.float32):
    """(attn_mask, is_causal) for each mask kind the kernel must handle; broadcast shapes included."""
    g = torch.Generator().manual_seed(1)
    m: torch.Tensor | None = None
    causal = False
    if kind == "causal":
        causal = True
    elif kind == "bool":  # [B, 1, S_q, S_k]: broadcast over heads
        m = torch.rand(b, 1, s_q, s_k, generator=g) > 0.3
        m[..., 0] = True
    elif kind == "padding_causal":  # [B, 1, 1, S_k]: the last batch pads most keys, whole blocks included
        m = torch.ones(b, 1, 1, s_k, dtype=torch.bool)
        m[-1, ..., max(1, s_k // 3):] = False
        causal = True
    elif kind == "additive_inf":  # full [B, H, S_q, S_k]
        m = torch.randn(b, h, s_q, s_k, generator=g)
        m[torch.rand(b, h, s_q, s_k, generator=g) > 0.7] = float("-inf")
        m = m.to(dtype)
    elif kind == "finfo_min":  # [1, 1, S_q, S_k]
        m = torch.zeros(1, 1, s_q, s_k, dtype=dtype)
        m[..., s_k // 2:] = torch.finfo(dtype).min
    elif kind == "bias":  # ALiBi-like [1, H, S_q, S_k] finite bias
        pos = torch.arange(s_k) - torch.arange(s_q).unsqueeze(-1)
        slopes = torch.linspace(0.1, 0.5, h).reshape(h, 1, 1)
        m = (-slopes * pos.abs()).unsqueeze(0).to(dtype)
    elif kind == "fully_masked_rows":
        m = torch.rand(b, h, s_q, s_k, generator=g) > 0.5
        m[:, :, ::3] = False
    elif kind == "padding_additive":  # [B, 1, 1, S_k] float: its gradient is summed over rows in-kernel
        m = torch.zeros(b, 1, 1, s_k, dtype=dtype)
        m[-1, ..., max(1, s_k // 2):] = float("-inf")
        m[0, ..., 1] = 0.5
    elif kind != "none":
        raise AssertionError(kind)
    return (None if m is None else m.to(device)), causal


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    """Max error within ``tol`` of the reference's magnitude (at least 1); NaN/inf must match in place."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[~fin], want[~fin], rtol=0, atol=0, equal_nan=True, msg=f"{what}: non-finite entries")
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite where the reference is finite"
    if fin.any():
        err = (got[fin] - want[fin]).abs().max().item()
        scale = max(1.0, want[fin].abs().max().item())
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def _forward(t: Target, q, k, v, mask=None, causal=False, s=None, b=None, softcap=None, scale=None):
    gqa = k.shape[1] != q.shape[1]
    return t.kernel.attention_forward(q, k, v, mask, causal, scale, s, b, softcap, gqa)


def _check_forward(t: Target, q, k, v, mask=None, causal=False, s=None, b=None, softcap=None, scale=None, tol=1e-5):
    """Against the blocked reference (same fp32 arithmetic) and float64 semantics; returns (out, lse)."""
    out, lse = _forward(t, q, k, v, mask, causal, s, b, softcap, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.device == q.device
    gqa = k.shape[1] != q.shape[1]
    ref_out, ref_lse = reference.attention_forward(q, k, v, mask, causal, scale, s, b, softcap, gqa)
    _close(out, ref_out, tol, "out vs reference")
    _close(lse, ref_lse.float(), tol, "lse vs reference")
    # The mask stays in its dtype: semantics decides "masked" there (-1e4 is -9984 in bf16).
    exact = semantics.attention(q.double(), k.double(), v.double(), mask, causal, scale,
                                None if s is None else s.double(), None if b is None else b.double(), softcap, gqa)
    _close(out, exact, tol, "out vs float64 semantics")
    return out, lse


# ---- loading and routing -------------------------------------------------------------------

def test_loading_and_routing(target):
    """CUDA tensors go to the compiled kernel; CPU tensors never go to Triton; loading leaves the env alone."""
    before = os.environ.get("TRITON_INTERPRET")
    assert triton_kernels.load_interpreted() is triton_kernels.load_interpreted()
    assert os.environ.get("TRITON_INTERPRET") == before
    assert kernels.active_backend("cpu") != "triton"
    if target.device == "cuda":
        assert triton_kernels.load() is target.kernel
        assert kernels.active_backend("cuda") == "triton"
        q, k, v = _qkv(target, 2, 4, 2, 256, 320, 64, dtype=torch.bfloat16)
        out = torch.ops.attnpass.attention(q, k, v, None, True, None, None, None, None, True)[0]
        want = semantics.attention(q.double(), k.double(), v.double(), None, True, None, None, None, None, True)
        _close(out, want, 2e-2)
    else:
        if not torch.cuda.is_available() and before is None:
            assert triton_kernels.load() is None
        assert triton_kernels.load(interpret_ok=True) is (
            target.kernel if not torch.cuda.is_available() or before == "1" else triton_kernels.load()
        )


def test_interpret_env_selects_interpreter(target, monkeypatch):
    """``TRITON_INTERPRET=1`` makes ``load()`` hand out the interpreter kernel, GPU or not."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernels.load() is triton_kernels.load_interpreted()


# ---- forward -------------------------------------------------------------------------------

# (B, H, H_kv, S_q, S_k, D, Dv, kv_batch): S=1, S not a multiple of any block, S_q < S_k, S_q > S_k,
# GQA, MQA without the GQA flag's head counts matching, head dims to pad, Dv != D, K/V shared
# across the batch (stride 0).
SMALL_SHAPES = [
    (1, 1, 1, 1, 1, 16, None, None),
    (2, 2, 2, 37, 45, 16, None, None),
    (1, 2, 2, 45, 20, 32, None, None),
    (2, 4, 1, 33, 50, 16, None, None),
    (1, 4, 2, 40, 29, 24, 40, 1),
]
BIG_SHAPES = [
    (1, 4, 4, 1, 2048, 64, None, None),
    (2, 8, 8, 1024, 1024, 64, None, None),
    (1, 8, 2, 777, 2048, 128, None, None),
    (2, 8, 1, 2048, 513, 32, None, None),
    (2, 8, 2, 1000, 1000, 80, 48, 1),
]


@pytest.mark.parametrize("which", range(len(SMALL_SHAPES)))
@pytest.mark.parametrize("causal", [False, True])
def test_forward_shapes_fp32(target, which, causal):
    b, h, hk, s_q, s_k, d, dv, kvb = target.pick(SMALL_SHAPES, BIG_SHAPES)[which]
    q, k, v = _qkv(target, b, h, hk, s_q, s_k, d, dv=dv, kv_batch=kvb)
    _check_forward(target, q, k, v, None, causal)


def test_forward_strided_inputs(target):
    """Q/K/V as views of a ``[B, S, H, D]`` layout (no copy): the kernels read any strides."""
    b, h, s, d = target.pick((2, 2, 40, 16), (2, 8, 1024, 64))
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, s, 3, h, d, generator=g).to(target.device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check_forward(target, q, k, v, None, True)


MASK_KINDS = ["none", "causal", "bool", "padding_causal", "additive_inf", "finfo_min", "bias", "fully_masked_rows",
              "padding_additive"]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_forward_masks_fp32(target, kind):
    b, h, hk, s_q, s_k, d = target.pick((2, 4, 2, 45, 61, 16), (2, 8, 2, 1024, 1536, 64))
    q, k, v = _qkv(target, b, h, hk, s_q, s_k, d)
    mask, causal = _mask(kind, b, h, s_q, s_k, target.device)
    out, lse = _check_forward(target, q, k, v, mask, causal)
    assert not out.isnan().any()
    if kind == "fully_masked_rows":
        assert (out[:, :, ::3] == 0).all()
        assert torch.isneginf(lse[:, :, ::3]).all()


@pytest.mark.parametrize("kind", ["none", "causal", "padding_causal", "additive_inf", "fully_masked_rows"])
@pytest.mark.parametrize("per_head", [False, True])
def test_forward_ssmax_softcap_fp32(target, kind, per_head):
    """SSMax with n_i from the causal limit (in-kernel) and from masks (count pre-pass), with and without softcap."""
    b, h, hk, s_q, s_k, d = target.pick((2, 4, 2, 40, 57, 16), (2, 8, 2, 1024, 1536, 64))
    q, k, v = _qkv(target, b, h, hk, s_q, s_k, d)
    mask, causal = _mask(kind, b, h, s_q, s_k, target.device)
    n = h if per_head else 1
    s = torch.linspace(0.2, 0.6, n, device=target.device)
    sb = torch.linspace(-0.3, 0.4, n, device=target.device)
    _check_forward(target, q, k, v, mask, causal, s, sb, softcap=3.0)
    _check_forward(target, q, k, v, mask, causal, s, None, softcap=None, scale=0.3)


def test_forward_softcap_only_small_and_large_logits(target):
    """The tanh covers |x| < 0.1 (polynomial branch), large logits (saturation) and a custom scale."""
    b, h, s, d = target.pick((1, 2, 33, 32), (2, 4, 1024, 128))
    q, k, v = _qkv(target, b, h, h, s, s, d)
    _check_forward(target, q * 0.05, k, v, None, False, softcap=2.0)
    _check_forward(target, q * 8.0, k, v, None, True, softcap=10.0, scale=0.5)


def test_ssmax_factor_zero_keeps_masks(target):
    """s*log(1)+0 = 0 must not turn a -inf or finfo.min key into an attended one (or NaN)."""
    q, k, v = _qkv(target, 1, 2, 2, 6, 6, 16)
    mask = torch.zeros(1, 1, 6, 6, device=target.device)
    mask[..., 1:] = float("-inf")
    mask[..., 0, 1:] = torch.finfo(torch.float32).min
    out, _ = _check_forward(target, q, k, v, mask, False, torch.tensor([0.5, 0.4], device=target.device))
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out))


def _sdpa_error(q, k, v, mask, causal, exact):
    """How far SDPA lands from float64 on the same low-precision inputs: the contract's tolerance."""
    if mask is not None and causal:
        mask = mask & semantics.causal_allowed(q.shape[-2], k.shape[-2], q.device)
        causal = False
    with torch.no_grad():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return (got.double() - exact).abs().max().item()


def _tensor_core_error(q, k, v, mask, causal, exact):
    """Error of the tensor-core recipe itself: fp32 scores, P rounded to the input dtype before P@V.

    Every fused GPU kernel (SDPA's flash and cuDNN backends included) feeds P to the second
    matmul in bf16/fp16; CPU SDPA keeps it in fp32 and so sets a bar no tensor-core kernel
    meets.  This computes, in plain torch, what that recipe loses on these inputs.
    """
    z = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    allowed = semantics.allowed_keys(z.shape, mask, causal, q.device)
    z = z.masked_fill(~allowed, float("-inf"))
    m = z.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    p = torch.exp(z - m)
    out = (p.to(q.dtype).float() @ v.float()) / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return (out.to(q.dtype).double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["none", "causal", "padding_causal"])
def test_forward_low_precision_within_sdpa_tolerance(target, dtype, kind):
    """Within 1.25x of SDPA's error against float64 on the same inputs (or of the tensor-core recipe's).

    On CUDA, SDPA is the flash/cuDNN kernel, which rounds P the way this kernel does; on CPU,
    SDPA keeps P in fp32, so the bar there is the recipe's own error (``_tensor_core_error``).
    """
    b, h, s_q, s_k, d = target.pick((2, 2, 40, 64, 32), (2, 8, 1024, 2048, 128))
    q, k, v = _qkv(target, b, h, h, s_q, s_k, d, dtype=dtype)
    mask, causal = _mask(kind, b, h, s_q, s_k, target.device)
    out, lse = _forward(target, q, k, v, mask, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exact = semantics.attention(q.double(), k.double(), v.double(), mask, causal)
    ours = (out.double() - exact).abs().max().item()
    bar = max(_sdpa_error(q, k, v, mask, causal, exact), _tensor_core_error(q, k, v, mask, causal, exact))
    assert ours <= max(1.25 * bar, 1e-3), (ours, bar)


def test_forward_fp16_huge_logits_no_nan(target):
    """Logits of 1e4 in fp16 (and SSMax on top) stay finite: scores live in fp32."""
    d = 16
    s_q, s_k = target.pick((8, 16), (512, 1024))
    q = torch.full((1, 2, s_q, d), 50.0, dtype=torch.float16, device=target.device)
    k = torch.full((1, 2, s_k, d), 50.0, dtype=torch.float16, device=target.device)
    k[..., ::2, :] = -50.0
    v = torch.randn(1, 2, s_k, d, device=target.device).half()
    s = torch.tensor([0.5, 1.0], device=target.device).half()
    out, lse = _forward(target, q, k, v, None, True, s)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    exact = semantics.attention(q.double(), k.double(), v.double(), None, True, None, s.double())
    _close(out, exact, 2e-3)


def test_forward_low_precision_mask_threshold(target):
    """-1e4 rounds to -9984 in bf16: 'at or below MASKED_BELOW' is decided in the mask's dtype, like semantics."""
    q, k, v = _qkv(target, 1, 1, 1, 4, 8, 16)
    mask = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16, device=target.device)
    mask[..., 3] = -1e4
    mask[..., 5] = -9000.0
    _check_forward(target, q, k, v, mask, False, torch.tensor([0.3], device=target.device))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, inside the interpreter
def test_forward_nan_propagates(target):
    """A NaN in a query row, or a NaN mask entry (not a masked key), reaches exactly the rows it touches."""
    b, h, s, d = target.pick((1, 2, 24, 16), (1, 4, 512, 64))
    q, k, v = _qkv(target, b, h, h, s, s, d)
    q[0, 0, 5, 3] = float("nan")
    mask = torch.zeros(1, 1, s, s, device=target.device)
    mask[..., 9, 2] = float("nan")
    mask[..., 11, 1:] = float("-inf")
    out, lse = _forward(target, q, k, v, mask, False, torch.tensor([0.4], device=target.device))
    want = semantics.attention(q.double(), k.double(), v.double(), mask.double(), False, None,
                               torch.tensor([0.4], dtype=torch.float64, device=target.device))
    assert (out.isnan() == want.isnan()).all()
    assert out[0, 0, 5].isnan().all() and out[:, :, 9].isnan().all() and not out[0, 1, 5].isnan().any()
    _close(out, want, 1e-5)


def test_float64_goes_to_reference(target):
    """float64 (gradcheck) is served by the reference: the kernels accumulate in fp32."""
    q, k, v = _qkv(target, 1, 2, 1, 9, 13, 8, dtype=torch.float64)
    out, lse = _forward(target, q, k, v, None, True, torch.tensor([0.3, 0.5], dtype=torch.float64, device=target.device))
    want = semantics.attention(q, k, v, None, True, None, torch.tensor([0.3, 0.5], dtype=torch.float64,
                                                                       device=target.device), None, None, True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert lse.dtype == torch.float32


# ---- backward ------------------------------------------------------------------------------

def _ours_grads(t: Target, q, k, v, mask, causal, s, sb, softcap, scale, grad_out):
    gqa = k.shape[1] != q.shape[1]
    out, lse = t.kernel.attention_forward(q, k, v, mask, causal, scale, s, sb, softcap, gqa)
    return t.kernel.attention_backward(grad_out, q, k, v, mask, out, lse, causal, scale, s, sb, softcap, gqa)


def _exact_grads(q, k, v, mask, causal, s, sb, softcap, scale, grad_out):
    """Autograd through float64 semantics; None where an input takes no gradient."""
    def leaf(x):
        if x is None or not x.is_floating_point():
            return None
        return x.detach().double().requires_grad_()

    leaves = [leaf(x) for x in (q, k, v, mask, s, sb)]
    args = [lf if lf is not None else x for lf, x in zip(leaves, (q, k, v, mask, s, sb))]
    out = semantics.attention(*args[:4], causal, scale, args[4], args[5], softcap, k.shape[1] != q.shape[1])
    wrt = [lf for lf in leaves if lf is not None]
    grads = iter(torch.autograd.grad(out, wrt, grad_out.double()))
    return [next(grads) if lf is not None else None for lf in leaves]


BACKWARD_CASES = {
    "inf-ssmax-cap-gqa": dict(kind="additive_inf", ssmax=True, per_head=True, softcap=3.0, hk=2),
    "causal-mqa-sq>sk": dict(kind="causal", ssmax=True, per_head=False, softcap=None, hk=1, swap=True),
    "padding-bool-causal": dict(kind="padding_causal", ssmax=True, per_head=True, softcap=None, hk=4),
    "bias-cap-noss": dict(kind="bias", ssmax=False, per_head=False, softcap=5.0, hk=4),
    "padding-additive-rowsum": dict(kind="padding_additive", ssmax=True, per_head=True, softcap=2.0, hk=2),
    "fully-masked-rows": dict(kind="fully_masked_rows", ssmax=True, per_head=True, softcap=None, hk=2),
    "plain-kv-batch-shared": dict(kind="none", ssmax=False, per_head=False, softcap=None, hk=2, kv_batch=1, dv=24),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES), ids=list(BACKWARD_CASES))
def test_backward_fp32_matches_float64(target, case):
    c = BACKWARD_CASES[case]
    b, h, s_q, s_k, d = target.pick((2, 4, 37, 53, 16), (2, 8, 777, 1024, 64))
    if c.get("swap"):
        s_q, s_k = s_k, s_q
    q, k, v = _qkv(target, b, h, c["hk"], s_q, s_k, d, dv=c.get("dv"), kv_batch=c.get("kv_batch"))
    mask, causal = _mask(c["kind"], b, h, s_q, s_k, target.device)
    n = h if c["per_head"] else 1
    s = torch.linspace(0.3, 0.5, n, device=target.device) if c["ssmax"] else None
    sb = torch.linspace(-0.2, 0.2, n, device=target.device) if c["ssmax"] else None
    grad_out = torch.randn(b, h, s_q, v.shape[-1], generator=torch.Generator().manual_seed(7)).to(target.device)
    got = _ours_grads(target, q, k, v, mask, causal, s, sb, c["softcap"], None, grad_out)
    want = _exact_grads(q, k, v, mask, causal, s, sb, c["softcap"], None, grad_out)
    for name, g, w, x in zip(("dq", "dk", "dv", "dmask", "ds", "db"), got, want, (q, k, v, mask, s, sb)):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, name
        _close(g, w, 1e-4, name)
    if c["kind"] == "fully_masked_rows":
        assert (got[0][:, :, ::3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_low_precision_within_sdpa_tolerance(target, dtype):
    """Plain causal gradients in bf16/fp16 land as close to float64 as SDPA's own backward does."""
    b, h, s_q, s_k, d = target.pick((1, 2, 40, 56, 32), (2, 8, 1024, 1024, 128))
    q, k, v = _qkv(target, b, h, h, s_q, s_k, d, dtype=dtype)
    grad_out = torch.randn(b, h, s_q, d, generator=torch.Generator().manual_seed(7)).to(target.device, dtype)
    got = _ours_grads(target, q, k, v, None, True, None, None, None, None, grad_out)[:3]
    want = _exact_grads(q, k, v, None, True, None, None, None, None, grad_out)[:3]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    # SDPA's is_causal is top-left aligned; the explicit mask gives it our bottom-right meaning.
    sd = F.scaled_dot_product_attention(*leaves, attn_mask=semantics.causal_allowed(s_q, s_k, q.device))
    sdpa = torch.autograd.grad(sd, leaves, grad_out)
    for name, g, w, ref in zip(("dq", "dk", "dv"), got, want, sdpa):
        ours = (g.double() - w).abs().max().item()
        theirs = (ref.double() - w).abs().max().item()
        assert ours <= max(2.0 * theirs, 1e-2 * max(1.0, w.abs().max().item())), (name, ours, theirs)


# ---- every Hopper tiling -------------------------------------------------------------------

def test_every_hopper_tiling(target):
    """Each autotuning config's tiles, pinned, gives the same answers (the interpreter tests the tiling logic).

    Shapes are chosen so that the largest tiles see several blocks, a ragged edge and the causal
    diagonal at an offset (S_q != S_k).
    """
    table = target.kernel.hopper_configs
    b, h, hk, s_q, s_k, d = target.pick((1, 2, 1, 150, 170, 16), (2, 8, 2, 1100, 1300, 128))
    q, k, v = _qkv(target, b, h, hk, s_q, s_k, d)
    mask, _ = _mask("padding_additive", b, h, s_q, s_k, target.device)
    s = torch.tensor([0.4, 0.3], device=target.device)
    grad_out = torch.randn(b, h, s_q, d, generator=torch.Generator().manual_seed(7)).to(target.device)
    want_out, _ = reference.attention_forward(q, k, v, mask, True, None, s, None, 2.0, True)
    want = reference.attention_backward(grad_out, q, k, v, mask, True, None, s, None, 2.0, True)
    # Only what the autotuner may pick for this shape: on a GPU, fp32 K/V tiles of the largest
    # configs at D=128 exceed shared memory, and the prune hook never offers them (the interpreter keeps all).
    import triton

    mod = target.kernel._k
    flags = dict(D_PAD=d, DV_PAD=d, MASK_KIND=2, MASK_ROWB=True, S_BUCKET=1 << 30)
    table = {name: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in mod._prune(
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in cfgs],
        {"Q": q, "Mask": mask}, kernel=name, **flags)] for name, cfgs in table.items()}
    if target.kernel.interpreted:
        assert table == target.kernel.hopper_configs
    rounds = max(len(x) for x in table.values())
    for i in range(rounds):
        blocks = {name: cfgs[i % len(cfgs)] for name, cfgs in table.items()}
        pinned = target.kernel.with_blocks(blocks)
        out, lse = pinned.attention_forward(q, k, v, mask, True, None, s, None, 2.0, True)
        _close(out, want_out, 1e-5, f"out {blocks}")
        got = pinned.attention_backward(grad_out, q, k, v, mask, out, lse, True, None, s, None, 2.0, True)
        for name, g, w in zip(("dq", "dk", "dv", "dmask", "ds"), got, want):
            _close(g, w, 1e-4, f"{name} {blocks}")


def test_autotune_space_is_hopper_sized(target):
    """The compiled variant tunes over the Hopper and Ampere tables (its prune hook keeps the device's);
    the interpreter runs one small config.  Only Ampere's D=128 dK/dV tile runs unpipelined."""
    configs = target.kernel.configs
    hopper, ampere = target.kernel.hopper_configs, target.kernel.ampere_configs
    if target.kernel.interpreted:
        assert all(len(v) == 1 for v in configs.values())
    else:
        assert configs == {k: v + [c for c in ampere[k] if c not in v] for k, v in hopper.items()}
    for table, min_stages in ((hopper, 2), (ampere, 1)):
        for cfgs in table.values():
            for bm, bn, warps, stages in cfgs:
                assert bm >= 16 and bn >= 16 and math.log2(bm).is_integer() and math.log2(bn).is_integer()
                assert warps in (4, 8) and stages >= min_stages


def test_autotune_pruning_keeps_a_config(target):
    """The pruning hook (GPU-only in effect) drops oversized tiles and never returns an empty list."""
    import triton

    mod = target.kernel._k
    for name, cfgs in target.kernel.hopper_configs.items():
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in cfgs]
        for d_pad, bucket in [(64, 4096), (128, 4096), (256, 4096), (64, 16)]:
            kept = mod._prune(configs, {"S_BUCKET": bucket}, D_PAD=d_pad, DV_PAD=d_pad)
            assert kept, (name, d_pad, bucket)
            if d_pad > 128 and len(kept) < len(configs):
                assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept)


def test_interp_mask_gradient_skipped_when_not_needed() -> None:
    """A float mask that needs no gradient gets none, and the other gradients do not change."""
    from attnpass.kernels import triton as tk

    kern = tk.load_interpreted()
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 9:] = float("-inf")
    mask[..., :3] = 0.25
    out, lse = kern.attention_forward(q, k, v, mask, False, None, None, None, None, False)
    do = torch.randn_like(out)
    full = kern.attention_backward(do, q, k, v, mask, out, lse, False, None, None, None, None, False)
    skipped = kern.attention_backward(do, q, k, v, mask, out, lse, False, None, None, None, None, False,
                                      need_mask_grad=False)
    assert full[3] is not None and full[3].shape == mask.shape and skipped[3] is None
    for a, b in zip(full[:3], skipped[:3]):
        torch.testing.assert_close(a, b)


# ---- an fp32 mask with bf16/fp16 inputs: converted once, same keys masked -------------------

def _fp32_mask_case(dtype: torch.dtype, s: int = 16):
    """bf16/fp16 q/k/v with an fp32 mask whose entries sit on both sides of MASKED_BELOW and whose bias rounds.

    Keys 3-5 are masked in fp32 (-1e4 exactly, finfo(float32).min, -10001, which rounds to -9984 in
    bf16); key 6 is kept (-9997, which rounds to -10000 in fp16); keys 8+ carry a bias in [1000, 1010],
    where bf16 and fp16 steps (4 and 0.5) move the logits.  Row 2 has only keys 3 and 6 left.
    """
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, s, 16, generator=g).to(dtype) for _ in range(3))
    m = torch.zeros(1, 1, s, s)
    m[..., 3], m[..., 4], m[..., 5], m[..., 6] = -1e4, torch.finfo(torch.float32).min, -10001.0, -9997.0
    m[..., 8:] = 1000 + 10 * torch.rand(s, s - 8, generator=g)
    m[0, 0, 2, :] = float("-inf")
    m[0, 0, 2, 3], m[0, 0, 2, 6] = -1e4, -9997.0
    # What the kernels must compute with: the fp32 decision on which keys are masked, the bias rounded
    # to the inputs' dtype (a kept entry that rounds onto the threshold keeps its fp32 value, so the
    # reference, which re-decides in fp32, still keeps it; its weight is exp(-1e4) but for row 2).
    rounded = m.to(dtype).float()
    want = torch.where(m <= semantics.MASKED_BELOW, float("-inf"), torch.where(rounded <= semantics.MASKED_BELOW, m, rounded))
    return q, k, v, m, want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interp_fp32_mask_low_precision_inputs(dtype) -> None:
    """Same keys masked as the fp32 mask says (SSMax counts them, row 2 attends only key 6); the bias rounded
    to the inputs' dtype, as SDPA requires of a float mask, matching the reference to bf16/fp16 accuracy."""
    kern = triton_kernels.load_interpreted()
    q, k, v, m, want = _fp32_mask_case(dtype)
    s = torch.tensor([0.4, 0.6])
    out, lse = kern.attention_forward(q, k, v, m, False, None, s, None, None, False)
    ref_out, ref_lse = reference.attention_forward(q, k, v, want, False, None, s, None, None, False)
    _close(out, ref_out, 2e-2, "out vs reference with the rounded bias")
    _close(lse, ref_lse.float(), 1e-4, "lse vs reference with the rounded bias")
    torch.testing.assert_close(out[0, :, 2].float(), v[0, :, 6].float(), rtol=0, atol=0)  # only key 6 is left
    # The rounding is visible at this tolerance: the unrounded fp32 bias gives a different answer.
    unrounded, _ = reference.attention_forward(q, k, v, m, False, None, s, None, None, False)
    assert (unrounded.float() - ref_out.float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interp_fp32_mask_low_precision_backward(dtype) -> None:
    """The backward converts the same way (consistent with the forward's lse); no mask gradient is asked for."""
    kern = triton_kernels.load_interpreted()
    q, k, v, m, want = _fp32_mask_case(dtype)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    s = torch.tensor([0.4, 0.6])
    out, lse = kern.attention_forward(q, k, v, m, False, None, s, None, None, False)
    got = kern.attention_backward(do, q, k, v, m, out, lse, False, None, s, None, None, False, need_mask_grad=False)
    ref = reference.attention_backward(do, q, k, v, want, False, None, s, None, None, False)
    assert got[3] is None
    # dq/dk/dv only: ds sums logits of ~1000 times probabilities, so its bf16/fp16 error says nothing here.
    for name, g, w in zip(("dq", "dk", "dv"), got, ref):
        _close(g, w, 3e-2, name)


def test_fp32_mask_is_narrowed_once_unless_it_needs_a_gradient() -> None:
    """The kernels see the inputs' dtype and a -inf threshold; a mask that requires grad keeps today's fp32 path;
    a broadcast padding mask keeps its row stride 0 (staged as a vector); a same-width mask is left alone."""
    q = torch.zeros(2, 2, 8, 16, dtype=torch.bfloat16)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 5] = -1e4

    def problem(mask, qq=q):
        return triton_kernels._Problem(qq, qq, qq, mask, False, None, None, None, None, True)

    p = problem(m)
    assert p.mask.dtype == torch.bfloat16 and p.mask_thr == float("-inf")
    assert torch.isneginf(p.mask[..., 5]).all() and (p.mask[..., :5] == 0).all()
    p = problem(m.clone().requires_grad_())
    assert p.mask.dtype == torch.float32 and p.mask_thr == float(torch.tensor(-1e4))
    pad = torch.zeros(2, 1, 1, 8).expand(2, 1, 8, 8)
    p = problem(pad)
    assert p.mask.dtype == torch.bfloat16 and p.mask_rowb
    p = problem(m.to(torch.bfloat16))
    assert p.mask.dtype == torch.bfloat16 and p.mask_thr == float(torch.tensor(-1e4, dtype=torch.bfloat16))
    p = problem(m, q.float())
    assert p.mask.dtype == torch.float32 and p.mask_thr == -1e4
