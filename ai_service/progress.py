"""Human-readable progress of one job, from the messages the service publishes.

On a terminal, training shows one live line redrawn with a carriage return::

    epoch 3/10 [#####-------------]  30%  loss 1.2345  mAP50 0.4560  ETA 0:00:42

Anywhere else (a pipe, a CI log) every update is one plain line.  The terminal
message ends with a one-line summary.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

BAR_WIDTH = 20


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_size(size: Any) -> str:
    if not isinstance(size, (int, float)):
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"  # pragma: no cover


def bar(progress: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, round(progress / 100.0 * width)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "?"


class ProgressView:
    """Renders one job's messages on ``stream`` (a live line when ``live``)."""

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self.stream = stream
        self.live = live
        self._line = ""  # the live line currently drawn
        self._eta_at: tuple[float, float] | None = None  # (eta seconds, when received)
        self._epoch_started: float | None = None
        self._epoch_times: list[float] = []
        self._epoch_base = ""

    # --- output ------------------------------------------------------------------------

    def _draw(self, text: str) -> None:
        if self.live:
            self.stream.write("\r" + text + "\x1b[K")
            self._line = text
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        """A permanent line (a live line in progress is finished first)."""
        self._end_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self.live and self._line:
            self.stream.write("\n")
            self._line = ""

    def close(self) -> None:
        self._end_line()
        self.stream.flush()

    # --- messages ----------------------------------------------------------------------

    def show(self, message: dict[str, Any]) -> None:
        kind = str(message.get("type", ""))
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(message)
        else:
            self.say(f"{kind or 'message'}: {message.get('status', '')}".rstrip(": "))

    def tick(self) -> None:
        """Redraw the live line (the ETA counts down between epochs)."""
        if self.live and self._line.startswith("epoch") and self._eta_at is not None:
            self._draw(self._epoch_line_with_eta())

    # training

    def _on_training_started(self, m: dict[str, Any]) -> None:
        resumed = m.get("resumed_from_epoch") or 0
        where = f" on {m['worker']}" if m.get("worker") else ""
        extra = f", resumed from epoch {resumed}" if resumed else ""
        self.say(f"training started{where} ({m.get('total_epochs', '?')} epochs{extra})")
        self._epoch_started = time.monotonic()
        if self.live:
            self._draw(f"epoch {resumed}/{m.get('total_epochs', '?')} {bar(0)}   0%  waiting for the first epoch...")

    def _on_epoch_update(self, m: dict[str, Any]) -> None:
        now = time.monotonic()
        current, total = m.get("current_epoch", 0), m.get("total_epochs", 0)
        if self._epoch_started is not None:
            self._epoch_times.append(now - self._epoch_started)
        self._epoch_started = now
        eta = m.get("eta_seconds")
        if not isinstance(eta, (int, float)) and self._epoch_times and isinstance(total, int):
            recent = self._epoch_times[-5:]
            eta = sum(recent) / len(recent) * max(0, total - int(current))
        self._eta_at = (float(eta), now) if isinstance(eta, (int, float)) else None
        metrics = m.get("metrics") or {}
        loss = metrics.get("train_loss")
        progress = float(m.get("progress", 0.0) or 0.0)
        self._epoch_base = (
            f"epoch {current}/{total} {bar(progress)} {progress:3.0f}%  "
            f"loss {_num(loss)}  mAP50 {_num(metrics.get('mAP50'))}"
        )
        self._draw(self._epoch_line_with_eta())

    def _epoch_line_with_eta(self) -> str:
        if self._eta_at is None:
            return self._epoch_base
        eta, since = self._eta_at
        return f"{self._epoch_base}  ETA {format_duration(max(0.0, eta - (time.monotonic() - since)))}"

    def _on_training_completed(self, m: dict[str, Any]) -> None:
        final = m.get("final_metrics") or {}
        self.say(
            f"training completed in {format_duration(m.get('training_time'))}: {m.get('model_path')} "
            f"(mAP50 {_num(final.get('final_mAP50'))}, loss {_num(final.get('final_loss'))}, "
            f"{final.get('training_epochs', '?')} epochs)"
        )

    def _on_training_failed(self, m: dict[str, Any]) -> None:
        self.say(f"training failed at epoch {m.get('current_epoch', 0)}: "
                 f"[{m.get('error_code')}] {m.get('error_message')}")

    def _on_training_cancelled(self, m: dict[str, Any]) -> None:
        checkpoint = m.get("checkpoint_path")
        where = f"; last checkpoint {checkpoint}" if checkpoint else ""
        self.say(f"training cancelled at epoch {m.get('current_epoch', 0)}{where}")

    # conversion

    def _on_conversion_started(self, m: dict[str, Any]) -> None:
        where = f" on {m['worker']}" if m.get("worker") else ""
        self.say(f"conversion started{where}: {', '.join(map(str, m.get('formats') or []))}")

    def _on_conversion_update(self, m: dict[str, Any]) -> None:
        progress = float(m.get("progress", 0.0) or 0.0)
        art = m.get("artifact") or {}
        detail = ""
        if art:
            verified = "verified" if art.get("verified") else "not verified"
            detail = f" -> {art.get('path')} ({format_size(art.get('size_bytes'))}, {verified})"
        self.say(f"format {m.get('current_format')} done {bar(progress)} {progress:3.0f}%{detail}")

    def _on_conversion_completed(self, m: dict[str, Any]) -> None:
        arts = m.get("artifacts") or []
        self.say(f"conversion completed in {format_duration(m.get('conversion_time'))}: {len(arts)} artifact(s)")
        for art in arts:
            self.say(f"  {art.get('format')}: {art.get('path')} ({format_size(art.get('size_bytes'))})")

    def _on_conversion_failed(self, m: dict[str, Any]) -> None:
        fmt = f" ({m['failed_format']})" if m.get("failed_format") else ""
        self.say(f"conversion failed{fmt}: [{m.get('error_code')}] {m.get('error_message')}")

    def _on_conversion_cancelled(self, m: dict[str, Any]) -> None:
        self.say(f"conversion cancelled ({len(m.get('artifacts') or [])} artifact(s) done before)")

    # inference

    def _on_inference_completed(self, m: dict[str, Any]) -> None:
        results = m.get("results") or []
        detections = sum(len(r.get("detections") or []) for r in results if isinstance(r, dict))
        self.say(f"inference completed: {len(results)} image(s), {detections} detection(s) "
                 f"in {_num(m.get('inference_time_ms'), 1)} ms")

    def _on_inference_failed(self, m: dict[str, Any]) -> None:
        self.say(f"inference failed: [{m.get('error_code')}] {m.get('error_message')}")
