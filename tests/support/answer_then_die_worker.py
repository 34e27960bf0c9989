"""The real inference worker, killed with SIGKILL between publishing an answer and acking it.

The first request it answers (a marker file beside ``WORK_DIR`` makes it once per test)
has its answer confirmed by the broker, then the process kills itself before the
handler returns, so the delivery is never acked and the broker redelivers it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from ai_service.cli import exit_now_if_forced
from ai_service.config import Settings
from ai_service.logs import setup_logging
from ai_service.operation import JobContext, Operation
from ai_service.worker import run_worker
from workers import inference


def load(settings: Settings) -> Operation:
    op = inference.operation(settings)
    inner = op.handler
    marker = settings.work_dir.parent / "answered-then-died"

    def handler(request: Any, ctx: JobContext) -> None:
        inner(request, ctx)
        if ctx.terminal_receipt is not None and not marker.exists():
            ctx.terminal_receipt.wait(30)  # the answer is on the broker ...
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the request is not acked

    return Operation(**{**op.__dict__, "handler": handler})


def main() -> int:
    settings = Settings.from_env().for_program("answer-then-die")
    setup_logging(settings, op="infer")
    return exit_now_if_forced(run_worker(settings, "infer", load))


if __name__ == "__main__":
    sys.exit(main())
