"""Section 3, ``restart``: a private RabbitMQ node (port 5673,
:func:`tests.support.rabbit.private_broker`) restarted under inference (and, in full mode,
training) load."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from soak.harness import Harness
from soak.load import InferLoad
from soak.world import Config, Part, World, end_lines, job_lines, last_time

if TYPE_CHECKING:
    from tests.support.rabbit import PrivateBroker


def restart_section(world: World) -> Part:
    """Stop the node for ``restart_down`` seconds and start it again: every worker consumes and
    publishes again, and nothing sent before, during or after is lost."""
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
            stopped, up = bounce(broker, h, cfg)
            time.sleep(5)
            load.stop()
            load.settle(jobs, 180)
            restart_lines(part, cfg, h, stopped, up)
            load.lines(part)
            if jobs:
                job_lines(part, jobs, h.messages(), "training jobs")
            end_lines(part, h)
        finally:
            h.close()
    return part


def bounce(broker: PrivateBroker, h: Harness, cfg: Config) -> tuple[float, float]:
    """Stop the node, keep it down ``restart_down`` s, start it and wait (bounded) until every
    worker has reconnected its consumer and its publisher.  Returns (stopped, up) wall-clock times."""
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
    return stopped, up


def restart_lines(part: Part, cfg: Config, h: Harness, stopped: float, up: float) -> None:
    """How long the broker was down, and how soon each worker consumed, published and answered again."""
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
