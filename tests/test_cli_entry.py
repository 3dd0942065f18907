"""The command line as people expect it (issue 15): version, ``python -m``, flags after the sub-command, help text,
light start-up, tables kept whole in pipes, output permissions, external data, nothing fused, honest validation."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from attnpass.cli import build_parser, main
from attnpass.errors import AttnpassError

ROOT = Path(__file__).resolve().parents[1]
LONG = "encoder_block_" + "really_long_segment_" * 6 + "softmax"


def _strict(text: str):
    """JSON as a strict parser reads it: ``NaN`` / ``Infinity`` tokens are errors."""
    def bad(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=bad)


class _Attn(torch.nn.Module):
    def __init__(self, return_probs: bool = False) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.return_probs = return_probs

    def forward(self, x: torch.Tensor):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        p = torch.softmax((q @ k.transpose(-2, -1)) / 8 ** 0.5, dim=-1)
        out = (p @ v).transpose(1, 2).reshape(b, s, 16)
        return (out, p) if self.return_probs else out


class _Plain(torch.nn.Module):
    """No attention at all."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def _export(m: torch.nn.Module, path: Path, seq: int = 6, dynamic: bool = True) -> Path:
    torch.onnx.export(m, (torch.randn(2, seq, 16),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}} if dynamic else None)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("entry")
    torch.manual_seed(0)
    good = _export(_Attn().eval(), d / "attn.onnx")
    proto = onnx.load(str(good))
    for node in proto.graph.node:
        if node.op_type == "Softmax":
            node.name = LONG
    long_names = d / "long.onnx"
    onnx.save(proto, str(long_names))
    external = d / "ext.onnx"
    onnx.save_model(onnx.load(str(good)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    return {
        "good": good,
        "long": long_names,
        "external": external,
        "probs": _export(_Attn(return_probs=True).eval(), d / "probs.onnx"),
        "one_key": _export(_Attn().eval(), d / "one_key.onnx", seq=1, dynamic=False),
        "plain": _export(_Plain().eval(), d / "plain.onnx"),
    }


def _python(*argv: str, cwd: Path = ROOT, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *flags, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_version_and_python_m() -> None:
    import attnpass

    res = _python("-m", "attnpass", "--version")
    assert res.returncode == 0 and res.stdout.strip() == f"attnpass {attnpass.__version__}"
    res = _python("-m", "attnpass", "--help")
    assert res.returncode == 0 and "rewrite" in res.stdout and "--version" in res.stdout


HEAVY = ("torch", "onnx", "onnxruntime", "onnx_ir", "onnxscript", "transformers", "torch_mlir", "triton", "numpy", "sympy")

#: The attnpass modules ``--help`` may load: the parser and what it needs to describe the flags.  A module outside
#: this list (a pass, an emitter, the HF parameter table, the relatives, the KV feeds, softmax_topk, ...) means an
#: eager import crept into the start-up path; import it inside the handler that uses it instead.
STARTUP = {"attnpass", "attnpass.cli", "attnpass.errors", "attnpass.hf_hook", "attnpass.torch_hook", "attnpass.commands",
           "attnpass.commands.demo", "attnpass.commands.flags", "attnpass.commands.mlir", "attnpass.commands.onnx",
           "attnpass.progress", "attnpass.result", "attnpass.spec"}


def test_help_loads_no_heavy_dependency() -> None:
    """``import attnpass.cli``, ``--help`` and every sub-command's ``--help`` load none of torch, onnx, onnxruntime,
    transformers, torch-mlir, numpy, and of attnpass only the start-up modules (a fresh interpreter, so nothing
    loaded by other tests hides an eager import)."""
    code = ("import sys, contextlib, io, json\n"
            "import attnpass.cli\n"
            "loaded = {'import attnpass.cli': sorted(sys.modules)}\n"
            "from attnpass.cli import build_parser, main\n"
            "names = [n for a in build_parser()._actions if hasattr(a, 'choices') and isinstance(a.choices, dict) "
            "for n in a.choices]\n"
            "for argv in [['--help'], *([n, '--help'] for n in names)]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "    loaded[' '.join(argv)] = sorted(sys.modules)\n"
            "print(json.dumps(loaded))\n")
    res = _python("-c", code)
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = json.loads(res.stdout)
    assert "import attnpass.cli" in loaded and "mlir --help" in loaded and "rewrite --help" in loaded
    for step, modules in loaded.items():
        heavy = sorted({m.split(".")[0] for m in modules} & set(HEAVY))
        assert heavy == [], f"{step} loads {heavy}"
        ours = sorted(m for m in modules if m.split(".")[0] == "attnpass")
        assert set(ours) <= STARTUP, f"{step} loads {sorted(set(ours) - STARTUP)}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_flag_has_help_and_shows_its_default() -> None:
    for name, p in _subparsers(build_parser()).items():
        text = p.format_help()
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"{name} {label}: no help text"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"default: {action.default}" in text or f"default {action.default}" in text, (name, label)


def test_debug_and_json_after_the_sub_command(models, tmp_path, capsys) -> None:
    missing = str(tmp_path / "nope.onnx")
    assert main(["inspect", missing]) == 2
    with pytest.raises(AttnpassError):
        main(["inspect", missing, "--debug"])
    with pytest.raises(AttnpassError):
        main(["--debug", "inspect", missing])
    capsys.readouterr()
    assert main(["inspect", str(models["good"]), "--json"]) == 0
    assert len(_strict(capsys.readouterr().out)["sites"]) == 1
    assert main(["--json", "inspect", str(models["good"])]) == 0
    assert len(_strict(capsys.readouterr().out)["sites"]) == 1


#: The fewest arguments each sub-command parses with (paths are not opened by the parser).
MINIMAL_ARGV = {"inspect": ["m.onnx"], "rewrite": ["m.onnx", "-o", "o.onnx", "--to", "fused"], "validate": ["a.onnx", "b.onnx"],
                "export": ["pkg.mod:make", "-o", "o.onnx"], "demo": [], "mlir": ["m.onnx"]}


def test_json_before_or_after_every_sub_command_that_has_it() -> None:
    parser = build_parser()
    with_json = [n for n, p in _subparsers(parser).items() if any("--json" in a.option_strings for a in p._actions)]
    assert with_json and set(with_json) <= set(MINIMAL_ARGV), "add the new sub-command to MINIMAL_ARGV"
    for name in with_json:
        argv = MINIMAL_ARGV[name]
        assert build_parser().parse_args([name, *argv]).json is False, name
        assert build_parser().parse_args(["--json", name, *argv]).json is True, name
        assert build_parser().parse_args([name, *argv, "--json"]).json is True, name
        assert build_parser().parse_args(["--json", "--debug", name, *argv]).debug is True, name


def test_tables_keep_full_names_when_piped(models) -> None:
    res = _python("-m", "attnpass", "inspect", str(models["long"]))
    assert res.returncode == 0, res.stderr[-2000:]
    assert LONG in res.stdout


def test_export_imports_a_module_from_the_current_directory(tmp_path) -> None:
    """As a console script runs it: no current directory on ``sys.path`` (``-P``) until ``export`` adds it."""
    (tmp_path / "usermodel.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.softmax(x @ x.transpose(-2, -1), dim=-1) @ x\n"
        "def make():\n"
        "    return M(), (torch.randn(1, 2, 4, 8),)\n")
    code = "import sys\nfrom attnpass.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    res = _python("-c", code, "export", "usermodel:make", "-o", "out.onnx", cwd=tmp_path, flags=("-P",))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out.onnx").is_file()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_same_permissions(models, tmp_path, capsys) -> None:
    pytest.importorskip("torch_mlir", reason="the MLIR half needs torch-mlir (the ONNX half is checked either way)")
    old = os.umask(0o022)
    try:
        assert main(["rewrite", str(models["good"]), "-o", str(tmp_path / "o.onnx"), "--to", "fused"]) == 0
        # SSMax: the MLIR fused rewrite needs static sizes, and a run that fuses nothing writes nothing
        assert main(["mlir", str(models["good"]), "--to", "ssmax", "-o", str(tmp_path / "o.mlir")]) == 0
    finally:
        os.umask(old)
    assert _mode(tmp_path / "o.onnx") == _mode(tmp_path / "o.mlir") == 0o644


def test_external_data_stays_external(models, tmp_path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(models["external"]), "-o", str(out), "--to", "fused"]) == 0
    assert (tmp_path / "out.onnx.data").is_file()
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    weights = [t for t in proto.graph.initializer if t.dims and np.prod(t.dims) >= 64]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)


def test_nothing_fused_is_like_nothing_found(models, tmp_path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(models["probs"]), "-o", str(out), "--to", "fused"]) == 0
    text = capsys.readouterr().out
    assert "none could be rewritten" in text and "nothing written" in text and not out.exists()
    assert main(["rewrite", str(models["probs"]), "-o", str(out), "--to", "fused", "--json"]) == 0
    assert _strict(capsys.readouterr().out)["written"] is None and not out.exists()
    assert main(["rewrite", str(models["probs"]), "-o", str(out), "--to", "fused", "--force"]) == 0
    assert out.exists()


def test_mlir_nothing_rewritten_is_like_nothing_found(models, tmp_path, capsys) -> None:
    """``mlir`` as ``rewrite``: nothing fusable, or no attention at all, says why, exits 0, writes nothing (not even
    MLIR text on stdout) unless ``--force``; ``--to none`` (just import and lower) writes as before."""
    pytest.importorskip("torch_mlir", reason="the mlir command needs torch-mlir")
    out = tmp_path / "out.mlir"
    assert main(["mlir", str(models["probs"]), "--to", "fused", "-o", str(out)]) == 0
    res = capsys.readouterr()
    assert "none could be rewritten to fused" in res.err and "nothing written" in res.err and not out.exists()
    assert main(["mlir", str(models["probs"]), "--to", "fused"]) == 0
    res = capsys.readouterr()
    assert res.out == "" and "nothing written" in res.err
    assert main(["mlir", str(models["plain"]), "--to", "ssmax", "-o", str(out)]) == 0
    assert "no attention found" in capsys.readouterr().err and not out.exists()
    assert main(["--json", "mlir", str(models["probs"]), "--to", "fused", "-o", str(out)]) == 0
    data = _strict(capsys.readouterr().out)
    assert data["written"] is None and "none could be rewritten" in data["message"] and not out.exists()
    assert main(["mlir", str(models["probs"]), "--to", "fused", "-o", str(out), "--force"]) == 0
    assert out.is_file() and "func.func" in out.read_text()
    out.unlink()
    assert main(["mlir", str(models["plain"]), "--to", "none", "-o", str(out)]) == 0
    assert out.is_file()
    assert main(["mlir", str(models["probs"]), "--to", "ssmax", "-o", str(out)]) == 0  # SSMax rewrites it: written
    assert "wrote" in capsys.readouterr().err


def test_ssmax_deviation_has_no_ok_and_json_is_strict(models, tmp_path, capsys) -> None:
    out = tmp_path / "ssmax.onnx"
    assert main(["rewrite", str(models["good"]), "-o", str(out), "--to", "ssmax", "--s", "2.0"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("rewritten vs original")]
    assert lines and all("no tolerance" in ln and not ln.endswith("ok") for ln in lines)
    assert main(["rewrite", str(models["good"]), "-o", str(out), "--to", "ssmax", "--s", "2.0", "--json"]) == 0
    data = _strict(capsys.readouterr().out)
    assert data["validation"]["rtol"] is None and data["validation"]["bounded"] is False
    assert all(o["ok"] is None and o["finite"] for o in data["validation"]["outputs"])
    assert data["self_test"]["bounded"] is True and data["self_test"]["passed"]


def test_validate_says_why_outputs_cannot_be_compared(models, tmp_path, capsys) -> None:
    # outputs renamed: nothing to compare by name, and the line says so instead of "max abs inf"
    proto = onnx.load(str(models["good"]))
    proto.graph.output[0].name, old = "renamed", proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = ["renamed" if o == old else o for o in node.output]
    other = tmp_path / "renamed.onnx"
    onnx.save(proto, str(other))
    assert main(["validate", str(models["good"]), str(other)]) == 1
    out = capsys.readouterr().out
    assert "not compared" in out and "has no output" in out and "inf" not in out


def test_inputs_that_cannot_fail_are_refused(models, tmp_path, capsys) -> None:
    """One key per query row: SSMax and softmax agree whatever the factor, so generated inputs test nothing."""
    out = tmp_path / "out.onnx"
    for to in ("ssmax", "fused"):
        assert main(["rewrite", str(models["one_key"]), "-o", str(out), "--to", to]) == 2
        err = capsys.readouterr().err
        assert "cannot test this rewrite" in err and "--inputs" in err and not out.exists()


def test_generated_inputs_keep_every_logit_row(tmp_path) -> None:
    """``logits_to_keep`` = 0 (every row), position ids and cache positions count up."""
    from onnx import TensorProto, helper

    from attnpass.validate import make_inputs

    inputs = [helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, []),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("cache_position", TensorProto.INT64, ["seq"])]
    nodes = [helper.make_node("Identity", [i.name], [f"o_{i.name}"]) for i in inputs]
    outputs = [helper.make_tensor_value_info(f"o_{i.name}", TensorProto.INT64, None) for i in inputs]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    path = tmp_path / "feeds.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = make_inputs(path, batch=2, seq=5)
    assert feeds["logits_to_keep"].shape == () and int(feeds["logits_to_keep"]) == 0
    np.testing.assert_array_equal(feeds["position_ids"], np.tile(np.arange(5), (2, 1)))
    np.testing.assert_array_equal(feeds["cache_position"], np.arange(5))


