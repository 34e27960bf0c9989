"""A BE stand-in for tests: unique queue names per test, publish requests, read answers.

Each test gets its own set of queue and exchange names (through the same environment
variables a real deployment uses), so tests can run in parallel on the shared broker.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ai_service.broker import Topology
from ai_service.cancels import cancel_stream_name
from ai_service.config import Settings


@dataclass
class Received:
    body: dict[str, Any]
    properties: pika.BasicProperties
    routing_key: str
    queue: str

    @property
    def type(self) -> str:
        return str(self.body.get("type"))


@dataclass
class BrokerNames:
    """Queue/exchange names for one test, as environment variables and settings."""

    prefix: str
    port: int = 5672
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        p = self.prefix
        return {
            "RABBITMQ_HOST": "127.0.0.1",
            "RABBITMQ_PORT": str(self.port),
            "TRAIN_REQUEST_QUEUE": f"{p}.train_request_q",
            "TRAIN_UPDATE_QUEUE": f"{p}.train_update_q",
            "TRAIN_RESULT_QUEUE": f"{p}.train_result_q",
            "CONVERT_REQUEST_QUEUE": f"{p}.convert_request_q",
            "CONVERT_UPDATE_QUEUE": f"{p}.convert_update_q",
            "CONVERT_RESULT_QUEUE": f"{p}.convert_result_q",
            "INFER_REQUEST_QUEUE": f"{p}.infer_request_q",
            "INFER_RESULT_QUEUE": f"{p}.infer_result_q",
            "EVENTS_EXCHANGE": f"{p}.events",
            "CONTROL_EXCHANGE": f"{p}.control",
            "DEAD_LETTER_EXCHANGE": f"{p}.dlx",
            **self.extra,
        }

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env({**self.env(), **overrides})


# A test's names start with "t", its creation time (8 hex digits of Unix seconds) and 4
# random hex digits: what a killed run left behind is recognised and swept by its age.
STALE_NAME = re.compile(r"^t(?P<created>[0-9a-f]{8})[0-9a-f]{4}\.")
LEGACY_NAME = re.compile(r"^t[0-9a-f]{10}\.")  # before the creation time was in the name


def new_names(port: int = 5672, **extra: str) -> BrokerNames:
    return BrokerNames(prefix=f"t{int(time.time()):08x}{uuid.uuid4().hex[:4]}", port=port, extra=dict(extra))


def delete_topology(channel: BlockingChannel, settings: Settings) -> None:
    """Delete every queue and exchange the service declares for ``settings``' names."""
    s = settings
    for q in (
        s.train_request_queue, s.train_update_queue, s.train_result_queue,
        s.convert_request_queue, s.convert_update_queue, s.convert_result_queue,
        s.infer_request_queue, s.infer_result_queue,
    ):
        for name in (q, f"{q}.dlq", f"{q}.lease"):
            channel.queue_delete(name)
    channel.queue_delete(cancel_stream_name(s))
    for ex in (s.events_exchange, s.control_exchange, s.dead_letter_exchange):
        channel.exchange_delete(ex)


def delete_names(names: BrokerNames) -> None:
    """Best effort: remove one test's queues and exchanges from the shared broker."""
    try:
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", 5672, connection_attempts=1, socket_timeout=5, blocked_connection_timeout=5))
    except pika.exceptions.AMQPError:
        return
    try:
        delete_topology(connection.channel(), names.settings())
    except pika.exceptions.AMQPError:
        pass
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


def sweep_stale_names(max_age: float = 3600.0) -> int:
    """Delete queues and exchanges that test runs older than ``max_age`` left behind.

    A killed run cannot clean up; hundreds of leftover quorum queues slow the shared
    broker down for everyone.  Names from running sessions are younger and stay.
    """
    now = time.time()
    found: list[tuple[str, str]] = []
    for kind in ("queues", "exchanges"):
        try:
            listed = subprocess.run(["rabbitmqctl", "-q", f"list_{kind}", "name"], capture_output=True,
                                    text=True, timeout=60, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            return 0
        for name in listed:
            m = STALE_NAME.match(name)
            if (m and now - int(m.group("created"), 16) > max_age) or LEGACY_NAME.match(name):
                found.append((kind, name))
    if not found:
        return 0
    try:
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672, connection_attempts=1))
    except pika.exceptions.AMQPError:
        return 0
    try:
        channel = connection.channel()
        for kind, name in found:
            if kind == "queues":
                channel.queue_delete(name)
            else:
                channel.exchange_delete(name)
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
    return len(found)


class BE:
    """Publishes requests and reads what the service answered, like a backend would."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters(host=settings.rabbitmq_host, port=settings.rabbitmq_port, heartbeat=0)
        )
        self.channel: BlockingChannel = self.connection.channel()
        Topology(settings).declare(self.connection)
        self.channel.confirm_delivery()

    def close(self) -> None:
        try:
            delete_topology(self.connection.channel(), self.settings)
            self.connection.close()
        except pika.exceptions.AMQPError:
            pass

    # --- sending ---------------------------------------------------------------------

    def send(self, queue: str, body: dict[str, Any] | bytes | str, **props: Any) -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        raw = body if isinstance(body, bytes) else body.encode()
        self.channel.basic_publish(
            "", queue, raw, properties=pika.BasicProperties(delivery_mode=2, content_type="application/json", **props)
        )

    def send_train(self, body: dict[str, Any] | bytes | str) -> None:
        self.send(self.settings.train_request_queue, body)

    def cancel(self, job_id: str) -> None:
        self.channel.basic_publish(
            self.settings.control_exchange, "", json.dumps({"type": "cancel", "job_id": job_id}).encode()
        )

    # --- receiving -------------------------------------------------------------------

    def get(self, queue: str) -> Received | None:
        method, props, body = self.channel.basic_get(queue, auto_ack=True)
        if method is None:
            return None
        return Received(json.loads(body), props, method.routing_key, queue)

    def wait_for(
        self,
        queue: str,
        predicate: Any = None,
        timeout: float = 60.0,
        collected: list[Received] | None = None,
    ) -> Received:
        """Read ``queue`` until a message matches ``predicate`` (default: any)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.get(queue)
            if msg is None:
                self.connection.sleep(0.05)
                continue
            if collected is not None:
                collected.append(msg)
            if predicate is None or predicate(msg):
                return msg
        raise AssertionError(f"no matching message on {queue} within {timeout} s (got {collected or []!r})")

    def drain(self, queue: str) -> list[Received]:
        out = []
        while (msg := self.get(queue)) is not None:
            out.append(msg)
        return out

    def count(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def wait_count(self, queue: str, n: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.count(queue)
            if c >= n:
                return c
            self.connection.sleep(0.1)
        return self.count(queue)

    def dlq_bodies(self, request_queue: str) -> list[bytes]:
        out = []
        while True:
            method, _, body = self.channel.basic_get(f"{request_queue}.dlq", auto_ack=True)
            if method is None:
                return out
            out.append(body)

    def terminal(self, queue: str, job_id: str, timeout: float = 60.0) -> Received:
        return self.wait_for(queue, lambda m: m.body.get("job_id") == job_id, timeout)
