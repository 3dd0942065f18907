"""MLIR path: find / rewrite attention in torch-dialect MLIR and run it natively through LLVM.

Every numeric check compares the JIT-compiled function with torch eager (``fused`` keeps the
model's meaning) or with ``semantics.ssmax_attention`` (``ssmax`` is the one definition).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)
from torch import nn

import attnpass.mlir as am  # the facade itself imports without torch-mlir
from attnpass import semantics
from attnpass.errors import AttnpassError
from tests.attention_modules import CausalTril, GQARepeatInterleave, PaddedAdditive, SoftcapPrescaled

warnings.filterwarnings("ignore", category=FutureWarning)
ATOL = 2e-5


class CrossAdditive(nn.Module):
    """Cross attention (S_q != S_k) with an additive bias and a finfo.min padding mask on the keys."""

    def forward(self, q, k, v, bias):
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5) + bias
        return torch.matmul(torch.softmax(scores, dim=-1), v)


def _qkv(b=1, h=4, hk=4, sq=16, sk=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, sq, d, generator=g), torch.randn(b, hk, sk, d, generator=g),
            torch.randn(b, hk, sk, d, generator=g))


def _cases():
    q, k, v = _qkv()
    keep = torch.ones(1, 16, dtype=torch.long)
    keep[0, 12:] = 0
    qg, kg, vg = _qkv(h=4, hk=2)
    allowed = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    qc, kc, vc = _qkv(sq=8, sk=24)
    bias = torch.randn(1, 1, 8, 24) * 0.5
    bias[..., 20:] = torch.finfo(torch.float32).min
    return {
        # name: (module, args, semantics kwargs for the SSMax reference)
        "causal": (CausalTril(16), (q, k, v), dict(is_causal=True)),
        "padded": (PaddedAdditive(), (q, k, v, keep),
                   dict(attn_mask=(1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min)),
        "gqa": (GQARepeatInterleave(), (qg, kg, vg, allowed), dict(attn_mask=allowed, enable_gqa=True)),
        "cross": (CrossAdditive(), (qc, kc, vc, bias), dict(attn_mask=bias)),
        "softcap": (SoftcapPrescaled(5.0), (q, k, v), dict(is_causal=True, softcap=5.0)),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def imported():
    out = {}
    for name, (mod, args, _) in CASES.items():
        out[name] = am.import_(mod.eval(), args)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_variants_found_and_fused_equal_eager(imported, name):
    mod, args, _ = CASES[name]
    report = am.find(imported[name])
    assert len(report.sites) == 1, report.skipped
    site = report.sites[0]
    assert site.fusable, site.fuse_blocker
    fused, rep2 = am.rewrite(imported[name], to="fused", tile=8, with_report=True)
    assert "attnpass_fused_0" in str(fused)
    assert "_softmax" not in str(fused) and "softmax.int" not in str(fused)
    with torch.no_grad():
        want = mod(*args)
    got = am.compile(fused)(*args)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_fused_lowering_propagates_nan(imported):
    """A NaN in q reaches that row's output (never hidden as a zero row); other rows stay exact."""
    mod, (q, k, v, keep), _ = CASES["padded"]
    q = q.clone()
    q[0, 1, 3, 0] = float("nan")
    fused = am.rewrite(imported["padded"], to="fused", tile=8)
    got = am.compile(fused)(q, k, v, keep)
    with torch.no_grad():
        want = mod(q, k, v, keep)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[0, 1, 3]).all()
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", ["causal", "padded", "gqa", "cross"])
def test_variants_ssmax_equal_semantics(imported, name):
    _, args, sem = CASES[name]
    s = [0.3, 0.4, 0.5, 0.6]
    rewritten = am.rewrite(imported[name], to="ssmax", s=s, b=0.1)
    got = am.compile(rewritten)(*args)
    q, k, v = args[:3]
    want = semantics.ssmax_attention(q, k, v, s=torch.tensor(s), b=0.1, **sem)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_ssmax_parameters_as_arguments(imported):
    _, args, sem = CASES["causal"]
    rewritten = am.rewrite(imported["causal"], to="ssmax", params="argument")
    text = str(rewritten)
    assert re.search(r"func\.func @main\([^)]*!torch\.vtensor<\[4\],f32>\)", text)
    s = torch.tensor([0.2, 0.4, 0.6, 0.8])
    got = am.compile(rewritten)(*args, s)
    want = semantics.ssmax_attention(*args[:3], s=s, **sem)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_rewrite_leaves_input_module_alone(imported):
    before = str(imported["causal"])
    am.rewrite(imported["causal"], to="fused")
    assert str(imported["causal"]) == before


