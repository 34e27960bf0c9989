"""Group commit for the spool: every thread waiting for its record to be on disk shares
one sync per batch.

The first thread to wait while no sync runs leads: it writes and syncs everything queued
for all.  The others park, each on a lock of its own, in the batch their record is in:
a sync wakes only the threads it covers (one shared condition woke every waiting thread
to find most of them must wait on), and they leave without queueing for a shared lock
again (as an ``Event`` per batch would have them do).  When a sync ends with threads
parked for the next batch, the first of them is woken to lead it: it had to wake for its
own record anyway, and no thread waits for a syncer thread to be scheduled.
"""

from __future__ import annotations

import logging
import threading
from _thread import LockType, allocate_lock
from collections.abc import Callable

log = logging.getLogger("ai_service.spool")


class _Parked:
    """A thread waiting on its own held lock; ``lead`` when it is woken to lead the next sync."""

    __slots__ = ("lead", "lock")

    def __init__(self) -> None:
        self.lock: LockType = allocate_lock()
        self.lock.acquire()
        self.lead = False


class _Batch:
    """The threads parked for the same sync, and its error when it failed."""

    __slots__ = ("error", "parked")

    def __init__(self) -> None:
        self.parked: list[_Parked] = []
        self.error: OSError | None = None


class GroupCommit:
    """Tickets (increasing integers, one per record queued) waited on until synced.

    ``store`` writes everything queued and syncs it; inside, holding ``cond``'s lock, it
    calls :meth:`cut` with the highest ticket it took, at the moment it takes the queue.
    ``cond`` is the lock under which tickets are issued, so a ticket is either in the
    batch being synced or in the next one.
    """

    def __init__(self, cond: threading.Condition, store: Callable[[], None]) -> None:
        self._cond = cond
        self._store = store
        self._synced = 0  # every ticket up to here is on disk
        self._leading = False  # a sync runs, or a parked thread was woken to run the next
        self._open = _Batch()  # gathering for the next sync
        self._syncing: _Batch | None = None
        self._cut_at = 0  # the highest ticket taken by the sync running
        self._lost: tuple[int, int, OSError | None] = (0, 0, None)  # tickets of the last failed sync

    def wait(self, ticket: int) -> None:
        """Block until ``ticket`` (and every one before it) is synced; the sync's OSError if it failed."""
        with self._cond:
            if self._synced >= ticket:
                return
            low, high, error = self._lost
            if error is not None and low < ticket <= high:
                raise error  # its sync failed before this thread came to wait for it
            parked: _Parked | None = None
            if self._leading:
                parked = _Parked()
                in_syncing = self._syncing is not None and ticket <= self._cut_at
                batch = self._syncing if in_syncing and self._syncing is not None else self._open
                batch.parked.append(parked)
            else:
                self._leading = True
        if parked is not None:
            parked.lock.acquire()  # released when its batch is synced, or to lead the next sync
            if not parked.lead:
                if batch.error is not None:
                    raise batch.error
                return
        self._lead(ticket)

    def cut(self, upto: int) -> None:
        """The queue was taken up to ticket ``upto`` (caller holds the lock): that is the batch syncing."""
        self._syncing, self._open = self._open, _Batch()
        self._cut_at = max(self._cut_at, upto)

    def _lead(self, ticket: int) -> None:
        """Sync one batch (``ticket``'s), wake its threads, and the first of the next to lead that."""
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
            else:
                self._lost = (self._synced, max(self._cut_at, ticket), error)
            following = self._open.parked.pop(0) if self._open.parked else None
            if following is None:
                self._leading = False
            else:
                following.lead = True
        if batch is not None:
            batch.error = error
            for parked in batch.parked:
                parked.lock.release()
        if following is not None:
            following.lock.release()
        if error is not None:
            raise error
