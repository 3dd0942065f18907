"""Numerics at the edges, for every kernel and every rewrite, against a float64 naive attention written here.

Kernels: the blocked reference, the compiled CPU kernel, the Triton kernel under its interpreter (tiny
shapes, few examples: the interpreter runs the Triton source op by op in Python).  Rewrites: torch.fx
(``attnpass.fuse`` / ``to_ssmax``) and ONNX (``attnpass.onnx.rewrite``, run in onnxruntime).

Edges: fp16 logits up to ±6e4, bf16, rows with every key masked, one key, S that is no block's multiple,
``-inf`` against ``finfo.min`` masks, NaN in an input (it must reach the rows that read it), and SSMax
where every row sees one key (the factor ``s log 1 = 0`` must not turn a masked ``-inf`` into NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnpass
from attnpass.kernels import cpu, reference
from attnpass.kernels import triton as triton_kernels

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def naive64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
            causal: bool = False, scale: float | None = None, s: float | None = None,
            b: float | None = None) -> torch.Tensor:
    """softmax(scale qk^T + mask) v in float64, independent of attnpass: an additive mask at or below -1e4
    removes the key; SSMax multiplies a row's logits by ``s log n + b`` (n = keys the row may attend) before
    masking; a row with no key is 0."""
    q, k, v = q.double(), k.double(), v.double()
    s_q, s_k = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    z = q @ k.transpose(-2, -1) * scale
    allowed = torch.ones_like(z, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(s_k)[None, :] <= torch.arange(s_q)[:, None] + s_k - s_q)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            keep = ~(mask <= -1e4)
            allowed = allowed & keep
            z = z + torch.where(keep, mask.double(), 0.0)
    if s is not None:
        n = allowed.sum(-1, keepdim=True).double().clamp_min(1)
        z = z * (s * torch.log(n) + (b or 0.0))
    z = z.masked_fill(~allowed, -math.inf)
    top = z.amax(-1, keepdim=True)
    p = torch.exp(z - torch.where(torch.isinf(top), 0.0, top))
    out = (p / p.sum(-1, keepdim=True).clamp_min(1e-300)) @ v
    return torch.where(allowed.any(-1, keepdim=True), out, 0.0)


@pytest.fixture(scope="module", params=["reference", "cpu", "triton_interpreted"])
def kernel(request: pytest.FixtureRequest) -> tuple[str, Forward]:
    """``(name, forward)``; forward(q, k, v, mask, causal, scale, s, b) -> (out, lse)."""
    if request.param == "reference":
        fn = reference.attention_forward
    elif request.param == "cpu":
        built = cpu.load()
        assert built is not None, "the CPU kernel did not build"
        fn = built.attention_forward
    else:
        built = triton_kernels.load_interpreted()
        assert built is not None, "Triton's interpreter kernel could not be built"
        fn = built.attention_forward

    def forward(q, k, v, mask=None, causal=False, scale=None, s=None, b=None):
        heads = q.shape[1]
        s_t = None if s is None else torch.full((heads,), s, dtype=torch.float32)
        b_t = None if b is None else torch.full((heads,), b, dtype=torch.float32)
        if request.param == "reference":
            return fn(q, k, v, mask, causal, scale, s_t, b_t, None, False)
        return fn(q, k, v, mask, causal, scale, s_t, b_t, None, False)

    return request.param, forward


def _examples(name: str, n: int) -> int:
    return max(2, n // 6) if name == "triton_interpreted" else n


@st.composite
def problems(draw: st.DrawFn, dtype: torch.dtype = torch.float32) -> dict:
    """Shapes off every block size, masks of each kind (with fully masked rows), causal or not, SSMax or not."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    s_q, s_k, d = draw(st.integers(1, 9)), draw(st.integers(1, 11)), draw(st.sampled_from([1, 3, 4, 8]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (s_q, s_k, s_k))
    kind = draw(st.sampled_from(["none", "bool", "-inf", "finfo.min", "bias"]))
    mask = None
    if kind != "none":
        keep = torch.rand(b, 1, s_q, s_k, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
        if kind == "bool":
            mask = keep
        else:
            fill = {"-inf": -math.inf, "finfo.min": torch.finfo(dtype).min, "bias": -1e4}[kind]
            mask = torch.where(keep, torch.randn(b, 1, s_q, s_k, generator=g), torch.tensor(fill)).to(dtype)
    s = draw(st.sampled_from([None, 0.43, 0.0, 1.5]))
    return {"q": q, "k": k, "v": v, "mask": mask, "causal": draw(st.booleans()), "s": s,
            "b": None if s is None else draw(st.sampled_from([None, 0.5]))}


def _check(out: torch.Tensor, exact: torch.Tensor, tol: float) -> None:
    assert not torch.isnan(out).any(), "NaN from finite inputs"
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_property_against_float64(kernel: tuple[str, Forward], dtype: torch.dtype, tol: float) -> None:
    name, forward = kernel

    @settings(max_examples=_examples(name, 30 if dtype == torch.float32 else 12), deadline=None, derandomize=True,
              database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(p=problems(dtype))
    def prop(p: dict) -> None:
        out, _ = forward(p["q"], p["k"], p["v"], p["mask"], p["causal"], None, p["s"], p["b"])
        _check(out, naive64(p["q"], p["k"], p["v"], p["mask"], p["causal"], None, p["s"], p["b"]), tol)

    prop()


@pytest.mark.parametrize("causal", [False, True])
def test_fp16_logits_at_6e4(kernel: tuple[str, Forward], causal: bool) -> None:
    """Logits of ±6e4 (near fp16's 65504) in fp16: finite, and the softmax picks what float64 picks."""
    _, forward = kernel
    g = torch.Generator().manual_seed(1)
    d, s = 16, 13
    q, k = torch.randn(1, 2, s, d, generator=g), torch.randn(1, 2, s, d, generator=g) * 60
    q = (q * 6e4 / ((q @ k.transpose(-2, -1)) / 4).abs().max()).half()  # the largest logit is 6e4
    k, v = k.half(), torch.randn(1, 2, s, d, generator=g).half()
    logits = (q.double() @ k.double().transpose(-2, -1)) / 4
    assert 5.9e4 < logits.abs().max() < 6.1e4
    out, lse = forward(q, k, v, None, causal)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    _check(out, naive64(q, k, v, None, causal), 3e-3)
    out, _ = forward(q, k, v, None, causal, None, 0.43)  # SSMax multiplies the 6e4 logits further, in fp32
    _check(out, naive64(q, k, v, None, causal, None, 0.43), 3e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
def test_fully_masked_rows_and_single_key(kernel: tuple[str, Forward], dtype: torch.dtype, fill: str) -> None:
    """A row with every key masked is 0 (never NaN, never the mean of V that finfo.min would give in eager);
    with one key the output is that key's value, with or without SSMax (factor s log 1 = 0)."""
    _, forward = kernel
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g).to(dtype) for _ in range(3))
    value = -math.inf if fill == "-inf" else torch.finfo(dtype).min
    mask = torch.zeros(2, 1, 5, 5, dtype=dtype)
    mask[1] = value  # the second sequence sees nothing
    mask[0, :, 2] = value  # and row 2 of the first neither
    for s in (None, 0.43):
        out, _ = forward(q, k, v, mask, False, None, s)
        assert torch.isfinite(out).all()
        assert out[1].abs().max() == 0 and out[0, :, 2].abs().max() == 0
        _check(out, naive64(q, k, v, mask, False, None, s), 2e-5 if dtype == torch.float32 else 3e-2)
        one, _ = forward(q, k[:, :, :1], v[:, :, :1], None, False, None, s)
        _check(one, v[:, :, :1].double().expand(2, 2, 5, 8), 0)


@pytest.mark.parametrize("fill", [-math.inf, torch.finfo(torch.float32).min])
@pytest.mark.parametrize("b", [None, 0.0, 2.0])
def test_ssmax_with_one_key_everywhere(kernel: tuple[str, Forward], fill: float, b: float | None) -> None:
    """Every row may attend exactly one key (the rest masked): the factor is ``b`` (0 without it), and the
    masked logits must stay masked after it: 0 * -inf is NaN, 0 * finfo.min is an unmasked 0."""
    _, forward = kernel
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    mask = torch.full((1, 1, 6, 6), fill)
    mask[..., 0] = 0.0
    out, _ = forward(q, k, v, mask, False, None, 0.43, b)
    _check(out, v[:, :, :1].double().expand(1, 2, 6, 4), 1e-6)
    out, _ = forward(q[:, :, :1], k, v, None, True, None, 0.43, b)  # causal, one query: bottom-right, sees all
    _check(out, naive64(q[:, :, :1], k, v, None, True, None, 0.43, b), 2e-5)
    out, _ = forward(q, k, v, None, True, None, 0.43, b)  # causal square: row 0 sees one key
    _check(out[:, :, :1], v[:, :, :1].double(), 1e-6)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_input_propagates(kernel: tuple[str, Forward], where: str) -> None:
    """A NaN in an input reaches every row that reads it: an attention kernel must never hide bad data."""
    _, forward = kernel
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 1, 3, 2] = math.nan
    for causal in (False, True):
        out, _ = forward(q, k, v, None, causal)
        if where == "q":
            readers = out[0, 1, 3]
        else:
            readers = out[0, 1, 3:] if causal else out[0, 1]  # rows that may attend key 3
        assert torch.isnan(readers).all(dim=-1).all() if where != "v" else torch.isnan(readers[..., 2]).all()
        assert not torch.isnan(out[0, 0]).any()  # the other head never saw it


