"""One soak section's world: its own queue names, BE, storage, worker processes, journal.

Workers are :mod:`bench.instrumented` (the real worker plus a journal of every message
it hands to its publisher), so that what the service published can be compared with
what the BE received, message id by message id.  Every worker exit the harness did not
cause (SIGKILL by the chaos, SIGTERM at the end) counts as a crash.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai_service.broker import Topology
from ai_service.config import Settings
from bench.common import Got, Listener, Proc, Sender, delete_topology, read_events, worker_command
from tests.support.amqp import new_names


@dataclass
class Crash:
    worker: str
    code: int | None
    tail: str


@dataclass
class DeliveryStats:
    """AI → BE messages: what the workers published vs what the BE received."""

    published: int = 0
    received: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: int = 0
    be_redeliveries: int = 0

    def line(self) -> str:
        return (f"{self.published} published, {self.received} received, {len(self.lost)} lost, "
                f"{self.duplicated} duplicated (same message_id)")


class Harness:
    def __init__(self, root: Path, label: str, *, port: int = 5672, storage_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.root = root / label
        self.root.mkdir(parents=True, exist_ok=True)
        self.label = label
        self.names = new_names(port=port)
        self.storage_dir = storage_dir
        self.events = self.root / "events.jsonl"
        self.env = {
            **self.names.env(),
            "STORAGE_BACKEND": "local",
            "STORAGE_DIR": str(storage_dir),
            "LOG_LEVEL": "INFO",
            "RECONNECT_MAX_DELAY": "2",
            "BENCH_EVENTS": str(self.events),
            **(env or {}),
        }
        self.settings = Settings.from_env(self.env)
        self.host, self.port = self.settings.rabbitmq_host, self.settings.rabbitmq_port
        self.sender = Sender(self.host, self.port)
        assert self.sender.connection is not None
        Topology(self.settings).declare(self.sender.connection)
        s = self.settings
        self.listener = Listener(self.host, self.port, [s.train_update_queue, s.train_result_queue,
                                                        s.convert_update_queue, s.convert_result_queue,
                                                        s.infer_result_queue])
        self.procs: dict[str, Proc] = {}
        self._ours: set[int] = set()  # pids we killed or stopped
        self.crashes: list[Crash] = []
        self.kills = 0

    # --- workers -----------------------------------------------------------------------

    def worker(self, op: str, name: str, *, wait: bool = True, **env: str) -> Proc:
        work = self.root / "work" / name
        args, extra = worker_command(op, instrumented=True)
        proc = Proc(args, {**self.env, "WORK_DIR": str(work), "WORKER_NAME": f"soak/{self.label}/{name}",
                           **extra, **env},
                    self.root / f"{name}.log")
        self.procs[name] = proc
        return proc.start(wait=wait)

    def check(self) -> None:
        """Record any worker that died on its own since the last check."""
        for name, proc in self.procs.items():
            if proc.proc is not None and proc.proc.poll() is not None and proc.pid not in self._ours:
                self._ours.add(proc.pid)
                self.crashes.append(Crash(f"{self.label}/{name}", proc.proc.returncode, proc.text()[-1500:]))

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        self.check()
        if proc.alive:
            self._ours.add(proc.pid)
            proc.kill()
            self.kills += 1

    def restart(self, name: str, wait: bool = False) -> Proc:
        proc = self.procs[name]
        self.check()
        return proc.start(wait=wait)

    def stop_all(self, timeout: float = 60.0) -> dict[str, int | None]:
        self.check()
        codes = {}
        for name, proc in self.procs.items():
            if proc.alive:
                self._ours.add(proc.pid)
                codes[name] = proc.stop(timeout)
        return codes

    def wait_started(self, names: list[str], timeout: float = 180.0) -> None:
        from bench.common import STARTED

        for name in names:
            self.procs[name].wait_log(STARTED, timeout=timeout)

    # --- what happened ---------------------------------------------------------------------

    def journal(self) -> list[dict[str, Any]]:
        return read_events(self.events)

    def to_be(self, event: dict[str, Any]) -> bool:
        """A published message meant for the BE (not a lease, resubmit or dead-letter copy)."""
        if event.get("ev") != "publish":
            return False
        if event.get("ex") == self.settings.events_exchange:
            return True
        return event.get("ex") == "" and event.get("type") not in (None, "request")

    def deliveries(self, kinds: tuple[str, ...] = ("train", "convert", "infer")) -> DeliveryStats:
        published = {str(e["mid"]): e for e in self.journal() if self.to_be(e)
                     and (str(e.get("rk", "")).split(".")[0] in kinds or e.get("ex") == "")}
        got = self.listener.snapshot()
        ids = Counter(m.message_id for m in got if not m.redelivered)
        seen = {m.message_id for m in got}
        stats = DeliveryStats(published=len(published), received=len(seen & set(published)) if published else 0)
        stats.lost = sorted(mid for mid in published if mid not in seen)
        stats.duplicated = sum(c - 1 for c in ids.values() if c > 1)
        stats.be_redeliveries = sum(1 for m in got if m.redelivered)
        return stats

    def wait_delivered(self, timeout: float) -> bool:
        """Until every journaled message for the BE was received (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.deliveries().lost:
                return True
            time.sleep(0.5)
        return False

    def messages(self) -> list[Got]:
        return self.listener.snapshot()

    def tracebacks(self) -> int:
        return sum(p.text(since_start=False).count("Traceback (most recent call last)") for p in self.procs.values())

    def close(self, keep: bool = False) -> None:
        self.stop_all()
        self.listener.stop()
        self.sender.close()
        delete_topology(self.host, self.port, self.env)
        if not keep:
            shutil.rmtree(self.root / "work", ignore_errors=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
