"""supervisord's worker programs: the GPU split, detected or given, written as an include.

``supervisord.conf`` holds what never changes (socket, logs, pidfile) and pulls in
``supervisor.d/*.conf``.  ``ai-service supervisor-config`` writes
``supervisor.d/workers.conf``: group ``ai`` and one ``[program:<op>-gpu<n>]`` per
operation and GPU, each pinned with ``CUDA_VISIBLE_DEVICES=<n>`` (with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so that ``<n>`` is the index ``nvidia-smi`` shows).
Without a GPU it writes one ``<op>-cpu0`` of each kind with ``CUDA_VISIBLE_DEVICES=""``.

A GPU list is ``0-3``, ``0,2,5``, ``0-1,6``, ``none`` (no worker of that kind), ``cpu``
(one CPU worker) or ``cpu:N``.  A kind left out gets every visible GPU (``nvidia-smi``;
``CUDA_VISIBLE_DEVICES`` in the generating shell narrows the list), else one CPU worker.

Paths in the include are ``%(here)s/..``: supervisord expands ``%(here)s`` in an included
file to that file's directory, so the include belongs in ``supervisor.d/`` beside
``supervisord.conf`` and the checkout can move.  Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ai_service.errors import GpuListError as GpuListError  # defined in errors.py, importable from here as before
from ai_service.registry import OPERATIONS

OPS = OPERATIONS.names()
#: METRICS_PORT = base + GPU index (or CPU worker number): 91nn, 92nn, 93nn.
METRICS_PORT_BASE = {spec.name: spec.supervision.metrics_port_base for spec in OPERATIONS}
#: HTTP_PORT (the worker's HTTP API, README "HTTP") likewise: 81nn, 82nn, 83nn.
HTTP_PORT_BASE = {spec.name: spec.supervision.http_port_base for spec in OPERATIONS}
MAX_INDEX = 99
#: How long a warm stop may take before supervisord kills (see README "Operations").
STOPWAITSECS = {spec.name: spec.supervision.stop_wait_seconds for spec in OPERATIONS}
STOP_NOTES = {spec.name: spec.supervision.stop_note for spec in OPERATIONS}
DEFAULT_OUTPUT = Path("supervisor.d") / "workers.conf"
NVIDIA_SMI_TIMEOUT = 15.0


@dataclass(frozen=True)
class Placement:
    """Where one operation's workers go: GPU indices, or ``cpu`` CPU-only workers."""

    gpus: tuple[int, ...] = ()
    cpu: int = 0

    def describe(self) -> str:
        if self.cpu:
            return "the CPU" if self.cpu == 1 else f"the CPU ({self.cpu} workers)"
        if not self.gpus:
            return "none"
        return "GPU " + ",".join(map(str, self.gpus)) if len(self.gpus) == 1 else "GPUs " + format_gpus(self.gpus)


CPU_ONLY = Placement(cpu=1)


@dataclass(frozen=True)
class Slot:
    """One worker process."""

    op: str
    gpu: int | None  # None: a CPU worker
    number: int  # the GPU index, or the CPU worker's number

    @property
    def name(self) -> str:
        return f"{self.op}-gpu{self.number}" if self.gpu is not None else f"{self.op}-cpu{self.number}"

    @property
    def cuda_visible_devices(self) -> str:
        return "" if self.gpu is None else str(self.gpu)

    @property
    def metrics_port(self) -> int:
        return METRICS_PORT_BASE[self.op] + self.number

    @property
    def http_port(self) -> int:
        return HTTP_PORT_BASE[self.op] + self.number


