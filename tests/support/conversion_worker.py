"""The real conversion worker with a test instrument, run as a real process.

* ``TEST_PAUSE_AFTER_FORMAT=<seconds>`` -- after each format is uploaded and announced,
  the job waits this long (so a test can cancel it between formats deterministically).
"""

from __future__ import annotations

import os
import sys
import time

from ai_service.cli import exit_now_if_forced
from ai_service.config import Settings
from ai_service.logs import setup_logging
from ai_service.operation import JobContext, Operation
from ai_service.worker import run_worker
from workers import conversion


def load(settings: Settings) -> Operation:
    pause = float(os.environ.get("TEST_PAUSE_AFTER_FORMAT", "0") or 0)

    def on_format_done(fmt: str, ctx: JobContext) -> None:
        if pause:
            ctx.log.info("test pause after %s: %.1f s", fmt, pause)
            time.sleep(pause)

    return conversion.operation(settings, on_format_done=on_format_done)


def main() -> int:
    settings = Settings.from_env().for_program("convert-test")
    setup_logging(settings, op="convert")
    return exit_now_if_forced(run_worker(settings, "convert", load))


if __name__ == "__main__":
    sys.exit(main())
