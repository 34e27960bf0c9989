"""Long-job reliability through real worker processes, real training and the real broker:
leases, checkpoint resume, exactly one terminal message, cancellation, warm shutdown."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ai_service.config import Settings
from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, Received
from tests.support.rabbit import private_broker
from tests.test_training import train_request

LEASE = "4"  # seconds; lease messages come back every 2 s


@pytest.fixture
def dataset(worker_env: dict[str, str], shapes_dir: Path) -> LocalStorage:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_dir(shapes_dir, "datasets/shapes")
    return storage


class Journal:
    """Everything the BE received for the test's jobs, in arrival order."""

    def __init__(self, be: BE) -> None:
        self.be = be
        self.messages: list[Received] = []

    def poll(self) -> None:
        for q in (self.be.settings.train_update_queue, self.be.settings.train_result_queue):
            self.messages.extend(self.be.drain(q))

    def of(self, job_id: str, type_: str | None = None) -> list[dict[str, Any]]:
        return [m.body for m in self.messages if m.body["job_id"] == job_id and (type_ is None or m.type == type_)]

    def wait(self, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out; got {[m.body for m in self.messages][-10:]}")

    def wait_epoch(self, job_id: str, epoch: int, timeout: float = 120) -> None:
        self.wait(lambda: any(u["current_epoch"] >= epoch for u in self.of(job_id, "epoch_update")), timeout)

    def wait_terminal(self, job_id: str, timeout: float = 180) -> dict[str, Any]:
        self.wait(lambda: any(m.type.endswith(("_completed", "_failed", "_cancelled"))
                              for m in self.messages if m.body["job_id"] == job_id), timeout)
        time.sleep(1.0)  # a duplicate would arrive right behind it
        self.poll()
        terminals = [m for m in self.messages if m.body["job_id"] == job_id and m.queue.endswith("result_q")]
        ids = {m.properties.message_id for m in terminals}
        assert len(ids) == 1, f"expected exactly one terminal message, got {[m.body for m in terminals]}"
        return terminals[0].body

    def message_ids(self, job_id: str) -> list[str]:
        return [m.properties.message_id for m in self.messages if m.body["job_id"] == job_id]


def long_env(**extra: str) -> dict[str, str]:
    return {"LEASE_SECONDS": LEASE, **extra}


def assert_epochs_not_retrained(journal: Journal, job_id: str, epochs: int) -> dict[str, Any]:
    """Every epoch reported once, in order; the resumed run started after the last one."""
    updates = journal.of(job_id, "epoch_update")
    assert [u["current_epoch"] for u in updates] == list(range(1, epochs + 1)), updates
    progress = [u["progress"] for u in updates]
    assert progress == sorted(progress)
    starts = journal.of(job_id, "training_started")
    assert len(starts) >= 2
    assert starts[0]["resumed_from_epoch"] == 0
    return starts[-1]


def test_a_worker_killed_after_epoch_3_of_8_resumes_on_restart_and_finishes_once(
    be: BE, start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    journal = Journal(be)
    worker = start_worker("train", env=long_env(), name="victim")
    be.send_train(train_request("kill9", epochs=8))
    journal.wait_epoch("kill9", 3)
    worker.kill()
    start_worker("train", env=long_env(), name="restarted")
    done = journal.wait_terminal("kill9")
    assert done["type"] == "training_completed"
    assert done["final_metrics"]["training_epochs"] == 8
    resumed = assert_epochs_not_retrained(journal, "kill9", 8)
    assert resumed["resumed_from_epoch"] >= 3
    assert dataset.stat(done["model_path"]) is not None


@pytest.mark.parametrize("epoch", [2, 4], ids=["its-upload-still-pending", "last-epoch-stored"])
def test_a_worker_lost_after_storing_an_epoch_but_before_announcing_it_announces_it_on_resume(
    epoch: int, be: BE, start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    journal = Journal(be)
    env = long_env(TEST_FAULT=f"die-after-save@{epoch}")
    victim = start_worker(module="tests.support.training_worker", env=env, name="victim")
    be.send_train(train_request("gap", epochs=4))
    deadline = time.monotonic() + 180
    while victim.alive and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not victim.alive, "the fault did not fire"
    start_worker(module="tests.support.training_worker", env=env, name="after")
    done = journal.wait_terminal("gap")
    assert done["type"] == "training_completed", done
    assert_epochs_not_retrained(journal, "gap", 4)
    assert dataset.stat(done["model_path"]) is not None


def test_a_dead_workers_job_is_taken_over_by_another_worker_within_a_lease_period(
    be: BE, start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    journal = Journal(be)
    first = start_worker("train", env=long_env(), name="first")
    be.send_train(train_request("takeover", epochs=6))
    journal.wait_epoch("takeover", 2)
    start_worker("train", env=long_env(), name="second")  # idle, waiting
    first.kill()
    killed_at = time.monotonic()
    journal.wait(lambda: len(journal.of("takeover", "training_started")) >= 2, timeout=60)
    took = time.monotonic() - killed_at
    assert took < 3 * float(LEASE), f"takeover took {took:.1f} s"
    done = journal.wait_terminal("takeover")
    assert done["type"] == "training_completed"
    resumed = assert_epochs_not_retrained(journal, "takeover", 6)
    assert resumed["worker"].endswith("second")
    assert resumed["resumed_from_epoch"] >= 2


def test_the_same_request_published_twice_trains_once_and_answers_once(
    be: BE, start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    journal = Journal(be)
    start_worker("train", env=long_env(), name="a")
    start_worker("train", env=long_env(), name="b")
    body = train_request("twice", epochs=3)
    be.send_train(body)
    be.send_train(body)
    done = journal.wait_terminal("twice")
    assert done["type"] == "training_completed"
    assert len(journal.of("twice", "training_started")) == 1
    assert [u["current_epoch"] for u in journal.of("twice", "epoch_update")] == [1, 2, 3]
    # Sent again after it finished: the stored terminal message, identical (same message_id).
    first_id = next(m for m in journal.messages if m.type == "training_completed").properties.message_id
    be.send_train(body)
    again = be.wait_for(be.settings.train_result_queue, timeout=30)
    assert again.body == done
    assert again.properties.message_id == first_id


def test_a_request_with_a_forged_lease_header_is_answered_invalid_and_dead_lettered(
    be: BE, start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    start_worker("train", env=long_env())
    be.send(be.settings.train_request_queue, train_request("forged", epochs=1), headers={"x-ai-lease": "guess"})
    failed = be.terminal(be.settings.train_result_queue, "forged", timeout=60)
    assert failed.type == "training_failed"
    assert failed.body["error_code"] == "invalid_request"
    assert "x-ai-lease" in failed.body["error_message"]
    deadline = time.monotonic() + 10
    while be.count(be.settings.train_request_queue + ".dlq") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert be.count(be.settings.train_request_queue + ".dlq") == 1
    assert dataset.stat("jobs/train/forged.json") is None, "no job record for a refused request"


def test_cancel_mid_training_ends_with_one_training_cancelled_and_a_checkpoint(
    be: BE, start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    journal = Journal(be)
    start_worker("train", env=long_env())
    be.send_train(train_request("cancelme", epochs=50))
    journal.wait_epoch("cancelme", 2)
    be.cancel("cancelme")
    done = journal.wait_terminal("cancelme", timeout=60)
    assert done["type"] == "training_cancelled"
    assert done["status"] == "cancelled"
    assert done["current_epoch"] >= 2
    assert done["checkpoint_path"]
    assert dataset.stat(done["checkpoint_path"]) is not None
    # Cancelled before any worker took it: answered as soon as one does.
    be.cancel("early")
    time.sleep(1.0)
    be.send_train(train_request("early", epochs=2))
    early = journal.wait_terminal("early", timeout=60)
    assert early["type"] == "training_cancelled"
    assert early["checkpoint_path"] is None
    assert journal.of("early", "training_started") == []
    # The worker takes the next job.
    be.send_train(train_request("next", epochs=1))
    assert journal.wait_terminal("next")["type"] == "training_completed"


def test_sigterm_mid_training_hands_the_job_back_and_it_resumes_after_restart(
    be: BE, start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    journal = Journal(be)
    worker = start_worker("train", env=long_env(), name="leaving")
    be.send_train(train_request("handback", epochs=6))
    journal.wait_epoch("handback", 2)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    journal.poll()
    assert not [m for m in journal.messages if m.queue.endswith("result_q")], "no terminal from the leaving worker"
    start_worker("train", env=long_env(), name="arriving")
    done = journal.wait_terminal("handback")
    assert done["type"] == "training_completed"
    resumed = assert_epochs_not_retrained(journal, "handback", 6)
    assert resumed["resumed_from_epoch"] >= 2
    assert "Handed handback back" in worker.log()


def test_a_job_that_loses_its_worker_more_often_than_the_limit_fails_and_is_dead_lettered(
    be: BE, start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    journal = Journal(be)
    env = long_env(RABBITMQ_DELIVERY_LIMIT="3")
    body = train_request("doomed", epochs=30)
    be.send_train(body)
    for attempt in range(1, 4):
        worker = start_worker("train", env=env, name=f"doomed-{attempt}")
        journal.wait(lambda n=attempt: len(journal.of("doomed", "training_started")) >= n, timeout=60)
        worker.kill()
    start_worker("train", env=env, name="doomed-last")
    done = journal.wait_terminal("doomed", timeout=60)
    assert done["type"] == "training_failed"
    assert "RABBITMQ_DELIVERY_LIMIT" in done["error_message"]
    dlq = be.dlq_bodies(be.settings.train_request_queue)
    assert [json.loads(b)["job_id"] for b in dlq] == ["doomed"]


@pytest.mark.xdist_group("private-broker")
def test_a_job_longer_than_the_consumer_timeout_completes_once_without_a_406(
    tmp_path: Path, worker_env: dict[str, str], start_worker: WorkerFactory, dataset: LocalStorage
) -> None:
    with private_broker(config="consumer_timeout = 60000") as broker:
        env = {**worker_env, "RABBITMQ_PORT": str(broker.port)}
        client = BE(Settings.from_env(env))
        journal = Journal(client)
        worker = start_worker("train", env={**long_env(), "RABBITMQ_PORT": str(broker.port)})
        started = time.monotonic()
        # patience: on a quiet machine 100 epochs pass without improvement before the cancel.
        client.send_train(train_request("marathon", epochs=10000, imgsz=32, patience=10000))
        # Train for well past the 60 s timeout and its once-a-minute check, then cancel.
        while time.monotonic() - started < 150:
            journal.poll()
            time.sleep(2)
        client.cancel("marathon")
        done = journal.wait_terminal("marathon", timeout=120)
        assert done["type"] == "training_cancelled"
        assert len(journal.of("marathon", "training_started")) == 1
        epochs = [u["current_epoch"] for u in journal.of("marathon", "epoch_update")]
        assert epochs == list(range(1, len(epochs) + 1))
        assert len(epochs) >= 2
        log = worker.log()
        assert "PRECONDITION_FAILED" not in log, log[-3000:]
        assert "Connection lost" not in log, log[-3000:]
        client.close()
