"""The BE side of the contract as a small library: what the ``ai-service`` BE-side
commands (``submit``, ``cancel``, ``dlq``, ``demo``) are made of.

Only pika and pydantic: no torch, no Ultralytics, so these commands start fast.

* :class:`BrokerClient` -- one blocking connection; publishing is persistent and
  confirmed (``mandatory``, so an unroutable message is an error, not a silent drop).
* :meth:`BrokerClient.watch` -- an exclusive, auto-delete queue of our own bound to one
  job's ``<op>.update.<job_id>`` / ``<op>.result.<job_id>`` keys on ``EVENTS_EXCHANGE``,
  declared *before* the request is published, so nothing is missed and the BE's own
  ``*_update_q`` / ``*_result_q`` are not drained.
* :meth:`BrokerClient.peek_dead_letters` / :meth:`BrokerClient.replay_dead_letters` --
  the ``<request queue>.dlq`` without losing a message.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ai_service.broker import Topology, at_pika_boundary, pika_boundary, queue_names, routing_key, session
from ai_service.config import Settings
from ai_service.errors import BrokerError, NotRouted, QueueNotFound
from ai_service.messages import OPERATIONS, TERMINAL_TYPES, new_message_id, readable_job_id

APP_ID = "ai-service-cli"


__all__ = ["BrokerClient", "Event", "NotRouted", "QueueNotFound", "request_queue"]


@dataclass
class Event:
    """One message received from the broker, decoded."""

    body: dict[str, Any]
    routing_key: str
    properties: pika.BasicProperties

    @property
    def type(self) -> str:
        return str(self.body.get("type", ""))

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


def request_queue(settings: Settings, name: str) -> str:
    """A request queue from an operation name, the queue's name, or its ``.dlq``'s name."""
    if name in OPERATIONS:
        return queue_names(settings, name).request
    return name[: -len(".dlq")] if name.endswith(".dlq") else name


class BrokerClient:
    """A BE-side connection: confirmed publishing, one job's events, RPC, dead letters."""

    def __init__(self, settings: Settings, *, purpose: str) -> None:
        self.settings = settings
        self._session = contextlib.ExitStack()
        self.connection = self._session.enter_context(session(settings, client_name=f"ai-service cli ({purpose})"))
        try:
            with pika_boundary():
                self.channel = self.connection.channel()
                self.channel.confirm_delivery()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "BrokerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    # --- topology ----------------------------------------------------------------------

    def declare(self, ops: tuple[str, ...] = OPERATIONS) -> str | None:
        """Declare the service's topology for ``ops`` (idempotent, what workers do).

        A BE account may lack the *configure* permission: then the declaration is
        skipped and the reason returned, and the caller goes on with what exists.
        """
        try:
            Topology(self.settings, ops).declare(self.connection)
        except BrokerError as exc:
            if not self.connection.is_open:
                raise
            return exc.message
        return None

    @at_pika_boundary
    def consumer_count(self, queue: str) -> int | None:
        """Consumers on ``queue`` (a passive declare), or None when it does not exist."""
        channel = self.connection.channel()
        try:
            frame = channel.queue_declare(queue, passive=True)
            return int(frame.method.consumer_count or 0)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise
        finally:
            if channel.is_open:
                channel.close()

    # --- publishing --------------------------------------------------------------------

    def publish(
        self,
        exchange: str,
        key: str,
        body: bytes,
        *,
        message_type: str,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        message_id: str | None = None,
    ) -> str:
        """Publish persistently and wait for the broker's confirm; return the message_id."""
        message_id = message_id or new_message_id()
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            type=message_type,
            timestamp=int(time.time()),
            app_id=APP_ID,
        )
        self._publish(self.channel, exchange, key, body, props)
        return message_id

    @staticmethod
    @at_pika_boundary
    def _publish(channel: BlockingChannel, exchange: str, key: str, body: bytes, props: pika.BasicProperties) -> None:
        try:
            channel.basic_publish(exchange, key, body, properties=props, mandatory=True)
        except pika.exceptions.UnroutableError:
            where = f"exchange {exchange!r}" if exchange else f"queue {key!r}"
            raise NotRouted(f"the broker could not route the message to {where}") from None

    def submit(self, op: str, body: bytes, job_id: str, *, reply_to: str | None = None,
               correlation_id: str | None = None) -> str:
        """Put a request on ``op``'s request queue (default exchange)."""
        queue = queue_names(self.settings, op).request
        return self.publish("", queue, body, message_type=f"{op}_request",
                            correlation_id=correlation_id or job_id, reply_to=reply_to)

    def cancel(self, job_id: str) -> bool:
        """Publish the contract's cancel message; False when no worker listens right now."""
        with pika_boundary():
            self.channel.exchange_declare(self.settings.control_exchange, "fanout", durable=True)
        body = json.dumps({"type": "cancel", "job_id": job_id}).encode()
        try:
            self.publish(self.settings.control_exchange, "", body, message_type="cancel", correlation_id=job_id)
        except NotRouted:
            return False
        return True

    # --- receiving ---------------------------------------------------------------------

    @at_pika_boundary
    def watch(self, op: str, job_id: str) -> str:
        """An exclusive, auto-delete queue bound to this job's update and result keys."""
        frame = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        queue = str(frame.method.queue)
        for kind in ("update", "result"):
            if kind == "update" and queue_names(self.settings, op).update is None:
                continue
            self.channel.queue_bind(queue, self.settings.events_exchange, routing_key=routing_key(op, kind, job_id))
        return queue

    @at_pika_boundary
    def reply_queue(self) -> str:
        """An exclusive, auto-delete queue for an RPC answer (``reply_to``)."""
        frame = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        return str(frame.method.queue)

    def events(self, queue: str, *, tick: float = 0.5) -> Iterator[Event | None]:
        """Messages from ``queue`` as they come; None every ``tick`` seconds of silence
        (so the caller can check a deadline or redraw).  Heartbeats are answered while
        it waits."""
        with pika_boundary():
            channel: Any = self.channel  # pika-stubs type consume() as returning None
            for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=tick):
                if method is None:
                    yield None
                    continue
                try:
                    payload = json.loads(body)
                except ValueError:
                    continue
                if isinstance(payload, dict):
                    yield Event(payload, str(method.routing_key), cast(pika.BasicProperties, props))

    # --- dead letters ------------------------------------------------------------------

    def peek_dead_letters(self, request_q: str, limit: int) -> tuple[int, list[DeadLetter]]:
        """The first ``limit`` messages of ``<request_q>.dlq`` and the queue's count.

        Non-destructive: each message is fetched with ``basic.get`` *without* an ack,
        and all of them are given back at the end with one ``basic.nack(multiple,
        requeue)``; the broker puts them back in their places.  While the listing runs
        they are invisible to other consumers.
        """
        channel = self._dlq_channel()
        count, kept = 0, 0
        try:
            count, letters = self._fetch(channel, f"{request_q}.dlq", limit)
            kept = count
            return count, [letter for letter, _ in letters]
        finally:
            self._give_back(channel)
            self._settle(f"{request_q}.dlq", kept)

    def replay_dead_letters(
        self, request_q: str, select: Callable[[DeadLetter], bool], limit: int
    ) -> tuple[list[DeadLetter], int]:
        """Re-publish the selected dead letters to ``request_q``, persistent and confirmed.

        A dead letter is acked (removed from the ``.dlq``) only after the broker
        confirmed its copy in the request queue; the others are given back untouched.
        Returns the replayed messages and how many were left in the ``.dlq``.
        """
        channel = self._dlq_channel()
        replayed: list[DeadLetter] = []
        count = 0
        try:
            count, letters = self._fetch(channel, f"{request_q}.dlq", limit)
            for letter, tag in letters:
                if not select(letter):
                    continue
                self._publish(self.channel, "", request_q, letter.body, replay_properties(letter.properties))
                with pika_boundary():
                    channel.basic_ack(tag)
                replayed.append(letter)
            return replayed, count - len(replayed)
        finally:
            self._give_back(channel)
            self._settle(f"{request_q}.dlq", count - len(replayed))

    @at_pika_boundary
    def _dlq_channel(self) -> BlockingChannel:
        return self.connection.channel()

    @staticmethod
    @at_pika_boundary
    def _fetch(channel: BlockingChannel, dlq: str, limit: int) -> tuple[int, list[tuple[DeadLetter, int]]]:
        try:
            count = int(channel.queue_declare(dlq, passive=True).method.message_count or 0)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise QueueNotFound(f"queue {dlq!r} does not exist") from None
            raise
        out: list[tuple[DeadLetter, int]] = []
        while len(out) < min(limit, count):
            method, props, body = channel.basic_get(dlq, auto_ack=False)
            if method is None:
                break
            out.append((DeadLetter.parse(len(out) + 1, cast(pika.BasicProperties, props), cast(bytes, body)),
                        int(method.delivery_tag or 0)))
        return count, out

    @staticmethod
    def _give_back(channel: BlockingChannel) -> None:
        """Return every unacked message of ``channel`` to its queue, then close it."""
        try:
            if channel.is_open:
                channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
                channel.close()
        except pika.exceptions.AMQPError:
            pass  # a closed channel returns its unacked messages anyway

    def _settle(self, queue: str, expected: int, timeout: float = 5.0) -> None:
        """Wait (bounded) until ``queue`` counts the given-back messages again.

        A requeue is asynchronous on the broker (a quorum queue applies it through its
        Raft log): without this wait, a ``dlq list`` followed at once by a count, or by
        another listing, could see fewer messages than are there.
        """
        if expected <= 0:
            return
        deadline = time.monotonic() + timeout
        try:
            with pika_boundary():
                channel = self.connection.channel()
                try:
                    while (int(channel.queue_declare(queue, passive=True).method.message_count or 0) < expected
                           and time.monotonic() < deadline):
                        time.sleep(0.02)
                finally:
                    if channel.is_open:
                        channel.close()
        except BrokerError:
            pass  # the listing itself succeeded; the count is only a courtesy


# --- dead letters ------------------------------------------------------------------------



@dataclass
class DeadLetter:
    """One message in a ``.dlq``, with what its ``x-death`` header says."""

    index: int
    body: bytes
    properties: pika.BasicProperties
    job_id: str | None
    reason: str | None = None
    count: int = 0
    queue: str | None = None
    died_at: str | None = None
    delivery_count: int | None = None
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, index: int, props: pika.BasicProperties, body: bytes) -> "DeadLetter":
        try:
            job_id = readable_job_id(json.loads(body))
        except (ValueError, RecursionError):
            job_id = None
        headers = dict(props.headers or {})
        letter = cls(index=index, body=body, properties=props, job_id=job_id, headers=headers)
        deaths = headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            last = deaths[0]  # the broker keeps the most recent death first
            letter.reason = _text(last.get("reason"))
            letter.queue = _text(last.get("queue"))
            letter.count = sum(int(d.get("count", 0) or 0) for d in deaths if isinstance(d, dict))
            died = last.get("time")
            letter.died_at = died.isoformat() if isinstance(died, datetime) else _text(died)
        elif headers.get("x-first-death-reason") is not None:
            letter.reason = _text(headers.get("x-first-death-reason"))
            letter.queue = _text(headers.get("x-first-death-queue"))
        delivery = headers.get("x-delivery-count")
        letter.delivery_count = int(delivery) if isinstance(delivery, int) else None
        return letter

    @property
    def size(self) -> int:
        return len(self.body)

    def to_json(self, *, body: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "job_id": self.job_id,
            "reason": self.reason,
            "count": self.count,
            "queue": self.queue,
            "dead_lettered_at": self.died_at,
            "delivery_count": self.delivery_count,
            "size_bytes": self.size,
            "message_id": self.properties.message_id,
            "correlation_id": self.properties.correlation_id,
        }
        if body:
            out["body"] = self.body.decode("utf-8", errors="replace")
        return out


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def replay_properties(props: pika.BasicProperties) -> pika.BasicProperties:
    """The original message's properties, persistent, without ``x-`` headers: those are
    the broker's (``x-death``, ``x-delivery-count``, ...) or the service's own lease
    token, and a replayed request is a fresh request."""
    headers = {k: v for k, v in (props.headers or {}).items() if not str(k).startswith("x-")}
    return pika.BasicProperties(
        content_type=props.content_type or "application/json",
        content_encoding=props.content_encoding,
        headers=headers or None,
        delivery_mode=2,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=props.message_id or new_message_id(),
        timestamp=props.timestamp,
        type=props.type,
        app_id=props.app_id,
    )
