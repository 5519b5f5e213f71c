"""Render the CLI reference (docs/cli.md) from the command table, so it cannot go stale.

    python docs/gen_cli.py          # rewrite docs/cli.md
    python docs/gen_cli.py --check  # exit 1 if docs/cli.md differs from what the CLI says

Each command of ``core.cli.COMMANDS`` gets a section holding its argparse help, rendered at a
fixed width; tests/test_docs_examples.py checks that the committed file equals the rendering.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "cli.md"
WIDTH = "100"

HEADER = """# CLI reference

Generated from the command table (`core/cli/__init__.py`, `COMMANDS`) by `python docs/gen_cli.py`;
a test fails when this page and the CLI differ. The same text is `spectrascope COMMAND --help`.
The guides show the commands at work: [Analyse](analyse.md), [Allocate](allocate.md),
[Prune and evaluate](prune.md), [Sweep and tune](sweep-tune.md), [Does alpha help?](sensitivity.md),
[Compare](compare.md).

"""


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().rstrip() + "\n"


def render() -> str:
    """The whole page: ``spectrascope --help``, then each command's help, in the table's order."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from core.cli import COMMANDS, build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH        # argparse wraps at the terminal's width: fix it
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = [HEADER, "## spectrascope\n\n```text\n", _help(parser), "```\n"]
        for name, command in COMMANDS.items():
            parts += [f"\n## {name}\n\n{command.help[0].upper()}{command.help[1:]}.\n\n```text\n",
                      _help(sub.choices[name]), "```\n"]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv == ["--check"]:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
