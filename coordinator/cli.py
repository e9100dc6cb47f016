"""The ``samullm`` command line: one sub-command module per role, registered here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from coordinator import cli_estimate, cli_plan, cli_profile, cli_run, cli_service

COMMANDS = (cli_estimate, cli_plan, cli_profile, cli_run, cli_service)
# Sub-commands that run vLLM: this process execs ``python -m <module> <their arguments>``, which
# parses them (the coordinator package never imports workers or vllm).
WORKER_COMMANDS = {
    "profile": ("workers.profile_cmd", "measure a model on this machine's vLLM, write its profile"),
    "lengths": ("workers.lengths_cmd", "observe a model's output lengths, fit their distribution"),
}


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
    for name, (target, text) in WORKER_COMMANDS.items():
        p = sub.add_parser(name, help=text, add_help=False)  # --help goes to the module
        p.set_defaults(func=exec_worker_command, module=target, rest=[])
    return parser


def exec_worker_command(args: argparse.Namespace) -> int:
    """Replace this process with ``python -m <module> <rest>``."""
    argv = [sys.executable, "-m", args.module, *args.rest]
    os.execv(sys.executable, argv)
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samullm`` console script; returns the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in WORKER_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
