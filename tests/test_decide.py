"""decide(): the one table from a handler's outcome to ack, dead-letter or requeue."""

from __future__ import annotations

import threading
import time

import pytest

from ai_service.consumer import Decision, Outcome, RequestTracker, decide
from ai_service.errors import (
    AIServiceError,
    ConnectionClosed,
    InvalidInput,
    JobCancelled,
    JobHandedBack,
    ObjectNotFound,
    PermanentError,
    RetryableError,
    StorageError,
    UnsafeKey,
)
from ai_service.messages import InvalidRequest

LIMIT = 5


def test_success_is_acked_without_a_report() -> None:
    assert decide(None, 0, LIMIT) == Decision(Outcome.ACK)
    assert decide(None, LIMIT + 3, LIMIT) == Decision(Outcome.ACK)


@pytest.mark.parametrize(
    "error",
    [
        InvalidInput("hyperparams.imgsz: Field required"),
        InvalidRequest("hyperparams.imgsz: Field required", "abc12345"),
        UnsafeKey("storage key must be relative"),
        InvalidInput("no such format", error_code="unsupported_format"),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("delivery_count", [0, LIMIT - 1])
def test_invalid_input_is_dead_lettered_and_reported(error: InvalidInput, delivery_count: int) -> None:
    decision = decide(error, delivery_count, LIMIT)

    assert decision.outcome is Outcome.REJECT
    assert decision.report is error


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("training diverged", error_code="training_error"),
        ObjectNotFound("models/x.pt does not exist"),
        JobCancelled("cancelled by the BE"),
        AIServiceError("some other deliberate failure"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_permanent_error_is_acked_and_reported(error: AIServiceError) -> None:
    decision = decide(error, 0, LIMIT)

    assert decision.outcome is Outcome.ACK
    assert decision.report is error


@pytest.mark.parametrize(
    "error",
    [RetryableError("try later"), StorageError("S3 timed out"), ConnectionClosed("broker went away")],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("delivery_count", range(LIMIT - 1))
def test_a_retryable_error_is_requeued_without_a_report(error: RetryableError, delivery_count: int) -> None:
    assert decide(error, delivery_count, LIMIT) == Decision(Outcome.REQUEUE)


@pytest.mark.parametrize(
    "error",
    [RetryableError("try later"), StorageError("S3 timed out")],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("delivery_count", [LIMIT - 1, LIMIT, LIMIT + 10])
def test_a_retryable_error_on_the_last_allowed_delivery_is_dead_lettered_and_reported(
    error: RetryableError, delivery_count: int
) -> None:
    # delivery_count counts earlier deliveries (x-delivery-count), so LIMIT - 1 is the LIMIT-th delivery.
    decision = decide(error, delivery_count, LIMIT)

    assert decision.outcome is Outcome.REJECT
    assert decision.report is error


def test_with_a_delivery_limit_of_one_the_first_delivery_is_the_last() -> None:
    decision = decide(StorageError("S3 timed out"), 0, 1)

    assert decision.outcome is Outcome.REJECT
    assert decision.report is not None
    assert decision.report.error_code == "storage_error"


@pytest.mark.parametrize("delivery_count", [0, LIMIT - 1, LIMIT + 10])
def test_a_job_handed_back_is_requeued_without_a_report(delivery_count: int) -> None:
    assert decide(JobHandedBack("worker shutting down"), delivery_count, LIMIT) == Decision(Outcome.REQUEUE)


@pytest.mark.parametrize(
    "error",
    [
        KeyError("secret-token-123"),
        ValueError("password=secret-token-123"),
        RuntimeError("Traceback secret-token-123"),
        ZeroDivisionError("division by zero secret-token-123"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_unexpected_exception_is_dead_lettered_as_an_internal_error_without_its_text(error: Exception) -> None:
    decision = decide(error, 0, LIMIT)

    assert decision.outcome is Outcome.REJECT
    assert decision.report is not None
    assert decision.report.error_code == "internal_error"
    assert decision.report is not error
    assert "secret-token-123" not in decision.report.message
    assert type(error).__name__ not in decision.report.message
    assert decision.report.message


def test_every_report_carries_a_contract_error_code() -> None:
    from ai_service.errors import ERROR_CODES

    cases: list[BaseException] = [
        InvalidInput("x"), PermanentError("x"), StorageError("x"), RuntimeError("x"), ObjectNotFound("x"),
    ]
    for error in cases:
        report = decide(error, LIMIT, LIMIT).report
        assert report is not None
        assert report.error_code in ERROR_CODES


# --- RequestTracker: a redelivery of an answered request is not answered again ----------


def test_a_redelivery_of_an_answered_request_is_recognised_whether_or_not_its_ack_seemed_to_go_out() -> None:
    tracker = RequestTracker()
    digest = RequestTracker.digest(b'{"job_id": "a"}')
    seen = tracker.begin(digest)
    seen.answered = True
    seen.done.set()
    tracker.finish(digest)  # acked on an open channel: the ack can still be lost on the way
    assert tracker.answered_before(digest, timeout=0.1)
    assert tracker.answered_before(digest, timeout=0.1), "a second redelivery is recognised too"


def test_a_request_that_was_not_answered_is_forgotten_when_settled() -> None:
    tracker = RequestTracker()
    unanswered = RequestTracker.digest(b"unanswered")
    entry = tracker.begin(unanswered)
    entry.done.set()
    tracker.finish(unanswered)
    assert not tracker.answered_before(unanswered, timeout=0.1)


def test_a_redelivery_waits_for_its_first_run_still_going() -> None:
    tracker = RequestTracker()
    digest = RequestTracker.digest(b"slow")
    seen = tracker.begin(digest)

    def first_run_answers() -> None:
        time.sleep(0.3)
        seen.answered = True
        seen.done.set()

    threading.Thread(target=first_run_answers).start()
    started = time.monotonic()
    assert tracker.answered_before(digest, timeout=5)
    assert time.monotonic() - started >= 0.25


def test_the_tracker_forgets_the_oldest_past_its_capacity() -> None:
    tracker = RequestTracker(capacity=2)
    digests = [RequestTracker.digest(bytes([i])) for i in range(3)]
    for d in digests:
        entry = tracker.begin(d)
        entry.answered = True
        entry.done.set()
    assert not tracker.answered_before(digests[0], timeout=0.05)
    assert tracker.answered_before(digests[2], timeout=0.05)