BOX = set("─│┃━┏┓┗┛┡┩╇╋┳┻┼┬┴┌┐└┘")


def _tsv(text: str) -> list[list[str]]:
    """The tab-separated lines of ``--plain`` output (title lines and free text left out)."""
    return [ln.split("\t") for ln in text.splitlines() if "\t" in ln]


def test_plain_tables_are_tab_separated_and_whole(models, tmp_path, capsys) -> None:
    assert main(["inspect", str(models["long"]), "--plain"]) == 0
    out = capsys.readouterr().out
    assert not BOX & set(out)
    assert out.splitlines()[0] == f"# {models['long']}: 1 attention site(s)"
    header, *rows = _tsv(out)
    assert header[:2] == ["index", "node"] and len(rows) == 1 and all(len(r) == len(header) for r in rows)
    assert rows[0][1] == LONG and rows[0][header.index("fusable / why not")] == "yes"
    dst = tmp_path / "plain.onnx"
    assert main(["rewrite", str(models["probs"]), "-o", str(dst), "--to", "ssmax", "--plain"]) == 0
    out = capsys.readouterr().out
    assert not BOX & set(out) and f"wrote {dst}" in out
    header, *rows = _tsv(out)
    assert header[0] == "index" and len(rows) == 1 and len(rows[0]) == len(header)
    assert rows[0][header.index("fusable / why not")].startswith("no: the attention probabilities are also used")


def test_a_reader_that_stops_early_is_not_an_internal_error(models) -> None:
    """``attnpass inspect --json m.onnx | head -1``: the pipe closes before the output is written; that is neither
    an internal error nor a traceback at exit, just the exit status of a command stopped by SIGPIPE."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "attnpass", "inspect", "--json", str(models["good"])], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone long before the model is read
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 141, err[-2000:]
    assert "internal error" not in err and "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
