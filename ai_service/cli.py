"""The ``ai-service`` command.

``worker train|convert|infer`` runs a worker; the operation's module is imported by name
(``workers.<module>``), so this package never imports the workers statically and the
BE-side subcommands start without torch or Ultralytics.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from ai_service.config import ConfigError, Settings
from ai_service.logs import setup_logging
from ai_service.operation import Operation

#: operation name -> module under ``workers`` that defines ``operation()``.
WORKER_MODULES = {"train": "workers.training", "convert": "workers.conversion", "infer": "workers.inference"}

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ai-service",
        description="YOLO training, conversion and inference workers driven by RabbitMQ.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = sub.add_parser("worker", help="run one worker process (what supervisord runs)")
    worker.add_argument("op", choices=sorted(WORKER_MODULES), help="which operation this worker serves")
    return parser


def cmd_worker(args: argparse.Namespace) -> int:
    try:
        # under supervisord the program is its process name (train-gpu0), else the op
        program = os.environ.get("SUPERVISOR_PROCESS_NAME") or args.op
        settings = Settings.from_env().for_program(program)
    except ConfigError as exc:
        print(f"ai-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings, op=args.op)
    from ai_service.worker import run_worker

    def load(settings: Settings) -> Operation:
        operation: Operation = importlib.import_module(WORKER_MODULES[args.op]).operation(settings)
        return operation

    supervised = os.environ.get("SUPERVISOR_ENABLED") == "1"
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
    logging.getLogger("ai_service").error("unknown command %s", args.command)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
