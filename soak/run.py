"""``make soak``: a bounded fault run against real worker processes.

    python -m soak.run              # full (~10 min on 2 cores), writes docs/RELIABILITY.md
    python -m soak.run --short      # ~2 min, what `make test` runs (tests/test_soak.py)

Sections, each with its own queue names on the shared RabbitMQ (127.0.0.1:5672, never
restarted or reconfigured) and local storage in a temp dir:

1. ``kill``: N short training jobs while workers are SIGKILLed at random moments and
   restarted at once (``LEASE_SECONDS=4``);
2. ``proxy``: a TCP proxy between the workers and RabbitMQ cuts every connection every
   few seconds during training and inference load;
3. ``restart``: a private RabbitMQ node (port 5673, :func:`tests.support.rabbit.private_broker`)
   is restarted under inference (and, in full mode, training) load;
4. ``corpus``: malformed and hostile requests (:mod:`soak.corpus`) to all three request
   queues;
5. ``sustained``: inference at a fixed rate;
6. ``cluster``: a private three-node cluster (:mod:`tests.support.cluster`, ports
   5690-5692) loses a node again and again under training and inference load: kill -9
   of the node a worker is on, of the node leading the request queue, a clean stop; lost,
   duplicated, and how soon each worker consumes again.  ``--short`` leaves it out
   (``tests/test_cluster.py`` is the short version in ``make test``); ``--only cluster``
   runs it alone.

Workers are :mod:`bench.instrumented` (the real worker with a journal of what it
publishes).  Exits 1 when anything was lost, a worker crashed, a payload ran code, or
the contract was broken (a job not completed, a second terminal message, an epoch not
announced exactly once and in order, a hostile message handled otherwise); 2
when the run could not be set up.  Every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    STARTED,
    Got,
    LoadSampler,
    Sender,
    build_model,
    is_terminal,
    machine,
    now_utc,
    parse_ts,
    percentile,
    rss_mib,
    versions,
)
from bench.images import png_images
from soak import corpus
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


def reconnects(h: Harness) -> tuple[int, int]:
    consumer = sum(p.text(since_start=False).count("[RMQ] Reconnected to") for p in h.procs.values())
    publisher = sum(p.text(since_start=False).count("Publisher reconnected") for p in h.procs.values())
    return consumer, publisher


class InferLoad:
    """Sends one-image inference requests at a fixed rate on its own thread and connection."""

    def __init__(self, world: World, h: Harness, rate: float, tag: str) -> None:
        self.world = world
        self.h = h
        self.rate = rate
        self.tag = tag
        self.sent: dict[str, float] = {}
        self.unsent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"load-{tag}", daemon=True)

    def start(self) -> InferLoad:
        self._thread.start()
        return self

    def _run(self) -> None:
        sender = Sender(self.h.host, self.h.port)
        queue = self.h.settings.infer_request_queue
        started = time.monotonic()
        i = 0
        try:
            while not self._stop.is_set():
                due = started + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                    continue
                job_id = f"{self.tag}-{i}"
                at = time.time()
                if sender.send_retrying(queue, self.world.infer_request(job_id, i), timeout=60):
                    self.sent[job_id] = at
                else:
                    self.unsent += 1
                i += 1
        finally:
            sender.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)

    def answers(self) -> dict[str, list[Got]]:
        terms = terminals_by_job(self.h.messages())
        return {j: terms.get(j, []) for j in self.sent}

    def wait_answered(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.answers().values()):
                return True
            time.sleep(0.3)
        return False

    def lines(self, part: Part) -> list[float]:
        answers = self.answers()
        answered = {j: a for j, a in answers.items() if a}
        failed = [a[0].body for a in answered.values() if a[0].type != "inference_completed"]
        twice = {j: a for j, a in answered.items() if len({m.message_id for m in a}) > 1}
        latencies = [(min(m.t for m in a) - self.sent[j]) * 1000 for j, a in answered.items()]
        part.add(f"inference requests sent (confirmed by the broker): {len(self.sent)}; answered: {len(answered)}; "
                 f"unanswered: {len(answers) - len(answered)}")
        part.add(f"inference requests answered more than once (different message_ids): {len(twice)}")
        if failed:
            part.findings.append(f"{len(failed)} inference request(s) failed, e.g. {failed[0]}")
        if len(answers) > len(answered):
            part.fail(f"{len(answers) - len(answered)} inference request(s) never answered")
            part.lost += len(answers) - len(answered)
        if twice:
            part.fail(f"{len(twice)} inference request(s) answered twice after a redelivery "
                                 "(at-least-once; the contract asks for exactly one terminal message)")
        if self.unsent:
            part.notes.append(f"{self.unsent} request(s) could not be sent at all (broker unreachable for 60 s)")
        return latencies


# --- 1. SIGKILL during training ----------------------------------------------------------------


#: one SIGKILL: (worker name, its pid, wall-clock time, what it was doing)
Kill = tuple[str, int, float, str]


def kill_section(world: World) -> Part:
    """Training jobs while workers are SIGKILLed and restarted: every job must still end exactly
    once, with each epoch announced once and in order, whatever moment the kill hit."""
    cfg = world.cfg
    part = Part("kill", f"Training workers SIGKILLed at random moments ({cfg.kill_jobs} jobs × {cfg.kill_epochs} "
                        f"epochs, {cfg.kill_workers} worker(s), LEASE_SECONDS=4)")
    h = Harness(world.root, "kill", storage_dir=world.storage,
                env={"LEASE_SECONDS": "4", "RABBITMQ_DELIVERY_LIMIT": "50"})
    try:
        names = [f"train{i}" for i in range(cfg.kill_workers)]
        for name in names:
            h.worker("train", name, wait=False)
        h.wait_started(names)
        jobs = [f"kill-{i}" for i in range(cfg.kill_jobs)]
        for job in jobs:
            h.sender.send(h.settings.train_request_queue, world.train_request(job, cfg.kill_epochs))
        kills = kill_until_done(world, h, names, jobs)
        time.sleep(1.5)  # a duplicate would arrive right behind the terminal message
        h.wait_delivered(30)
        messages = h.messages()
        job_lines(part, jobs, messages)
        phases = Counter(k[3] for k in kills)
        part.add(f"SIGKILLs: {len(kills)} (" + ", ".join(f"{n} {p}" for p, n in phases.most_common()) + ")")
        if not kills:
            part.fail("no worker was killed: the jobs finished before the first kill (more epochs, or kill sooner)")
        retrained, resumed = kill_redo_lines(part, cfg, h, jobs, messages, kills)
        epoch_lines(part, jobs, messages, cfg.kill_epochs)
        delivery_lines(part, h)
        crash_lines(part, h)
        stop_lines(part, h)
        part.data.update({"kills": len(kills), "retrained": retrained, "resumed": resumed})
    finally:
        h.close()
    return part


def kill_until_done(world: World, h: Harness, names: list[str], jobs: list[str]) -> list[Kill]:
    """SIGKILL a random worker every few seconds (at most ``kill_max`` times) and restart it at once,
    as supervisord would, until every job has a terminal message or ``kill_deadline`` passes."""
    cfg = world.cfg
    deadline = time.monotonic() + cfg.kill_deadline
    next_kill = time.monotonic() + world.rng.uniform(*cfg.kill_every)
    kills: list[Kill] = []
    while time.monotonic() < deadline:
        h.check()
        for name in names:  # as supervisord would: a crashed worker comes back
            if not h.procs[name].alive:
                h.restart(name)
        done = terminals_by_job(h.messages())
        if all(done.get(j) for j in jobs):
            break
        if time.monotonic() >= next_kill and len(kills) < cfg.kill_max:
            victim = world.rng.choice(names)
            proc = h.procs[victim]
            phase = kill_phase(h, proc.pid, proc.text())
            kills.append((victim, proc.pid, time.time(), phase))
            h.kill(victim)
            h.restart(victim)
            next_kill = time.monotonic() + world.rng.uniform(*cfg.kill_every)
        time.sleep(0.2)
    return kills


def kill_redo_lines(part: Part, cfg: Config, h: Harness, jobs: list[str], messages: list[Got],
                    kills: list[Kill]) -> tuple[int, int]:
    """What the kills cost: epochs trained twice, epochs cut short, resumes from a checkpoint and how
    long a killed job took to run again.  Returns (epochs re-trained, resumed training_started)."""
    events = h.journal()
    trained = Counter((e.get("job"), e.get("epoch")) for e in events
                      if e.get("ev") == "train_epoch_end" and not e.get("final_eval"))
    retrained = sum(n - 1 for n in trained.values())
    part.add(f"epochs re-trained (an epoch's training pass finished more than once): {retrained} of "
             f"{cfg.kill_jobs * cfg.kill_epochs} epochs")
    killed = {pid for _, pid, _, _ in kills}
    begun = Counter((e.get("pid"), e.get("epoch")) for e in events if e.get("ev") == "train_epoch_start")
    ended = Counter((e.get("pid"), e.get("epoch")) for e in events if e.get("ev") == "train_epoch_end")
    partial = sum(1 for key in begun if key[0] in killed and key not in ended)
    part.add(f"epochs cut short by a kill (their partial work is redone): {partial}")
    starts = [m for m in messages if m.type == "training_started" and m.job_id in jobs]
    resumed = [m for m in starts if int(m.body.get("resumed_from_epoch", 0)) > 0]
    part.add(f"training_started messages: {len(starts)}, of which resumed from a checkpoint: {len(resumed)}")
    back = back_after_kill(events, starts, kills)
    if back:
        part.add(f"kill of a worker with a job → that job running again (training_started; includes the "
                 f"worker's restart, the lease running out and waiting for a free worker): median "
                 f"{statistics.median(back):.1f} s, max {max(back):.1f} s ({len(back)} kills)")
    return retrained, len(resumed)


def back_after_kill(events: list[dict[str, Any]], starts: list[Got], kills: list[Kill]) -> list[float]:
    """Seconds from each kill of a worker that had taken a job to that job's next training_started:
    the recovery time a BE sees (kills of an idle worker have no job and are left out)."""
    back = []
    for _, pid, t, _ in kills:
        owned = [e for e in events if e.get("pid") == pid and e.get("ev") == "take"]
        if not owned:
            continue
        owner = str(owned[-1].get("job"))
        later = [m.t for m in starts if m.job_id == owner and m.t > t]
        if later:
            back.append(min(later) - t)
    return back


def kill_phase(h: Harness, pid: int, log: str) -> str:
    if STARTED not in log:
        return "while starting"
    mine = [e for e in h.journal() if e.get("pid") == pid]
    if not mine:
        return "while idle"
    last = mine[-1].get("ev")
    if last in ("job", "process_start", "publish") and not any(e.get("ev") == "take" for e in mine):
        return "while idle"
    if last == "job":
        return "between jobs"
    if last in ("take", "download"):
        return "while setting up a job"
    if last == "finish":
        return "right after a job ended"
    return "during training"


def epoch_lines(part: Part, jobs: list[str], messages: list[Got], epochs: int) -> None:
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


# --- 2. connection cuts ------------------------------------------------------------------------


def proxy_section(world: World) -> Part:
    from tests.support.proxy import CuttableProxy

    cfg = world.cfg
    part = Part("proxy", f"Connections cut every {cfg.cut_every[0]:g}–{cfg.cut_every[1]:g} s by a TCP proxy between "
                         f"the workers and RabbitMQ ({cfg.proxy_window:g} s of training and inference load)")
    h = Harness(world.root, "proxy", storage_dir=world.storage,
                env={"LEASE_SECONDS": "4", "RABBITMQ_DELIVERY_LIMIT": "50"})
    proxy = CuttableProxy(h.port)
    stop = threading.Event()
    try:
        env = {"RABBITMQ_PORT": str(proxy.port)}
        h.worker("train", "train", wait=False, **env)
        h.worker("infer", "infer", wait=False, **env)
        h.wait_started(["train", "infer"])
        jobs = [f"cut-{i}" for i in range(cfg.proxy_jobs)]
        for job in jobs:
            h.sender.send(h.settings.train_request_queue, world.train_request(job, cfg.proxy_epochs))

        def cutter() -> None:
            while not stop.wait(world.rng.uniform(*cfg.cut_every)):
                proxy.cut()
                stop.wait(world.rng.uniform(*cfg.cut_for))
                proxy.restore()

        thread = threading.Thread(target=cutter, name="cutter", daemon=True)
        thread.start()
        load = InferLoad(world, h, cfg.proxy_rate, "cutinf").start()
        time.sleep(cfg.proxy_window)
        load.stop()
        stop.set()
        thread.join(10)
        proxy.restore()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            h.check()
            if all(terminals_by_job(h.messages()).get(j) for j in jobs) and all(load.answers().values()):
                break
            time.sleep(0.5)
        time.sleep(1.5)
        h.wait_delivered(30)
        part.add(f"cuts: {proxy.cuts} (each {cfg.cut_for[0]:g}–{cfg.cut_for[1]:g} s without a connection)")
        consumer, publisher = reconnects(h)
        part.add(f"reconnects: consumers {consumer}, publishers {publisher}")
        latencies = load.lines(part)
        if latencies:
            part.add(f"inference latency under cuts: p50 {percentile(latencies, 50):.0f} ms, "
                     f"p99 {percentile(latencies, 99):.0f} ms")
        job_lines(part, jobs, h.messages(), "training jobs")
        epoch_lines(part, jobs, h.messages(), cfg.proxy_epochs)
        delivery_lines(part, h)
        crash_lines(part, h)
        stop_lines(part, h)
    finally:
        stop.set()
        proxy.close()
        h.close()
    return part


# --- 3. broker restart -------------------------------------------------------------------------


def restart_section(world: World) -> Part:
    from tests.support import rabbit

    cfg = world.cfg
    part = Part("restart", "A private RabbitMQ node restarted under load (quorum queues, durable messages)")
    if not rabbit.available():
        part.skipped = "rabbitmq-server is not installed"
        return part
    with rabbit.private_broker() as broker:
        h = Harness(world.root, "restart", port=broker.port, storage_dir=world.storage,
                    env={"LEASE_SECONDS": "4", "RABBITMQ_DELIVERY_LIMIT": "50"})
        try:
            names = ["infer"] + (["train"] if cfg.restart_training else [])
            for name in names:
                h.worker(name, name, wait=False)
            h.wait_started(names)
            jobs = []
            if cfg.restart_training:
                jobs = ["restart-train"]
                h.sender.send(h.settings.train_request_queue, world.train_request(jobs[0], 8))
            h.sender.close()
            load = InferLoad(world, h, cfg.restart_rate, "rsinf").start()
            time.sleep(5)
            stopped = time.time()
            broker.stop()
            down_until = time.time() + cfg.restart_down
            while time.time() < down_until:
                time.sleep(0.2)
            broker.start()
            up = time.time()
            for proc in h.procs.values():
                proc.wait_log("[RMQ] Reconnected to", timeout=120)
                proc.wait_log("Publisher reconnected", timeout=120)
            time.sleep(5)
            load.stop()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                h.check()
                if all(load.answers().values()) and all(terminals_by_job(h.messages()).get(j) for j in jobs):
                    break
                time.sleep(0.5)
            time.sleep(1.5)
            h.wait_delivered(30)
            part.add(f"broker down: {up - stopped:.1f} s (stop, {cfg.restart_down:g} s down, start until it "
                     "answers)")
            for name, proc in h.procs.items():
                consuming = last_time(proc.lines(since_start=False), "[RMQ] Reconnected to")
                publishing = last_time(proc.lines(since_start=False), "Publisher reconnected")
                part.add(f"{name} worker: consuming again {consuming - up:.1f} s after the broker was up, publisher "
                         f"reconnected after {publishing - up:.1f} s (RECONNECT_MAX_DELAY=2)")
                part.data[f"{name}_consuming_s"] = round(consuming - up, 2)
            after = [m.t for m in h.messages() if m.type == "inference_completed" and m.t > up]
            if after:
                part.add(f"first inference answer after the restart: {min(after) - up:.1f} s after the broker was up")
            load.lines(part)
            if jobs:
                job_lines(part, jobs, h.messages(), "training jobs")
            delivery_lines(part, h)
            crash_lines(part, h)
            stop_lines(part, h)
        finally:
            h.close()
    return part


def last_time(records: Any, text: str) -> float:
    found = float("nan")
    for record in records:
        if text in str(record.get("message", "")) and "ts" in record:
            found = parse_ts(str(record["ts"]))
    return found


# --- 4. hostile corpus and 5. sustained load ---------------------------------------------------


def corpus_section(world: World, h: Harness) -> Part:
    """Send every hostile case of :mod:`soak.corpus`, wait until each is answered or dead-lettered
    as the contract says, and check that none ran code, wrote service records or leaked a file."""
    part = Part("corpus", "Malformed and hostile messages to the three request queues")
    markers = world.root / "markers"
    markers.mkdir(exist_ok=True)
    refs = corpus.plant(world.storage, markers, world.shapes)
    refs["model"] = MODEL_KEY
    entries = corpus.build(refs)
    queues = {"train": h.settings.train_request_queue, "convert": h.settings.convert_request_queue,
              "infer": h.settings.infer_request_queue}
    send_corpus(h, entries, queues)
    dlq = DeadLetters(h, queues, entries)
    wait_settled(h, dlq, entries)
    dlq.close()
    terms = terminals_by_job(h.messages())
    per_op = Counter(e.op for e in entries)
    part.add(f"messages sent: {len(entries)} ({', '.join(f'{n} {op}' for op, n in per_op.items())}); distinct "
             f"hostile cases: {len({e.name.split(':', 1)[1] for e in entries})}")
    tally = Outcomes.count(entries, terms, dlq.dead)
    tally.lines(part)
    ran = payloads_ran(part, markers)
    touched = records_touched(part, world, refs)
    leaked = symlink_leaks(part, world)
    crash_lines(part, h)
    part.data.update({"entries": len(entries), "answered": tally.answered, "dead_lettered": tally.dead_lettered,
                      "neither": tally.neither, "unaccounted": len(tally.unaccounted), "codes": dict(tally.codes),
                      "payloads_ran": ran, "records_touched": touched, "symlink_leaks": len(leaked),
                      "outcomes": tally.table})
    return part


def send_corpus(h: Harness, entries: list[corpus.Entry], queues: dict[str, str]) -> None:
    """Publish each entry as it is, with its own properties: a missing or odd content_type is one of the cases."""
    for e in entries:
        props = dict(e.props)
        content_type = props.pop("content_type", "application/json")
        h.sender.send(queues[e.op], e.body, content_type=content_type, **props)


class DeadLetters:
    """Counts what reached each ``<queue>.dlq``, per corpus entry: a dead-lettered body is matched
    back to its entry by (op, sha256 of the body), since hostile messages need not carry a job_id."""

    def __init__(self, h: Harness, queues: dict[str, str], entries: list[corpus.Entry]) -> None:
        channel = h.sender.connection.channel() if h.sender.connection is not None else None
        assert channel is not None
        self.channel = channel
        self.queues = queues
        self.digest = {(e.op, hashlib.sha256(e.body).hexdigest()): e for e in entries}
        self.dead: Counter[str] = Counter()

    def drain(self) -> None:
        """Take (and ack) everything in the DLQs now, so a later drain only sees new arrivals."""
        for op, queue in self.queues.items():
            while True:
                method, _, body = self.channel.basic_get(f"{queue}.dlq", auto_ack=True)
                if method is None:
                    break
                raw = body if isinstance(body, bytes) else str(body or "").encode()
                entry = self.digest.get((op, hashlib.sha256(raw).hexdigest()))
                self.dead[entry.name if entry else f"{op}:?"] += 1

    def close(self) -> None:
        self.channel.close()


def outcome(e: corpus.Entry, terms: dict[str, list[Got]], dead: Counter[str]) -> tuple[bool, bool]:
    """(answered, dead-lettered) for one entry."""
    return bool(e.job_id and terms.get(e.job_id)), dead.get(e.name, 0) > 0


def needs_answer(e: corpus.Entry) -> bool:
    """The entry's ``expect`` asks for a terminal message for its job_id."""
    return "answer" in e.expect or e.expect == "any-terminal"


