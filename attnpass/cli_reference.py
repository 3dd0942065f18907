"""``docs/cli.md`` generated from the argparse parser, so the reference cannot drift from the flags.

Regenerate after changing a command or a flag:  ``python -m attnpass.cli_reference -o docs/cli.md``
(``tests/test_docs.py`` fails until the file matches).  The Markdown is built from the parser's actions
rather than from ``format_help()``, whose layout changes between Python versions and terminal widths.
Hidden flags (``help=argparse.SUPPRESS``: the older spellings kept for compatibility) are left out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

from attnpass.cli import build_parser

HEADER = """# attnpass command line reference

Generated from the argument parser by `python -m attnpass.cli_reference -o docs/cli.md`; do not edit by hand.
Every command reports bad input as one line naming the file or node and exits 2 (3 for an internal error);
`--debug` shows the traceback instead.
"""


def _cell(text: str) -> str:
    """Table-safe text: pipes escaped, whitespace folded to single spaces."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _argument(action: argparse.Action) -> str:
    """What follows the flag: its choices, its metavar, or nothing for a switch."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        name = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        name = "|".join(str(c) for c in action.choices)
    else:
        name = action.dest.upper()
    if action.nargs in ("*", "+"):
        name = f"{name} ..."
    return name


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.required:
        return ""
    return f"`{action.default}`"


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%(" in text:  # argparse's own substitutions, as --help would show them
        text = text % {**vars(action), "prog": parser.prog, "default": action.default}
    return _cell(text)


def _usage(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> str:
    parts = [parser.prog]
    for a in actions:
        arg = _argument(a)
        if not a.option_strings:
            parts.append(arg or a.dest)
            continue
        flag = f"{a.option_strings[-1]} {arg}".strip()
        parts.append(flag if a.required else f"[{flag}]")
    return " ".join(parts)


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.help != argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _table(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> list[str]:
    rows = ["| argument | value | default | meaning |", "|---|---|---|---|"]
    for a in actions:
        name = ", ".join(f"`{s}`" for s in a.option_strings) if a.option_strings else f"`{_argument(a) or a.dest}`"
        value = _argument(a) if a.option_strings else ""
        rows.append(f"| {name} | {_cell(f'`{value}`') if value else ''} | {_default(a)} | {_help(a, parser)} |")
    return rows


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) per sub-command, in registration order, aliases folded into their command."""
    out, seen = [], set()
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            if id(sub) not in seen:
                seen.add(id(sub))
                out.append((name, helps.get(name, ""), sub))
    return out


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference as Markdown."""
    parser = parser or build_parser()
    lines = [HEADER, "## attnpass", "", _cell(parser.description or ""), "", "```", _usage(parser, _visible(parser)) +
             " COMMAND ...", "```", "", *_table(parser, _visible(parser)), "", "| command | what it does |", "|---|---|"]
    commands = _commands(parser)
    lines += [f"| [`{name}`](#attnpass-{name}) | {_cell(text)} |" for name, text, _ in commands]
    for name, text, sub in commands:
        actions = _visible(sub)
        lines += ["", f"## attnpass {name}", "", _cell(sub.description or text), "", "```", _usage(sub, actions), "```", ""]
        lines += _table(sub, actions)
    return "\n".join(lines) + "\n"


def write(path: str) -> None:
    """Write ``render()`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cli_md_", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnpass.cli_reference", description="Print or write docs/cli.md.")
    p.add_argument("-o", "--output", help="write here instead of printing")
    args = p.parse_args(argv)
    if args.output:
        write(args.output)
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