def parse_gpus(text: str) -> Placement:
    """``0-3`` / ``0,2,5`` / ``0-1,6`` / ``none`` / ``cpu`` / ``cpu:N`` -> a Placement."""
    value = text.strip().lower()
    if value == "none":
        return Placement()
    if value == "cpu":
        return CPU_ONLY
    match = re.fullmatch(r"cpu:(\d+)", value)
    if match:
        count = int(match.group(1))
        if not 1 <= count <= MAX_INDEX + 1:
            raise GpuListError(f"{text!r}: cpu:N takes 1 to {MAX_INDEX + 1} workers")
        return Placement(cpu=count)
    gpus: set[int] = set()
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise GpuListError(f"{text!r} is not a GPU list: use e.g. 0-3, 0,2,5, none, cpu or cpu:2")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise GpuListError(f"{text!r}: range {first}-{last} runs backwards")
        if last > MAX_INDEX:
            raise GpuListError(f"{text!r}: GPU indices go up to {MAX_INDEX} (METRICS_PORT is 91nn/92nn/93nn)")
        gpus.update(range(first, last + 1))
    return Placement(gpus=tuple(sorted(gpus)))


def format_gpus(gpus: Sequence[int]) -> str:
    """(0, 1, 2, 3, 6) -> ``0-3,6``."""
    runs: list[str] = []
    ordered = sorted(gpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)


@dataclass(frozen=True)
class Detection:
    """The GPUs found on this machine and how."""

    gpus: tuple[int, ...]
    how: str

    @property
    def placement(self) -> Placement:
        return Placement(gpus=self.gpus) if self.gpus else CPU_ONLY


Runner = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=True)
    return done.stdout


def detect_gpus(env: Mapping[str, str] | None = None, run: Runner = _run) -> Detection:
    """The GPU indices ``nvidia-smi`` lists (NVML), narrowed by ``CUDA_VISIBLE_DEVICES``.

    No ``nvidia-smi`` on PATH, or one that fails (no driver): no GPU, CPU-only.
    """
    env = os.environ if env is None else env
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if smi is None:
        return Detection((), "no nvidia-smi on PATH: CPU-only")
    found, problems = _list_gpus(smi, run)
    if not found:
        why = "; ".join(problems) or "it lists no GPU"
        return Detection((), f"nvidia-smi ({smi}): {why}: CPU-only")
    gpus = tuple(i for i in sorted(found) if i <= MAX_INDEX)
    how = f"nvidia-smi lists {len(found)} GPU(s)"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = _visible_indices(visible, found)
        if wanted is None:
            how += f"; CUDA_VISIBLE_DEVICES={visible!r} names devices other than GPUs by index or UUID: ignored"
        else:
            gpus = tuple(i for i in gpus if i in wanted)
            how += f"; CUDA_VISIBLE_DEVICES={visible!r} leaves {len(gpus)}"
            if not gpus:
                how += ": CPU-only"
    return Detection(gpus, how)


def _list_gpus(smi: str, run: Runner) -> tuple[dict[int, str], list[str]]:
    """index -> uuid ("" when unknown) from ``--query-gpu``, else from ``-L``; and what failed."""
    found: dict[int, str] = {}
    problems: list[str] = []
    try:
        for line in run([smi, "--query-gpu=index,uuid,name", "--format=csv,noheader"]).splitlines():
            fields = [f.strip() for f in line.split(",")]
            if fields and fields[0].isdigit():
                found[int(fields[0])] = fields[1] if len(fields) > 1 else ""
    except (OSError, subprocess.SubprocessError) as exc:
        problems.append(f"--query-gpu: {_why(exc)}")
    if found:
        return found, problems
    try:
        for line in run([smi, "-L"]).splitlines():
            match = re.match(r"\s*GPU (\d+):.*?(?:\(UUID: (\S+?)\))?\s*$", line)
            if match:
                found[int(match.group(1))] = match.group(2) or ""
    except (OSError, subprocess.SubprocessError) as exc:
        problems.append(f"-L: {_why(exc)}")
    return found, problems


def _visible_indices(visible: str, found: Mapping[int, str]) -> set[int] | None:
    by_uuid = {uuid: index for index, uuid in found.items() if uuid}
    wanted: set[int] = set()
    for token in (t.strip() for t in visible.split(",")):
        if not token:
            continue
        if token.isdigit():
            wanted.add(int(token))
        elif token in by_uuid:
            wanted.add(by_uuid[token])
        else:
            match = [index for uuid, index in by_uuid.items() if token.startswith("GPU-") and uuid.startswith(token)]
            if len(match) != 1:
                return None
            wanted.add(match[0])
    return wanted


