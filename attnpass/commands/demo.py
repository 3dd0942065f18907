"""``attnpass demo``: the whole job on the built-in tiny GPT, printed as a user would want to read it.

find -> rewrite (fused and SSMax) -> compare with the original -> time each variant; then, when
the ONNX tools are installed, export -> rewrite -> validate in onnxruntime.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

import attnpass
from attnpass.report import sites_table
from attnpass.tiny import TinyGPT, example_inputs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run find -> rewrite -> validate on a built-in tiny GPT and print the result")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export/validate half")
    p.set_defaults(func=run)


def _time(fn: Callable[[], torch.Tensor], repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 140))
    torch.manual_seed(0)
    model = TinyGPT(layers=args.layers, max_len=max(1024, args.seq)).eval()
    ids, mask = example_inputs(seq=args.seq)
    console.print(f"[bold]attnpass demo[/]: TinyGPT, {args.layers} layers, 4 heads / 2 KV heads, batch 2, seq {args.seq}")

    report = attnpass.find(model, (ids, mask))
    console.print(sites_table(report, title="attention sites found"))

    with torch.no_grad():
        ref = model(ids, mask)
        fused = attnpass.fuse(model, (ids, mask))
        ssmax = attnpass.to_ssmax(model, (ids, mask), s=0.43)
        ssmax_fused = attnpass.to_ssmax(model, (ids, mask), s=0.43, fused=True)
        identity = attnpass.to_ssmax(model, (ids, mask), s=0.0, b=1.0)
        rows = [
            ("original (eager)", model, ref),
            ("fused (attnpass::attention)", fused, fused(ids, mask)),
            ("SSMax s=0.43 (in the graph)", ssmax, ssmax(ids, mask)),
            ("SSMax s=0.43 fused", ssmax_fused, ssmax_fused(ids, mask)),
            ("SSMax s=0, b=1 (must equal original)", identity, identity(ids, mask)),
        ]
        table = Table(title="rewrites vs the original")
        for col in ("variant", "max |err| vs original", "time (ms)", "speed vs original"):
            table.add_column(col, justify="right" if col != "variant" else "left")
        base = _time(lambda: model(ids, mask))
        for name, fn, out in rows:
            t = base if fn is model else _time(lambda fn=fn: fn(ids, mask))
            err = (out - ref).abs().max().item()
            table.add_row(name, f"{err:.2e}", f"{t * 1e3:.2f}", f"{base / t:.2f}x")
        console.print(table)
    ok = (rows[1][2] - ref).abs().max().item() < 1e-4 and (rows[4][2] - ref).abs().max().item() < 1e-4
    ok = ok and bool(torch.isfinite(rows[2][2]).all()) and (rows[2][2] - rows[3][2]).abs().max().item() < 1e-4
    if not args.no_onnx:
        ok = _onnx_half(console, model, ids, mask) and ok
    console.print("[bold green]demo OK[/]" if ok else "[bold red]demo found a mismatch[/]")
    return 0 if ok else 1


def _onnx_half(console: Console, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Export -> rewrite -> validate in onnxruntime, when the ONNX half of attnpass is available."""
    try:
        from attnpass.commands import demo_onnx
    except ImportError as e:
        console.print(f"[yellow]ONNX half skipped: {e}[/]")
        return True
    return demo_onnx.run(console, model, ids, mask)
