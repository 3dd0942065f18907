"""Top-k sites in ONNX, from both exporters: found through the ONNX adapter, rewritten to standard ops (TopK on
the logits, one ReduceLogSumExp, no Softmax left), validated in onnxruntime by ``attnpass.onnx.rewrite``."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

import attnpass.onnx as aonnx
from attnpass.errors import AttnpassError
from tests.topk_modules import LEAVE, REWRITE

EXPORTERS = ("dynamo", "torchscript")


def _export(m: torch.nn.Module, x: torch.Tensor, exporter: str, path: Path) -> Path:
    if exporter == "dynamo":
        torch.onnx.export(m, (x,), str(path), dynamo=True, opset_version=18, input_names=["x"], verbose=False)
    else:
        torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("topk_onnx")
    cases = {**{n: (c[0], c[1]) for n, c in REWRITE.items()}, **{n: (c[0], c[1]) for n, c in LEAVE.items()}}
    return {(n, e): _export(make().eval(), x(), e, d / f"{n}_{e}.onnx") for n, (make, x) in cases.items() for e in EXPORTERS}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(REWRITE))
def test_rewritten_equals_original_in_onnxruntime(models, tmp_path: Path, name: str, exporter: str) -> None:
    _, _, form, k, renorm = REWRITE[name]
    src = models[(name, exporter)]
    (site,) = aonnx.find(src).report.topk
    assert (str(site.form), site.k, site.renormalize, site.blocker) == (form, k, renorm, None)
    res = aonnx.rewrite(src, tmp_path / "out.onnx", to="fused", rtol=1e-6, atol=1e-6)
    assert res.validation is not None and res.validation.passed
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node]
    assert "Softmax" not in ops, "no V-sized probability tensor may remain"
    if form == "topk":
        assert ops.count("TopK") == 1 and ops.count("ReduceLogSumExp") == 1
    if form == "argmax":
        assert ops.count("ArgMax") == 1 and "ReduceLogSumExp" not in ops


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(LEAVE))
def test_left_alone_with_reason(models, tmp_path: Path, name: str, exporter: str) -> None:
    why = LEAVE[name][2]
    src = models[(name, exporter)]
    (site,) = aonnx.find(src).report.topk
    assert not site.fusable and why in site.blocker
    with pytest.raises(AttnpassError):  # nothing to rewrite: no attention, no fusable selection
        aonnx.rewrite(src, tmp_path / "out.onnx", to="fused")
    assert not (tmp_path / "out.onnx").exists()


def test_ssmax_rewrite_keeps_selection(models, tmp_path: Path) -> None:
    """``to="ssmax"`` changes attention only: a router-only model has nothing for it."""
    with pytest.raises(AttnpassError):
        aonnx.rewrite(models[("router", "dynamo")], tmp_path / "out.onnx", to="ssmax")


def test_inspect_lists_router_sites(models, capsys) -> None:
    """``attnpass inspect`` shows the router with what it picks; ``--json`` carries the same under "topk"."""
    import json

    from attnpass.cli import main

    src = str(models[("router", "torchscript")])
    assert main(["inspect", src, "--json"]) == 0
    (t,) = json.loads(capsys.readouterr().out)["topk"]
    assert (t["form"], t["k"], t["renormalize"], t["fusable"]) == ("topk", 2, True, True)
    assert main(["inspect", src]) == 0
    out = capsys.readouterr().out
    assert "top-k" in out and "topk" in out


def test_rewrite_result_lists_what_was_done(models, tmp_path: Path) -> None:
    res = aonnx.rewrite(models[("head", "dynamo")], tmp_path / "out.onnx", to="fused")
    (t,) = res.as_dict()["topk"]
    assert t["fusable"] and any("TopK on the logits" in n for n in t["notes"])