def settled(h: Harness, entries: list[corpus.Entry], dead: Counter[str]) -> bool:
    """Every entry has what its ``expect`` asks for (an answer, a dead letter, or both)."""
    terms = terminals_by_job(h.messages())
    for e in entries:
        answered, dlq = outcome(e, terms, dead)
        if needs_answer(e) and not answered:
            return False
        if "dlq" in e.expect and not dlq:
            return False
    return True


def wait_settled(h: Harness, dlq: DeadLetters, entries: list[corpus.Entry]) -> None:
    """Until settled and 3 s quiet (a late duplicate would still show), or a minute with nothing new
    (count what is missing), or 240 s in all: bounded whatever the workers do."""
    deadline = time.monotonic() + 240
    quiet_since = time.monotonic()
    last = (0, 0)
    while time.monotonic() < deadline:
        h.check()
        dlq.drain()
        now = (len(h.messages()), sum(dlq.dead.values()))
        if now != last:
            last, quiet_since = now, time.monotonic()
        if settled(h, entries, dlq.dead) and time.monotonic() - quiet_since > 3:
            break
        if time.monotonic() - quiet_since > 60:
            break  # nothing moved for a minute: count what is missing
        time.sleep(0.5)


@dataclass
class Outcomes:
    """What happened to the corpus entries, against what the contract asks of each."""

    answered: int = 0
    dead_lettered: int = 0
    both: int = 0
    neither: int = 0
    unaccounted: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    table: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def count(cls, entries: list[corpus.Entry], terms: dict[str, list[Got]], dead: Counter[str]) -> Outcomes:
        out = cls()
        for e in entries:
            a, d = outcome(e, terms, dead)
            out.add(e, a, d, terms[e.job_id][0] if a and e.job_id else None)
        return out

    def add(self, e: corpus.Entry, a: bool, d: bool, first: Got | None) -> None:
        """One entry: ``first`` is its first terminal message when answered."""
        body = first.body if first is not None else {}
        self.table[e.name] = {"answered": a, "dead_lettered": d, "expect": e.expect,
                              "answer": body.get("error_code") or body.get("type"),
                              "message": str(body.get("error_message", ""))[:200]}
        self.answered += a
        self.dead_lettered += d
        self.both += a and d
        self.neither += not a and not d
        if first is not None:
            self.codes[str(first.body.get("error_code", first.type))] += 1
        need_answer = needs_answer(e)
        need_dlq = "dlq" in e.expect
        if ((need_answer and not a) and (need_dlq and not d)) or (not a and not d and e.expect != "silent_ok"):
            self.unaccounted.append(e.name)
        elif (need_answer and not a) or (need_dlq and not d):
            self.differs.append(f"{e.name} (answered {a}, dead-lettered {d})")

    def lines(self, part: Part) -> None:
        part.add(f"answered (a *_failed/terminal message for its job_id): {self.answered}")
        part.add(f"dead-lettered (in <queue>.dlq): {self.dead_lettered}; both answered and dead-lettered: "
                 f"{self.both}")
        part.add("neither (dropped on purpose: answers addressed to a reply_to queue that does not exist): "
                 f"{self.neither}")
        part.add("answers by error_code: " + ", ".join(f"{c} {n}" for c, n in self.codes.most_common()))
        part.add("messages neither answered nor dead-lettered where the contract asks for one: "
                 f"{len(self.unaccounted)}")
        if self.unaccounted:
            part.fail(f"{len(self.unaccounted)} hostile message(s) vanished: {self.unaccounted[:8]}")
            part.lost += len(self.unaccounted)
        if self.differs:
            part.fail(f"{len(self.differs)} outcome(s) differ from the contract: {self.differs[:8]}")
        if self.codes.get("internal_error"):
            part.findings.append(f"{self.codes['internal_error']} answer(s) with internal_error (an unexpected "
                                 "exception in a worker)")


