"""Speed of the fused MLIR attention against SDPA, torch eager and onnxruntime, as ratios to SDPA in the same run.

    python benchmarks/mlir_speed.py [--quick] [--threads N] [--model]

One attention (B=1, H=8, D=64), causal and not, fp32 and bf16, S = 512 ... 8192 (``--quick``: 512, 1024, 2048
fp32 only).  Every variant runs in this process with the same thread count (torch and onnxruntime get
``--threads``; the MLIR loop nest's parallel loop over query blocks gets it through ``ATTNPASS_THREADS``, run by
attnpass's own OpenMP runtime, ``attnpass/lowering/omp.py``).  Times are the best of a
few calls after a warm-up.  ``--model``: the whole-model table, a tiny GPT-2 at S=2048 (the native library of the
fused rewrite vs onnxruntime on the original ONNX vs torch eager).

bf16: SDPA, eager and the MLIR loop nest run on bf16 tensors (the loop nest widens them to f32 once and accumulates in
f32; bf16 crosses the calling convention as its i16 bits, ``attnpass/lowering/half_boundary.py``); onnxruntime is
n/a (its CPU MatMul has no bf16 kernel).  ``--memory``: the native library's peak resident memory for the tiny GPT-2
at S = 1024, 2048, 4096, each call in a process of its own that loads only the library (the peak RSS during the
call minus the RSS before it): it should grow about linearly in S (the fused sites hold no S x S scores).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

warnings.filterwarnings("ignore")
F = nn.functional


class Attention(nn.Module):
    """The explicit chain (what eager, ONNX and the MLIR import see); causal from an ``arange`` comparison."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if self.causal:
            s = q.shape[-2]
            scores = scores.masked_fill(torch.arange(s).unsqueeze(0) > torch.arange(s).unsqueeze(-1), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def best(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _ort(module: nn.Module, args: tuple, threads: int, d: str) -> Callable[[], object]:
    import onnxruntime as ort

    path = os.path.join(d, "m.onnx")
    torch.onnx.export(module, args, path, dynamo=False, opset_version=17, input_names=["q", "k", "v"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts)
    feeds = dict(zip(["q", "k", "v"], [a.numpy() for a in args]))
    return lambda: sess.run(None, feeds)


def attention_row(s: int, causal: bool, dtype: torch.dtype, threads: int, reps: int) -> dict[str, float]:
    from attnpass import mlir as am

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, s, 64, generator=g).to(dtype) for _ in range(3))
    args = (q, k, v)
    module = Attention(causal).eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        out["sdpa"] = best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), reps)
        out["eager"] = best(lambda: module(*args), reps) if s <= 4096 else float("nan")  # S x S scores: 8 x 8192^2 x 4 B
    if dtype == torch.float32:
        with tempfile.TemporaryDirectory() as d:
            out["ort"] = best(_ort(module, args, threads, d), reps) if s <= 4096 else float("nan")
    t0 = time.perf_counter()
    fn = am.compile(am.rewrite(am.import_(module, args), to="fused"))
    fn.engine.lookup(fn.func_name)  # LLVM's code generation included: the engine compiles on the first lookup
    out["compile_s"] = time.perf_counter() - t0
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out["err"] = float((fn(*args).float() - ref.float()).abs().max())
    out["mlir"] = best(lambda: fn(*args), 1 if s >= 4096 else reps)
    return out


def _tiny_gpt(s: int):
    """Tiny GPT-2 (2 layers, 4 heads of 16, eager attention) for ``s`` tokens behind a (ids, mask) -> hidden wrapper."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=s, attn_implementation="eager",
                       use_cache=False)
    gpt = T.GPT2Model(cfg).eval()

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = gpt

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.m(ids, attention_mask=mask).last_hidden_state

    return Text().eval()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def library_peak(path: str, s: int) -> None:
    """(child) One call of the library at ``path`` on ``s`` tokens; prints the peak RSS growth in KiB.

    The peak is the process's ``VmHWM`` reset to the current RSS right before the call (``clear_refs``): ``ru_maxrss``
    would start from the parent's peak (Linux carries it over fork and exec).
    """
    from attnpass.lowering import native

    lib = native.load_library(path)
    ids, mask = np.zeros((1, s), dtype=np.int64), np.ones((1, s), dtype=np.int64)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current one
    lib(ids, mask)
    print(_status_kb("VmHWM") - before)


def memory_table(threads: int) -> None:
    """The tiny GPT-2's native library (fused rewrite): peak RSS of one call at S = 1024, 2048, 4096."""
    import subprocess

    from attnpass import mlir as am

    print(f"\ntiny GPT-2 native library (fused), peak RSS of one call above the loaded library, {threads} threads")
    print(f"{'S':>5} {'peak MiB':>9} {'per 1k tokens':>13}")
    for s in (1024, 2048, 4096):
        with tempfile.TemporaryDirectory() as d, torch.no_grad():
            ids, mask = torch.zeros(1, s, dtype=torch.long), torch.ones(1, s, dtype=torch.long)
            path = os.path.join(d, "gpt.onnx")
            torch.onnx.export(_tiny_gpt(s), (ids, mask), path, dynamo=False, opset_version=17, input_names=["ids", "mask"])
            so = os.path.join(d, "gpt.so")
            am.compile_library(am.rewrite(am.import_(path), to="fused"), so)
            env = dict(os.environ, ATTNPASS_THREADS=str(threads))
            run = subprocess.run([sys.executable, __file__, "--library-peak", so, str(s)], capture_output=True, text=True,
                                 env=env, check=True)
            kib = int(run.stdout.split()[-1])
            print(f"{s:>5} {kib / 1024:>9.1f} {kib / 1024 / (s / 1024):>13.1f}", flush=True)


