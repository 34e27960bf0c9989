"""``GET /v1/jobs/{job_id}/events``: a job's messages as ``text/event-stream``.

Each message is one event: ``id: <message_id>``, ``event: <type>``, ``data: <the
message>`` (one line of JSON).  The stream ends after the terminal message; a client
that reconnects with ``Last-Event-ID`` gets what came after that message.

The stream reads an :class:`~ai_service.http.outbox.EventLog`:

* HTTP-only mode: the job's log on disk, written by the handler (every message, across
  restarts of the worker).
* RabbitMQ on: a log in memory that a :class:`Follower` fills from ``EVENTS_EXCHANGE``
  through an exclusive, auto-delete queue of its own bound to ``<op>.*.<job_id>`` (as
  ``ai-service submit --follow`` does).  ``POST /v1/train`` starts the follower before
  it publishes the request, so that stream has every message from the first one; a
  stream opened for a job this process did not submit sees the messages from the moment
  it connected, plus the terminal message from the job record when the job had already
  ended (earlier progress is not replayed over AMQP).

The generator is asynchronous and polls the log (no thread per open stream); a comment
line every :data:`KEEPALIVE_SECONDS` keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from ai_service.config import Settings
from ai_service.http.outbox import Entry, EventLog
from ai_service.messages import json_bytes

log = logging.getLogger("ai_service.http")

KEEPALIVE_SECONDS = 15.0
POLL_SECONDS = 0.2


def format_event(entry: Entry) -> bytes:
    data = json_bytes(entry.data)  # as over AMQP: compact, a NaN metric as null
    return f"id: {entry.id}\nevent: {entry.type}\ndata: ".encode() + data + b"\n\n"


async def stream(events: EventLog, last_id: str | None, *, alive: Callable[[], bool] = lambda: True,
                 poll: float = POLL_SECONDS) -> AsyncIterator[bytes]:
    """Every entry of ``events`` after ``last_id``, as they come, until the terminal one.

    ``alive()`` false (the follower gave up, the worker stops) ends the stream early:
    the client reconnects with ``Last-Event-ID``.
    """
    index = events.index_after(last_id)
    quiet_since = time.monotonic()
    while True:
        entries = events.entries
        while index < len(entries):
            entry = entries[index]
            index += 1
            quiet_since = time.monotonic()
            yield format_event(entry)
            if entry.terminal:
                return
        if events.terminal is not None:
            return  # the terminal message came before last_id (resuming after it)
        if not alive():
            return
        if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield b": keepalive\n\n"
        await asyncio.sleep(poll)


class Follower:
    """RabbitMQ on: one job's messages from ``EVENTS_EXCHANGE`` into a memory log.

    A thread with its own connection (pika connections are not shared); it ends after
    the terminal message, when nobody read the log for ``idle_seconds``, or on
    :meth:`stop`.  ``bound`` is set once the queue is bound (publish the request after).
    """

    def __init__(self, settings: Settings, op: str, job_id: str, *, idle_seconds: float = 600.0,
                 max_entries: int = 10_000) -> None:
        self.settings = settings
        self.op = op
        self.job_id = job_id
        self.events = EventLog(max_entries=max_entries)
        self.idle_seconds = idle_seconds
        self.bound = threading.Event()
        self.done = threading.Event()
        self.error: str | None = None
        self.touched = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow-{job_id}", daemon=True)

    def start(self, timeout: float = 10.0) -> bool:
        self._thread.start()
        self.bound.wait(timeout)
        return self.bound.is_set() and self.error is None

    def touch(self) -> None:
        self.touched = time.monotonic()

    @property
    def alive(self) -> bool:
        return not self.done.is_set() or self.events.terminal is not None

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from ai_service.broker import routing_key
        from ai_service.client import BrokerClient

        try:
            client = BrokerClient(self.settings, purpose=f"http events {self.op} {self.job_id}")
        except Exception as exc:  # noqa: BLE001 - reported to the stream, which ends
            self.error = f"cannot connect to RabbitMQ: {exc}"
            self.bound.set()
            self.done.set()
            return
        try:
            frame = client.channel.queue_declare("", exclusive=True, auto_delete=True)
            queue = str(frame.method.queue)
            client.channel.queue_bind(queue, self.settings.events_exchange,
                                      routing_key=routing_key(self.op, "*", self.job_id))
            self.bound.set()
            for event in client.events(queue, tick=0.5):
                if event is not None:
                    message_id = event.properties.message_id
                    kind = event.routing_key.split(".")[1] if event.routing_key.count(".") >= 2 else "update"
                    entry = self.events.append(kind, event.type, event.body, message_id)
                    if entry.terminal:
                        return
                if self._stop.is_set() or time.monotonic() - self.touched > self.idle_seconds:
                    return
        except Exception as exc:  # noqa: BLE001 - the stream ends; the client reconnects
            self.error = f"lost RabbitMQ while following: {exc}"
            log.warning("[HTTP] Following %s %s: %s", self.op, self.job_id, self.error)
        finally:
            self.bound.set()
            self.done.set()
            client.close()