def payloads_ran(part: Part, markers: Path) -> list[str]:
    """The corpus payloads each mkdir a marker when unpickled/executed: any marker is code that ran."""
    ran = sorted(p.name for p in markers.iterdir())
    part.add(f"payloads that ran code (pickle .pt, torch zip, pickled label caches inside and outside the dataset, "
             f"list-file escapes, download scripts, YAML tag, EPS): {len(ran)}")
    if ran:
        part.fail(f"a hostile payload ran code in a worker: {ran}")
    return ran


def records_touched(part: Part, world: World, refs: dict[str, str]) -> int:
    """Requests naming reserved keys (JOBS_PREFIX) must not change the service's own records."""
    touched = 0 if corpus.victim_untouched(world.storage, refs) else 1
    part.add(f"service records touched by reserved-key requests: {touched}")
    if touched:
        part.fail("a request wrote into the service's own storage area (JOBS_PREFIX)")
    return touched


def symlink_leaks(part: Part, world: World) -> list[str]:
    """A dataset symlink points at a SOAK-SECRET file outside STORAGE_DIR: a copy of its content
    anywhere under the temp root means a worker followed the link."""
    leaked = [str(p) for p in world.root.rglob("*")
              if p.is_file() and not p.is_symlink() and "soak-secret" not in p.name
              and p.stat().st_size < 10**6 and b"SOAK-SECRET" in p.read_bytes()]
    part.add(f"copies of a file outside STORAGE_DIR that a dataset symlink pointed at: {len(leaked)}")
    if leaked:
        part.fail(f"a symlink was followed out of STORAGE_DIR: {leaked[:3]}")
    return leaked


