"""Exit codes a supervisor acts on: a worker that ends unasked exits non-zero (restarted),
a warm stop exits 0.  Real worker processes on the real broker."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import sys
import time

from ai_service.worker import EXIT_CONFIG, EXIT_CRASHED, EXIT_FORCED, EXIT_OK
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.support.procs import REPO
from tests.test_runtime import SLEEPY, request

CONTROL_STUB = "tests.support.control_worker"


def test_an_unexpected_exception_on_the_consumer_io_thread_makes_the_worker_exit_with_the_crash_code(
    be: BE, start_worker: WorkerFactory
) -> None:
    worker = start_worker(module=CONTROL_STUB)
    be.send_train(request("trap", mode="trap-cancel"))
    worker.wait_log("[trap] trap armed")
    started = time.monotonic()
    be.cancel("trap")  # the I/O thread sets the job's cancel event: it raises RuntimeError
    code = worker.wait(timeout=60)
    assert code == EXIT_CRASHED, worker.log()[-3000:]
    assert time.monotonic() - started < 30, "the crashed worker took too long to exit"
    log = worker.log()
    assert "[RMQ] ❌ Consumer crashed on its I/O thread: RuntimeError: injected bug" in log
    assert "[trap] asked to stop" in log  # the running handler was told to stop
    assert f"exiting with code {EXIT_CRASHED}" in log
    # Nothing is lost: the unsettled delivery went back to the queue with the connection.
    assert be.wait_count(be.settings.train_request_queue, 1) == 1


def test_a_bug_on_the_publisher_thread_makes_the_worker_exit_with_the_crash_code_and_nothing_is_consumed(
    be: BE, start_worker: WorkerFactory
) -> None:
    worker = start_worker(module="tests.support.publisher_bug_worker", wait_started=False)
    code = worker.wait(timeout=60)
    assert code == EXIT_CRASHED, worker.log()[-3000:]
    log = worker.log()
    assert '[RMQ] ❌ Publisher crashed on its thread: RuntimeError("injected bug' in log
    assert "the publisher thread crashed" in log
    assert f"exiting with code {EXIT_CRASHED}" in log
    be.send_train(request("after-crash"))  # no consumer of the crashed worker took it: it waits on the queue
    assert be.wait_count(be.settings.train_request_queue, 1) == 1


def test_a_sigterm_to_an_idle_worker_exits_zero(start_worker: WorkerFactory) -> None:
    worker = start_worker(module=SLEEPY)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == EXIT_OK
    assert "Worker stopped cleanly" in worker.log()


def test_a_sigterm_to_a_worker_with_a_cancel_hook_exits_zero(be: BE, start_worker: WorkerFactory) -> None:
    worker = start_worker(module=CONTROL_STUB)
    be.cancel("nobody-runs-this")
    time.sleep(0.5)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == EXIT_OK
    assert "Consumer crashed" not in worker.log()


def test_supervisord_restarts_the_crash_code_and_not_a_clean_stop_or_a_configuration_error() -> None:
    # The programs live in the include `ai-service supervisor-config` generates (CPU and GPU layouts).
    conf = configparser.RawConfigParser(strict=False)
    for args in ([], ["--train-gpus", "0-1", "--convert-gpus", "2", "--infer-gpus", "3"]):
        text = subprocess.run([sys.executable, "-m", "ai_service.cli", "supervisor-config", *args, "--output", "-"],
                              cwd=REPO, env={**os.environ, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                              check=True, timeout=60).stdout
        conf.read_string(text)
    programs = [s for s in conf.sections() if s.startswith("program:")]
    assert programs
    for section in programs:
        expected = {int(c) for c in conf.get(section, "exitcodes", fallback="0").split(",")}
        assert conf.get(section, "autorestart") == "unexpected", section
        assert EXIT_CRASHED not in expected, section
        assert {EXIT_OK, EXIT_CONFIG} <= expected, section
    assert len({EXIT_OK, EXIT_FORCED, EXIT_CONFIG, EXIT_CRASHED}) == 4
