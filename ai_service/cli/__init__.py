"""The ``ai-service`` command (rq's ``cli/``): one module per subcommand.

``worker <op>`` (:mod:`.worker`) runs a worker; the operation's module is imported by name
(its spec's ``worker_module``), so this package never imports the workers statically and
the BE-side subcommands start without torch or Ultralytics: ``submit`` and ``cancel``
(:mod:`.submit`, requests from :mod:`.payloads`, following from :mod:`.follow`),
``status`` (:mod:`.status`), ``dlq`` (:mod:`.dlq`), ``workers`` (:mod:`.workers`),
``demo`` (:mod:`.demo`), ``asyncapi``, ``openapi`` and ``supervisor-config``
(:mod:`.documents`). The parser (:mod:`.parser`) is built from the operation registry
(:mod:`ai_service.registry`); exit codes and shared helpers are in :mod:`.base`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ai_service.cli.base import run_command
from ai_service.cli.parser import build_parser
from ai_service.cli.worker import WORKER_MODULES, cmd_worker, exit_now_if_forced
from ai_service.registry import OPERATIONS, Registry

__all__ = ["WORKER_MODULES", "build_parser", "exit_now_if_forced", "main"]


def main(argv: Sequence[str] | None = None, operations: Registry = OPERATIONS) -> int:
    """Run ``ai-service`` with ``argv``; ``operations`` is the registry (a test adds a fake one)."""
    args = build_parser(operations).parse_args(argv)
    if args.command == "worker":
        return cmd_worker(args, operations)
    return run_command(args)
