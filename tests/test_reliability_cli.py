"""Hostile and broken inputs to every command and public function: one line naming the file or node,
exit code 2, no traceback (unless ``--debug``), no partial output, the input untouched.

Plus a fuzz test (hypothesis) that mutates real small ONNX files — byte flips, truncations, and proto
edits through onnx's Python API — and checks that ``inspect``/``rewrite`` either succeed with a valid
output or fail with one line and exit 2.  ``make test`` runs a bounded number of cases; a longer run:
``ATTNPASS_FUZZ_EXAMPLES=2000 .venv/bin/pytest -q tests/test_reliability_cli.py -k fuzz``.

"No write permission" runs as root here, where permission bits do not stop a write, so the unwritable
places are ``/proc`` and ``/sys`` (kernel filesystems that refuse new files even to root) and a path
under a regular file (``file.txt/out.onnx``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import helper

import attnpass
import attnpass.onnx as aonnx
from attnpass.cli import main
from attnpass.errors import AttnpassError

FUZZ_EXAMPLES = int(os.environ.get("ATTNPASS_FUZZ_EXAMPLES", "60"))


class _Attn(torch.nn.Module):
    """One attention block, exported by the TorchScript exporter: the shape arithmetic gives the
    fuzzer many small nodes (Shape/Gather/Concat/Reshape) to break."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / 8 ** 0.5
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        p = torch.softmax(scores.masked_fill(~causal, torch.finfo(scores.dtype).min), dim=-1)
        return (p @ v).transpose(1, 2).reshape(b, s, 16)


