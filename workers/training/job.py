"""One training request, from taking it to its terminal message."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ai_service import tracing
from ai_service.errors import (
    AIServiceError,
    JobCancelled,
    JobHandedBack,
    LeaseLost,
    PermanentError,
    StorageError,
)
from ai_service.jobs import JobRecord, LongJob
from ai_service.jobs import ledger as jobs_ledger
from ai_service.messages import (
    EpochUpdate,
    TrainingCancelled,
    TrainingCompleted,
    TrainingFailed,
    TrainingRequest,
    TrainingStarted,
)
from ai_service.operation import JobContext
from workers import yolo
from workers.datasets import limits_from, prepare_dataset
from workers.training.background import InOrder
from workers.training.metrics import Progress, checkpoint_progress, epoch_metrics, partial
from workers.training.uploads import CheckpointUploads

#: Ultralytics callback name -> extra callbacks (tests inject faults through this).
Callbacks = dict[str, list[Callable[[Any], None]]]


class TrainingJob:
    """One training request, from taking it to its terminal message."""

    def __init__(self, request: TrainingRequest, ctx: JobContext, callbacks: Callbacks) -> None:
        self.request = request
        self.ctx = ctx
        self.callbacks = callbacks
        hp = request.hyperparams
        self.progress = Progress(total_epochs=hp.epochs)
        self.run_dir = ctx.settings.work_dir / "runs" / f"{request.job_id}-{uuid.uuid4().hex[:8]}"
        self.started = time.monotonic()
        ledger = jobs_ledger(ctx.storage, ctx.settings, op=ctx.op)
        self.job = LongJob(ctx, ledger, cancelled_message=self._cancelled, failed_message=self._failed)
        self.record: JobRecord | None = None
        self.uploads = CheckpointUploads(self.run_dir / "checkpoint-staging", self._store_checkpoints)
        #: the stored best weights are the last key's (set from the record when the job begins)
        self.best_is_last = False
        #: each epoch's announcement (record renewal, then epoch_update), off the training thread
        self.announcements = InOrder(f"announce-{request.job_id}"[:40])
        self.epoch_span, self.span_epoch = tracing.NO_SPAN, 0  # from on_train_epoch_start to on_fit_epoch_end

    # --- the job -----------------------------------------------------------------------

    def run(self) -> None:
        req, ctx = self.request, self.ctx
        yaml_name = yolo.model_yaml(req.hyperparams.model)  # unknown model -> invalid_request
        begin = self.job.begin()
        if begin.record is None:
            ctx.log.info("Nothing to run (%s)", begin.reason)
            return
        record = self.record = begin.record
        self.best_is_last = record.checkpoints.get("best", "") == record.checkpoints.get("last")
        self.progress.current_epoch = record.last_epoch
        self.progress.last_metrics = dict(record.last_metrics)
        ctx.update(TrainingStarted(job_id=req.job_id, total_epochs=req.hyperparams.epochs, worker=ctx.worker,
                                   resumed_from_epoch=record.last_epoch))
        if record.last_epoch:
            ctx.log.info("Resuming from epoch %d (attempt %d)", record.last_epoch, record.attempt)
        try:
            best = self._train(yaml_name, record)
            self.announcements.drain()  # every epoch_update out before the terminal message
            self.uploads.flush()
            ctx.log.info("Uploading best weights to %s", req.output.model_key)
            with tracing.span("model upload", attributes={"ai.storage.key": req.output.model_key}):
                ctx.storage.upload_file(best, req.output.model_key)
            final = self._final_metrics()
            self.job.finish(record, "completed", TrainingCompleted(
                job_id=req.job_id,
                model_path=req.output.model_key,
                final_metrics=final,
                training_time=round(time.monotonic() - self.started, 3),
            ))
            ctx.log.info("Training completed: mAP50 %.3f after %d epochs", final["final_mAP50"],
                         self.progress.current_epoch)
        except BaseException as exc:  # noqa: BLE001 - every outcome goes through the one policy
            self.announcements.settle()  # the epochs announced so far reach the BE before the outcome
            self.uploads.settle()  # a retry or the next worker resumes from the newest checkpoint
            self.job.conclude(record, self._classify(exc), where=f"at epoch {self.progress.current_epoch}")
        finally:
            self._end_epoch_span()  # an epoch cut short by an exception
            self.announcements.settle()
            self.announcements.close()
            self.uploads.settle()
            self.job.stop_renewing()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _cancelled(self, record: JobRecord) -> TrainingCancelled:
        return TrainingCancelled(job_id=self.request.job_id, current_epoch=self.progress.current_epoch,
                                 checkpoint_path=record.checkpoints.get("last"))

    def _failed(self, record: JobRecord, error: AIServiceError) -> TrainingFailed:
        return TrainingFailed(
            job_id=self.request.job_id,
            current_epoch=max(self.progress.current_epoch, record.last_epoch),
            error_code=error.error_code,
            error_message=error.message,
            partial_metrics=self._partial_metrics() or partial(record.last_metrics),
        )

    def _train(self, yaml_name: str, record: JobRecord) -> Path:
        req, ctx = self.request, self.ctx
        hp = req.hyperparams
        data_yaml = prepare_dataset(ctx.storage, req.dataset.s3_prefix, ctx.settings.work_dir, self.run_dir,
                                    limits_from(ctx.settings))
        save_dir = self.run_dir / "train"
        if record.last_epoch >= hp.epochs and "best" in record.checkpoints:
            best = save_dir / "weights" / "best.pt"  # trained to the end before the worker was lost
            ctx.storage.download_file(record.checkpoints["best"], best)
            return best
        resume = record.last_epoch > 0 and "last" in record.checkpoints
        model = self._resume_model(record, save_dir) if resume else self._build_model(yaml_name)
        if resume:
            # The stored last.pt may be an epoch ahead of the record: the worker was lost
            # after uploading it but before announcing that epoch.  Announce it now.
            finished, total, rows = checkpoint_progress(model)
            for epoch in range(record.last_epoch + 1, finished + 1):
                self._announce(epoch, rows.get(epoch, dict(record.last_metrics)), None)
            if total and finished >= total:  # trained to the end before the worker was lost
                best = save_dir / "weights" / "best.pt"
                return best if best.exists() else self.run_dir / "resume" / "last.pt"
        self._register_callbacks(model)
        device = ctx.resources.device
        args: dict[str, Any] = {
            "data": str(data_yaml),
            "save_dir": str(save_dir),
            "plots": False,
            "verbose": False,
            "device": device if device is not None else "cpu",
        }
        if not resume:
            args.update({
                "epochs": hp.epochs,
                "batch": hp.batch,
                "imgsz": hp.imgsz,
                "project": str(self.run_dir),
                "name": "train",
                "exist_ok": True,
                **hp.ultralytics_overrides(),
            })
        if hp.workers is None and getattr(device, "type", "cpu") == "cpu":
            args["workers"] = 0  # CPU workers: dataloader processes only compete with training
        ctx.log.info("Training %s for %d epochs at %d px on %s", hp.model, hp.epochs, hp.imgsz, args["device"])
        if resume:
            model.train(resume=True, **args)
        else:
            model.train(**args)
        trainer = model.trainer
        if self.progress.stopped_by:
            raise self._stopped_error()
        best = Path(trainer.best)
        if not best.exists():
            best = Path(trainer.last)
        if not best.exists():
            raise PermanentError("training produced no weights", error_code="training_error")
        return best

    def _build_model(self, yaml_name: str) -> Any:
        from ultralytics.models import YOLO

        pretrained = self.request.hyperparams.pretrained
        if pretrained is None:
            return YOLO(yaml_name)
        local = self.run_dir / "pretrained" / "model.pt"
        self.ctx.storage.download_file(pretrained, local)
        return yolo.safe_load_model(local)

    def _resume_model(self, record: JobRecord, save_dir: Path) -> Any:
        """Ultralytics' own resume from the last uploaded checkpoint, in a fresh run dir."""
        storage = self.ctx.storage
        local = self.run_dir / "resume" / "last.pt"
        storage.download_file(record.checkpoints["last"], local)
        best = record.checkpoints.get("best")
        if best == record.checkpoints["last"]:
            (save_dir / "weights").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, save_dir / "weights" / "best.pt")  # best.pt is the last epoch's
        elif best is not None:
            storage.download_file(best, save_dir / "weights" / "best.pt")
        return yolo.safe_load_model(local)

    # --- Ultralytics callbacks ---------------------------------------------------------

    def _register_callbacks(self, model: Any) -> None:
        model.add_callback("on_train_epoch_start", self._on_epoch_start)
        model.add_callback("on_train_batch_end", self._on_batch_end)
        model.add_callback("on_train_epoch_end", self._on_train_epoch_end)
        model.add_callback("on_model_save", self._on_model_save)
        model.add_callback("on_fit_epoch_end", self._on_fit_epoch_end)
        model.add_callback("on_fit_epoch_end", self._end_epoch_span)  # after the epoch was announced
        for event, fns in self.callbacks.items():
            for fn in fns:
                model.add_callback(event, fn)

    def _on_epoch_start(self, trainer: Any) -> None:
        self._end_epoch_span()
        self.span_epoch = int(trainer.epoch) + 1
        self.epoch_span = tracing.start("train epoch", attach=True, attributes={
            "ai.job_id": self.request.job_id, "ai.epoch": self.span_epoch, "ai.epochs": int(trainer.epochs)})

    def _end_epoch_span(self, trainer: Any = None) -> None:
        span, self.epoch_span = self.epoch_span, tracing.NO_SPAN
        if span is tracing.NO_SPAN:
            return  # also Ultralytics' final evaluation (on_fit_epoch_end without an epoch)
        finished = self.progress.current_epoch >= self.span_epoch  # announced (not cut short)
        span.set("ai.epoch.finished", finished)
        span.set("ai.epoch.stopped_by", self.progress.stopped_by)
        for key in ("train_loss", "mAP50", "mAP50_95") if finished else ():
            span.set(f"ai.metrics.{key}", self.progress.last_metrics.get(key))
        span.end()

    def _on_batch_end(self, trainer: Any) -> None:
        """Cancellation and warm shutdown act within one batch.

        A cancel lets Ultralytics stop (it still validates and saves, and that checkpoint
        is uploaded).  A shutdown aborts at once: the last finished epoch's checkpoint is
        already in storage, and the job is handed back to resume from it.
        """
        if self.ctx.cancelled.is_set() and not self.progress.stopped_by:
            self.progress.stopped_by = "cancel"
            trainer.stop = True
        elif self.ctx.shutdown.is_set() and not self.progress.stopped_by:
            self.progress.stopped_by = "shutdown"
            raise JobHandedBack("worker is shutting down")
        if self.job.lost.is_set():
            raise LeaseLost("the job was taken over by another worker")
        self.announcements.check()  # an announcement that failed (storage) fails the job here

    def _on_model_save(self, trainer: Any) -> None:
        """After every epoch: last.pt (and best.pt when it improved) go to storage.

        In the background (:class:`CheckpointUploads`); synchronously after a cancel.  The
        last epoch's upload runs during Ultralytics' final evaluation (``keep``: that
        evaluation rewrites last.pt); its announcement waits for it (:meth:`_announce_last`).
        """
        if self.record is None:
            return
        improved = trainer.best_fitness == trainer.fitness and Path(trainer.best).exists()
        previous_best = None
        if not improved and self.best_is_last and Path(trainer.best).exists():
            previous_best = Path(trainer.best)  # its only stored copy is about to be overwritten
        self.best_is_last = improved
        self.uploads.submit(Path(trainer.last), best_is_last=improved, previous_best=previous_best,
                            keep=self._ending(trainer))
        if self.progress.stopped_by:
            self.uploads.flush()

    @staticmethod
    def _ending(trainer: Any) -> bool:
        """Ultralytics stops after this epoch (the last, patience, time limit, a cancel)."""
        return bool(getattr(trainer, "stop", False)) or int(trainer.epoch) + 1 >= int(trainer.epochs)

    def _store_checkpoints(self, staged: dict[str, Path], best_is_last: bool) -> None:
        """Upload one epoch's staged checkpoints, naming them in the job record.

        A staged ``best`` (the earlier best weights) is stored and named first: until
        then the record names the last key as best, which the upload of ``last`` is about
        to overwrite.  ``best_is_last``: the record names the last key as best too.
        """
        record = self.record
        if record is None:
            return
        ledger, job_id = self.job.ledger, self.request.job_id
        checkpoints = dict(record.checkpoints)
        last_key = ledger.checkpoint_key(job_id, "last.pt")
        if "best" in staged:
            checkpoints["best"] = ledger.checkpoint_key(job_id, "best.pt")
            self.ctx.storage.upload_file(staged["best"], checkpoints["best"])
        elif not best_is_last and checkpoints.get("best") == last_key:
            del checkpoints["best"]  # no best.pt on disk to keep: never name other weights as best
        if checkpoints != record.checkpoints:
            self.job.renew(checkpoints=dict(checkpoints))  # before last_key is overwritten
        checkpoints["last"] = last_key
        self.ctx.storage.upload_file(staged["last"], last_key)
        if best_is_last:
            checkpoints["best"] = last_key
        if checkpoints != record.checkpoints:
            # Only when a name changes: the keys are fixed, so the record already names
            # these objects, now replaced in place (the epoch's announce renews the lease).
            self.job.renew(checkpoints=checkpoints)

    def _on_train_epoch_end(self, trainer: Any) -> None:
        self.progress.train_epoch_seen = int(trainer.epoch)

    def _on_fit_epoch_end(self, trainer: Any) -> None:
        epoch = int(trainer.epoch) + 1  # 1-based, as the BE counts
        metrics = epoch_metrics(trainer)
        if int(trainer.epoch) != self.progress.train_epoch_seen:
            # Ultralytics' final evaluation of best.pt (epoch bumped by one): not an epoch.
            self.progress.final_metrics = metrics
            return
        if self.progress.stopped_by or epoch <= self.progress.current_epoch:
            return  # a cut-short epoch, or an epoch Ultralytics redid after NaN recovery
        if trainer.epoch_time:
            self.progress.epoch_seconds.append(float(trainer.epoch_time))
            self.ctx.resources.metrics.epoch_seconds.observe(float(trainer.epoch_time))
        eta = self._eta(self.progress.total_epochs - epoch)
        self.progress.current_epoch = epoch
        self.progress.last_metrics = metrics
        if self._ending(trainer):
            self.announcements.submit(self._announce_last, epoch, metrics, eta)
        else:
            self.announcements.submit(self._publish_epoch, epoch, metrics, eta)

    def _announce_last(self, epoch: int, metrics: dict[str, float], eta: float | None) -> None:
        """The last epoch: its checkpoints in storage first (a worker lost after this
        announcement resumes from them as the finished job), then as any epoch."""
        self.uploads.flush()
        self._publish_epoch(epoch, metrics, eta)

    def _announce(self, epoch: int, metrics: dict[str, float], eta: float | None) -> None:
        """Record epoch ``epoch`` as finished, then tell the BE (durable before it hears of it)."""
        self.progress.current_epoch = epoch
        self.progress.last_metrics = metrics
        self._publish_epoch(epoch, metrics, eta)

    def _publish_epoch(self, epoch: int, metrics: dict[str, float], eta: float | None) -> None:
        """Renew the record with epoch ``epoch``, then publish its ``epoch_update``."""
        self.job.renew(last_epoch=epoch, last_metrics=metrics)
        total = self.progress.total_epochs
        self.ctx.update(
            EpochUpdate(
                job_id=self.request.job_id,
                current_epoch=epoch,
                total_epochs=total,
                progress=round(100.0 * epoch / total, 2),
                metrics=metrics,
                eta_seconds=eta,
            )
        )

    def _eta(self, epochs_left: int) -> float | None:
        recent = self.progress.epoch_seconds[-5:]
        if not recent:
            return None
        return round(epochs_left * sum(recent) / len(recent), 1)

    # --- results -----------------------------------------------------------------------

    def _final_metrics(self) -> dict[str, float | int]:
        final = self.progress.final_metrics or self.progress.last_metrics
        last = self.progress.last_metrics
        return {
            "final_mAP50": final.get("mAP50", 0.0),
            "final_loss": last.get("train_loss", 0.0),
            "training_epochs": self.progress.current_epoch,
            "final_mAP50_95": final.get("mAP50_95", 0.0),
            "final_precision": final.get("precision", 0.0),
            "final_recall": final.get("recall", 0.0),
        }

    def _partial_metrics(self) -> dict[str, float]:
        return partial(self.progress.last_metrics)

    def _stopped_error(self) -> AIServiceError:
        if self.progress.stopped_by == "cancel":
            return JobCancelled("training was cancelled")
        return PermanentError("worker shut down during training", error_code="internal_error")

    def _classify(self, exc: BaseException) -> AIServiceError:
        """Map any failure to the contract's error codes, with a message fit for a BE."""
        if isinstance(exc, AIServiceError):
            return exc
        if yolo.is_out_of_memory(exc):
            where = "GPU" if "CUDA" in str(exc) or "cuda" in type(exc).__name__.lower() else "memory"
            return PermanentError(
                f"out of {where} memory at epoch {self.progress.current_epoch + 1}: "
                "lower hyperparams.batch or hyperparams.imgsz",
                error_code="out_of_memory",
            )
        if _is_storage_failure(exc):
            return StorageError(f"storage failed during training: {type(exc).__name__}")
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return PermanentError(f"training failed: {type(exc).__name__}: {detail}", error_code="training_error")



def _is_storage_failure(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("botocore", "boto3", "s3transfer"))

