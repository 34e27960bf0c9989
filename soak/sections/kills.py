"""Section 1, ``kill``: training jobs while workers are SIGKILLed at random moments and
restarted at once, as supervisord would (``LEASE_SECONDS=4``)."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

from bench.common import STARTED, Got
from soak.harness import Harness
from soak.world import (
    Config,
    Part,
    World,
    await_stragglers,
    end_lines,
    epoch_lines,
    job_lines,
    terminals_by_job,
)

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
        await_stragglers(h)
        messages = h.messages()
        job_lines(part, jobs, messages)
        phases = Counter(k[3] for k in kills)
        part.add(f"SIGKILLs: {len(kills)} (" + ", ".join(f"{n} {p}" for p, n in phases.most_common()) + ")")
        if not kills:
            part.fail("no worker was killed: the jobs finished before the first kill (more epochs, or kill sooner)")
        retrained, resumed = kill_redo_lines(part, cfg, h, jobs, messages, kills)
        epoch_lines(part, jobs, messages, cfg.kill_epochs)
        end_lines(part, h)
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
    """What the worker was doing when it was killed, from its log and the journal."""
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
