"""Section 5, ``sustained``: inference at a fixed rate, with the latency and the inference
worker's memory over the run."""

from __future__ import annotations

import time

from bench.common import percentile, rss_mib
from soak.harness import Harness
from soak.load import InferLoad
from soak.world import IMGSZ_INFER, Part, World, crash_lines


def sustained_section(world: World, h: Harness) -> Part:
    """Inference at ``sustained_rate`` on the corpus section's workers: latency, and whether the
    inference worker's memory grows."""
    cfg = world.cfg
    part = Part("sustained", f"Sustained inference load ({cfg.sustained_rate:g} requests/s for "
                             f"{cfg.sustained_seconds:g} s, one {IMGSZ_INFER} px image each)")
    proc = h.procs["infer"]
    rss_start = rss_mib(proc.pid)
    samples = [rss_start]
    load = InferLoad(world, h, cfg.sustained_rate, "sust").start()
    began = time.monotonic()
    while time.monotonic() - began < cfg.sustained_seconds:
        time.sleep(min(5.0, cfg.sustained_seconds / 4))
        samples.append(rss_mib(proc.pid))
    load.stop()
    sent_in = time.monotonic() - began
    load.wait_answered(120)
    rss_end = rss_mib(proc.pid)
    latencies = load.lines(part)
    part.add(f"achieved send rate: {len(load.sent) / sent_in:.1f} requests/s")
    if latencies:
        part.add(f"latency (publish → answer): p50 {percentile(latencies, 50):.0f} ms, p99 "
                 f"{percentile(latencies, 99):.0f} ms, max {max(latencies):.0f} ms")
    part.add(f"inference worker RSS: {rss_start:.0f} MiB at the start, {rss_end:.0f} MiB at the end, max "
             f"{max([*samples, rss_end]):.0f} MiB")
    crash_lines(part, h)
    part.data.update({"sent": len(load.sent), "p99_ms": percentile(latencies, 99) if latencies else None,
                      "rss_start": rss_start, "rss_end": rss_end})
    return part

