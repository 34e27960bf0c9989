"""Shared fixtures: unique broker names per test, a BE stand-in, real worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ai_service.config import Settings
from tests.support.amqp import BE, BrokerNames, delete_names, new_names, sweep_stale_names
from tests.support.procs import WorkerProcess, worker_args
from tests.support.shared import build_once

pytest_plugins = ["tests.support.fixtures"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Once per run (not per xdist worker): sweep what killed earlier runs left on the broker."""
    if not hasattr(session.config, "workerinput"):
        swept = sweep_stale_names()
        if swept:
            print(f"swept {swept} queues/exchanges left on the shared broker by earlier test runs")


@pytest.fixture
def names() -> Iterator[BrokerNames]:
    created = new_names()
    yield created
    delete_names(created)


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


# --- datasets and a model trained once per session ------------------------------------

TRAINED_EPOCHS = 80


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated shapes dataset (64 train / 8 val images of 128 px), built once."""
    from ai_service.shapes import generate_shapes_dataset

    def build(target: Path) -> dict[str, Any]:
        generate_shapes_dataset(target, n_train=64, n_val=8, size=128, seed=1)
        return {"path": str(target)}

    return Path(build_once(tmp_path_factory, "shapes", build)["path"])


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> dict[str, Any]:
    """A model trained through the real worker long enough to find the shapes.

    Returns ``{"model": <local .pt path>, "completed": <training_completed body>}``.
    """
    from ai_service.storage import LocalStorage

    def build(target: Path) -> dict[str, Any]:
        names = new_names()
        env = {
            **names.env(),
            "WORK_DIR": str(target / "work"),
            "STORAGE_DIR": str(target / "storage"),
            "WORKER_NAME": "test/trained-model",
        }
        LocalStorage(target / "storage").upload_dir(shapes_dir, "datasets/shapes")
        client = BE(Settings.from_env(env))
        worker = WorkerProcess(worker_args("train"), env, target / "worker.log").start()
        try:
            client.send_train({
                "job_id": "trained-model",
                "dataset": {"s3_prefix": "datasets/shapes/", "name": "shapes"},
                "output": {"prefix": "models", "model_name": "shapes.pt"},
                "hyperparams": {"model": "yolov8n", "epochs": TRAINED_EPOCHS, "batch": 16, "imgsz": 128,
                                "seed": 0},
            })
            done = client.terminal(client.settings.train_result_queue, "trained-model", timeout=900)
        finally:
            worker.stop()
            client.close()
        assert done.type == "training_completed", done.body
        model = target / "storage" / done.body["model_path"]
        return {"model": str(model), "completed": done.body}

    return build_once(tmp_path_factory, "trained-model", build)


@pytest.fixture(scope="session", autouse=True)
def _shared_model_first(request: pytest.FixtureRequest) -> None:
    """In a parallel run, train the shared model before anything else competes for the
    two cores: every xdist worker waits on its lock, so it trains on an idle machine
    (about a minute) instead of crawling under load. Single-process runs train it lazily.
    """
    if request.config.getoption("dist", default="no") != "no":
        request.getfixturevalue("trained_model")