# ------------------------------------------------------------------ SSMax inside the fused loop nest

@pytest.mark.parametrize("name", list(CASES))
def test_fused_ssmax_equals_semantics(imported, name):
    """``to="ssmax", fused=True``: one loop nest, the factor applied per row inside it."""
    _, args, sem = CASES[name]
    s = [0.3, 0.4, 0.5, 0.6]
    rewritten, report = am.rewrite(imported[name], to="ssmax", s=s, b=0.1, fused=True, tile=8, with_report=True)
    text = str(rewritten)
    assert "attnpass_fused_0" in text and "attnpass_ssmax" not in text and "_softmax" not in text
    assert "with SSMax" in " ".join(report.sites[0].notes)
    got = am.compile(rewritten)(*args)
    want = semantics.ssmax_attention(*args[:3], s=torch.tensor(s), b=0.1, **sem)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_fused_ssmax_parameters_as_arguments(imported):
    _, args, sem = CASES["padded"]
    rewritten = am.rewrite(imported["padded"], to="ssmax", fused=True, b=0.0, params="argument", tile=8)
    assert re.search(r"func\.func @main\([^)]*!torch\.vtensor<\[4\],f32>, %arg\d+: !torch\.vtensor<\[4\],f32>\)",
                     str(rewritten))
    s, b = torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.tensor([0.5, 0.0, -0.1, 0.3])
    got = am.compile(rewritten)(*args, s, b)
    torch.testing.assert_close(got, semantics.ssmax_attention(*args[:3], s=s, b=b, **sem), atol=ATOL, rtol=1e-5)


def test_fused_and_fused_ssmax_rejects_mixed_names(imported):
    with pytest.raises(AttnpassError):
        am.rewrite(imported["causal"], to="fused", fused=True)


# ------------------------------------------------------------------ scaled_dot_product_attention calls

class SdpaFloatMask(nn.Module):
    """SDPA with an additive float mask (finite bias and finfo.min padding) and enable_gqa."""

    def forward(self, q, k, v, mask):
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class SdpaCausal(nn.Module):
    """is_causal with a ``scale``: torch-mlir's own lowering of such a call ignores the scale, so the
    SSMax rewrite (which keeps the call) moves it onto q."""

    def forward(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)


class SdpaBool(nn.Module):
    def forward(self, q, k, v, allowed):
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.2)


def _sdpa_cases():
    q, k, v = _qkv(h=4, hk=2, sq=6, sk=9)
    mask = torch.randn(1, 1, 6, 9, generator=torch.Generator().manual_seed(1))
    mask[..., 7:] = torch.finfo(torch.float32).min
    qc, kc, vc = _qkv(sq=12, sk=12)
    allowed = torch.rand(1, 4, 5, 11, generator=torch.Generator().manual_seed(2)) > 0.4
    allowed[..., 0] = True
    qb, kb, vb = _qkv(sq=5, sk=11)
    return {
        "float-gqa": (SdpaFloatMask(), (q, k, v, mask), dict(attn_mask=mask, enable_gqa=True)),
        "causal": (SdpaCausal(), (qc, kc, vc), dict(is_causal=True, scale=0.2)),
        "bool": (SdpaBool(), (qb, kb, vb, allowed), dict(attn_mask=allowed, scale=0.2)),
    }


SDPA_CASES = _sdpa_cases()


@pytest.fixture(scope="module")
def sdpa_imported():
    return {name: am.import_(mod.eval(), args) for name, (mod, args, _) in SDPA_CASES.items()}


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa_call_fused_and_ssmax(sdpa_imported, name):
    """An SDPA call is a site: fused into the loop nest; SSMax scales q (and the additive mask) and keeps the call."""
    mod, args, sem = SDPA_CASES[name]
    report = am.find(sdpa_imported[name])
    assert [s.form for s in report.sites] == ["sdpa"] and report.sites[0].fusable
    fused = am.rewrite(sdpa_imported[name], to="fused", tile=4)
    assert "scaled_dot_product_attention" not in str(fused)  # the call itself is replaced
    with torch.no_grad():
        want = mod(*args)
    torch.testing.assert_close(am.compile(fused)(*args), want, atol=ATOL, rtol=1e-5)
    s = torch.tensor([0.3, 0.4, 0.5, 0.6])
    q, k, v = args[:3]
    ssmax = am.rewrite(sdpa_imported[name], to="ssmax", s=s.tolist(), b=0.1)
    assert "torch.aten.scaled_dot_product_attention" in str(ssmax)
    want_sdpa = semantics.ssmax_sdpa(q, k, v, sem.get("attn_mask"), 0.0, sem.get("is_causal", False),
                                     sem.get("scale"), sem.get("enable_gqa", False), s=s, b=0.1)
    torch.testing.assert_close(am.compile(ssmax)(*args), want_sdpa, atol=ATOL, rtol=1e-5)
    both = am.rewrite(sdpa_imported[name], to="ssmax", s=s.tolist(), b=0.1, fused=True, tile=4)
    want_fused = semantics.ssmax_attention(q, k, v, s=s, b=0.1, **sem)
    torch.testing.assert_close(am.compile(both)(*args), want_fused, atol=ATOL, rtol=1e-5)


