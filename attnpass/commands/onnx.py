"""ONNX sub-commands: ``inspect``, ``rewrite``, ``validate``, ``export``.

onnx, onnx-ir and onnxruntime are imported inside the handlers so ``attnpass --help`` stays fast.
Errors are ``AttnpassError`` (one line, exit 2, nothing written); a model without attention is
not an error: ``rewrite`` says "no attention found", exits 0 and writes nothing unless ``--force``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from attnpass.commands.flags import add_rewrite_flags, spec_from_args
from attnpass.errors import AttnpassError, NoAttentionFound
from attnpass.progress import steps
from attnpass.result import dumps

JSON_HELP = "print JSON instead of tables (strict JSON: NaN/inf as strings)"
PLAIN_HELP = "tables as plain text for scripts: tab-separated cells, full names, no box drawing or colour (a '# ' title line first)"
RTOL_HELP = "relative tolerance of the comparison in onnxruntime"
ATOL_HELP = "absolute tolerance of the comparison in onnxruntime"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list the attention sites of an .onnx model, its router / head sites "
                       "(softmax -> top-k / max / argmax) and the softmaxes left alone")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--plain", action="store_true", help=PLAIN_HELP)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("rewrite", help="rewrite an .onnx model's attention to SSMax or fused ops, validated in onnxruntime")
    p.add_argument("model", help="the .onnx model to rewrite (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the rewritten .onnx (written only if it validates)")
    add_rewrite_flags(p, required=True)
    p.add_argument("--target", choices=("ort", "onnx23"), default="ort",
                   help="fused op: com.microsoft.MultiHeadAttention (ort) or opset-23 Attention (onnx23)")
    p.add_argument("--inputs", default=None, help=".npz of feeds for validation (default: generated)")
    p.add_argument("--rtol", type=float, default=1e-4, help=RTOL_HELP)
    p.add_argument("--atol", type=float, default=1e-4, help=ATOL_HELP)
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--force", action="store_true",
                   help="write the output even if no attention is found or (--to fused) nothing could be fused")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--plain", action="store_true", help=PLAIN_HELP)
    p.set_defaults(func=_rewrite)

    p = sub.add_parser("validate", help="compare two .onnx models' outputs in onnxruntime")
    p.add_argument("a", help="the reference .onnx model")
    p.add_argument("b", help="the .onnx model compared with it")
    p.add_argument("--inputs", default=None, help=".npz of feeds, one array per input name (default: generated)")
    p.add_argument("--rtol", type=float, default=1e-4, help=RTOL_HELP)
    p.add_argument("--atol", type=float, default=1e-4, help=ATOL_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_validate)

    p = sub.add_parser("export", help="export a torch model (module:factory returning (model, args[, kwargs])) to ONNX")
    p.add_argument("factory", help="python path 'pkg.module:callable' returning (model, args) or (model, args, kwargs)")
    p.add_argument("-o", "--output", required=True, help="where to write the .onnx (written only if it matches torch)")
    add_rewrite_flags(p, choices=("ssmax", "fused", "none"), default="none")
    p.add_argument("--rewrite", dest="to", choices=("ssmax", "fused", "fuse", "none"), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_export)


#: Width of tables written to a pipe or a file: rich would cut them at 80 columns, truncating node names and
#: reasons that scripts grep for; a table is as wide as its longest cell, never padded to this.
PIPE_WIDTH = 100_000


def _console(plain: bool = False):
    from rich.console import Console

    if plain:  # lines as written: no colour, no highlighting of numbers and paths, no wrapping
        return Console(width=PIPE_WIDTH, no_color=True, highlight=False, markup=False, emoji=False, soft_wrap=True)
    con = Console()
    return con if con.is_terminal else Console(width=PIPE_WIDTH)


def _cell_text(cell: Any) -> str:
    """A cell as one field: rich ``Text`` without its styling, tabs and line breaks folded to spaces."""
    return " ".join(str(getattr(cell, "plain", cell)).split())


def plain_table(table: Any) -> str:
    """A rich ``Table`` as tab-separated lines: ``# title``, the header, one line per row, every cell whole.  The
    ``#`` column is headed ``index`` here, so that only the title line starts with ``#`` (scripts skip it)."""
    columns = list(table.columns)
    lines = [f"# {_cell_text(table.title)}"] if table.title else []
    lines.append("\t".join("index" if _cell_text(c.header) == "#" else _cell_text(c.header) for c in columns))
    cells = [list(c.cells) for c in columns]
    lines += ["\t".join(_cell_text(col[i]) for col in cells) for i in range(table.row_count)]
    return "\n".join(lines)


def _show(con: Any, table: Any, plain: bool) -> None:
    if plain:  # not through rich, which expands tabs to spaces
        print(plain_table(table), file=con.file, flush=True)
    else:
        con.print(table)


