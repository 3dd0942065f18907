"""SDPA's ``is_causal`` is aligned top-left; ``attnpass::attention``'s (and ``semantics``') bottom-right.

With fewer queries than keys (chunked prefill, a cross-attention written causal) the two masks differ, so a
rewrite that carried the flag over would silently change the model: each IR's rewrite of such an SDPA call is
compared here with SDPA itself (fused) and with SSMax counted over SDPA's own mask (``n_i = i + 1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)
from torch import nn

import attnpass
import attnpass.mlir as am
from attnpass import semantics

S = 0.43


class CausalSdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _qkv(sq: int, sk: int):
    g = torch.Generator().manual_seed(sq * 31 + sk)
    return tuple(torch.randn(1, 2, n, 8, generator=g) for n in (sq, sk, sk))


def _ssmax_want(q, k, v, s=S):
    """SSMax over SDPA's top-left causal mask, written out (not through the code under test)."""
    allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    n = allowed.sum(-1).to(q.dtype)
    return F.scaled_dot_product_attention(q * (s * torch.log(n)).view(1, 1, -1, 1), k, v, attn_mask=allowed)


def test_the_two_conventions_differ_here():
    """The test shapes are ones where carrying the flag over is wrong (so the checks below can fail)."""
    q, k, v = _qkv(4, 6)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    bottom_right = semantics.attention(q, k, v, is_causal=True)
    assert (top_left - bottom_right).abs().max() > 0.1
    assert torch.equal(semantics.sdpa_causal_mask(q, k), torch.ones(4, 6, dtype=torch.bool).tril())


def test_ssmax_sdpa_counts_sdpas_own_mask():
    q, k, v = _qkv(4, 6)
    got = semantics.ssmax_sdpa(q, k, v, None, 0.0, True, None, False, S)
    torch.testing.assert_close(got, _ssmax_want(q, k, v), rtol=1e-5, atol=1e-6)


def test_fx_fuse_and_ssmax_keep_sdpas_alignment():
    q, k, v = _qkv(4, 6)
    m = CausalSdpa()
    ref = m(q, k, v)
    fused = attnpass.fuse(m, (q, k, v))
    assert fused.attnpass_result.rewritten
    torch.testing.assert_close(fused(q, k, v), ref, rtol=1e-5, atol=1e-6)
    want = _ssmax_want(q, k, v)
    torch.testing.assert_close(attnpass.to_ssmax(m, (q, k, v), s=S)(q, k, v), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attnpass.to_ssmax(m, (q, k, v), s=S, fused=True)(q, k, v), want, rtol=1e-5, atol=1e-5)


def _causal_flags(gm) -> list:
    op = torch.ops.attnpass.attention.default
    return [n.args[4] for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


class SelfCausalSdpa(nn.Module):
    """Queries and keys from one input: one sequence length for every input, even with dynamic shapes."""

    def forward(self, x):
        return F.scaled_dot_product_attention(x * 0.5, x, x.flip(-1), is_causal=True)


def test_provably_equal_lengths_keep_the_fast_flag():
    """Where both conventions agree for every input (S_q and S_k one size) the op keeps is_causal, whose kernels
    skip masked tiles; two inputs of separate (dynamic) lengths get SDPA's mask instead."""
    (x,) = _qkv(6, 6)[:1]
    m = SelfCausalSdpa()
    fused = attnpass.fuse(m, (x,))
    assert _causal_flags(fused) == [True]
    torch.testing.assert_close(fused(x), m(x), rtol=1e-5, atol=1e-6)
    q, k, v = _qkv(4, 6)
    assert _causal_flags(attnpass.fuse(CausalSdpa(), (q, k, v))) == [False]


def test_compile_backend_fused_and_ssmax():
    q, k, v = _qkv(4, 6)
    m = CausalSdpa()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, backend="attnpass", options={"inner": "eager"})(q, k, v), m(q, k, v),
                               rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    got = torch.compile(m, backend="attnpass", options={"rewrite": "ssmax", "s": S, "inner": "eager"})(q, k, v)
    torch.testing.assert_close(got, _ssmax_want(q, k, v), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_mlir_fused_and_ssmax():
    q, k, v = _qkv(4, 6)
    m = CausalSdpa()
    for to, want in (("fused", m(q, k, v)), ("ssmax", _ssmax_want(q, k, v))):
        mod = am.rewrite(am.import_(m, (q, k, v)), to=to, **({"s": S} if to == "ssmax" else {}))
        out = am.compile(mod)(q, k, v)
        out = out[0] if isinstance(out, tuple | list) else out
        torch.testing.assert_close(torch.as_tensor(out), want, rtol=1e-5, atol=1e-5, msg=to)
