"""settle(): the one table from (operation, outcome) to what happens to the delivery and the job."""

from __future__ import annotations

import pytest

from ai_service.consumer import JobFate, Outcome, Settlement, SettleMode, settle
from ai_service.errors import (
    AIServiceError,
    InvalidInput,
    JobCancelled,
    JobHandedBack,
    LeaseLost,
    PermanentError,
    StorageError,
)

LIMIT = 5
BASE, CAP = 0.5, 4.0

#: How each operation settles (asserted against the real declarations in test_operation_modes).
MODES = {"train": SettleMode.ONCE_RECORDED, "convert": SettleMode.ONCE_RECORDED, "infer": SettleMode.AT_END}

OUTCOMES: dict[str, BaseException | None] = {
    "success": None,
    "invalid": InvalidInput("hyperparams.imgsz: Field required"),
    "permanent": PermanentError("training diverged", error_code="training_error"),
    "retryable": StorageError("S3 timed out"),
    "retryable_at_limit": StorageError("S3 timed out"),
    "cancelled": JobCancelled("cancelled by the BE"),
    "handed_back": JobHandedBack("worker shutting down"),
    "lease_lost": LeaseLost("taken over"),
    "bug": KeyError("secret-token-123"),
}

#: outcome -> (delivery held to the end, delivery of a recorded job, job, report, dead-letter a recorded job)
TABLE: dict[str, tuple[Outcome, JobFate, str | None, bool]] = {
    "success": (Outcome.ACK, JobFate.DONE, None, False),
    "invalid": (Outcome.REJECT, JobFate.FAILED, "invalid_request", True),
    "permanent": (Outcome.ACK, JobFate.FAILED, "training_error", False),
    "retryable": (Outcome.RETRY_LATER, JobFate.RETRY, None, False),
    "retryable_at_limit": (Outcome.REJECT, JobFate.FAILED, "storage_error", True),
    "cancelled": (Outcome.ACK, JobFate.CANCELLED, "cancelled", False),
    "handed_back": (Outcome.REQUEUE, JobFate.HANDED_BACK, None, False),
    "lease_lost": (Outcome.ACK, JobFate.ABANDONED, None, False),
    "bug": (Outcome.REJECT, JobFate.FAILED, "internal_error", True),
}


def attempt_for(outcome: str) -> int:
    return LIMIT if outcome == "retryable_at_limit" else 2


@pytest.mark.parametrize("outcome", list(OUTCOMES))
@pytest.mark.parametrize("op", list(MODES))
def test_every_operation_and_outcome_settles_the_delivery_and_the_job_as_the_table_says(op: str, outcome: str) -> None:
    mode = MODES[op]
    held_delivery, job, code, dead_letter = TABLE[outcome]

    s = settle(OUTCOMES[outcome], mode=mode, attempt=attempt_for(outcome), limit=LIMIT,
               backoff_base=BASE, backoff_cap=CAP)

    assert s.delivery is (held_delivery if mode is SettleMode.AT_END else Outcome.NONE)
    assert s.job is job
    assert (s.report.error_code if s.report is not None else None) == code
    assert s.dead_letter is (dead_letter and mode is SettleMode.ONCE_RECORDED)
    assert (s.delay > 0) is (job is JobFate.RETRY)


@pytest.mark.parametrize("mode", list(SettleMode))
def test_a_retry_backs_off_exponentially_up_to_the_cap(mode: SettleMode) -> None:
    delays = [settle(StorageError("x"), mode=mode, attempt=a, limit=100, backoff_base=BASE, backoff_cap=CAP).delay
              for a in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("mode", list(SettleMode))
def test_the_last_allowed_attempt_of_a_retryable_failure_answers_once_instead(mode: SettleMode) -> None:
    below = settle(StorageError("x"), mode=mode, attempt=LIMIT - 1, limit=LIMIT)
    at = settle(StorageError("x"), mode=mode, attempt=LIMIT, limit=LIMIT)
    assert below.job is JobFate.RETRY
    assert below.report is None
    assert at.job is JobFate.FAILED
    assert at.report is not None
    assert at.report.error_code == "storage_error"


def test_a_bugs_report_never_carries_its_text() -> None:
    for mode in SettleMode:
        report = settle(ValueError("password=hunter2"), mode=mode, attempt=1, limit=LIMIT).report
        assert report is not None
        assert "hunter2" not in report.message
        assert "ValueError" not in report.message


def test_a_settlement_is_frozen() -> None:
    s = settle(None, mode=SettleMode.AT_END, attempt=1, limit=LIMIT)
    with pytest.raises(AttributeError):
        s.job = JobFate.FAILED  # type: ignore[misc]
    assert s == Settlement(Outcome.ACK, JobFate.DONE)


def test_every_report_names_a_contract_code_and_deliberate_errors_keep_theirs() -> None:
    from ai_service.errors import ERROR_CODES

    for error in [*[e for e in OUTCOMES.values() if e is not None], AIServiceError("x", error_code="timeout")]:
        s = settle(error, mode=SettleMode.AT_END, attempt=LIMIT, limit=LIMIT)
        if s.report is not None:
            assert s.report.error_code in ERROR_CODES
            if isinstance(error, AIServiceError):
                assert s.report is error


def test_a_retry_copy_back_from_the_holding_queue_is_counted_by_our_header_on_quorum_queues_too() -> None:
    from ai_service.consumer import DELIVERY_COUNT_HEADER, came_back_from, count_deliveries

    holding = "t.train_request_q.lease"
    expired = {"x-death": [{"queue": holding, "reason": "expired", "count": 1}], DELIVERY_COUNT_HEADER: 2}
    assert came_back_from(expired, holding)
    assert count_deliveries(expired, False, counted_by_us=came_back_from(expired, holding)) == 2
    assert count_deliveries({**expired, "x-delivery-count": 1}, True, counted_by_us=True) == 3
    # Not through our holding queue (a BE's own header, or another queue's death): not ours to trust.
    forged = {DELIVERY_COUNT_HEADER: 9}
    assert not came_back_from(forged, holding)
    assert not came_back_from({"x-death": [{"queue": "other", "reason": "expired"}]}, holding)
    assert not came_back_from({"x-death": [{"queue": holding, "reason": "rejected"}]}, holding)
    assert count_deliveries(forged, False, counted_by_us=came_back_from(forged, holding)) == 0


def test_the_real_operations_declare_the_modes_of_the_table() -> None:
    from ai_service.config import Settings
    from workers import conversion, inference, training

    settings = Settings()
    assert training.operation(settings).settle is MODES["train"]
    assert conversion.operation(settings).settle is MODES["convert"]
    assert inference.operation(settings).settle is MODES["infer"]
