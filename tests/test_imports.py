"""The package's import graph: every module imports on its own (no circle), ``validate`` and ``onnx`` do not
import each other (both use ``modelio``), and ``attnpass.mlir`` is reachable lazily like ``attnpass.onnx``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import attnpass

PACKAGE = Path(attnpass.__file__).parent
ROOT = PACKAGE.parent
#: Modules whose import needs a backend this machine may lack (they import it at module level).
NEEDS = {"attnpass.kernels.triton": "triton"}


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imported first of the package (a circle shows as "partially initialized").

    One interpreter, the package's modules dropped from ``sys.modules`` before each import: torch and
    onnx stay loaded, so the whole package is checked in seconds rather than one interpreter per module.
    """
    script = (
        "import importlib, sys\n"
        f"names = {_modules()!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m == 'attnpass' or m.startswith('attnpass.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append((n, f'{type(e).__name__}: {e}'))\n"
        "print(repr(bad))\n"
    )
    r = _python(script)
    assert r.returncode == 0, r.stderr
    bad = [(n, err) for n, err in ast.literal_eval(r.stdout.strip().splitlines()[-1])
           if not (n in NEEDS and f"No module named '{NEEDS[n]}'" in err)]
    assert not bad, bad


def _imports(path: Path) -> set[str]:
    """Every ``attnpass.*`` module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in found if n.startswith("attnpass")}


@pytest.mark.parametrize("a, b", [("validate", "onnx"), ("onnx", "validate"), ("modelio", "onnx"), ("modelio", "validate")])
def test_no_import_between(a: str, b: str) -> None:
    assert f"attnpass.{b}" not in _imports(PACKAGE / f"{a}.py")


def test_spec_depends_only_on_semantics_and_errors() -> None:
    assert _imports(PACKAGE / "spec.py") <= {"attnpass", "attnpass.semantics", "attnpass.errors",
                                             "attnpass.errors.AttnpassError"}


def test_mlir_namespace_is_lazy_like_onnx() -> None:
    r = _python(
        "import sys, attnpass\n"
        "assert 'torch_mlir' not in sys.modules and 'attnpass.mlir' not in sys.modules\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "assert callable(attnpass.mlir.find) and callable(attnpass.mlir.rewrite)\n"
        "assert 'torch_mlir' not in sys.modules  # the namespace itself does not need the wheel\n"
        "assert attnpass.onnx.find is not None\n"
        "print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
