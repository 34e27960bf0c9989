"""Section 2, ``proxy``: a TCP proxy between the workers and RabbitMQ cuts every connection
every few seconds during training and inference load."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from bench.common import percentile
from soak.harness import Harness
from soak.load import InferLoad
from soak.world import Part, World, end_lines, epoch_lines, job_lines, reconnects

if TYPE_CHECKING:
    from tests.support.proxy import CuttableProxy


def proxy_section(world: World) -> Part:
    """Training jobs and inference requests through a proxy that cuts the connections: nothing
    lost, nothing answered twice, every epoch announced once and in order."""
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
        thread = threading.Thread(target=cut_until, args=(world, proxy, stop), name="cutter", daemon=True)
        thread.start()
        load = InferLoad(world, h, cfg.proxy_rate, "cutinf").start()
        time.sleep(cfg.proxy_window)
        load.stop()
        stop.set()
        thread.join(10)
        proxy.restore()
        load.settle(jobs, 240)
        proxy_lines(part, world, h, proxy, load, jobs)
    finally:
        stop.set()
        proxy.close()
        h.close()
    return part


def cut_until(world: World, proxy: CuttableProxy, stop: threading.Event) -> None:
    """Cut every few seconds (``cut_every``) for a moment (``cut_for``) until ``stop`` is set."""
    cfg = world.cfg
    while not stop.wait(world.rng.uniform(*cfg.cut_every)):
        proxy.cut()
        stop.wait(world.rng.uniform(*cfg.cut_for))
        proxy.restore()


def proxy_lines(part: Part, world: World, h: Harness, proxy: CuttableProxy, load: InferLoad, jobs: list[str]) -> None:
    """The section's figures, once the load and the cuts are over."""
    cfg = world.cfg
    part.add(f"cuts: {proxy.cuts} (each {cfg.cut_for[0]:g}–{cfg.cut_for[1]:g} s without a connection)")
    consumer, publisher = reconnects(h)
    part.add(f"reconnects: consumers {consumer}, publishers {publisher}")
    latencies = load.lines(part)
    if latencies:
        part.add(f"inference latency under cuts: p50 {percentile(latencies, 50):.0f} ms, "
                 f"p99 {percentile(latencies, 99):.0f} ms")
    job_lines(part, jobs, h.messages(), "training jobs")
    epoch_lines(part, jobs, h.messages(), cfg.proxy_epochs)
    end_lines(part, h)
