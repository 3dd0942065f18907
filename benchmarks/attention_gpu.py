"""GPU attention benchmark: attnpass's Triton kernel vs SDPA (flash, cuDNN) and compiled FlexAttention.

Run ``python benchmarks/attention_gpu.py`` on a CUDA machine (``--quick`` for a smoke run).
Without CUDA it exits at once with a message saying so.

Problems keep the token count ``B * S`` constant (``--tokens``, default 32k) while S runs
from 1k to 32k, with ``H = --hidden / D`` heads, D = 64 and 128, bf16, causal and not,
forward and forward+backward.  Every implementation computes the same thing:

* ``attnpass``: ``torch.ops.attnpass.attention`` (the Triton kernel; SSMax in-kernel);
* ``sdpa-flash`` / ``sdpa-cudnn``: ``F.scaled_dot_product_attention`` pinned to one backend;
  SSMax as the per-row factor applied to Q first (``semantics.ssmax_sdpa``'s identity; no
  mask here, so nothing else changes), and that elementwise op is part of the time;
* ``flex``: ``torch.compile(flex_attention)`` with an SSMax ``score_mod`` (multiply by the
  row's factor) and, when causal, a block mask so it skips blocks as the others do.

Times are CUDA-event medians from ``triton.testing.do_bench`` after warm-up (autotuning and
compilation happen there, not in the timed runs).  TFLOP/s counts the two attention
matmuls, ``4 B H S^2 D`` (half of it when causal), and 2.5x that for the backward, the
usual FlashAttention convention, so rows are comparable across implementations.  The
ratio columns are attnpass's speed over each other implementation's (>1: attnpass faster).
Before timing, each implementation's output is checked against attnpass's; a mismatch is
reported in the row rather than silently timed.

A summary follows the table: per shape, attnpass against the faster of SDPA flash/cuDNN
(targets: forward >= 0.85, forward+backward >= 0.75) and what SSMax costs over the same
kernel without it (target <= 3%).  ``--budget`` stops starting new problems after that many
seconds and ``--out`` rewrites the table to a file after every problem, so a session cut
short by a time limit still leaves every row it measured (``benchmarks/gpu_session.sh``).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IMPLS = ("attnpass", "sdpa-flash", "sdpa-cudnn", "flex")


@dataclass
class Row:
    """One configuration: milliseconds per implementation (None where it could not run) and notes."""

    s: int
    b: int
    h: int
    d: int
    causal: bool
    ssmax: bool
    mode: str
    flops: float
    ms: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def tflops(self, impl: str) -> float | None:
        t = self.ms.get(impl)
        return None if t is None else self.flops / (t * 1e-3) / 1e12


def attention_flops(b: int, h: int, s: int, d: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def ssmax_factor(s: int, h: int, causal: bool, s_h: torch.Tensor) -> torch.Tensor:
    """``[H, S]`` fp32 SSMax factor for a square unmasked problem (n_i = i + 1 causal, S otherwise)."""
    from attnpass import semantics

    n = torch.arange(1, s + 1, device=s_h.device) if causal else torch.full((s,), s, device=s_h.device)
    return semantics.ssmax_factor(n.reshape(1, s).expand(h, s), s_h)


def make_impls(s: int, h: int, causal: bool, ssmax: bool, impls: set[str]) -> dict[str, Callable[..., torch.Tensor]]:
    """Closures ``f(q, k, v) -> out``; all compute SSMax attention (or plain attention if not ``ssmax``)."""
    import attnpass.lowering.ops  # noqa: F401  (registers torch.ops.attnpass.attention)
    from attnpass import semantics

    dev = torch.device("cuda")
    s_h = torch.full((h,), semantics.s_for_train_len(4096), device=dev)
    factor = ssmax_factor(s, h, causal, s_h)  # [H, S]
    q_factor = factor.reshape(1, h, s, 1)
    out: dict[str, Callable[..., torch.Tensor]] = {}

    if "attnpass" in impls:
        def fused(q, k, v):
            return torch.ops.attnpass.attention(q, k, v, None, causal, None, s_h if ssmax else None, None, None, False)[0]
        out["attnpass"] = fused

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        if name not in impls:
            continue

        def sdpa(q, k, v, backend=backend):
            if ssmax:
                q = (q * q_factor).to(q.dtype)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out[name] = sdpa

    if "flex" in impls:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, hh, qi, ki: ki <= qi, None, None, s, s, device="cuda")

        def ssmax_mod(score, b, hh, q_idx, kv_idx):
            return score * factor[hh, q_idx]

        def flex(q, k, v):
            return compiled(q, k, v, score_mod=ssmax_mod if ssmax else None, block_mask=block_mask)
        out["flex"] = flex
    return out


def fwd_bwd(f: Callable[..., torch.Tensor], q, k, v, g) -> Callable[[], None]:
    def run() -> None:
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        torch.autograd.grad(f(qq, kk, vv), (qq, kk, vv), g)
    return run


def measure_config(args: argparse.Namespace, b: int, h: int, s: int, d: int, causal: bool, ssmax: bool) -> list[Row]:
    """Every implementation on one problem, in each requested mode."""
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    g = torch.randn_like(q)
    fns = make_impls(s, h, causal, ssmax, set(args.impls))
    ref = fns["attnpass"](q, k, v).float() if "attnpass" in fns else None
    rows = []
    for mode in args.modes:
        row = Row(s, b, h, d, causal, ssmax, mode, attention_flops(b, h, s, d, causal, mode))
        for name, f in fns.items():
            try:
                if mode == "fwd" and ref is not None and name != "attnpass":
                    err = (f(q, k, v).float() - ref).abs().max().item()
                    if not err <= 2e-2:
                        row.notes.append(f"{name} differs from attnpass by {err:.3g}")
                call = functools.partial(f, q, k, v) if mode == "fwd" else fwd_bwd(f, q, k, v, g)
                row.ms[name] = do_bench(call, warmup=args.warmup, rep=args.rep)
            except Exception as exc:  # a backend that refuses the shape is a row entry, not a crash
                row.ms[name] = None
                row.notes.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
        rows.append(row)
        print_progress(row)
    return rows


def measure(args: argparse.Namespace) -> list[Row]:
    """Every problem in the order given (sizes first: put the ones that matter most first), within the budget."""
    rows: list[Row] = []
    start = time.monotonic()
    for s in args.sizes:
        for d in args.head_dims:
            h = max(1, args.hidden // d)
            b = max(1, args.tokens // s)
            for causal in args.causal:
                for ssmax in args.ssmax:
                    if args.budget is not None and time.monotonic() - start > args.budget:
                        print(f"  budget of {args.budget:.0f}s spent: S={s} D={d} causal={int(causal)} "
                              f"ssmax={int(ssmax)} and later problems not measured", file=sys.stderr, flush=True)
                        return rows
                    rows += measure_config(args, b, h, s, d, causal, ssmax)
                    torch.cuda.empty_cache()
                    if args.out:
                        write_report(args.out, rows, args.impls, args.header)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def print_progress(row: Row) -> None:
    parts = [f"{n}={_fmt(row.tflops(n), '.1f')}" for n in row.ms]
    print(f"  S={row.s:>5} D={row.d:>3} causal={int(row.causal)} ssmax={int(row.ssmax)} {row.mode:<7} "
          + " ".join(parts), file=sys.stderr, flush=True)


def _sorted(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.d, r.s, r.causal, r.ssmax, r.mode))


def render(rows: list[Row], impls: list[str]) -> str:
    """The table: TFLOP/s per implementation and attnpass's speed-up over each other one."""
    others = [i for i in impls if i != "attnpass"]
    headers = ["S", "B", "H", "D", "causal", "ssmax", "mode"] + [f"{i} TFLOP/s" for i in impls]
    if "attnpass" in impls:
        headers += [f"x {i}" for i in others]
    table = []
    for r in _sorted(rows):
        cells = [str(r.s), str(r.b), str(r.h), str(r.d), "yes" if r.causal else "no", "yes" if r.ssmax else "no", r.mode]
        cells += [_fmt(r.tflops(i), ".1f") for i in impls]
        if "attnpass" in impls:
            ours = r.ms.get("attnpass")
            cells += [_fmt(None if ours is None or r.ms.get(i) is None else r.ms[i] / ours, ".2f") for i in others]
        table.append(cells)
    widths = [max(len(h), *(len(c[j]) for c in table)) if table else len(h) for j, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in table]
    notes = [(r, n) for r in _sorted(rows) for n in r.notes]
    if notes:
        lines += ["", "notes:"] + [f"  S={r.s} D={r.d} causal={r.causal} ssmax={r.ssmax} {r.mode}: {n}" for r, n in notes]
    return "\n".join(lines)


