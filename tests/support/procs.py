"""Run real worker processes for tests, with their log captured to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STARTED = "✅ RabbitMQ consumer started"


class WorkerProcess:
    """``ai-service worker <op>`` (or any module) in a subprocess with a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, wait_started: bool = True, timeout: float = 120.0) -> "WorkerProcess":
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *self.args], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait_started:
            self.wait_log(STARTED, timeout=timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def new_log(self) -> str:
        """The log written since the last start()."""
        return self.log()[self._offset:] if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.new_log().count(text) >= count:
                return
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"worker exited ({code}) before logging {text!r}:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"worker did not log {text!r} within {timeout} s:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def worker_args(op: str) -> list[str]:
    return ["-m", "ai_service.cli", "worker", op]
