"""CLI surface of the ONNX commands: clear one-line errors, exit codes, nothing written on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnpass.cli import main


class _Attn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        p = torch.softmax((q @ k.transpose(-2, -1)) / 8 ** 0.5, dim=-1)
        return (p @ v).transpose(1, 2).reshape(b, s, 16)


class _Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x), dim=-1)


def _export(m: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(m, (torch.randn(2, 6, 16),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    good = _export(_Attn().eval(), d / "attn.onnx")
    none = _export(_Classifier().eval(), d / "classifier.onnx")
    text = d / "notes.onnx"
    text.write_text("this is not a model\n")
    trunc = d / "truncated.onnx"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return {"good": good, "none": none, "text": text, "trunc": trunc}


@pytest.mark.parametrize("which", ["missing", "text", "trunc"])
@pytest.mark.parametrize("command", ["inspect", "rewrite"])
def test_bad_input_is_one_line_exit_2_nothing_written(models, tmp_path, capsys, which, command):
    src = str(tmp_path / "nope.onnx") if which == "missing" else str(models[which])
    out = tmp_path / "out.onnx"
    argv = [command, src] + (["-o", str(out), "--to", "fused"] if command == "rewrite" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"attnpass {command}: error:") and Path(src).name in err
    assert not out.exists() and not list(tmp_path.glob(".attnpass-*"))


def test_no_attention_exit_0_nothing_written_unless_force(models, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(models["none"]), "-o", str(out), "--to", "ssmax"]) == 0
    assert "no attention found" in capsys.readouterr().out and not out.exists()
    assert main(["rewrite", str(models["none"]), "-o", str(out), "--to", "ssmax", "--force"]) == 0
    assert out.exists()
    assert main(["inspect", str(models["none"])]) == 0
    assert "no attention found" in capsys.readouterr().out


def test_inspect_json_rewrite_and_validate(models, tmp_path, capsys):
    assert main(["inspect", str(models["good"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["sites"]) == 1 and data["sites"][0]["heads"] == 2 and data["sites"][0]["head_dim"] == 8
    fused = tmp_path / "fused.onnx"
    assert main(["rewrite", str(models["good"]), "-o", str(fused), "--to", "fused", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["validation"]["passed"] and res["sites"][0]["rewritten"]
    assert main(["validate", str(models["good"]), str(fused), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"]
    ssmax = tmp_path / "ssmax.onnx"
    assert main(["rewrite", str(models["good"]), "-o", str(ssmax), "--to", "ssmax", "--s", "2.0", "--bias", "0.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    # SSMax changes the model on purpose: validate says so, with exit code 1
    assert main(["validate", str(models["good"]), str(ssmax), "--atol", "1e-7", "--rtol", "1e-7"]) == 1


def test_rewrite_refuses_to_overwrite_its_input(models, capsys):
    before = models["good"].read_bytes()
    assert main(["rewrite", str(models["good"]), "-o", str(models["good"]), "--to", "fused"]) == 2
    assert models["good"].read_bytes() == before


def test_rewrite_fused_ssmax(models, tmp_path, capsys):
    """``--to fused --ssmax``: one fused op with Q pre-scaled; equal to ``--to ssmax`` at the same s, b."""
    fused = tmp_path / "fused_ssmax.onnx"
    argv = ["rewrite", str(models["good"]), "-o", str(fused), "--to", "fused", "--ssmax", "--s", "0.7", "--bias", "0.3"]
    assert main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["to"] == "fused+ssmax" and res["sites"][0]["rewritten"]
    assert res["self_test"]["passed"] and res["validation"]["passed"]
    import onnx_ir as ir

    ops = {n.op_type for n in ir.load(fused).graph}
    assert "MultiHeadAttention" in ops and "Softmax" not in ops
    unfused = tmp_path / "ssmax.onnx"
    assert main(["rewrite", str(models["good"]), "-o", str(unfused), "--to", "ssmax", "--s", "0.7", "--bias", "0.3"]) == 0
    assert main(["validate", str(unfused), str(fused)]) == 0
    assert "PASS" in capsys.readouterr().out
