"""The package a user installs: ``python -m build`` makes an sdist and a wheel without warnings, and the
wheel, installed into a fresh virtual environment, runs ``attnpass demo`` from outside the source tree.

The fresh venv reuses the packages already installed for the tests (torch, onnxruntime, ...) through a
``.pth`` line pointing at this interpreter's site-packages, so nothing is downloaded; the wheel itself
is installed with ``--no-deps --no-index``.  ``import attnpass`` there must find the installed copy,
not this checkout.  The kernel cache is a fresh folder, so the demo builds the C++ kernel and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that would put this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """``python -m build`` (sdist, then the wheel from the sdist) into a temporary folder."""
    out = tmp_path_factory.mktemp("dist")
    # built from a copy: setuptools writes its staging folder and egg-info into the project folder, where another
    # test process (pytest-xdist) or a developer's tools may be reading or writing at the same time
    src = tmp_path_factory.mktemp("src") / "attnpass"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build",
                                                            "dist", ".pytest_cache", ".ruff_cache", "attnpass-*"))
    proc = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=src,
                env=_clean_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"python -m build failed:\n{log[-3000:]}"
    return {"log": log, "wheel": next(out.glob("attnpass-*.whl")), "sdist": next(out.glob("attnpass-*.tar.gz"))}


def test_build_makes_an_sdist_and_a_wheel_without_deprecation_warnings(built) -> None:
    lowered = built["log"].lower()
    assert "deprecat" not in lowered, [line for line in built["log"].splitlines() if "eprecat" in line]
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = whl.namelist()
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "attnpass/kernels/cpu/attention.cpp" in names, "the C++ kernel source must ship: it is built on first use"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta
    for extra in ("onnx", "mlir", "hf", "gpu", "dev"):
        assert f"Provides-Extra: {extra}" in meta


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed and this interpreter's site-packages readable."""
    root = tmp_path_factory.mktemp("venv")
    proc = _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root)
    assert proc.returncode == 0, proc.stderr
    python = root / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root,
                   env=_clean_env()).stdout.strip()
    Path(purelib, "_reuse_installed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(built["wheel"])], cwd=root,
                env=_clean_env())
    assert proc.returncode == 0, f"pip install of the wheel failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    print("\n".join(proc.stdout.strip().splitlines()[-3:]))  # the install log's tail, shown with -s
    return root


def test_the_installed_wheel_runs_the_demo_outside_the_source_tree(venv, tmp_path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "kernels"), COLUMNS="160")
    where = _run([str(venv / "bin" / "python"), "-c", "import attnpass; print(attnpass.__file__)"], cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), f"imported {where.stdout.strip()}, not the installed wheel"
    demo = _run([str(venv / "bin" / "attnpass"), "demo", "--seq", "32", "--layers", "1"], cwd=work, env=env, timeout=600)
    assert demo.returncode == 0, f"attnpass demo failed (exit {demo.returncode}):\n{demo.stdout[-3000:]}\n{demo.stderr[-3000:]}"
    assert "demo OK" in demo.stdout
    print("\n".join(line for line in demo.stderr.splitlines() if "kernel" in line))  # shown with -s
    assert "building the C++ CPU attention kernel" in demo.stderr, demo.stderr[-2000:]
    assert "kernel built in" in demo.stderr
    assert "could not be built" not in demo.stderr
    assert not (ROOT / "elsewhere").exists() and not any(work.iterdir()), "the demo must not write into the working folder"
