"""The shared publisher through the real broker: confirms, properties, concurrency,
an unreachable broker (through a cuttable proxy), the spool's bound, and the on-disk
spool surviving a killed process."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ai_service.broker import Topology
from ai_service.config import Settings
from ai_service.errors import SpoolFull
from ai_service.publisher import Publisher, Receipt
from ai_service.spool import Envelope, Spool
from ai_service.worker import EXIT_CONFIG, spool_dir
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, Received
from tests.support.procs import REPO
from tests.support.proxy import CuttableProxy

PublisherFactory = Callable[..., Publisher]


@pytest.fixture
def proxy() -> Iterator[CuttableProxy]:
    p = CuttableProxy(5672)
    yield p
    p.close()


@pytest.fixture
def make_publisher(tmp_path: Path, worker_env: dict[str, str]) -> Iterator[PublisherFactory]:
    """In-process Publishers on this test's names; stopped after the test."""
    publishers: list[Publisher] = []

    def factory(port: int = 5672, **env: str) -> Publisher:
        settings = Settings.from_env({**worker_env, "RABBITMQ_PORT": str(port), "RECONNECT_MAX_DELAY": "1", **env})
        publisher = Publisher(settings, spool_dir=tmp_path / f"spool-{len(publishers)}", topology=Topology(settings))
        publishers.append(publisher)
        publisher.start()
        assert publisher.wait_connected(15), "publisher did not connect"
        return publisher

    yield factory
    for publisher in publishers:
        publisher.stop(timeout=2)


def publish_numbered(publisher: Publisher, n: int, tag: str = "job", **kwargs: Any) -> Receipt:
    s = publisher.settings
    body = json.dumps({"type": "epoch_update", "job_id": f"{tag}-{n}", "tag": tag, "n": n}).encode()
    return publisher.publish(
        s.events_exchange, f"train.update.{tag}-{n}", body,
        message_type="epoch_update", correlation_id=f"{tag}-{n}", **kwargs,
    )


def collect(be: BE, queue: str, distinct: int, timeout: float = 30.0, quiet: float = 0.5) -> list[Received]:
    """Consume ``queue`` until ``distinct`` different message_ids arrived and it stays quiet."""
    out: list[Received] = []
    ids: set[str] = set()
    deadline = time.monotonic() + timeout
    channel: Any = be.channel  # pika-stubs type consume() as returning None
    try:
        for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=quiet):
            if method is not None:
                out.append(Received(json.loads(body), props, str(method.routing_key), queue))
                ids.add(str(props.message_id))
            elif len(ids) >= distinct:
                return out
            if time.monotonic() > deadline:
                break
    finally:
        channel.cancel()
    raise AssertionError(f"{len(ids)} of {distinct} messages arrived on {queue} within {timeout} s")


def first_occurrences(messages: list[Received]) -> list[Received]:
    """The messages in arrival order, each message_id once; checks duplicates are identical."""
    seen: dict[str, Received] = {}
    for m in messages:
        mid = str(m.properties.message_id)
        if mid in seen:
            assert seen[mid].body == m.body, f"message_id {mid} reused for a different message"
            continue
        seen[mid] = m
    return list(seen.values())


# --- in-process publisher ------------------------------------------------------------


