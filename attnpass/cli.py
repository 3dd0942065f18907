"""``attnpass`` command line: one sub-command per module in ``attnpass/commands``.

Every command reports bad input as one line naming the file or node, exits 2, and writes
nothing; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from attnpass.errors import AttnpassError

# Modules under attnpass.commands that add sub-commands; each has register(subparsers).
COMMAND_MODULES = ("demo", "onnx", "mlir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnpass",
        description="Find softmax-in-attention in torch / ONNX / MLIR graphs and rewrite it to SSMax or fused attention.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"attnpass.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("attnpass.commands"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except AttnpassError as e:
        if args.debug:
            raise
        print(f"attnpass {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnpass: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