# ------------------------------------------------------------------ ONNX import

@pytest.fixture(scope="module")
def gqa_onnx(tmp_path_factory):
    mod, args, _ = CASES["gqa"]
    path = tmp_path_factory.mktemp("onnx") / "gqa.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod.eval(), args, str(path), dynamo=True, verbose=False)
    return path


def test_onnx_find_rewrite_and_backend_form(gqa_onnx):
    mod, args, _ = CASES["gqa"]
    imported = am.import_(str(gqa_onnx))
    report = am.find(imported)
    assert len(report.sites) == 1 and report.sites[0].gqa
    with torch.no_grad():
        want = mod(*args)
    got = am.compile(am.rewrite(imported, to="fused"))(*args)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    # what torch-onnx-to-torch-backend-pipeline produces: softmax decomposed into max/sub/exp/sum/div
    backend = am.lower(imported, emit="backend")
    assert "softmax" not in str(backend)
    assert len(am.find(backend).sites) == 1
    got2 = am.compile(am.rewrite(backend, to="fused"))(*args)
    torch.testing.assert_close(got2, want, atol=ATOL, rtol=1e-5)


# ------------------------------------------------------------------ memory: no S x S in the fused lowering

def _square_tensors(text: str, s: int) -> list[str]:
    """Tensor / memref types in ``text`` with two trailing-or-not dims both equal to S."""
    return [t for t in re.findall(r"(?:tensor|memref)<([0-9x?]+)x[a-z]+[0-9]*", text)
            if t.split("x").count(str(s)) >= 2]


