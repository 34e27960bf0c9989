"""What a caller of the publisher holds: a :class:`Receipt` per message, and the
:class:`Backoff` the reconnect loops (publisher and consumer) wait with."""

from __future__ import annotations

import random
from _thread import allocate_lock

from ai_service import tracing


class Backoff:
    """Capped exponential backoff with full jitter (AWS style)."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class Receipt:
    """Lets a caller wait until its message was settled: confirmed by the broker, or given up.

    Given up means ``unroutable`` (no queue was bound for it) or ``refused_reason`` set
    (larger than ``MAX_MESSAGE_BYTES``, or refused by the broker for good).  A refused
    message with ``replaced`` set had a replacement (``replacement_id``) published in its
    place; the receipt settles when that replacement is settled.
    """

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        # held until settled: cheaper than an Event (one per message, on the hot path)
        self._settled = allocate_lock()
        self._settled.acquire()
        self._done = False
        self.unroutable = False
        self.refused_reason: str | None = None
        self.replaced = False
        self.replacement_id: str | None = None
        #: The message's publish span (inside a trace), ended when the receipt settles.
        self.span: tracing.Span = tracing.NO_SPAN

    def wait(self, timeout: float | None = None) -> bool:
        if self._done:
            return True
        if not self._settled.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return self._done
        self._settled.release()  # the next waiter passes too
        return True

    @property
    def confirmed(self) -> bool:
        return self._done

    def _set(self) -> None:
        if self._done:
            return
        self._done = True
        self._settled.release()
        span, self.span = self.span, tracing.NO_SPAN
        tracing.published(span, unroutable=self.unroutable, refused_reason=self.refused_reason, replaced=self.replaced)
