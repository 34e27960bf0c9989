"""``ai-service dlq list|replay``: the dead-lettered requests of an operation."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ai_service.cli.base import EXIT_CODES_HELP, CommandError, ExitCode, check_job_id, connect, err
from ai_service.config import Settings
from ai_service.registry import Registry


def add_dlq(sub: Any, fmt: type[argparse.HelpFormatter], operations: Registry) -> None:
    """``dlq list`` and ``dlq replay``; QUEUE is an operation of the registry or a queue name."""
    p = sub.add_parser(
        "dlq", help="list or replay dead-lettered requests", formatter_class=fmt,
        description=f"QUEUE is an operation ({', '.join(operations.names())}) or a request queue's name;\n"
        "its dead letters are in <request queue>.dlq.",
        epilog=EXIT_CODES_HELP,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = actions.add_parser(
        "list", help="show the dead letters without removing them", formatter_class=fmt, epilog=EXIT_CODES_HELP,
        description="Non-destructive: messages are fetched with basic.get without an ack and all\n"
        "returned to the queue at the end (basic.nack, requeue), so they stay, in order.\n"
        "While the listing runs they are invisible to other consumers. On quorum queues\n"
        "RabbitMQ before 4.3 counts each return as a delivery attempt (x-delivery-count).",
    )
    lst.add_argument("queue", metavar="QUEUE")
    lst.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.add_argument("--body", action="store_true", help="include each message body")
    lst.set_defaults(func=cmd_dlq_list)
    rep = actions.add_parser(
        "replay", help="re-publish dead letters to the request queue", formatter_class=fmt, epilog=EXIT_CODES_HELP,
        description="Each selected dead letter is re-published to the request queue (persistent,\n"
        "confirmed, same properties without the x- headers) and removed from the .dlq only\n"
        "after the broker confirmed the copy; the others stay where they were.",
    )
    rep.add_argument("queue", metavar="QUEUE")
    which = rep.add_mutually_exclusive_group(required=True)
    which.add_argument("--job-id", help="replay the dead letters of this job")
    which.add_argument("--all", action="store_true", help="replay every dead letter")
    rep.add_argument("--limit", type=int, default=10000, help="look at most at this many (default 10000)")
    rep.set_defaults(func=cmd_dlq_replay)


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> ExitCode:
    """Show the dead letters without losing them (each is returned to the queue)."""
    from ai_service.client import QueueNotFound, request_queue

    queue = request_queue(settings, args.queue)
    with connect(settings, "dlq list") as client:
        try:
            count, letters = client.peek_dead_letters(queue, max(0, args.limit))
        except QueueNotFound as exc:
            raise CommandError(ExitCode.NOT_FOUND, exc.message) from None
    if args.json:
        print(json.dumps({"queue": f"{queue}.dlq", "count": count,
                          "messages": [letter.to_json(body=args.body) for letter in letters]}, indent=2))
        return ExitCode.OK
    print(f"{queue}.dlq: {count} message(s)" + (f", showing the first {len(letters)}" if len(letters) < count else ""))
    if letters:
        print(f"{'#':>4}  {'job_id':<24} {'reason':<16} {'deaths':>6}  {'size':>9}  dead-lettered at")
    for letter in letters:
        job = letter.job_id or "(unreadable)"
        print(f"{letter.index:>4}  {job:<24} {letter.reason or '-':<16} {letter.count:>6}  "
              f"{letter.size:>7} B  {letter.died_at or '-'}")
        if args.body:
            print("      " + letter.body.decode("utf-8", errors="replace")[:2000])
    if letters:
        err("(listed without removing: every message was returned to the queue)")
    return ExitCode.OK


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> ExitCode:
    """Re-publish the chosen dead letters; each leaves the .dlq only once its copy is confirmed."""
    from ai_service.client import QueueNotFound, request_queue

    queue = request_queue(settings, args.queue)
    if args.job_id:
        check_job_id(args.job_id)
    with connect(settings, "dlq replay") as client:
        try:
            replayed, left = client.replay_dead_letters(
                queue, lambda letter: bool(args.all) or letter.job_id == args.job_id, max(0, args.limit)
            )
        except QueueNotFound as exc:
            raise CommandError(ExitCode.NOT_FOUND, exc.message) from None
    for letter in replayed:
        print(letter.job_id or f"(message {letter.properties.message_id or letter.index})")
    err(f"replayed {len(replayed)} message(s) from {queue}.dlq to {queue}; {left} left in the .dlq")
    if args.job_id and not replayed:
        raise CommandError(ExitCode.NOT_FOUND, f"no dead letter of job {args.job_id} in {queue}.dlq")
    return ExitCode.OK
