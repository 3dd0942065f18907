"""Print the variant x IR table (found / fused / SSMax) as markdown, from the same cells the test runs.

Each cell reads ``found/sites fused/sites SSMax``: e.g. ``1/1 1/1 ✓``.  A check that fails prints ``✗`` and its
message goes to the notes under the table (the test, ``tests/test_variant_table.py``, holds each such cell as an
expected exception with that reason).  ``—``: the IR is not run for that row (MLIR from ONNX: hand-written only);
``n/a (why)``: the IR cannot take the model for a reason outside attnpass (``Variant.not_applicable``).

With ``--spec``, a second table: the ONNX spec's own ``Attention`` test cases, the op and its expanded function body,
in ONNX and imported into MLIR (found / fused / SSMax(s=0, b=1) against onnxruntime on the case's own inputs).

Run:  python benchmarks/variant_table.py [--only NAME,NAME] [--irs fx,onnx-ts,...] [--spec]
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
    found = f"{v.sites}/{v.sites}" if got["found"] is None else f"{v.sites}/{v.sites}†" if "fact:" in got["found"] else "✗"
    fused = f"{v.n_fused}/{v.sites}" if got["fused"] is None else "✗"
    ssmax = "✓" if got["ssmax_id"] is None and got["ssmax"] is None else "✗"
    return f"{found} {fused} {ssmax}"


def spec_cells(path: Path, feeds: dict, tol: dict, target: str, op: bool, root: Path) -> dict[str, dict[str, str | None]]:
    """One ONNX spec ``Attention`` model (the op, or its expanded body) in ONNX and imported into MLIR."""
    import numpy as np
    import torch

    import attnpass.onnx as aonnx
    from attnpass import mlir as am
    from attnpass.validate import run

    rtol, atol = tol.get("rtol", 1e-4), tol.get("atol", 1e-4)
    want = run(path, feeds)

    def onnx_found() -> None:
        report = aonnx.find(path)
        assert len(report) == 1, f"{len(report)} sites; skipped: {[k.reason for k in report.skipped][:1]}"

    def onnx_fused() -> None:
        res = aonnx.rewrite(path, root / "fused.onnx", to="fused", target=target, inputs=feeds, **tol)
        assert len(res.rewritten) == 1 and res.validation.passed, res.left

    def onnx_id() -> None:
        res = aonnx.rewrite(path, root / "id.onnx", to="ssmax", s=0.0, bias=1.0, inputs=feeds, **tol)
        assert len(res.rewritten) == 1 and res.validation.passed, res.left

    args = tuple(torch.from_numpy(np.asarray(x)) for x in feeds.values())
    cache: dict = {}

    def imported():
        if "m" not in cache:
            cache["m"] = am.import_(str(path))
        return cache["m"]

    def mlir_found() -> None:
        report = am.find(imported())
        assert len(report.sites) == 1, f"{len(report.sites)} sites; skipped: {[k.reason for k in report.skipped][:1]}"

    def mlir_run(**kw) -> None:
        mod, res = am.rewrite(imported(), with_report=True, **kw)
        assert len(res.rewritten) == 1, res.left
        tc.close(am.compile(mod, opt_level=0)(*args), list(want.values())[0] if len(want) == 1 else list(want.values()),
                 rtol, atol, "MLIR vs onnxruntime")

    onnx_steps = {"found": onnx_found, "fused": (lambda: None) if op else onnx_fused, "ssmax_id": onnx_id, "ssmax": lambda: None}
    mlir_steps = {"found": mlir_found, "fused": lambda: mlir_run(to="fused"),
                  "ssmax_id": lambda: mlir_run(to="ssmax", s=0.0, b=1.0), "ssmax": lambda: None}
    return {"onnx": tc._run_checks(onnx_steps), "mlir-onnx": tc._run_checks(mlir_steps)}


def spec_table(notes: list[str]) -> None:
    """The ONNX spec's own Attention cases: the op and its expanded function body, in ONNX and in MLIR."""
    import tempfile

    from tests.test_onnx_spec_attention import SPECS, _case

    print("\n| ONNX spec case | ONNX expanded | ONNX op | MLIR expanded | MLIR op |")
    print("|---|---|---|---|---|")
    for spec in SPECS:
        row = []
        by_ir: dict[str, list[str]] = {"onnx": [], "mlir-onnx": []}
        for op in (False, True):
            root = Path(tempfile.mkdtemp(prefix="spec_"))
            try:
                path, feeds, tol = _case(spec, not op, root)
                got = spec_cells(path, feeds, tol, spec.target, op, root)
            except Exception as e:  # noqa: BLE001 - a case that cannot even be built is a failed row
                got = {ir: dict.fromkeys(tc.CHECKS, tc._first_line(e)) for ir in by_ir}
            known = spec.op_ssmax_left if op else spec.expanded_blocker  # a reason the spec table expects
            for ir, checks in got.items():
                expect = spec.mlir_op_left if op and ir == "mlir-onnx" and spec.mlir_op_left else (known,) if known else ()
                if op and not spec.op_runs:
                    by_ir[ir].append("n/a (onnxruntime cannot run the op)")
                    continue
                by_ir[ir].append(" ".join("✓" if checks[c] is None else "left" if any(e in checks[c] for e in expect) else "✗"
                                          for c in ("found", "fused", "ssmax_id")))
                for c, why in checks.items():
                    if why is not None and not (op and not spec.op_runs):
                        notes.append(f"- {spec.export} {'op' if op else 'expanded'} / {ir} / {c}: {why[:160]}")
        row = by_ir["onnx"] + by_ir["mlir-onnx"]
        print(f"| {spec.export} | " + " | ".join(row) + " |", flush=True)
    print("\nspec cell: found / fused (the op: already fused) / SSMax(s=0, b=1) equals the original;"
          " left: not rewritten, with the reason the spec test expects")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--irs", default=",".join(tc.IRS), help="comma-separated IRs")
    ap.add_argument("--spec", action="store_true", help="also the ONNX spec's Attention cases (op and expanded)")
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
            na = tc.not_applicable_text(v, ir, got)
            row.append(na or cell_text(v, got))
            for check, why in got.items() if na is None else ():
                if why is not None:
                    notes.append(f"- {v.name} / {ir} / {check}: {why[:160]}")
        print(f"| {v.name} | " + " | ".join(row) + " |", flush=True)
    print("\ncell: sites found / sites fused (of found) / SSMax (s=0,b=1 identity and s=0.43 reference);"
          " †: found, but a reported fact (causal, GQA, KV heads) differs from fx")
    if a.spec:
        spec_table(notes)
    if notes:
        print("\nfailed checks (expected exceptions in tests/test_variant_table.py):")
        print("\n".join(notes))
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
