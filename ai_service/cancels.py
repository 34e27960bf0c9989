"""Durable cancels: the cancel stream beside the fanout (CONTRACT.md, "Control").

A ``cancel`` published to ``CONTROL_EXCHANGE`` (fanout) reaches every running worker at
once through its exclusive queue, but a worker that is not running misses it.  So the
exchange is also bound to a RabbitMQ *stream*, ``<CONTROL_EXCHANGE>.cancels``
(``x-queue-type: stream``, ``x-max-age`` = ``CANCEL_RETENTION``), which every worker reads
non-destructively from an offset: a worker that starts reads the cancels of the last
``CANCEL_RETENTION`` seconds, so it honours cancels sent while no worker ran; after a
reconnect it goes on from the offset after the last one it read.  A worker that starts
takes no request before it has read the stream up to now: it appends a *sync* message of
its own (to the stream only, never the exchange) and consumes its request queue once
that came back (or after :data:`CATCH_UP_SECONDS`).

A cancel arrives twice at a running worker (fanout and stream): :class:`CancelStream`
remembers the job_ids it read (a request that comes after its cancel is cancelled before
it starts, without waiting for the marker) and those it handed to the cancel hook (once
each).  A stream delivery is acked only once the control thread accepted it: a flood
read from the stream waits in a bounded prefetch window and then in the broker, never in
threads here, and none of it is dropped.  A broker without streams (before 3.9) gets the
fanout only, with one warning.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ai_service.config import Settings

log = logging.getLogger("ai_service.consumer")

#: Stream deliveries read ahead of the cancel hook (unacked; the broker keeps the rest).
STREAM_PREFETCH = 5000
#: job_ids remembered as read, and as handed to the hook (each bounded, oldest forgotten).
SEEN_CANCELS = 20_000
#: The AMQP header a stream delivery's offset comes in.
OFFSET_HEADER = "x-stream-offset"
#: The header of a worker's own sync message (not a cancel; skipped by every reader).
SYNC_HEADER = "x-ai-cancel-sync"
#: A starting worker waits at most this long for its sync message before taking requests.
CATCH_UP_SECONDS = 10.0


def cancel_stream_name(settings: Settings) -> str:
    return f"{settings.control_exchange}.cancels"


def stream_arguments(settings: Settings) -> dict[str, Any]:
    return {"x-queue-type": "stream", "x-max-age": f"{max(1, settings.cancel_retention)}s"}


def declare_cancel_stream(connection: pika.BlockingConnection, settings: Settings) -> bool:
    """Declare the cancel stream and bind it to ``CONTROL_EXCHANGE``; False when the broker has
    no streams.  A stream declared with another ``x-max-age`` is used as it is (warned)."""
    name = cancel_stream_name(settings)
    channel = connection.channel()
    try:
        try:
            channel.queue_declare(name, durable=True, arguments=cast(Any, stream_arguments(settings)))
        except pika.exceptions.ChannelClosedByBroker as exc:
            channel = connection.channel()
            try:
                channel.queue_declare(name, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                log.warning("[RMQ] ⚠️ No cancel stream (%s): cancels sent while no worker runs are not kept "
                            "(streams need RabbitMQ 3.9 or later)", exc.reply_text)
                return False
            log.warning("[RMQ] ⚠️ Cancel stream %r exists with other arguments (%s); using it as it is",
                        name, exc.reply_text)
        channel.queue_bind(name, settings.control_exchange)
        return True
    finally:
        if channel.is_open:
            channel.close()


class CancelStream:
    """One worker's reading of the cancel stream: where it is, and what it already saw."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = cancel_stream_name(settings)
        #: The offset after the last delivery read (None: none yet).
        self.read_to: int | None = None
        self._read: OrderedDict[str, None] = OrderedDict()
        self._handed: OrderedDict[str, None] = OrderedDict()
        #: Stream deliveries the control thread had no room for yet: (delivery tag, job_id, offset).
        self.pending: deque[tuple[int, str, int]] = deque()
        self.caught_up = False
        self._sync_token: str | None = None
        self._sync_deadline = 0.0

    def start_offset(self) -> int | datetime:
        """Where a (re)connected reader begins: the first cancel not yet handed on, or
        ``CANCEL_RETENTION`` ago for a worker that just started."""
        if self.pending:
            return min(offset for _, _, offset in self.pending)
        if self.read_to is not None:
            return self.read_to
        return datetime.now(UTC) - timedelta(seconds=self.settings.cancel_retention)

    def consume(self, connection: pika.BlockingConnection, on_message: Any) -> BlockingChannel | None:
        """A channel reading the stream from :meth:`start_offset`; None without a stream."""
        if not declare_cancel_stream(connection, self.settings):
            return None
        channel = connection.channel()
        channel.basic_qos(prefetch_count=STREAM_PREFETCH)
        start = self.start_offset()
        self.pending.clear()  # their tags died with the old channel; ``start`` reads them again
        channel.basic_consume(self.name, on_message, arguments={OFFSET_HEADER: start})
        if not self.caught_up:
            self._sync_token = uuid.uuid4().hex
            self._sync_deadline = time.monotonic() + CATCH_UP_SECONDS
            channel.basic_publish("", self.name, b"{}", pika.BasicProperties(headers={SYNC_HEADER: self._sync_token}))
        return channel

    def ready(self) -> bool:
        """Whether this worker read the stream up to its start (and may take requests)."""
        if not self.caught_up and time.monotonic() > self._sync_deadline:
            log.warning("[RMQ] ⚠️ Cancel stream not read up to now within %.0f s; taking requests anyway "
                        "(a cancel sent before this worker started acts once read)", CATCH_UP_SECONDS)
            self.caught_up = True
        return self.caught_up

    @staticmethod
    def is_sync(headers: Mapping[str, Any] | None) -> bool:
        return SYNC_HEADER in (headers or {})

    def delivered(self, headers: Mapping[str, Any] | None) -> int:
        """Note a delivery's offset; returns it (-1 when the broker sent none)."""
        token = (headers or {}).get(SYNC_HEADER)
        if token is not None and token == self._sync_token and not self.caught_up:
            self.caught_up = True
            log.info("[RMQ] Cancel stream read up to now (%s)", self.name)
        offset = (headers or {}).get(OFFSET_HEADER)
        if not isinstance(offset, int):
            return -1
        self.read_to = max(self.read_to or 0, offset + 1)
        return offset

    def seen(self, job_id: str) -> bool:
        """Whether a cancel for ``job_id`` was read (any thread may ask)."""
        return job_id in self._read

    def read(self, job_id: str) -> None:
        _remember(self._read, job_id)

    def handed(self, job_id: str) -> bool:
        return job_id in self._handed

    def hand(self, job_id: str) -> None:
        _remember(self._handed, job_id)


def _remember(seen: OrderedDict[str, None], job_id: str) -> None:
    seen[job_id] = None
    seen.move_to_end(job_id)
    while len(seen) > SEEN_CANCELS:
        seen.popitem(last=False)
