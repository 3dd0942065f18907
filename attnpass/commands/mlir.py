"""``attnpass mlir model.onnx --to ssmax|fused --emit torch|linalg|llvm|so -o out.mlir``.

Imports the ONNX file (or reads torch-dialect ``.mlir`` text) with torch-mlir, rewrites its
attention, lowers it to the requested level and writes the MLIR text.  The output goes to a
temporary file in the target directory and is renamed into place, so a failed run never
leaves a half-written file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from attnpass.commands.flags import add_rewrite_flags, spec_from_args
from attnpass.errors import AttnpassError
from attnpass.progress import steps


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mlir", help="rewrite attention in an ONNX model as torch-dialect MLIR and lower it (torch-mlir)",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("model", help="an .onnx file, or torch-dialect .mlir text")
    add_rewrite_flags(p, choices=("ssmax", "fused", "none"), default="fused", fused_alias=True)
    p.add_argument("--emit", choices=("torch", "linalg", "llvm", "so"), default="torch",
                   help="IR level to write, or so: a native shared library (needs -o and a C compiler)")
    p.add_argument("-o", "--output", help="output .mlir (or .so) path (default: stdout)")
    p.add_argument("--tile", type=int, default=None, help="keys per loop iteration of the fused lowering")
    p.add_argument("--force", action="store_true",
                   help="write the output even if no attention is found or none could be rewritten to the requested --to")
    p.add_argument("--json", action="store_true", help="print the site report as JSON (needs -o: stdout is free then)")
    p.set_defaults(func=run)


def _load(path: str):
    from attnpass import mlir as am

    if not os.path.exists(path):
        raise AttnpassError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise AttnpassError(f"{path}: not a file")
    if path.endswith(".mlir"):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise AttnpassError(f"{path}: not readable MLIR text ({type(e).__name__})") from e
        try:
            return am.copy(text)
        except AttnpassError as e:
            raise AttnpassError(f"{path}: {e}") from e
    return am.import_(path)


def _check_output(path: str) -> None:
    """A missing or unwritable output folder is reported before minutes of import and lowering."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise AttnpassError(f"{path}: is a directory (give a file name with -o)")
    if not os.path.exists(parent):
        raise AttnpassError(f"{path}: output directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise AttnpassError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AttnpassError(f"{path}: cannot write to {parent} (permission denied)")


def _umask() -> int:
    """The process umask (read by setting it, then restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run(args: argparse.Namespace) -> int:
    from attnpass import mlir as am

    if args.json and not args.output:
        raise AttnpassError("--json needs -o: without it, stdout carries the MLIR text")
    if args.emit == "so" and not args.output:
        raise AttnpassError("--emit so needs -o model.so: a shared library is not written to stdout")
    if args.output:
        _check_output(args.output)  # before the import and lowering, which take a while
    spec = None if args.to == "none" else spec_from_args(args)
    with steps(total=3, enabled=not args.json) as step:
        step(f"importing {args.model} (torch-mlir)")
        mod = _load(args.model)
        report = am.find(mod)
        result = None
        if spec is not None:
            step(f"rewriting attention --to {spec.label}")
            try:
                mod, result = am.rewrite(mod, spec=spec, tile=args.tile, with_report=True)
                report = result.report
            except AttnpassError as e:
                raise AttnpassError(f"{args.model}: {e}") from e
            why = None if args.force else _nothing_rewritten(result)
            if why is not None:
                return _nothing_written(args, why)
        step(f"lowering to {args.emit}")
        try:
            if args.emit == "so":
                return _write_library(args, am, mod, report, result, spec)
            out = am.lower(mod, emit=args.emit)
        except AttnpassError as e:
            raise AttnpassError(f"{args.model}: {e}") from e
    text = str(out.operation if hasattr(out, "operation") else out)
    for site in [] if args.json else report.sites:
        state = "fusable" if site.fusable else f"left alone: {site.fuse_blocker}"
        rel = "" if site.relative is None else f" q scaled by {site.relative.describe()}"
        print(f"site {site.index} {site.name}: mask={site.mask_kind} causal={site.causal} {state}{rel}", file=sys.stderr)
    for sk in [] if args.json else report.skipped:
        print(f"skipped {sk.name}: {sk.reason}", file=sys.stderr)
    if not args.output:
        sys.stdout.write(text)
        return 0
    target = os.path.abspath(args.output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".attnpass-", suffix=".mlir", dir=os.path.dirname(target))
    except OSError as e:
        raise AttnpassError(f"{args.output}: cannot write ({e.strerror or type(e).__name__}); nothing written") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; an output is as readable as any file the user writes
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise AttnpassError(f"{args.output}: cannot write ({e.strerror or type(e).__name__}); nothing written") from e
        raise
    label = "none" if spec is None else spec.label
    print(f"wrote {args.output} ({len(report.sites)} attention site(s), --to {label}, --emit {args.emit})", file=sys.stderr)
    if args.json:
        from attnpass.report import report_dict
        from attnpass.result import dumps

        data = report_dict(report) if result is None else result.as_dict()
        print(dumps({**data, "written": args.output, "to": label, "emit": args.emit}))
    return 0


def _nothing_rewritten(result) -> str | None:
    """Why the rewrite changed nothing (as ``attnpass rewrite`` decides it), or ``None`` when it changed something:
    an unchanged copy is no more use than one of a model without attention."""
    spec, report = result.spec, result.report
    topk_done = spec.to == "fused" and not spec.fused_ssmax and any(t.fusable for t in getattr(report, "topk", ()))
    if topk_done or result.rewritten:
        return None
    if not report.sites:
        return "no attention found"
    why = "; ".join(f"site {i}: {r}" for i, r in sorted(result.left.items()))
    return f"{len(report.sites)} attention site(s) found but none could be rewritten to {spec.label} ({why})"


def _nothing_written(args: argparse.Namespace, why: str) -> int:
    """Say so, write nothing (not even to stdout, where the MLIR text would go), exit 0.  The line goes to stderr
    with this command's other messages; ``--json`` prints ``written: null`` as ``rewrite`` does."""
    if args.json:
        from attnpass.result import dumps

        print(dumps({"written": None, "sites": [], "message": why}, indent=None))
    else:
        where = f"{why} in {args.model}" if why == "no attention found" else f"{args.model}: {why}"
        print(f"{where}; nothing written (use --force to write it anyway)", file=sys.stderr)
    return 0


def _write_library(args: argparse.Namespace, am, mod, report, result, spec) -> int:
    """``--emit so``: the native library (written whole or not at all by ``compile_library``)."""
    sig = am.compile_library(mod, args.output)
    label = "none" if spec is None else spec.label
    print(f"wrote {args.output} ({len(report.sites)} attention site(s), --to {label}, --emit so: "
          f"{len(sig.inputs)} input(s), entry attnpass_run)", file=sys.stderr)
    if args.json:
        import json

        from attnpass.report import report_dict
        from attnpass.result import dumps

        data = report_dict(report) if result is None else result.as_dict()
        print(dumps({**data, "written": args.output, "to": label, "emit": "so", "signature": json.loads(sig.to_json())}))
    return 0
