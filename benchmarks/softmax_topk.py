"""softmax + top-k benchmark: ``attnpass.softmax_topk`` vs eager ``softmax(x).topk(k)``, its torch.compile, softmax alone.

Run ``python benchmarks/softmax_topk.py`` (all shapes, fp32 and bf16; the compiles take most of
the time) or ``--quick`` (a few shapes).  ``--device cuda`` runs the Triton kernel against the
same peers on a GPU.

Shapes are the two places a softmax is followed by a top-k: MoE routers (4096 tokens x 8/64/256
experts, k = 2/8, weights renormalised over the k as Mixtral does) and sampling / classification
heads over a vocabulary (64 rows x 32k/128k/256k, k = 1/8/50).  Every implementation runs once
per round in alternating rounds and the best round is kept, because this host's speed drifts
between runs: only ratios taken in the same rounds are meaningful.  Ratios are peer time over
attnpass time (> 1: attnpass is faster).  "peak MiB" is the allocator's peak during one call
above what the input already holds (torch's CPU allocator via the profiler, or CUDA's).

After the table, one whole-model line (CPU only, skipped with ``--no-model``): a tiny Mixtral-style model's
forward with its routers fused vs kept, from ``benchmarks/moe_routers.py`` (the same measurement, not a copy).
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as attention_cpu.py: eager allocations are timed fairly

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

import attnpass  # noqa: E402
from attnpass.kernels import topk as topk_dispatch  # noqa: E402

ROUTER = [(4096, n, k) for n in (8, 64, 256) for k in (2, 8)]
VOCAB = [(64, n, k) for n in (32768, 131072, 262144) for k in (1, 8, 50)]
QUICK = [(4096, 64, 2), (4096, 256, 8), (64, 32768, 8), (64, 131072, 50)]
IMPLS = ("attnpass", "eager", "compiled", "softmax")


def eager_topk(x: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What a model writes today (Mixtral's router when ``renormalize``)."""
    p, i = torch.softmax(x, dim=-1).topk(k, dim=-1)
    if renormalize:
        p = p / p.sum(dim=-1, keepdim=True)
    return p, i


# one specialisation per (shape, dtype, k, renormalize): allow them all instead of falling back to eager
torch._dynamo.config.cache_size_limit = 256
if hasattr(torch._dynamo.config, "recompile_limit"):
    torch._dynamo.config.recompile_limit = 256
_compiled = torch.compile(eager_topk, dynamic=False)


def impls(x: torch.Tensor, k: int, renormalize: bool) -> dict[str, Callable[[], object]]:
    return {
        "attnpass": lambda: attnpass.softmax_topk(x, k, -1, renormalize),
        "eager": lambda: eager_topk(x, k, renormalize),
        "compiled": lambda: _compiled(x, k, renormalize),
        "softmax": lambda: torch.softmax(x, dim=-1),
    }


def same_selection(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor, want_p: torch.Tensor) -> str:
    """``yes``: identical indices; ``ties``: different indices among equal values (logits, or eager's rounded
    probabilities, which bf16 makes equal for different logits); ``NO`` otherwise."""
    if torch.equal(got, want):
        return "yes"
    same_logits = torch.equal(x.gather(-1, got), x.gather(-1, want))
    same_probs = torch.equal(torch.softmax(x, dim=-1).gather(-1, got).sort(-1, descending=True).values,
                             torch.softmax(x, dim=-1).gather(-1, want).sort(-1, descending=True).values)
    return "ties" if same_logits or same_probs else "NO"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rounds(fns: dict[str, Callable[[], object]], device: str, rounds: int, budget_s: float) -> dict[str, float]:
    """Best seconds per implementation over alternating rounds (each once per round); GPU calls repeated to 1 ms."""
    reps = {name: 1 for name in fns}
    if device == "cuda":
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            reps[name] = max(1, int(1e-3 / max(time.perf_counter() - t, 1e-6)))
    best = {name: math.inf for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t) / reps[name])
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return best


def peak_bytes(fn: Callable[[], object], device: str) -> float:
    """Peak allocator bytes during ``fn()`` above the starting point."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated() - base)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from attention_cpu import peak_bytes as cpu_peak_bytes  # one reader of the profiler's allocator records

    return cpu_peak_bytes(fn)


def run(args: argparse.Namespace) -> list[list[str]]:
    shapes = QUICK if args.quick else ROUTER + VOCAB
    dtypes = [torch.float32, torch.bfloat16]
    lines = []
    for dtype in dtypes:
        for rows, n, k in shapes:
            renorm = n <= 256  # routers renormalise their k weights
            x = torch.randn(rows, n, generator=torch.Generator().manual_seed(0)).to(device=args.device, dtype=dtype)
            fns = impls(x, k, renorm)
            want_p, want_i = fns["eager"]()
            got_p, got_i = fns["attnpass"]()
            agree = same_selection(x, got_i, want_i, want_p)
            for fn in fns.values():  # warm-up (and the compile)
                fn()
            t = timed_rounds(fns, args.device, args.rounds, args.budget)
            peaks = {} if args.no_memory else {name: peak_bytes(fn, args.device) for name, fn in fns.items()}
            line = [f"{rows}x{n}", str(k), "bf16" if dtype == torch.bfloat16 else "fp32", "yes" if renorm else "no",
                    topk_dispatch.active_backend(x, k), f"{t['attnpass'] * 1e3:.3f}",
                    *(f"{t[p] / t['attnpass']:.2f}" for p in ("eager", "compiled", "softmax")),
                    *(f"{peaks[p] / 2**20:.2f}" if peaks else "-" for p in IMPLS), agree]
            lines.append(line)
            print("  ".join(line), flush=True)
    return lines


def render(lines: list[list[str]]) -> None:
    headers = ["shape", "k", "dtype", "renorm", "kernel", "attnpass ms", "eager/attnpass", "compiled/attnpass",
               "softmax/attnpass", *(f"{p} peak MiB" for p in IMPLS), "same indices"]
    print()
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="four shapes instead of fifteen")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--budget", type=float, default=3.0, help="seconds per shape after the third round")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model line (a tiny Mixtral-style forward)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on a loaded host")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds = min(args.rounds, 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    render(run(args))
    if args.device == "cpu" and not args.no_model:
        print_whole_model(args.quick)


def print_whole_model(quick: bool) -> None:
    """The routers in their model: ``moe_routers.whole_model`` (kept vs fused routers, same rounds)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import moe_routers

    print()
    print("| case | routers fused | kept ms | fused ms | kept / fused | same output |")
    print("|---|---|---|---|---|---|")
    tokens, hidden, experts, k = (64, 64, 8, 2) if quick else (512, 128, 8, 2)
    print(moe_routers.whole_model(tokens, hidden, experts, k, 3 if quick else 20), flush=True)


if __name__ == "__main__":
    main()
