"""Conversion worker: a trained ``.pt`` from storage -> Ultralytics export per format ->
verified artifacts in storage.

One request names a model, a list of formats and the export options.  The handler
publishes ``conversion_started``, one ``conversion_update`` per format that succeeded
(``current_format``, ``progress``, and the ``artifact``), then ``conversion_completed``
with every artifact, or ``conversion_failed`` naming the first ``failed_format`` and
keeping the artifacts that did succeed (a format this machine cannot produce does not
stop the others).  A cancel between formats ends with ``conversion_cancelled`` and the
artifacts done so far.  The job record, lease and exactly-one-terminal protocol are
:class:`ai_service.jobs.LongJob`'s, as for training.

What is checked where:

* before the job is taken (``invalid_request``, dead-lettered): unknown format names
  (the allowed ones come from the installed Ultralytics' export table), ``half`` or
  ``int8`` with a format that cannot take it, both at once, ``int8`` without a dataset
  to calibrate on;
* per format (``unsupported_format``, the other formats go on): a missing exporter
  package, found with ``importlib.util.find_spec`` *before* the exporter runs (so
  Ultralytics never gets to ``check_requirements`` and pip), a missing tool on PATH,
  or a GPU-only format (``engine``, FP16 ``torchscript``) on a CPU worker;
* per format (``export_error`` / ``out_of_memory``): the exporter itself failing.

Artifacts are uploaded under ``output.prefix`` and named after the source key's stem
(``models/m/shapes.pt`` -> ``<prefix>/shapes.onnx``, ``<prefix>/shapes_openvino_model/``).
A folder artifact's ``path`` ends in ``/``; its ``size_bytes`` is the sum of its files'
sizes and its ``sha256`` is the SHA-256 of the text made of one line
``<sha256 of the file>  <relative path>\\n`` per file, sorted by relative path -- what
``find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum | sha256sum`` prints
when run inside the folder.

Verification: each artifact is loaded back with ``YOLO(path)`` and run on sample images
(the request's dataset's val images, else generated shapes), letterboxed to a square of
``imgsz`` so the source and a static-shape export see exactly the same pixels.  Its
detections are matched with the source model's (same class, IoU and confidence within
the format's :class:`Tolerance`); a detection within the confidence tolerance of the
threshold may be on one side only.  When the source detects nothing at all, the raw
head outputs of the two are compared instead (boxes and class scores of the source's
top anchors).  ``verified`` says whether they agreed; when not, ``verification`` says why.

Each job exports in its own folder under ``WORK_DIR/runs`` (one sub-folder per format),
removed at the end.  On the CPU, torch gets every core while exporting (Ultralytics
leaves one idle); ONNX Runtime and OpenVINO pick their own threads when verifying.  A
warm shutdown lets the running conversion finish.

The package: :mod:`.formats` (the export table, a request's plan, what this worker can
build), :mod:`.compare` (matching detections and raw outputs within a tolerance),
:mod:`.verify` (sample images and the :class:`Verifier`), :mod:`.job` (one request from
taking it to its terminal message).  ``ai-service worker convert`` imports this package
and calls :func:`operation`.
"""

from __future__ import annotations

import sys
import warnings

from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.jobs.operation import recorded_operation
from ai_service.messages import Artifact, ConversionFailed, ConversionRequest
from ai_service.operation import JobContext, Operation, Resources
from ai_service.provenance import describe_local, folder_digest
from ai_service.registry import CONVERT
from workers import yolo
from workers.conversion.compare import (
    TOLERANCES,
    Comparison,
    Detections,
    Tolerance,
    box_iou,
    compare_detections,
    compare_raw,
)
from workers.conversion.formats import (
    ALIASES,
    ConversionState,
    FormatSpec,
    Plan,
    export_arguments,
    export_table,
    plan_formats,
    precision,
    unsupported_reason,
)
from workers.conversion.job import ConversionJob, FormatHook
from workers.conversion.verify import Verifier, letterbox, sample_images

__all__ = [
    "ALIASES",
    "TOLERANCES",
    "Artifact",
    "Comparison",
    "ConversionJob",
    "ConversionState",
    "Detections",
    "FormatHook",
    "FormatSpec",
    "Plan",
    "Tolerance",
    "Verifier",
    "block_openvino_telemetry",
    "box_iou",
    "compare_detections",
    "compare_raw",
    "describe_local",
    "export_arguments",
    "export_table",
    "failure_message",
    "folder_digest",
    "letterbox",
    "operation",
    "plan_formats",
    "precision",
    "sample_images",
    "setup",
    "unsupported_reason",
]


def failure_message(job_id: str, error: AIServiceError) -> ConversionFailed:
    """The ``conversion_failed`` a BE gets when a request fails before the job started."""
    return ConversionFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


def operation(settings: Settings, *, on_format_done: FormatHook | None = None) -> Operation:
    """The conversion operation: prefetch 1, one job at a time per worker (and GPU)."""

    def handler(request: ConversionRequest, ctx: JobContext) -> None:
        ConversionJob(request, ctx, on_format_done).run()

    return recorded_operation(CONVERT, settings, request_model=ConversionRequest, handler=handler,
                              failure=failure_message, setup=setup)


def setup(resources: Resources) -> None:
    """Make Ultralytics offline, pip-free and safe, import the exporter once, pick the device."""
    settings = resources.settings
    yolo.prepare_ultralytics(settings.work_dir)
    block_openvino_telemetry()
    # torch.jit.trace/load are deprecated in favour of torch.export, but Ultralytics' torchscript
    # export and loader still use them; one FutureWarning per format is only noise in the log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    from ultralytics.engine import exporter  # noqa: F401 - pay the import once, before the first job
    from ultralytics.utils import checks

    if yolo.module_constant(checks, "AUTOINSTALL"):  # belt and braces: prepare_ultralytics set YOLO_AUTOINSTALL=0
        yolo.set_module_constant(checks, "AUTOINSTALL", False)
    resources.device = yolo.select_device(settings.device)
    resources.state = ConversionState(formats=export_table())


def block_openvino_telemetry() -> None:
    """Make ``import openvino_telemetry`` fail in this process, whatever is installed.

    OpenVINO's converter sends usage analytics through that package during every export,
    whatever ``YOLO_OFFLINE`` says (FIELD-NOTES); ``make install`` uninstalls it, and this
    covers a worker installed another way: every OpenVINO import of it is guarded by
    ``except ImportError`` and falls back to a no-op stub.
    """
    if "openvino_telemetry" not in sys.modules or sys.modules["openvino_telemetry"] is None:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]

