"""The soak's report: docs/RELIABILITY.md's Markdown from the sections' Parts and the run's
meta (date, machine, versions, load), and the JSON result ``--json`` writes and ``--from-json``
reads back."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import REPO
from soak.world import Part

#: where a full run (and --from-json without --report) writes the report
DEFAULT_REPORT = REPO / "docs" / "RELIABILITY.md"


def report(parts: list[Part], meta: dict[str, Any]) -> str:
    """The Markdown: the run's header and verdict, then one section a Part, one figure a line."""
    failures = [f for p in parts for f in p.failures]
    m, v, load = meta["machine"], meta["versions"], meta["load"]
    busy = load["at_start_1_5_15"][0] > 0.5  # during the run, the load is mostly the soak's own
    out = [
        "# Reliability",
        "",
        f"Measured by `make soak` (`python -m soak.run{' --short' if meta['short'] else ''}`): real worker "
        "processes, the real RabbitMQ, real Ultralytics on the CPU. Each line is one figure. `make soak` exits "
        "non-zero when anything was lost, a worker crashed, a hostile payload ran code or the contract was "
        "broken (a job not completed, a second terminal message, an epoch not announced exactly once and in "
        "order); `make test` runs the short version (tests/test_soak.py).",
        "",
        f"- **Date:** {meta['date']} ({'short' if meta['short'] else 'full'} run, {meta['seconds'] / 60:.1f} min, "
        f"seed {meta['seed']})",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['gpu']}",
        "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- **Load:** 1-minute load average {load['at_start_1_5_15'][0]} before the run, median "
        f"{load['during_median']} and max {load['during_max']} during it."
        + (" The machine was not idle when the run began." if busy else ""),
        "- **Verdict:** "
        + ("PASS — nothing lost, no worker crashed, no payload ran, the contract held" if not failures else "FAIL"),
        "",
    ]
    for p in parts:
        out += [f"## {p.title}", ""]
        if p.skipped:
            out += [f"- skipped: {p.skipped}", ""]
            continue
        out += [f"- {line}" for line in p.lines]
        out += [f"- **failure:** {f}" for f in p.failures]
        out += [f"- **finding:** {f}" for f in p.findings]
        out += [f"- note: {n}" for n in p.notes]
        out += [f"- ({p.seconds:.0f} s)", ""]
    return "\n".join(out)


def publish(parts: list[Part], meta: dict[str, Any], target: Path | None, json_path: str | None) -> int:
    """Write the report to ``target`` (if any) and the figures to ``json_path`` (if any), print the
    report; the exit status: 1 when any section failed."""
    text = report(parts, meta)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"soak: wrote {target}", file=sys.stderr)
    failures = [f for p in parts for f in p.failures]
    summary = {**meta, "failures": failures, "lost": sum(p.lost for p in parts),
               "crashes": sum(p.crashes for p in parts),
               "parts": [{k: v for k, v in asdict(p).items()} for p in parts]}
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1, default=str))
    print(text)
    return 1 if failures else 0


def rewrite(result: str, target: str | None) -> int:
    """``--from-json``: the report of a saved ``--json`` result, without running anything."""
    saved = json.loads(Path(result).read_text())
    meta = {k: saved[k] for k in ("date", "short", "seed", "seconds", "machine", "versions", "load")}
    meta["machine"].setdefault("gpu", "no GPU (everything ran on the CPU)")
    out = Path(target) if target else DEFAULT_REPORT
    out.write_text(report([Part(**p) for p in saved["parts"]], meta))
    print(f"soak: wrote {out} from {result}", file=sys.stderr)
    return 1 if saved["failures"] else 0
