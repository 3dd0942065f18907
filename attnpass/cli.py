"""``attnpass`` command line: one sub-command per module in ``attnpass/commands``.

Every command reports bad input as one line naming the file or node, exits 2, and writes
nothing; ``--debug`` shows the traceback instead.  An unexpected exception (a bug of ours) is one
line too, with exit code 3.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence

from attnpass.errors import AttnpassError

# Modules under attnpass.commands that add sub-commands; each has register(subparsers).
COMMAND_MODULES = ("demo", "onnx", "mlir")


class _Formatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the text already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


DEBUG_HELP = "show tracebacks instead of one-line errors"
JSON_HELP = "print JSON instead of tables, for the sub-commands that have --json (also accepted after the sub-command)"


def build_parser() -> argparse.ArgumentParser:
    from attnpass import __version__

    parser = argparse.ArgumentParser(
        prog="attnpass",
        description="Find softmax-in-attention in torch / ONNX / MLIR graphs and rewrite it to SSMax or fused attention.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"attnpass.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("attnpass.commands"):
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():
        command.formatter_class = _Formatter
        # after the sub-command too (``attnpass rewrite ... --debug``); SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        for action in command._actions:
            if "--json" in action.option_strings:  # as --debug: a --json given before the sub-command is kept
                action.default = argparse.SUPPRESS
    return parser


def _has_json(parser: argparse.ArgumentParser, command: str) -> bool:
    """Whether sub-command ``command`` takes ``--json`` (a ``--json`` before one that does not is a usage error)."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return any("--json" in a.option_strings for a in sub.choices[command]._actions)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.json and not _has_json(parser, args.command):
        parser.error(f"{args.command} has no --json output")
    try:
        with contextlib.nullcontext() if args.debug else _quiet():
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a reader gone (``| head``) shows here, where it is handled, not at interpreter exit
            return code
    except BrokenPipeError:  # not a bug of ours, and nobody is left to read a message on stdout
        _drop_stdout()
        return 141  # as a command killed by SIGPIPE
    except AttnpassError as e:
        if args.debug:
            raise
        print(f"attnpass {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnpass: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: still one line (and exit 3, so it is told apart from bad input)
        if args.debug:
            raise
        text = " ".join(str(e).split())[:300]
        print(f"attnpass {args.command}: internal error: {type(e).__name__}: {text} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 3


def _drop_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise BrokenPipeError again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file descriptor
        pass


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep stderr to our one line: onnx-ir, onnxscript and torch log warnings (with tracebacks) about
    the very models we then reject with a clear message; ``--debug`` keeps them.  Restored on exit, so
    ``main`` called in-process leaves the caller's logging and warning filters as they were."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch", "onnx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