def _export(m: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(m, (torch.randn(2, 6, 16),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _export(_Attn().eval(), tmp_path_factory.mktemp("rel") / "attn.onnx")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _copy_proto(path: Path) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(onnx.load(path))
    return m


def _first(m: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.op_type == op)


def _save(m: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


# ---------------------------------------------------------------- broken inputs, one builder each


def _missing(good: Path, d: Path) -> Path:
    return d / "missing.onnx"


def _directory(good: Path, d: Path) -> Path:
    (d / "folder.onnx").mkdir()
    return d / "folder.onnx"


def _empty(good: Path, d: Path) -> Path:
    (d / "empty.onnx").write_bytes(b"")
    return d / "empty.onnx"


def _text(good: Path, d: Path) -> Path:
    (d / "notes.onnx").write_text("this is not a model\n")
    return d / "notes.onnx"


def _truncated(good: Path, d: Path) -> Path:
    raw = good.read_bytes()
    (d / "truncated.onnx").write_bytes(raw[: len(raw) // 2])
    return d / "truncated.onnx"


def _bit_flipped(good: Path, d: Path) -> Path:
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # lands in a node name: invalid UTF-8, which python-protobuf rejects late
    (d / "flipped.onnx").write_bytes(bytes(raw))
    return d / "flipped.onnx"


def _cycle(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    next(n for n in m.graph.node if n.input).input[0] = m.graph.node[-1].output[0]
    return _save(m, d / "cycle.onnx")


def _dangling(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    _first(m, "MatMul").input[1] = "nobody_makes_this"
    return _save(m, d / "dangling.onnx")


def _undeclared_domain(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    _first(m, "Softmax").domain = "com.example"  # used but not in opset_import
    return _save(m, d / "domain.onnx")


def _opset_high(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    m.opset_import[0].version = 99
    return _save(m, d / "opset99.onnx")


def _opset_zero(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    m.opset_import[0].version = 0
    return _save(m, d / "opset0.onnx")


def _ir_version_high(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    m.ir_version = 99
    return _save(m, d / "ir99.onnx")


def _duplicate_names(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    for n in m.graph.node:
        n.name = "same"
    return _save(m, d / "dupnames.onnx")


def _duplicate_outputs(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    m.graph.node[1].output[0] = m.graph.node[0].output[0]
    return _save(m, d / "not_ssa.onnx")


def _unknown_op(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    _first(m, "MatMul").op_type = "Bogus"
    return _save(m, d / "bogus.onnx")


def _short_initializer(good: Path, d: Path) -> Path:
    m = _copy_proto(good)
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:5]
    return _save(m, d / "short_init.onnx")


def _external_missing(good: Path, d: Path) -> Path:
    onnx.save_model(_copy_proto(good), d / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    (d / "ext.onnx.data").rename(d / "elsewhere.data")
    return d / "ext.onnx"


def _external_truncated(good: Path, d: Path) -> Path:
    onnx.save_model(_copy_proto(good), d / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    data = (d / "ext.onnx.data").read_bytes()
    (d / "ext.onnx.data").write_bytes(data[: len(data) // 2])
    return d / "ext.onnx"


def _external_escapes(good: Path, d: Path) -> Path:
    onnx.save_model(_copy_proto(good), d / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    m = onnx.load(d / "ext.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    return _save(m, d / "ext.onnx")


def _fifo(good: Path, d: Path) -> Path:
    os.mkfifo(d / "pipe.onnx")
    return d / "pipe.onnx"


BROKEN: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    # name: (builder, a word the one-line message must carry besides the file name)
    "missing": (_missing, "no such file"),
    "directory": (_directory, "not a file"),
    "empty": (_empty, "not an ONNX model"),
    "text": (_text, "not an ONNX model"),
    "truncated": (_truncated, "not a readable ONNX model"),
    "bit_flipped": (_bit_flipped, "ONNX model"),
    "cycle": (_cycle, "topologically sorted"),
    "dangling_input": (_dangling, "nobody_makes_this"),
    "undeclared_domain": (_undeclared_domain, "com.example"),
    "opset_99": (_opset_high, "opset 99"),
    "opset_0": (_opset_zero, "domain_version of 0"),
    "ir_version_99": (_ir_version_high, "ir_version 99"),
    "duplicate_node_names": (_duplicate_names, "'same'"),
    "duplicate_outputs": (_duplicate_outputs, "single static assignment"),
    "unknown_op": (_unknown_op, "Bogus"),
    "short_initializer": (_short_initializer, "qkv.bias"),
    "external_data_missing": (_external_missing, "ext.onnx.data"),
    "external_data_truncated": (_external_truncated, "external data"),
    "external_data_escapes": (_external_escapes, "outside"),
    "fifo": (_fifo, "not a file"),
}


def _run(argv: list[str]) -> tuple[int, str]:
    """``attnpass ARGV`` in-process: the exit code and stderr (a traceback would escape as an exception)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def _assert_one_line_error(rc: int, err: str, command: str, *names: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"attnpass {command}: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.mark.parametrize("command", ["inspect", "rewrite", "validate"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_input(good: Path, tmp_path: Path, case: str, command: str) -> None:
    build, word = BROKEN[case]
    src = build(good, tmp_path)
    before = {p: _sha(p) for p in tmp_path.iterdir()}
    out = tmp_path / "out.onnx"
    argv = {"inspect": ["inspect", str(src)], "rewrite": ["rewrite", str(src), "-o", str(out), "--to", "fused"],
            "validate": ["validate", str(good), str(src)]}[command]
    rc, err = _run(argv)
    _assert_one_line_error(rc, err, command, src.name, word)
    assert not out.exists() and not list(tmp_path.glob(".attnpass-*"))
    assert {p: _sha(p) for p in tmp_path.iterdir()} == before  # input (and its data files) untouched


def test_declared_custom_domain_inspects_but_cannot_be_validated(good: Path, tmp_path: Path) -> None:
    """A custom op that onnxruntime does not know: ``inspect`` still reports the site; ``rewrite`` cannot
    check its work, so it says so (naming the file and the op) and writes nothing unless --no-validate."""
    m = _copy_proto(good)
    x = m.graph.input[0].name
    m.graph.node.insert(0, helper.make_node("Scale", [x], ["x_scaled"], domain="com.example", name="custom"))
    for n in m.graph.node[1:]:
        n.input[:] = ["x_scaled" if i == x else i for i in n.input]
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    src = _save(m, tmp_path / "custom.onnx")
    digest = _sha(src)
    assert _run(["inspect", str(src)])[0] == 0
    out = tmp_path / "out.onnx"
    rc, err = _run(["rewrite", str(src), "-o", str(out), "--to", "fused"])
    _assert_one_line_error(rc, err, "rewrite", "custom.onnx", "com.example", "nothing written")
    assert not out.exists() and _sha(src) == digest
    assert _run(["rewrite", str(src), "-o", str(out), "--to", "fused", "--no-validate"])[0] == 0
    onnx.checker.check_model(str(out))


@pytest.mark.parametrize("axis", [0, 1])
def test_rewrite_refuses_inputs_too_large_to_generate(good: Path, tmp_path: Path, axis: int) -> None:
    """A fixed axis of 10^6 (found by the fuzzer): onnxruntime would allocate 10^12 attention scores and the
    OOM killer would end the run; instead, one line that says how to validate anyway."""
    m = _copy_proto(good)
    m.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = 10**6
    src = _save(m, tmp_path / "huge_axis.onnx")
    out = tmp_path / "out.onnx"
    assert _run(["inspect", str(src)])[0] == 0
    rc, err = _run(["rewrite", str(src), "-o", str(out), "--to", "fused"])
    _assert_one_line_error(rc, err, "rewrite", "huge_axis.onnx", "--inputs or --no-validate")
    assert not out.exists()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    (tmp_path / "file.txt").write_text("a regular file, used as a parent folder below")
    (tmp_path / "folder.onnx").mkdir()
    return tmp_path


OUTPUTS: dict[str, tuple[Callable[[Path, Path], str], str]] = {
    "same_as_input": (lambda src, d: str(src), "refusing to overwrite"),
    "hard_link_to_input": (lambda src, d: (os.link(src, d / "hard.onnx"), str(d / "hard.onnx"))[1], "refusing"),
    "symlink_to_input": (lambda src, d: (os.symlink(src, d / "sym.onnx"), str(d / "sym.onnx"))[1], "refusing"),
    "directory": (lambda src, d: str(d / "folder.onnx"), "is a directory"),
    "missing_directory": (lambda src, d: str(d / "no" / "such" / "out.onnx"), "does not exist"),
    "under_a_regular_file": (lambda src, d: str(d / "file.txt" / "out.onnx"), "not a directory"),
    "read_only_proc": (lambda src, d: "/proc/attnpass-out.onnx", "cannot write"),
    "read_only_sys": (lambda src, d: "/sys/attnpass-out.onnx", "cannot write"),
}


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_rewrite_bad_output(good: Path, scratch: Path, case: str) -> None:
    src = scratch / "attn.onnx"
    src.write_bytes(good.read_bytes())
    make, word = OUTPUTS[case]
    out = make(src, scratch)
    listing = sorted(os.listdir(scratch))
    rc, err = _run(["rewrite", str(src), "-o", out, "--to", "ssmax"])
    _assert_one_line_error(rc, err, "rewrite", word)
    assert _sha(src) == _sha(good)
    assert sorted(os.listdir(scratch)) == listing and not Path(out).is_file() or Path(out).samefile(src)


def test_rewrite_refuses_to_write_over_the_input_external_data(good: Path, tmp_path: Path) -> None:
    """``-o weights.onnx`` when the input keeps its weights in ``weights.onnx.data`` would overwrite them."""
    onnx.save_model(_copy_proto(good), tmp_path / "m.onnx", save_as_external_data=True, location="weights.onnx.data",
                    size_threshold=0)
    digest = _sha(tmp_path / "weights.onnx.data")
    rc, err = _run(["rewrite", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "weights.onnx"), "--to", "fused"])
    _assert_one_line_error(rc, err, "rewrite", "weights.onnx", "refusing")
    assert _sha(tmp_path / "weights.onnx.data") == digest and not (tmp_path / "weights.onnx").exists()


@pytest.mark.parametrize("flags, word", [
    (["--inputs", "{d}/nope.npz"], "nope.npz"),
    (["--inputs", "{d}/file.txt"], "not a readable .npz"),
    (["--train-len", "1"], "train_len"),
    (["--s", "nan"], "NaN"),
])
def test_rewrite_bad_options(good: Path, scratch: Path, flags: list[str], word: str) -> None:
    out = scratch / "out.onnx"
    rc, err = _run(["rewrite", str(good), "-o", str(out), "--to", "ssmax", *[f.format(d=scratch) for f in flags]])
    _assert_one_line_error(rc, err, "rewrite", word)
    assert not out.exists() and not list(scratch.glob(".attnpass-*"))


@pytest.mark.parametrize("factory, word", [
    ("no_colon", "expected 'pkg.module:callable'"),
    ("no_such_module_xyz:f", "No module named"),
    ("attnpass.tiny:nothere", "has no attribute"),
    ("attnpass.tiny:TinyGPT", "must return (model, args)"),
    ("os:getcwd", "must return (model, args)"),
    ("tests.test_reliability_cli:raising_factory", "the factory raised"),
])
def test_export_bad_factory(scratch: Path, factory: str, word: str) -> None:
    rc, err = _run(["export", factory, "-o", str(scratch / "e.onnx")])
    _assert_one_line_error(rc, err, "export", word)
    assert not (scratch / "e.onnx").exists()


def raising_factory() -> tuple:
    """An ``attnpass export`` factory that fails the way user code does."""
    raise ValueError("checkpoint not found")


def tiny_factory() -> tuple:
    """An ``attnpass export`` factory for the module above."""
    return _Attn().eval(), (torch.randn(2, 6, 16),)


@pytest.mark.parametrize("where, word", [("{d}/no/such/e.onnx", "does not exist"), ("{d}/folder.onnx", "is a directory"),
                                         ("{d}/file.txt/e.onnx", "does not exist")])
def test_export_bad_output(scratch: Path, where: str, word: str) -> None:
    out = where.format(d=scratch)
    rc, err = _run(["export", "tests.test_reliability_cli:tiny_factory", "-o", out])
    _assert_one_line_error(rc, err, "export", word)
    assert not list(scratch.rglob("*e.onnx*"))


@pytest.mark.parametrize("case, word", [
    ("missing.onnx", "no such file"), ("folder.onnx", "not a file"), ("file.txt", "not a valid ONNX model"),
    ("binary.mlir", "not readable MLIR text"), ("broken.mlir", "does not parse"),
])
def test_mlir_bad_input(scratch: Path, case: str, word: str) -> None:
    (scratch / "binary.mlir").write_bytes(b"\xff\xfe\x00garbage")
    (scratch / "broken.mlir").write_text("func.func @f( {")
    rc, err = _run(["mlir", str(scratch / case), "-o", str(scratch / "out.mlir")])
    _assert_one_line_error(rc, err, "mlir", case, word)
    assert not (scratch / "out.mlir").exists() and not list(scratch.glob(".attnpass-*"))


@pytest.mark.parametrize("where, word", [("{d}/no/such/o.mlir", "does not exist"), ("{d}/folder.onnx", "is a directory"),
                                         ("{d}/file.txt/o.mlir", "not a directory")])
def test_mlir_bad_output(good: Path, scratch: Path, where: str, word: str) -> None:
    rc, err = _run(["mlir", str(good), "-o", where.format(d=scratch)])
    _assert_one_line_error(rc, err, "mlir", word)
    assert not list(scratch.rglob("o.mlir"))


@pytest.mark.parametrize("flags", [["--seq", "0"], ["--seq", "-4"], ["--layers", "0"], ["--seq", "many"]])
def test_demo_bad_sizes_are_usage_errors(flags: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(["demo", "--no-onnx", *flags])
    assert e.value.code == 2 and "argument" in err.getvalue().strip().splitlines()[-1]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(AttnpassError, match="no such file"):
        main(["--debug", "inspect", str(tmp_path / "missing.onnx")])


def test_real_process_prints_exactly_one_line(good: Path, tmp_path: Path) -> None:
    """In a real process, where onnx-ir's logging and C++ code write to fd 2 as well: still one line."""
    src = _bit_flipped(good, tmp_path)
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "attnpass.cli", "rewrite", str(src), "-o", str(out), "--to", "fused"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "flipped.onnx" in r.stderr and not out.exists()


# ---------------------------------------------------------------- public functions


def test_public_functions_raise_attnpass_error(good: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    for bad in (None, 42, ["x"], missing, tmp_path, _text(good, tmp_path)):
        with pytest.raises(AttnpassError):
            aonnx.find(bad)
        with pytest.raises(AttnpassError):
            aonnx.rewrite(bad, tmp_path / "out.onnx", to="fused")
    with pytest.raises(AttnpassError, match="no such file"):
        attnpass.validate(good, missing)
    with pytest.raises(AttnpassError, match="does not exist"):
        aonnx.rewrite(good, tmp_path / "no" / "out.onnx", to="fused")
    with pytest.raises(AttnpassError, match="does not exist"):
        attnpass.export(_Attn().eval(), (torch.randn(2, 6, 16),), None, tmp_path / "no" / "e.onnx")
    with pytest.raises(AttnpassError, match="unknown rewrite"):
        aonnx.rewrite(good, tmp_path / "out.onnx", to="flash")
    with pytest.raises(AttnpassError, match="nn.Module"):
        attnpass.find("not a model")
    with pytest.raises(AttnpassError, match="example inputs"):
        attnpass.fuse(_Attn())
    with pytest.raises(AttnpassError, match="could not trace"):
        attnpass.to_ssmax(_Attn(), (torch.randn(2, 6, 7),))  # wrong feature size
    from attnpass import mlir as am

    with pytest.raises(AttnpassError, match="no such file"):
        am.import_(missing)
    assert not (tmp_path / "out.onnx").exists() and not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def seeds(good: Path, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Two real models: the TorchScript block above and TinyGPT (embedding, GQA, padding + causal mask)."""
    from attnpass.tiny import TinyGPT, example_inputs

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seed") / "tiny_gpt.onnx"
    ids, mask = example_inputs(batch=2, seq=8, vocab=32)
    torch.onnx.export(TinyGPT(vocab=32, dim=16, layers=1, heads=2, kv_heads=1, max_len=16).eval(), (ids, mask),
                      str(path), dynamo=False, opset_version=17, input_names=["ids", "attention_mask"])
    return [good.read_bytes(), path.read_bytes()]


_OPS = ["Relu", "Softmax", "MatMul", "Add", "Transpose", "Identity", "Reshape", "Bogus", "Where", "Cast"]


@st.composite
def mutations(draw: st.DrawFn) -> tuple[int, list[tuple]]:
    """A seed index and 1-3 edits: byte-level (flip, truncate, insert) or proto-level (op type, inputs,
    attributes, shapes, node order, opset, dtypes)."""
    seed = draw(st.integers(0, 1))
    kinds = st.sampled_from(["flip", "truncate", "insert", "op_type", "drop_input", "rewire", "attr", "dim",
                             "init_dims", "swap", "delete", "duplicate", "opset", "dtype", "domain"])
    edits = [(draw(kinds), draw(st.integers(0, 10**6)), draw(st.integers(-3, 10**6)), draw(st.sampled_from(_OPS)))
             for _ in range(draw(st.integers(1, 3)))]
    return seed, edits


def _mutate(raw: bytes, edits: list[tuple]) -> bytes:
    m = onnx.ModelProto()
    m.ParseFromString(raw)
    byte_edits = []
    for kind, a, b, op in edits:
        nodes, g = m.graph.node, m.graph
        n = nodes[a % len(nodes)]
        if kind in ("flip", "truncate", "insert"):
            byte_edits.append((kind, a, b))
        elif kind == "op_type":
            n.op_type = op
        elif kind == "drop_input" and n.input:
            del n.input[a % len(n.input)]
        elif kind == "rewire" and n.input:
            names = [o for x in nodes for o in x.output] + [i.name for i in g.input] + ["ghost"]
            n.input[b % len(n.input)] = names[b % len(names)]
        elif kind == "attr" and n.attribute:
            at = n.attribute[b % len(n.attribute)]
            if at.type == onnx.AttributeProto.INT:
                at.i = b % 7 - 3
            elif at.type == onnx.AttributeProto.INTS and at.ints:
                at.ints[a % len(at.ints)] = b % 7 - 3
            elif at.type == onnx.AttributeProto.FLOAT:
                at.f = [float("nan"), float("inf"), -1.0, 0.0][b % 4]
        elif kind == "dim":
            dims = [d for i in g.input for d in i.type.tensor_type.shape.dim]
            if dims:
                dims[a % len(dims)].dim_value = [0, 1, 7, 3, 10**6][b % 5]
        elif kind == "init_dims" and g.initializer:
            t = g.initializer[a % len(g.initializer)]
            t.dims[:] = [max(1, b % 5)] + list(t.dims)[1:]
        elif kind == "swap" and len(nodes) > 1:
            j = b % len(nodes)
            x, y = onnx.NodeProto(), onnx.NodeProto()
            x.CopyFrom(n)
            y.CopyFrom(nodes[j])
            nodes[a % len(nodes)].CopyFrom(y)
            nodes[j].CopyFrom(x)
        elif kind == "delete" and len(nodes) > 1:
            del nodes[a % len(nodes)]
        elif kind == "duplicate":
            nodes.append(n)
        elif kind == "opset":
            m.opset_import[0].version = b % 30
        elif kind == "dtype" and g.input:
            g.input[a % len(g.input)].type.tensor_type.elem_type = b % 17
        elif kind == "domain":
            n.domain = ["com.microsoft", "com.example", "ai.onnx"][b % 3]
    data = bytearray(m.SerializeToString())
    for kind, a, b in byte_edits:
        if kind == "flip" and data:
            data[a % len(data)] ^= 1 << (b % 8)
        elif kind == "truncate":
            data = data[: a % max(1, len(data))]
        elif kind == "insert":
            data[a % max(1, len(data)):a % max(1, len(data))] = bytes([b % 256]) * (1 + b % 5)
    return bytes(data)


@contextlib.contextmanager
def _watchdog(seconds: int) -> Iterator[None]:
    """Turn a hang into a failure (generous: one case takes about a second)."""
    def _hang(signum: int, frame: object) -> None:
        raise TimeoutError(f"attnpass did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize="ATTNPASS_FUZZ_EXAMPLES" not in os.environ,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutations(), to=st.sampled_from(["fused", "ssmax"]))
def test_fuzz_inspect_and_rewrite(seeds: list[bytes], tmp_path_factory: pytest.TempPathFactory,
                                  case: tuple[int, list[tuple]], to: str) -> None:
    """Mutated models: success with a valid output, or exit 2 with one line; never a traceback, a hang,
    a partial file, or a touched input.  ``internal error`` (exit 3) is a crash the fuzzer found."""
    d = tmp_path_factory.mktemp("fuzz")
    seed, edits = case
    src = d / "m.onnx"
    src.write_bytes(_mutate(seeds[seed], edits))
    digest, out = _sha(src), d / "out.onnx"
    with _watchdog(300):
        for argv in (["inspect", str(src)], ["rewrite", str(src), "-o", str(out), "--to", to]):
            rc, err = _run(argv)
            event(f"{argv[0]} exit {rc}" + (" (wrote a file)" if argv[0] == "rewrite" and out.exists() else ""))
            assert rc in (0, 2), err
            if rc == 2:
                _assert_one_line_error(rc, err, argv[0], "m.onnx")
    assert _sha(src) == digest and not list(d.glob(".attnpass-*"))
    assert sorted(p.name for p in d.iterdir()) in (["m.onnx"], ["m.onnx", "out.onnx"])
    if out.exists():
        onnx.checker.check_model(str(out))
        import onnxruntime as ort

        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
