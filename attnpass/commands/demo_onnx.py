"""The ONNX half of ``attnpass demo``: export -> find -> rewrite (fused, SSMax) -> validate in onnxruntime.

Kept apart from ``demo`` so the torch half runs where onnx/onnxruntime are not installed.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import attnpass
from attnpass import onnx as attnpass_onnx
from attnpass import validate as val
from attnpass.progress import steps


def _ort_time(path: Path, feeds: dict[str, np.ndarray], repeat: int = 5) -> float:
    sess = val.session(path)
    sess.run(None, feeds)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return best


def run(console: Console, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
        progress: bool = True) -> tuple[bool, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="attnpass-demo-") as tmp, steps(total=4, enabled=progress) as step:
        tmpdir = Path(tmp)
        src = tmpdir / "tiny_gpt.onnx"
        step("exporting to ONNX (torch.onnx, dynamo) and checking in onnxruntime")
        exported = attnpass.export(model, (ids, mask), None, src)
        console.print(f"exported TinyGPT to ONNX; onnxruntime vs torch eager: max |err| {exported.max_abs:.2e}")
        found = attnpass_onnx.find(src)
        console.print(f"ONNX: {len(found.report.sites)} attention sites found")
        feeds = {i.name: t.numpy() for i, t in zip(val.session(src).get_inputs(), (ids, mask))}
        table = Table(title="ONNX rewrites, validated in onnxruntime (same inputs)")
        for col in ("model", "sites rewritten", "check", "ORT time (ms)", "speed vs original"):
            table.add_column(col)
        base = _ort_time(src, feeds)
        table.add_row("original", "-", "-", f"{base * 1e3:.2f}", "1.00x")
        rows = [{"model": "original", "ort_ms": base * 1e3, "sites": len(found.report.sites), "export_max_abs": exported.max_abs}]
        ok = len(found.report.sites) > 0
        for to, kw in (("fused", {"target": "ort"}), ("ssmax", {"s": 0.43})):
            step(f"rewriting --to {to} and validating in onnxruntime")
            dst = tmpdir / f"tiny_gpt.{to}.onnx"
            res = attnpass_onnx.rewrite(src, dst, to=to, inputs=feeds, **kw)
            check = res.validation if to == "fused" else res.self_test
            worst = max((o.max_abs for o in check.outputs), default=float("nan")) if check is not None else float("nan")
            label = "matches original" if to == "fused" else "s=0,b=1 self-test matches; no NaN"
            t = _ort_time(dst, feeds)
            table.add_row(f"--to {to}", f"{len(res.rewritten)}/{len(res.report.sites)}", f"{label} (max |err| {worst:.1e})",
                          f"{t * 1e3:.2f}", f"{base / t:.2f}x")
            ok = ok and res.written is not None and len(res.rewritten) == len(res.report.sites)
            rows.append({"model": f"--to {to}", "ort_ms": t * 1e3, "rewritten": len(res.rewritten), "check_max_abs": worst})
    console.print(table)
    return ok, rows
