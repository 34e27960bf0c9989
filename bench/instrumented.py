"""The real worker with timing probes: ``python -m bench.instrumented train|convert|infer``.

It is ``ai-service worker <op>`` -- same settings, same operation, same runtime -- with
thin wrappers that append one JSON line per event to the file named by
``BENCH_EVENTS`` (opened ``O_APPEND`` and written with one ``write`` per line, so lines
from several processes do not mix and a SIGKILL loses at most the line being written):

* ``publish``: every message handed to the shared publisher (it is in the on-disk spool
  when this is written): ``mid`` (message_id), ``type``, ``ex``, ``rk``;
* training only: ``take`` (LongJob.begin: job record, lease, ack), ``download``
  (dataset sync and data.yaml), ``train_start`` / ``train_end`` (Ultralytics callbacks; with the process's CPU
  seconds ``cpu_s`` and each thread's, ``threads``),
  ``train_epoch_start`` / ``train_epoch_end`` (an epoch's training pass), ``ckpt`` (the service's
  ``on_model_save``: checkpoint upload and record renewal), ``fit_epoch_end`` (the
  service's ``on_fit_epoch_end``: record renewal and the ``epoch_update`` publish),
  ``upload`` (every ``Storage.upload_file``), ``upload_thread`` (a checkpoint upload thread's
run, with its CPU seconds ``cpu``), ``build`` (the model built from its yaml),
``finish`` (terminal message recorded,
  published and confirmed), ``job`` (the whole handler).

Every event has ``t`` (wall clock when it started), ``pid`` and, for wrapped calls,
``dur`` (seconds).  The wrappers add a few microseconds per call; nothing else differs.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from ai_service.cli import WORKER_MODULES, exit_now_if_forced
from ai_service.config import ConfigError, Settings
from ai_service.logs import setup_logging
from ai_service.operation import Operation
from bench.raw_train import thread_cpu

EVENTS_ENV = "BENCH_EVENTS"
#: ``BENCH_PROFILE=PATH``: cProfile each training job's training thread into ``PATH.<pid>.<ms>.prof``
PROFILE_ENV = "BENCH_PROFILE"


class Journal:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def write(self, ev: str, t: float | None = None, **fields: Any) -> None:
        record = {"t": time.time() if t is None else t, "pid": self.pid, "ev": ev, **fields}
        os.write(self.fd, (json.dumps(record, default=str) + "\n").encode())


def _timed(journal: Journal, owner: Any, name: str, ev: str,
           describe: Callable[..., dict[str, Any]] = lambda *a, **k: {}) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            fields = describe(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a probe must never change behaviour
            fields = {}
        t0, p0 = time.time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            journal.write(ev, t=t0, dur=round(time.perf_counter() - p0, 6), **fields)

    setattr(owner, name, wrapper)


def install_publish_probe(journal: Journal) -> None:
    from ai_service.publisher import Publisher, Receipt

    original = Publisher.publish

    @functools.wraps(original)
    def publish(self: Publisher, exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> Receipt:
        receipt = original(self, exchange, routing_key, body, **kwargs)
        journal.write("publish", mid=receipt.message_id, type=kwargs.get("message_type"), ex=exchange,
                      rk=routing_key)
        return receipt

    Publisher.publish = publish  # type: ignore[method-assign]


def training_probes(journal: Journal) -> dict[str, list[Callable[[Any], None]]]:
    """Wrap the training job's steps; return the extra Ultralytics callbacks to register."""
    from ai_service import jobs, storage
    from workers import training

    def job_of(job: Any, *rest: Any, **kw: Any) -> dict[str, Any]:
        return {"job": job.request.job_id}

    def epoch_of(job: Any, trainer: Any, *rest: Any, **kw: Any) -> dict[str, Any]:
        final = int(trainer.epoch) != job.progress.train_epoch_seen
        return {"job": job.request.job_id, "epoch": int(trainer.epoch) + 1, "final_eval": final}

    def epoch_plain(job: Any, trainer: Any, *rest: Any, **kw: Any) -> dict[str, Any]:
        return {"job": job.request.job_id, "epoch": int(trainer.epoch) + 1}

    def ctx_job(job: Any, *rest: Any, **kw: Any) -> dict[str, Any]:
        return {"job": job.ctx.job_id}

    def upload_of(store: Any, src: Any, key: str, *rest: Any, **kw: Any) -> dict[str, Any]:
        return {"key": key}

    def prepare_of(store: Any, prefix: str, *rest: Any, **kw: Any) -> dict[str, Any]:
        return {"prefix": prefix}

    TJ = training.TrainingJob  # a class
    _timed(journal, TJ, "run", "job", job_of)
    _timed(journal, TJ, "_on_model_save", "ckpt", epoch_of)
    _timed(journal, TJ, "_on_fit_epoch_end", "fit_epoch_end", epoch_of)
    _timed(journal, TJ, "_on_train_epoch_end", "train_epoch_end", epoch_plain)
    _timed(journal, TJ, "_build_model", "build", job_of)
    _timed(journal, jobs.LongJob, "begin", "take", ctx_job)
    _timed(journal, jobs.LongJob, "finish", "finish", ctx_job)
    _timed(journal, storage.Storage, "upload_file", "upload", upload_of)
    _timed(journal, training.job, "prepare_dataset", "download", prepare_of)

    uploads_run = training.CheckpointUploads._run

    @functools.wraps(uploads_run)
    def upload_thread(self: Any, *args: Any, **kwargs: Any) -> None:
        t0, p0, c0 = time.time(), time.perf_counter(), time.thread_time()
        try:
            uploads_run(self, *args, **kwargs)
        finally:
            journal.write("upload_thread", t=t0, dur=round(time.perf_counter() - p0, 6),
                          cpu=round(time.thread_time() - c0, 6))

    training.CheckpointUploads._run = upload_thread  # type: ignore[method-assign]

    def on_train_start(trainer: Any) -> None:
        journal.write("train_start", cpu_s=round(time.process_time(), 3), threads=thread_cpu(),
                      torch_threads=torch_threads())

    def on_train_epoch_start(trainer: Any) -> None:
        journal.write("train_epoch_start", epoch=int(trainer.epoch) + 1)

    def on_train_end(trainer: Any) -> None:
        journal.write("train_end", cpu_s=round(time.process_time(), 3), threads=thread_cpu(),
                      torch_threads=torch_threads())

    callbacks: dict[str, list[Callable[[Any], None]]] = {
        "on_train_start": [on_train_start], "on_train_epoch_start": [on_train_epoch_start],
        "on_train_end": [on_train_end]}
    profile_to = os.environ.get(PROFILE_ENV)
    if profile_to:
        add_profiler(callbacks, profile_to)
    return callbacks


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def add_profiler(callbacks: dict[str, list[Callable[[Any], None]]], path: str) -> None:
    """cProfile the training thread from on_train_start to on_train_end (Ultralytics and our
    callbacks; the upload thread only as the time it takes from it), one ``.prof`` per job."""
    import cProfile

    profiler = cProfile.Profile()

    def start(trainer: Any) -> None:
        profiler.enable()

    def stop(trainer: Any) -> None:
        profiler.disable()
        profiler.dump_stats(f"{path}.{os.getpid()}.{int(time.time() * 1000)}.prof")
        profiler.clear()

    callbacks["on_train_start"].insert(0, start)
    callbacks["on_train_end"].append(stop)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in WORKER_MODULES:
        print(f"usage: python -m bench.instrumented {{{','.join(sorted(WORKER_MODULES))}}}", file=sys.stderr)
        return 2
    op = args[0]
    try:
        settings = Settings.from_env().for_program(op)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings, op=op)
    path = os.environ.get(EVENTS_ENV)
    journal = Journal(path) if path else None
    if journal is not None:
        install_publish_probe(journal)
        journal.write("process_start", op=op)

    def load(settings: Settings) -> Operation:
        module = importlib.import_module(WORKER_MODULES[op])
        if op == "train" and journal is not None:
            operation: Operation = module.operation(settings, callbacks=training_probes(journal))
            return operation
        plain: Operation = module.operation(settings)
        return plain

    from ai_service.worker import run_worker

    return exit_now_if_forced(run_worker(settings, op, load))


if __name__ == "__main__":
    sys.exit(main())
