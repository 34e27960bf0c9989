"""Training worker: dataset from storage -> Ultralytics training -> weights to storage.

The handler publishes ``training_started``, one ``epoch_update`` per finished epoch (not
for Ultralytics' final evaluation call), then ``training_completed`` with the storage
key of the best weights, or ``training_failed`` with the contract's error code and the
metrics of the last finished epoch.

The package: :mod:`.job` (one request, from taking it to its terminal message),
:mod:`.metrics` (Ultralytics' numbers in the contract's names), :mod:`.uploads`
(checkpoints to storage in the background).  ``ai-service worker train`` imports this
package and calls :func:`operation`.
"""

from __future__ import annotations

from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.jobs.operation import recorded_operation
from ai_service.messages import TrainingFailed, TrainingRequest
from ai_service.operation import JobContext, Operation, Resources
from ai_service.registry import TRAIN
from workers import yolo
from workers.datasets import DatasetError, prepare_dataset
from workers.training.job import Callbacks, TrainingJob
from workers.training.metrics import checkpoint_progress, contract_metrics, epoch_metrics
from workers.training.uploads import CheckpointUploads

__all__ = [
    "Callbacks",
    "CheckpointUploads",
    "DatasetError",
    "TrainingJob",
    "checkpoint_progress",
    "contract_metrics",
    "epoch_metrics",
    "failure_message",
    "operation",
    "prepare_dataset",
    "setup",
]


def failure_message(job_id: str, error: AIServiceError) -> TrainingFailed:
    """The ``training_failed`` a BE gets when a request fails before training started."""
    return TrainingFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


def operation(settings: Settings, *, callbacks: Callbacks | None = None) -> Operation:
    """The training operation: prefetch 1, one job at a time per worker (and GPU)."""
    extra = callbacks or {}

    def handler(request: TrainingRequest, ctx: JobContext) -> None:
        TrainingJob(request, ctx, extra).run()

    return recorded_operation(TRAIN, settings, request_model=TrainingRequest, handler=handler, failure=failure_message,
                              setup=setup)


def setup(resources: Resources) -> None:
    """Make Ultralytics offline and safe, import it once, pick the device."""
    settings = resources.settings
    yolo.prepare_ultralytics(settings.work_dir)
    import ultralytics  # noqa: F401 - pay the import once, before the first job

    resources.device = yolo.select_device(settings.device)

