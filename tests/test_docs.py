"""The documentation stays true: the CLI reference is what the parser says, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attnpass import cli_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
#: ``[text](target)`` and ``![alt](target)``; the target stops at whitespace or ``)``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REGENERATE = "python -m attnpass.cli_reference -o docs/cli.md"


def test_cli_reference_matches_the_parser() -> None:
    path = ROOT / "docs" / "cli.md"
    assert path.exists(), f"docs/cli.md is missing: run `{REGENERATE}`"
    assert path.read_text() == cli_reference.render(), f"docs/cli.md is out of date with the CLI: run `{REGENERATE}`"


def test_cli_reference_names_every_command_and_visible_flag() -> None:
    """The generator itself must not drop anything: every sub-command and every shown flag is in the text."""
    import argparse

    from attnpass.cli import build_parser

    text = cli_reference.render()
    parser = build_parser()
    commands = cli_reference._commands(parser)
    assert {name for name, _, _ in commands} >= {"demo", "inspect", "rewrite", "validate", "export"}
    for name, _, sub in commands:
        assert f"## attnpass {name}" in text
        section = text.split(f"## attnpass {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                if action.help == argparse.SUPPRESS:
                    assert f"`{flag}`" not in section, f"hidden flag {flag} of {name} is documented"
                else:
                    assert f"`{flag}`" in section, f"{flag} of {name} missing from docs/cli.md"


def test_cli_reference_writes_atomically(tmp_path) -> None:
    out = tmp_path / "cli.md"
    assert cli_reference.main(["-o", str(out)]) == 0
    assert out.read_text() == cli_reference.render()
    assert [p.name for p in tmp_path.iterdir()] == ["cli.md"]


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return LINK.findall(text)


def test_the_docs_have_links_to_check() -> None:
    assert any("docs/architecture.md" in link for link in _links(ROOT / "README.md"))
    assert _links(ROOT / "docs" / "cli.md"), "the CLI reference's command table links to its sections"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(path: Path) -> None:
    """README and docs/ point only at files in the repository (and at headings that exist)."""
    bad = []
    for link in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: — not files of ours
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists() or ROOT not in (file, *file.parents):
            bad.append(f"{link} (no such file in the repository)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(f"{link} (no heading #{anchor} in {file.name})")
    assert not bad, f"{path.relative_to(ROOT)}: broken links: {bad}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_link_checker_catches_a_broken_link(tmp_path) -> None:
    """The checker above must see what a broken link looks like, or its green means nothing."""
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) ![img](missing.png) [web](https://example.org)\n```\n[code](nowhere.md)\n```\n")
    assert _links(page) == ["page.md", "missing.png", "https://example.org"]
