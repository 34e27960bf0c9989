"""The cancel hook's one thread, fed by a bounded queue.

Control messages (cancels) cost the I/O thread a lookup; the operation's ``on_cancel``
hook runs here (a flood of cancels is dropped past the bound, never turned into threads).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

from ai_service.operation import Resources

log = logging.getLogger("ai_service.consumer")

#: At most one "control queue full" warning per this many seconds (with the count dropped).
CONTROL_DROP_WARNING_INTERVAL = 10.0


class ControlExecutor:
    """Runs the operation's control hook (``on_cancel``) on ONE thread, from a bounded queue.

    :meth:`submit` never blocks and never starts a thread: a job already waiting is not
    queued twice, and past ``maxsize`` waiting cancels the rest is dropped (counted in
    ``ai_control_messages_total{result="dropped"}``, warned about at most every
    :data:`CONTROL_DROP_WARNING_INTERVAL` seconds).  Every worker on the fanout gets each
    cancel, and the job's own worker acts on it before this queue (see
    :meth:`Consumer._on_control`).
    """

    def __init__(
        self, hook: Callable[[str, Resources], None], resources: Resources, *, maxsize: int, name: str = "control",
        on_room: Callable[[], None] | None = None,
    ) -> None:
        self.hook = hook
        #: Called after each hook run: there is room again (the cancel stream's waiting cancels).
        self.on_room = on_room
        self.resources = resources
        self.metrics = resources.metrics
        self.maxsize = max(1, maxsize)
        self._queue: queue.Queue[str | None] = queue.Queue(self.maxsize)
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._dropped = 0  # since the last warning
        self._dropped_total = 0
        self._last_warning = 0.0
        #: What ended the control thread, if anything did (the consumer then crashes too).
        self.crashed: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job_id: str, *, drop: bool = True) -> str:
        """Queue ``job_id`` for the hook: ``queued``, ``duplicate`` or ``dropped``; with
        ``drop=False`` a full queue answers ``full`` and nothing is counted (the cancel
        stream's deliveries wait in the broker instead, :mod:`ai_service.cancels`)."""
        with self._lock:
            if job_id in self._waiting:
                result = "duplicate"
            else:
                try:
                    self._queue.put_nowait(job_id)
                except queue.Full:
                    if not drop:
                        return "full"
                    result = "dropped"
                else:
                    self._waiting.add(job_id)
                    result = "queued"
        self.metrics.control_messages.labels(result).inc()
        if result == "dropped":
            self._warn_dropped(job_id)
        return result

    def _warn_dropped(self, job_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._dropped += 1
            self._dropped_total += 1
            if now - self._last_warning < CONTROL_DROP_WARNING_INTERVAL and self._last_warning:
                return
            dropped, total, self._dropped, self._last_warning = self._dropped, self._dropped_total, 0, now
        log.warning(
            "[RMQ] ⚠️ Control queue full (%d cancels waiting for the cancel hook, CONTROL_QUEUE_SIZE): "
            "dropping cancels for jobs not running here (%d since the last warning, %d in all; the last for "
            "job %s); at most one such warning every %.0f s",
            self.maxsize, dropped, total, job_id, CONTROL_DROP_WARNING_INTERVAL,
        )

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop after the hook call in progress; cancels still waiting are abandoned."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # full: the thread sees _stopping after its next cancel
            self._queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        left = self._queue.qsize()
        if left:
            log.info("[RMQ] %d cancel(s) for jobs not running here left unrecorded at stop", left)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # e.g. a hook calling sys.exit()
            self.crashed = exc
            log.critical("[RMQ] ❌ Control thread crashed: %r", exc, exc_info=exc)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None:
                continue
            with self._lock:
                self._waiting.discard(job_id)
            if self._stopping.is_set():
                return
            try:
                self.hook(job_id, self.resources)
            except Exception:  # a hook must not kill the worker
                log.exception("[RMQ] Cancel hook failed for job %s", job_id)
            if self.on_room is not None:
                self.on_room()
