"""How a worker learns it must stop: supervisord's death (:class:`ParentWatch`) and
SIGTERM/SIGINT (:class:`StopSignals`, warm then forced).  Kept apart from the run loop
in :mod:`ai_service.worker` because they are process plumbing (prctl, /proc, signals)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from ai_service.consumer import Consumer

log = logging.getLogger("ai_service.worker")

#: How often the parent watch looks at os.getppid().
PARENT_POLL_SECONDS = 1.0
PR_SET_PDEATHSIG = 1


def under_supervisor() -> bool:
    """supervisord sets SUPERVISOR_ENABLED=1 in its children's environment."""
    return bool(os.environ.get("SUPERVISOR_ENABLED"))


def set_parent_death_signal(sig: int) -> bool:
    """Linux ``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` when the parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), ctypes.c_ulong(0),
                            ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError) as exc:
        log.warning("[RMQ] prctl(PR_SET_PDEATHSIG) unavailable (%s); the parent watch alone notices "
                    "supervisord's death", exc)
        return False
    if result != 0:
        code = ctypes.get_errno()
        log.warning("[RMQ] prctl(PR_SET_PDEATHSIG) failed (%s); the parent watch alone notices supervisord's death",
                    errno.errorcode.get(code, code))
        return False
    return True


def _is_supervisord(pid: int) -> bool:
    try:
        return b"supervisord" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell: assume it is


class ParentWatch:
    """Notices that the parent process (supervisord) died, so that the worker stops warmly.

    Two ways, because neither is enough alone: ``PR_SET_PDEATHSIG`` (SIGTERM when the
    parent *thread* exits; lost across some exec paths), and a thread that compares
    ``os.getppid()`` every second with the parent read at start.  The parent read at start
    is checked again right after ``prctl`` (it may have died in between), and a parent
    that is already pid 1 but not supervisord means it died before the worker looked.
    """

    def __init__(self, parent: int, orphan_log: Path | None = None) -> None:
        self.parent = parent
        self.orphan_log = orphan_log
        self.pdeathsig = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    @classmethod
    def arm(cls, orphan_log: Path | None = None) -> "ParentWatch":
        watch = cls(os.getppid(), orphan_log)
        watch.pdeathsig = set_parent_death_signal(signal.SIGTERM)
        return watch

    def gone(self) -> str | None:
        """Why the parent is gone, or None while it lives."""
        now = os.getppid()
        if now != self.parent:
            return f"the supervisor (parent pid {self.parent}) is gone: this worker is now a child of pid {now}"
        if now == 1 and not _is_supervisord(1):
            return "the supervisor exited before this worker started watching it (parent is now pid 1)"
        return None

    def start(self, on_death: Callable[[str], None]) -> None:
        """Call ``on_death(why)`` once, from a daemon thread, when the parent is gone (checked at once)."""

        def watch() -> None:
            while not self._done.is_set():
                why = self.gone()
                if why is not None:
                    on_death(why)
                    return
                self._done.wait(PARENT_POLL_SECONDS)

        self._thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def detach_output(self) -> Path | None:
        """Point stdout/stderr away from supervisord's pipes (nobody reads them now: a write
        would raise BrokenPipeError in whatever prints) to ``orphan_log``; returns it."""
        if self.orphan_log is None:
            return None
        pipes = [fd for fd in (1, 2) if _is_pipe(fd)]
        if not pipes:
            return None
        try:
            self.orphan_log.parent.mkdir(parents=True, exist_ok=True)
            target = os.open(self.orphan_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            target = os.open(os.devnull, os.O_WRONLY)
        for fd in pipes:
            os.dup2(target, fd)
        os.close(target)
        return self.orphan_log


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


class StopSignals:
    """Counts SIGTERM/SIGINT: the first asks for a warm stop, the second forces.

    Once the parent (``parent``, a :class:`ParentWatch`) is gone, a signal is its
    ``PR_SET_PDEATHSIG`` SIGTERM (or comes after it): a warm stop that never forces.
    """

    def __init__(self, consumer: Consumer, parent: ParentWatch | None = None) -> None:
        self.consumer = consumer
        self.count = 0
        self.forced = threading.Event()
        self.parent = parent
        self.orphaned = False
        self._orphan_lock = threading.Lock()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        why = self.parent.gone() if self.parent is not None else None
        if why is not None:
            self.parent_died(why)
            return
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            log.warning("[RMQ] %s received: warm shutdown (finishing or handing back the running job); "
                        "send it again to force", name)
            self.consumer.request_stop()
        else:
            log.warning("[RMQ] %s received again: forced shutdown", name)
            self.forced.set()
            self.consumer.request_stop(force=True)

    def parent_died(self, why: str) -> None:
        """Stop warmly because nobody supervises this worker any more (once; any thread)."""
        if not self._orphan_lock.acquire(blocking=False):
            return
        try:
            if self.orphaned:
                return
            self.orphaned = True
        finally:
            self._orphan_lock.release()
        moved = self.parent.detach_output() if self.parent is not None else None
        log.warning("[RMQ] %s: warm shutdown (finishing or handing back the running job)%s", why,
                    f"; output continues in {moved}" if moved else "")
        self.count = max(self.count, 1)
        self.consumer.request_stop()
