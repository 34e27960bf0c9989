"""The publisher's on-disk spool: every message stays here until the broker confirms it.

An append-only log of checksummed records in segment files (:mod:`ai_service.publishing.segments`),
written and fsynced once per *batch*: :meth:`Spool.add` returns once its message is on
disk (kill -9 and power loss alike), and every thread adding at the same time shares
one ``fdatasync`` (group commit: the first to arrive writes and syncs everyone's
records).  What left the spool is recorded by small ``DONE`` records, written without a
sync (losing one only re-sends a confirmed message with the same ``message_id``).  A
segment is deleted once every message in it left, oldest first.

The directory is locked for the life of the process: two processes must not share a
spool (they would both re-send it).  The spool is bounded by message count
(``SPOOL_MAX_MESSAGES``) and by bytes (``SPOOL_MAX_BYTES``, the live records' size).
Messages an older version left as one ``*.msg`` file each are taken into the log on
open, in order.

Messages the broker refuses for good leave the spool and are kept, for an operator to
look at, in a small :class:`~ai_service.publishing.refused.RefusedLog` (``refused.jsonl``
in the spool directory, bounded in bytes; importable from here too).
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pika

from ai_service.errors import SpoolLocked
from ai_service.publishing import segments
from ai_service.publishing.commit import GroupCommit
from ai_service.publishing.refused import RefusedLog as RefusedLog

log = logging.getLogger("ai_service.spool")

#: Zeros laid ahead of a segment's writes at a time: a sync that extends the file (its
#: size through the journal, slower) once per this many bytes, the others flush data only.
RUNWAY_BYTES = 1024 * 1024

#: ``json.dumps(..., separators=(",", ":"))`` without building an encoder per call (once per message).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode

#: A record waiting to be written: (kind, seq, the encoded record).
Queued = tuple[int, int, bytes]
#: An ADD record's payload (named: inside Spool, ``bytes`` is its property).
Payload = bytes


@dataclass
class Envelope:
    """A message ready to publish, with everything needed to re-send it identically."""

    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    mandatory: bool = True
    seq: int = 0
    #: Set when the broker confirmed it (or it was given up as unroutable).
    done: bool = field(default=False, compare=False)
    #: This message stands in for one that was refused: it is never replaced in turn.
    replacement: bool = False
    #: The unit whose order is kept (the outbox gives ``<op>/<job_id>``); None: the ``correlation_id``.
    order: str | None = None
    _basic: pika.BasicProperties | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def job(self) -> str | None:
        """The job it belongs to, the unit whose order is kept: its ``order`` key, else its
        ``correlation_id`` (a BE may give many jobs one correlation_id: the key keeps them apart)."""
        job = self.order if self.order is not None else self.properties.get("correlation_id")
        return str(job) if job is not None else None

    def basic_properties(self) -> pika.BasicProperties:
        """Its AMQP properties, built once (a re-send sends the same ones)."""
        if self._basic is None:
            self._basic = pika.BasicProperties(**self.properties)
        return self._basic

    def header(self) -> dict[str, Any]:
        head: dict[str, Any] = {
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "properties": self.properties,
            "mandatory": self.mandatory,
        }
        if self.replacement:
            head["replacement"] = True
        if self.order is not None:
            head["order"] = self.order
        return head

    @property
    def message_id(self) -> str:
        return str(self.properties.get("message_id") or "")


class Spool:
    """Durable FIFO of unconfirmed messages, bounded by count and by bytes.

    ``max_bytes`` (``SPOOL_MAX_BYTES``) bounds the live records' total size; ``None``
    leaves only the count bound.  The spool is :attr:`full` once either bound is
    reached, so one message larger than the rest of the room still gets in.

    :meth:`reserve` gives a message its seq and queues its record (cheap, under the
    caller's own lock if it likes); :meth:`commit` blocks until that record is synced.
    :meth:`add` is both.  ``swap`` and ``remove`` only queue; :meth:`flush` writes what
    is queued without a sync, :meth:`close` writes and syncs it.
    """

    LEGACY_SUFFIX = ".msg"
    SUFFIX = segments.SEGMENT_SUFFIX

    def __init__(self, directory: Path, max_messages: int, max_bytes: int | None = None, *,
                 files: segments.FileLayer | None = None, segment_bytes: int = 16 * 1024 * 1024) -> None:
        self.directory = directory
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.files: segments.FileLayer = files or segments.OsFiles()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file: BinaryIO | None = None
        self._bytes = 0
        self._sizes: dict[int, int] = {}
        self._next_seq = 1
        self._cond = threading.Condition(threading.Lock())  # state below; the group commit's too
        self._queue: list[Queued] = []  # (kind, seq, record) not yet written
        self._tickets = 0  # ADD records queued so far
        self._group = GroupCommit(self._cond, self._store)
        self._io = threading.Lock()  # the segment file: writes in queue order
        self._handle: BinaryIO | None = None
        self._segment = 0
        self._segment_size = 0  # where the next record goes
        self._zeroed = 0  # the segment's zeros laid ahead of the records end here
        self._segment_of: dict[int, int] = {}  # seq -> the segment holding its live ADD
        self._live: dict[int, int] = {}  # segment -> live ADD records in it

    # --- open / close --------------------------------------------------------------------

    def open(self) -> list[Envelope]:
        """Lock the directory and return the messages a previous process left, in order."""
        lock = open(self.directory / ".lock", "wb")  # noqa: SIM115 - held (flock) while the spool is open
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise SpoolLocked(f"spool {self.directory} is in use by another process (same WORKER_NAME?)") from None
        self._lock_file = lock
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        live, numbers, top = segments.replay(self.directory, self.files)
        left: list[Envelope] = []
        for seq in sorted(live):
            record, number = live[seq]
            try:
                envelope = _parse(record.payload, seq)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("[RMQ] Dropping unreadable spooled message %d in %s: %s", seq, number, exc)
                continue
            left.append(envelope)
            self._sizes[seq] = segments.HEAD_SIZE + len(record.payload)
            self._segment_of[seq] = number
            self._live[number] = self._live.get(number, 0) + 1
        self._segment = (numbers[-1] if numbers else 0) + 1
        self._next_seq = top + 1
        self._bytes = sum(self._sizes.values())
        for number in numbers:
            self._live.setdefault(number, 0)
        paths, legacy = self._adopt_legacy()
        self.commit(self._tickets)
        for path in paths:
            path.unlink(missing_ok=True)
        self._drop_empty_segments()
        return left + legacy

    def _adopt_legacy(self) -> tuple[list[Path], list[Envelope]]:
        """Queue the ``*.msg`` files of an older version, in order: their paths, their messages."""
        adopted: list[Envelope] = []
        paths = sorted(self.directory.glob(f"*{self.LEGACY_SUFFIX}"))
        for path in paths:
            try:
                envelope = _parse(path.read_bytes(), int(path.name[: -len(self.LEGACY_SUFFIX)]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("[RMQ] Dropping unreadable spooled message %s: %s", path.name, exc)
                continue
            self.reserve(envelope)
            adopted.append(envelope)
        return paths, adopted

    def close(self) -> None:
        """Write and sync what is queued, close the segment (its unused zeros cut off), release the lock."""
        if self._lock_file is None:
            return
        with self._io:
            self._write_queued()
            if self._handle is not None:
                self._handle.truncate(self._segment_size)
                self.files.sync(self._handle)
                self._handle.close()
                self._handle = None
        with self._cond:
            if not self._live.get(self._segment):
                self._segment += 1  # the last segment is done with: let it go too
        self._drop_empty_segments()
        self._lock_file.close()
        self._lock_file = None

    @classmethod
    def peek(cls, directory: Path) -> list[Envelope]:
        """What is on disk in ``directory`` now, in order, read without the lock and
        changing nothing (for an operator, or a test, looking at another process's spool)."""
        live, _, _ = segments.replay(directory, segments.OsFiles(), repair=False)
        return [_parse(live[seq][0].payload, seq) for seq in sorted(live)]

    # --- bounds --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def bytes(self) -> int:
        """Total size of the live records."""
        return self._bytes

    @property
    def full(self) -> bool:
        if len(self._sizes) >= self.max_messages:
            return True
        return self.max_bytes is not None and self._bytes >= self.max_bytes

    # --- changes -------------------------------------------------------------------------

    def add(self, envelope: Envelope) -> None:
        """Persist ``envelope`` (returns once it is synced) and give it the next seq."""
        self.commit(self.reserve(envelope))

    def reserve(self, envelope: Envelope, payload: Payload | None = None) -> int:
        """Give ``envelope`` the next seq and queue its record; returns the ticket to :meth:`commit`.

        ``payload`` is :func:`payload` of it, when the caller made it outside its own lock."""
        payload = payload if payload is not None else _payload(envelope)
        with self._cond:
            envelope.seq = self._next_seq
            self._next_seq += 1
            self._queue_add(envelope, payload)
            self._tickets += 1
            return self._tickets

    def commit(self, ticket: int) -> None:
        """Block until the ADD record of ``ticket`` (and every one before it) is synced.

        Every record queued while a sync runs goes into the next one, synced by one of
        the threads waiting for it (:class:`~ai_service.publishing.commit.GroupCommit`)."""
        self._group.wait(ticket)

    def _store(self) -> None:
        """One group commit: take the queue, write it, sync it (on the leading thread)."""
        with self._io:
            with self._cond:
                batch, upto = self._take()
                self._group.cut(upto)
            self._write(batch)
            if self._handle is not None:
                self.files.sync(self._handle)

    def swap(self, old: Envelope, new: Envelope) -> None:
        """Queue ``new`` in ``old``'s place (same seq): one record, never both, never neither."""
        new.seq = old.seq
        with self._cond:
            self._queue_add(new, _payload(new))

    def remove(self, envelope: Envelope) -> None:
        """Queue the ``DONE`` record of ``envelope`` (removing twice is harmless)."""
        self.remove_many([envelope])

    def remove_many(self, envelopes: list[Envelope]) -> None:
        """Queue the ``DONE`` records of ``envelopes`` (removing twice is harmless)."""
        with self._cond:
            for envelope in envelopes:
                size = self._sizes.pop(envelope.seq, None)
                if size is not None:
                    self._bytes -= size
                    self._queue.append((segments.DONE, envelope.seq, segments.encode(segments.DONE, envelope.seq)))

    def flush(self, *, wait: bool = True) -> bool:
        """Write what is queued, without a sync; ``wait=False`` skips it while another
        thread holds the file (it writes the queue anyway).  False when skipped."""
        if not self._io.acquire(blocking=wait):
            return False
        try:
            self._write_queued()
        finally:
            self._io.release()
        self._drop_empty_segments()
        return True

    @property
    def queued(self) -> int:
        """Records queued and not yet written."""
        return len(self._queue)

    # --- the log -------------------------------------------------------------------------

    def _queue_add(self, envelope: Envelope, payload: Payload) -> None:
        record = segments.encode(segments.ADD, envelope.seq, payload)
        self._bytes += len(record) - self._sizes.get(envelope.seq, 0)
        self._sizes[envelope.seq] = len(record)
        self._queue.append((segments.ADD, envelope.seq, record))

    def _take(self) -> tuple[list[Queued], int]:
        """The queue and the ADD tickets it covers (the caller holds ``_cond``)."""
        batch, self._queue = self._queue, []
        return batch, self._tickets

    def _write_queued(self) -> None:
        """Write the queue without a sync (holding ``_io``)."""
        with self._cond:
            batch, _ = self._take()
        self._write(batch)

    def _write(self, batch: list[Queued]) -> None:
        """Write ``batch`` in one call (holding ``_io``), over zeros laid ahead of it."""
        if not batch:
            return
        data = b"".join(r for _, _, r in batch)
        handle = self._current(len(data))
        end = self._segment_size + len(data)
        if end > self._zeroed:
            size = max(end, self._zeroed + min(RUNWAY_BYTES, self.segment_bytes)) - self._zeroed
            self.files.zero(handle, self._zeroed, size)
            self._zeroed += size
        handle.write(data)
        self._segment_size = end
        with self._cond:
            for kind, seq, _ in batch:
                before = self._segment_of.pop(seq, None)
                if before is not None:
                    self._live[before] -= 1
                if kind == segments.ADD:
                    self._segment_of[seq] = self._segment
                    self._live[self._segment] = self._live.get(self._segment, 0) + 1

    def _current(self, incoming: int) -> BinaryIO:
        """The segment to append to; past ``segment_bytes`` a new one (the old synced first)."""
        if self._handle is not None and self._segment_size + incoming > self.segment_bytes and self._segment_size:
            self._handle.truncate(self._segment_size)
            self.files.sync(self._handle)
            self._handle.close()
            self._handle = None
            self._segment += 1
        if self._handle is None:
            path = segments.segment_path(self.directory, self._segment)
            self._handle = self.files.open_log(path)
            self._segment_size = self._zeroed = 0
            self._live.setdefault(self._segment, 0)
            self.files.sync_dir(self.directory)
        return self._handle

    def _drop_empty_segments(self) -> None:
        """Delete the oldest segments whose every message left (never the one being written)."""
        with self._cond:
            doomed = []
            for number in sorted(self._live):
                if number == self._segment or self._live[number] > 0:
                    break
                doomed.append(number)
            for number in doomed:
                del self._live[number]
        for number in doomed:
            self.files.remove(segments.segment_path(self.directory, number))


def _payload(envelope: Envelope) -> bytes:
    """What an ADD record holds: ``<header JSON>\\n<body>``."""
    return _compact_json(envelope.header()).encode() + b"\n" + envelope.body


#: For a caller that makes the payload outside its own lock (see :meth:`Spool.reserve`).
payload = _payload


def _parse(raw: bytes, seq: int) -> Envelope:
    """An envelope from ``<header JSON>\\n<body>`` (a record's payload, or an old ``*.msg`` file)."""
    head, _, body = raw.partition(b"\n")
    meta = json.loads(head)
    return Envelope(
        exchange=meta["exchange"],
        routing_key=meta["routing_key"],
        body=body,
        properties=meta["properties"],
        mandatory=bool(meta.get("mandatory", True)),
        seq=seq,
        replacement=bool(meta.get("replacement", False)),
        order=meta.get("order"),
    )
