"""Leases two hosts cannot both win: job records are written with conditional requests
(create-exclusive, replace-if-match) where the store has them; the write-then-read-back
protocol is only the fallback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ai_service.jobs import JobRecord, Ledger, record_key
from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.test_long_jobs import Journal, long_env
from tests.test_training import train_request


class NoConditionalWrites(LocalStorage):
    """A store whose conditional writes do not hold (as some S3-compatible servers)."""

    def _probe_conditional_writes(self) -> tuple[bool, str]:
        return False, "a test store without them"


def expired(storage: LocalStorage, job_id: str) -> None:
    record = JobRecord(job_id=job_id, op="train", status="running", attempt=1, owner="gone", token="old",
                       lease_expires=time.time() - 1)
    storage.write_bytes(record_key("train", job_id), record.to_json())


def race(storage: LocalStorage, job_id: str, takers: int = 2) -> list[tuple[Ledger, JobRecord, bool]]:
    """Every taker reads the expired record, then all take it at once."""
    ledgers = [Ledger(storage, op="train", worker=f"host-{i}/train", lease_seconds=60) for i in range(takers)]
    records = [ledger.load(job_id) for ledger in ledgers]
    barrier = threading.Barrier(takers)
    won: list[bool] = [False] * takers

    def take(i: int) -> None:
        record = records[i]
        assert record is not None
        assert not record.lease_live()
        barrier.wait()
        won[i] = ledgers[i].take(record)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return [(ledger, record, ok) for ledger, record, ok in zip(ledgers, records, won, strict=True)
            if record is not None]


def test_of_two_hosts_taking_one_expired_lease_at_once_exactly_one_wins(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert storage.supports_conditional_writes()
    for n in range(20):
        expired(storage, f"job{n}")
        results = race(storage, f"job{n}", takers=3)
        winners = [(ledger, record) for ledger, record, ok in results if ok]
        assert len(winners) == 1, n
        stored = JobRecord.from_json(storage.read_bytes(record_key("train", f"job{n}")))
        assert stored.token == winners[0][1].token
        assert stored.owner == winners[0][0].worker


def test_the_loser_of_a_takeover_cannot_renew_or_finish_over_the_winner(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    expired(storage, "j")
    (first, mine, _), (second, theirs, _) = race(storage, "j")
    winner, loser = ((first, mine), (second, theirs)) if first.still_ours(mine) else ((second, theirs), (first, mine))

    assert not loser[0].renew(loser[1])
    assert not loser[0].finish(loser[1], "failed", {"type": "training_failed"}, "m")
    assert winner[0].renew(winner[1])
    stored = JobRecord.from_json(storage.read_bytes(record_key("train", "j")))
    assert stored.token == winner[1].token
    assert stored.terminal is None


def test_a_store_without_conditional_writes_falls_back_to_reading_the_record_back(tmp_path: Path) -> None:
    storage = NoConditionalWrites(tmp_path)
    expired(storage, "j")
    results = race(storage, "j")

    assert all(ok for _, _, ok in results)  # both writes land: only the read-back tells
    assert [ledger.still_ours(record) for ledger, record, _ in results].count(True) == 1


def test_two_workers_on_two_hosts_racing_for_one_expired_lease_train_the_job_once(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path, tmp_path: Path,
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_dir(shapes_dir, "datasets/shapes")
    expired(storage, "contested")  # the job of a host that died: its lease ran out
    hosts = {name: tmp_path / f"{name}-work" for name in ("host-a", "host-b")}
    workers = {name: start_worker("train", env=long_env(WORK_DIR=str(work)), name=name, wait_started=False)
               for name, work in hosts.items()}
    for worker in workers.values():
        worker.wait_log("RabbitMQ consumer started", timeout=120)
    journal = Journal(be)
    for _ in hosts:  # one copy each, at once (a BE's retry beside the lease message)
        be.send_train(train_request("contested", epochs=2))

    done = journal.wait_terminal("contested")
    assert done["type"] == "training_completed", done
    trained = [name for name, w in workers.items() if "Training yolov8n" in w.log()]
    assert len(trained) == 1, {name: w.log()[-2000:] for name, w in workers.items()}
    record = JobRecord.from_json(storage.read_bytes(record_key("train", "contested")))
    assert record.owner == f"test/{trained[0]}"
    assert record.attempt == 2
    loser = next(name for name in hosts if name not in trained)
    assert not list(hosts[loser].rglob("*.pt")), "the loser wrote checkpoints"
    assert {o.key.rsplit("/", 1)[1] for o in storage.list("jobs/train/contested/")} <= {"last.pt", "best.pt"}
