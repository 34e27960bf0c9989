"""The ``ai-service`` command.

``worker train|convert|infer`` runs a worker; the operation's module is imported by name
(``workers.<module>``), so this package never imports the workers statically and the
BE-side subcommands (``submit``, ``cancel``, ``status``, ``dlq``, ``demo``,
``asyncapi``, in :mod:`ai_service.cli.commands`) start without torch or Ultralytics.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from ai_service.cli.commands import EXIT_CODES_HELP, add_commands, run_command
from ai_service.config import ConfigError, Settings

#: operation name -> module under ``workers`` that defines ``operation()``.
WORKER_MODULES = {"train": "workers.training", "convert": "workers.conversion", "infer": "workers.inference"}

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ai-service",
        description="YOLO training, conversion and inference workers driven by RabbitMQ, and the BE-side "
        "tools to talk to them. Settings come from the environment (see README / CONTRACT.md).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = sub.add_parser(
        "worker", help="run one worker process (what supervisord runs)",
        description="Consume the operation's request queue until SIGTERM (warm stop) or a second signal.",
    )
    worker.add_argument("op", choices=sorted(WORKER_MODULES), help="which operation this worker serves")
    worker.set_defaults(func=None)
    add_commands(sub)
    return parser


def cmd_worker(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env().for_program(args.op)
    except ConfigError as exc:
        print(f"ai-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from ai_service.logs import setup_logging
    from ai_service.operation import Operation
    from ai_service.worker import run_worker

    setup_logging(settings, op=args.op)

    def load(settings: Settings) -> Operation:
        operation: Operation = importlib.import_module(WORKER_MODULES[args.op]).operation(settings)
        return operation

    # supervisord marks its children with SUPERVISOR_ENABLED: a disabled worker then
    # outlives `startsecs`, so its exit counts as the expected, final one.
    supervised = bool(os.environ.get("SUPERVISOR_ENABLED"))
    return exit_now_if_forced(run_worker(settings, args.op, load, supervised=supervised))


def exit_now_if_forced(code: int) -> int:
    """A forced stop must not wait for the job thread still running: leave at once."""
    from ai_service.worker import EXIT_FORCED

    if code == EXIT_FORCED:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return cmd_worker(args)
    return run_command(args)
