"""``rotation-operator``: parse the flags, run one subcommand, turn any error into one line
on stderr and an exit status (never a traceback)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rotation_operator.cli import output
from rotation_operator.cli.commands import COMMANDS
from rotation_operator.cli.exits import ExitStatus, as_package_error, exit_status
from rotation_operator.cli.parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":  # Kopf configures its own logging
        from rotation_operator.operator.runner import run_operator
        return run_operator(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(COMMANDS[args.command](args))
    except KeyboardInterrupt:
        output.interrupted()
        return ExitStatus.INTERRUPTED
    except Exception as exc:
        error = as_package_error(exc)
        output.error(str(error), error.reason)
        return exit_status(error)
