"""Plain-text tables of what ``status`` and ``workers`` found (their ``--json`` is the data)."""

from __future__ import annotations

import time
from typing import Any


def format_record(data: dict[str, Any]) -> str:
    """A job record (``ai-service status``), one field a line."""
    rows = [
        ("job", data["job_id"]),
        ("operation", data["op"]),
        ("status", data["status"] + (" (cancel requested)" if data["cancel_requested"] else "")),
        ("attempt", str(data["attempt"])),
        ("owner", data["owner"] or "-"),
        ("lease expires", _lease(data)),
        ("last epoch", str(data["last_epoch"])),
        ("last metrics", _metrics(data["last_metrics"]) or "-"),
        ("checkpoints", ", ".join(f"{k}: {v}" for k, v in sorted(data["checkpoints"].items())) or "-"),
        ("terminal", _terminal(data)),
        ("updated", data["updated_at"] or "-"),
    ]
    return "\n".join(f"{k:<14} {v}" for k, v in rows)


def _lease(data: dict[str, Any]) -> str:
    if not data["lease_expires"]:
        return "-"
    left = data["lease_expires"] - time.time()
    when = f"in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
    return f"{data['lease_expires_at']} ({when})"


def _terminal(data: dict[str, Any]) -> str:
    t = data["terminal"]
    if not t:
        return "-"
    terminal = f"{t.get('type')} ({'sent' if data['terminal_sent'] else 'not confirmed sent yet'})"
    if t.get("error_code"):
        terminal += f": [{t['error_code']}] {t.get('error_message', '')}"
    elif t.get("model_path"):
        terminal += f": {t['model_path']}"
    return terminal


def _metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))


def format_workers(rows: list[dict[str, Any]]) -> str:
    """The workers heard (``ai-service workers``), one a line, columns aligned."""
    table: list[tuple[str, ...]] = [("WORKER", "OP", "STATE", "DEVICE", "JOB", "PROGRESS", "LAST SEEN", "VERSIONS")]
    table.extend(_worker_row(r) for r in rows)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
                     for row in table)


def _worker_row(r: dict[str, Any]) -> tuple[str, ...]:
    device = str(r.get("device") or "?") + (f" ({r['gpu']})" if r.get("gpu") else "")
    job = str(r.get("job_id") or "-")
    if int(r.get("jobs_running") or 0) > 1:
        job += f" (+{int(r['jobs_running']) - 1})"
    progress = r.get("progress")
    versions = r.get("versions")
    versions = versions if isinstance(versions, dict) else {}
    return (
        str(r.get("worker", "?")), str(r.get("operation", "?")), str(r["status"]), device, job,
        f"{progress:.1f}%" if isinstance(progress, (int, float)) else "-", f"{r['age_seconds']:.1f} s ago",
        ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "-",
    )
