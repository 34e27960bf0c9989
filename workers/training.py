"""Training worker (placeholder until the training handler lands)."""

from __future__ import annotations

from ai_service.errors import AIServiceError
from ai_service.messages import TrainingFailed


def failure_message(job_id: str, error: AIServiceError) -> TrainingFailed:
    """The ``training_failed`` a BE gets when a request fails before training started."""
    return TrainingFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)
