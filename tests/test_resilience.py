"""A real worker process riding out a cut connection, a broker restart and a request
queue that already exists with other arguments.

The worker is ``tests/support/sleepy_worker.py`` (the real runtime with a scripted
handler).  Connection cuts go through a :class:`CuttableProxy` in front of the shared
broker; the restart uses a private node (``tests/support/rabbit.py``) so the shared
broker is never touched.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from ai_service.broker import Topology
from ai_service.config import Settings
from ai_service.consumer import Consumer
from ai_service.errors import AIServiceError, JobCancelled
from ai_service.messages import TrainingFailed, TrainingRequest
from ai_service.operation import JobContext, Operation, Resources
from ai_service.publisher import Publisher
from ai_service.spool import Spool
from ai_service.worker import spool_dir
from tests.conftest import WorkerFactory
from tests.support import rabbit
from tests.support.amqp import BE, Received
from tests.support.procs import WorkerProcess
from tests.support.proxy import CuttableProxy

SLEEPY = "tests.support.sleepy_worker"
FAST_RECONNECT = {"RECONNECT_MAX_DELAY": "1"}
CLASSIC: Any = {"x-queue-type": "classic"}  # pika-stubs mistype queue_declare(arguments=)


def request(job_id: str, tenths: int = 1) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": "datasets/my-dataset/", "name": "my-dataset"},
        "output": {"prefix": "models/yolov8n", "model_name": "my-dataset.pt"},
        "hyperparams": {"model": "sleep", "epochs": tenths, "batch": 16, "imgsz": 640},
    }


@pytest.fixture
def proxy() -> Iterator[CuttableProxy]:
    p = CuttableProxy(5672)
    yield p
    p.close()


@pytest.fixture
def private_broker() -> Iterator[rabbit.PrivateBroker]:
    """A private node on port 5673, stopped and wiped after the test whatever happens."""
    if not rabbit.available():
        pytest.fail("rabbitmq-server is not installed")
    with rabbit.private_broker() as broker:
        yield broker


def wait_job(be: BE, job_id: str, results: list[Received], timeout: float = 30.0) -> Received:
    return be.wait_for(be.settings.train_result_queue, lambda m: m.body.get("job_id") == job_id, timeout, results)


def settle_results(be: BE, results: list[Received], quiet: float = 1.0) -> None:
    """Collect what else arrives on the result queue until it stays quiet."""
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        msg = be.get(be.settings.train_result_queue)
        if msg is None:
            be.connection.sleep(0.05)
            continue
        results.append(msg)
        last = time.monotonic()


def terminal_types(results: list[Received]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in results:
        out.setdefault(str(m.body["job_id"]), []).append(m.type)
    return out


def wait_acked(queue: str, timeout: float = 15.0) -> None:
    """Wait until ``queue`` has no unacknowledged delivery (read-only rabbitmqctl query).

    A BE sees a job's result before the worker's ack reaches the broker (publish, wait
    for the confirm, then ack): a cut in between redelivers the job.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name",
                              "messages_unacknowledged"], capture_output=True, text=True, check=True).stdout
        counts = dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)
        if counts.get(queue) == "0":
            return
        time.sleep(0.2)
    raise AssertionError(f"{queue} still has unacknowledged deliveries after {timeout} s")


def runs_of(worker: WorkerProcess, job_id: str) -> int:
    return worker.log().count(f"[{job_id}] sleeping")


