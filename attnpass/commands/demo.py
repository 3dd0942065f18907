"""``attnpass demo``: the whole job on the built-in tiny GPT, printed as a user would want to read it.

find -> rewrite (fused and SSMax) -> compare with the original -> time each variant; then, when
the ONNX tools are installed, export -> rewrite -> validate in onnxruntime.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loaded in ``run``: ``attnpass --help`` must not wait for torch
    import torch
    from rich.console import Console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run find -> rewrite -> validate on a built-in tiny GPT and print the result")
    p.add_argument("--seq", type=_positive, default=256, help="sequence length (default 256)")
    p.add_argument("--layers", type=_positive, default=2, help="transformer layers of the tiny GPT")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export/validate half")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (a zero or negative length is a usage error, not a crash)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _time(fn: Callable[[], torch.Tensor], repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    import attnpass
    from attnpass.progress import steps
    from attnpass.report import report_dict, sites_table
    from attnpass.result import dumps
    from attnpass.tiny import TinyGPT, example_inputs

    console = Console(width=max(Console().width, 140), quiet=args.json)
    torch.manual_seed(0)
    model = TinyGPT(layers=args.layers, max_len=max(1024, args.seq)).eval()
    ids, mask = example_inputs(seq=args.seq)
    console.print(f"[bold]attnpass demo[/]: TinyGPT, {args.layers} layers, 4 heads / 2 KV heads, batch 2, seq {args.seq}")
    with steps(total=5, enabled=not args.json) as step:
        step("finding attention")
        report = attnpass.find(model, (ids, mask))
        with torch.no_grad():
            step("rewriting: fused, SSMax, SSMax fused")
            ref = model(ids, mask)
            fused = attnpass.fuse(model, (ids, mask))
            ssmax = attnpass.to_ssmax(model, (ids, mask), s=0.43)
            ssmax_fused = attnpass.to_ssmax(model, (ids, mask), s=0.43, fused=True)
            identity = attnpass.to_ssmax(model, (ids, mask), s=0.0, b=1.0)
            variants = [
                ("original (eager)", model),
                ("fused (attnpass::attention)", fused),
                ("SSMax s=0.43 (in the graph)", ssmax),
                ("SSMax s=0.43 fused", ssmax_fused),
                ("SSMax s=0, b=1 (must equal original)", identity),
            ]
            step("timing each variant")
            base = _time(lambda: model(ids, mask))
            rows = []
            for name, fn in variants:
                out = fn(ids, mask)
                t = base if fn is model else _time(lambda fn=fn: fn(ids, mask))
                rows.append({"variant": name, "max_abs_err": (out - ref).abs().max().item(), "ms": t * 1e3,
                             "speedup": base / t, "finite": bool(torch.isfinite(out).all())})
    console.print(sites_table(report, title="attention sites found"))
    table = Table(title="rewrites vs the original")
    for col in ("variant", "max |err| vs original", "time (ms)", "speed vs original"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for r in rows:
        table.add_row(r["variant"], f"{r['max_abs_err']:.2e}", f"{r['ms']:.2f}", f"{r['speedup']:.2f}x")
    console.print(table)
    by = {r["variant"]: r for r in rows}
    ok = (by["fused (attnpass::attention)"]["max_abs_err"] < 1e-4
          and by["SSMax s=0, b=1 (must equal original)"]["max_abs_err"] < 1e-4
          and all(r["finite"] for r in rows)
          and abs(by["SSMax s=0.43 (in the graph)"]["max_abs_err"] - by["SSMax s=0.43 fused"]["max_abs_err"]) < 1e-4)
    result = {"sites": report_dict(report), "torch": rows}
    if not args.no_onnx:
        onnx_ok, onnx_rows = _onnx_half(console, model, ids, mask, not args.json)
        ok = ok and onnx_ok
        result["onnx"] = onnx_rows
    result["ok"] = ok
    if args.json:
        print(dumps(result))
    console.print("[bold green]demo OK[/]" if ok else "[bold red]demo found a mismatch[/]")
    return 0 if ok else 1


def _onnx_half(console: Console, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
               progress: bool) -> tuple[bool, list[dict]]:
    """Export -> rewrite -> validate in onnxruntime, when the ONNX half of attnpass is available."""
    try:
        from attnpass.commands import demo_onnx
    except ImportError as e:
        console.print(f"[yellow]ONNX half not run: {e}[/]")
        return True, []
    return demo_onnx.run(console, model, ids, mask, progress)
