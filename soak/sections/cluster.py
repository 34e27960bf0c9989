"""Section 6, ``cluster``: a private three-node cluster (:mod:`tests.support.cluster`, ports
5690-5692) loses a node again and again under training and inference load: kill -9 of the
node a worker is on, of the node leading the request queue, a clean stop; lost, duplicated,
and how soon each worker consumes again."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from soak.harness import Harness
from soak.load import InferLoad
from soak.world import Part, World, end_lines, epoch_lines, job_lines, last_time

if TYPE_CHECKING:
    from tests.support.cluster import Cluster


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
    """Lose a node ``rounds`` times under load: every worker on it consumes again elsewhere,
    and nothing is lost or answered twice."""
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
            plan = ["worker", "leader", "stop"] * (rounds // 3)
            recovery: list[float] = []
            for i, how in enumerate(plan):
                recovery += lose_node(part, c, h, i, how)
            time.sleep(2)
            load.stop()
            load.settle(jobs, 300)
            cluster_lines(part, h, load, jobs, epochs, recovery)
        finally:
            h.close()
    return part


def victim_of(c: Cluster, h: Harness, i: int, how: str) -> tuple[int, str]:
    """Round ``i``'s node to lose and what is done to it."""
    if how == "leader":
        return c.leader(h.settings.infer_request_queue), "kill -9 of the request queue's leader"
    if how == "worker":
        proc = h.procs["infer" if i % 2 == 0 else "train"]
        return cluster_node_of(proc, "consumer") or 0, "kill -9 of a worker's node"
    return cluster_node_of(h.procs["train"], "consumer") or 0, "clean stop of a node"


def lose_node(part: Part, c: Cluster, h: Harness, i: int, how: str) -> list[float]:
    """One round: lose a node, wait for every worker that was on it to consume again, bring the node
    back.  Returns the seconds each of those workers took."""
    victim, verb = victim_of(c, h, i, how)
    on_it = {n: p.text(since_start=False).count("[RMQ] Reconnected to")
             for n, p in h.procs.items() if cluster_node_of(p, "consumer") == victim}
    lost_at = time.time()
    c.stop(victim) if how == "stop" else c.kill9(victim)
    waits = {n: wait_reconnected(h.procs[n], before, lost_at) for n, before in on_it.items()}
    recovery: list[float] = []
    for name, seconds in waits.items():
        if seconds is None:
            part.fail(f"{name} worker not consuming again 60 s after the {verb} (node {victim})")
        else:
            recovery.append(seconds)
    time.sleep(2)
    c.start(victim)
    shown = ", ".join(f"{n} consuming again after {s:.1f} s" for n, s in waits.items() if s is not None)
    part.add(f"round {i + 1}: {verb} (node {victim + 1}): {shown or 'no worker was on it'}")
    return recovery


def cluster_lines(part: Part, h: Harness, load: InferLoad, jobs: list[str], epochs: int,
                  recovery: list[float]) -> None:
    """The section's figures, once the rounds are over and the load is answered."""
    if recovery:
        part.add(f"time to consume again after losing its node: median {statistics.median(recovery):.1f} s, "
                 f"max {max(recovery):.1f} s over {len(recovery)} losses (RECONNECT_MAX_DELAY=2)")
    part.data["consuming_again_s"] = [round(x, 2) for x in recovery]
    load.lines(part)
    job_lines(part, jobs, h.messages(), "training jobs")
    epoch_lines(part, jobs, h.messages(), epochs)
    end_lines(part, h)
