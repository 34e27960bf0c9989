"""``ai-service workers``: the running workers, from their heartbeats."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ai_service.cli.base import EXIT_CODES_HELP, CommandError, ExitCode, connect, err, iso
from ai_service.cli.render import format_workers
from ai_service.config import Settings


def add_workers(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """``workers [--wait S] [--json]``."""
    p = sub.add_parser(
        "workers", help="list the running workers, from their heartbeats", formatter_class=fmt,
        description="Bind an exclusive, auto-delete queue of our own to EVENTS_EXCHANGE with `worker.#`,\n"
        "listen for about 1.5 heartbeat intervals (HEARTBEAT_SECONDS, or --wait) and print one line per\n"
        "worker: name, operation, state, device/GPU, current job and progress, last seen, versions.\n"
        "A worker silent for 3 of its intervals shows as `lost`; one that said so, `stopped`.\n"
        "Exit 6 when no worker was heard.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--wait", type=float, metavar="SECONDS", help="listen this long (default 1.5 x HEARTBEAT_SECONDS)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list: each worker's last heartbeat with status, last_seen and age_seconds")
    p.set_defaults(func=cmd_workers)


def cmd_workers(args: argparse.Namespace, settings: Settings) -> ExitCode:
    """Listen to the workers' heartbeats (``worker.<state>.<name>``) and list who was heard."""
    import pika.exceptions

    from ai_service.broker import describe_pika_error
    from ai_service.heartbeat import EXPIRY_INTERVALS, ROUTING_PREFIX

    interval = settings.heartbeat_seconds or Settings().heartbeat_seconds
    wait = 1.5 * interval if args.wait is None else args.wait
    if wait <= 0:
        raise CommandError(ExitCode.USAGE, "--wait must be more than 0 seconds")
    exchange = settings.events_exchange
    heard: dict[str, tuple[float, dict[str, Any]]] = {}  # routing name -> (received at, last beat)
    with connect(settings, "workers") as client:
        try:
            client.channel.exchange_declare(exchange, "topic", passive=True)
            queue = str(client.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue)
            client.channel.queue_bind(queue, exchange, routing_key=f"{ROUTING_PREFIX}.#")
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise CommandError(ExitCode.NOT_FOUND, f"exchange {exchange!r} (EVENTS_EXCHANGE) does not exist: "
                                   "no worker has started on this broker and vhost") from None
            raise CommandError(ExitCode.BROKER, f"RabbitMQ: {describe_pika_error(exc)}") from None
        except pika.exceptions.AMQPError as exc:
            raise CommandError(ExitCode.BROKER, f"RabbitMQ: {describe_pika_error(exc)}") from None
        err(f"listening for worker heartbeats on {exchange!r} (worker.#) for {wait:g} s")
        deadline = time.monotonic() + wait
        for event in client.events(queue, tick=0.2):
            if event is not None and event.type == "worker_heartbeat":
                name = str(event.body.get("name") or event.routing_key.split(".", 2)[-1])
                heard[name] = (time.time(), event.body)
            if time.monotonic() >= deadline:
                break
    now = time.time()
    rows = []
    for seen_at, beat in sorted(heard.values(), key=lambda h: (str(h[1].get("worker")), str(h[1].get("operation")))):
        every = float(beat.get("interval_seconds") or interval)
        state = str(beat.get("state", "?"))
        status = state if state == "stopped" or now - seen_at <= EXPIRY_INTERVALS * every else "lost"
        rows.append({**beat, "status": status, "last_seen": iso(seen_at), "age_seconds": round(now - seen_at, 1)})
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    elif rows:
        print(format_workers(rows))
    if not rows:
        raise CommandError(ExitCode.NOT_FOUND, f"no worker heartbeat on {exchange!r} within {wait:g} s: no worker "
                           "is running (or they run with HEARTBEAT_SECONDS=0, or on other EVENTS_EXCHANGE)")
    err(f"{len(rows)} worker(s) heard on {exchange!r} in {wait:g} s")
    return ExitCode.OK
