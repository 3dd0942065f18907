"""CPU attention benchmark: attnpass's fused kernel vs SDPA, compiled FlexAttention and eager attention.

Run ``python benchmarks/attention_cpu.py`` (everything; several minutes, FlexAttention compiles
take ~20 s per configuration) or ``--quick`` for a smoke run.  Shapes are B=1, H=8, D=64.

Measurements run in alternating rounds (every implementation once per round, best round
kept), because this host's speed drifts by tens of percent between runs: ratios taken in
the same rounds are what hold.  ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for
torch's CPU allocator) is set before torch is imported: it changes eager attention by
1.6-2.2x and leaves the fused kernels alone, so comparing without it flatters us.

"peak MiB" is the peak of torch's CPU allocator during one call, from the profiler's
memory events, above what the inputs already hold.  It counts every tensor an
implementation allocates (SDPA's per-thread buffers included) but not plain ``malloc``
memory: attnpass's per-thread score tiles (about 2.5 MiB a thread) and MKL's packing
buffers do not show.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnpass.lowering.ops  # noqa: E402, F401  (registers torch.ops.attnpass.attention)
from attnpass import kernels, semantics  # noqa: E402

B, H, D = 1, 8, 64
IMPLS = ("attnpass", "sdpa", "flex", "eager")


@dataclass
class Row:
    """One (S, dtype, causal, ssmax) configuration: seconds and peak bytes per implementation."""

    s: int
    dtype: torch.dtype
    causal: bool
    ssmax: bool
    flops: float
    times: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    mm_gflops: float = float("nan")
    notes: list[str] = field(default_factory=list)


def row_factor(s: int, causal: bool, s_h: torch.Tensor) -> torch.Tensor:
    """SSMax factor ``[1, H, S, 1]`` for an unmasked or causal square problem (n_i = i + 1 or S)."""
    n = torch.arange(1, s + 1) if causal else torch.full((s,), s)
    return semantics.ssmax_factor(n.reshape(1, 1, s), s_h).reshape(1, H, s, 1)


def make_impls(s: int, dtype: torch.dtype, causal: bool, ssmax: bool, impls: set[str]) -> dict[str, Callable[..., torch.Tensor]]:
    """Closures ``f(q, k, v) -> out`` computing the same attention (SSMax included) four ways."""
    s_h = torch.full((H,), semantics.s_for_train_len(512))
    factor = row_factor(s, causal, s_h)
    out: dict[str, Callable[..., torch.Tensor]] = {}
    if "attnpass" in impls:
        def fused(q, k, v):
            return torch.ops.attnpass.attention(q, k, v, None, causal, None, s_h if ssmax else None, None, None, False)[0]
        out["attnpass"] = fused
    if "sdpa" in impls:
        def sdpa(q, k, v):
            if ssmax:  # SSMax as a per-row scaling of Q: valid here because no mask is applied before it
                q = (q * factor).to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out["sdpa"] = sdpa
    if "flex" in impls:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, s, s, device="cpu")
        flat = factor.reshape(H, s)

        def ssmax_mod(score, b, h, q_idx, kv_idx):
            return score * flat[h, q_idx]

        compiled = torch.compile(flex_attention, dynamic=False)

        def flex(q, k, v):
            return compiled(q, k, v, score_mod=ssmax_mod if ssmax else None, block_mask=block_mask)
        out["flex"] = flex
    if "eager" in impls:
        scale = 1.0 / math.sqrt(D)
        tri = torch.ones(s, s, dtype=torch.bool).tril() if causal else None

        def eager(q, k, v):
            z = (q @ k.transpose(-2, -1)) * scale
            if ssmax:
                z = z * factor.to(z.dtype)
            if tri is not None:
                z = z.masked_fill(~tri, float("-inf"))
            p = torch.softmax(z, dim=-1, dtype=torch.float32).to(q.dtype)
            return p @ v
        out["eager"] = eager
    return out


def peak_bytes(fn: Callable[[], object]) -> float:
    """Peak of torch's CPU allocator during ``fn()`` (bytes above the starting point)."""
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # kineto prints a line per start/stop on fd 2; keep the table readable
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    # Raw allocator records (alloc > 0, free < 0) in time order; the FunctionEvent view nets
    # allocations against frees inside each op and would hide an op's temporaries.
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return float(peak)


