"""Every `fundus-edge ...` command in the README's quick start parses with the real CLI (flags and sub-commands
exist), and the quick start fits one screen before the first link to docs/."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fundus_edge.cli import make_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def _commands() -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    out = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("fundus-edge "):
                out.append(shlex.split(line)[1:])
    return out


def test_readme_has_commands_and_a_short_quick_start() -> None:
    text = README.read_text()
    assert len(_commands()) >= 4
    assert text[: text.index("docs/")].count("\n") <= 80


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a[:2]))
def test_readme_command_parses(argv: list[str]) -> None:
    parser = make_parser()
    if argv[:2] == ["quality", "calibrate"]:  # the calibrate parser is built inside the command
        from fundus_edge.cli.quality import calibrate_parser

        calibrate_parser().parse_args(argv[2:])
        return
    args = parser.parse_args(argv)
    assert callable(args.func)