#: The issue's targets: attnpass over the best SDPA backend, per mode, and SSMax's cost over no SSMax.
TARGET_VS_SDPA = {"fwd": 0.85, "fwd+bwd": 0.75}
TARGET_SSMAX_COST = 0.03


def summary(rows: list[Row]) -> str:
    """Per shape: attnpass / best SDPA (flash or cuDNN), and SSMax's extra time; ``MISS`` where a target is missed."""
    lines = ["summary (speed ratio attnpass / best of sdpa-flash, sdpa-cudnn; SSMax cost = time with / without - 1):"]
    by_key = {(r.s, r.d, r.causal, r.ssmax, r.mode): r for r in rows}
    misses = 0
    for r in _sorted(rows):
        ours = r.ms.get("attnpass")
        sdpa = [r.ms[i] for i in ("sdpa-flash", "sdpa-cudnn") if r.ms.get(i) is not None]
        parts = []
        if ours is not None and sdpa:
            ratio = min(sdpa) / ours
            ok = ratio >= TARGET_VS_SDPA[r.mode]
            misses += not ok
            parts.append(f"vs best sdpa {ratio:.2f} (target >= {TARGET_VS_SDPA[r.mode]:.2f}{'' if ok else ', MISS'})")
        plain = by_key.get((r.s, r.d, r.causal, False, r.mode))
        if r.ssmax and ours is not None and plain is not None and plain.ms.get("attnpass") is not None:
            cost = ours / plain.ms["attnpass"] - 1.0
            ok = cost <= TARGET_SSMAX_COST
            misses += not ok
            parts.append(f"ssmax cost {100 * cost:+.1f}% (target <= {100 * TARGET_SSMAX_COST:.0f}%{'' if ok else ', MISS'})")
        if parts:
            lines.append(f"  S={r.s:>5} D={r.d:>3} causal={int(r.causal)} ssmax={int(r.ssmax)} {r.mode:<7} " + "; ".join(parts))
    lines.append(f"{misses} target(s) missed")
    return "\n".join(lines)