def timed_rounds(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float) -> dict[str, float]:
    """Best time per implementation over alternating rounds (each implementation once per round)."""
    best = {name: math.inf for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        if r >= 1 and time.perf_counter() - start > budget_s:
            break
    return best


MM_N = 1024


def matmul_call(dtype: torch.dtype, n: int = MM_N) -> Callable[[], torch.Tensor]:
    """An ``n x n`` matmul: timed in the same rounds as the attention, it is each row's ceiling."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return functools.partial(torch.mm, a, b)


def run_forward(args: argparse.Namespace) -> list[Row]:
    rows = []
    for s in args.sizes:
        for dtype in args.dtypes:
            for causal in args.causal:
                for ssmax in args.ssmax:
                    impls = set(args.impls)
                    row = Row(s, dtype, causal, ssmax, 4 * B * H * s * s * D * (0.5 if causal else 1.0))
                    if s > args.eager_max:
                        impls.discard("eager")
                        row.notes.append(f"eager skipped above S={args.eager_max}")
                    q, k, v = (torch.randn(B, H, s, D).to(dtype) for _ in range(3))
                    fns = make_impls(s, dtype, causal, ssmax, impls)
                    calls = {}
                    for name, fn in fns.items():
                        try:
                            fn(q, k, v)  # warm up (and compile, for flex)
                            calls[name] = functools.partial(fn, q, k, v)
                        except Exception as exc:  # report, never abort the table
                            row.notes.append(f"{name}: {type(exc).__name__}")
                    row.times = timed_rounds({**calls, "mm": matmul_call(torch.float32)}, args.rounds, args.budget)
                    row.mm_gflops = 2 * MM_N**3 / row.times.pop("mm") / 1e9
                    if not args.no_memory:
                        row.peaks = {name: peak_bytes(c) for name, c in calls.items()}
                    rows.append(row)
                    print_progress(row)
    return rows


def print_progress(row: Row) -> None:
    t = " ".join(f"{n}={row.times[n] * 1e3:.1f}ms" for n in row.times)
    print(f"  S={row.s} {dtype_name(row.dtype)} causal={row.causal} ssmax={row.ssmax}: {t}", flush=True)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def run_backward(s: int, dtype: torch.dtype, rounds: int, budget: float) -> dict[tuple[bool, bool], dict[str, float]]:
    """Forward+backward time, attnpass vs SDPA (FlexAttention has no CPU backward in torch 2.13)."""
    res = {}
    for causal in (False, True):
        for ssmax in (False, True):
            fns = make_impls(s, dtype, causal, ssmax, {"attnpass", "sdpa"})
            q, k, v = (torch.randn(B, H, s, D).to(dtype).requires_grad_() for _ in range(3))
            g = torch.randn(B, H, s, D).to(dtype)

            calls = {name: functools.partial(_fwd_bwd, f, q, k, v, g) for name, f in fns.items()}
            for c in calls.values():
                c()
            res[(causal, ssmax)] = timed_rounds(calls, rounds, budget)
            print(f"  fwd+bwd S={s} causal={causal} ssmax={ssmax}: "
                  + " ".join(f"{n}={t * 1e3:.1f}ms" for n, t in res[(causal, ssmax)].items()), flush=True)
    return res


def _fwd_bwd(f: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
    torch.autograd.grad(f(q, k, v), (q, k, v), g)


def render(rows: list[Row], bwd, args) -> None:
    headers = ["S", "dtype", "causal", "ssmax"]
    for name in args.impls:
        headers += [f"{name} ms"]
    headers += ["attnpass GF/s", "fp32 mm GF/s", "ours/mm", "sdpa/ours", "flex/ours", "eager/ours"]
    if not args.no_memory:
        headers += [f"{name} peak MiB" for name in args.impls]
    table = []
    for r in rows:
        t = r.times
        ours = t.get("attnpass")
        line = [str(r.s), dtype_name(r.dtype), "y" if r.causal else "n", "y" if r.ssmax else "n"]
        line += [f"{t[n] * 1e3:.1f}" if n in t else "-" for n in args.impls]
        gf = r.flops / ours / 1e9 if ours else float("nan")
        line += [f"{gf:.0f}", f"{r.mm_gflops:.0f}", f"{100 * gf / r.mm_gflops:.0f}%"]
        line += [f"{t[n] / ours:.2f}x" if ours and n in t else "-" for n in ("sdpa", "flex", "eager")]
        if not args.no_memory:
            line += [f"{r.peaks[n] / 2**20:.1f}" if n in r.peaks else "-" for n in args.impls]
        table.append(line)
    title = (f"attention forward, B={B} H={H} D={D}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"attnpass backend: {kernels.active_backend('cpu')}; best of alternating rounds; "
             f"ratios > 1x: attnpass faster; mm = fp32 {MM_N}^2 matmul in the same rounds")
    _print_table(title, headers, table)
    notes = sorted({n for r in rows for n in r.notes})
    for n in notes:
        print(f"note: {n}")
    if bwd:
        headers = ["S", "dtype", "causal", "ssmax", "attnpass ms", "sdpa ms", "ours/sdpa"]
        table = [[str(args.bwd_size), dtype_name(args.dtypes[0]), "y" if c else "n", "y" if ss else "n",
                  f"{t['attnpass'] * 1e3:.1f}", f"{t['sdpa'] * 1e3:.1f}", f"{t['attnpass'] / t['sdpa']:.2f}x"]
                 for (c, ss), t in bwd.items()]
        _print_table("forward + backward (dq, dk, dv)", headers, table)


def _print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for r in rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    Console(width=250).print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, fp32 only, no FlexAttention: a smoke run")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--dtypes", type=lambda s: [{"fp32": torch.float32, "bf16": torch.bfloat16}[x] for x in s.split(",")],
                   default=[torch.float32, torch.bfloat16], help="comma list of fp32,bf16")
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS), help="comma list of " + ",".join(IMPLS))
    yes_no = {"both": (False, True), "y": (True,), "n": (False,)}
    p.add_argument("--causal", choices=yes_no, default="both", help="forward table: causal rows, plain rows or both")
    p.add_argument("--ssmax", choices=yes_no, default="both", help="forward table: SSMax rows, plain rows or both")
    p.add_argument("--eager-max", type=int, default=4096, help="largest S for eager attention (S=8192 needs ~8 GiB)")
    p.add_argument("--rounds", type=int, default=15, help="at most this many alternating rounds")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per configuration before rounds stop early")
    p.add_argument("--bwd-size", type=int, default=2048, help="S for the forward+backward comparison (0: skip)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiler pass that measures peak memory")
    args = p.parse_args(argv)
    args.causal, args.ssmax = yes_no[args.causal], yes_no[args.ssmax]
    if args.quick:
        args.sizes, args.dtypes, args.rounds, args.bwd_size = [128, 256], [torch.float32], 5, 256
        args.impls = [i for i in args.impls if i != "flex"]
    for i in args.impls:
        if i not in IMPLS:
            p.error(f"unknown implementation {i!r}")
    if "attnpass" not in args.impls:
        p.error("attnpass must be among --impls: every ratio is against it")
    if kernels.active_backend("cpu") != "cpu":
        warnings.warn("the compiled CPU kernel is not active: attnpass numbers are the plain-torch reference", stacklevel=1)
    rows = run_forward(args)
    bwd = run_backward(args.bwd_size, args.dtypes[0], args.rounds, args.budget) if args.bwd_size else None
    render(rows, bwd, args)


if __name__ == "__main__":
    main()