def sustained_section(world: World, h: Harness) -> Part:
    cfg = world.cfg
    part = Part("sustained", f"Sustained inference load ({cfg.sustained_rate:g} requests/s for "
                             f"{cfg.sustained_seconds:g} s, one {IMGSZ_INFER} px image each)")
    proc = h.procs["infer"]
    rss_start = rss_mib(proc.pid)
    samples = [rss_start]
    load = InferLoad(world, h, cfg.sustained_rate, "sust").start()
    began = time.monotonic()
    while time.monotonic() - began < cfg.sustained_seconds:
        time.sleep(min(5.0, cfg.sustained_seconds / 4))
        samples.append(rss_mib(proc.pid))
    load.stop()
    sent_in = time.monotonic() - began
    load.wait_answered(120)
    rss_end = rss_mib(proc.pid)
    latencies = load.lines(part)
    part.add(f"achieved send rate: {len(load.sent) / sent_in:.1f} requests/s")
    if latencies:
        part.add(f"latency (publish → answer): p50 {percentile(latencies, 50):.0f} ms, p99 "
                 f"{percentile(latencies, 99):.0f} ms, max {max(latencies):.0f} ms")
    part.add(f"inference worker RSS: {rss_start:.0f} MiB at the start, {rss_end:.0f} MiB at the end, max "
             f"{max([*samples, rss_end]):.0f} MiB")
    crash_lines(part, h)
    part.data.update({"sent": len(load.sent), "p99_ms": percentile(latencies, 99) if latencies else None,
                      "rss_start": rss_start, "rss_end": rss_end})
    return part


