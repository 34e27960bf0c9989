"""A worker with a scripted handler, to test the runtime through a real process.

It uses the real training request model and failure message; ``hyperparams.model``
says what the handler does:

* ``sleep``: sleep ``epochs`` tenths of a second, then answer ``training_completed``;
* ``crash``: kill the process (``os._exit(3)``) -- a poison message;
* ``fail``:  raise a permanent error (``dataset_invalid``);
* ``flaky``: raise a retryable error (``storage_error``).
"""

from __future__ import annotations

import os
import sys
import time

from ai_service.cli import exit_now_if_forced
from ai_service.config import Settings
from ai_service.errors import PermanentError, StorageError
from ai_service.logs import setup_logging
from ai_service.messages import TrainingCompleted, TrainingRequest
from ai_service.operation import JobContext, Operation
from ai_service.worker import run_worker
from workers.training import failure_message


def handle(request: TrainingRequest, ctx: JobContext) -> None:
    mode = request.hyperparams.model
    if mode == "crash":
        os._exit(3)
    if mode == "fail":
        raise PermanentError("scripted failure", error_code="dataset_invalid")
    if mode == "flaky":
        raise StorageError("scripted storage hiccup")
    started = time.monotonic()
    ctx.log.info("sleeping %.1f s", request.hyperparams.epochs / 10)
    time.sleep(request.hyperparams.epochs / 10)
    ctx.result(
        TrainingCompleted(
            job_id=request.job_id,
            model_path=request.output.model_key,
            final_metrics={"final_mAP50": 0.0, "final_loss": 0.0, "training_epochs": request.hyperparams.epochs},
            training_time=round(time.monotonic() - started, 3),
        )
    )


def main() -> int:
    settings = Settings.from_env().for_program("sleepy")
    setup_logging(settings, op="train")
    op = Operation(name="train", request_model=TrainingRequest, handler=handle, failure=failure_message)
    return exit_now_if_forced(run_worker(settings, "train", lambda _: op))


if __name__ == "__main__":
    sys.exit(main())
