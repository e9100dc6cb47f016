"""The ``samullm`` command line: one sub-command module per role, registered here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from coordinator import cli_estimate, cli_plan, cli_profile, cli_run, cli_service

COMMANDS = (cli_estimate, cli_plan, cli_profile, cli_run, cli_service)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="samullm",
        description="Plan and run offline inference of multi-LLM applications.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samullm`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
