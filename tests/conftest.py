"""Shared fixtures: unique broker names per test, a BE stand-in, real worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ai_service.config import Settings
from tests.support.amqp import BE, BrokerNames, new_names
from tests.support.procs import WorkerProcess, worker_args

pytest_plugins = ["tests.support.fixtures"]


@pytest.fixture
def names() -> BrokerNames:
    return new_names()


@pytest.fixture
def be(worker_env: dict[str, str]) -> Iterator[BE]:
    client = BE(Settings.from_env(worker_env))
    yield client
    client.close()


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def worker_env(tmp_path: Path, names: BrokerNames) -> dict[str, str]:
    return {
        **names.env(),
        "WORK_DIR": str(tmp_path / "work"),
        "STORAGE_DIR": str(tmp_path / "storage"),
        "STORAGE_BACKEND": "local",
        "LOG_LEVEL": "INFO",
        "RABBITMQ_DELIVERY_LIMIT": "3",
        "RECONNECT_MAX_DELAY": "2",
    }


@pytest.fixture
def start_worker(tmp_path: Path, worker_env: dict[str, str]) -> Iterator[WorkerFactory]:
    """Start real worker processes; all are stopped (SIGTERM, then kill) after the test."""
    procs: list[WorkerProcess] = []

    def factory(op: str = "train", *, module: str | None = None, env: dict[str, str] | None = None,
                wait_started: bool = True, name: str | None = None) -> WorkerProcess:
        args = ["-m", module] if module else worker_args(op)
        label = name or f"{op}-{len(procs)}"
        full_env = {**worker_env, "WORKER_NAME": f"test/{label}", **(env or {})}
        proc = WorkerProcess(args, full_env, tmp_path / f"{label}.log")
        procs.append(proc)
        return proc.start(wait_started=wait_started)

    yield factory
    for proc in procs:
        if proc.alive:
            proc.stop(timeout=20)
        proc.kill()
