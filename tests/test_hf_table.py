"""One table for the newer HF corpus families, through torch.fx and ONNX (both exporters) with the same checks.

Each row: the model, its exact site count, its KV head count, and the ONNX fused targets.  Every IR asserts
the same three things: the sites are found, the fused rewrite equals the original, SSMax with ``s=0, b=1``
equals the original (fx at 1e-5; ONNX validated by ``attnpass.onnx.rewrite`` in onnxruntime on the same
padded batch).  Exports happen once per model and exporter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import attnpass
import attnpass.onnx as aonnx
from tests import hf_corpus as hc

warnings.filterwarnings("ignore")
ATTN = torch.ops.attnpass.attention.default


@dataclass(frozen=True)
class Row:
    name: str
    sites: int
    kv_heads: int | None = 4  # None: not asserted (see the row's comment)
    exporters: tuple[str, ...] = ("torchscript", "dynamo")
    targets: tuple[str, ...] = ("ort",)  # the fused ONNX targets


ROWS = [
    # Falcon: in-place ``scores /= sqrt(d)``, multi-query: its one KV head is broadcast by the matmul, so for
    # MultiHeadAttention (which needs as many KV heads as query heads) the plan repeats it; opset 23 takes it as is
    Row("falcon", 2, kv_heads=1, targets=("ort", "onnx23")),
    Row("bart", 3),  # encoder self, decoder self, cross
    Row("whisper", 3, exporters=("dynamo",)),  # TorchScript cannot export aten::diff
    # TorchScript: the head count comes from a -1 reshape and survives the rotary Slice/Concat of the head dim
    Row("gpt_neox", 2),
    Row("phi", 2),
    Row("qwen2", 2, kv_heads=2),
    Row("mistral", 2, kv_heads=2),
    Row("clip_text", 2),
    Row("distilbert", 2),
    # HF's default sdpa attention: both exporters decompose it with a ``Where(IsNaN(p), 0, p)`` guard after the
    # softmax, which must not block fusion.  Q and K arrive pre-scaled by sqrt(scale) (and, from dynamo, K^T is
    # transposed with the heads folded into the batch): the K/V repetition is still seen, so the op reads 2 KV heads.
    Row("llama_sdpa", 2, kv_heads=2),
]
BY_NAME = {r.name: r for r in ROWS}


class _Flat(torch.nn.Module):
    """Positional inputs only (the ONNX exporters name them in0, in1, ...), main output only."""

    def __init__(self, model: torch.nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        n = len(xs) - len(self.keys)
        return hc.output_tensor(self.model(*xs[:n], **dict(zip(self.keys, xs[n:]))))


@pytest.fixture(scope="module", params=[r.name for r in ROWS])
def built(request, tmp_path_factory):
    row = BY_NAME[request.param]
    torch.manual_seed(0)
    model, args, kwargs = getattr(hc, row.name)()
    flat = _Flat(model.eval(), list(kwargs)).eval()
    inputs = tuple(args) + tuple(kwargs.values())
    with torch.no_grad():
        ref = flat(*inputs)
    ep = torch.export.export(flat, inputs, strict=False)
    return row, flat, inputs, ref, ep, tmp_path_factory.mktemp(row.name)


def test_fx_found_fused_and_ssmax_identity(built) -> None:
    row, _, inputs, ref, ep, _ = built
    report = attnpass.find(ep)
    assert len(report.sites) == row.sites, ([s.summary() for s in report.sites], report.skipped)
    assert all(s.fusable and row.kv_heads in (None, s.kv_heads) for s in report.sites), [s.summary() for s in report.sites]
    fused = attnpass.fuse(ep)
    assert sum(n.target == ATTN for n in fused.graph.nodes) == row.sites
    for gm in (fused, attnpass.to_ssmax(ep, s=0.0, b=1.0), attnpass.to_ssmax(ep, s=0.0, b=1.0, fused=True)):
        with torch.no_grad():
            torch.testing.assert_close(gm(*inputs), ref, rtol=1e-5, atol=1e-5)


def test_onnx_found_fused_and_ssmax_identity(built) -> None:
    """Every exporter the row lists (TorchScript and dynamo unless the row says why not)."""
    row, flat, inputs, _, _, tmp = built
    names = [f"in{i}" for i in range(len(inputs))]
    feeds = {n: x.numpy() for n, x in zip(names, inputs)}
    for exporter in row.exporters:
        path = tmp / f"{exporter}.onnx"
        torch.onnx.export(flat.eval(), inputs, str(path), dynamo=exporter == "dynamo",
                          opset_version=18 if exporter == "dynamo" else 17, input_names=names, output_names=["y"],
                          **({"verbose": False} if exporter == "dynamo" else {}))
        report = aonnx.find(path)
        assert len(report) == row.sites, (exporter, report.as_dict())
        assert all(s.fusable and row.kv_heads in (None, s.kv_heads) for s in report), (exporter, [s.summary() for s in report])
        if row.name.endswith("_sdpa"):
            assert all("NaN guard after softmax" in s.notes for s in report), [s.notes for s in report]
        for target in row.targets:
            fused = aonnx.rewrite(path, Path(tmp) / f"{exporter}_{target}.onnx", to="fused", target=target, inputs=feeds)
            assert len(fused.rewritten) == row.sites and fused.validation.passed, (exporter, target, fused.left)
        ident = aonnx.rewrite(path, Path(tmp) / f"{exporter}_ssmax.onnx", to="ssmax", s=0.0, bias=1.0, inputs=feeds)
        assert len(ident.rewritten) == row.sites and ident.validation.passed, exporter
