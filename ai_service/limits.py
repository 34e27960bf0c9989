"""Bounds on what a request may carry, and the service's reserved storage area.

Request validation (``ai_service.messages``) reads them from pydantic's validation
context, so a bound is enforced the moment a request is parsed, never minutes later in
a handler.  Kept free of I/O imports: the BE-side CLI validates with the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ai_service.config import Settings


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each a README configuration row)."""

    #: The service's own area in storage (job records, checkpoints, cancel markers,
    #: artifact records); no request key may name anything in it.
    jobs_prefix: str = "jobs/"
    max_images_per_request: int = 256
    max_det: int = 1000
    max_imgsz: int = 4096
    max_train_batch: int = 256
    max_epochs: int = 10000
    max_dataloader_workers: int = 16
    #: ``cache: true`` / ``"ram"`` holds a whole decoded dataset in memory: off unless allowed.
    allow_ram_cache: bool = False
    max_export_batch: int = 64

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Limits":
        return cls(
            jobs_prefix=settings.jobs_prefix,
            max_images_per_request=settings.max_images_per_request,
            max_det=settings.max_det,
            max_imgsz=settings.max_imgsz,
            max_train_batch=settings.max_train_batch,
            max_epochs=settings.max_epochs,
            max_dataloader_workers=settings.max_dataloader_workers,
            allow_ram_cache=settings.allow_ram_cache,
            max_export_batch=settings.max_export_batch,
        )

    def context(self) -> dict[str, Any]:
        """The pydantic validation context carrying these limits."""
        return {"limits": self}

    def reserved(self, key: str) -> bool:
        """True when ``key`` (an object or a folder-style prefix) names the service's own area."""
        area = self.jobs_prefix.rstrip("/")
        if not area:
            return False
        bare = key.rstrip("/")
        return bare == area or bare.startswith(area + "/")


DEFAULT_LIMITS = Limits()


def limits_of(context: Any) -> Limits:
    """The limits in a validation context, or the defaults."""
    if isinstance(context, dict):
        found = context.get("limits")
        if isinstance(found, Limits):
            return found
    return DEFAULT_LIMITS