def model_row(s: int, threads: int, reps: int) -> dict[str, float]:
    """Tiny GPT-2 (2 layers, 4 heads of 16, eager attention) at ``s`` tokens: library vs onnxruntime vs eager."""
    import onnxruntime as ort

    from attnpass import mlir as am

    text = _tiny_gpt(s)
    ids = torch.randint(0, 100, (1, s))
    mask = torch.ones(1, s, dtype=torch.long)  # the TorchScript exporter needs a mask input (no aten::diff then)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        path = os.path.join(d, "gpt.onnx")
        torch.onnx.export(text, (ids, mask), path, dynamo=False, opset_version=17, input_names=["ids", "mask"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts)
        feeds = {"ids": ids.numpy(), "mask": mask.numpy()}
        out["ort"] = best(lambda: sess.run(None, feeds), reps)
        out["eager"] = best(lambda: text(ids, mask), reps)
        t0 = time.perf_counter()
        fused, result = am.rewrite(am.import_(path), to="fused", with_report=True)
        so = os.path.join(d, "gpt.so")
        am.compile_library(fused, so)
        out["build_s"] = time.perf_counter() - t0
        out["sites"] = len(result.rewritten)
        lib = am.load_library(so)
        want = sess.run(None, feeds)[0]
        out["err"] = float(np.abs(lib(*feeds.values()) - want).max())
        out["library"] = best(lambda: lib(*feeds.values()), reps)
    return out


def _ratio(r: dict[str, float], key: str) -> str:
    """``r[key] / r["sdpa"]``, or n/a where the variant did not run."""
    return f"{r[key] / r['sdpa']:.2f}" if key in r and r[key] == r[key] else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="S = 512, 1024, 2048, fp32 only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", action="store_true", help="also the whole-model table (tiny GPT-2 at S=2048)")
    p.add_argument("--memory", action="store_true", help="the tiny GPT-2 library's peak RSS at S = 1024, 2048, 4096")
    p.add_argument("--library-peak", nargs=2, metavar=("SO", "S"), help=argparse.SUPPRESS)  # (child of --memory)
    p.add_argument("--sizes", help="comma-separated S values (overrides the default list; empty: no attention table)")
    args = p.parse_args()
    if args.library_peak:
        return library_peak(args.library_peak[0], int(args.library_peak[1]))
    torch.set_num_threads(args.threads)
    os.environ["ATTNPASS_THREADS"] = str(args.threads)  # the fused loop nest's OpenMP team
    sizes = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    if args.sizes is not None:
        sizes = [int(x) for x in args.sizes.split(",") if x]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    print(f"attention B=1 H=8 D=64; torch / onnxruntime threads = {args.threads}; MLIR fused: the same; "
          f"time ratios to SDPA (lower is faster); host: {os.cpu_count()} cores")
    print(f"{'dtype':>8} {'causal':>6} {'S':>5} {'sdpa ms':>9} {'mlir/sdpa':>9} {'eager/sdpa':>10} {'ort/sdpa':>9} "
          f"{'compile s':>9} {'max err':>8}")
    for dtype in dtypes:
        for causal in (False, True):
            for s in sizes:
                r = attention_row(s, causal, dtype, args.threads, args.reps)
                sd = r["sdpa"]

                print(f"{str(dtype).split('.')[-1]:>8} {str(causal):>6} {s:>5} {1e3 * sd:>9.1f} {_ratio(r, 'mlir'):>9} "
                      f"{_ratio(r, 'eager'):>10} {_ratio(r, 'ort'):>9} {r.get('compile_s', float('nan')):>9.1f} "
                      f"{r.get('err', float('nan')):>8.1e}", flush=True)
    if args.memory:
        memory_table(args.threads)
    if args.model:
        r = model_row(2048, args.threads, args.reps)
        print(f"\ntiny GPT-2 (2 layers, 4 heads x 16) at S=2048, {r['sites']} fused sites, native library built in "
              f"{r['build_s']:.1f} s, max |library - ort| = {r['err']:.1e}")
        print(f"{'ort ms':>8} {'library/ort':>11} {'eager/ort':>9}")
        print(f"{1e3 * r['ort']:>8.1f} {r['library'] / r['ort']:>11.2f} {r['eager'] / r['ort']:>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