# ---------------------------------------------------------------- rewrites


class _Attn(torch.nn.Module):
    """Eager attention the way HF writes it: additive padding mask at ``fill``, causal, fp32 softmax, heads
    merged after PV (a graph whose output *is* the PV MatMul loses its output name in the fused ONNX
    rewrite: reported, not this file's subject)."""

    def __init__(self, fill: float, scale: float = 8 ** -0.5) -> None:
        super().__init__()
        self.fill, self.scale = fill, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        s = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * self.scale
        allowed = torch.ones(s, s, dtype=torch.bool).tril() & keep[:, None, None, :].bool()
        scores = scores.masked_fill(~allowed, self.fill)
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return out.transpose(1, 2).reshape(q.shape[0], s, -1)


def _inputs(seq: int, big: float = 1.0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, seq, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, seq, dtype=torch.long)
    keep[1, max(1, seq // 2):] = 0  # padding (none at seq 1)
    return (q * big).to(dtype), (k * big).to(dtype), v.to(dtype), keep


def _merged(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D] -> [B, S, H*D]``, as the module's output."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _keep_allowed(keep: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool).tril() & keep[:, None, None, :].bool()


@pytest.mark.parametrize("fill", [-math.inf, "finfo.min"])
@pytest.mark.parametrize("big, dtype, tol", [(1.0, torch.float32, 2e-5), (40.0, torch.float32, 2e-5),
                                             (40.0, torch.float16, 3e-3), (5.0, torch.bfloat16, 3e-2)])
def test_fx_rewrites_at_the_edges(fill: float | str, big: float, dtype: torch.dtype, tol: float) -> None:
    """fx fuse and to_ssmax against float64 on large logits (|z| up to ~6e4 in fp16), low precision, padding."""
    seq = 7
    q, k, v, keep = _inputs(seq, big, dtype)
    model = _Attn(torch.finfo(dtype).min if fill == "finfo.min" else fill).eval()
    allowed = _keep_allowed(keep, seq)
    with torch.no_grad():
        fused = attnpass.fuse(model, (q, k, v, keep))(q, k, v, keep)
        ssmax = attnpass.to_ssmax(model, (q, k, v, keep), s=0.43)(q, k, v, keep)
        ssmax_fused = attnpass.to_ssmax(model, (q, k, v, keep), s=0.43, fused=True)(q, k, v, keep)
    _check(fused, _merged(naive64(q, k, v, allowed)), tol)
    _check(ssmax, _merged(naive64(q, k, v, allowed, s=0.43)), tol)
    _check(ssmax_fused, _merged(naive64(q, k, v, allowed, s=0.43)), tol)


def test_fx_rewrites_single_key_and_nan() -> None:
    """seq 1 (n = 1 everywhere: SSMax factor 0) gives V; a NaN in V reaches the rows that read it."""
    q, k, v, keep = _inputs(1)
    model = _Attn(-math.inf).eval()
    with torch.no_grad():
        for gm in (attnpass.fuse(model, (q, k, v, keep)), attnpass.to_ssmax(model, (q, k, v, keep), s=0.43),
                   attnpass.to_ssmax(model, (q, k, v, keep), s=0.43, fused=True)):
            _check(gm(q, k, v, keep), _merged(v.double()), 1e-6)
    q, k, v, keep = _inputs(6)
    v[0, 0, 2, 1] = math.nan
    with torch.no_grad():
        for gm in (attnpass.fuse(model, (q, k, v, keep)), attnpass.to_ssmax(model, (q, k, v, keep), s=0.43, fused=True)):
            out = gm(q, k, v, keep)
            assert torch.isnan(out[0, 2:, 1]).all() and not torch.isnan(out[1]).any()


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One eager attention exported to ONNX with a finfo.min mask, and its fused / SSMax rewrites."""
    import attnpass.onnx as aonnx

    d = tmp_path_factory.mktemp("numerics_onnx")
    q, k, v, keep = _inputs(6)
    src = d / "attn.onnx"
    torch.onnx.export(_Attn(torch.finfo(torch.float32).min).eval(), (q, k, v, keep), str(src), dynamo=False,
                      opset_version=17, input_names=["q", "k", "v", "attention_mask"],
                      dynamic_axes={n: {2: "seq"} for n in "qkv"} | {"attention_mask": {1: "seq"}})
    out = {"original": src}
    for name, kw in {"fused": {"to": "fused"}, "ssmax": {"to": "ssmax", "s": 0.43},
                     "fused_ssmax": {"to": "fused", "s": 0.43}}.items():
        res = aonnx.rewrite(src, d / f"{name}.onnx", **kw)
        assert len(res.rewritten) == 1, res.as_dict()
        out[name] = d / f"{name}.onnx"
    return out


def _ort(path: Path, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in sess.get_inputs()], (q.numpy(), k.numpy(), v.numpy(), keep.numpy())))
    return torch.from_numpy(np.asarray(sess.run(None, feeds)[0]))


@pytest.mark.parametrize("case", ["large_logits", "fully_padded", "single_key", "nan"])
def test_onnx_rewrites_at_the_edges(onnx_models: dict[str, Path], case: str) -> None:
    """The rewritten ONNX models in onnxruntime against float64: logits near 6e4, a sequence with every key
    padded (0, not NaN and not finfo.min's mean of V), one key (SSMax factor 0), a NaN in V (reaches its readers)."""
    seq = 1 if case == "single_key" else 6
    q, k, v, keep = _inputs(seq, 60.0 if case == "large_logits" else 1.0)
    if case == "fully_padded":
        keep[1] = 0
    if case == "nan":
        v[0, 1, 3, 0] = math.nan
    allowed = _keep_allowed(keep, seq)
    for name in ("fused", "ssmax", "fused_ssmax"):
        out = _ort(onnx_models[name], q, k, v, keep)
        s = None if name == "fused" else 0.43
        if case == "nan":
            assert torch.isnan(out[0, 3:, 8]).all() and not torch.isnan(out[1]).any(), name
            continue
        if case == "fully_padded":
            # a row with no key: 0 for the fused op; the explicit SSMax chain keeps the model's own
            # finfo.min semantics (softmax over equal logits), which is finite either way
            assert torch.isfinite(out).all(), name
            allowed[1] = False
            rows = slice(0, 1)
            _check(out[rows], _merged(naive64(q, k, v, allowed, s=s))[rows], 1e-4)
            continue
        _check(out, _merged(naive64(q, k, v, allowed, s=s)), 1e-4 if case != "large_logits" else 2e-3)
