"""The long-job protocol on the stub runtime: take, resume, hand back, finish, cancel,
retry with backoff and the attempt limit, without a broker (ai_service.testing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ai_service.config import Settings
from ai_service.consumer import JobFate, Settlement
from ai_service.errors import (
    AIServiceError,
    InvalidInput,
    JobCancelled,
    JobHandedBack,
    LeaseLost,
    StorageError,
)
from ai_service.jobs import JobRecord, Ledger, LongJob, ledger
from ai_service.messages import TrainingCancelled, TrainingCompleted, TrainingFailed
from ai_service.storage import LocalStorage
from ai_service.testing import StubRuntime

LIMIT = 3
REQUEST = {"job_id": "stubjob1", "dataset": {"s3_prefix": "datasets/x/"}}


@pytest.fixture(autouse=True)
def no_take_settle_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ai_service.jobs.longjob.TAKE_SETTLE_SECONDS", 0.0)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return replace(Settings(), worker_name="stub/train", work_dir=tmp_path / "work", rabbitmq_delivery_limit=LIMIT,
                   retry_backoff_seconds=0.25, retry_backoff_max_seconds=1.0)


@pytest.fixture
def runtime(settings: Settings, tmp_path: Path) -> StubRuntime:
    return StubRuntime(settings, LocalStorage(tmp_path / "storage"), op="train")


def book(runtime: StubRuntime) -> Ledger:
    return ledger(runtime.resources.storage, runtime.settings, op="train")


Work = Callable[[LongJob, JobRecord], None]


def run(runtime: StubRuntime, work: Work | None = None, *, headers: dict[str, Any] | None = None,
        ctx: Any = None) -> tuple[str, Settlement | None]:
    """One delivery of the job, the way a long-job worker runs it: begin, work, end once."""
    ctx = ctx or runtime.context(REQUEST, headers=headers)

    def failed(record: JobRecord, error: AIServiceError) -> TrainingFailed:
        return TrainingFailed(job_id=record.job_id, current_epoch=record.last_epoch, error_code=error.error_code,
                              error_message=error.message)

    def cancelled(record: JobRecord) -> TrainingCancelled:
        return TrainingCancelled(job_id=record.job_id, current_epoch=record.last_epoch)

    job = LongJob(ctx, book(runtime), cancelled_message=cancelled, failed_message=failed)
    begin = job.begin()
    if begin.record is None:
        return begin.reason, None
    try:
        if work is not None:
            work(job, begin.record)
        job.finish(begin.record, "completed", TrainingCompleted(
            job_id=begin.record.job_id, model_path="models/x.pt", final_metrics={}, training_time=1.0))
    except BaseException as exc:  # noqa: BLE001 - the one policy decides
        return "ran", job.conclude(begin.record, exc, where=f"at epoch {begin.record.last_epoch}")
    return "ran", None


def epochs_then(n: int, error: BaseException | None = None) -> Work:
    def work(job: LongJob, record: JobRecord) -> None:
        for epoch in range(record.last_epoch + 1, record.last_epoch + n + 1):
            job.renew(last_epoch=epoch, checkpoints={"last": f"jobs/train/stubjob1/epoch{epoch}.pt"})
        if error is not None:
            raise error

    return work


def test_taking_a_new_job_records_it_leases_it_and_acks_the_delivery(runtime: StubRuntime) -> None:
    reason, _ = run(runtime)
    assert reason == "ran"
    record = book(runtime).load("stubjob1")
    assert record is not None
    assert record.attempt == 1
    assert record.status == "completed"
    assert runtime.acks == 1
    assert len(runtime.of("lease")) == 1
    assert [t.type for t in runtime.terminals()] == ["training_completed"]


def test_a_finished_job_asked_again_republishes_the_same_terminal_message(runtime: StubRuntime) -> None:
    run(runtime)
    reason, _ = run(runtime)
    assert reason == "finished"
    first, again = runtime.terminals()
    assert first.message_id == again.message_id
    assert first.payload == again.payload


def test_a_job_handed_back_resumes_from_its_epoch_without_counting_an_attempt(runtime: StubRuntime) -> None:
    _, s = run(runtime, epochs_then(3, JobHandedBack("warm shutdown")))
    assert s is not None
    assert s.job is JobFate.HANDED_BACK
    record = book(runtime).load("stubjob1")
    assert record is not None
    assert record.status == "handed_back"
    assert record.last_epoch == 3
    assert runtime.terminals() == []
    seen: list[int] = []
    run(runtime, lambda job, rec: seen.append(rec.last_epoch), ctx=runtime.redeliver("resubmit"))
    record = book(runtime).load("stubjob1")
    assert seen == [3]
    assert record is not None
    assert record.attempt == 1
    assert [t.type for t in runtime.terminals()] == ["training_completed"]


def test_a_retryable_failure_hands_the_job_back_with_a_backoff_and_it_resumes_from_its_checkpoint(
    runtime: StubRuntime,
) -> None:
    _, s = run(runtime, epochs_then(2, StorageError("S3 went away uploading epoch 3")))
    assert s is not None
    assert s.job is JobFate.RETRY
    assert s.delay == 0.25
    record = book(runtime).load("stubjob1")
    assert record is not None
    assert record.status == "retrying"
    assert record.token is None
    (retry,) = runtime.of("retry_later")
    assert retry.delay_ms == 250
    assert runtime.terminals() == [], "a retryable failure is not the end of the job"
    seen: list[tuple[int, int]] = []
    run(runtime, lambda job, rec: seen.append((rec.last_epoch, rec.attempt)), ctx=runtime.redeliver("retry_later"))
    assert seen == [(2, 2)], "resumed from epoch 2 as attempt 2"
    assert [t.type for t in runtime.terminals()] == ["training_completed"]


def test_a_job_failing_retryably_every_time_ends_with_one_failed_at_the_attempt_limit(runtime: StubRuntime) -> None:
    ctx = None
    delays = []
    for _ in range(LIMIT):
        _, s = run(runtime, epochs_then(1, StorageError("S3 timed out")), ctx=ctx)
        assert s is not None
        delays.append(s.delay)
        if s.job is JobFate.RETRY:
            ctx = runtime.redeliver("retry_later")
    assert delays == [0.25, 0.5, 0.0]
    (failed,) = runtime.terminals()
    assert failed.type == "training_failed"
    assert failed.payload is not None
    assert failed.payload["error_code"] == "storage_error"
    assert failed.payload["current_epoch"] == LIMIT
    assert len(runtime.of("dead_letter")) == 1
    record = book(runtime).load("stubjob1")
    assert record is not None
    assert record.status == "failed"
    assert record.attempt == LIMIT


def test_a_retry_the_storage_cannot_record_resumes_through_the_lease_once_it_expires(
    runtime: StubRuntime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def storage_away(job: LongJob, record: JobRecord) -> None:
        monkeypatch.setattr(job.ledger, "hand_back", _raise(StorageError("S3 still away")))
        raise StorageError("S3 went away")

    _, s = run(runtime, storage_away)
    assert s is not None
    assert s.job is JobFate.RETRY
    assert runtime.of("retry_later") == []
    assert runtime.terminals() == []
    record = book(runtime).load("stubjob1")
    assert record is not None, "still ours: its lease message brings it back"
    assert record.status == "running", "still ours: its lease message brings it back"
    record.lease_expires = 0.0
    book(runtime).save(record)
    reason, _ = run(runtime, ctx=runtime.redeliver("lease"))
    assert reason == "ran"
    assert [t.type for t in runtime.terminals()] == ["training_completed"]


def test_cancel_mid_job_ends_with_one_cancelled_and_a_cancel_before_start_too(runtime: StubRuntime) -> None:
    _, s = run(runtime, epochs_then(1, JobCancelled("cancelled")))
    assert s is not None
    assert s.job is JobFate.CANCELLED
    assert [t.type for t in runtime.terminals()] == ["training_cancelled"]
    other = StubRuntime(runtime.settings, runtime.resources.storage)
    book(other).request_cancel("stubjob2")
    reason, _ = run(other, ctx=other.context({**REQUEST, "job_id": "stubjob2"}))
    assert reason == "cancelled before start"
    assert [t.type for t in other.terminals()] == ["training_cancelled"]


def test_a_lost_lease_stops_the_job_without_a_word(runtime: StubRuntime) -> None:
    _, s = run(runtime, epochs_then(1, LeaseLost("taken over")))
    assert s is not None
    assert s.job is JobFate.ABANDONED
    assert runtime.terminals() == []
    assert runtime.of("retry_later") == []
    assert runtime.of("resubmit") == []


@pytest.mark.parametrize(("error", "code"), [(InvalidInput("bad"), "invalid_request"),
                                             (KeyError("secret-token"), "internal_error")])
def test_invalid_input_and_bugs_end_with_one_failed_and_a_dead_letter(
    runtime: StubRuntime, error: BaseException, code: str,
) -> None:
    _, s = run(runtime, epochs_then(1, error))
    assert s is not None
    assert s.job is JobFate.FAILED
    (failed,) = runtime.terminals()
    assert failed.payload is not None
    assert failed.payload["error_code"] == code
    assert "secret-token" not in failed.payload["error_message"]
    assert len(runtime.of("dead_letter")) == 1


def test_a_duplicate_request_while_the_job_runs_is_dropped(runtime: StubRuntime) -> None:
    reasons: list[str] = []
    run(runtime, lambda job, rec: reasons.append(run(StubRuntime(runtime.settings, runtime.resources.storage))[0]))
    assert reasons == ["duplicate"]


def _raise(error: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail
