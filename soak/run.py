"""``make soak``: a bounded fault run against real worker processes.

    python -m soak.run              # full (~10 min on 2 cores), writes docs/RELIABILITY.md
    python -m soak.run --short      # ~2 min, what `make test` runs (tests/test_soak.py)

Sections, each with its own queue names on the shared RabbitMQ (127.0.0.1:5672, never
restarted or reconfigured) and local storage in a temp dir:

1. ``kill``: N short training jobs while workers are SIGKILLed at random moments and
   restarted at once (``LEASE_SECONDS=4``);
2. ``proxy``: a TCP proxy between the workers and RabbitMQ cuts every connection every
   few seconds during training and inference load;
3. ``restart``: a private RabbitMQ node (port 5673, :func:`tests.support.rabbit.private_broker`)
   is restarted under inference (and, in full mode, training) load;
4. ``corpus``: malformed and hostile requests (:mod:`soak.corpus`) to all three request
   queues;
5. ``sustained``: inference at a fixed rate;
6. ``cluster``: a private three-node cluster (:mod:`tests.support.cluster`, ports
   5690-5692) loses a node again and again under training and inference load: kill -9
   of the node a worker is on, of the node leading the request queue, a clean stop; lost,
   duplicated, and how soon each worker consumes again.  ``--short`` leaves it out
   (``tests/test_cluster.py`` is the short version in ``make test``); ``--only cluster``
   runs it alone.

Workers are :mod:`bench.instrumented` (the real worker with a journal of what it
publishes).  Exits 1 when anything was lost, a worker crashed, a payload ran code, or
the contract was broken (a job not completed, a second terminal message, an epoch not
announced exactly once and in order, a hostile message handled otherwise); 2
when the run could not be set up.  Every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import LoadSampler, machine, now_utc, versions
from soak.harness import Harness
from soak.report import DEFAULT_REPORT, publish, report, rewrite
from soak.sections.cluster import cluster_section
from soak.sections.corpus import corpus_section, stall_lines
from soak.sections.kills import kill_section
from soak.sections.proxy import proxy_section
from soak.sections.restart import restart_section
from soak.sections.sustained import sustained_section
from soak.world import Config, Part, World, stop_lines

__all__ = ["SECTIONS", "SHORT_SECTIONS", "Config", "Part", "World", "corpus_and_load", "main", "report"]


def corpus_and_load(world: World) -> list[Part]:
    """Sections 4 and 5 on one set of workers: the hostile corpus, then sustained load on the
    workers that just took it."""
    h = Harness(world.root, "corpus", storage_dir=world.storage, env={"LEASE_SECONDS": "10"})
    try:
        for op in ("train", "convert", "infer"):
            h.worker(op, op, wait=False)
        h.wait_started(["train", "convert", "infer"])
        parts = [corpus_section(world, h)]
        stall_lines(world, h, parts[0])
        parts.append(sustained_section(world, h))
        stop_lines(parts[-1], h)
        return parts
    finally:
        h.close()


SECTIONS: dict[str, Callable[[World], list[Part]]] = {
    "kill": lambda w: [kill_section(w)],
    "proxy": lambda w: [proxy_section(w)],
    "restart": lambda w: [restart_section(w)],
    "corpus": corpus_and_load,
    "cluster": lambda w: [cluster_section(w)],
}
#: what --short runs without --only: the cluster section is left to tests/test_cluster.py there
SHORT_SECTIONS = [name for name in SECTIONS if name != "cluster"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m soak.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="the ~2-minute version `make test` runs")
    parser.add_argument("--seed", type=int, default=None, help="random seed (kill and cut times)")
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--report", help="write the report here (default: docs/RELIABILITY.md for a full run, "
                                         "nothing for --short)")
    parser.add_argument("--json", help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, journals)")
    parser.add_argument("--from-json", metavar="RESULT", help="run nothing: write the report of a --json result "
                                                              "(to --report, default docs/RELIABILITY.md)")
    return parser


def run_section(world: World, name: str) -> list[Part]:
    """One entry of SECTIONS, timed and echoed to stderr; a section that raises becomes a failed Part."""
    t0 = time.monotonic()
    print(f"soak: {name} ...", file=sys.stderr, flush=True)
    try:
        done = SECTIONS[name](world)
    except Exception as exc:  # noqa: BLE001, RUF100 - report and go on with the next section
        traceback.print_exc()
        broken = Part(name, name)
        broken.fail(f"the section itself failed: {type(exc).__name__}: {exc}")
        done = [broken]
    for part in done:
        part.seconds = time.monotonic() - t0
        for line in part.lines + [f"FAILURE: {f}" for f in part.failures] + \
                [f"finding: {f}" for f in part.findings]:
            print(f"soak: [{part.key}] {line}", file=sys.stderr, flush=True)
    return done


def run_sections(cfg: Config, chosen: list[str], keep: bool) -> list[Part] | None:
    """The chosen sections in order in one temp dir (removed unless ``keep``); None when the
    World could not even be set up."""
    parts: list[Part] = []
    root = Path(tempfile.mkdtemp(prefix="ai-soak-"))
    try:
        try:
            world = World(root, cfg)
        except Exception:  # noqa: BLE001, RUF100 - could not even set up
            traceback.print_exc()
            return None
        for name in chosen:
            parts += run_section(world, name)
    finally:
        if keep:
            print(f"soak: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        return rewrite(args.from_json, args.report)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    cfg = Config.make(args.short, seed)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SHORT_SECTIONS if args.short
                                                                                else SECTIONS)
    if set(chosen) - set(SECTIONS):
        parser.error(f"unknown section(s); choose from {', '.join(SECTIONS)}")
    sampler = LoadSampler()
    date = now_utc()
    began = time.monotonic()
    parts = run_sections(cfg, chosen, args.keep)
    if parts is None:
        return 2
    meta = {"date": date.strftime("%Y-%m-%d %H:%M UTC"), "short": cfg.short, "seed": seed,
            "seconds": time.monotonic() - began, "machine": machine(), "versions": versions(),
            "load": sampler.stop()}
    target = Path(args.report) if args.report else (None if cfg.short or args.only else DEFAULT_REPORT)
    return publish(parts, meta, target, args.json)


if __name__ == "__main__":
    sys.exit(main())
