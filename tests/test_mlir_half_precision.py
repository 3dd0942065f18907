"""Float16 (and float64) attention in MLIR: the ONNX spec's half-precision cases, expanded and as the op.

SSMax on the softmax input of an expanded body multiplies f16 scores in f32 and rounds once back to f16, as the
ONNX emitter's ``Cast(Mul(Cast(x, f32), f), f16)`` does, so the two IRs give the same model; f64 scores (ONNX
``softmax_precision`` = double) are multiplied in f64.  The op's KV cache (``present = concat(past, new)``) keeps
the cache's f16 type and its ``qk_matmul_output`` is rounded to the output's type: each generated function parses,
and the result equals onnxruntime on the original within float16's tolerance (``test_mlir_spec_fp16_rounding``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

import attnpass.mlir as am
import attnpass.onnx as aonnx
from attnpass.lowering import mlir as lowering
from attnpass.passes.match import MaskTerm
from attnpass.rewrite.mlir import builders as bl
from attnpass.rewrite.mlir.attention_op import kv_concat_func
from attnpass.rewrite.mlir.ssmax import KeyMasks, SsmaxParams, ssmax_func
from attnpass.validate import run
from tests.test_onnx_spec_attention import SPECS, _case, _op_reference

warnings.filterwarnings("ignore")

F16_TOL = dict(rtol=2e-3, atol=2e-3)  # one float16 rounding of values of order 1, as the fp16 spec tests use
RNG = np.random.default_rng(0)


def _jit(text: str, *arrays: np.ndarray) -> np.ndarray:
    return np.asarray(lowering.compile_module(text.replace("func.func private @f", "func.func @f"), from_linalg=True,
                                              func_name="f", opt_level=0)(*arrays))


def test_ssmax_function_on_f16_scores_multiplies_in_f32_and_rounds_once() -> None:
    """``z = f16(f32(x) * f)`` where attendable, f16's ``finfo.min`` elsewhere; an f16 bias with a coefficient is
    widened before it is scaled (its keep test reads ``coeff * bias``)."""
    term = MaskTerm("additive", None, None, coeff=2.0)
    ss = SsmaxParams(heads=2, s=[0.5, 2.0], b=[0.0, 0.25])
    mask = bl.MaskIn(term, "%m0", (1, 1, 1, 6), "f16")
    text = ssmax_func("f", (1, 2, 3, 6), [mask], KeyMasks(counted=(bl.MaskIn(term, "%n0", (1, 1, 1, 6), "f16"),)), ss,
                      "f16")
    assert "tensor<1x2x3x6xf16>" in text and "arith.truncf" in text and "0xFBFF" in text
    lowering.parse(text, "generated f16 SSMax")  # the parser verifies every type
    x = RNG.standard_normal((1, 2, 3, 6)).astype(np.float16)
    bias = np.zeros((1, 1, 1, 6), np.float16)
    bias[..., 4:] = np.finfo(np.float16).min  # 2 * min is -inf in f32: still removed
    got = _jit(text, x, bias, bias)
    assert got.dtype == np.float16
    fac = (np.array([0.5, 2.0])[:, None] * np.log(4) + np.array([0.0, 0.25])[:, None]).astype(np.float32)
    want = np.where(bias > -1e4, (x.astype(np.float32) * fac[None, :, :, None]).astype(np.float16), np.finfo(np.float16).min)
    np.testing.assert_array_equal(got, want)


def test_ssmax_function_on_f64_scores_keeps_f64() -> None:
    ss = SsmaxParams(heads=1, s=[1.0], b=[0.0])
    text = ssmax_func("f", (1, 1, 3, 5), [], KeyMasks(causal=True), ss, "f64")
    x = RNG.standard_normal((1, 1, 3, 5))
    got = _jit(text, x)
    assert got.dtype == np.float64
    n = np.arange(3) + 1.0
    np.testing.assert_allclose(got, x * np.log(n).astype(np.float32)[None, None, :, None], rtol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_kv_concat_keeps_the_cache_type(packed: bool) -> None:
    """A float16 cache is concatenated as float16 (once the concat was f32-typed and the module did not parse)."""
    new = (1, 3, 2 * 4) if packed else (1, 2, 3, 4)
    text = kv_concat_func("f", (1, 2, 5, 4), new, packed, "f16")
    assert "f32" not in text and "tensor<1x2x8x4xf16>" in text
    past = RNG.standard_normal((1, 2, 5, 4)).astype(np.float16)
    k = RNG.standard_normal(new).astype(np.float16)
    got = _jit(text, past, k)
    canon = k.reshape(1, 3, 2, 4).transpose(0, 2, 1, 3) if packed else k
    np.testing.assert_array_equal(got, np.concatenate([past, canon], 2))


def _spec_model(name: str, expanded: bool, tmp_path: Path) -> tuple[Path, dict]:
    path, feeds, _ = _case(next(s for s in SPECS if s.export == name), expanded, tmp_path)
    return path, feeds


def _outputs(module, feeds: dict) -> list[np.ndarray]:
    got = am.compile(module)(*feeds.values())
    return [np.asarray(g) for g in (got if isinstance(got, list | tuple) else [got])]


@pytest.mark.parametrize("to", ["fused", "ssmax"])
def test_f16_kv_cache_op_parses_and_equals_onnxruntime(to: str, tmp_path: Path) -> None:
    """``attention_gqa_with_past_and_present_fp16``: Y, present_key and present_value, all float16."""
    path, feeds = _spec_model("attention_gqa_with_past_and_present_fp16", False, tmp_path)
    kw = {"s": 0.0, "b": 1.0} if to == "ssmax" else {}
    out, res = am.rewrite(am.import_(path), to=to, with_report=True, **kw)
    assert len(res.rewritten) == 1, res.left
    text = str(out)
    lowering.parse(text, "rewritten f16 module")
    (present_k,) = re.findall(r"func\.func private @attnpass_present_k\(([^)]*)\) -> (\S+)", text)
    assert all("f16" in t for t in present_k) and "f32" not in "".join(present_k)
    got, want = _outputs(out, feeds), list(run(path, feeds).values())
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == np.float16
        np.testing.assert_allclose(g, w, **F16_TOL)
    np.testing.assert_array_equal(got[1], want[1])  # the cache is copied, never rounded


def test_f16_qk_output_op_ssmax_equals_onnxruntime(tmp_path: Path) -> None:
    """``qk_matmul_output`` mode 3 with ``softmax_precision``: the f16 probabilities output and Y, SSMax(s=0, b=1)."""
    path, feeds = _spec_model("attention_24_qk_matmul_output_mode3_softmax_precision", False, tmp_path)
    out, res = am.rewrite(am.import_(path), to="ssmax", s=0.0, b=1.0, with_report=True)
    assert len(res.rewritten) == 1, res.left
    lowering.parse(str(out), "rewritten f16 module")
    got, want = _outputs(out, feeds), list(run(path, feeds).values())
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == np.float16
        np.testing.assert_allclose(g, w, **F16_TOL)


#: expanded bodies whose softmax input is not f32: float16 scores, and float64 (softmax_precision = double)
EXPANDED = [("attention_causal_fp16", np.float16), ("attention_local_window_gqa_rank4_mask", np.float64)]


@pytest.mark.parametrize(("name", "scores"), EXPANDED, ids=[n for n, _ in EXPANDED])
def test_expanded_ssmax_on_non_f32_scores_agrees_with_onnx_and_semantics(name: str, scores: type, tmp_path: Path) -> None:
    """SSMax(s=0, b=1) equals onnxruntime on the original; SSMax(s=0.7) equals the ONNX rewrite of the same model
    (every output), and ``semantics`` (through the op's reference) for the causal one."""
    path, feeds = _spec_model(name, True, tmp_path)
    report = am.find(am.import_(path))
    (site,) = report.sites
    assert report.adapters[site.index].inputs(site.softmax)[0].dtype == {np.float16: "f16", np.float64: "f64"}[scores]
    want = list(run(path, feeds).values())
    tol = F16_TOL if feeds["Q"].dtype == np.float16 else dict(rtol=1e-5, atol=1e-5)
    for s, b, ref in ((0.0, 1.0, want), (0.7, 0.0, None)):
        out, res = am.rewrite(am.import_(path), to="ssmax", s=s, b=b, with_report=True)
        assert len(res.rewritten) == 1, res.left
        got = _outputs(out, feeds)
        if ref is None:
            onnx_out = tmp_path / "ssmax.onnx"
            aonnx.rewrite(path, onnx_out, to="ssmax", s=s, bias=b, inputs=feeds, **tol)
            ref = list(run(onnx_out, feeds).values())
            assert np.abs(got[0].astype(np.float64) - want[0]).max() > 5 * tol["atol"]  # the factor really applied (~0.02 here)
        assert len(got) == len(ref)
        for g, w in zip(got, ref):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(g, w, **tol)
    if name == "attention_causal_fp16":  # ``semantics`` in f64 on the op's attributes (causal, top-left: S_q < S_k)
        op_path, _ = _spec_model(name, False, tmp_path)
        sem, _ = _op_reference(onnx.load(str(op_path)), feeds, 0.7, 0.0)
        np.testing.assert_allclose(got[0], sem, rtol=5e-3, atol=5e-3)  # f16 scores, probabilities and output


class Bf16Causal(torch.nn.Module):
    """Causal attention computed in bfloat16 from torch (f32 in and out: the JIT takes no bf16 arrays)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        s = q @ k.transpose(-1, -2) * 0.25
        keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril()
        return (s.masked_fill(~keep, float("-inf")).softmax(-1) @ v).float()


def test_bf16_scores_from_torch_take_ssmax_as_fx_does() -> None:
    """bf16 softmax input: SSMax(s=0, b=1) leaves the module's result as it was (``x * 1`` rounds back to ``x``);
    SSMax(s=0.7) equals the fx rewrite of the same module and moves the output."""
    import attnpass

    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(1, 2, 6, 16, generator=g) for _ in range(3))
    m = Bf16Causal()
    report = am.find(am.import_(m, args))
    (site,) = report.sites
    assert report.adapters[site.index].inputs(site.softmax)[0].dtype == "bf16"

    def run_mlir(module) -> torch.Tensor:
        return torch.as_tensor(np.asarray(am.compile(module, opt_level=0)(*[a.numpy() for a in args])))

    before = run_mlir(am.import_(m, args))
    for s, b in ((0.0, 1.0), (0.7, None)):
        out, res = am.rewrite(am.import_(m, args), to="ssmax", s=s, b=b, with_report=True)
        assert len(res.rewritten) == 1 and "SSMax via" in " ".join(res.report.sites[0].notes), res.left
        got = run_mlir(out)
        if s == 0.0:
            torch.testing.assert_close(got, before, rtol=0, atol=0)
        else:
            want = attnpass.to_ssmax(torch.export.export(m, args, strict=False), s=s)(*args)
            torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7)  # one bf16 rounding
            assert (got - before).abs().max() > 0.1


class HalfSdpa(torch.nn.Module):
    """``scaled_dot_product_attention`` on half-precision operands and a float bias with removed keys."""

    def __init__(self, dt: torch.dtype):
        super().__init__()
        self.dt = dt

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v, bias = (x.to(self.dt) for x in (q, k, v, bias))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).float()


@pytest.mark.parametrize(("dt", "tol"), [(torch.float16, 5e-3), (torch.bfloat16, 5e-2)], ids=["f16", "bf16"])
def test_half_sdpa_call_takes_ssmax_on_q_and_bias(dt: torch.dtype, tol: float) -> None:
    """An SDPA call in f16 / bf16 (once left: "needs static f32 inputs"): q and the bias keep their type; SSMax(s=0,
    b=1) leaves the result bit for bit; SSMax(s=2) equals ``semantics`` in f64 on the rounded inputs within ``tol``
    (torch-mlir's own half SDPA is that far from f64 before any rewrite: checked first)."""
    from attnpass import semantics

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g) for _ in range(3))
    bias = 0.5 * torch.randn(1, 1, 6, 6, generator=g)
    bias[..., 4:] = float("-inf")
    args = (q, k, v, bias)
    m = HalfSdpa(dt)

    def run_mlir(module) -> np.ndarray:
        return np.asarray(am.compile(module, opt_level=0)(*[a.numpy() for a in args]))

    def sem(**kw) -> np.ndarray:
        return semantics.ssmax_attention(*(a.to(dt).double() for a in args), **kw).numpy()

    before = run_mlir(am.import_(m, args))
    np.testing.assert_allclose(before, sem(s=0.0, b=1.0), rtol=tol, atol=tol)
    for s, b in ((0.0, 1.0), (2.0, None)):
        out, res = am.rewrite(am.import_(m, args), to="ssmax", s=s, b=b, with_report=True)
        assert len(res.rewritten) == 1 and "mask scaled" in " ".join(res.report.sites[0].notes), res.left
        elem = {torch.float16: "f16", torch.bfloat16: "bf16"}[dt]
        (sig,) = re.findall(r"func\.func private @attnpass_ssmax_0(.*) \{", str(out))
        assert sig.endswith(f"-> (tensor<1x2x6x16x{elem}>, tensor<1x2x6x6x{elem}>)") and "f32" not in sig, sig
        got = run_mlir(out)
        if s == 0.0:
            np.testing.assert_array_equal(got, before)
        else:
            np.testing.assert_allclose(got, sem(s=s), rtol=tol, atol=tol)
            assert np.abs(got - before).max() > 2 * tol
