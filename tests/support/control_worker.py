"""The sleepy worker with a cancel hook, and a handler that plants a bug on the I/O thread.

* The operation has ``on_cancel``: the real :func:`ai_service.jobs.record_cancel` (a
  cancel marker in storage), after ``STUB_CANCEL_DELAY`` seconds (default 0; a slow
  storage write).
* ``hyperparams.model = "trap-cancel"``: the handler swaps its job's ``ctx.cancelled``
  for an event whose ``set()`` raises.  The consumer's I/O thread sets that event when a
  cancel for the job arrives on the control exchange, so the cancel raises a plain
  ``RuntimeError`` inside a pika callback on the I/O thread -- a bug the runtime did not
  expect.  The handler then waits (at most 30 s) for the worker to ask it to stop.
* ``"crash-once-then-flaky"``: the first run kills the process (``os._exit(3)``, a
  marker file beside ``WORK_DIR`` remembers it); every later run fails retryably.
* Every other mode is ``tests/support/sleepy_worker.py``'s.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from ai_service.cli import exit_now_if_forced
from ai_service.config import Settings
from ai_service.errors import StorageError
from ai_service.jobs import record_cancel
from ai_service.logs import setup_logging
from ai_service.messages import TrainingRequest
from ai_service.operation import JobContext, Operation, Resources
from ai_service.worker import run_worker
from tests.support import sleepy_worker
from workers.training import failure_message


class BuggyEvent(threading.Event):
    def set(self) -> None:
        raise RuntimeError("injected bug: setting this event fails (tests/support/control_worker.py)")


def handle(request: TrainingRequest, ctx: JobContext) -> None:
    if request.hyperparams.model == "trap-cancel":
        ctx.cancelled = BuggyEvent()
        ctx.log.info("trap armed")
        ctx.shutdown.wait(30)
        ctx.log.info("asked to stop")
        return
    if request.hyperparams.model == "crash-once-then-flaky":
        marker = ctx.settings.work_dir.parent / f"crashed-once-{request.job_id}"
        if not marker.exists():
            marker.touch()
            os._exit(3)
        raise StorageError("scripted storage hiccup after a crash")
    sleepy_worker.handle(request, ctx)


def on_cancel(job_id: str, resources: Resources) -> None:
    delay = float(os.environ.get("STUB_CANCEL_DELAY", "0") or 0)
    if delay:
        time.sleep(delay)
    record_cancel(job_id, resources)


def main() -> int:
    settings = Settings.from_env().for_program("control-stub")
    setup_logging(settings, op="train")
    op = Operation(name="train", request_model=TrainingRequest, handler=handle, failure=failure_message,
                   on_cancel=on_cancel)
    return exit_now_if_forced(run_worker(settings, "train", lambda _: op))


if __name__ == "__main__":
    sys.exit(main())