def write_report(path: str, rows: list[Row], impls: list[str], header: str) -> None:
    """Header, table and summary to ``path`` (rewritten whole, so it is complete after every problem)."""
    ordered = [i for i in IMPLS if i in impls]
    with open(path, "w") as f:
        f.write(header + "\n\n" + render(rows, ordered) + "\n\n" + summary(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    yes_no = {"yes": [True], "no": [False], "both": [False, True]}
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="S = 1k and 4k, D = 64, fewer repetitions: a smoke run")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    p.add_argument("--tokens", type=int, default=32768, help="B * S, constant across sizes")
    p.add_argument("--hidden", type=int, default=2048, help="H * D")
    p.add_argument("--causal", choices=yes_no, default="both")
    p.add_argument("--ssmax", choices=yes_no, default="both")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS), help="comma list of " + ",".join(IMPLS))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--budget", type=float, default=None, help="seconds after which no new problem is started")
    p.add_argument("--out", default=None, help="also write the table and summary to this file (after every problem)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
              "this benchmark times GPU kernels only. For CPU numbers run benchmarks/attention_cpu.py.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("attention_gpu.py: Triton is not installed (pip install 'attnpass[gpu]').", file=sys.stderr)
        return 2
    args.causal, args.ssmax = yes_no[args.causal], yes_no[args.ssmax]
    unknown = set(args.impls) - set(IMPLS)
    if unknown or not args.impls:
        p.error(f"unknown implementation(s) {sorted(unknown)}; choose from {','.join(IMPLS)}")
    if any(m not in ("fwd", "fwd+bwd") for m in args.modes):
        p.error("--modes takes fwd and/or fwd+bwd")
    if args.quick:
        args.sizes, args.head_dims, args.warmup, args.rep = [1024, 4096], [64], 10, 30
    from attnpass import kernels

    if "attnpass" in args.impls and kernels.active_backend("cuda") != "triton":
        print(f"attention_gpu.py: attnpass runs {kernels.active_backend('cuda')!r} on CUDA, not the Triton kernel; "
              "is Triton importable?", file=sys.stderr)
        return 2
    args.header = (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
                   f"bf16, B*S = {args.tokens}, H*D = {args.hidden}")
    print(args.header, file=sys.stderr)
    rows = measure(args)
    ordered = [i for i in IMPLS if i in args.impls]
    print(render(rows, ordered))
    print()
    print(summary(rows))
    if args.out:
        write_report(args.out, rows, args.impls, args.header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
