"""Inference worker: cached models, checked images, micro-batched predict on one thread.

One request (on one of ``INFER_PREFETCH`` handler threads; the runtime acks it only after
its answer is confirmed by the broker):

1. ``images`` is checked against ``MAX_IMAGES_PER_REQUEST``; the model is resolved through the
   :class:`ModelCache` (its version -- ETag or listing digest -- trusted for
   ``MODEL_VERSION_TTL`` seconds, then one ``stat``/listing again; download, load and
   warm-up only for a key + version it does not hold).
2. Every image is fetched (storage key) or base64-decoded (inline) and decoded with
   Pillow under caps: bytes (``MAX_IMAGE_BYTES``, ``MAX_INLINE_IMAGE_BYTES``), pixels read
   from the header *before* decoding (``MAX_IMAGE_PIXELS``, ``MAX_REQUEST_PIXELS``), only
   raster formats Pillow decodes itself, truncated or corrupt data refused.  This happens
   on the handler's thread, at most ``INFER_DECODE_THREADS`` requests at once (so that a
   burst of deliveries does not starve the predict thread of the GIL and the cores), and
   before batching, so a bad request fails alone.
3. The decoded images go to the :class:`Engine`, the one thread that touches models (load,
   warm-up, predict).  It runs requests for the same model version and parameters that
   are queued together -- or arrive within ``BATCH_WINDOW_MS`` while other handlers are
   still preparing theirs -- as one predict call of up to ``MAX_BATCH`` images, and hands
   each request its own detections.  ``MAX_BATCH=1`` turns batching off.
4. ``inference_completed`` goes to the request's ``reply_to`` (with its
   ``correlation_id``) or to ``infer_result_q`` (``ctx.result`` does that).

Memory: decoded images in flight are at most ``INFER_PREFETCH x MAX_REQUEST_PIXELS x 3``
bytes; cached models at most ``MODEL_CACHE_SIZE`` models and about ``MODEL_CACHE_MAX_MB``.

Why one engine thread: Ultralytics predictors are not meant to be driven from several
threads, and on a CPU (or one GPU) concurrent predicts only fight over the same cores; one
thread also sets torch's thread count right before each predict.

Why batching is on (``MAX_BATCH=8``): measured on this 2-core machine, ``.pt`` at 128 px,
one predict of 8 images ran ~2x the images/s of 8 single calls every time (quiet: 202-321
vs 105 img/s; with other jobs on the cores: 36-77 vs 19-26), and through the service with
16 requests in flight batching on vs off gave 114-121 vs 56-57 img/s, p50 latency 118-137
vs 262-278 ms.  A lone request does not wait for the window (see :class:`Engine`).

The package: :mod:`.cache` (models by key and version), :mod:`.images` (decoding under
caps), :mod:`.engine` (the batching model thread), :mod:`.service` (one request's
handling).  ``ai-service worker infer`` imports this package and calls :func:`operation`.
"""

from __future__ import annotations

import logging
import warnings

from PIL import Image, ImageFile

from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.messages import InferenceFailed, InferenceRequest
from ai_service.operation import JobContext, Operation, Resources
from ai_service.registry import INFER
from workers import yolo
from workers.inference.cache import LoadedModel, ModelCache, ModelRef, UnsupportedFormat, load_model, resolve_model
from workers.inference.engine import Engine, InferenceError, Job, Params
from workers.inference.images import decode_image, inline_size
from workers.inference.service import ImageNotFound, InferenceService, InferenceState

log = logging.getLogger("workers.infer")

__all__ = [
    "Engine",
    "ImageNotFound",
    "InferenceError",
    "InferenceService",
    "InferenceState",
    "Job",
    "LoadedModel",
    "ModelCache",
    "ModelRef",
    "Params",
    "UnsupportedFormat",
    "decode_image",
    "failure_message",
    "inline_size",
    "load_model",
    "operation",
    "resolve_model",
    "setup",
]


def failure_message(job_id: str, error: AIServiceError) -> InferenceFailed:
    return InferenceFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


def operation(settings: Settings) -> Operation:
    """The inference operation: ``INFER_PREFETCH`` requests in flight, one engine thread."""

    def handler(request: InferenceRequest, ctx: JobContext) -> None:
        ctx.state(InferenceState).handle(request, ctx)

    return Operation(
        name="infer",
        request_model=InferenceRequest,
        handler=handler,
        failure=failure_message,
        prefetch=INFER.prefetch(settings),
        setup=setup,
    )


def setup(resources: Resources) -> None:
    """Make Ultralytics offline and safe, guard Pillow, start the engine thread."""
    settings = resources.settings
    # prepare_ultralytics makes idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) before
    # torch loads.  Measured (.pt, 128 px, lists of 8, 2 cores): spinning (OpenMP's default)
    # with 2 torch threads gave 321 img/s on a quiet machine but 3-71 img/s as soon as other
    # processes wanted the cores; sleeping, 2 threads gave 130-200 quiet and 77 busy; 1
    # thread 200 quiet and 36-40 busy.  So: every core, sleeping.
    yolo.prepare_ultralytics(settings.work_dir)
    import ultralytics  # noqa: F401 - pay the import once, before the first request

    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's own bomb guard agrees with ours
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused by our own check instead
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")  # how TorchScript loads
    device = yolo.select_device(settings.device)
    service = InferenceService(settings, resources.require_storage(), device, resources.metrics)
    service.start()
    resources.device = device
    resources.state = InferenceState(service)
    batching = (f"up to {service.engine.max_batch} images, waiting up to {settings.batch_window_ms} ms"
                if service.engine.max_batch > 1 else "off")
    log.info("[Handler] Inference on %s: %d requests in flight, %d decoding at once, batching %s, torch threads %d "
             "for .pt/.torchscript, model cache %d models / %d MB, model versions checked every %g s", device,
             max(1, settings.infer_prefetch), service.decode_threads, batching, service.engine.cpu_threads,
             settings.model_cache_size, settings.model_cache_max_mb, settings.model_version_ttl)
