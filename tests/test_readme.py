"""Every ``python`` code block of the README runs as written, in order, in one namespace (as a reader pastes them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_python_blocks() -> None:
    assert len(_blocks()) >= 3


def test_readme_python_blocks_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the snippets write m.onnx, out.onnx, out/
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(_blocks()):
        if "attnpass.mlir" in code:
            pytest.importorskip("torch_mlir", reason="the MLIR snippet needs torch-mlir")
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "out.onnx").is_file()
    assert namespace["logits"].shape[:2] == (3, 40)
