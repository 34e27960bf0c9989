"""What every soak section shares: the run's Config, one section's Part of the report, the
World (temp root, storage, dataset, model, images, seed), and the lines every section writes
about jobs, epochs, deliveries, crashes and stops."""

from __future__ import annotations

import base64
import itertools
import random
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Got, build_model, is_terminal, parse_ts
from bench.images import png_images
from soak.harness import Harness

IMGSZ_INFER = 128
MODEL_KEY = "models/soak.pt"
DATASET_KEY = "datasets/shapes/"


@dataclass
class Config:
    short: bool
    seed: int
    kill_jobs: int
    kill_epochs: int
    kill_workers: int
    kill_max: int
    kill_every: tuple[float, float]
    kill_deadline: float
    proxy_window: float
    proxy_jobs: int
    proxy_epochs: int
    proxy_rate: float
    cut_every: tuple[float, float]
    cut_for: tuple[float, float]
    restart_rate: float
    restart_down: float
    restart_training: bool
    sustained_seconds: float
    sustained_rate: float

    @classmethod
    def make(cls, short: bool, seed: int) -> Config:
        if short:
            return cls(short, seed, kill_jobs=2, kill_epochs=4, kill_workers=1, kill_max=2, kill_every=(2.0, 5.0),
                       kill_deadline=420, proxy_window=15, proxy_jobs=1, proxy_epochs=3, proxy_rate=5,
                       cut_every=(2.0, 4.0), cut_for=(0.2, 1.0), restart_rate=5, restart_down=2,
                       restart_training=False, sustained_seconds=15, sustained_rate=10)
        return cls(short, seed, kill_jobs=5, kill_epochs=10, kill_workers=2, kill_max=10, kill_every=(2.0, 6.0),
                   kill_deadline=600, proxy_window=90, proxy_jobs=3, proxy_epochs=6, proxy_rate=10,
                   cut_every=(2.0, 6.0), cut_for=(0.2, 2.0), restart_rate=10, restart_down=5,
                   restart_training=True, sustained_seconds=120, sustained_rate=20)


@dataclass
class Part:
    key: str
    title: str
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None
    crashes: int = 0
    lost: int = 0

    def add(self, text: str) -> None:
        self.lines.append(text)

    def fail(self, text: str) -> None:
        self.failures.append(text)


class World:
    """What every section shares: temp root, storage dir, dataset, model, images, seed."""

    def __init__(self, root: Path, cfg: Config) -> None:
        self.root = root
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.storage = root / "storage"
        shapes = root / "shapes"
        from ai_service.shapes import generate_shapes_dataset

        generate_shapes_dataset(shapes, n_train=24, n_val=8, size=64, seed=1)
        self.shapes = shapes
        shutil.copytree(shapes, self.storage / DATASET_KEY.rstrip("/"), dirs_exist_ok=True)
        model = build_model(root / "model" / "soak.pt", root / "model-work")
        target = self.storage / MODEL_KEY
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, target)
        self.images = [base64.b64encode(p).decode() for p in png_images(40, IMGSZ_INFER, seed=800_000)]

    def train_request(self, job_id: str, epochs: int) -> dict[str, Any]:
        return {"job_id": job_id, "dataset": {"s3_prefix": DATASET_KEY, "name": "shapes"},
                "output": {"prefix": "models/soak-out", "model_name": f"{job_id}.pt"},
                "hyperparams": {"model": "yolov8n", "epochs": epochs, "batch": 8, "imgsz": 64, "seed": 0}}

    def infer_request(self, job_id: str, i: int) -> dict[str, Any]:
        return {"job_id": job_id, "model": {"path": MODEL_KEY},
                "images": [{"data": self.images[i % len(self.images)]}],
                "params": {"conf": 0.25, "iou": 0.7, "imgsz": IMGSZ_INFER, "max_det": 100, "classes": None}}


# --- shared accounting -------------------------------------------------------------------------


def terminals_by_job(messages: list[Got]) -> dict[str, list[Got]]:
    out: dict[str, list[Got]] = defaultdict(list)
    for m in messages:
        if is_terminal(m):
            out[m.job_id].append(m)
    return out


def await_stragglers(h: Harness) -> None:
    """After the last terminal message: a duplicate would arrive right behind it, and every
    message the workers journaled should have reached the BE (bounded: 30 s)."""
    time.sleep(1.5)
    h.wait_delivered(30)


