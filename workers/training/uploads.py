"""Checkpoints to storage in the background while the next epoch trains."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ai_service import tracing

log = logging.getLogger("workers.training")

#: How much nicer than the training thread the upload thread runs (Linux: per thread).
UPLOAD_NICENESS = 10


class CheckpointUploads:
    """Each epoch's checkpoints go to storage in the background while the next epoch trains.

    Synchronous uploads cost ~0.35 s an epoch against local SeaweedFS (bench: ~45% of a
    toy CPU epoch).  At most one upload is pending: the next submit (or a flush) waits for
    it and re-raises its failure in the training thread.  The job record names a
    checkpoint only once it is in storage, so a resume is at most one epoch behind the
    last announced epoch (Ultralytics redoes that epoch; the BE is not told twice).

    Staging copies nothing: Ultralytics writes ``last.pt`` with ``Path.write_bytes``
    (truncate in place), so ``last.pt`` is *renamed* into the staging folder -- its next
    save creates a new file.  Once uploaded, the staged file is linked back as
    ``last.pt`` unless a newer one exists (Ultralytics' NaN recovery reads it).  The last
    epoch's ``last.pt`` is copied instead (``keep``): its upload runs during the final
    evaluation instead of before it, and the job waits for it (:meth:`flush`) only before
    it uploads the best weights and reports.

    ``best.pt`` is not uploaded while it equals ``last.pt`` (the store is told
    ``best_is_last`` and names the last key as best): that halves the checkpoint bytes
    while training improves.  The first epoch that does not improve hands in the older
    ``best.pt`` (``previous_best``), staged as a copy -- the next improving save rewrites
    ``best.pt`` in place -- which the store uploads before this ``last.pt`` overwrites the
    only stored copy of those weights.  The upload thread runs :data:`UPLOAD_NICENESS`
    nicer than training, so that its hashing and HTTP yield the cores to the epoch.
    """

    def __init__(self, staging: Path, store: Callable[[dict[str, Path], bool], None]) -> None:
        self.staging = staging
        self.store = store
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, last: Path, *, best_is_last: bool = False, previous_best: Path | None = None,
               keep: bool = False) -> None:
        """Stage ``last`` (and a copy of ``previous_best``) and upload it in the background.

        ``best_is_last``: these weights are also the best so far (Ultralytics wrote
        ``best.pt`` from the same bytes); passed on to the store.  ``previous_best``: the
        best weights, whose only stored copy this upload of ``last`` would overwrite;
        staged as ``best``.  ``keep``: leave ``last`` where it is and stage a copy -- after
        the last epoch, whose upload overlaps Ultralytics' final evaluation, which rewrites
        ``last.pt`` in place (``strip_optimizer``: a hard link would share that write).
        """
        self.flush()
        self.staging.mkdir(parents=True, exist_ok=True)
        staged = {"last": self.staging / "last.pt"}
        if keep:
            staged["last"].unlink(missing_ok=True)
            _copy(last, staged["last"])
        else:
            os.replace(last, staged["last"])
        if previous_best is not None:
            staged["best"] = self.staging / "best.pt"
            staged["best"].unlink(missing_ok=True)
            _copy(previous_best, staged["best"])
        self._thread = threading.Thread(target=self._run, args=(staged, last, best_is_last, tracing.current()),
                                        name="checkpoint-upload", daemon=True)
        self._thread.start()

    def _run(self, staged: dict[str, Path], last: Path, best_is_last: bool, trace: Any = None) -> None:
        _lower_priority()
        try:
            with tracing.span("checkpoint upload", parent=trace, attributes={"ai.checkpoints": ",".join(staged)}):
                self.store(staged, best_is_last)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
            self._error = exc
        finally:
            _put_back(staged, last)

    def flush(self) -> None:
        """Wait for the pending upload; raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def settle(self) -> None:
        """Wait for the pending upload, ignoring its failure (the job ends another way)."""
        with contextlib.suppress(BaseException):
            self.flush()


def _put_back(staged: dict[str, Path], last: Path) -> None:
    """``last.pt`` back where Ultralytics looks, unless it saved a newer one meanwhile.

    ``os.link`` fails if ``last`` exists, so a newer save is never replaced by this one.
    """
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        _link(staged["last"], last)
    for path in staged.values():
        path.unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> None:
    """A hard link; a copy where the work dir's file system has none (FileExistsError as link's)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # EPERM/ENOTSUP/EXDEV: no hard links here
        _copy(src, dst)


def _copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to the new file ``dst`` (FileExistsError if it exists)."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _lower_priority() -> None:
    """Make the calling thread nicer (Linux schedules threads one by one; elsewhere a no-op)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + UPLOAD_NICENESS))
    except (AttributeError, OSError) as exc:
        log.debug("upload thread keeps its priority: %s", exc)
