"""Site reports as terminal tables and JSON: the product surface users read and scripts parse."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from attnpass.passes.match import Report


def sites_table(report: Report, title: str = "attention sites") -> Table:
    table = Table(title=title)
    for col in ("#", "node", "form", "scale", "mask", "causal", "softcap", "heads (kv)", "fusable / why not", "notes"):
        table.add_column(col)
    for s in report.sites:
        heads = "?" if s.heads is None else f"{s.heads} ({s.kv_heads})"
        scale = "-" if s.scale is None else f"{s.scale:.4g}"
        table.add_row(
            str(s.index), s.name, s.form, scale, s.mask_kind, "yes" if s.causal else "no",
            "-" if s.softcap is None else f"{s.softcap:g}", heads,
            "yes" if s.fusable else f"no: {s.fuse_blocker}", "; ".join(s.notes),
        )
    for k in report.skipped:
        table.add_row("-", k.name, "not attention", "", "", "", "", "", "", k.reason, style="dim")
    if not report.sites and not report.skipped:
        table.caption = "no attention found"
    return table


def topk_table(report: Report, title: str = "softmax -> top-k / max / argmax sites (routers, heads)") -> Table:
    """The selection sites (``passes/topk.py``): what each picks, and whether it fuses or why not."""
    table = Table(title=title)
    for col in ("#", "softmax", "picks", "k", "axis", "renormalised", "fusable / why not", "notes"):
        table.add_column(col)
    for t in report.topk:
        table.add_row(str(t.index), t.name, str(t.form), "-" if t.k is None else str(t.k), str(t.axis),
                      "yes" if t.renormalize else "no", "yes" if t.fusable else f"no: {t.blocker}", "; ".join(t.notes))
    return table


def report_dict(report: Report) -> dict[str, Any]:
    return {
        "sites": [s.summary() for s in report.sites],
        "skipped": [{"node": k.name, "reason": k.reason} for k in report.skipped],
        "topk": [t.summary() for t in report.topk],
    }


def report_json(report: Report) -> str:
    return json.dumps(report_dict(report), indent=2, default=str)
