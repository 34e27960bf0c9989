"""The ``ai-service`` argument parser: one subcommand module each, operations from the registry."""

from __future__ import annotations

import argparse

from ai_service.cli import demo
from ai_service.cli.base import EXIT_CODES_HELP
from ai_service.cli.dlq import add_dlq
from ai_service.cli.documents import add_documents
from ai_service.cli.status import add_status
from ai_service.cli.submit import add_cancel, add_submit
from ai_service.cli.worker import add_worker
from ai_service.cli.workers import add_workers
from ai_service.dashboard import command as dashboard
from ai_service.registry import OPERATIONS, Registry


def build_parser(operations: Registry = OPERATIONS) -> argparse.ArgumentParser:
    """Every subcommand; ``submit``, ``worker``, ``status`` and ``dlq`` know ``operations``."""
    parser = argparse.ArgumentParser(
        prog="ai-service",
        description="YOLO training, conversion and inference workers driven by RabbitMQ, and the BE-side "
        "tools to talk to them. Settings come from the environment (see README / CONTRACT.md).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(operations=operations)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter
    add_worker(sub, operations)
    add_submit(sub, fmt, operations)
    add_cancel(sub, fmt)
    add_status(sub, fmt, operations)
    add_dlq(sub, fmt, operations)
    add_workers(sub, fmt)
    demo.add_parser(sub, fmt)
    dashboard.add_parser(sub, fmt)
    add_documents(sub, fmt)
    return parser
