"""Work the training thread hands off, run in order on a thread of its own."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ai_service import tracing


class InOrder:
    """Calls run one at a time, in the order submitted, off the calling thread.

    The training thread announces each epoch through it (the job record renewed in
    storage, then the ``epoch_update`` published: ~20-40 ms an epoch of storage and
    spool writes that the next epoch need not wait for).  Order is kept, so the record
    is always renewed before the BE hears of the epoch, and epoch N's update goes out
    before epoch N+1's.  The first failure is re-raised in the submitting thread by
    every later :meth:`check`, :meth:`submit` and :meth:`drain`; calls submitted after
    it do not run.  Each call runs in the trace context it was submitted in.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[Future[None]] = deque()
        self._failed = threading.Event()
        self._error: BaseException | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` after everything submitted before it."""
        self.check()
        self._pending.append(self._pool.submit(self._call, tracing.current(), fn, args))

    def _call(self, trace: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._failed.is_set():
            return  # an earlier call failed: what follows it must not run on its own
        try:
            with tracing.within(trace):
                fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the submitting thread
            self._error = exc
            self._failed.set()

    def check(self) -> None:
        """Raise the failure of a call that has run, if one failed."""
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        if self._failed.is_set() and self._error is not None:
            raise self._error  # every time: nothing after a failed call counts as done

    def drain(self) -> None:
        """Wait for every call submitted; raise the first failure."""
        while self._pending:
            self._pending[0].result()
            self._pending.popleft()
        self.check()

    def settle(self) -> None:
        """Wait for every call submitted, ignoring failures (the job ends another way)."""
        with contextlib.suppress(BaseException):
            self.drain()

    def close(self) -> None:
        """Wait for what is submitted, then end the thread."""
        self._pool.shutdown(wait=True)
