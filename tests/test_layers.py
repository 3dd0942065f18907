"""The package's layering, read from the source: who may import whom, and how large a module may grow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "attnpass"
MAX_LINES = 600
#: Modules allowed over MAX_LINES, each with the reason.
OVERSIZE = {
    "kernels/triton/kernels.py": "executed from source once per interpreter mode, so its kernels and their jit helpers stay one file (tables and the prune hook are in tuning.py)",
}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every ``attnpass...`` module a file imports (relative imports resolved), at any depth in the file."""
    return _imports_of(path.read_text(), ".".join(("attnpass", *path.relative_to(PKG).parent.parts)))


def _imports_of(source: str, package: str) -> set[str]:
    tree = ast.parse(source)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "attnpass" or m.startswith("attnpass.")}


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def test_the_package_has_the_layers() -> None:
    assert (PKG / "passes").is_dir() and (PKG / "rewrite").is_dir()
    assert len(_modules()) > 20


@pytest.mark.parametrize("path", [p for p in _modules() if p.parent.name == "passes"], ids=_rel)
def test_passes_import_no_emitter_backend_or_cli(path: Path) -> None:
    banned = ("attnpass.rewrite", "attnpass.lowering", "attnpass.kernels", "attnpass.commands")
    bad = sorted(m for m in _imports(path) if m.startswith(banned))
    assert not bad, f"{_rel(path)} imports {bad}"


@pytest.mark.parametrize("path", [p for p in _modules() if p.parent.name == "passes"], ids=_rel)
def test_passes_import_only_the_bottom_layer(path: Path) -> None:
    """The matcher and planner sit on ``semantics``, ``errors`` and the request (``spec``) and nothing else of ours."""
    allowed = ("attnpass.passes", "attnpass.semantics", "attnpass.errors", "attnpass.spec")
    bad = sorted(m for m in _imports(path) if m != "attnpass" and not m.startswith(allowed))
    assert not bad, f"{_rel(path)} imports {bad}"


def test_the_spec_sits_beside_semantics() -> None:
    """``spec.py`` is the bottom layer with ``semantics``: every layer (passes, emitters, facades, CLI) may import it."""
    mods = {m for m in _imports(PKG / "spec.py") if m != "attnpass"}
    assert mods <= {"attnpass.semantics", "attnpass.errors", "attnpass.errors.AttnpassError"}, mods
    assert "attnpass.semantics" in mods


@pytest.mark.parametrize("path", [p for p in _modules() if "rewrite" in p.relative_to(PKG).parts], ids=_rel)
def test_emitters_import_only_passes_semantics_and_each_other(path: Path) -> None:
    allowed = ("attnpass.passes", "attnpass.semantics", "attnpass.rewrite", "attnpass.errors", "attnpass.spec")
    bad = sorted(m for m in _imports(path) if m != "attnpass" and not m.startswith(allowed))
    assert not bad, f"{_rel(path)} imports {bad}"


def test_semantics_imports_nothing_of_ours() -> None:
    assert _imports(PKG / "semantics.py") == set()


def test_the_import_checker_sees_relative_and_nested_imports() -> None:
    """The checks above are only as good as ``_imports``: it must see what a violation would look like."""
    found = _imports_of("def f():\n    from attnpass.rewrite import fx\n    from ..kernels import reference\n", "attnpass.passes")
    assert "attnpass.rewrite" in found and "attnpass.kernels" in found


@pytest.mark.parametrize("path", _modules(), ids=_rel)
def test_no_module_over_the_size_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    if _rel(path) in OVERSIZE:
        return
    assert lines <= MAX_LINES, f"{_rel(path)} has {lines} lines (limit {MAX_LINES}); split it"


def test_oversize_exceptions_are_still_needed() -> None:
    """An exception that no longer applies is removed, so the list only names real debt."""
    for rel in OVERSIZE:
        path = PKG / rel
        assert path.exists() and len(path.read_text().splitlines()) > MAX_LINES, rel
