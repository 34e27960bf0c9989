"""The dashboard's AMQP side: every message on ``EVENTS_EXCHANGE``, queue depths, actions.

:class:`Feed` is one thread with its own connection (pika connections are not shared).
It declares an exclusive, auto-delete queue of its own bound with ``#`` -- a copy of
every heartbeat and job message, so the BE's ``*_update_q`` / ``*_result_q`` lose
nothing -- then (first time only) rebuilds the state from the job records, then consumes.
Between messages it reads the depths of the request queues and their ``.dlq`` with
passive declares.  A lost broker is retried with backoff; the page says it is offline.

:class:`Actions` are the page's buttons (cancel a job, list and replay dead letters),
each on a short connection of its own, run from the HTTP server's thread pool.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pika.exceptions

from ai_service.broker import describe_pika_error, queue_names
from ai_service.client import BrokerClient, DeadLetter
from ai_service.config import Settings
from ai_service.dashboard.state import DashboardState
from ai_service.errors import BrokerError, ConnectionClosed, StorageError
from ai_service.messages import OPERATIONS

log = logging.getLogger("ai_service.dashboard")

#: At most this many messages wait in the dashboard's own queue (the oldest go first).
QUEUE_MAX_LENGTH = 10_000
DEPTH_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 10.0


class Feed:
    """The thread that keeps :class:`DashboardState` up to date from the broker."""

    def __init__(self, settings: Settings, state: DashboardState, *,
                 rebuild: Callable[[], None] = lambda: None, depth_seconds: float = DEPTH_SECONDS) -> None:
        self.settings = settings
        self.state = state
        self.rebuild = rebuild
        self.depth_seconds = depth_seconds
        self.bound = threading.Event()
        self._rebuilt = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                self._session()
                delay = 1.0
            except BrokerError as exc:
                log.warning("[RMQ] ❌ Dashboard feed lost RabbitMQ (%s); retrying in %.0f s", exc.message, delay)
            except Exception:  # the feed must outlive anything one message does
                log.exception("[RMQ] Dashboard feed failed; retrying in %.0f s", delay)
            self.state.set_connected(False)
            if not self._rebuilt:
                self._rebuild_once()  # no broker at start: still show what storage knows
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    def _session(self) -> None:
        with BrokerClient(self.settings, purpose="dashboard") as client:
            queue = bind_everything(client, self.settings.events_exchange)
            log.info("[RMQ] ✅ Dashboard bound %s to %r with '#'", queue, self.settings.events_exchange)
            self.bound.set()
            self._rebuild_once()
            self.state.set_connected(True)
            self.state.set_queues(queue_depths(client, self.settings))
            next_depths = time.monotonic() + self.depth_seconds
            for event in client.events(queue, tick=0.5):
                if event is not None:
                    self.state.apply(event.routing_key, event.body)
                if time.monotonic() >= next_depths:
                    self.state.set_queues(queue_depths(client, self.settings))
                    next_depths = time.monotonic() + self.depth_seconds
                if self._stop.is_set():
                    return

    def _rebuild_once(self) -> None:
        if self._rebuilt:
            return
        self._rebuilt = True
        try:
            self.rebuild()
        except Exception:  # a storage outage must not keep the page empty of live jobs
            log.exception("[Dashboard] Rebuilding from the job records failed; showing live messages only")


def bind_everything(client: BrokerClient, exchange: str) -> str:
    """An exclusive, auto-delete, length-bounded queue bound to ``exchange`` with ``#``."""
    try:
        client.channel.exchange_declare(exchange, "topic", durable=True)
        frame = client.channel.queue_declare("", exclusive=True, auto_delete=True,
                                             arguments=cast(Any, {"x-max-length": QUEUE_MAX_LENGTH}))
        queue = str(frame.method.queue)
        client.channel.queue_bind(queue, exchange, routing_key="#")
    except pika.exceptions.AMQPError as exc:
        raise ConnectionClosed(describe_pika_error(exc)) from None
    return queue


def queue_depths(client: BrokerClient, settings: Settings) -> list[dict[str, Any]]:
    """Each operation's request queue and ``.dlq``: messages and consumers (None: no such queue)."""
    rows = []
    for op in OPERATIONS:
        names = queue_names(settings, op)
        for role, name in (("request", names.request), ("dlq", names.dlq)):
            messages, consumers = _passive(client, name)
            rows.append({"op": op, "role": role, "queue": name, "messages": messages, "consumers": consumers})
    return rows


def _passive(client: BrokerClient, queue: str) -> tuple[int | None, int | None]:
    try:
        channel = client.connection.channel()
    except pika.exceptions.AMQPError as exc:
        raise ConnectionClosed(describe_pika_error(exc)) from None
    try:
        method = channel.queue_declare(queue, passive=True).method
        return int(method.message_count or 0), int(method.consumer_count or 0)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None, None
        raise ConnectionClosed(describe_pika_error(exc)) from None
    except pika.exceptions.AMQPError as exc:
        raise ConnectionClosed(describe_pika_error(exc)) from None
    finally:
        if channel.is_open:
            channel.close()


class Actions:
    """The page's buttons; each opens its own short connection (called from a thread pool)."""

    def __init__(self, settings: Settings, storage: Any = None) -> None:
        self.settings = settings
        self.storage = storage

    def cancel(self, job_id: str) -> dict[str, Any]:
        """The contract's cancel message, and the cancel marker in storage (for a worker not running yet)."""
        from ai_service.jobs import cancel_key

        with BrokerClient(self.settings, purpose="dashboard cancel") as client:
            heard = client.cancel(job_id)
        recorded = False
        if self.storage is not None:
            try:
                self.storage.write_bytes(cancel_key(job_id, self.settings.jobs_prefix),
                                         json.dumps({"requested": time.time(), "by": "dashboard"}).encode())
                recorded = True
            except StorageError as exc:
                log.warning("[Dashboard] Could not record the cancel of %s in storage: %s", job_id, exc.message)
        log.info("[Dashboard] Cancel sent for %s (a worker listened: %s, recorded: %s)", job_id, heard, recorded)
        return {"job_id": job_id, "sent": True, "worker_listening": heard, "recorded": recorded}

    def dead_letters(self, op: str, limit: int = 50) -> dict[str, Any]:
        request_q = queue_names(self.settings, op).request
        with BrokerClient(self.settings, purpose="dashboard dlq") as client:
            count, letters = client.peek_dead_letters(request_q, limit)
        return {"op": op, "queue": f"{request_q}.dlq", "count": count, "letters": [d.to_json() for d in letters]}

    def replay(self, op: str, message_id: str | None, index: int | None = None, limit: int = 1000) -> dict[str, Any]:
        """Put one dead letter back on its request queue (confirmed, then removed): the one with
        ``message_id``, or else the ``index``-th of the listing (for a message without an id)."""
        request_q = queue_names(self.settings, op).request

        def chosen(letter: DeadLetter) -> bool:
            if message_id is not None:
                return bool(letter.properties.message_id == message_id)
            return letter.index == index

        with BrokerClient(self.settings, purpose="dashboard replay") as client:
            replayed, left = client.replay_dead_letters(request_q, chosen, limit)
        log.info("[Dashboard] Replayed %d dead letter(s) (%s) to %s", len(replayed), message_id or f"#{index}",
                 request_q)
        return {"op": op, "replayed": [d.to_json() for d in replayed], "left": left}
