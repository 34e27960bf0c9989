"""``ai-service worker <op>``: run one worker process (what supervisord runs).

The operation's module (its spec's ``worker_module``) is imported by name only here, so
the rest of the CLI never imports the workers and starts without torch or Ultralytics.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from ai_service.config import ConfigError, Settings
from ai_service.registry import OPERATIONS, OperationSpec, Registry

if TYPE_CHECKING:
    from ai_service.operation import Operation

EXIT_USAGE = 2

#: operation name -> module that defines ``operation(settings)`` (bench/instrumented.py reads it).
WORKER_MODULES = {spec.name: spec.worker_module for spec in OPERATIONS}


def add_worker(sub: Any, operations: Registry) -> None:
    """``worker OP``: one of the registry's operations."""
    worker = sub.add_parser(
        "worker", help="run one worker process (what supervisord runs)",
        description="Consume the operation's request queue until SIGTERM (warm stop) or a second signal.",
    )
    worker.add_argument("op", choices=sorted(operations.names()), help="which operation this worker serves")
    worker.set_defaults(func=None)


def load_operation(spec: OperationSpec, settings: Settings) -> Operation:
    """The spec's worker module's ``operation(settings)`` (imports torch and friends)."""
    operation: Operation = importlib.import_module(spec.worker_module).operation(settings)
    return operation


def cmd_worker(args: argparse.Namespace, operations: Registry = OPERATIONS) -> int:
    """Run the spec's worker until it stops; exit 2 on bad configuration."""
    spec = operations[args.op]
    try:
        settings = Settings.from_env().for_program(spec.name)
    except ConfigError as exc:
        print(f"ai-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from ai_service.logs import setup_logging
    from ai_service.worker import run_worker

    setup_logging(settings, op=spec.name)
    # supervisord marks its children with SUPERVISOR_ENABLED: a disabled worker then
    # outlives `startsecs`, so its exit counts as the expected, final one.
    supervised = bool(os.environ.get("SUPERVISOR_ENABLED"))
    code = run_worker(settings, spec.name, lambda s: load_operation(spec, s), supervised=supervised,
                      operations=operations)
    return exit_now_if_forced(code)


def exit_now_if_forced(code: int) -> int:
    """A forced stop must not wait for the job thread still running: leave at once."""
    from ai_service.worker import EXIT_FORCED

    if code == EXIT_FORCED:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code
