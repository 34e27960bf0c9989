"""Which requests this process is running or answered, and how often one was delivered.

When the connection drops while a request is handled, or after it was answered but
before the broker got its ack (an ack is never confirmed), the broker delivers it again
(``redelivered``), possibly while the first run is still going.  Jobs with a job record
(training, conversion) recognise that themselves; for the rest (inference) the
:class:`RequestTracker` makes the redelivery wait for the first run and, if that one
answered, be acked without a second answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ai_service.messages import readable_job_id

#: The deliveries the consumer counted, on the copy of a request it republishes for a
#: retry (classic queues count nothing; a delayed copy is a new message to any queue).
DELIVERY_COUNT_HEADER = "x-ai-delivery-count"


@dataclass
class Seen:
    """One request's run in this process: done yet, and answered?"""

    done: threading.Event = field(default_factory=threading.Event)
    answered: bool = False


class RequestTracker:
    """Requests in progress in this process, and the ones it answered.

    Keyed by a digest of the body; the newest ``capacity`` answered requests are kept; a
    restart of the process forgets them.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[bytes, Seen] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(body: bytes) -> bytes:
        return hashlib.sha256(body).digest()

    def begin(self, digest: bytes) -> Seen:
        with self._lock:
            entry = self._seen[digest] = Seen()
            self._seen.move_to_end(digest)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
            return entry

    def finish(self, digest: bytes) -> None:
        """The request was settled: keep it if it was answered (its ack may still be lost)."""
        with self._lock:
            entry = self._seen.get(digest)
            if entry is not None and not entry.answered:
                del self._seen[digest]

    def get(self, digest: bytes) -> Seen | None:
        with self._lock:
            return self._seen.get(digest)

    def answered_before(self, digest: bytes, timeout: float) -> bool:
        """For a redelivery: wait for a first run still going, then True if it answered."""
        entry = self.get(digest)
        return entry is not None and entry.done.wait(timeout) and entry.answered


def count_deliveries(headers: dict[str, Any], redelivered: bool, *, counted_by_us: bool) -> int:
    """How many times this request was delivered before (0 on its first delivery).

    Quorum queues say it (``x-delivery-count``).  With ``counted_by_us`` (classic queues,
    or a copy that came back through our holding queue) our own
    :data:`DELIVERY_COUNT_HEADER` says how many deliveries came before the copy.  A
    redelivery (the broker gave it back after a lost connection or a crash) counts one
    more, and at least 1.
    """

    def number(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    count = number(headers.get("x-delivery-count"))
    if counted_by_us:
        count = number(headers.get(DELIVERY_COUNT_HEADER)) + max(count, 1 if redelivered else 0)
    if redelivered:
        count = max(count, 1)
    return count


def came_back_from(headers: dict[str, Any], holding_queue: str) -> bool:
    """True when the broker dead-lettered this message out of ``holding_queue`` (its TTL
    expired there): a delayed retry copy or a lease message, whose count header is ours."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return False
    return any(isinstance(d, dict) and d.get("queue") == holding_queue and d.get("reason") == "expired"
               for d in deaths)


def readable_job_id_from(body: bytes) -> str | None:
    try:
        return readable_job_id(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        return None
