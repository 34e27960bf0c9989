"""One conversion request, from taking it to its terminal message."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ai_service import tracing
from ai_service.errors import (
    AIServiceError,
    InvalidInput,
    JobCancelled,
    LeaseLost,
    ObjectNotFound,
    PermanentError,
    StorageError,
)
from ai_service.jobs import JobRecord, LongJob
from ai_service.jobs import ledger as jobs_ledger
from ai_service.messages import (
    Artifact,
    ConversionCancelled,
    ConversionCompleted,
    ConversionFailed,
    ConversionRequest,
    ConversionStarted,
    ConversionUpdate,
)
from ai_service.operation import JobContext
from ai_service.provenance import Provenance, describe_local, file_sha256
from workers import yolo
from workers.conversion.compare import TOLERANCES
from workers.conversion.formats import (
    ConversionState,
    Plan,
    export_arguments,
    export_table,
    plan_formats,
    precision,
    unsupported_reason,
)
from workers.conversion.verify import Verifier, sample_images
from workers.datasets import limits_from, prepare_dataset

#: Called after each format is uploaded and announced (tests slow a job down through it).
FormatHook = Callable[[str, JobContext], None]


@dataclass
class FormatFailure:
    format: str
    error: AIServiceError


@dataclass(frozen=True)
class Exported:
    """A format exported and checked locally, not yet uploaded."""

    path: Path
    verified: bool
    note: str


class ConversionJob:
    """One conversion request, from taking it to its terminal message."""

    def __init__(self, request: ConversionRequest, ctx: JobContext, on_format_done: FormatHook | None) -> None:
        self.request = request
        self.ctx = ctx
        self.on_format_done = on_format_done
        self.run_dir = ctx.settings.work_dir / "runs" / f"{request.job_id}-{uuid.uuid4().hex[:8]}"
        self.started = time.monotonic()
        self.device = ctx.resources.device
        ledger = jobs_ledger(ctx.storage, ctx.settings, op=ctx.op)
        self.job = LongJob(ctx, ledger, cancelled_message=self._cancelled, failed_message=self._failed)
        self.artifacts: list[Artifact] = []
        self.failures: list[FormatFailure] = []
        self.current: str | None = None
        self.source_sha256 = ""

    # --- the job -----------------------------------------------------------------------

    def run(self) -> None:
        req, ctx = self.request, self.ctx
        state = ctx.resources.state_as(ConversionState)
        table = state.formats if state is not None else export_table()
        plans = plan_formats(req, table)  # a bad request -> invalid_request, before the job is taken
        begin = self.job.begin()
        if begin.record is None:
            ctx.log.info("Nothing to run (%s)", begin.reason)
            return
        record = begin.record
        self.artifacts = self._load_done(record)
        ctx.update(ConversionStarted(job_id=req.job_id, formats=list(req.formats), worker=ctx.worker))
        try:
            self._convert_all(plans, record)
            if self.failures:
                first = self.failures[0]
                ctx.log.warning("Conversion ended with %d failed format(s): %s", len(self.failures),
                                self._failure_text())
                self.job.finish(record, "failed", self._failed(record, first.error))
            else:
                self.job.finish(record, "completed", ConversionCompleted(
                    job_id=req.job_id, artifacts=self.artifacts,
                    conversion_time=round(time.monotonic() - self.started, 3),
                ))
                ctx.log.info("Conversion completed: %s", ", ".join(a.format for a in self.artifacts))
        except BaseException as exc:  # noqa: BLE001 - every outcome goes through the one policy
            self.job.conclude(record, self._classify(exc), where=f"after {len(self.artifacts)} artifact(s)")
        finally:
            self.job.stop_renewing()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _convert_all(self, plans: list[Plan], record: JobRecord) -> None:
        req, ctx = self.request, self.ctx
        self._checkpoint()
        source = self._fetch_model()
        data_yaml = None
        if req.dataset is not None:
            data_yaml = prepare_dataset(ctx.storage, req.dataset.s3_prefix, ctx.settings.work_dir, self.run_dir,
                                        limits_from(ctx.settings))
        images, origin = sample_images(data_yaml, req.options.imgsz)
        verifier = Verifier(source, images, req.options.imgsz, self.device)
        ctx.log.info("Exporting %s at %d px (%s) on %s; verifying on %s", ", ".join(req.formats),
                     req.options.imgsz, precision(req.options), self.device, origin)
        done = {a.format for a in self.artifacts}
        for index, plan in enumerate(plans):
            if plan.requested in done:
                ctx.log.info("%s was done before the job was resumed", plan.requested)
                continue
            self.current = plan.requested
            self._checkpoint()
            attributes = {"ai.job_id": req.job_id, "ai.format": plan.requested, "ai.precision": precision(req.options)}
            with tracing.span(f"export {plan.requested}", attributes=attributes) as span:
                artifact = self._convert_one(plan, source, verifier, data_yaml)
                if artifact is None:
                    span.fail(f"{plan.requested}: {self.failures[-1].error.error_code}" if self.failures else "failed")
                    continue
                span.set("ai.verified", artifact.verified)
                self._checkpoint()  # a cancel that came during the export: nothing uploaded for this format
                self._upload(plan, artifact)
                progress = round(100.0 * (index + 1) / len(plans), 2)
                ctx.update(ConversionUpdate(job_id=req.job_id, current_format=plan.requested, progress=progress,
                                            artifact=self.artifacts[-1]))
            if self.on_format_done is not None:
                self.on_format_done(plan.requested, ctx)
        self.current = None

    def _checkpoint(self) -> None:
        """A safe point: stop here when cancelled or no longer ours.

        A warm shutdown does not stop a conversion: it is short next to training, so the
        job is finished first (README, Operations) rather than handed back and redone.
        """
        if self.ctx.cancelled.is_set():
            raise JobCancelled("conversion was cancelled")
        if self.job.lost.is_set():
            raise LeaseLost("the job was taken over by another worker")

    def _provenance(self) -> Provenance:
        s = self.ctx.settings
        return Provenance(self.ctx.storage, prefix=s.jobs_prefix, trust_external=s.trust_external_models)

    def _fetch_model(self) -> Any:
        """Download the model under a neutral local name and load it without running its pickle."""
        local = self.run_dir / "source" / "model.pt"
        self.ctx.log.info("Fetching %s", self.request.model.path)
        key = self.request.model.path
        try:
            self.ctx.storage.download_file(key, local)
        except ObjectNotFound as exc:
            raise ObjectNotFound(f"model.path {key!r} does not exist: {exc.message}") from None
        self.source_sha256 = file_sha256(local)
        try:
            model = yolo.safe_load_model(local)
        except InvalidInput:  # its message names the neutral local file; the BE knows the key
            raise InvalidInput(
                f"model.path {key!r} is not a valid Ultralytics .pt checkpoint (not a model, corrupt, or a "
                "pickle that would run code on load)"
            ) from None
        if getattr(self.device, "type", "cpu") == "cpu":
            # The exporter's select_device() just set torch to cpu_count - 1 threads (1 of 2 cores
            # here); tracing, the dry run and the ONNX/OpenVINO conversion then use every core.
            model.add_callback("on_export_start", lambda exporter: yolo.set_cpu_threads())
        return model

    # --- one format --------------------------------------------------------------------

    def _convert_one(self, plan: Plan, source: Any, verifier: Verifier, data_yaml: Path | None) -> Exported | None:
        """Export and verify one format; a format-level failure is recorded and None returned."""
        ctx, opts = self.ctx, self.request.options
        reason = unsupported_reason(plan, opts, self.device)
        if reason is not None:
            ctx.log.warning("%s: unsupported here: %s", plan.requested, reason)
            self.failures.append(FormatFailure(plan.requested, PermanentError(reason, error_code="unsupported_format")))
            return None
        out_dir = self.run_dir / plan.name
        out_dir.mkdir(parents=True, exist_ok=True)
        source.model.pt_path = str(out_dir / "model.pt")  # where the exporter writes: one folder per format
        args = export_arguments(plan, self.request, self.device, data_yaml)
        started = time.monotonic()
        try:
            exported = Path(source.export(**args))
        except BaseException as exc:  # one format's failure must not end the others
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error = self._export_error(plan, exc)
            ctx.log.warning("%s: export failed: %s: %s", plan.requested, error.error_code, error.message,
                            exc_info=error.error_code == "export_error")
            self.failures.append(FormatFailure(plan.requested, error))
            return None
        seconds = time.monotonic() - started
        if not exported.exists() or not exported.resolve().is_relative_to(self.run_dir.resolve()):
            self.failures.append(FormatFailure(plan.requested, PermanentError(
                f"{plan.requested} export produced no artifact", error_code="export_error")))
            return None
        tol = TOLERANCES[precision(opts)]
        try:
            verified, note, _ = verifier.verify(exported, tol)
        except Exception as exc:  # an artifact that cannot be run is reported, not hidden
            if yolo.is_out_of_memory(exc):
                raise
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            verified, note = False, f"could not load and run the exported model: {type(exc).__name__}: {detail}"
        log = ctx.log.info if verified else ctx.log.warning
        log("%s: exported in %.1f s; verification %s: %s", plan.requested, seconds,
            "passed" if verified else "FAILED", note)
        return Exported(exported, verified, note)

    def _upload(self, plan: Plan, exported: Exported) -> None:
        """Upload one artifact, record it durably, then announce it."""
        ctx = self.ctx
        path = exported.path
        name = _artifact_name(self.request.model.path, path.name)
        prefix = self.request.output.prefix.rstrip("/")
        size, sha = describe_local(path)
        if path.is_dir():
            key = f"{prefix}/{name}/"
            ctx.storage.delete_prefix(key)  # a re-export must not leave stale files in the folder
            ctx.storage.upload_dir(path, key)
        else:
            key = f"{prefix}/{name}"
            ctx.storage.upload_file(path, key)
        self._provenance().record(
            sha256=sha, fmt=plan.requested, key=key, size_bytes=size, source_key=self.request.model.path,
            source_sha256=self.source_sha256, options=self.request.options.model_dump(), job_id=self.request.job_id)
        artifact = Artifact(format=plan.requested, path=key, size_bytes=size, sha256=sha, verified=exported.verified,
                            verification=None if exported.verified else exported.note)
        self.artifacts.append(artifact)
        self._save_done()
        ctx.log.info("%s: uploaded %s (%d bytes)", plan.requested, key, size)

    # --- durable progress --------------------------------------------------------------

    def _done_key(self) -> str:
        return self.job.ledger.checkpoint_key(self.request.job_id, "artifacts.json")

    def _save_done(self) -> None:
        """The artifacts so far go to storage with the lease, before the BE hears of them:
        a job resumed elsewhere skips them (and ``progress`` never goes back)."""
        payload = json.dumps([a.to_json_dict() for a in self.artifacts]).encode()
        self.ctx.storage.write_bytes(self._done_key(), payload)
        record = self.job.record
        checkpoints = dict(record.checkpoints) if record is not None else {}
        checkpoints["artifacts"] = self._done_key()
        self.job.renew(checkpoints=checkpoints)

    def _load_done(self, record: JobRecord) -> list[Artifact]:
        key = record.checkpoints.get("artifacts")
        if not key:
            return []
        try:
            items = json.loads(self.ctx.storage.read_bytes(key))
            artifacts = [Artifact(**item) for item in items]
        except (AIServiceError, ValueError, TypeError) as exc:
            self.ctx.log.warning("Ignoring the artifacts of the earlier attempt (%s)", exc)
            return []
        requested = set(self.request.formats)
        return [a for a in artifacts if a.format in requested]

    # --- messages ----------------------------------------------------------------------

    def _cancelled(self, record: JobRecord) -> ConversionCancelled:
        return ConversionCancelled(job_id=self.request.job_id, artifacts=list(self.artifacts))

    def _failed(self, record: JobRecord, error: AIServiceError) -> ConversionFailed:
        failed_format = self.current
        message = error.message
        if self.failures:
            failed_format = self.failures[0].format
            message = self._failure_text()
            if error is not self.failures[0].error:  # a job-level failure after some formats failed
                failed_format = self.current or failed_format
                message = f"{error.message}; earlier: {message}"
        return ConversionFailed(
            job_id=self.request.job_id,
            error_code=error.error_code,
            error_message=message,
            failed_format=failed_format,
            artifacts=list(self.artifacts),
        )

    def _failure_text(self) -> str:
        parts = [f"{f.format}: {f.error.message}" for f in self.failures]
        total = len(self.request.formats)
        return f"{len(self.failures)} of {total} format(s) failed: " + "; ".join(parts)

    def _export_error(self, plan: Plan, exc: BaseException) -> AIServiceError:
        if yolo.is_out_of_memory(exc):
            return PermanentError(f"{plan.requested}: out of memory during export: lower options.imgsz or "
                                  "options.batch", error_code="out_of_memory")
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            return PermanentError(f"{plan.requested} export needs the Python package {exc.name.split('.')[0]}, "
                                  "not installed on this worker", error_code="unsupported_format")
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        detail = detail.replace("ERROR ❌️", "").strip()[:300]
        return PermanentError(f"{plan.requested} export failed: {type(exc).__name__}: {detail}",
                              error_code="export_error")

    def _classify(self, exc: BaseException) -> AIServiceError:
        """Map a job-level failure to the contract's error codes, with a message fit for a BE."""
        if isinstance(exc, AIServiceError):
            return exc
        if yolo.is_out_of_memory(exc):
            return PermanentError("out of memory: lower options.imgsz or options.batch", error_code="out_of_memory")
        if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")):
            return StorageError(f"storage failed during conversion: {type(exc).__name__}")
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return PermanentError(f"conversion failed: {type(exc).__name__}: {detail}", error_code="export_error")


def _artifact_name(model_key: str, exported_name: str) -> str:
    """``model.onnx`` / ``model_openvino_model`` named after the source key's stem instead."""
    stem = PurePosixPath(model_key).stem or "model"
    local = "model"
    return stem + exported_name[len(local):] if exported_name.startswith(local) else exported_name
