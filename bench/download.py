"""Dataset download: the service's S3 prefix sync vs ``aws s3 sync``, cold and cached.

One generated shapes dataset (``TRAIN`` + ``VAL`` PNG images of ``SIZE`` px and their
label files, a few tens of MB) is uploaded to the SeaweedFS bucket.  Then, each in a
fresh process (what a worker or an operator pays):

* the service: :func:`ai_service.storage.sync_prefix_report` into an empty cache
  directory (cold), then again into the same one (cached: one listing, nothing
  downloaded);
* ``aws s3 sync s3://<bucket>/<prefix> <dir> --endpoint-url ...`` into an empty
  directory, then again (it compares size and modification time).

Timed from process spawn to exit; :mod:`bench.sync_probe` also reports the time spent
inside the sync call itself.  The cached runs also give each process's CPU (user + system,
``getrusage`` of the child), which queueing for a core on a loaded machine moves less
than wall time.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import run_module
from bench.context import Bench, Section

PREFIX = "datasets/bench-download/"
SIZE = 320


def sizes(quick: bool) -> tuple[int, int]:
    return (160, 40) if quick else (400, 100)


def files_in(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def children_cpu() -> float:
    """User + system CPU of the waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def service_sync(bench: Bench, cache: Path) -> tuple[float, float, float, int, float]:
    """Wall, inside the call, setup, objects downloaded and process CPU of one fresh-process sync."""
    env = {**os.environ, **bench.s3.env(), "S3_BUCKET": bench.bucket}
    cpu = children_cpu()
    started = time.perf_counter()
    out = run_module("bench.sync_probe", PREFIX, str(cache), env=env, timeout=600)
    wall = time.perf_counter() - started
    cpu = children_cpu() - cpu
    if out.returncode != 0:
        raise RuntimeError(f"sync_probe failed: {out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return wall, float(info["sync_s"]), float(info["setup_s"]), int(info["downloaded"]), cpu


def ratios(service: list[float], aws: list[float], name: str) -> dict[str, Any]:
    """``name``: the service's median ÷ the CLI's (goal ≤ ×0.6 cold, ≤ ×0.5 warm), and each round's own ratio."""
    if not service or not aws:
        return {name: None}
    return {name: statistics.median(service) / statistics.median(aws),
            f"{name}_per_round": [round(s / a, 3) for s, a in zip(service, aws, strict=False)]}


def aws_sync(bench: Bench, dest: Path) -> tuple[float, float]:
    """Wall and process CPU of one ``aws s3 sync``."""
    assert bench.aws is not None
    env = {**os.environ, **bench.s3.env(), "AWS_EC2_METADATA_DISABLED": "true"}
    cpu = children_cpu()
    started = time.perf_counter()
    out = subprocess.run([bench.aws, "s3", "sync", f"s3://{bench.bucket}/{PREFIX}", str(dest), "--endpoint-url",
                          bench.s3.endpoint_url, "--only-show-errors", "--no-progress"], env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    wall = time.perf_counter() - started
    cpu = children_cpu() - cpu
    if out.returncode != 0:
        raise RuntimeError(f"aws s3 sync failed ({out.returncode}): {out.stderr[-2000:]}")
    return wall, cpu


def run(bench: Bench) -> list[Section]:
    from ai_service.shapes import generate_shapes_dataset

    n_train, n_val = sizes(bench.quick)
    root = bench.path("download-dataset")
    generate_shapes_dataset(root, n_train=n_train, n_val=n_val, size=SIZE, seed=7)
    count, total = files_in(root)
    bench.storage().upload_dir(root, PREFIX.rstrip("/"))
    section = Section("download", f"Dataset download from SeaweedFS S3 ({count} objects, {total / 2**20:.1f} MiB)")
    aws_cold = section.figure("aws_cold", "aws s3 sync, empty directory (process wall)", "s")
    svc_cold = section.figure("service_cold", "service sync_prefix, empty cache (process wall)", "s",
                              baseline="aws_cold")
    svc_cold_in = section.figure("service_cold_call", "  … of which inside sync_prefix_report()", "s")
    svc_setup = section.figure("service_setup", "  … of which importing storage + making the S3 client (each run)", "s")
    aws_warm = section.figure("aws_warm", "aws s3 sync, second run (nothing changed)", "s")
    svc_warm = section.figure("service_warm", "service sync_prefix, second run (cache hit)", "s",
                              baseline="aws_warm")
    svc_warm_in = section.figure("service_warm_call", "  … of which inside sync_prefix_report()", "s")
    aws_warm_cpu = section.figure("aws_warm_cpu", "aws s3 sync, second run: process CPU (user + sys)", "s")
    svc_warm_cpu = section.figure("service_warm_cpu", "service sync_prefix, second run: process CPU (user + sys)",
                                  "s", baseline="aws_warm_cpu")
    repeats = bench.repeats + (0 if bench.quick else 2)
    for r in range(repeats):
        order = ("svc", "aws") if r % 2 == 0 else ("aws", "svc")
        for which in order:
            if which == "svc":
                cache = bench.root / f"sync-cache-{r}"
                wall, inside, setup, downloaded, _ = service_sync(bench, cache)
                if downloaded != count:
                    raise RuntimeError(f"the service downloaded {downloaded} of {count} objects")
                svc_cold.add(wall)
                svc_cold_in.add(inside)
                svc_setup.add(setup)
                wall, inside, setup, downloaded, cpu = service_sync(bench, cache)
                if downloaded != 0:
                    raise RuntimeError(f"the cached sync downloaded {downloaded} objects again")
                svc_warm.add(wall)
                svc_warm_cpu.add(cpu)
                svc_warm_in.add(inside)
                svc_setup.add(setup)
                shutil.rmtree(cache, ignore_errors=True)
            elif bench.aws is not None:
                dest = bench.root / f"aws-{r}"
                aws_cold.add(aws_sync(bench, dest)[0])
                got, _ = files_in(dest)
                if got != count:
                    raise RuntimeError(f"aws s3 sync fetched {got} of {count} objects")
                wall, cpu = aws_sync(bench, dest)
                aws_warm.add(wall)
                aws_warm_cpu.add(cpu)
                shutil.rmtree(dest, ignore_errors=True)
    section.extra = ratios(svc_cold.values, aws_cold.values, "download_cold_ratio")
    section.extra.update(ratios(svc_warm.values, aws_warm.values, "download_warm_ratio"))
    section.extra.update(ratios(svc_warm_cpu.values, aws_warm_cpu.values, "download_warm_cpu_ratio"))
    section.notes += [
        f"{n_train} train + {n_val} val PNG images of {SIZE} px with their label files and data.yaml; "
        f"{repeats} runs of each, alternating which goes first.",
        "Both run as a fresh process (Python start-up included: the service's probe imports the storage "
        "module, the CLI awscli and botocore). The S3 configuration is environment variables only, so the "
        "service signs its requests itself (ai_service/storage/sigv4.py, botocore's URLs byte for byte) and "
        "never imports botocore (ai_service/storage/env_config.py says when that is safe; otherwise botocore "
        "is made as before). It downloads from one thread: an asyncio loop keeps 8 keep-alive connections "
        "busy (TRANSFER_WORKERS), each body checked against the object's CRC32; the CLI runs 10 threads (its "
        "default max_concurrent_requests) through s3transfer. See docs/perf-sync.md for where the time goes.",
        "The cached run: the service lists the prefix (presigned ListObjectsV2 GETs parsed by ElementTree) and "
        "compares ETag and size with its manifest, which it leaves untouched; aws s3 sync lists it and compares "
        "size and modification time. Process CPU is getrusage of the child process.",
    ]
    if bench.aws is None:
        section.notes.append("awscli was not installed: the aws rows are empty (make bench installs it).")
    return [section]
