"""Ultralytics' training numbers in the contract's names, and what the callbacks learned."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """What the callbacks learned so far; the failure message reads it."""

    total_epochs: int
    current_epoch: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    train_epoch_seen: int = -1
    epoch_seconds: list[float] = field(default_factory=list)
    stopped_by: str | None = None


def _round(value: Any) -> float:
    return round(float(value), 6)


def epoch_metrics(trainer: Any) -> dict[str, float]:
    """The contract's epoch metrics from an Ultralytics trainer at ``on_fit_epoch_end``."""
    losses = trainer.label_loss_items(trainer.tloss, prefix="train") if trainer.tloss is not None else {}
    return contract_metrics(losses, trainer.metrics or {})


def checkpoint_progress(model: Any) -> tuple[int, int, dict[int, dict[str, float]]]:
    """From a loaded ``last.pt``: epochs finished, epochs planned, and each finished
    epoch's contract metrics (from the results table Ultralytics stores in it)."""
    ckpt = getattr(model, "ckpt", None) or {}
    finished = int(ckpt.get("epoch", -1)) + 1
    total = int((ckpt.get("train_args") or {}).get("epochs") or 0)
    table = ckpt.get("train_results") or {}
    rows: dict[int, dict[str, float]] = {}
    for i, epoch in enumerate(table.get("epoch") or []):
        row = {key: values[i] for key, values in table.items() if isinstance(values, list) and i < len(values)}
        with contextlib.suppress(TypeError, ValueError):
            rows[int(epoch)] = contract_metrics(row, row)
    return finished, total, rows


def contract_metrics(losses: dict[str, Any], m: dict[str, Any]) -> dict[str, float]:
    """Ultralytics' names (``train/box_loss``, ``metrics/mAP50(B)``, ...) to the contract's."""
    box = float(losses.get("train/box_loss", 0.0))
    cls = float(losses.get("train/cls_loss", 0.0))
    dfl = float(losses.get("train/dfl_loss", 0.0))
    out = {
        "train_loss": box + cls + dfl,
        "mAP50": float(m.get("metrics/mAP50(B)", 0.0)),
        "box_loss": box,
        "cls_loss": cls,
        "dfl_loss": dfl,
        "mAP50_95": float(m.get("metrics/mAP50-95(B)", 0.0)),
        "precision": float(m.get("metrics/precision(B)", 0.0)),
        "recall": float(m.get("metrics/recall(B)", 0.0)),
    }
    for key in ("val/box_loss", "val/cls_loss", "val/dfl_loss"):
        if key in m:
            out[key.replace("/", "_")] = float(m[key])
    return {k: _round(v) for k, v in out.items()}


def partial(last: dict[str, float]) -> dict[str, float]:
    if not last:
        return {}
    return {"last_loss": last.get("train_loss", 0.0), "last_mAP50": last.get("mAP50", 0.0)}
