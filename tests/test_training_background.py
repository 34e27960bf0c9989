"""The training thread's hand-offs: epoch announcements in order off the training thread,
and the last epoch's checkpoint upload overlapping Ultralytics' final evaluation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ai_service.errors import StorageError
from tests.support.uploads import HeldStore
from workers.training.background import InOrder
from workers.training.uploads import CheckpointUploads


def test_handed_off_calls_run_in_the_order_submitted_on_a_thread_of_their_own() -> None:
    calls: list[tuple[int, str]] = []
    release = threading.Event()
    work = InOrder("announce-test")

    def announce(epoch: int) -> None:
        if epoch == 1:
            release.wait(5)  # the first one is slow: the second must still come after it
        calls.append((epoch, threading.current_thread().name))

    work.submit(announce, 1)
    work.submit(announce, 2)
    assert calls == [], "the submitting thread waited for the call"
    release.set()
    work.drain()
    work.close()
    assert [epoch for epoch, _ in calls] == [1, 2]
    assert all(name.startswith("announce-test") for _, name in calls)
    assert all(name != threading.current_thread().name for _, name in calls)


def test_a_failed_call_is_raised_in_the_submitting_thread_and_what_follows_it_does_not_run() -> None:
    ran: list[int] = []
    release = threading.Event()
    work = InOrder("announce-test")

    def renew_fails() -> None:
        release.wait(5)
        raise StorageError("S3 went away")

    work.submit(renew_fails)
    work.submit(ran.append, 2)  # e.g. the epoch_update of an epoch whose record was not renewed
    release.set()
    with pytest.raises(StorageError):
        work.drain()
    with pytest.raises(StorageError):
        work.check()  # still failed: the job must not go on as if it had been announced
    with pytest.raises(StorageError):
        work.submit(ran.append, 3)
    work.settle()  # the job ends another way: nothing raised
    work.close()
    assert ran == []


def test_check_raises_nothing_while_calls_succeed() -> None:
    ran: list[int] = []
    work = InOrder("announce-test")
    for epoch in range(5):
        work.submit(ran.append, epoch)
        work.check()
    work.drain()
    work.close()
    assert ran == [0, 1, 2, 3, 4]


def test_the_last_epochs_checkpoint_stays_in_place_and_its_upload_survives_the_final_rewrite(
    tmp_path: Path,
) -> None:
    """Ultralytics' final evaluation rewrites last.pt in place (strip_optimizer) while the
    last epoch's checkpoint is uploading: the upload keeps the epoch's bytes."""
    store = HeldStore()

    last = tmp_path / "weights" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"epoch 20 with optimizer")
    uploads = CheckpointUploads(tmp_path / "staging", store)
    uploads.submit(last, best_is_last=True, keep=True)
    assert store.uploading.wait(5)
    assert last.read_bytes() == b"epoch 20 with optimizer", "last.pt is there for the final evaluation"
    with open(last, "wb") as f:  # torch.save(path): truncate and write the same inode
        f.write(b"stripped")
    store.release.set()
    uploads.flush()
    assert store.seen == {"last": b"epoch 20 with optimizer"}
    assert last.read_bytes() == b"stripped", "the upload put an older last.pt back over the final one"
    assert list((tmp_path / "staging").iterdir()) == []
