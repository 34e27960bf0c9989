"""Ultralytics predict used directly: the baseline of the inference figures.

``python -m bench.raw_infer --model M.pt --imgsz 128 --count N --repeats R --threads T``
loads the model once (safely, as the worker does), warms it up, then ``R`` times: decodes
the ``N`` benchmark PNGs (:func:`bench.images.png_images`) with Pillow and predicts
them one image per call, then in lists of 8.  Prints one JSON line with, per repeat,
images/s and the per-call latencies in ms.  Torch gets ``T`` threads after the warm-up,
as the inference worker does (``INFER_THREADS``, default every core).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    from workers import yolo

    yolo.prepare_ultralytics(Path(args.work))
    import numpy as np
    from PIL import Image

    from bench.images import png_images

    pngs = png_images(args.count, args.imgsz)
    model = yolo.safe_load_model(Path(args.model))
    kwargs: dict[str, Any] = {"imgsz": args.imgsz, "verbose": False, "device": "cpu", "save": False}

    def decode(raw: bytes) -> Any:
        with Image.open(io.BytesIO(raw)) as image:
            return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])

    model.predict(decode(pngs[0]), **kwargs)
    if args.threads:
        yolo.set_cpu_threads(args.threads)
    for raw in pngs[:16]:
        model.predict(decode(raw), **kwargs)
    out: dict[str, list[dict[str, Any]]] = {"single": [], "list8": []}
    for _ in range(args.repeats):
        for name, size in (("single", 1), ("list8", 8)):
            latencies = []
            started = time.perf_counter()
            for at in range(0, len(pngs), size):
                t = time.perf_counter()
                arrays = [decode(raw) for raw in pngs[at:at + size]]
                model.predict(arrays if size > 1 else arrays[0], batch=len(arrays), **kwargs)
                latencies.append((time.perf_counter() - t) * 1000)
            seconds = time.perf_counter() - started
            out[name].append({"ips": len(pngs) / seconds, "latencies_ms": latencies})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
