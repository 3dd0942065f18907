"""Print the variant x IR table (found / fused / SSMax) as markdown, from the same cells the test runs.

Each cell reads ``found/sites fused/fusable SSMax``: e.g. ``1/1 1/1 ✓``.  A check that fails prints ``✗`` and its
message goes to the notes under the table (the test, ``tests/test_variant_table.py``, holds each such cell as an
expected exception with that reason).  ``—``: the IR is not run for that row (MLIR from ONNX: hand-written only).

Run:  python benchmarks/variant_table.py [--only NAME,NAME] [--irs fx,onnx-ts,...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import table_cells as tc  # noqa: E402


def cell_text(v: tc.Variant, got: dict[str, str | None]) -> str:
    found = f"{v.sites}/{v.sites}" if got["found"] is None else "✗"
    fused = f"{v.n_fused}/{v.sites}" if got["fused"] is None else "✗"
    ssmax = "✓" if got["ssmax_id"] is None and got["ssmax"] is None else "✗"
    return f"{found} {fused} {ssmax}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--irs", default=",".join(tc.IRS), help="comma-separated IRs")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    only = set(filter(None, a.only.split(",")))
    irs = [ir for ir in a.irs.split(",") if ir in tc.IRS]
    table = tc.Table()
    notes: list[str] = []
    start = time.time()
    print("| variant | " + " | ".join(irs) + " |")
    print("|---|" + "---|" * len(irs))
    for v in tc.variants():
        if only and v.name not in only:
            continue
        row = []
        for ir in irs:
            if ir not in v.irs:
                row.append("—")
                continue
            got = tc.run_cell(table, v, ir)
            row.append(cell_text(v, got))
            for check, why in got.items():
                if why is not None:
                    notes.append(f"- {v.name} / {ir} / {check}: {why[:160]}")
        print(f"| {v.name} | " + " | ".join(row) + " |", flush=True)
    print("\ncell: sites found / sites fused (of found) / SSMax (s=0,b=1 identity and s=0.43 reference)")
    if notes:
        print("\nfailed checks (expected exceptions in tests/test_variant_table.py):")
        print("\n".join(notes))
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
