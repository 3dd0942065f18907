"""MLIR path on the HF corpus beyond the variant table: SDPA calls kept by the import, torch-mlir's own SDPA
decomposition, and site counts and the fused JIT from ONNX imports (both exporters) against torch eager.

The corpus models run through ``ExecutionEngine`` at ``opt_level=0``: LLVM's O3 takes ~7 s per
model here and the code it optimises is the same generated loop nest that ``test_mlir_rewrite``
checks at O3 on the small variants.  Numbers are compared with torch eager in fp32.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)
import transformers

import attnpass.mlir as am
from tests.hf_corpus import CORPUS, TextModel, output_tensor

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

ATOL, RTOL = 2e-5, 1e-5
ONNX_MODELS = ("gpt2", "bert", "llama")
EXPORTERS = ("dynamo", "torchscript")


def _build(name: str) -> tuple[torch.nn.Module, tuple, dict]:
    torch.manual_seed(0)
    model, args, kwargs = CORPUS[name][0]()
    if name == "mixtral":
        # transformers' default "grouped_mm" experts call aten.histc, which torch-mlir cannot lower;
        # the attention (and the router this test checks is not a site) is the same either way
        model.set_experts_implementation("batched_mm")
    return model.eval(), args, kwargs


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def corpus() -> dict[str, tuple]:
    """name -> (model, args, kwargs, imported module, eager output); every family's counts, fused JIT and SSMax
    through the torch import are cells of ``test_variant_table``, so only the sdpa family is imported here."""
    out = {}
    for name in ("llama_sdpa",):
        model, args, kwargs = _build(name)
        with torch.no_grad():
            want = output_tensor(model(*args, **kwargs))
        out[name] = (model, args, kwargs, am.import_(model, args, kwargs), want)
    return out


def test_sdpa_calls_take_ssmax_on_q_and_fused_ssmax_agrees(corpus):
    """HF's sdpa path: SSMax keeps the calls (q scaled, mask as given) and equals the fused-SSMax loop nest."""
    _, args, kwargs, imported, want = corpus["llama_sdpa"]
    plain, report = am.rewrite(imported, to="ssmax", s=0.6, b=0.2, with_report=True)
    assert all("factor on q" in " ".join(s.notes) for s in report.sites)
    assert str(plain).count("torch.aten.scaled_dot_product_attention") == 2
    fused = am.rewrite(imported, to="ssmax", s=0.6, b=0.2, fused=True)
    assert "scaled_dot_product_attention" not in str(fused)
    a = _first(am.compile(plain, opt_level=0)(*args, *kwargs.values()))
    b = _first(am.compile(fused, opt_level=0)(*args, *kwargs.values()))
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert (a - want).abs().max() > 1e-3  # SSMax changes the model on purpose


def test_decomposed_sdpa_is_found_and_its_guard_is_implied():
    """torch-mlir's own import decomposes SDPA (softmax + safe-softmax guard): explicit sites, fused."""
    from torch_mlir import fx as tm_fx

    model, args, kwargs = _build("llama_sdpa")
    ep = torch.export.export(am._persistent_buffers(model), args, kwargs, strict=False)
    imported = tm_fx.export_and_import(ep, output_type="raw")
    report = am.find(imported)
    assert len(report.sites) == 2 and all(s.form == "explicit" and s.fusable for s in report.sites)
    assert all("safe-softmax guard: implied" in " ".join(s.notes) for s in report.sites)
    fused = am.rewrite(imported, to="fused")
    assert "aten.all" not in str(fused)  # the guard went with the chain
    got = _first(am.compile(fused, opt_level=0)(*args, *kwargs.values()))
    with torch.no_grad():
        want = output_tensor(model(*args, **kwargs))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ ONNX imports

_Text = TextModel


@pytest.fixture(scope="module")
def onnx_corpus(tmp_path_factory) -> dict[tuple[str, str], tuple]:
    """(name, exporter) -> (path, args, eager output); static shapes, the opsets test_onnx_corpus uses."""
    d = tmp_path_factory.mktemp("mlir_onnx")
    out = {}
    for name in ONNX_MODELS:
        model, args, kwargs = _build(name)
        wrapped = _Text(model).eval()
        inputs = (args[0], kwargs["attention_mask"])
        with torch.no_grad():
            want = wrapped(*inputs)
        for exporter in EXPORTERS:
            path = d / f"{name}_{exporter}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped, inputs, str(path), dynamo=exporter == "dynamo",
                                  opset_version=18 if exporter == "dynamo" else 17,
                                  input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                                  verbose=False)
            out[(name, exporter)] = (path, inputs, want)
    return out


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_import_counts_and_fused_jit(onnx_corpus, name, exporter):
    path, inputs, want = onnx_corpus[(name, exporter)]
    imported = am.import_(str(path))
    report = am.find(imported)
    assert len(report.sites) == CORPUS[name][1], report.skipped
    assert all(s.fusable and s.heads == 4 and s.head_dim == 8 for s in report.sites), \
        [s.fuse_blocker for s in report.sites]
    fused, rep = am.rewrite(imported, to="fused", with_report=True)
    assert sum("fused via" in " ".join(s.notes) for s in rep.sites) == CORPUS[name][1]
    got = _first(am.compile(fused, opt_level=0)(*inputs))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
