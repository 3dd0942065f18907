"""MLIR-lowered attention on the CPU: unfused vs online-softmax (fused) vs torch eager vs SDPA.

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/mlir_attention.py [--quick]

Causal attention, B=1, fp32, mask built in the graph from aranges (so the fused rewrite drops it
and tests indices instead).  Each configuration runs in its own subprocess, and its extra memory is
the peak RSS during the calls minus the RSS before the first one, the peak (``VmHWM``) reset right
before it (``/proc/self/clear_refs``): ``ru_maxrss`` would start from the parent's peak, which Linux
carries into a child over fork and exec.  The JIT compiles before that point.  Memory is
what this benchmark is about: the fused lowering's extra memory should grow like S, the unfused
one's like S^2.  Both MLIR variants go through ``convert-linalg-to-loops``; the fused loop nest
runs over blocks of 64 query rows, each visiting only the key tiles up to its diagonal (causal
costs about half of non-causal), marks its two matmul-like reductions ``fastmath<reassoc,contract>``
and computes exp as arithmetic so LLVM vectorises them, while the unfused lowering stays scalar.
Time ratios against SDPA, eager and onnxruntime (causal and not, fp32 / bf16, S up to 8192) and the
whole-model library table are in ``benchmarks/mlir_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
from torch import nn


class CausalAttention(nn.Module):
    def forward(self, q, k, v):
        s = q.shape[-2]
        rows = torch.arange(s).unsqueeze(-1)
        cols = torch.arange(s).unsqueeze(0)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(cols > rows, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def _status_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _one(variant: str, s: int, heads: int, d: int, reps: int) -> dict:
    """Run one configuration in this process; returns ms per call and the extra peak memory in MiB."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    q, k, v = (torch.randn(1, heads, s, d) for _ in range(3))
    if variant in ("mlir-unfused", "mlir-fused"):
        import warnings

        warnings.filterwarnings("ignore")
        from attnpass import mlir as am

        mod = am.import_(CausalAttention().eval(), (q, k, v))
        if variant == "mlir-fused":
            mod = am.rewrite(mod, to="fused", tile=64)
        fn = am.compile(mod)
        fn.engine.lookup(fn.func_name)  # LLVM's code generation now, not inside the measured calls
    elif variant == "eager":
        model = CausalAttention().eval()

        def fn(q, k, v):
            with torch.no_grad():
                return model(q, k, v)
    else:
        def fn(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    base = _status_kb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS restarts from the current one
    out = fn(q, k, v)  # warm-up, and the numerics check
    err = float((out - ref).abs().max())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(q, k, v)
        times.append(time.perf_counter() - t)
    peak = _status_kb("VmHWM")
    return {"variant": variant, "S": s, "ms": 1e3 * min(times), "extra_mib": max(0, peak - base) / 1024, "max_err": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="S = 256, 512 only, one repetition")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        variant, s, reps = args.one.split(":")
        print(json.dumps(_one(variant, int(s), args.heads, args.head_dim, int(reps))))
        return
    sizes = [256, 512] if args.quick else [256, 512, 1024, 2048, 4096]
    variants = ["mlir-unfused", "mlir-fused", "eager", "sdpa"]
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=os.environ.get("THP_MEM_ALLOC_ENABLE", "1"), OMP_NUM_THREADS="1")
    print(f"causal attention, B=1 H={args.heads} D={args.head_dim} fp32, 1 thread; extra = peak RSS - RSS before the first call")
    print(f"{'S':>6} " + " ".join(f"{v + ' ms':>16} {v + ' MiB':>17}" for v in variants))
    for s in sizes:
        row = []
        for variant in variants:
            reps = 1 if (args.quick or s >= 2048 and variant.startswith("mlir")) else 3
            res = subprocess.run([sys.executable, __file__, "--one", f"{variant}:{s}:{reps}", "--heads", str(args.heads),
                                  "--head-dim", str(args.head_dim)], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                row.append((float("nan"), float("nan")))
                print(f"# {variant} S={s} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if r["max_err"] > 1e-3:
                print(f"# {variant} S={s}: max error {r['max_err']:.2e} against SDPA", file=sys.stderr)
            row.append((r["ms"], r["extra_mib"]))
        print(f"{s:>6} " + " ".join(f"{ms:>16.1f} {mib:>17.1f}" for ms, mib in row), flush=True)


if __name__ == "__main__":
    main()