class CausalArange(nn.Module):
    """Causal mask built in the graph from two aranges (LLaMA-style), proven causal by the matcher."""

    def forward(self, q, k, v):
        s = q.shape[-2]
        rows = torch.arange(s).unsqueeze(-1)
        cols = torch.arange(s).unsqueeze(0)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(cols > rows, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def test_fused_lowering_has_no_s_by_s_tensor():
    s = 96
    q, k, v = _qkv(h=2, hk=2, sq=s, sk=s, d=8)
    imported = am.import_(CausalArange().eval(), (q, k, v))
    site = am.find(imported).sites[0]
    assert site.causal and all(m.only_causal for m in site.masks)
    plain = str(am.lower(imported, emit="linalg"))
    assert _square_tensors(plain, s), "the unfused lowering should hold the S x S scores"
    fused = am.rewrite(imported, to="fused", tile=32)
    fused_ssmax = am.rewrite(imported, to="ssmax", s=0.5, fused=True, tile=32)
    for mod in (fused, fused_ssmax):
        for level in ("torch", "linalg", "llvm"):
            text = str(am.lower(mod, emit=level))
            assert not _square_tensors(text, s), (level, _square_tensors(text, s)[:3])
    got = am.compile(fused)(q, k, v)
    torch.testing.assert_close(got, semantics.attention(q, k, v, is_causal=True), atol=ATOL, rtol=1e-5)
    got = am.compile(fused_ssmax)(q, k, v)
    torch.testing.assert_close(got, semantics.ssmax_attention(q, k, v, is_causal=True, s=0.5), atol=ATOL, rtol=1e-5)


def test_fused_tail_tile_and_fully_masked_row():
    """S_k not a multiple of the tile (a tail tile), and a row with no attendable key gives 0, not NaN."""
    q, k, v = _qkv(sq=5, sk=11)
    bias = torch.zeros(1, 1, 5, 11)
    bias[..., 2, :] = float("-inf")
    imported = am.import_(CrossAdditive().eval(), (q, k, v, bias))
    got = am.compile(am.rewrite(imported, to="fused", tile=4))(q, k, v, bias)
    assert torch.isfinite(got).all()
    want = semantics.attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    assert got[:, :, 2].abs().max() == 0


# ------------------------------------------------------------------ CLI and errors

def test_cli_writes_lowered_mlir(gqa_onnx, tmp_path, capsys):
    from attnpass.cli import main

    for emit, marker in (("torch", "torch_c.to_builtin_tensor"), ("linalg", "scf.for"), ("llvm", "llvm.func")):
        out = tmp_path / f"out_{emit}.mlir"
        assert main(["mlir", str(gqa_onnx), "--to", "fused", "--tile", "8", "--emit", emit, "-o", str(out)]) == 0
        assert marker in out.read_text()
    out = tmp_path / "ssmax.mlir"
    assert main(["mlir", str(gqa_onnx), "--to", "ssmax", "--train-len", "16", "-o", str(out)]) == 0
    assert "attnpass_ssmax_0" in out.read_text()
    out = tmp_path / "ssmax_fused.mlir"
    assert main(["mlir", str(gqa_onnx), "--to", "ssmax", "--fused", "--s", "0.5", "-o", str(out)]) == 0
    assert "attnpass_fused_0" in out.read_text() and "attnpass_ssmax" not in out.read_text()
    assert main(["mlir", str(gqa_onnx), "--to", "fused", "--fused"]) == 2
    capsys.readouterr()
    assert main(["mlir", str(gqa_onnx), "--to", "fused", "--json", "-o", str(tmp_path / "j.mlir")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["sites"]) == 1 and data["sites"][0]["fusable"] and data["written"].endswith("j.mlir")
    assert main(["mlir", str(gqa_onnx), "--json"]) == 2  # stdout would carry the MLIR text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".attnpass-")]


def test_cli_bad_input_names_the_file(tmp_path, capsys):
    from attnpass.cli import main

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    out = tmp_path / "never.mlir"
    assert main(["mlir", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.onnx" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["mlir", str(tmp_path / "missing.onnx")]) == 2


def test_bad_module_and_rewrite_name():
    with pytest.raises(AttnpassError):
        am.find("this is not mlir")
    q, k, v = _qkv()
    with pytest.raises(AttnpassError):
        am.rewrite(am.import_(CausalTril(16).eval(), (q, k, v)), to="flash")


def test_import_attnpass_does_not_load_torch_mlir():
    code = "import sys, attnpass, attnpass.mlir; print('torch_mlir' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_softmax_that_is_not_attention_is_left_alone():
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return torch.softmax(x @ self.w, dim=-1) @ self.w.t()

    report = am.find(am.import_(Router().eval(), (torch.randn(3, 8),)))
    assert len(report.sites) == 0 and len(report.skipped) == 1
    assert math.isfinite(1.0)


def test_the_mlir_emitter_reads_its_masks_and_causal_from_the_plan():
    """The emitter's inputs are the plan's: a causal mask proven from its construction becomes the loop
    nest's causal (no mask tensor passed), an SDPA call's bool mask is the op mask, an absent one is none."""
    from attnpass.passes.plan import Action, MaskKind, RewriteSpec, plan_for
    from attnpass.rewrite import mlir as rw

    fuse_spec = RewriteSpec(to="fused").resolve()
    q, k, v = _qkv()
    module = am.import_(CausalArange().eval(), (q, k, v))  # kept alive: the report points into it
    report = am.find(module)
    (site,) = report.sites
    plan = plan_for(site, fuse_spec, rw.CAPS, report.adapters[site.index])
    assert plan.action is Action.FUSE and plan.causal and plan.op_mask is None
    assert not plan.op_mask_bool and not plan.op_mask_additive and len(plan.keep_terms) == 1

    allowed = torch.rand(1, 1, 16, 16) > 0.3

    class Sdpa(nn.Module):
        def forward(self, q, k, v, m=None):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)

    for args, kind in (((q, k, v, allowed), MaskKind.BOOL), ((q, k, v), None)):
        module = am.import_(Sdpa().eval(), args)
        report = am.find(module)
        (site,) = report.sites
        plan = plan_for(site, fuse_spec, rw.CAPS, report.adapters[site.index])
        assert plan.action is Action.FUSE and not plan.causal
        assert (plan.op_mask.kind if plan.op_mask is not None else None) == kind
        out, rep = am.rewrite(module, to="fused", with_report=True)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=args[3] if len(args) > 3 else None)
        torch.testing.assert_close(am.compile(out)(*args), want, atol=ATOL, rtol=1e-5)
        assert "fused via" in " ".join(rep.sites[0].notes)