def job_lines(part: Part, job_ids: list[str], messages: list[Got], what: str = "jobs") -> None:
    """Jobs finished / terminal messages per job / duplicates of it; failures for lost jobs."""
    terms = terminals_by_job(messages)
    completed = sum(1 for j in job_ids if any(m.type.endswith("_completed") for m in terms.get(j, [])))
    ended = [j for j in job_ids if terms.get(j)]
    distinct = {j: len({m.message_id for m in terms.get(j, [])}) for j in job_ids}
    copies = {j: len(terms.get(j, [])) for j in job_ids}
    part.add(f"{what} finished: {completed}/{len(job_ids)} completed, {len(ended)}/{len(job_ids)} with a terminal "
             "message")
    per_job = Counter(distinct.values())
    part.add("terminal messages per job (distinct message_id): "
             + ", ".join(f"{n} for {c} job(s)" for n, c in sorted(per_job.items())))
    extra = sum(copies.values()) - sum(distinct.values())
    part.add(f"terminal messages delivered twice (same message_id, dropped by a BE that de-duplicates): {extra}")
    missing = [j for j in job_ids if not terms.get(j)]
    if missing:
        part.fail(f"{len(missing)} {what} without any terminal message: {missing[:5]}")
        part.lost += len(missing)
    doubled = [j for j, n in distinct.items() if n > 1]
    if doubled:
        types = {j: [m.type for m in terms[j]] for j in doubled[:3]}
        part.fail(f"{len(doubled)} {what} got more than one terminal message with different "
                  f"message_ids (contract: exactly one): {types}")
    not_completed = [j for j in job_ids if terms.get(j) and not any(m.type.endswith("_completed") for m in terms[j])]
    if not_completed:
        why = [(j, terms[j][0].body.get("error_code"), terms[j][0].body.get("error_message"))
               for j in not_completed[:3]]
        part.fail(f"{len(not_completed)} {what} did not complete: {why}")


def epoch_lines(part: Part, jobs: list[str], messages: list[Got], epochs: int) -> None:
    """Each job's epoch_update messages (distinct message_id): every epoch once, in order."""
    missing, repeated, backwards = 0, 0, 0
    for job in jobs:
        updates = [m for m in messages if m.job_id == job and m.type == "epoch_update"]
        seen_ids: set[str | None] = set()
        epochs_seen: list[int] = []
        for m in updates:
            if m.message_id in seen_ids:
                continue
            seen_ids.add(m.message_id)
            epochs_seen.append(int(m.body.get("current_epoch", 0)))
        counts = Counter(epochs_seen)
        repeated += sum(n - 1 for n in counts.values())
        missing += len(set(range(1, epochs + 1)) - set(counts))
        backwards += sum(1 for a, b in itertools.pairwise(epochs_seen) if b < a)
    part.add(f"epoch_update messages: epochs never announced {missing}, announced twice {repeated}, "
             f"announced out of order {backwards}")
    if missing or repeated or backwards:
        part.fail(f"epoch updates: {missing} epoch(s) never announced, {repeated} announced twice, "
                  f"{backwards} out of order (contract: once per epoch, in order)")


def delivery_lines(part: Part, h: Harness) -> None:
    stats = h.deliveries()
    part.add(f"AI → BE messages: {stats.line()}")
    if stats.lost:
        part.fail(f"{len(stats.lost)} message(s) the workers published never reached the BE")
        part.lost += len(stats.lost)
    part.data["deliveries"] = {"published": stats.published, "received": stats.received, "lost": len(stats.lost),
                               "duplicated": stats.duplicated, "be_redeliveries": stats.be_redeliveries}


def crash_lines(part: Part, h: Harness) -> None:
    h.check()
    part.crashes += len(h.crashes)
    part.add(f"worker crashes (exits nobody asked for): {len(h.crashes)}")
    for crash in h.crashes:
        part.fail(f"worker {crash.worker} exited with {crash.code}: {crash.tail[-300:]!r}")
    tracebacks = h.tracebacks()
    if tracebacks:
        part.findings.append(f"{tracebacks} Python traceback(s) in the worker logs")


def stop_lines(part: Part, h: Harness) -> None:
    codes = h.stop_all(timeout=60)
    unclean = {n: c for n, c in codes.items() if c not in (0, None)}
    part.add(f"warm stops at the end (SIGTERM): {len(codes) - len(unclean)}/{len(codes)} exited 0")
    if unclean:
        part.findings.append(f"workers that did not stop cleanly: {unclean}")


def end_lines(part: Part, h: Harness) -> None:
    """How a section with its own workers ends: deliveries, crashes, then the warm stops."""
    delivery_lines(part, h)
    crash_lines(part, h)
    stop_lines(part, h)


def reconnects(h: Harness) -> tuple[int, int]:
    consumer = sum(p.text(since_start=False).count("[RMQ] Reconnected to") for p in h.procs.values())
    publisher = sum(p.text(since_start=False).count("Publisher reconnected") for p in h.procs.values())
    return consumer, publisher


def last_time(records: Any, text: str) -> float:
    """Wall-clock time of the last log record containing ``text`` (NaN when none)."""
    found = float("nan")
    for record in records:
        if text in str(record.get("message", "")) and "ts" in record:
            found = parse_ts(str(record["ts"]))
    return found
