"""The command line, and the README's promises about it."""

from __future__ import annotations

import re
from pathlib import Path

import unihead
from unihead.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"unihead {unihead.__version__}"
    assert main([]) == 0
    assert "usage: unihead" in capsys.readouterr().out


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) == 2, "the README gives exactly two commands"
    test_command = blocks[1].strip()
    assert test_command.endswith("pytest")
    assert test_command in (ROOT / ".ci" / "run").read_text()