def test_a_published_message_is_confirmed_and_arrives_with_every_contract_property(
    be: BE, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher()
    before = int(time.time())
    receipt = publish_numbered(publisher, 1)
    assert receipt.wait(10)
    assert receipt.confirmed
    assert not receipt.unroutable
    other = publish_numbered(publisher, 2)
    assert other.wait(10)
    first, second = collect(be, be.settings.train_update_queue, 2, timeout=10)
    p = first.properties
    assert first.body == {"type": "epoch_update", "job_id": "job-1", "tag": "job", "n": 1}
    assert first.routing_key == "train.update.job-1"
    assert p.content_type == "application/json"
    assert p.delivery_mode == 2
    assert p.message_id == receipt.message_id
    assert len(p.message_id) >= 16
    assert second.properties.message_id == other.message_id != p.message_id
    assert p.correlation_id == "job-1"
    assert p.type == "epoch_update"
    assert isinstance(p.timestamp, int)
    assert before - 1 <= p.timestamp <= time.time() + 1
    assert p.app_id == "ai-service"
    assert publisher.pending == 0
    assert len(publisher.spool) == 0


def test_a_message_no_queue_is_bound_for_is_reported_unroutable_and_does_not_hold_up_the_next(
    be: BE, make_publisher: PublisherFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ai_service.publisher")
    publisher = make_publisher()
    lost = publisher.publish(publisher.settings.events_exchange, "nobody.listens.here", b"{}", message_type="x")
    after = publish_numbered(publisher, 1)
    assert lost.wait(10)
    assert lost.unroutable
    assert after.wait(10)
    assert not after.unroutable
    assert [m.body["n"] for m in collect(be, be.settings.train_update_queue, 1, timeout=10)] == [1]
    assert "unroutable" in caplog.text
    assert lost.message_id in caplog.text
    assert publisher.pending == 0
    assert len(publisher.spool) == 0


def test_two_hundred_messages_from_four_threads_all_arrive_in_per_thread_order_without_duplicates(
    be: BE, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher()
    receipts: dict[str, list[Receipt]] = {}
    barrier = threading.Barrier(4)

    def sender(tag: str) -> None:
        barrier.wait()
        receipts[tag] = [publish_numbered(publisher, i, tag) for i in range(50)]

    threads = [threading.Thread(target=sender, args=(f"t{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(receipts) == 4
    assert all(r.wait(30) for rs in receipts.values() for r in rs)
    got = collect(be, be.settings.train_update_queue, 200, timeout=30)
    assert len(got) == 200
    ids = [m.properties.message_id for m in got]
    assert len(set(ids)) == 200
    assert set(ids) == {r.message_id for rs in receipts.values() for r in rs}
    for tag in receipts:
        assert [m.body["n"] for m in got if m.body["tag"] == tag] == list(range(50)), tag
    # The threads really interleaved (otherwise this test proves little).
    tags = [m.body["tag"] for m in got]
    assert sum(a != b for a, b in itertools.pairwise(tags)) > 3


def test_messages_published_while_the_broker_is_unreachable_all_arrive_in_order_after_it_returns(
    be: BE, make_publisher: PublisherFactory, proxy: CuttableProxy
) -> None:
    publisher = make_publisher(port=proxy.port)
    assert publish_numbered(publisher, -1, "warm").wait(10)
    proxy.cut()
    receipts = [publish_numbered(publisher, i, "cut") for i in range(50)]
    time.sleep(1.5)  # the publisher notices and retries against a refusing endpoint
    assert not any(r.confirmed for r in receipts)
    assert publisher.pending == 50
    assert len(publisher.spool) == 50
    proxy.restore()
    assert all(r.wait(20) for r in receipts), "not every message was confirmed after the broker returned"
    got = collect(be, be.settings.train_update_queue, 51, timeout=20)
    unique = [m for m in first_occurrences(got) if m.body["tag"] == "cut"]
    assert [m.body["n"] for m in unique] == list(range(50))
    assert [m.properties.message_id for m in unique] == [r.message_id for r in receipts]
    assert publisher.reconnects >= 1
    assert publisher.pending == 0
    assert len(publisher.spool) == 0


def test_a_connection_cut_in_the_middle_of_a_burst_loses_nothing_and_repeats_only_same_message_ids(
    be: BE, make_publisher: PublisherFactory, proxy: CuttableProxy, record_property: Any
) -> None:
    publisher = make_publisher(port=proxy.port)
    count = 500
    receipts: list[Receipt] = []
    burst = threading.Thread(target=lambda: receipts.extend(publish_numbered(publisher, i, "burst")
                                                            for i in range(count)))
    burst.start()
    deadline = time.monotonic() + 10
    while publisher.confirmed_count < 50 and time.monotonic() < deadline:
        time.sleep(0.0005)
    proxy.cut()
    time.sleep(0.5)  # the burst goes on into the spool while the broker is away
    in_flight = publisher.pending
    assert in_flight > 0, "the cut did not land in the middle of the burst"
    assert publisher.confirmed_count < count, "the cut did not land in the middle of the burst"
    proxy.restore()
    burst.join(30)
    assert len(receipts) == count
    assert all(r.wait(20) for r in receipts), "not every message was confirmed after the broker returned"
    got = collect(be, be.settings.train_update_queue, count, timeout=20)
    unique = first_occurrences(got)
    assert [m.body["n"] for m in unique] == list(range(count))
    assert [m.properties.message_id for m in unique] == [r.message_id for r in receipts]
    record_property("duplicates_after_cut", len(got) - count)
    record_property("unconfirmed_at_cut", in_flight)
    record_property("in_flight_when_lost", publisher.lost_in_flight)
    assert len(got) - count <= publisher.lost_in_flight, \
        "a message came twice that was not in flight (sent, unconfirmed) when the connection was lost"
    assert publisher.reconnects >= 1


def test_a_full_spool_refuses_non_blocking_publishes_loudly_and_blocking_ones_resume_after_restore(
    be: BE, make_publisher: PublisherFactory, proxy: CuttableProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ai_service.publisher")
    publisher = make_publisher(port=proxy.port, SPOOL_MAX_MESSAGES="5")
    proxy.cut()
    receipts = [publish_numbered(publisher, i, "full", block=False) for i in range(5)]
    with pytest.raises(SpoolFull):
        publish_numbered(publisher, 5, "full", block=False)
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR and "FULL" in r.getMessage()]
    assert len(loud) == 1, caplog.text
    assert "5 messages unconfirmed" in loud[0].getMessage()

    blocked: list[Receipt] = []
    waiter = threading.Thread(target=lambda: blocked.append(publish_numbered(publisher, 5, "full")))
    waiter.start()
    waiter.join(1.5)
    assert waiter.is_alive(), "a blocking publish into a full spool returned while the broker was away"
    proxy.restore()
    waiter.join(20)
    assert not waiter.is_alive(), "the blocking publish did not resume after the broker returned"
    assert blocked, "the blocking publish did not resume after the broker returned"
    assert all(r.wait(20) for r in [*receipts, *blocked])
    got = first_occurrences(collect(be, be.settings.train_update_queue, 6, timeout=20))
    assert [m.body["n"] for m in got] == list(range(6))


def test_sixteen_jobs_publishing_at_once_keep_each_jobs_order_with_many_messages_in_flight(
    be: BE, make_publisher: PublisherFactory
) -> None:
    publisher = make_publisher()
    jobs, each = 16, 60
    receipts: dict[str, list[Receipt]] = {}
    most_in_flight = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal most_in_flight
        while not sampling.is_set():
            most_in_flight = max(most_in_flight, publisher.in_flight)
            time.sleep(0.0002)

    def job(tag: str) -> None:
        receipts[tag] = [publish_numbered(publisher, i, tag) for i in range(each)]

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=job, args=(f"j{k}",)) for k in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.wait(30) for rs in receipts.values() for r in rs)
    sampling.set()
    sampler.join()
    got = first_occurrences(collect(be, be.settings.train_update_queue, jobs * each, timeout=30))
    assert len(got) == jobs * each
    for tag in receipts:
        assert [m.body["n"] for m in got if m.body["tag"] == tag] == list(range(each)), tag
    assert most_in_flight > 1, "never more than one message in flight: the publisher did not pipeline"


def test_answers_sharing_a_bes_correlation_id_but_not_a_job_are_pipelined_and_a_jobs_order_key_survives_the_spool(
    be: BE, make_publisher: PublisherFactory, tmp_path: Path
) -> None:
    publisher = make_publisher()
    s = publisher.settings
    most_in_flight = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal most_in_flight
        while not sampling.is_set():
            most_in_flight = max(most_in_flight, publisher.in_flight)
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    receipts = []
    for n in range(300):  # a BE that sets one correlation_id on every request: each answer its own job
        body = json.dumps({"type": "epoch_update", "job_id": f"a-{n}", "tag": "shared", "n": n}).encode()
        receipts.append(publisher.publish(s.events_exchange, f"train.update.a-{n}", body, message_type="epoch_update",
                                          correlation_id="one-for-all", order_key=f"infer/a-{n}", block=False))
    assert all(r.wait(30) for r in receipts)
    sampling.set()
    sampler.join()
    assert len(first_occurrences(collect(be, s.train_update_queue, 300, timeout=30))) == 300
    assert most_in_flight > 1, "answers of different jobs were held one behind another for sharing a correlation_id"

    spool = Spool(tmp_path / "spool", 100)  # the order key is part of the record, so a re-send keeps it
    spool.add(Envelope("x", "k", b"{}", {"correlation_id": "one-for-all"}, order="train/j1"))
    spool.close()
    assert [e.job for e in Spool.peek(tmp_path / "spool")] == ["train/j1"]


def test_a_job_whose_message_the_broker_nacks_gets_its_later_messages_only_after_it_in_order_and_none_lost(
    be: BE, make_publisher: PublisherFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue at its ``x-max-length`` with ``reject-publish`` nacks; once it has room again it
    accepts what comes next.  The confirms are held back by a proxy, so that the room appears
    while the publisher still counts the nacked messages as in flight: whatever of a job it
    sent behind a nacked message would be accepted ahead of it."""
    caplog.set_level(logging.WARNING, logger="ai_service.publisher")
    s = be.settings
    full, probes = f"{be.settings.events_exchange}.nack_q", f"{be.settings.events_exchange}.probe_q"
    channel: Any = be.channel  # pika-stubs get queue_declare's arguments wrong
    channel.queue_declare(full, exclusive=True, arguments={
        "x-queue-type": "classic", "x-max-length": 5, "x-overflow": "reject-publish"})
    channel.queue_bind(full, s.events_exchange, routing_key="ordered.update.*")
    channel.queue_declare(probes, exclusive=True, arguments={"x-queue-type": "classic"})
    channel.queue_bind(probes, s.events_exchange, routing_key="probe.#")
    for _ in range(5):
        be.send(full, {"filler": True})
    holding = HoldingProxy(5672)
    try:
        publisher = make_publisher(port=holding.port)
        jobs, each = [f"j{k}" for k in range(4)], 6

        def publish(i: int) -> list[Receipt]:
            return [publisher.publish(s.events_exchange, f"ordered.update.{job}",
                                      json.dumps({"job": job, "n": i}).encode(), message_type="epoch_update",
                                      correlation_id=job) for job in jobs]

        def probe(n: int) -> None:
            """Once a probe is in its queue, the broker has routed all the publisher sent before it."""
            publisher.publish(s.events_exchange, f"probe.{n}", b"{}", message_type="probe")
            assert be.wait_count(probes, n, timeout=15) == n, "the probe did not arrive"

        holding.holding.set()  # from here the broker's acks and nacks do not reach the publisher
        receipts = [r for i in range(each // 2) for r in publish(i)]
        probe(1)  # the queue was full: what of these reached the broker was nacked
        assert len(be.drain(full)) == 5, "the queue was not full of fillers"
        receipts += [r for i in range(each // 2, each) for r in publish(i)]
        probe(2)  # the queue has room: what of these the broker got, it accepted
        got: list[Received] = []
        reader = threading.Thread(target=lambda: got.extend(collect(be, full, len(jobs) * each, timeout=30)))
        reader.start()  # from here the queue is drained as it fills: a retry finds room
        holding.holding.clear()
        assert all(r.wait(30) for r in receipts), "not every message was confirmed"
        reader.join(40)
    finally:
        holding.holding.clear()
        holding.close()
    nacked = [r for r in caplog.records if "Broker nacked message" in r.getMessage()]
    assert len(nacked) >= len(jobs), "the broker nacked less than each job's first message: the test proves little"
    unique = first_occurrences(got)
    assert sorted(m.properties.message_id for m in unique) == sorted(r.message_id for r in receipts), "lost"
    for job in jobs:
        assert [m.body["n"] for m in unique if m.body["job"] == job] == list(range(each)), job
    assert publisher.refused_count == 0
    assert publisher.pending == 0


class BrokenTopology(Topology):
    def declare(self, connection: Any) -> None:
        raise RuntimeError("injected bug")


def test_a_bug_on_the_publisher_thread_is_recorded_as_a_crash_said_loudly_and_the_messages_stay_spooled(
    tmp_path: Path, worker_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env(worker_env)
    publisher = Publisher(settings, spool_dir=tmp_path / "spool", topology=BrokenTopology(settings))
    with caplog.at_level(logging.CRITICAL, logger="ai_service.publisher"):
        publisher.start()
        receipt = publish_numbered(publisher, 1)
        assert publisher._thread is not None
        publisher._thread.join(15)
    try:
        assert isinstance(publisher.crashed, RuntimeError)
        assert str(publisher.crashed) == "injected bug"
        assert any("Publisher crashed on its thread" in r.getMessage() for r in caplog.records)
        assert not receipt.confirmed
        assert publisher.pending == 1
        assert [e.message_id for e in Spool.peek(publisher.spool.directory)] == [receipt.message_id]
    finally:
        publisher.stop(timeout=0)


class HoldingProxy(CuttableProxy):
    """A proxy that can hold back what the broker sends (confirms), while publishes still go through."""

    def __init__(self, target_port: int) -> None:
        self.holding = threading.Event()
        super().__init__(target_port)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        if src.getpeername()[1] != self.target[1]:
            return super()._pipe(src, dst)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.holding.is_set():
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass


# --- the spool across processes ------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Script:
    """``tests/support/publish_script.py`` in a subprocess, its output in a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str], label: str, *args: str) -> None:
        self.out = tmp_path / f"{label}.out"
        with open(self.out, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.publish_script", *args],
                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=fh, stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {marker!r} from the script (rc={self.proc.poll()}):\n{self.text()[-3000:]}")

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def scripts(tmp_path: Path) -> Iterator[Callable[..., Script]]:
    started: list[Script] = []

    def run(env: dict[str, str], label: str, *args: str) -> Script:
        s = Script(tmp_path, env, label, *args)
        started.append(s)
        return s

    yield run
    for s in started:
        s.kill()


def test_a_spool_left_by_a_killed_process_is_re_sent_in_order_with_the_same_message_ids(
    be: BE, worker_env: dict[str, str], scripts: Callable[..., Script]
) -> None:
    env = {**worker_env, "WORKER_NAME": "test/spooler", "RECONNECT_MAX_DELAY": "1"}
    spooler = scripts({**env, "RABBITMQ_PORT": str(closed_port())}, "spool", "spool", "30")
    spooler.wait_for("SPOOLED")
    spooled = json.loads(next(line for line in spooler.text().splitlines() if line.startswith("{")))
    assert spooled["pending"] == 30
    assert len(set(spooled["spooled"])) == 30
    directory = spool_dir(Settings.from_env(env), "train")
    assert [e.message_id for e in Spool.peek(directory)] == spooled["spooled"]  # on disk before publish() returned
    spooler.kill()

    drainer = scripts(env, "drain", "drain")
    assert drainer.wait(60) == 0, drainer.text()
    assert "DRAINED 0" in drainer.text()
    assert "Re-sending 30 message(s) left unconfirmed by a previous run" in drainer.text()
    got = first_occurrences(collect(be, be.settings.train_result_queue, 30, timeout=15))
    assert [m.body["n"] for m in got] == list(range(30))
    assert [m.properties.message_id for m in got] == spooled["spooled"]
    assert [m.properties.correlation_id for m in got] == [f"spool-{i}" for i in range(30)]
    assert all(m.properties.type == "training_completed" and m.properties.app_id == "ai-service"
               and m.properties.delivery_mode == 2 for m in got)
    assert Spool.peek(directory) == []
    assert list(directory.glob(f"*{Spool.SUFFIX}")) == []


def test_a_process_killed_with_messages_sent_but_unconfirmed_re_sends_them_all_after_a_restart(
    be: BE, worker_env: dict[str, str], scripts: Callable[..., Script], tmp_path: Path
) -> None:
    env = {**worker_env, "WORKER_NAME": "test/inflight", "RECONNECT_MAX_DELAY": "1"}
    holding = HoldingProxy(5672)
    try:
        go = tmp_path / "go"
        sender = scripts({**env, "RABBITMQ_PORT": str(holding.port)}, "inflight", "inflight", "40", str(go))
        sender.wait_for("CONNECTED")
        holding.holding.set()  # from here on the broker's confirms do not reach the process
        go.touch()
        sender.wait_for("SPOOLED")
        spooled = json.loads(next(line for line in sender.text().splitlines() if line.startswith("{")))
        assert be.wait_count(be.settings.train_result_queue, 40) == 40, "the messages did not reach the broker"
        sender.kill()  # kill -9: sent, routed, never confirmed to it
    finally:
        holding.holding.clear()
        holding.close()
    directory = spool_dir(Settings.from_env(env), "train")
    assert [e.message_id for e in Spool.peek(directory)] == spooled["spooled"]

    drainer = scripts(env, "drain", "drain")
    assert drainer.wait(60) == 0, drainer.text()
    assert "Re-sending 40 message(s) left unconfirmed by a previous run" in drainer.text()
    got = collect(be, be.settings.train_result_queue, 40, timeout=15)
    unique = first_occurrences(got)  # also: a repeated message_id is the same message
    assert [m.body["n"] for m in unique] == list(range(40))
    assert [m.properties.message_id for m in unique] == spooled["spooled"]
    assert len(got) == 80, "each message once before the kill and once re-sent: no other copies"
    assert Spool.peek(directory) == []


def test_a_second_process_on_a_spool_in_use_fails_clearly_with_spool_locked(
    be: BE, worker_env: dict[str, str], scripts: Callable[..., Script], start_worker: WorkerFactory
) -> None:
    env = {**worker_env, "WORKER_NAME": "test/spooler", "RECONNECT_MAX_DELAY": "1"}
    holder = scripts({**env, "RABBITMQ_PORT": str(closed_port())}, "hold", "spool", "3")
    holder.wait_for("SPOOLED")

    intruder = scripts(env, "intruder", "drain")
    assert intruder.wait(30) != 0
    assert "SpoolLocked" in intruder.text()
    assert "is in use by another process" in intruder.text()

    # A real worker with the same WORK_DIR and WORKER_NAME exits with a configuration
    # error and one clear log line (not a traceback that a JSON log pipeline would mangle).
    worker = start_worker(module="tests.support.sleepy_worker", env={"WORKER_NAME": "test/spooler"},
                          wait_started=False, name="intruder-worker")
    assert worker.wait(timeout=60) == EXIT_CONFIG
    lines = [line for line in worker.log().splitlines() if "is in use by another process" in line]
    assert len(lines) == 1, worker.log()
    assert "[RMQ]" in lines[0], worker.log()
    assert "WORKER_NAME" in lines[0], worker.log()
    assert "Traceback" not in worker.log()

    # The holder's messages are still safe on disk, and go out once it is gone.
    holder.kill()
    drainer = scripts(env, "drain", "drain")
    assert drainer.wait(60) == 0, drainer.text()
    got = first_occurrences(collect(be, be.settings.train_result_queue, 3, timeout=15))
    assert [m.body["n"] for m in got] == [0, 1, 2]