def _why(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        text = (exc.stderr or exc.stdout or "").strip().splitlines()
        return f"exit {exc.returncode}" + (f" ({text[0]})" if text else "")
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"no answer within {exc.timeout:.0f} s"
    return str(exc)


def slots(layout: Mapping[str, Placement]) -> list[Slot]:
    """Every process of ``layout``, in OPS order, then by GPU."""
    out: list[Slot] = []
    for op in OPS:
        placement = layout.get(op, Placement())
        if placement.cpu:
            out.extend(Slot(op, None, n) for n in range(placement.cpu))
        else:
            out.extend(Slot(op, gpu, gpu) for gpu in placement.gpus)
    return out


HEADER = """\
; Generated by `ai-service supervisor-config` -- do not edit; rerun it to change the split:
;   .venv/bin/ai-service supervisor-config --train-gpus 0-3 --infer-gpus 4-7 --convert-gpus 4
;   .venv/bin/supervisorctl -c supervisord.conf reread && .venv/bin/supervisorctl -c supervisord.conf update
; (`update` restarts group ai, each worker stopping warmly.)  See README "Operations".
;
; {how}
{placements}
;
; %(here)s is this file's directory (supervisor.d/): %(here)s/.. is the checkout.
; Worker <op>-gpu<n> sees only GPU n (CUDA_VISIBLE_DEVICES=n, nvidia-smi's numbering);
; <op>-cpu<n> sees none (CUDA_VISIBLE_DEVICES=""). WORKER_NAME=<host>/<process>.
; exit 0: done (or messaging disabled); exit 2: configuration error -- restarting cannot help.
"""

PROGRAM = """\
[program:{name}]
command=%(here)s/../.venv/bin/ai-service worker {op}
process_name=%(program_name)s
numprocs=1
directory=%(here)s/..
environment=CUDA_VISIBLE_DEVICES="{cuda}",CUDA_DEVICE_ORDER="PCI_BUS_ID",METRICS_PORT="{port}",\
HTTP_PORT="{http_port}",WORKER_NAME="%(host_node_name)s/%(program_name)s",PYTHONUNBUFFERED="1"
autorestart=unexpected
exitcodes=0,2
startsecs=5
startretries=5
stopsignal=TERM
; {stop_note}
stopwaitsecs={stopwaitsecs}
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=%(here)s/../logs/%(program_name)s.log
stdout_logfile_maxbytes=50MB
stdout_logfile_backups=10
"""


def render(layout: Mapping[str, Placement], how: str) -> str:
    """The include: group ``ai`` and one program per slot."""
    processes = slots(layout)
    if not processes:
        raise GpuListError("nothing to run: every operation is `none`")
    placements = "\n".join(f"; {op + ':':<8} {layout.get(op, Placement()).describe()}" for op in OPS)
    parts = [HEADER.format(how=how, placements=placements)]
    parts.append("[group:ai]\nprograms=" + ",".join(s.name for s in processes) + "\n")
    for slot in processes:
        parts.append(PROGRAM.format(name=slot.name, op=slot.op, cuda=slot.cuda_visible_devices,
                                    port=slot.metrics_port, http_port=slot.http_port, stop_note=STOP_NOTES[slot.op],
                                    stopwaitsecs=STOPWAITSECS[slot.op]))
    return "\n".join(parts)


def build_layout(given: Mapping[str, Placement | None],
                 detect: Callable[[], Detection] = detect_gpus) -> tuple[dict[str, Placement], str]:
    """Each operation's placement: as given, else every detected GPU (or the CPU)."""
    missing = [op for op in OPS if given.get(op) is None]
    layout = {op: p for op, p in given.items() if p is not None}
    if not missing:
        return layout, "GPU split given on the command line"
    found = detect()
    for op in missing:
        layout[op] = found.placement
    kept = [op for op in OPS if op not in missing]
    how = f"detected: {found.how}"
    if kept:
        how += f" (given on the command line: {', '.join(kept)})"
    return layout, how


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
