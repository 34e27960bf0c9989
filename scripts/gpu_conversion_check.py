"""GPU check of the conversion worker's export path (issue 5), for a machine with CUDA.

Exports ``engine`` (TensorRT) and ``onnx`` with ``half=true`` on the first visible GPU,
verifies both against the ``.pt`` exactly as the worker does (same tolerances, same
sample images), and prints sizes, export times and verification results as JSON lines.

    python scripts/gpu_conversion_check.py [model.pt] [--imgsz 640]

Without a model it builds an untrained yolov8n from its yaml (verification then
compares raw head outputs, since an untrained model detects nothing).  Exits 0 when
both formats exported and verified, 1 otherwise.  Needs no broker and no storage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a trained .pt (default: untrained yolov8n from yaml)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    args = parser.parse_args(argv)

    from ai_service.messages import ConversionRequest
    from workers import conversion, yolo

    work = Path(tempfile.mkdtemp(prefix="gpu-conversion-"))
    yolo.prepare_ultralytics(work / "yolo")
    conversion.block_openvino_telemetry()
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible"}))
        return 1
    device = yolo.select_device(args.device)
    from ultralytics import YOLO

    local = work / "source" / "model.pt"
    local.parent.mkdir(parents=True)
    if args.model:
        local.write_bytes(Path(args.model).read_bytes())
        source = yolo.safe_load_model(local)
    else:
        source = YOLO("yolov8n.yaml")
        source.model.pt_path = str(local)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    print(json.dumps({"gpu": gpu, "torch": torch.__version__,
                      "model": args.model or "yolov8n.yaml (untrained)", "imgsz": args.imgsz}))

    table = conversion.export_table()
    request = ConversionRequest.model_validate({
        "job_id": "gpu-check", "model": {"path": "models/check.pt"}, "formats": ["engine", "onnx"],
        "options": {"imgsz": args.imgsz, "half": True}, "output": {"prefix": "exports"},
    })
    plans = conversion.plan_formats(request, table)
    images, origin = conversion.sample_images(None, args.imgsz)
    verifier = conversion.Verifier(source, images, args.imgsz, device)
    tol = conversion.TOLERANCES[conversion.precision(request.options)]
    ok = True
    for plan in plans:
        row: dict[str, Any] = {"format": plan.requested, "precision": "fp16", "samples": origin}
        reason = conversion.unsupported_reason(plan, request.options, device)
        if reason is not None:
            row.update(unsupported=reason)
            ok = False
            print(json.dumps(row))
            continue
        out = work / plan.name
        out.mkdir()
        source.model.pt_path = str(out / "model.pt")
        started = time.monotonic()
        try:
            exported = Path(source.export(**conversion.export_arguments(plan, request, device, None)))
        except Exception as exc:  # noqa: BLE001 - a check script reports every failure
            row.update(export_error=f"{type(exc).__name__}: {exc}"[:500])
            ok = False
            print(json.dumps(row))
            continue
        row["export_seconds"] = round(time.monotonic() - started, 2)
        size, sha = conversion.describe_local(exported)
        row.update(size_bytes=size, sha256=sha)
        started = time.monotonic()
        verified, note, _ = verifier.verify(exported, tol)
        row.update(verified=verified, verification=note, verify_seconds=round(time.monotonic() - started, 2))
        ok = ok and verified
        print(json.dumps(row))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
