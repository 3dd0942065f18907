"""A MoE router through the fx path: the module rewritten by ``attnpass.fuse`` vs the module eager vs its torch.compile.

The rewritten graph calls ``torch.ops.attnpass.softmax_topk.default`` from fx code, so what it pays per call
is the op's dispatch plus the kernel; at decode-sized token counts the dispatch is most of it.  Rows: a
Mixtral-style router (gate linear, float32 softmax over the experts, top-k, renormalised) for a few token
counts, under ``torch.no_grad``.  "kept" is the same exported graph with the router not rewritten: the
exported module's own calling convention (input flattening, guards, metadata asserts) costs tens of
microseconds per call whatever the router does, so ``kept / fused`` is the router rewrite alone and
``eager / fused``, ``compiled / fused`` are what a user of ``attnpass.fuse`` sees.  Every implementation
runs once per round in alternating rounds (each round repeats a call for about ``--round-ms``), the best
round is kept, and only ratios from the same rounds are meaningful (> 1: the rewritten graph is faster).  "attnpass backend" is ``torch.compile(backend="attnpass")``
(the router rewritten inside torch.compile, inductor after it), against inductor alone.  A second table
times the op alone (called directly, from a plain fx GraphModule, under inference_mode) against softmax
alone on the same logits: the dispatch cost per call.

Run:  python benchmarks/router_dispatch.py [--threads 1] [--rounds 7]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnpass
from attnpass.api import _as_graph
from attnpass.rewrite import fx as fx_rewrite
from attnpass.spec import RewriteSpec


class Router(torch.nn.Module):
    """Mixtral's router: gate, float32 softmax over the experts, top-k, renormalised, cast back."""

    def __init__(self, hidden: int, experts: int, k: int) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.k = k

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = F.softmax(self.gate(h).float(), dim=-1)
        w, idx = torch.topk(p, self.k, dim=-1)
        return (w / w.sum(dim=-1, keepdim=True)).to(h.dtype), idx


def best_rounds(fns: dict[str, Callable[[], object]], rounds: int, round_s: float) -> dict[str, float]:
    """Best seconds per call for each implementation over alternating rounds."""
    reps = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        reps[name] = max(1, int(round_s / max(time.perf_counter() - t, 1e-7)))
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / reps[name])
    return best


def row(tokens: int, hidden: int, experts: int, k: int, args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    m = Router(hidden, experts, k).eval()
    h = torch.randn(tokens, hidden)
    fused = attnpass.fuse(m, (h,))
    kept, _ = fx_rewrite.emitted(_as_graph(m, (h,), {}), RewriteSpec("fused").resolve(), topk=False)
    assert any(n.target is torch.ops.attnpass.softmax_topk.default for n in fused.graph.nodes), "router not fused"
    compiled = torch.compile(m, dynamic=False)
    ours = torch.compile(m, dynamic=False, backend="attnpass")  # the router rewritten inside torch.compile
    with torch.no_grad():
        (wf, i_f), (we, ie) = fused(h), m(h)
        same = torch.equal(i_f, ie) and torch.allclose(wf, we, atol=1e-6)
        for _ in range(3):  # warm-up, the compiles
            compiled(h)
            ours(h)
        fns = {"eager": lambda: m(h), "compiled": lambda: compiled(h), "attnpass backend": lambda: ours(h),
               "kept": lambda: kept(h), "fused": lambda: fused(h)}
        t = best_rounds(fns, args.rounds, args.round_ms / 1e3)
    us = " | ".join(f"{t[name] * 1e6:.1f}" for name in fns)
    ratios = " | ".join(f"{t[name] / t['fused']:.2f}" for name in ("kept", "eager", "compiled"))
    return (f"| {tokens} x {experts}, top-{k} | {us} | {ratios} | {t['compiled'] / t['attnpass backend']:.2f} | "
            f"{'yes' if same else 'NO'} |")


class _OpCall(torch.nn.Module):
    """One op call, as a rewritten graph spells it; symbolic_trace gives the plain fx calling convention."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.attnpass.softmax_topk.default(x, 2, -1, True)


def op_rows(args: argparse.Namespace) -> None:
    """The op alone against softmax alone: called directly, from a plain fx GraphModule, and under inference_mode."""
    print("\n| logits (rows x experts), top-2 | softmax us | op us | op in fx us | op inference_mode us "
          "| softmax / op | softmax / op in fx |")
    print("|---|---|---|---|---|---|---|")
    traced = torch.fx.symbolic_trace(_OpCall())
    for rows in (1, 64, 4096):
        print(_op_row(torch.randn(rows, 64), traced, args), flush=True)


def _op_row(x: torch.Tensor, traced: torch.fx.GraphModule, args: argparse.Namespace) -> str:
    op = torch.ops.attnpass.softmax_topk.default
    op(x, 2, -1, True)  # the first CPU call loads the kernel library
    with torch.no_grad():
        fns = {"softmax": lambda: torch.softmax(x, -1), "op": lambda: op(x, 2, -1, True), "fx": lambda: traced(x)}
        t = best_rounds(fns, args.rounds, args.round_ms / 1e3)
    with torch.inference_mode():
        t_inf = best_rounds({"op": lambda: op(x, 2, -1, True)}, args.rounds, args.round_ms / 1e3)["op"]
    return (f"| {x.shape[0]} x {x.shape[1]} | {t['softmax'] * 1e6:.1f} | {t['op'] * 1e6:.1f} | {t['fx'] * 1e6:.1f} | "
            f"{t_inf * 1e6:.1f} | {t['softmax'] / t['op']:.2f} | {t['softmax'] / t['fx']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--round-ms", type=float, default=40.0, help="time per implementation per round")
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.rounds} alternating rounds\n")
    print("| router (tokens x experts) | eager us | compiled us | attnpass backend us | kept us | fused us | kept / fused "
          "| eager / fused | compiled / fused | compiled / attnpass backend | same |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tokens, experts, k in ((1, 64, 2), (64, 64, 2), (4096, 64, 2), (4096, 8, 2)):
        print(row(tokens, args.hidden, experts, k, args), flush=True)
    op_rows(args)


if __name__ == "__main__":
    main()
