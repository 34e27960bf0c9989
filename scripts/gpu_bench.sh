#!/usr/bin/env bash
# GPU figures of issue 14, in one run on a GPU server (docs/PERFORMANCE.md "GPU figures").
#
#   scripts/gpu_bench.sh [OUTPUT_DIR]        # default: bench/results/gpu-<UTC date>
#
# Writes into OUTPUT_DIR:
#   hardware.txt        nvidia-smi, CPU, torch/CUDA/TensorRT versions
#   training.json       make bench's training section on the GPU at 640 px: training_ratio (fresh
#                       worker through the service ÷ the fastest direct Ultralytics run), breakdown
#   publisher.json      make bench's publisher section (confirmed msg/s, the service vs pika)
#   inference.json      make bench's inference section with the worker on the GPU (service figures;
#                       its raw rows are bench/raw_infer.py's CPU baseline at bench/inference.py's size)
#   raw_predict.jsonl   raw predict at 640 px on the GPU, .pt and TensorRT engine (FP16), batch sizes
#                       1/8/32: img/s and ms per batch (the limit the service is measured against)
#   summary.txt         one line per figure, for docs/PERFORMANCE.md
#
# Needs the venv (make install), RabbitMQ on 127.0.0.1:5672 (scripts/ensure-rabbitmq.sh starts it),
# SeaweedFS `weed` in the venv, and one visible CUDA GPU (pin one with CUDA_VISIBLE_DEVICES).
# Knobs: EPOCHS (training, default 10), IMGSZ (default 640), QUICK=1 (BENCH_QUICK: fewer repeats),
# SKIP="training inference" (sections to leave out).  Exit status: 0 when every section ran.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
OUTDIR="${1:-$ROOT/bench/results/gpu-$(date -u +%Y-%m-%dT%H-%M-%S)}"
EPOCHS="${EPOCHS:-10}"
IMGSZ="${IMGSZ:-640}"
SKIP="${SKIP:-}"
export BENCH_QUICK="${QUICK:-0}"
mkdir -p "$OUTDIR"
failed=0

log() { printf '[gpu_bench] %s\n' "$*" >&2; }
skipped() { [[ " $SKIP " == *" $1 "* ]]; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    log "no GPU: nvidia-smi is missing or lists none"; exit 2
fi
[[ -x "$PY" ]] || { log "no venv at $ROOT/.venv (make install)"; exit 2; }
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { log "torch sees no CUDA device"; exit 2; }
bash "$ROOT/scripts/ensure-rabbitmq.sh" >&2 || { log "RabbitMQ is not reachable"; exit 2; }

# --- hardware ------------------------------------------------------------------------------------
{
    date -u +"date: %Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
    "$PY" - <<'EOF'
import importlib.util, torch, ultralytics
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("ultralytics", ultralytics.__version__)
if importlib.util.find_spec("tensorrt"):
    import tensorrt
    print("tensorrt", tensorrt.__version__)
else:
    print("tensorrt: not installed (engine rows are skipped)")
EOF
} > "$OUTDIR/hardware.txt" 2>&1
cat "$OUTDIR/hardware.txt" >&2

# make bench's sections, one results file each (bench.run writes bench/results/<date>.json)
bench_section() {  # name, extra env...
    local name="$1"; shift
    log "bench section $name"
    local marker; marker="$(mktemp)"
    if env "$@" "$PY" -m bench.run --only "$name" --no-docs >"$OUTDIR/$name.log" 2>&1; then
        local newest
        newest="$(find "$ROOT/bench/results" -maxdepth 1 -name '*.json' ! -name '*.partial.json' -newer "$marker" \
                  | sort | tail -1)"
        [[ -n "$newest" ]] && cp "$newest" "$OUTDIR/$name.json"
    else
        log "section $name failed (see $OUTDIR/$name.log)"; failed=1
    fi
    rm -f "$marker"
}

skipped training || bench_section training BENCH_DEVICE=cuda BENCH_TRAIN_IMGSZ="$IMGSZ" BENCH_TRAIN_EPOCHS="$EPOCHS"
skipped publisher || bench_section publisher
skipped inference || bench_section inference DEVICE=cuda

# --- raw predict on the GPU: .pt and TensorRT engine, batch sizes ---------------------------------
if ! skipped raw_predict; then
    log "raw predict at $IMGSZ px (.pt, engine)"
    IMGSZ="$IMGSZ" "$PY" - >"$OUTDIR/raw_predict.jsonl" 2>"$OUTDIR/raw_predict.log" <<'EOF' || { log "raw predict failed"; failed=1; }
import importlib.util, json, os, tempfile, time
from pathlib import Path

import numpy as np

from workers import yolo

imgsz = int(os.environ["IMGSZ"])
work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
yolo.prepare_ultralytics(work / "yolo")
import torch
from ultralytics import YOLO

model = YOLO("yolov8n.yaml")  # untrained: the speed does not depend on the weights
pt = work / "model.pt"
model.save(str(pt))
formats = {"pt": str(pt)}
if importlib.util.find_spec("tensorrt"):
    formats["engine"] = YOLO(str(pt)).export(format="engine", half=True, imgsz=imgsz, device=0, batch=32,
                                             dynamic=True, verbose=False)
rng = np.random.default_rng(0)
images = [rng.integers(0, 255, (imgsz, imgsz, 3), dtype=np.uint8) for _ in range(64)]
for fmt, path in formats.items():
    m = YOLO(path, task="detect")
    for batch in (1, 8, 32):
        kwargs = {"imgsz": imgsz, "device": 0, "verbose": False, "half": fmt == "engine", "batch": batch}
        m.predict(images[:batch], **kwargs)  # warm-up (engine build, cudnn autotune)
        torch.cuda.synchronize()
        rounds, n = max(3, 96 // batch), 0
        began = time.perf_counter()
        for i in range(rounds):
            m.predict(images[(i * batch) % 32:(i * batch) % 32 + batch], **kwargs)
            n += batch
        torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        print(json.dumps({"format": fmt, "imgsz": imgsz, "batch": batch, "img_per_s": round(n / seconds, 1),
                          "ms_per_batch": round(1000 * seconds / rounds, 2),
                          "gpu_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20)}), flush=True)
EOF
fi

# --- summary -------------------------------------------------------------------------------------
OUTDIR="$OUTDIR" "$PY" - >"$OUTDIR/summary.txt" <<'EOF'
import json, os
from pathlib import Path

out = Path(os.environ["OUTDIR"])
for name in ("training", "publisher", "inference"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name}: not measured")
        continue
    for section in json.loads(path.read_text())["sections"]:
        if section.get("extra"):
            print(f"{section['key']}: {json.dumps(section['extra'])}")
        for fig in section["figures"]:
            print(f"{section['key']}.{fig['key']}: {fig['median']} {fig['unit']}  ({fig['name'].strip()})")
raw = out / "raw_predict.jsonl"
for line in raw.read_text().splitlines() if raw.exists() else []:
    print("raw_predict:", line)
EOF
cat "$OUTDIR/summary.txt"
log "figures in $OUTDIR"
exit "$failed"
