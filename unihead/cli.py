"""The ``unihead`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unihead",
        description=(
            "One classification-head spec, the same numbers in PyTorch, JAX and Keras. "
            "Run a subcommand with --help for its options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"unihead {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)  # pragma: no cover - subcommands arrive with later issues


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
