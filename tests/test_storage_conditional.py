"""Conditional writes (job records two hosts cannot both win), on both backends.

S3 against a real SeaweedFS (``If-None-Match: *`` / ``If-Match``), the local backend
with an exclusive hard link and a per-key lock; races between threads and, locally,
between processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from ai_service.errors import ObjectNotFound, PermanentError, PreconditionFailed
from ai_service.storage import LocalStorage, ObjectInfo, S3Storage, Storage, make_s3_client
from tests.support.storage import backend

KEY = "jobs/train/job-1.json"


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return backend(request, tmp_path)


def _race(n: int, write: Callable[[int], ObjectInfo]) -> tuple[list[int], list[BaseException]]:
    """Run ``write(i)`` on ``n`` threads released at once: (winners, other errors)."""
    start = threading.Barrier(n)
    won: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            write(i)
            won.append(i)
        except PreconditionFailed:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, errors


def test_both_backends_support_conditional_writes_and_the_probe_leaves_nothing_behind(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ai_service.storage"):
        assert storage.supports_conditional_writes()
        assert storage.supports_conditional_writes()  # detected once
    assert caplog.text.count("conditional writes in") == 1
    assert "supported" in caplog.text
    assert storage.list("jobs/") == []


def test_create_exclusive_creates_once_and_a_second_create_changes_nothing(storage: Storage) -> None:
    info = storage.create_exclusive(KEY, b'{"owner": "a"}')
    assert info == storage.stat(KEY)
    with pytest.raises(PreconditionFailed):
        storage.create_exclusive(KEY, b'{"owner": "b"}')
    assert storage.read_bytes(KEY) == b'{"owner": "a"}'
    assert storage.stat(KEY) == info
    assert [o.key for o in storage.list("jobs/")] == [KEY]  # no lock or temp file listed


def test_of_threads_racing_to_create_one_key_exactly_one_wins(storage: Storage) -> None:
    for round_ in range(3):
        key = f"jobs/train/race-{round_}.json"
        won, errors = _race(6, lambda i, key=key: storage.create_exclusive(key, f"owner {i}".encode()))
        assert not errors
        assert len(won) == 1
        assert storage.read_bytes(key) == f"owner {won[0]}".encode()


def test_replace_if_match_with_a_stale_etag_fails_and_leaves_the_bytes(storage: Storage) -> None:
    first = storage.create_exclusive(KEY, b"version 1")
    second = storage.replace_if_match(KEY, b"version 2", first.etag)
    assert second == storage.stat(KEY)
    assert second.etag != first.etag
    with pytest.raises(PreconditionFailed):
        storage.replace_if_match(KEY, b"version 3 from a stale reader", first.etag)
    assert storage.read_bytes(KEY) == b"version 2"
    third = storage.replace_if_match(KEY, b"version 3", second.etag)
    assert storage.read_bytes(KEY) == b"version 3"
    assert third.etag not in (first.etag, second.etag)


def test_read_versioned_gives_the_bytes_with_the_etag_a_replace_needs(storage: Storage) -> None:
    created = storage.create_exclusive(KEY, b"version 1")
    data, info = storage.read_versioned(KEY)
    assert (data, info) == (b"version 1", created)
    storage.replace_if_match(KEY, b"version 2", info.etag)
    assert storage.read_versioned(KEY)[0] == b"version 2"
    with pytest.raises(ObjectNotFound):
        storage.read_versioned("jobs/train/none.json")


def test_replace_if_match_of_an_object_that_is_gone_fails(storage: Storage) -> None:
    info = storage.create_exclusive(KEY, b"version 1")
    storage.delete(KEY)
    with pytest.raises(PreconditionFailed):
        storage.replace_if_match(KEY, b"version 2", info.etag)
    assert storage.stat(KEY) is None
    with pytest.raises(PreconditionFailed):
        storage.replace_if_match("jobs/never/was.json", b"x", info.etag)


def test_of_threads_replacing_from_the_same_etag_exactly_one_wins(storage: Storage) -> None:
    for round_ in range(3):
        storage.write_bytes(KEY, f"base {round_}".encode())
        start = storage.stat(KEY)
        assert start is not None
        # Every writer's bytes differ: on S3 the etag is the content's MD5, so writing
        # the bytes already there would keep it and let a second writer match too.
        won, errors = _race(6, lambda i, etag=start.etag, r=round_: storage.replace_if_match(
            KEY, f"round {r} writer {i}".encode(), etag))
        assert not errors
        assert len(won) == 1
        assert storage.read_bytes(KEY) == f"round {round_} writer {won[0]}".encode()


def _create_many(root: str, keys: list[str], start: Any, out: Any) -> None:
    """In a child process: race for every key once both processes are ready."""
    store = LocalStorage(Path(root))
    start.wait()
    won = []
    for key in keys:
        try:
            store.create_exclusive(key, str(multiprocessing.current_process().pid).encode())
            won.append(key)
        except PreconditionFailed:
            pass
    out.put(won)


def test_of_two_processes_racing_for_the_same_local_keys_each_key_has_one_winner(tmp_path: Path) -> None:
    keys = [f"jobs/train/job-{i}.json" for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_create_many, args=(str(tmp_path / "store"), keys, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60), out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(results[0] + results[1]) == sorted(keys)  # every key won, none twice
    store = LocalStorage(tmp_path / "store")
    pids = {str(p.pid) for p in procs}
    assert {store.read_bytes(k).decode() for k in keys} <= pids


class _IgnoresConditions:
    """A real S3 client that drops If-None-Match / If-Match, as a server that ignores them."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_object(self, **kw: Any) -> Any:
        kw.pop("IfNoneMatch", None)
        kw.pop("IfMatch", None)
        return self._client.put_object(**kw)


def test_a_store_that_ignores_the_conditions_is_detected_and_refuses_conditional_writes(
    s3_env: dict[str, str], s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = S3Storage(s3_bucket, client=cast(Any, _IgnoresConditions(make_s3_client(max_attempts=1))))
    with caplog.at_level(logging.INFO, logger="ai_service.storage"):
        assert not store.supports_conditional_writes()
    assert "not supported (a second exclusive create succeeded)" in caplog.text
    with pytest.raises(PermanentError, match="does not support conditional writes") as caught:
        store.create_exclusive(KEY, b"x")
    assert caught.value.error_code == "storage_error"
    assert store.stat(KEY) is None
    assert store.list("jobs/") == []
