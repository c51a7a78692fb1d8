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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from unihead.conformance.cli import add_arguments as conformance_arguments
    from unihead.conformance.cli import run_command as conformance_command

    p = sub.add_parser(
        "conformance",
        help="check every installed backend against the independent reference (the main job)",
        description="Run the conformance suite on every installed backend and print the matrix; "
                    "exit 0 only if every installed backend passes.",
    )
    conformance_arguments(p)
    p.set_defaults(func=conformance_command)

    from ._cli_heads import add_diagnose, add_port

    add_diagnose(sub)
    add_port(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns its exit status: 0, 1 (the head has an error, or the model could
    not be read or ported: unihead's message on stderr) or 2 (a usage error: the message says
    what to write instead)."""
    from ._cli_heads import UsageError
    from .errors import BackendNotAvailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"unihead {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, BackendNotAvailableError) as e:
        # unihead's own errors (HeadSpecError, HeadFileError, PortCheckError are ValueErrors) and
        # the readers' ("No nn.Linear found ..."): their messages say what is wrong and the fix
        print(f"unihead {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
