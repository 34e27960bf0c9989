"""Group commit for the spool: every thread waiting for its record to be on disk shares
one sync per batch, run by a syncer thread of its own.

A waiter wakes only when *its* batch is synced (each batch has its own event): with
many threads publishing at once, a sync no longer wakes every one of them to find out
that most must wait on.  While one batch syncs, the next gathers; the syncer cuts it the
moment the sync returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("ai_service.spool")


class _Batch:
    """The tickets cut together: set once they are synced, or once their sync failed."""

    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: OSError | None = None


class GroupCommit:
    """Tickets (increasing integers, one per record queued) waited on until synced.

    ``store`` (called on the syncer thread, no lock held) writes everything queued and
    syncs it; inside, holding ``cond``'s lock, it calls :meth:`cut` with the highest
    ticket it took, at the moment it takes the queue.  ``cond`` is the lock under which
    tickets are issued, so a ticket is either in the cut batch or in the next one.
    """

    def __init__(self, cond: threading.Condition, store: Callable[[], None]) -> None:
        self._cond = cond
        self._store = store
        self._synced = 0  # every ticket up to here is on disk
        self._wanted = 0  # the highest ticket anyone waits for
        self._open = _Batch()  # gathering
        self._syncing: _Batch | None = None
        self._cut_at = 0  # the highest ticket of the batch syncing
        self._thread: threading.Thread | None = None
        self._idle = False
        self._stopped = False

    def wait(self, ticket: int) -> None:
        """Block until ``ticket`` (and every one before it) is synced; the sync's OSError if it failed."""
        with self._cond:
            if self._synced >= ticket:
                return
            syncing = self._syncing is not None and ticket <= self._cut_at
            batch = self._syncing if syncing and self._syncing is not None else self._open
            self._wanted = max(self._wanted, ticket)
            stopped = self._stopped
            if stopped:
                pass  # closing: no syncer any more, this thread syncs
            elif self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spool-sync", daemon=True)
                self._thread.start()
            elif self._idle:
                self._cond.notify()
        if stopped:
            self._sync_once()
        batch.event.wait()
        if batch.error is not None:
            raise batch.error

    def cut(self, upto: int) -> None:
        """The queue was taken up to ticket ``upto`` (caller holds the lock): that is the batch syncing."""
        if self._syncing is None:
            self._syncing, self._open = self._open, _Batch()
        self._cut_at = max(self._cut_at, upto)

    def stop(self) -> None:
        """Let the syncer finish what is wanted and end; later waits sync on the caller's thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(30)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._wanted <= self._synced and not self._stopped:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                if self._wanted <= self._synced:
                    self._thread = None
                    return
            self._sync_once()

    def _sync_once(self) -> None:
        """One batch: cut, written and synced by ``store``; its waiters woken."""
        error: OSError | None = None
        try:
            self._store()
        except OSError as exc:
            log.error("[RMQ] ❌ Could not write the publisher spool: %s", exc)
            error = exc
        with self._cond:
            batch, self._syncing = self._syncing, None
            if error is None:
                self._synced = max(self._synced, self._cut_at)
            elif batch is None:  # it failed before it took the queue: those gathering get the error
                batch, self._open = self._open, _Batch()
                self._wanted = self._synced
            elif self._wanted <= self._cut_at:  # nobody waits beyond the failed batch: no retry loop
                self._wanted = self._synced
        if batch is not None:
            batch.error = error
            batch.event.set()