def test_a_worker_cut_off_from_the_broker_reconnects_and_keeps_consuming(
    proxy: CuttableProxy, be: BE, start_worker: WorkerFactory, record_property: Any
) -> None:
    worker = start_worker(module=SLEEPY, env={"RABBITMQ_PORT": str(proxy.port), **FAST_RECONNECT})
    results: list[Received] = []
    be.send_train(request("cut-1"))
    wait_job(be, "cut-1", results)
    wait_acked(be.settings.train_request_queue)

    # Cut while idle: the worker notices, retries against the refusing proxy, reconnects.
    proxy.cut()
    worker.wait_log("Connection lost", timeout=10)
    worker.wait_log("❌ Failed to connect to RabbitMQ", timeout=10)
    proxy.restore()
    worker.wait_log("[RMQ] Reconnected to", timeout=15)
    be.send_train(request("cut-2"))
    wait_job(be, "cut-2", results)

    # Cut while a handler sleeps 3 s: the broker requeues the unacked delivery.
    be.send_train(request("cut-3", tenths=30))
    worker.wait_log("[cut-3] sleeping")
    proxy.cut()
    worker.wait_log("Connection lost", count=2, timeout=10)
    time.sleep(0.5)
    proxy.restore()
    worker.wait_log("[RMQ] Reconnected to", count=2, timeout=15)
    be.send_train(request("cut-4"))
    wait_job(be, "cut-4", results, timeout=40)
    settle_results(be, results)

    by_job = terminal_types(results)
    assert set(by_job) == {"cut-1", "cut-2", "cut-3", "cut-4"}, by_job
    for job_id, types in by_job.items():
        assert set(types) == {"training_completed"}, (job_id, types)
    for job_id in ("cut-1", "cut-2", "cut-4"):
        assert len(by_job[job_id]) == 1, job_id
        assert runs_of(worker, job_id) == 1, job_id
    # The cut mid-handler makes the broker redeliver cut-3 while its first run still
    # sleeps; that run answers, and the redelivery is only acknowledged: one run, one answer.
    runs, answers = runs_of(worker, "cut-3"), len(by_job["cut-3"])
    record_property("cut_mid_handler_runs", runs)
    record_property("cut_mid_handler_answers", answers)
    assert (runs, answers) == (1, 1), worker.log()
    assert "belongs to a closed channel" in worker.log()
    assert "[cut-3] Answered before the connection dropped; acknowledging the redelivery only" in worker.log()
    assert be.count(be.settings.train_request_queue) == 0
    assert be.count(be.settings.train_request_queue + ".dlq") == 0
    assert "Publisher reconnected" in worker.log()
    assert worker.alive


@pytest.mark.xdist_group("private-broker")
def test_a_worker_rides_out_a_broker_restart_and_what_it_published_meanwhile_arrives(
    private_broker: rabbit.PrivateBroker, worker_env: dict[str, str], start_worker: WorkerFactory,
    record_property: Any,
) -> None:
    env = {"RABBITMQ_PORT": str(private_broker.port), **FAST_RECONNECT}
    settings = Settings.from_env({**worker_env, **env, "WORKER_NAME": "test/restart"})
    be = BE(settings)
    worker = start_worker(module=SLEEPY, env=env, name="restart")
    results: list[Received] = []
    be.send_train(request("rs-1"))
    wait_job(be, "rs-1", results)

    be.send_train(request("rs-2", tenths=70))  # outlasts the broker stop (~2 s), even on a busy machine
    worker.wait_log("[rs-2] sleeping")
    be.connection.close()
    private_broker.stop()
    assert "[rs-2] Done" not in worker.log(), "the job ended before the broker was down; make it longer"
    worker.wait_log("Connection lost", timeout=10)
    assert "CONNECTION_FORCED" in worker.log()
    # The job ends while the broker is away: its result waits in the publisher's spool.
    worker.wait_log("[Handler] [rs-2] Done", timeout=15)
    spooled = Spool.peek(spool_dir(settings, "train"))  # the spool log, read without its lock
    assert len(spooled) == 1
    assert b'"rs-2"' in spooled[0].body

    private_broker.start()
    up = time.monotonic()
    worker.wait_log("[RMQ] Reconnected to", timeout=10)
    worker.wait_log("[RMQ] Publisher reconnected to", timeout=10)
    record_property("reconnect_after_restart_s", round(time.monotonic() - up, 2))
    be = BE(settings)
    wait_job(be, "rs-2", results, timeout=20)
    be.send_train(request("rs-3"))
    wait_job(be, "rs-3", results, timeout=30)
    settle_results(be, results)
    assert worker.stop(timeout=20) == 0

    by_job = terminal_types(results)
    assert set(by_job) == {"rs-1", "rs-2", "rs-3"}, by_job
    for job_id, types in by_job.items():
        assert set(types) == {"training_completed"}, (job_id, types)
    # The delivery of rs-2 was unacked when the broker went down: it comes back and runs
    # again (at the core level), answering again with the same type.
    record_property("restart_mid_handler_runs", runs_of(worker, "rs-2"))
    assert len(by_job["rs-2"]) == runs_of(worker, "rs-2") <= 2
    assert Spool.peek(spool_dir(settings, "train")) == []
    assert be.count(settings.train_request_queue) == 0
    be.connection.close()


