"""ONNX pass on the HF corpus, exported both ways (dynamo and TorchScript exporters).

Each tiny model (random weights, eager attention, no cache) is exported once per module; every
rewrite is validated in onnxruntime by ``attnpass.onnx.rewrite`` itself (fused: matches the
original; SSMax: the s=0, b=1 self-test matches and the real one is finite).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers

import attnpass
import attnpass.onnx as aonnx
from attnpass.validate import make_inputs, run

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

EXPECTED = {"bert": 2, "gpt2": 2, "llama": 2, "t5": 2, "vit": 2, "mixtral": 1}
EXPORTERS = ("dynamo", "torchscript")


def _model(name: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    eager = {"attn_implementation": "eager"}
    t = transformers
    if name == "bert":
        m = t.BertModel(t.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, **eager))
    elif name == "gpt2":
        m = t.GPT2Model(t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False, **eager))
    elif name == "llama":
        m = t.LlamaModel(t.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                       use_cache=False, **eager))
    elif name == "t5":
        m = t.T5EncoderModel(t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        use_cache=False, **eager))
    elif name == "vit":
        m = t.ViTModel(t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   image_size=16, patch_size=8, **eager), add_pooling_layer=False)
        return m.eval(), "image"
    elif name == "mixtral":
        m = t.MixtralModel(t.MixtralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, num_local_experts=4,
                                           num_experts_per_tok=2, max_position_embeddings=64, use_cache=False,
                                           experts_implementation="batched_mm", **eager))
    else:
        raise KeyError(name)
    return m.eval(), "text"


class _Text(torch.nn.Module):
    def __init__(self, m: torch.nn.Module):
        super().__init__()
        self.m = m

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids, attention_mask=attention_mask).last_hidden_state


class _Image(_Text):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.m(pixel_values).last_hidden_state


def wrapped(name: str) -> tuple[torch.nn.Module, tuple, list[str]]:
    m, kind = _model(name)
    if kind == "text":
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, -2:] = 0
        return _Text(m), (torch.randint(0, 100, (2, 8)), mask), ["input_ids", "attention_mask"]
    return _Image(m), (torch.randn(2, 3, 16, 16),), ["pixel_values"]


def export(name: str, exporter: str, path: Path) -> Path:
    w, args, names = wrapped(name)
    if exporter == "dynamo":
        dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "pixel_values": {0: "batch"}}
        shapes = tuple({ax: torch.export.Dim.DYNAMIC for ax in dyn[n]} for n in names)
        torch.onnx.export(w, args, str(path), dynamo=True, opset_version=18, input_names=names,
                          output_names=["last_hidden_state"], dynamic_shapes=shapes, verbose=False)
    else:
        dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "pixel_values": {0: "batch"}}
        torch.onnx.export(w, args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes={n: dyn[n] for n in names})
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("onnx_corpus")
    return {(n, e): export(n, e, d / f"{n}_{e}.onnx") for n in EXPECTED for e in EXPORTERS}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_site_counts_and_every_rewrite_validates(corpus, tmp_path, name, exporter):
    src = corpus[(name, exporter)]
    before = src.read_bytes()
    rep = aonnx.find(src)
    assert len(rep) == EXPECTED[name], [s.summary() for s in rep]
    for site in rep:
        assert site.heads == 4 and site.head_dim == 8 and site.fusable
    if name == "t5":
        assert all(s.scale == 1.0 for s in rep)  # T5: no 1/sqrt(d)
    else:
        assert all(abs(s.scale - 8 ** -0.5) < 1e-6 for s in rep)
    if name == "mixtral":
        assert len(rep.skipped) == 1  # the router softmax is not attention
    for to, target in (("fused", "ort"), ("fused", "onnx23"), ("ssmax", "ort")):
        out = tmp_path / f"{to}_{target}.onnx"
        res = aonnx.rewrite(src, out, to=to, target=target)
        assert res.rewritten == EXPECTED[name] and not res.left
        assert res.validation is not None and res.validation.passed
        if to == "ssmax":
            assert res.self_test.passed
        ops = {(n.domain, n.op_type) for n in ir.load(out).graph}
        if to == "fused":
            assert ("com.microsoft", "MultiHeadAttention") in ops if target == "ort" else ("", "Attention") in ops
            assert ("", "Softmax") not in ops or name == "mixtral"
    assert src.read_bytes() == before  # the input is never modified


def test_ssmax_matches_the_fx_rewrite_with_padding(corpus, tmp_path):
    """Same model, two IRs: ONNX SSMax in onnxruntime equals the torch.fx SSMax rewrite (n from the padded mask)."""
    w, args, names = wrapped("bert")
    gm = attnpass.to_ssmax(w, args, s=2.0)
    out = tmp_path / "bert_ssmax.onnx"
    aonnx.rewrite(corpus[("bert", "dynamo")], out, to="ssmax", s=2.0)
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    got = run(out, feeds)["last_hidden_state"]
    with torch.no_grad():
        ref = gm(*args).numpy()
        plain = w(*args).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-5  # SSMax did change the model (tiny random weights: small logits)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_axes_survive(corpus, tmp_path, exporter):
    out = tmp_path / "gpt2_ssmax.onnx"
    aonnx.rewrite(corpus[("gpt2", exporter)], out, to="ssmax", train_len=16)
    model = ir.load(out)
    assert [d if isinstance(d, int) else "sym" for d in model.graph.inputs[0].shape] == ["sym", "sym"]
    for seq in (5, 13):
        feeds = make_inputs(out, batch=3, seq=seq)
        y = run(out, feeds)["last_hidden_state"]
        assert y.shape == (3, seq, 32) and np.isfinite(y).all()
    assert {v.name for v in model.graph.initializers.values() if v.name.startswith("attnpass.ssmax.s_")} == {
        "attnpass.ssmax.s_0", "attnpass.ssmax.s_1"}
    assert model.graph.initializers["attnpass.ssmax.s_0"].shape.dims == (4,)


@pytest.mark.parametrize("target", ["ort", "onnx23"])
def test_fused_ops_are_sites_and_take_ssmax(corpus, tmp_path, target):
    """A graph that already holds MultiHeadAttention / opset-23 Attention: sdpa-form sites, SSMax by scaling Q."""
    fused = tmp_path / "fused.onnx"
    aonnx.rewrite(corpus[("llama", "dynamo")], fused, to="fused", target=target)
    rep = aonnx.find(fused)
    assert len(rep) == 2 and all(s.form == "sdpa" for s in rep)
    res = aonnx.rewrite(fused, tmp_path / "fused_ssmax.onnx", to="ssmax")
    assert res.rewritten == 2 and res.self_test.passed and res.validation.passed


def test_export_fused_and_ssmax(tmp_path):
    w, args, _ = wrapped("llama")
    for rewrite in ("fused", "ssmax"):
        res = attnpass.export(w, args, None, tmp_path / f"{rewrite}.onnx", rewrite=rewrite)
        assert res.ok and res.sites == 2
    ops = {n.op_type for n in ir.load(tmp_path / "fused.onnx").graph}
    assert "Attention" in ops and "Softmax" not in ops
