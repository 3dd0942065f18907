"""Top-k sites in torch-dialect MLIR (imported from torch and from ONNX, both exporters): found through the MLIR
adapter, rewritten to one generated single-pass function per site, JIT-compiled and equal to torch eager."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

import attnpass.mlir as am
from tests import hf_corpus
from tests.topk_modules import LEAVE, REWRITE, ClassHead

warnings.filterwarnings("ignore", category=FutureWarning)


def _outputs(x) -> list[torch.Tensor]:
    xs = x if isinstance(x, tuple | list) else (x,)
    return [torch.as_tensor(np.asarray(t.detach() if isinstance(t, torch.Tensor) else t)) for t in xs]


def _check_same(module, m: torch.nn.Module, x: torch.Tensor) -> None:
    got, want = _outputs(am.compile(module)(x)), _outputs(m(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if w.dtype == torch.int64:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _rewrite(module):
    out, res = am.rewrite(module, to="fused", with_report=True)
    return out, res.report


@pytest.mark.parametrize("name", sorted(REWRITE))
def test_from_torch_rewritten_equals_eager(name: str) -> None:
    make, x, form, k, renorm = REWRITE[name]
    m, x = make().eval(), x()
    out, rep = _rewrite(am.import_(m, (x,)))
    (site,) = rep.topk
    assert (str(site.form), site.k, site.renormalize, site.blocker) == (form, k, renorm, None)
    assert any(n.startswith("single pass via @attnpass_topk_") for n in site.notes)
    text = str(out)
    assert "_softmax" not in text and "aten.softmax" not in text and "aten.topk" not in text
    _check_same(out, m, x)


@pytest.mark.parametrize("name", sorted(LEAVE))
def test_from_torch_left_alone_with_reason(name: str) -> None:
    make, x, why = LEAVE[name]
    m, x = make().eval(), x()
    out, rep = _rewrite(am.import_(m, (x,)))
    (site,) = rep.topk
    assert not site.fusable and why in site.blocker
    assert "attnpass_topk" not in str(out)
    _check_same(out, m, x)


def test_masked_logits_and_ties() -> None:
    """-inf logits (a row starting masked) keep the normaliser finite; equal logits keep the lower index first."""
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    x[:, :7] = float("-inf")
    x[1, 10:14] = 5.0  # a four-way tie for the top
    x[2] = torch.arange(40.0) % 3  # many ties everywhere
    # 11 at 8 then 10: the 12 at 11 pushes both down, and the one at 8 must stay ahead of its equal at 10
    x[3, 7:13] = torch.tensor([10.0, 11.0, 10.5, 11.0, 12.0, 10.75])
    m = ClassHead().eval()
    out, _ = _rewrite(am.import_(m, (x,)))
    probs, idx = _outputs(am.compile(out)(x))
    want = torch.softmax(x, dim=-1)
    torch.testing.assert_close(probs, want.gather(-1, idx), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(probs, want.topk(5, dim=-1).values, rtol=1e-6, atol=1e-6)
    assert idx[1, :4].tolist() == [10, 11, 12, 13]
    assert idx[2].tolist() == [2, 5, 8, 11, 14]
    assert idx[3].tolist() == [11, 8, 10, 12, 9]


EXPORTERS = ("dynamo", "torchscript")


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("topk_mlir_onnx")
    out = {}
    for name, (make, x, *_) in REWRITE.items():
        for e in EXPORTERS:
            path = d / f"{name}_{e}.onnx"
            if e == "dynamo":
                torch.onnx.export(make().eval(), (x(),), str(path), dynamo=True, opset_version=18, input_names=["x"],
                                  verbose=False)
            else:
                torch.onnx.export(make().eval(), (x(),), str(path), dynamo=False, opset_version=17, input_names=["x"])
            out[(name, e)] = path
    return out


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(REWRITE))
def test_from_onnx_rewritten_equals_eager(onnx_models, name: str, exporter: str) -> None:
    make, x, form, k, renorm = REWRITE[name]
    out, rep = _rewrite(am.import_(str(onnx_models[(name, exporter)])))
    (site,) = rep.topk
    assert (str(site.form), site.k, site.blocker) == (form, k, None)
    assert "softmax" not in str(out)
    _check_same(out, make().eval(), x())


@pytest.mark.parametrize("name", ["greedy", "head"])
def test_dynamic_rows(name: str) -> None:
    """A dynamic row count: the generated loops read their bounds with ``tensor.dim``."""
    make, x = REWRITE[name][0], REWRITE[name][1]()
    m = make().eval()
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("rows", min=2, max=64)},), strict=False)
    out, rep = _rewrite(am.import_(ep))
    assert rep.topk[0].fusable and "?" in str(rep.topk[0].x.type)
    _check_same(out, m, torch.randn(5, 40))


@pytest.mark.parametrize("family", sorted(hf_corpus.MOE))
def test_hf_moe_routers_fused_and_jit_equal(family: str) -> None:
    """Every router of the tiny MoE families becomes one single-pass function; the JIT-compiled model is unchanged."""
    build, routers = hf_corpus.MOE[family]
    torch.manual_seed(0)
    model, args, kwargs = build()
    # the default "grouped_mm" experts call aten.histc, which torch-mlir cannot lower; the router is the same
    model.set_experts_implementation("batched_mm")
    model.eval()
    out, rep = _rewrite(am.import_(model, args, kwargs))
    assert len(rep.sites) == 2 and len(rep.topk) == routers
    assert all(t.fusable and any(n.startswith("single pass via") for n in t.notes) for t in rep.topk)
    with torch.no_grad():
        want = hf_corpus.output_tensor(model(*args, **kwargs))
    got = am.compile(out, opt_level=0)(*args, *kwargs.values())
    got = torch.as_tensor(np.asarray(got[0] if isinstance(got, tuple) else got))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


class HalfHead(torch.nn.Module):
    """softmax + top-k over ``dim`` of the logits rounded to ``dt`` (f32 in and out: the JIT takes no bf16 arrays)."""

    def __init__(self, dt: torch.dtype, dim: int, k: int = 3, renorm: bool = False, sm_dtype: torch.dtype | None = None):
        super().__init__()
        self.dt, self.dim, self.k, self.renorm, self.sm_dtype = dt, dim, k, renorm, sm_dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.softmax(x.to(self.dt), dim=self.dim, dtype=self.sm_dtype)
        w, i = p.topk(self.k, dim=self.dim)
        if self.renorm:
            w = w / w.sum(dim=self.dim, keepdim=True)
        return w.float(), i


class MaxAndArgmax(torch.nn.Module):
    """Two selections from one softmax over a middle axis: the largest probability and its index (no keepdim)."""

    def __init__(self, dt: torch.dtype, dim: int):
        super().__init__()
        self.dt, self.dim = dt, dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.softmax(x.to(self.dt), dim=self.dim)
        return p.amax(dim=self.dim).float(), p.argmax(dim=self.dim)


# name -> (module, the softmax output's dtype, sites); every case's rows are untied in bf16 (see _untied)
DTYPE_AXIS = {
    "bf16_last": (lambda: HalfHead(torch.bfloat16, -1), torch.bfloat16, 1),
    "f16_last_renorm": (lambda: HalfHead(torch.float16, -1, k=2, renorm=True), torch.float16, 1),
    "f32_axis0": (lambda: HalfHead(torch.float32, 0), torch.float32, 1),
    "f32_axis1_renorm": (lambda: HalfHead(torch.float32, 1, k=2, renorm=True), torch.float32, 1),
    "bf16_in_f32_softmax_axis1": (lambda: HalfHead(torch.bfloat16, 1, sm_dtype=torch.float32), torch.float32, 1),
    "f16_max_argmax_axis1": (lambda: MaxAndArgmax(torch.float16, 1), torch.float16, 2),
}


def _untied(shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """Logits whose rows along ``dim`` are a permutation of ``j / 8 - 2``: exact in bf16 and f16, no two equal, and
    no two probabilities equal once rounded (neighbours differ by a factor ``exp(1/8)``), so indices are unambiguous."""
    g = torch.Generator().manual_seed(5)
    return torch.argsort(torch.rand(shape, generator=g), dim=dim).float() / 8 - 2


@pytest.mark.parametrize("name", sorted(DTYPE_AXIS))
def test_half_types_and_other_axes_equal_eager(name: str) -> None:
    """f16 / bf16 logits or probabilities and selections over a non-last axis: one single-pass function per site,
    f32 inside, the probabilities rounded once to the softmax's type; indices identical to eager."""
    make, sm_dt, n_sites = DTYPE_AXIS[name]
    m = make().eval()
    x = _untied((4, 24, 5), m.dim)
    out, rep = _rewrite(am.import_(m, (x,)))
    assert len(rep.topk) == n_sites
    assert all(s.blocker is None and any(n.startswith("single pass via") for n in s.notes) for s in rep.topk)
    text = str(out)
    assert "aten.softmax" not in text and "aten._softmax" not in text and "aten.topk" not in text
    got, want = _outputs(am.compile(out)(x)), _outputs(m(x))
    (gp, gi), (wp, wi) = got, want
    assert gi.shape == wi.shape and torch.equal(gi, wi)
    assert gp.shape == wp.shape and torch.equal(gp, gp.to(sm_dt).float()), "rounded to the softmax's type"
    # eager rounds the probabilities, then (renormalising) the sum and the quotient: two roundings apart at most
    step = {torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[sm_dt]
    torch.testing.assert_close(gp, wp, rtol=2 * step, atol=1e-6)


def test_f64_logits_left_with_the_reason() -> None:
    """f64 softmax stays f64 in eager; the f32 single pass would lose precision, so the site keeps its softmax."""
    m = HalfHead(torch.float64, -1).eval()
    x = _untied((4, 24), -1)
    out, rep = _rewrite(am.import_(m, (x,)))
    (site,) = rep.topk
    assert site.blocker is not None and "MLIR: logits of element type f64" in site.blocker
    assert "attnpass_topk" not in str(out)
