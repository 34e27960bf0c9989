"""The publisher's on-disk spool: durable, ordered, bounded (count and bytes), one process at a
time, group-committed (one fsync for every message added while the previous sync ran), torn
tails cut off, old-version ``*.msg`` files taken in; and the bounded file of refused messages
beside it."""

from __future__ import annotations

import base64
import errno
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from ai_service.publishing.segments import ADD, HEAD_SIZE, OsFiles, decode, encode
from ai_service.spool import Envelope, RefusedLog, Spool, SpoolLocked


def envelope(n: int, pad: int = 0) -> Envelope:
    return Envelope(
        exchange="ai.events",
        routing_key=f"train.update.job{n}",
        body=f'{{"n": {n}, "bytes": "\\n\\u00e9"}}'.encode() + b"\n\xff raw" + b"x" * pad,
        properties={"message_id": f"m{n}", "correlation_id": f"job{n}", "delivery_mode": 2},
        mandatory=n % 2 == 0,
    )


def legacy_file(directory: Path, seq: int, e: Envelope) -> Path:
    """A message as an older version spooled it: one ``<seq>.msg`` file, header line then body."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{seq:016d}{Spool.LEGACY_SUFFIX}"
    path.write_bytes(json.dumps(e.header()).encode() + b"\n" + e.body)
    return path


class CountingFiles(OsFiles):
    """The real file system, counting syncs; ``hold`` keeps the next sync waiting until set."""

    def __init__(self) -> None:
        self.syncs = 0
        self.hold: threading.Event | None = None
        self.in_sync = threading.Event()

    def sync(self, handle: BinaryIO) -> None:
        self.in_sync.set()
        if self.hold is not None:
            assert self.hold.wait(10), "the test never let the sync finish"
            self.hold = None
        super().sync(handle)
        self.syncs += 1


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(spool_dir: Path) -> Iterator[Spool]:
    s = Spool(spool_dir, max_messages=100)
    assert s.open() == []
    yield s
    s.close()


def reopen(directory: Path, max_messages: int = 100) -> tuple[Spool, list[Envelope]]:
    s = Spool(directory, max_messages)
    return s, s.open()


def test_add_and_remove_track_the_length(spool: Spool) -> None:
    first, second = envelope(1), envelope(2)

    spool.add(first)
    spool.add(second)
    assert len(spool) == 2
    assert (first.seq, second.seq) == (1, 2)

    spool.remove(first)
    assert len(spool) == 1
    spool.remove(first)  # removing twice is harmless
    assert len(spool) == 1
    spool.remove(second)
    assert len(spool) == 0


def test_leftovers_come_back_in_order_with_their_content(spool_dir: Path, spool: Spool) -> None:
    sent = [envelope(n) for n in range(1, 13)]  # past 9 and 10: numeric order, not text order
    for e in sent:
        spool.add(e)
    spool.remove(sent[3])
    spool.close()

    again, left = reopen(spool_dir)
    try:
        expected = [e for e in sent if e is not sent[3]]
        assert [e.seq for e in left] == [e.seq for e in expected]
        assert [(e.exchange, e.routing_key, e.body, e.properties, e.mandatory) for e in left] == [
            (e.exchange, e.routing_key, e.body, e.properties, e.mandatory) for e in expected
        ]
        assert len(again) == len(expected)
    finally:
        again.close()


def test_a_reopened_spool_numbers_new_messages_after_the_leftovers(spool_dir: Path, spool: Spool) -> None:
    for n in range(3):
        spool.add(envelope(n))
    spool.close()

    again, left = reopen(spool_dir)
    try:
        new = envelope(99)
        again.add(new)
        assert new.seq == left[-1].seq + 1 == 4
        again.close()

        third, left = reopen(spool_dir)
        third.close()
        assert [e.seq for e in left] == [1, 2, 3, 4]
        assert left[-1].routing_key == "train.update.job99"
    finally:
        again.close()


def test_a_second_open_on_the_same_directory_is_refused_while_the_first_holds_it(spool_dir: Path,
                                                                                   spool: Spool) -> None:
    spool.add(envelope(1))

    with pytest.raises(SpoolLocked):
        reopen(spool_dir)

    assert len(spool) == 1


def test_the_lock_is_released_on_close(spool_dir: Path, spool: Spool) -> None:
    spool.close()

    again, _ = reopen(spool_dir)
    again.close()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not json\nbody", id="garbage-header"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"exchange": "x"}\nbody', id="missing-keys"),
        pytest.param(b"[1, 2]\nbody", id="header-not-an-object"),
        pytest.param(b"\xff\xfe\x00\nbody", id="binary"),
    ],
)
def test_a_corrupt_file_is_dropped_with_an_error_log(
    spool_dir: Path, spool: Spool, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    spool.close()
    legacy_file(spool_dir, 1, envelope(1))
    legacy_file(spool_dir, 2, envelope(2))
    corrupt = spool_dir / f"{2:016d}{Spool.LEGACY_SUFFIX}"
    corrupt.write_bytes(content)

    with caplog.at_level(logging.ERROR, logger="ai_service.spool"):
        again, left = reopen(spool_dir)
    again.close()

    assert [e.routing_key for e in left] == ["train.update.job1"]
    assert not corrupt.exists()
    assert any(r.levelno == logging.ERROR and corrupt.name in r.getMessage() for r in caplog.records)


def test_a_file_with_a_non_numeric_name_is_dropped(spool_dir: Path, spool: Spool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    spool.close()
    stray = spool_dir / f"stray{Spool.LEGACY_SUFFIX}"
    stray.write_bytes(b'{"exchange": "", "routing_key": "q", "properties": {}}\nbody')

    with caplog.at_level(logging.ERROR, logger="ai_service.spool"):
        again, left = reopen(spool_dir)
    again.close()

    assert left == []
    assert not stray.exists()
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_half_written_files_are_cleaned_up_on_open(spool_dir: Path, spool: Spool) -> None:
    spool.add(envelope(1))
    spool.close()
    (spool_dir / f"{2:016d}.tmp").write_bytes(b"half")

    again, left = reopen(spool_dir)
    again.close()

    assert [e.seq for e in left] == [1]
    assert list(spool_dir.glob("*.tmp")) == []


def test_full_at_max_messages(spool_dir: Path) -> None:
    s = Spool(spool_dir, max_messages=2)
    s.open()
    try:
        first, second = envelope(1), envelope(2)
        assert not s.full
        s.add(first)
        assert not s.full
        s.add(second)
        assert s.full
        s.remove(first)
        assert not s.full
    finally:
        s.close()


def test_leftovers_count_towards_full(spool_dir: Path, spool: Spool) -> None:
    spool.add(envelope(1))
    spool.add(envelope(2))
    spool.close()

    again, _ = reopen(spool_dir, max_messages=2)
    try:
        assert again.full
    finally:
        again.close()


def spooled_bytes(directory: Path) -> int:
    """The size of the live records on disk (each message's header, JSON and body)."""
    return sum(HEAD_SIZE + len(json.dumps(e.header(), separators=(",", ":"))) + 1 + len(e.body)
               for e in Spool.peek(directory))


def test_a_spool_with_few_messages_is_full_once_their_bytes_reach_the_byte_bound(spool_dir: Path) -> None:
    s = Spool(spool_dir, max_messages=1000, max_bytes=10_000)
    s.open()
    try:
        small, big, other = envelope(1), envelope(2, pad=9_000), envelope(3, pad=2_000)
        s.add(small)
        assert not s.full
        assert s.bytes == spooled_bytes(spool_dir) > 0
        s.add(big)
        assert not s.full, "one message larger than the room left must still get in"
        s.add(other)
        assert s.full
        assert len(s) == 3
        assert s.bytes == spooled_bytes(spool_dir) >= 10_000
        s.remove(big)
        s.flush()
        assert not s.full
        assert s.bytes == spooled_bytes(spool_dir)
        s.remove(big)  # twice: the bytes are not taken off again
        s.flush()
        assert s.bytes == spooled_bytes(spool_dir)
    finally:
        s.close()


def test_leftover_bytes_count_towards_full_after_a_reopen(spool_dir: Path, spool: Spool) -> None:
    spool.add(envelope(1, pad=6_000))
    spool.add(envelope(2, pad=6_000))
    spool.close()

    again = Spool(spool_dir, max_messages=1000, max_bytes=12_000)
    left = again.open()
    try:
        assert len(left) == 2
        assert again.full
        assert again.bytes == spooled_bytes(spool_dir)
        again.remove(left[0])
        again.flush()
        assert not again.full
        assert again.bytes == spooled_bytes(spool_dir)
    finally:
        again.close()


def test_a_swapped_in_replacement_takes_the_refused_messages_place_and_bytes(spool_dir: Path, spool: Spool) -> None:
    first, refused, last = envelope(1), envelope(2, pad=50_000), envelope(3)
    for e in (first, refused, last):
        spool.add(e)
    replacement = envelope(20)
    replacement.replacement = True

    spool.swap(refused, replacement)
    spool.flush()
    assert replacement.seq == refused.seq
    assert len(spool) == 3
    assert spool.bytes == spooled_bytes(spool_dir) < 50_000
    spool.close()

    again, left = reopen(spool_dir)
    again.close()
    assert [e.routing_key for e in left] == ["train.update.job1", "train.update.job20", "train.update.job3"]
    assert [e.replacement for e in left] == [False, True, False]


def test_messages_added_while_a_sync_runs_share_the_next_single_sync(spool_dir: Path) -> None:
    files = CountingFiles()
    s = Spool(spool_dir, max_messages=100, files=files)
    s.open()
    try:
        base = files.syncs
        files.hold = threading.Event()
        first = threading.Thread(target=s.add, args=(envelope(0),))
        first.start()
        assert files.in_sync.wait(10)  # the first add is syncing (and held there)
        others = [threading.Thread(target=s.add, args=(envelope(n),)) for n in range(1, 10)]
        for t in others:
            t.start()
        while s.queued < 9:  # all nine queued behind the sync in progress
            threading.Event().wait(0.01)
        assert all(t.is_alive() for t in others), "an add returned before its record was synced"
        files.hold.set()
        for t in [first, *others]:
            t.join(10)
        assert not any(t.is_alive() for t in [first, *others])
        assert files.syncs - base == 2, "ten adds: one sync for the first, one for the nine behind it"
        on_disk = [e.message_id for e in Spool.peek(spool_dir)]
        assert on_disk[0] == "m0"
        assert sorted(on_disk[1:]) == sorted(f"m{n}" for n in range(1, 10))
    finally:
        s.close()


def test_one_thread_adding_one_by_one_syncs_each_message_before_add_returns(spool_dir: Path) -> None:
    files = CountingFiles()
    s = Spool(spool_dir, max_messages=100, files=files)
    s.open()
    try:
        base = files.syncs
        for n in range(5):
            s.add(envelope(n))
            assert files.syncs - base == n + 1
            assert [e.message_id for e in Spool.peek(spool_dir)] == [f"m{i}" for i in range(n + 1)]
        s.remove(Spool.peek(spool_dir)[0])
        assert s.flush(), "a removal is written, never synced on its own"
        assert files.syncs - base == 5, "a removal is written, never synced on its own"
    finally:
        s.close()


def test_a_torn_last_record_is_cut_off_and_the_whole_ones_before_it_come_back(
    spool_dir: Path, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    for n in range(3):
        spool.add(envelope(n))
    spool.close()
    [segment] = list(spool_dir.glob(f"*{Spool.SUFFIX}"))
    whole = segment.stat().st_size
    with open(segment, "r+b") as fh:
        fh.truncate(whole - 5)  # the third record's write was cut short

    with caplog.at_level(logging.ERROR, logger="ai_service.spool"):
        again, left = reopen(spool_dir)
    try:
        assert [e.message_id for e in left] == ["m0", "m1"]
        assert any("cut short" in r.getMessage() for r in caplog.records)
        new = envelope(9)
        again.add(new)
        assert new.seq > left[-1].seq
    finally:
        again.close()
    third, left = reopen(spool_dir)
    third.close()
    assert [e.message_id for e in left] == ["m0", "m1", "m9"]


def as_a_kill_left_it(spool_dir: Path, tmp_path: Path) -> Path:
    """A copy of an open spool's directory: its segments as they are on disk, never closed."""
    copy = tmp_path / "killed"
    copy.mkdir()
    for segment in spool_dir.glob(f"*{Spool.SUFFIX}"):
        shutil.copyfile(segment, copy / segment.name)
    return copy


def test_a_segment_a_killed_process_left_with_zeros_ahead_of_its_records_comes_back_whole_without_an_error(
    spool_dir: Path, spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for n in range(3):
        spool.add(envelope(n))
    killed = as_a_kill_left_it(spool_dir, tmp_path)
    [segment] = list(killed.glob(f"*{Spool.SUFFIX}"))
    records, good = decode(segment.read_bytes())
    assert len(records) == 3
    assert segment.stat().st_size > good, "no zeros were laid ahead of the records"

    with caplog.at_level(logging.ERROR, logger="ai_service.spool"):
        again, left = reopen(killed)
    try:
        assert [e.message_id for e in left] == ["m0", "m1", "m2"]
        assert [r.getMessage() for r in caplog.records] == []
        again.add(envelope(9))
    finally:
        again.close()
    third, left = reopen(killed)
    third.close()
    assert [e.message_id for e in left] == ["m0", "m1", "m2", "m9"]


def test_a_record_torn_inside_the_zeros_ahead_is_cut_off_with_an_error_and_the_whole_ones_come_back(
    spool_dir: Path, spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for n in range(2):
        spool.add(envelope(n))
    killed = as_a_kill_left_it(spool_dir, tmp_path)
    [segment] = list(killed.glob(f"*{Spool.SUFFIX}"))
    _, good = decode(segment.read_bytes())
    with open(segment, "r+b") as fh:  # the third record: its first bytes reached the disk, the rest did not
        fh.seek(good)
        fh.write(encode(ADD, 3, b'{"exchange":"x"}\nbody')[:12])

    with caplog.at_level(logging.ERROR, logger="ai_service.spool"):
        again, left = reopen(killed)
    again.close()
    assert [e.message_id for e in left] == ["m0", "m1"]
    assert any("cut short" in r.getMessage() for r in caplog.records)


class FailingFiles(OsFiles):
    """The real file system, whose next sync fails as a full or broken disk's does."""

    def __init__(self) -> None:
        self.fail_next = False

    def sync(self, handle: BinaryIO) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.EIO, "Input/output error")
        super().sync(handle)


def test_a_sync_that_fails_raises_in_the_add_it_covered_and_the_next_add_is_synced_again(spool_dir: Path) -> None:
    files = FailingFiles()
    s = Spool(spool_dir, max_messages=100, files=files)
    s.open()
    try:
        files.fail_next = True
        with pytest.raises(OSError, match="Input/output error"):
            s.add(envelope(1))
        s.add(envelope(2))
        assert "m2" in [e.message_id for e in Spool.peek(spool_dir)]
    finally:
        s.close()


def test_segments_whose_messages_all_left_are_deleted_and_a_closed_empty_spool_leaves_no_log(
    spool_dir: Path,
) -> None:
    s = Spool(spool_dir, max_messages=1000, segment_bytes=2_000)
    s.open()
    try:
        sent = [envelope(n, pad=300) for n in range(20)]
        for e in sent:
            s.add(e)
        assert len(list(spool_dir.glob(f"*{Spool.SUFFIX}"))) >= 4
        for e in sent[:10]:
            s.remove(e)
        s.flush()
        assert [e.message_id for e in Spool.peek(spool_dir)] == [f"m{n}" for n in range(10, 20)]
        for e in sent[10:]:
            s.remove(e)
        s.flush()
        assert len(list(spool_dir.glob(f"*{Spool.SUFFIX}"))) == 1, "only the segment being written stays"
        assert Spool.peek(spool_dir) == []
        assert len(s) == 0
        assert s.bytes == 0
    finally:
        s.close()
    assert list(spool_dir.glob(f"*{Spool.SUFFIX}")) == []


def test_messages_an_older_version_left_as_files_are_taken_into_the_log_in_order(spool_dir: Path) -> None:
    for n in (3, 1, 2):
        legacy_file(spool_dir, n, envelope(n))
    s, left = reopen(spool_dir)
    s.close()
    assert [e.routing_key for e in left] == [f"train.update.job{n}" for n in (1, 2, 3)]
    assert list(spool_dir.glob(f"*{Spool.LEGACY_SUFFIX}")) == []
    again, left = reopen(spool_dir)
    again.close()
    assert [e.message_id for e in left] == ["m1", "m2", "m3"]


def test_the_refused_file_keeps_small_bodies_and_stays_within_its_byte_bound(tmp_path: Path) -> None:
    refused = RefusedLog(tmp_path / "refused.jsonl", max_bytes=40_000, body_limit=1_000)
    refused.append(envelope(1), "nacked", "nacked 3 times")
    big = envelope(2, pad=5_000)
    refused.append(big, "too_large", "too large")
    first, second = refused.entries()
    assert first["code"] == "nacked"
    assert first["routing_key"] == "train.update.job1"
    assert first["properties"]["message_id"] == "m1"
    assert "time" in first
    assert base64.b64decode(first["body_base64"]) == envelope(1).body
    assert second["body_bytes"] == len(big.body)
    assert "body_base64" not in second

    for n in range(300):
        refused.append(envelope(n, pad=500), "too_large", "x" * 200)
    files = [tmp_path / "refused.jsonl", tmp_path / "refused.jsonl.1"]
    assert sum(p.stat().st_size for p in files) <= 40_000
    kept = refused.entries()
    assert kept[-1]["properties"]["message_id"] == "m299"  # the newest are kept, the oldest dropped
    assert 10 < len(kept) < 300
