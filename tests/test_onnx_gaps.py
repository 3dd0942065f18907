"""The variants of ``test_fx_gaps`` exported to ONNX by both exporters: the same sites, the same reasons.

Found once; fused equals the original in onnxruntime (or left with the reason the fx report gives); SSMax with
``s=0, b=1`` equals the original; SSMax fused into the op equals SSMax in place.  3-D scores (heads folded into the
batch) fuse as one head over a ``[B*H]`` batch, with their masks laid out on the 3-D scores.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import attnpass.onnx as aonnx
from tests.test_fx_gaps import CASES, Case

warnings.filterwarnings("ignore")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_onnx_same_site_fused_and_ssmax_identity(case: Case, exporter: str, tmp_path: Path) -> None:
    names = [f"in{i}" for i in range(len(case.args))]
    path = tmp_path / "m.onnx"
    torch.onnx.export(case.module.eval(), case.args, str(path), dynamo=exporter == "dynamo",
                      opset_version=18 if exporter == "dynamo" else 17, input_names=names, output_names=["y"],
                      **({"verbose": False} if exporter == "dynamo" else {}))
    feeds = {n: x.numpy() for n, x in zip(names, case.args)}
    report = aonnx.find(path)
    assert len(report) == 1, report.as_dict()
    site = report[0]
    fused = aonnx.rewrite(path, tmp_path / "fused.onnx", to="fused", inputs=feeds)
    if case.blocker is not None:
        assert not site.fusable and case.blocker in site.fuse_blocker
        assert len(fused.rewritten) == 0 and case.blocker in fused.left[0]
    else:
        assert site.fusable and len(fused.rewritten) == 1 and fused.validation.passed
        # checked against the original at s=0, b=1 and against the unfused SSMax rewrite at s=0.43
        fs = aonnx.rewrite(path, tmp_path / "fused_ssmax.onnx", to="fused", s=0.43, inputs=feeds)
        assert len(fs.rewritten) == 1 and fs.validation.passed, fs.left
    if case.note is not None:
        assert any(case.note in n for n in site.notes), site.notes
    ident = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.0, bias=1.0, inputs=feeds)
    assert len(ident.rewritten) == 1 and ident.validation.passed