# MAX_MESSAGE_BYTES of the "tight" infer worker: the request fits, its answer (>= 75 B an image) cannot
STALL_LIMIT = 3000


def stall_lines(world: World, h: Harness, part: Part) -> None:
    """An answer over MAX_MESSAGE_BYTES must become a small *_failed, and the answers behind it go on."""
    queue = f"{h.settings.infer_request_queue}-tight"
    h.worker("infer", "tight", INFER_REQUEST_QUEUE=queue, MAX_MESSAGE_BYTES=str(STALL_LIMIT))
    key = "images/soak-stall.png"
    (world.storage / key).parent.mkdir(parents=True, exist_ok=True)
    (world.storage / key).write_bytes(base64.b64decode(world.images[0]))
    params = {"conf": 0.001, "iou": 0.7, "imgsz": IMGSZ_INFER, "max_det": 1000, "classes": None}
    jobs = {"hs-stall-big": [{"path": key}] * 48, **{f"hs-stall-after{i}": [{"path": key}] for i in range(3)}}
    for job_id, images in jobs.items():
        body = {"job_id": job_id, "model": {"path": MODEL_KEY}, "images": images, "params": params}
        h.sender.send(queue, json.dumps(body).encode(), content_type="application/json")
    deadline = time.monotonic() + 120
    terms: dict[str, list[Got]] = {}
    while time.monotonic() < deadline:
        terms = terminals_by_job(h.messages())
        if all(terms.get(j) for j in jobs):
            break
        time.sleep(0.5)
    big = terms.get("hs-stall-big", [])
    replaced = bool(big) and big[0].type == "inference_failed" and "byte limit" in str(
        big[0].body.get("error_message", ""))
    after = sum(1 for j in jobs if j != "hs-stall-big" and terms.get(j) and terms[j][0].type == "inference_completed")
    stalled = 0 if replaced and after == 3 else 1
    part.add(f"oversized answer (48 images, conf 0.001, max_det 1000, MAX_MESSAGE_BYTES {STALL_LIMIT}): "
             f"{'replaced by a small inference_failed' if replaced else 'NOT replaced'}; answers behind it "
             f"delivered: {after} of 3; stalled publishers: {stalled}")
    if stalled:
        got = big[0].body if big else {}
        part.fail(f"an oversized answer stalled a worker's publishing (got {got.get('type')}: "
                  f"{str(got.get('error_message', ''))[:200]})")
    part.data["stalled_publishers"] = stalled


