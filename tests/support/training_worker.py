"""The real training worker with test instruments, run as a real process.

* ``TEST_FAULT=oom@N`` -- a callback raises torch's out-of-memory error at epoch N;
* ``TEST_FAULT=die-after-save@N`` -- the process dies (``os._exit``) right after epoch N's
  checkpoint was stored, before that epoch is announced (once: a marker file in WORK_DIR);
* ``TEST_ENV_PROBE=<file>`` -- after each job, append the job's
  ``CUDA_VISIBLE_DEVICES`` as the worker process sees it then.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ai_service.cli import exit_now_if_forced
from ai_service.config import Settings
from ai_service.logs import setup_logging
from ai_service.operation import JobContext, Operation
from ai_service.worker import run_worker
from workers import training


def _oom_at(epoch: int) -> Any:
    def callback(trainer: Any) -> None:
        if trainer.epoch + 1 == epoch:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

    return callback


def _die_after_save(epoch: int, marker: str) -> Any:
    def callback(trainer: Any) -> None:
        if trainer.epoch + 1 == epoch and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)  # like a SIGKILL: no cleanup, no hand-back

    return callback


def load(settings: Settings) -> Operation:
    callbacks: training.Callbacks = {}
    fault = os.environ.get("TEST_FAULT", "")
    if fault.startswith("oom@"):
        callbacks["on_train_epoch_start"] = [_oom_at(int(fault[4:]))]
    elif fault.startswith("die-after-save@"):
        marker = str(settings.work_dir.parent / "died-after-save")
        callbacks["on_model_save"] = [_die_after_save(int(fault.split("@")[1]), marker)]
    op = training.operation(settings, callbacks=callbacks)
    probe = os.environ.get("TEST_ENV_PROBE")
    if not probe:
        return op
    inner = op.handler

    def handler(request: Any, ctx: JobContext) -> None:
        try:
            inner(request, ctx)
        finally:
            with open(probe, "a") as fh:
                fh.write(f"{request.job_id} {os.environ.get('CUDA_VISIBLE_DEVICES')}\n")

    return Operation(**{**op.__dict__, "handler": handler})


def main() -> int:
    settings = Settings.from_env().for_program("train-test")
    setup_logging(settings, op="train")
    return exit_now_if_forced(run_worker(settings, "train", load))


if __name__ == "__main__":
    sys.exit(main())
