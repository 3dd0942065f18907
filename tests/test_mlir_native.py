"""The native library target: ``attnpass mlir model.onnx --emit so`` and ``attnpass.mlir.compile_library`` / ``load_library``.

A tiny GPT-2 (the HF corpus model, exported by the TorchScript exporter) is rewritten (fused, and SSMax with
``s=0, b=1``, the identity), built into a shared library and run against onnxruntime on the original model,
through the Python loader and through a C program that links the library and nothing else.
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

import attnpass.mlir as am
from attnpass.cli import main
from attnpass.errors import AttnpassError
from attnpass.lowering import native
from tests import hf_corpus

warnings.filterwarnings("ignore")


_Text = hf_corpus.TextModel


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, list[np.ndarray], np.ndarray]:
    """The ONNX file, its inputs (a right-padded batch) and onnxruntime's output on it."""
    d = tmp_path_factory.mktemp("native")
    torch.manual_seed(0)
    model, args, kwargs = hf_corpus.gpt2()
    wrapped = _Text(model.eval()).eval()
    inputs = [args[0].numpy(), kwargs["attention_mask"].numpy()]
    path = d / "gpt2.onnx"
    torch.onnx.export(wrapped, (args[0], kwargs["attention_mask"]), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    want = ort.InferenceSession(str(path)).run(None, dict(zip(["input_ids", "attention_mask"], inputs)))[0]
    return path, inputs, want


@pytest.mark.parametrize("to", ["fused", "ssmax"])
def test_cli_emits_a_library_equal_to_onnxruntime(gpt2, to: str, tmp_path: Path, capsys) -> None:
    path, inputs, want = gpt2
    so = tmp_path / "model.so"
    extra = ["--s", "0", "--bias", "1"] if to == "ssmax" else []
    assert main(["mlir", str(path), "--to", to, *extra, "--emit", "so", "-o", str(so), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["emit"] == "so" and len(info["signature"]["inputs"]) == 2
    assert info["signature"]["outputs"] == [{"dtype": "float32", "shape": list(want.shape)}]
    fn = am.load_library(so)
    got = fn(*inputs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the signature is checked: a wrong dtype is a clear error, never a silent conversion
    with pytest.raises(AttnpassError, match="input 0 must be int64"):
        fn(inputs[0].astype(np.int32), inputs[1])


def test_the_models_causal_mask_is_dead_after_the_fused_rewrite(gpt2) -> None:
    """GPT-2's exported mask, ``where(and(key <= query, padding), 0, finfo.min)`` of ``[B, 1, S, S]``, reaches each
    loop nest as its padding factor ``[B, 1, 1, S]`` alone (the nest tests ``key <= query`` on indices), so the
    ``S x S`` mask is never built: peak memory stays linear in ``S``.  Numerics: the padded batch vs onnxruntime."""
    path, inputs, want = gpt2
    b, s = inputs[0].shape
    fused = am.rewrite(am.import_(str(path)), to="fused")
    text = str(fused)
    public = text.split("func.func private", 1)[0]  # the model's own function comes first
    assert "func.func @main_graph" in public
    square = re.compile(rf"\[(?:[0-9?]+,)*{s},{s}\]|x{s}x{s}x")
    assert not square.findall(public), sorted(set(square.findall(public)))
    calls = re.findall(r"call @attnpass_fused_\d+\(.*?\) : \((.*?)\) ->", public)
    assert len(calls) == 2 and all(c.endswith(f"tensor<{b}x1x1x{s}xi1>") for c in calls), calls
    np.testing.assert_allclose(am.compile(fused, opt_level=0)(*inputs), want, rtol=1e-4, atol=1e-4)


def test_folded_aranges_prove_the_mask_causal_without_evaluating_it(gpt2, monkeypatch) -> None:
    """The exporter folds the mask's two aranges into literals; they are read as aranges (``O(S)``), so the proof does
    not need the ``S x S`` mask's values (which the evaluator refuses past its budget, S > 4096 here)."""
    from attnpass.passes.masks import MaskProofs

    monkeypatch.setattr(MaskProofs, "_causal_by_value", lambda *a, **k: False)
    path, inputs, _ = gpt2
    b, s = inputs[0].shape
    public = str(am.rewrite(am.import_(str(path)), to="fused")).split("func.func private", 1)[0]
    calls = re.findall(r"call @attnpass_fused_\d+\(.*?\) : \((.*?)\) ->", public)
    assert len(calls) == 2 and all(c.endswith(f"tensor<{b}x1x1x{s}xi1>") for c in calls), calls


C_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
int attnpass_run(void *const *inputs, void *const *outputs);
const char *attnpass_signature(void);
static void *slurp(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb"); fseek(f, 0, SEEK_END); *n = ftell(f); fseek(f, 0, SEEK_SET);
  void *p = malloc(*n); if (fread(p, 1, *n, f) != *n) exit(3); fclose(f); return p;
}
int main(int argc, char **argv) {  /* driver ids.bin mask.bin out.bin out_bytes */
  size_t n; void *in[2] = {slurp(argv[1], &n), slurp(argv[2], &n)};
  size_t bytes = strtoul(argv[4], 0, 10); void *out[1] = {malloc(bytes)};
  int rc = attnpass_run(in, out);
  FILE *f = fopen(argv[3], "wb"); fwrite(out[0], 1, bytes, f); fclose(f);
  puts(attnpass_signature());
  return rc;
}
"""


def test_c_program_runs_the_library_without_python(gpt2, tmp_path: Path) -> None:
    """The documented entry point from C: link against the library alone (libc, libm), no Python in the process."""
    path, inputs, want = gpt2
    so = tmp_path / "libmodel.so"
    sig = am.compile_library(am.rewrite(am.import_(str(path)), to="fused"), so, opt_level=0)
    assert [t.dtype for t in sig.inputs] == ["int64", "int64"]
    needed = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    assert "torch" not in needed and "python" not in needed and "onnxruntime" not in needed, needed
    (tmp_path / "driver.c").write_text(C_DRIVER)
    exe = tmp_path / "driver"
    cc = native.compiler()
    subprocess.run([cc, "-o", str(exe), str(tmp_path / "driver.c"), f"-L{tmp_path}", "-lmodel",
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    for name, x in zip(("ids", "mask"), inputs):
        x.tofile(tmp_path / f"{name}.bin")
    run = subprocess.run([str(exe), str(tmp_path / "ids.bin"), str(tmp_path / "mask.bin"), str(tmp_path / "out.bin"),
                          str(want.nbytes)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["outputs"][0]["shape"] == list(want.shape)
    got = np.fromfile(tmp_path / "out.bin", dtype=np.float32).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_library_of_a_fused_attention_equals_the_jit(tmp_path: Path) -> None:
    """The library runs the JIT's own code: bit-identical to ``attnpass.mlir.compile`` on the same module."""

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    fused = am.rewrite(am.import_(Sdpa(), (q, k, v)), to="fused", tile=16)
    want = am.compile(fused, opt_level=0)(q, k, v).numpy()
    so = tmp_path / "attention.so"
    am.compile_library(fused, so, opt_level=0)
    np.testing.assert_array_equal(am.load_library(so)(q.numpy(), k.numpy(), v.numpy()), want)


def test_large_buffers_are_kept_for_the_next_call(tmp_path: Path) -> None:
    """The generated code's large buffers (>= 256 KiB: here [512, 256] f32) go back to the library's cache when freed and
    serve the next call; ``attnpass_release`` returns them.  Results stay exact across calls."""

    class Mlp(torch.nn.Module):
        def forward(self, x, w1, w2):
            return torch.tanh(x @ w1) @ w2

    g = torch.Generator().manual_seed(0)
    x, w1, w2 = torch.randn(512, 64, generator=g), torch.randn(64, 256, generator=g), torch.randn(256, 64, generator=g)
    so = tmp_path / "mlp.so"
    am.compile_library(am.import_(Mlp(), (x, w1, w2)), so, opt_level=0)
    fn = am.load_library(so)
    cached = fn.lib.attnpass_cached_bytes
    cached.restype = ctypes.c_size_t
    assert cached() == 0
    want = Mlp()(x, w1, w2).numpy()
    first = fn(x.numpy(), w1.numpy(), w2.numpy())
    kept = cached()
    assert kept >= 512 * 256 * 4, kept  # at least the hidden [512, 256] buffer
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(fn(x.numpy(), w1.numpy(), w2.numpy()), first)
    assert cached() == kept  # the second call took its buffers from the cache and gave them back
    fn.lib.attnpass_release()
    assert cached() == 0


def test_dynamic_shapes_and_missing_outputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AttnpassError, match=r"static shapes: input 1 of @main is \[2,\?\]"):
        native.signature_of("(!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,?],f32>) -> !torch.vtensor<[2],f32>")
    with pytest.raises(AttnpassError, match="no such file"):
        am.load_library(tmp_path / "absent.so")
    assert main(["mlir", str(tmp_path / "absent.onnx"), "--emit", "so"]) != 0  # needs -o: refused before any work
    assert not list(tmp_path.iterdir())


def test_bf16_at_the_boundary_passes_as_its_bits(tmp_path: Path) -> None:
    """bf16 Q / K / V in and a bf16 output (the calling convention takes no bf16 memrefs: i16 bits, bitcast inside):
    the JIT takes and gives torch bf16 tensors, the library ml_dtypes bf16 arrays (or their uint16 bits), with the
    same bits, equal to SDPA in f32 on the same values within bf16's rounding of the output."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g).to(torch.bfloat16) for _ in range(3))

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    fused = am.rewrite(am.import_(Sdpa(), (q, k, v)), to="fused", tile=32)
    got = am.compile(fused)(q, k, v)  # the library's opt level: the same code, so the same bits
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=8e-3)
    sig = am.compile_library(fused, tmp_path / "bf16.so")
    assert [t.dtype for t in sig.inputs + sig.outputs] == ["bfloat16"] * 4
    lib = am.load_library(tmp_path / "bf16.so")
    bits = [x.view(torch.int16).numpy().view(np.uint16) for x in (q, k, v)]
    out = np.asarray(lib(*bits))
    assert out.dtype.name == "bfloat16"
    np.testing.assert_array_equal(out.view(np.int16), got.view(torch.int16).numpy())