def corpus_and_load(world: World) -> list[Part]:
    h = Harness(world.root, "corpus", storage_dir=world.storage, env={"LEASE_SECONDS": "10"})
    try:
        for op in ("train", "convert", "infer"):
            h.worker(op, op, wait=False)
        h.wait_started(["train", "convert", "infer"])
        parts = [corpus_section(world, h)]
        stall_lines(world, h, parts[0])
        parts.append(sustained_section(world, h))
        stop_lines(parts[-1], h)
        return parts
    finally:
        h.close()


# --- 6. a three-node cluster losing nodes ------------------------------------------------------


def cluster_node_of(proc: Any, what: str) -> int | None:
    """The node (index) the worker's ``what`` connection ("consumer") last connected to,
    from its ``[RMQ] Connected to 127.0.0.1:<port>`` log lines."""
    from tests.support.cluster import BASE_PORT

    found = None
    for record in proc.lines(since_start=False):
        text = str(record.get("message", ""))
        if text.startswith("[RMQ] Connected to ") and what in text:
            found = int(text.split()[3].rsplit(":", 1)[1]) - BASE_PORT
    return found


def wait_reconnected(proc: Any, before: int, lost_at: float, timeout: float = 60.0) -> float | None:
    """Seconds from ``lost_at`` to the worker's next ``[RMQ] Reconnected to`` (its consumer
    consuming again on another node), or None past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.text(since_start=False).count("[RMQ] Reconnected to") > before:
            return last_time(proc.lines(since_start=False), "[RMQ] Reconnected to") - lost_at
        time.sleep(0.1)
    return None


def cluster_section(world: World) -> Part:
    from tests.support import cluster as private

    cfg = world.cfg
    rounds = 3 if cfg.short else 6
    part = Part("cluster", f"A three-node RabbitMQ cluster losing a node {rounds} times under load (kill -9 of "
                           "the node a worker is on, of the node leading the request queue, a clean stop; "
                           "quorum queues, RABBITMQ_HOST a node list)")
    if not private.available():
        part.skipped = "rabbitmq-server is not installed"
        return part
    booted = time.monotonic()
    with private.private_cluster() as c:
        part.add(f"cluster of {len(c.nodes)} private nodes up and joined in {time.monotonic() - booted:.0f} s")
        h = Harness(world.root, "cluster", storage_dir=world.storage,
                    env={**c.env(), "RABBITMQ_PORT": str(c.nodes[0].port), "LEASE_SECONDS": "4",
                         "RABBITMQ_DELIVERY_LIMIT": "50"})
        try:
            for name in ("infer", "train"):
                h.worker(name, name, wait=False)
            h.wait_started(["infer", "train"])
            epochs = 3 if cfg.short else 6
            jobs = [f"cluster-train-{i}" for i in range(2 if cfg.short else 3)]
            for job in jobs:
                h.sender.send(h.settings.train_request_queue, world.train_request(job, epochs))
            h.sender.close()
            load = InferLoad(world, h, cfg.restart_rate, "clinf").start()
            time.sleep(3)
            recovery: list[float] = []
            plan = ["worker", "leader", "stop"] * (rounds // 3)
            for i, how in enumerate(plan):
                if how == "leader":
                    victim, verb = c.leader(h.settings.infer_request_queue), "kill -9 of the request queue's leader"
                elif how == "worker":
                    proc = h.procs["infer" if i % 2 == 0 else "train"]
                    victim, verb = cluster_node_of(proc, "consumer") or 0, "kill -9 of a worker's node"
                else:
                    victim, verb = cluster_node_of(h.procs["train"], "consumer") or 0, "clean stop of a node"
                on_it = {n: p.text(since_start=False).count("[RMQ] Reconnected to")
                         for n, p in h.procs.items() if cluster_node_of(p, "consumer") == victim}
                lost_at = time.time()
                c.stop(victim) if how == "stop" else c.kill9(victim)
                waits = {n: wait_reconnected(h.procs[n], before, lost_at) for n, before in on_it.items()}
                for name, seconds in waits.items():
                    if seconds is None:
                        part.fail(f"{name} worker not consuming again 60 s after the {verb} (node {victim})")
                    else:
                        recovery.append(seconds)
                time.sleep(2)
                c.start(victim)
                shown = ", ".join(f"{n} consuming again after {s:.1f} s" for n, s in waits.items() if s is not None)
                part.add(f"round {i + 1}: {verb} (node {victim + 1}): {shown or 'no worker was on it'}")
            time.sleep(2)
            load.stop()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                h.check()
                if all(load.answers().values()) and all(terminals_by_job(h.messages()).get(j) for j in jobs):
                    break
                time.sleep(0.5)
            time.sleep(1.5)
            h.wait_delivered(30)
            if recovery:
                part.add(f"time to consume again after losing its node: median {statistics.median(recovery):.1f} s, "
                         f"max {max(recovery):.1f} s over {len(recovery)} losses (RECONNECT_MAX_DELAY=2)")
            part.data["consuming_again_s"] = [round(x, 2) for x in recovery]
            load.lines(part)
            job_lines(part, jobs, h.messages(), "training jobs")
            epoch_lines(part, jobs, h.messages(), epochs)
            delivery_lines(part, h)
            crash_lines(part, h)
            stop_lines(part, h)
        finally:
            h.close()
    return part


# --- report ------------------------------------------------------------------------------------


SECTIONS: dict[str, Callable[[World], list[Part]]] = {
    "kill": lambda w: [kill_section(w)],
    "proxy": lambda w: [proxy_section(w)],
    "restart": lambda w: [restart_section(w)],
    "corpus": corpus_and_load,
    "cluster": lambda w: [cluster_section(w)],
}
#: what --short runs without --only: the cluster section is left to tests/test_cluster.py there
SHORT_SECTIONS = [name for name in SECTIONS if name != "cluster"]


def report(parts: list[Part], meta: dict[str, Any]) -> str:
    failures = [f for p in parts for f in p.failures]
    m, v, load = meta["machine"], meta["versions"], meta["load"]
    busy = load["at_start_1_5_15"][0] > 0.5  # during the run, the load is mostly the soak's own
    out = [
        "# Reliability",
        "",
        f"Measured by `make soak` (`python -m soak.run{' --short' if meta['short'] else ''}`): real worker "
        "processes, the real RabbitMQ, real Ultralytics on the CPU. Each line is one figure. `make soak` exits "
        "non-zero when anything was lost, a worker crashed, a hostile payload ran code or the contract was "
        "broken (a job not completed, a second terminal message, an epoch not announced exactly once and in "
        "order); `make test` runs the short version (tests/test_soak.py).",
        "",
        f"- **Date:** {meta['date']} ({'short' if meta['short'] else 'full'} run, {meta['seconds'] / 60:.1f} min, "
        f"seed {meta['seed']})",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['gpu']}",
        "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- **Load:** 1-minute load average {load['at_start_1_5_15'][0]} before the run, median "
        f"{load['during_median']} and max {load['during_max']} during it."
        + (" The machine was not idle when the run began." if busy else ""),
        "- **Verdict:** "
        + ("PASS — nothing lost, no worker crashed, no payload ran, the contract held" if not failures else "FAIL"),
        "",
    ]
    for p in parts:
        out += [f"## {p.title}", ""]
        if p.skipped:
            out += [f"- skipped: {p.skipped}", ""]
            continue
        out += [f"- {line}" for line in p.lines]
        out += [f"- **failure:** {f}" for f in p.failures]
        out += [f"- **finding:** {f}" for f in p.findings]
        out += [f"- note: {n}" for n in p.notes]
        out += [f"- ({p.seconds:.0f} s)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="the ~2-minute version `make test` runs")
    parser.add_argument("--seed", type=int, default=None, help="random seed (kill and cut times)")
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--report", help="write the report here (default: docs/RELIABILITY.md for a full run, "
                                         "nothing for --short)")
    parser.add_argument("--json", help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, journals)")
    parser.add_argument("--from-json", metavar="RESULT", help="run nothing: write the report of a --json result "
                                                              "(to --report, default docs/RELIABILITY.md)")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        meta = {k: saved[k] for k in ("date", "short", "seed", "seconds", "machine", "versions", "load")}
        meta["machine"].setdefault("gpu", "no GPU (everything ran on the CPU)")
        out = Path(args.report) if args.report else REPO / "docs" / "RELIABILITY.md"
        out.write_text(report([Part(**p) for p in saved["parts"]], meta))
        print(f"soak: wrote {out} from {args.from_json}", file=sys.stderr)
        return 1 if saved["failures"] else 0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    cfg = Config.make(args.short, seed)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SHORT_SECTIONS if args.short
                                                                                else SECTIONS)
    if set(chosen) - set(SECTIONS):
        parser.error(f"unknown section(s); choose from {', '.join(SECTIONS)}")
    sampler = LoadSampler()
    date = now_utc()
    began = time.monotonic()
    parts: list[Part] = []
    root = Path(tempfile.mkdtemp(prefix="ai-soak-"))
    try:
        try:
            world = World(root, cfg)
        except Exception:  # noqa: BLE001, RUF100 - could not even set up
            traceback.print_exc()
            return 2
        for name in chosen:
            t0 = time.monotonic()
            print(f"soak: {name} ...", file=sys.stderr, flush=True)
            try:
                done = SECTIONS[name](world)
            except Exception as exc:  # noqa: BLE001, RUF100 - report and go on with the next section
                traceback.print_exc()
                broken = Part(name, name)
                broken.fail(f"the section itself failed: {type(exc).__name__}: {exc}")
                done = [broken]
            for part in done:
                part.seconds = time.monotonic() - t0
                for line in part.lines + [f"FAILURE: {f}" for f in part.failures] + \
                        [f"finding: {f}" for f in part.findings]:
                    print(f"soak: [{part.key}] {line}", file=sys.stderr, flush=True)
            parts += done
    finally:
        if args.keep:
            print(f"soak: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    meta = {"date": date.strftime("%Y-%m-%d %H:%M UTC"), "short": cfg.short, "seed": seed,
            "seconds": time.monotonic() - began, "machine": machine(), "versions": versions(),
            "load": sampler.stop()}
    text = report(parts, meta)
    target = Path(args.report) if args.report else (None if cfg.short or args.only else REPO / "docs" /
                                                   "RELIABILITY.md")
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"soak: wrote {target}", file=sys.stderr)
    failures = [f for p in parts for f in p.failures]
    summary = {**meta, "failures": failures, "lost": sum(p.lost for p in parts),
               "crashes": sum(p.crashes for p in parts),
               "parts": [{k: v for k, v in asdict(p).items()} for p in parts]}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
