"""The one outcome policy: what a handler's outcome means for the delivery and the job.

Every outcome of every operation -- success, invalid input, a permanent failure, a
retryable one, a cancel, a job handed back, a lease lost, a bug -- goes through
:func:`settle`, which returns a frozen :class:`Settlement`: what happens to the
*delivery* (ack, dead-letter, requeue, retry later through the holding queue, or
nothing because it was acked already) and to the *job* (done, failed with a report,
cancelled, resumed later, handed back, given up to another worker).

How an operation settles (:class:`SettleMode`) is part of its declaration
(``Operation.settle``): short jobs hold their delivery until the end; long jobs ack it
once their job record is written and then live on in storage and lease messages, so a
retryable failure hands the job back to resume from its checkpoint after a backoff.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ai_service.errors import (
    AIServiceError,
    InternalError,
    InvalidInput,
    JobCancelled,
    JobHandedBack,
    LeaseLost,
    RetryableError,
)
from ai_service.operation import SettleMode

__all__ = ["Decision", "JobFate", "Outcome", "SettleMode", "Settlement", "backoff", "decide", "settle"]


class Outcome(enum.Enum):
    """What happens to the delivery."""

    ACK = "ack"
    REJECT = "reject"  # dead-letter to <queue>.dlq
    REQUEUE = "requeue"  # back to the queue now (a job handed back)
    RETRY_LATER = "retry_later"  # a counted copy through the holding queue after ``delay``, then ack
    NONE = "none"  # acked already (a recorded long job)


class JobFate(enum.Enum):
    """What happens to the job."""

    DONE = "done"
    FAILED = "failed"  # answer ``*_failed`` with the report
    CANCELLED = "cancelled"  # answer ``*_cancelled`` (short jobs: a ``*_failed`` with code cancelled)
    RETRY = "retry"  # tried again after ``delay`` (a recorded job resumes from its checkpoint)
    HANDED_BACK = "handed_back"  # another worker resumes it now
    ABANDONED = "abandoned"  # another worker owns it: nothing to say


@dataclass(frozen=True)
class Settlement:
    """The policy's answer for one outcome."""

    delivery: Outcome
    job: JobFate
    #: The error to answer the BE with, if the job ends with an answer of the policy's.
    report: AIServiceError | None = None
    #: Seconds before a retry comes back (``RETRY``).
    delay: float = 0.0
    #: A recorded job whose request should be kept in the ``.dlq`` for a person to look at.
    dead_letter: bool = False


#: A bug's report never carries its text (it may hold secrets or a stack).
BUG_REPORT = "internal error in the worker; the request was dead-lettered"


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: ``base`` after the first attempt, doubling, at most ``cap``."""
    return float(min(cap, base * 2 ** max(0, attempt - 1)))


def settle(
    error: BaseException | None,
    *,
    mode: SettleMode,
    attempt: int,
    limit: int,
    backoff_base: float = 1.0,
    backoff_cap: float = 30.0,
) -> Settlement:
    """The one mapping from an outcome to what happens to the delivery and to the job.

    ``attempt`` is which try this was, counting from 1 (a delivery's count + 1, a job
    record's attempt); ``limit`` is ``RABBITMQ_DELIVERY_LIMIT``.  A retryable failure is
    tried again while ``attempt < limit``; on the last try it ends the job with exactly
    one answer.
    """
    recorded = mode is SettleMode.ONCE_RECORDED
    held = Outcome.NONE if recorded else None
    if error is None:
        return Settlement(held or Outcome.ACK, JobFate.DONE)
    if isinstance(error, JobHandedBack):
        return Settlement(held or Outcome.REQUEUE, JobFate.HANDED_BACK)
    if isinstance(error, LeaseLost):
        return Settlement(held or Outcome.ACK, JobFate.ABANDONED)
    if isinstance(error, InvalidInput):
        return Settlement(held or Outcome.REJECT, JobFate.FAILED, error, dead_letter=recorded)
    if isinstance(error, RetryableError):
        if attempt >= limit:
            return Settlement(held or Outcome.REJECT, JobFate.FAILED, error, dead_letter=recorded)
        delay = backoff(attempt, backoff_base, backoff_cap)
        return Settlement(held or Outcome.RETRY_LATER, JobFate.RETRY, delay=delay)
    if isinstance(error, JobCancelled):
        return Settlement(held or Outcome.ACK, JobFate.CANCELLED, error)
    if isinstance(error, AIServiceError):
        return Settlement(held or Outcome.ACK, JobFate.FAILED, error)
    return Settlement(held or Outcome.REJECT, JobFate.FAILED, InternalError(BUG_REPORT), dead_letter=recorded)


@dataclass(frozen=True)
class Decision:
    """The delivery half of a :class:`Settlement` for a held delivery (the older API)."""

    outcome: Outcome
    #: The error to answer the BE with (a ``*_failed`` message), if any.
    report: AIServiceError | None = None


def decide(error: BaseException | None, delivery_count: int, delivery_limit: int) -> Decision:
    """:func:`settle` for a delivery held to the end, as (outcome, report).

    A retry is ``REQUEUE`` here: how it goes back (a delayed, counted copy) is the
    consumer's business, told by :func:`settle`.
    """
    s = settle(error, mode=SettleMode.AT_END, attempt=delivery_count + 1, limit=delivery_limit)
    outcome = Outcome.REQUEUE if s.delivery is Outcome.RETRY_LATER else s.delivery
    return Decision(outcome, s.report)
