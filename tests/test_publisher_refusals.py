"""One message never stalls a worker's publishing (CONTRACT.md "Common rules").

Through a real broker: a private RabbitMQ node whose ``max_message_size`` is 1 MiB. An
answer larger than that is refused, either by the publisher itself (``MAX_MESSAGE_BYTES``
below the broker's limit) or by the broker (406 PRECONDITION_FAILED, when
``MAX_MESSAGE_BYTES`` is set higher than the broker's limit); a message nacked again and
again is refused too.  Each time a small ``*_failed`` goes out in its place, the refusal
is kept in the refused file and counted, and the messages behind it go on, in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from ai_service.broker import Topology
from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.messages import InferenceFailed, TrainingFailed
from ai_service.metrics import Metrics
from ai_service.publisher import Publisher, Receipt, failure_replacer
from ai_service.spool import Envelope, Spool
from tests.support import rabbit
from tests.support.amqp import BE, Received, new_names

pytestmark = [pytest.mark.xdist_group("private-broker"), pytest.mark.timeout(180)]

BROKER_LIMIT = 1024 * 1024
#: A bounded wait: before the fix, everything behind the oversized message waited forever.
WAIT = 30.0


def infer_failure(job_id: str, error: AIServiceError) -> InferenceFailed:
    return InferenceFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


def train_failure(job_id: str, error: AIServiceError) -> TrainingFailed:
    return TrainingFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


@pytest.fixture(scope="module")
def small_broker() -> Iterator[rabbit.PrivateBroker]:
    """A private node refusing messages over 1 MiB; stopped and wiped after this module."""
    if not rabbit.available():
        pytest.fail("rabbitmq-server is not installed")
    with rabbit.private_broker(config=f"max_message_size = {BROKER_LIMIT}") as broker:
        yield broker


class Rig:
    """A BE on the private node, and Publishers on the same names that count refusals."""

    def __init__(self, broker: rabbit.PrivateBroker, tmp_path: Path) -> None:
        self.names = new_names(port=broker.port)
        self.tmp_path = tmp_path
        self.be = BE(self.names.settings())
        self.metrics = Metrics()
        self.refusals: list[tuple[str, str, str]] = []
        self.publishers: list[Publisher] = []

    def publisher(self, op: str = "infer", replace: Any = None, **env: str) -> Publisher:
        settings = self.names.settings(RECONNECT_MAX_DELAY="1", **env)
        failure = infer_failure if op == "infer" else train_failure

        def on_refused(code: str, envelope: Envelope, reason: str) -> None:
            self.metrics.publisher_refused.labels(code).inc()  # as worker.run_worker wires it
            self.refusals.append((code, envelope.message_id, reason))

        publisher = Publisher(
            settings, spool_dir=self.tmp_path / f"spool-{len(self.publishers)}", topology=Topology(settings),
            replace=replace or failure_replacer(settings, op, failure), on_refused=on_refused,
        )
        self.publishers.append(publisher)
        publisher.start()
        assert publisher.wait_connected(15), "publisher did not connect to the private node"
        return publisher

    def counted(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("ai_publisher_refused_total", {"reason": reason}) or 0.0

    def close(self) -> None:
        for publisher in self.publishers:
            publisher.stop(timeout=2)
        self.be.close()


@pytest.fixture
def rig(small_broker: rabbit.PrivateBroker, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(small_broker, tmp_path)
    yield r
    r.close()


def answer(publisher: Publisher, job_id: str, size: int = 0, *, exchange: str | None = None,
           key: str | None = None, kind: str = "result", op: str = "infer") -> Receipt:
    s = publisher.settings
    message_type = "inference_completed" if op == "infer" else "epoch_update"
    body = {"type": message_type, "job_id": job_id, "status": "completed", "pad": "x" * size}
    return publisher.publish(
        s.events_exchange if exchange is None else exchange,
        f"{op}.{kind}.{job_id}" if key is None else key,
        json.dumps(body).encode(),
        message_type=message_type, correlation_id=job_id, message_id=f"{job_id}-{message_type}",
    )


def receive(be: BE, queue: str, count: int, timeout: float = WAIT) -> list[Received]:
    """``count`` messages from ``queue`` in arrival order, then a short quiet spell."""
    got: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        msg = be.get(queue)
        if msg is None:
            be.connection.sleep(0.05)
        else:
            got.append(msg)
    be.connection.sleep(0.5)
    got.extend(be.drain(queue))
    assert len(got) >= count, f"{len(got)} of {count} messages arrived on {queue} within {timeout} s: " + str(
        [m.body.get("job_id") for m in got])
    return got


def assert_spool_empty(publisher: Publisher) -> None:
    assert publisher.flush(WAIT), f"{publisher.pending} message(s) still unconfirmed"
    assert publisher.pending == 0
    assert len(publisher.spool) == 0
    assert publisher.spool.bytes == 0
    assert Spool.peek(publisher.spool.directory) == []


def check_oversized_answer_replaced(rig: Rig, publisher: Publisher, code: str, size_text: str,
                                    *, up_front: bool = False) -> None:
    """A normal answer, an oversized one, five normal ones: what both size tests check."""
    first = answer(publisher, "n0")
    big = answer(publisher, "big", size=BROKER_LIMIT + 512 * 1024)
    if up_front:  # known at once, before any broker round trip
        assert big.replaced
        assert big.refused_reason is not None
        assert size_text in big.refused_reason
        assert rig.counted(code) == 1
        assert len(publisher.refused_log.entries()) == 1
    behind = [answer(publisher, f"n{i}") for i in range(1, 6)]

    assert all(r.wait(WAIT) for r in [first, *behind]), "the messages behind the oversized one did not go out"
    assert big.wait(WAIT)
    assert big.replaced
    assert big.replacement_id == "big-inference_completed-refused"
    got = receive(rig.be, rig.be.settings.infer_result_queue, 7)
    assert [(m.body["job_id"], m.type) for m in got] == [
        ("n0", "inference_completed"), ("big", "inference_failed"),
        *[(f"n{i}", "inference_completed") for i in range(1, 6)],
    ]
    failed = got[1]
    assert failed.body["status"] == "failed"
    assert failed.body["error_code"] == "inference_error"
    assert size_text in failed.body["error_message"]
    assert "max_det" in failed.body["error_message"]
    assert failed.routing_key == "infer.result.big"
    assert failed.properties.correlation_id == "big"
    assert failed.properties.type == "inference_failed"
    assert failed.properties.message_id == "big-inference_completed-refused"
    assert len(json.dumps(failed.body)) < 2048
    assert big.refused_reason is not None
    assert size_text in big.refused_reason

    entries = publisher.refused_log.entries()
    assert len(entries) == 1
    assert entries[0]["code"] == code
    assert entries[0]["routing_key"] == "infer.result.big"
    assert entries[0]["properties"]["message_id"] == "big-inference_completed"
    assert entries[0]["body_bytes"] > BROKER_LIMIT
    assert "body_base64" not in entries[0]
    assert_spool_empty(publisher)
    assert rig.counted(code) == 1
    assert [c for c, _, _ in rig.refusals] == [code]


# --- the broker refuses: 406 PRECONDITION_FAILED ----------------------------------------


def test_an_answer_the_broker_refuses_as_too_large_is_replaced_by_a_failed_and_the_messages_behind_it_go_on(
    rig: Rig,
) -> None:
    publisher = rig.publisher(MAX_MESSAGE_BYTES=str(8 * BROKER_LIMIT))  # higher than the broker's: it says 406
    started = time.monotonic()
    check_oversized_answer_replaced(rig, publisher, "too_large", f"{BROKER_LIMIT:,}-byte max_message_size")
    assert time.monotonic() - started < WAIT
    assert publisher.reconnects == 0, "a 406 closes the channel only: the connection stays"


def test_a_refused_rpc_answer_is_replaced_on_the_same_reply_queue_with_its_correlation_id(rig: Rig) -> None:
    publisher = rig.publisher(MAX_MESSAGE_BYTES=str(8 * BROKER_LIMIT))
    reply_queue = f"{rig.names.prefix}.reply"
    rig.be.channel.queue_declare(reply_queue, exclusive=True)
    big = answer(publisher, "rpc1", size=BROKER_LIMIT + 1, exchange="", key=reply_queue)
    after = answer(publisher, "rpc2", exchange="", key=reply_queue)
    assert big.wait(WAIT)
    assert after.wait(WAIT)
    got = receive(rig.be, reply_queue, 2)
    assert [(m.body["job_id"], m.type) for m in got] == [("rpc1", "inference_failed"), ("rpc2", "inference_completed")]
    assert got[0].properties.correlation_id == "rpc1"
    assert_spool_empty(publisher)


def test_a_replacement_the_broker_refuses_too_is_dropped_not_replaced_again(rig: Rig) -> None:
    settings = rig.names.settings()

    def huge_replacement(refused: Envelope, reason: str) -> Envelope:
        props = {**refused.properties, "message_id": refused.message_id + "-refused", "type": "inference_failed"}
        return Envelope(refused.exchange, refused.routing_key, b'{"pad": "' + b"y" * (2 * BROKER_LIMIT) + b'"}',
                        props)

    publisher = rig.publisher(MAX_MESSAGE_BYTES=str(8 * BROKER_LIMIT), replace=huge_replacement)
    big = answer(publisher, "loop", size=BROKER_LIMIT + 1)
    behind = [answer(publisher, f"after{i}") for i in range(3)]
    assert all(r.wait(WAIT) for r in behind)
    assert big.wait(WAIT)
    got = receive(rig.be, settings.infer_result_queue, 3)
    assert [m.body["job_id"] for m in got] == ["after0", "after1", "after2"]
    assert [c for c, _, _ in rig.refusals] == ["too_large", "too_large"]
    assert [e["properties"]["message_id"] for e in publisher.refused_log.entries()] == [
        "loop-inference_completed", "loop-inference_completed-refused"]
    assert big.refused_reason is not None
    assert_spool_empty(publisher)


# --- the publisher refuses first: MAX_MESSAGE_BYTES --------------------------------------


def test_an_answer_larger_than_max_message_bytes_never_enters_the_spool_and_a_failed_goes_in_its_place(
    rig: Rig,
) -> None:
    limit = 64 * 1024
    publisher = rig.publisher(MAX_MESSAGE_BYTES=str(limit))
    check_oversized_answer_replaced(rig, publisher, "too_large", f"{limit:,}-byte limit (MAX_MESSAGE_BYTES",
                                    up_front=True)


# --- the broker nacks ---------------------------------------------------------------------


def test_an_update_nacked_three_times_in_a_row_is_dropped_and_the_messages_behind_it_go_on(rig: Rig) -> None:
    s = rig.names.settings()
    full = f"{rig.names.prefix}.full"
    channel: Any = rig.be.channel  # pika-stubs get queue_declare's arguments wrong
    channel.queue_declare(full, exclusive=True, arguments={
        "x-queue-type": "classic", "x-max-length": 1, "x-overflow": "reject-publish"})
    channel.queue_bind(full, s.events_exchange, routing_key="train.update.stuck")
    channel.basic_publish("", full, b"{}", properties=pika.BasicProperties(delivery_mode=2))

    publisher = rig.publisher(op="train")
    stuck = answer(publisher, "stuck", kind="update", op="train")
    behind = [answer(publisher, f"go{i}", kind="update", op="train") for i in range(5)]
    assert all(r.wait(WAIT) for r in behind)
    assert stuck.wait(WAIT)
    # A refused progress message is dropped, not answered: the job ends with its own terminal.
    assert not stuck.replaced
    assert stuck.refused_reason
    assert "nacked by the broker 3 times" in stuck.refused_reason

    updates = [m for m in receive(rig.be, s.train_update_queue, 5) if m.body["job_id"] != "stuck"]
    assert [m.body["job_id"] for m in updates] == [f"go{i}" for i in range(5)]
    assert rig.be.drain(s.train_result_queue) == [], "no *_failed for a job that goes on"
    assert rig.counted("nacked") == 1
    assert [e["code"] for e in publisher.refused_log.entries()] == ["nacked"]
    assert_spool_empty(publisher)


# --- the worker's replace hook ------------------------------------------------------------


@pytest.mark.parametrize(
    ("exchange", "key", "message_type", "expected_key"),
    [
        pytest.param("ev", "infer.update.j1", "inference_completed", None, id="updates-are-dropped"),
        pytest.param("ev", "infer.result.j1", "inference_completed", "infer.result.j1", id="result-stays"),
        pytest.param("", "amq.gen-reply", "inference_completed", "amq.gen-reply", id="reply-to-stays"),
        pytest.param("", "req.lease", "request", None, id="requests-are-not-replaced"),
        pytest.param("other", "infer.result.j1", "inference_completed", None, id="foreign-exchange"),
        pytest.param("ev", "infer.result.bad id", "inference_completed", None, id="bad-job-id"),
    ],
)
def test_the_worker_replacer_routes_the_failed_like_the_job_and_leaves_requests_alone(
    exchange: str, key: str, message_type: str, expected_key: str | None
) -> None:
    replace: Callable[[Envelope, str], Envelope | None] = failure_replacer(
        Settings(events_exchange="ev"), "infer", infer_failure)
    refused = Envelope(exchange, key, json.dumps({"job_id": "j1"}).encode(),
                       {"message_id": "m1", "correlation_id": "c1", "type": message_type, "headers": {"h": 1}})
    got = replace(refused, "message of 2,000,000 bytes is larger than the 1,048,576-byte limit")
    if expected_key is None:
        assert got is None
        return
    assert got is not None
    assert got.replacement
    assert (got.exchange, got.routing_key) == (exchange, expected_key)
    body = json.loads(got.body)
    assert body["type"] == "inference_failed"
    assert body["job_id"] == "j1"
    assert "2,000,000 bytes" in body["error_message"]
    assert "max_det" in body["error_message"]
    assert got.properties["message_id"] == "m1-refused"
    assert got.properties["correlation_id"] == "c1"
    assert got.properties["type"] == "inference_failed"
    assert "headers" not in got.properties