def _table(rows: list[dict[str, Any]], skipped: list[dict[str, str]], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("#", "node", "form", "scale", "mask", "heads (kv)", "fusable / why not", "notes"):
        t.add_column(col)
    for r in rows:
        why = r.get("why_left") or r.get("why_not_fusable")
        t.add_row(str(r["index"]), r["node"], r["form"], "-" if r["scale"] is None else f"{r['scale']:.4g}", r["mask"],
                  f"{r['heads']} ({r['kv_heads']})", "yes" if not why else f"no: {why}", "; ".join(r["notes"]))
    for k in skipped:
        t.add_row("-", k["node"], "not attention", "", "", "", "", k["reason"], style="dim")
    return t


def _inspect(args: argparse.Namespace) -> int:
    import attnpass.onnx as aonnx

    rep = aonnx.find(args.model)
    data = rep.as_dict()
    if args.json:
        print(dumps(data))
        return 0
    con = _console(args.plain)
    if not rep.sites:
        con.print("no attention found")
    _show(con, _table(data["sites"], data["skipped"], f"{args.model}: {len(rep.sites)} attention site(s)"), args.plain)
    if rep.report.topk:
        from attnpass.report import topk_table

        _show(con, topk_table(rep.report, f"{args.model}: {len(rep.report.topk)} softmax -> top-k / max / argmax site(s)"),
              args.plain)
    return 0


def _rewrite(args: argparse.Namespace) -> int:
    import attnpass.onnx as aonnx

    try:
        with steps(total=4, enabled=not args.json) as step:
            res = aonnx.rewrite(args.model, args.output, spec=spec_from_args(args, target=args.target),
                                validate=not args.no_validate, inputs=args.inputs, rtol=args.rtol, atol=args.atol,
                                force=args.force, progress=step)
    except NoAttentionFound as e:
        message = str(e)
        if args.json:
            print(dumps({"written": None, "sites": [], "message": message}, indent=None))
        else:
            where = f"{message} in {args.model}" if type(e) is NoAttentionFound else f"{args.model}: {message}"
            print(f"{where}; nothing written (use --force to write a copy)")
        return 0
    data = res.as_dict()
    if args.json:
        print(dumps(data))
        return 0
    con = _console(args.plain)
    if not res.report.sites:
        con.print("no attention found")
    _show(con, _table(data["sites"], data["skipped"], f"{args.model} -> {args.output}: {res.headline()}"), args.plain)
    against = "unfused SSMax" if res.to == "fused+ssmax" else "original"
    for label, rep in (("self-test (s=0, b=1) vs original", res.self_test), (f"rewritten vs {against}", res.validation)):
        if rep is not None:
            for o in rep.outputs:
                con.print(f"{label}: {_output_line(o, rep)}", markup=False, highlight=False)
    con.print(f"wrote {res.written}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from attnpass.validate import validate

    for p in (args.a, args.b):
        if not Path(p).exists():
            raise AttnpassError(f"{p}: no such file")
    import attnpass.onnx as aonnx

    aonnx.load(args.a), aonnx.load(args.b)  # clear errors for non-ONNX files
    rep = validate(args.a, args.b, inputs=args.inputs, rtol=args.rtol, atol=args.atol)
    if args.json:
        print(dumps(rep.as_dict()))
    else:
        for o in rep.outputs:
            print(_output_line(o, rep))
        print("PASS" if rep.passed else "FAIL")
    return 0 if rep.passed else 1


def _output_line(o: Any, rep: Any) -> str:
    """One compared output: its errors against the tolerance, the reason when the outputs could not be compared,
    and no verdict on the numbers when there was no tolerance (SSMax against its original)."""
    if o.reason and not math.isfinite(o.max_abs):
        return f"{o.name}: not compared: {o.reason}, FAIL"
    nums = f"{o.name}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}"
    if not rep.bounded:
        line = f"{nums} (no tolerance: SSMax changes the outputs on purpose), {'finite' if o.finite else 'NaN/inf: FAIL'}"
    else:
        line = f"{nums} (rtol {rep.rtol:g}, atol {rep.atol:g}), {'ok' if o.ok else 'FAIL'}"
    return f"{line} ({o.reason})" if o.reason else line


def torch_module() -> type:
    import torch

    return torch.nn.Module


def _export(args: argparse.Namespace) -> int:
    import importlib
    import os
    import sys

    from attnpass.lowering.onnx_export import export

    mod_name, _, attr = args.factory.partition(":")
    if not attr:
        raise AttnpassError(f"{args.factory}: expected 'pkg.module:callable'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m`: a module next to the user is importable (console scripts lack it)
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise AttnpassError(f"{args.factory}: {e}") from e
    try:
        made = fn()
    except Exception as e:
        raise AttnpassError(f"{args.factory}: the factory raised {type(e).__name__}: {e}") from e
    if not isinstance(made, tuple | list) or len(made) not in (2, 3) or not isinstance(made[0], torch_module()):
        raise AttnpassError(f"{args.factory}: must return (model, args) or (model, args, kwargs) with an nn.Module, "
                            f"got {type(made).__name__}")
    model, margs = made[0], made[1]
    kwargs = made[2] if len(made) > 2 else None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise AttnpassError(f"{args.factory}: kwargs must be a dict, got {type(kwargs).__name__}")
    with steps(total=1, enabled=not args.json) as step:
        step(f"exporting {type(model).__name__} and checking it in onnxruntime")
        spec = None if args.to == "none" else spec_from_args(args)
        res = export(model, margs, kwargs, args.output, spec=spec)
    if args.json:
        print(dumps(res.as_dict()))
    else:
        print(f"wrote {args.output}: max abs error vs torch {res.max_abs:.3g} ({'ok' if res.ok else 'FAIL'})")
    return 0 if res.ok else 1