def test_a_request_queue_that_exists_with_other_arguments_gets_one_warning_and_is_still_consumed(
    worker_env: dict[str, str], start_worker: WorkerFactory
) -> None:
    settings = Settings.from_env(worker_env)
    queue = settings.train_request_queue
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    connection.channel().queue_declare(queue, durable=True, arguments=CLASSIC)
    connection.close()
    be = BE(settings)  # declares the rest of the topology (and meets the same queue)
    try:
        worker = start_worker(module=SLEEPY, env=FAST_RECONNECT)
        be.send_train(request("odd-1"))
        assert be.terminal(settings.train_result_queue, "odd-1", timeout=20).type == "training_completed"
        be.send_train(request("odd-2"))
        assert be.terminal(settings.train_result_queue, "odd-2", timeout=20).type == "training_completed"
        log = worker.log()
        warnings = [line for line in log.splitlines() if "already exists with other arguments" in line]
        assert len(warnings) == 1, log
        assert repr(queue) in warnings[0]
        assert "WARNING" in warnings[0]
        assert "Connection lost" not in log
        assert "Failed to connect" not in log
        # The queue was used as it is, not replaced.
        probe = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
        try:
            probe.channel().queue_declare(queue, durable=True, arguments=CLASSIC)
        finally:
            probe.close()
    finally:
        be.close()


def test_a_job_redelivered_while_its_cut_off_first_run_still_ends_stays_tracked_and_cancellable(
    proxy: CuttableProxy, be: BE, worker_env: dict[str, str], tmp_path: Any
) -> None:
    """prefetch > 1: delivery tags restart at 1 on the new channel, so the redelivered job
    can carry the same tag as its first run, which is still ending on the old channel.
    The redelivery waits for that first run; it ended without an answer, so it runs."""
    settings = Settings.from_env({**worker_env, "RABBITMQ_PORT": str(proxy.port), **FAST_RECONNECT})
    runs: list[JobContext] = []
    first_run_may_end = threading.Event()

    def handle(request: TrainingRequest, ctx: JobContext) -> None:
        runs.append(ctx)
        if len(runs) == 1:
            first_run_may_end.wait(20)
            return
        if not ctx.cancelled.wait(10):
            raise AssertionError("never cancelled")
        raise JobCancelled("cancelled")

    def failure(job_id: str, error: AIServiceError) -> TrainingFailed:
        return TrainingFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)

    op = Operation(name="train", request_model=TrainingRequest, handler=handle, failure=failure, prefetch=2)
    direct = Settings.from_env(worker_env)
    publisher = Publisher(direct, spool_dir=tmp_path / "spool", topology=Topology(direct))
    publisher.start()
    consumer = Consumer(settings, op, publisher, Resources(settings=settings), Topology(settings))
    consumer.start()
    try:
        assert consumer.started.wait(15)
        be.send_train(request("twice"))
        deadline = time.monotonic() + 10
        while not runs and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.cut()
        time.sleep(0.3)
        proxy.restore()
        deadline = time.monotonic() + 15
        while consumer.busy < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert consumer.busy == 2, "the job was not redelivered after the cut"
        time.sleep(0.5)
        assert len(runs) == 1, "the redelivery ran while its first run was still going"
        first_run_may_end.set()  # it ends without an answer: the redelivery runs now
        deadline = time.monotonic() + 15
        while len(runs) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(runs) == 2
        assert runs[1].delivery.redelivered
        time.sleep(1.0)  # the first run settles (on a channel that is gone)
        assert consumer.busy == 1, "the redelivered job is no longer tracked as in flight"
        be.cancel("twice")
        assert runs[1].cancelled.wait(5), "a cancel did not reach the redelivered job"
        done = be.terminal(be.settings.train_result_queue, "twice", timeout=15)
        assert done.body["error_code"] == "cancelled"
    finally:
        first_run_may_end.set()
        consumer.request_stop(force=True)
        consumer.join(10)
        publisher.stop(timeout=2)
