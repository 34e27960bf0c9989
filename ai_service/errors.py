"""One rooted exception tree.

Every error the service raises on purpose descends from :class:`AIServiceError` and
falls in one of three families that decide what happens to a job or a delivery:

* :class:`InvalidInput` -- the request itself is wrong; answer ``invalid_request``
  (or a more precise code) and dead-letter it.  Retrying cannot help.
* :class:`PermanentError` -- the job cannot succeed as asked (dataset missing,
  training diverged, ...); answer ``*_failed`` with the error's code.
* :class:`RetryableError` -- the world is temporarily broken (broker away, storage
  timing out); the delivery is handed back and tried again.

Beside them, :class:`JobInterrupted` covers the ways a job stops without a failure of its
own (handed back on a warm shutdown, its lease lost to another worker): no answer, the
job goes on elsewhere.  What each family means for the delivery and the job is decided
in one place, :func:`ai_service.consumer.policy.settle`.

Each carries the contract's ``error_code`` and a message safe to show a BE: no secrets,
no stack traces.
"""

from __future__ import annotations

from typing import Literal, get_args

#: The contract's error codes (CONTRACT.md, ``*_failed.error_code``).
ErrorCode = Literal[
    "invalid_request",
    "dataset_not_found",
    "dataset_invalid",
    "model_not_found",
    "unsupported_format",
    "storage_error",
    "out_of_memory",
    "cancelled",
    "timeout",
    "training_error",
    "export_error",
    "inference_error",
    "internal_error",
]

ERROR_CODES: tuple[ErrorCode, ...] = get_args(ErrorCode)


class AIServiceError(Exception):
    """Root of every error the service raises on purpose."""

    error_code: ErrorCode = "internal_error"

    def __init__(self, message: str, *, error_code: str | None = None) -> None:
        super().__init__(message)
        if error_code is not None:
            if error_code not in ERROR_CODES:
                raise ValueError(f"unknown error_code {error_code!r}")
            self.error_code = error_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.error_code


class InvalidInput(AIServiceError):
    """The request is malformed or asks for something impossible; never retried."""

    error_code: ErrorCode = "invalid_request"


class PermanentError(AIServiceError):
    """The job cannot succeed as asked; it ends with a failure message."""

    error_code: ErrorCode = "internal_error"


class RetryableError(AIServiceError):
    """A temporary condition; the job or delivery should be tried again later."""

    error_code: ErrorCode = "internal_error"


class InternalError(PermanentError):
    """What a bug (an exception outside this tree) is reported as: never its text."""

    error_code: ErrorCode = "internal_error"


# --- broker boundary -----------------------------------------------------------------


class BrokerError(RetryableError):
    """Anything that went wrong talking to RabbitMQ (pika is wrapped into these)."""


class ConnectionClosed(BrokerError):
    """The connection or channel went away; reconnect and carry on."""


class AuthenticationFailed(BrokerError):
    """The broker refused our credentials (ACCESS_REFUSED); back off hard."""


class NotRouted(BrokerError):
    """The broker had nowhere to put a message (no such queue, nobody bound)."""


class QueueNotFound(BrokerError):
    """A queue the command needs does not exist on the broker."""


class SpoolFull(RetryableError):
    """The publisher's on-disk spool reached its bound while the broker is away."""


class SpoolLocked(AIServiceError):
    """Another live process holds this spool directory (two processes, one WORKER_NAME)."""


# --- storage boundary ----------------------------------------------------------------


class StorageError(RetryableError):
    """Storage could not be reached or answered with an unexpected error."""

    error_code: ErrorCode = "storage_error"


class ObjectNotFound(PermanentError):
    """A key (or prefix) that the request names does not exist."""

    error_code: ErrorCode = "model_not_found"


class PreconditionFailed(PermanentError):
    """A conditional write lost: the key already existed, or was no longer the version
    the caller read (``create_exclusive`` / ``replace_if_match``).

    Another writer won.  Callers that race on purpose (job leases) expect it and back off;
    retrying the same write cannot succeed, hence permanent.
    """


class UnsafeKey(InvalidInput):
    """A storage key that could escape its root: absolute, ``..``, backslash, NUL."""


class EscapesRoot(InvalidInput):
    """A stored entry (a symlink in the local backend) that points outside the storage root.

    Raised instead of following it: what lies outside ``STORAGE_DIR`` is not the BE's to read.
    """


class UntrustedModel(InvalidInput):
    """A model file the service did not produce, in a format whose loading runs code."""


# --- job boundary --------------------------------------------------------------------


class JobCancelled(PermanentError):
    """The job was cancelled through the control exchange: it ends ``*_cancelled``."""

    error_code: ErrorCode = "cancelled"


class JobInterrupted(AIServiceError):
    """The job stops here without an answer; it goes on elsewhere (not a failure)."""


class JobHandedBack(JobInterrupted):
    """The worker is shutting down and returns the job for another worker to resume."""


class LeaseLost(JobInterrupted):
    """Another worker took the job over (our lease had expired); stop without a result."""


# --- errors of one job's domain (raised by the workers) ----------------------------------


class DatasetError(PermanentError):
    """A dataset that cannot be used as it is (layout, list files, images, escapes)."""

    error_code: ErrorCode = "dataset_invalid"


class ImageNotFound(PermanentError):
    """A request naming an image key that does not exist: answered, not dead-lettered
    (the key may simply not be uploaded yet)."""

    error_code: ErrorCode = "invalid_request"


class InferenceError(PermanentError):
    """Predicting failed for a reason of the model or the images, not of the world."""

    error_code: ErrorCode = "inference_error"


class UnsupportedFormat(PermanentError):
    """A model file whose format this worker cannot load."""

    error_code: ErrorCode = "unsupported_format"


# --- errors of the tools around jobs (configuration, commands, clients) ------------------
# They never end a job; they end a command or a worker's start with a clear message.


class ToolError(AIServiceError):
    """Root of the errors of configuration, commands and clients."""


class ConfigError(ToolError, ValueError):
    """An environment variable has a value the service cannot use."""


class GpuListError(ToolError, ValueError):
    """A --*-gpus value that is not a GPU list."""


class UnknownOperation(ToolError, ValueError):
    """A name no spec has (``ValueError`` as ``queue_names`` always raised)."""


class CommandError(ToolError):
    """Ends a command with ``code`` (its exit code) after printing ``message`` on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class HttpFailure(ToolError):
    """An HTTP call of the CLI that did not get the answer it needs."""

    def __init__(self, message: str, status: int | None = None, body: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class DirectGetFailed(ToolError):
    """A direct GET did not deliver the object; fetch it through ``get_object`` instead.

    ``status``: the HTTP status when the server answered, else None.
    """

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


class ObjectChanged(DirectGetFailed):
    """The object's size is no longer the listing's (rewritten since): fetch it again, whole;
    not a fault of the direct path, which goes on for the other objects."""
