"""The spool's on-disk format: append-only segment files of checksummed records.

A record is ``<length u32><crc32 u32><kind u8><seq u64><payload>``; ``ADD`` carries a
message (its header JSON, a newline, its body), ``DONE`` says the message of that seq
left the spool.  Replaying the segments in order gives what is still unconfirmed: a
later ``ADD`` of a seq replaces an earlier one (a refused message's replacement).  A torn
tail (a kill during a write, a power cut before the fsync) fails its checksum and is cut
off.  A segment is zeroed ahead of its writes (the spool lays a runway of zeros, then
writes records over it), so that most syncs flush data only, not a new file size
through the journal; zeros after the last record are a clean end.  Every file
operation goes through a :class:`FileLayer` so that a test can count fsyncs without
patching the OS.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

log = logging.getLogger("ai_service.spool")

ADD = 1
DONE = 2
_HEAD = struct.Struct("<IIBQ")  # payload length, crc32 of kind+seq+payload, kind, seq
HEAD_SIZE = _HEAD.size
SEGMENT_SUFFIX = ".log"


class FileLayer(Protocol):
    """The few file operations the spool uses (a test passes a counting one)."""

    def open_log(self, path: Path) -> BinaryIO: ...

    def zero(self, handle: BinaryIO, offset: int, size: int) -> None: ...

    def sync(self, handle: BinaryIO) -> None: ...

    def sync_dir(self, directory: Path) -> None: ...

    def read(self, path: Path) -> bytes: ...

    def truncate(self, path: Path, size: int) -> None: ...

    def remove(self, path: Path) -> None: ...


class OsFiles:
    """The real file system: ``fdatasync`` for data, an fsync of the directory for new names."""

    def open_log(self, path: Path) -> BinaryIO:
        """A new segment, written from its start (``zero`` lays the ground ahead of the writes)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        return os.fdopen(fd, "r+b", buffering=0)

    def zero(self, handle: BinaryIO, offset: int, size: int) -> None:
        """Write ``size`` zero bytes at ``offset`` (not moving the handle's position)."""
        chunk = b"\0" * min(size, 1 << 20)
        end = offset + size
        while offset < end:
            offset += os.pwrite(handle.fileno(), chunk[: end - offset], offset)

    def sync(self, handle: BinaryIO) -> None:
        os.fdatasync(handle.fileno())

    def sync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, path: Path) -> bytes:
        return path.read_bytes()

    def truncate(self, path: Path, size: int) -> None:
        os.truncate(path, size)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)


def encode(kind: int, seq: int, payload: bytes = b"") -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<BQ", kind, seq)))
    return _HEAD.pack(len(payload), crc, kind, seq) + payload


@dataclass
class Record:
    kind: int
    seq: int
    payload: bytes


def decode(data: bytes) -> tuple[list[Record], int]:
    """The records of one segment and the offset where the good ones end."""
    records: list[Record] = []
    offset = 0
    while offset + _HEAD.size <= len(data):
        length, crc, kind, seq = _HEAD.unpack_from(data, offset)
        end = offset + _HEAD.size + length
        if end > len(data) or kind not in (ADD, DONE):
            break
        payload = data[offset + _HEAD.size:end]
        if zlib.crc32(payload, zlib.crc32(struct.pack("<BQ", kind, seq))) != crc:
            break
        records.append(Record(kind, seq, payload))
        offset = end
    return records, offset


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:012d}{SEGMENT_SUFFIX}"


def segment_number(path: Path) -> int | None:
    stem = path.name[: -len(SEGMENT_SUFFIX)]
    return int(stem) if stem.isdigit() else None


def replay(directory: Path, files: FileLayer, *, repair: bool = True
           ) -> tuple[dict[int, tuple[Record, int]], list[int], int]:
    """Read every segment in order: the live ADD records by seq (with their segment), the
    segment numbers found, and the highest seq ever written (0 for none).  ``repair``
    cuts a segment's bad tail off (only the spool's owner may)."""
    live: dict[int, tuple[Record, int]] = {}
    found = sorted((n, p) for p in directory.glob(f"*{SEGMENT_SUFFIX}") if (n := segment_number(p)) is not None)
    top = 0
    for i, (number, path) in enumerate(found):
        try:
            data = files.read(path)
        except FileNotFoundError:  # a reader without the lock races the owner's clean-up
            continue
        records, good = decode(data)
        if good < len(data) and data.count(0, good) == len(data) - good:
            good = len(data)  # the zeroed ground laid ahead of the writes: a clean end
        if good < len(data) and repair:
            last = i == len(found) - 1
            log.error("[RMQ] Spool segment %s: %d byte(s) after offset %d do not form a whole record (%s); "
                      "dropping them", path.name, len(data) - good, good,
                      "a write cut short by a kill or power loss" if last else "corrupt")
            files.truncate(path, good)
        for record in records:
            top = max(top, record.seq)
            if record.kind == ADD:
                live[record.seq] = (record, number)
            else:
                live.pop(record.seq, None)
    return live, [n for n, _ in found], top
