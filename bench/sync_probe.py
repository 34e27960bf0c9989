"""``python -m bench.sync_probe PREFIX CACHE_DIR``: the service's dataset sync in a fresh process.

The bucket (``S3_BUCKET``) and the endpoint come from the environment, as for a worker.  Prints one JSON
line: ``sync_s`` (inside :func:`ai_service.storage.sync_prefix_report`), ``setup_s`` (importing
the storage package and making the storage: botocore's import and client too, unless the
environment alone configures S3, see :mod:`ai_service.storage.env_config`), ``objects``,
``downloaded``, ``bytes``, ``botocore`` (whether the process imported it) and ``cpu_s`` (the
process's user + system CPU, interpreter start included).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    prefix, cache = sys.argv[1], Path(sys.argv[2])
    began = time.perf_counter()
    from ai_service.storage import S3Storage, sync_prefix_report

    storage = S3Storage(os.environ["S3_BUCKET"])
    started = time.perf_counter()
    report = sync_prefix_report(storage, prefix, cache)
    cpu = os.times()
    print(json.dumps({"sync_s": time.perf_counter() - started, "setup_s": started - began, "objects": report.objects,
                      "downloaded": report.downloaded, "bytes": report.bytes_downloaded,
                      "botocore": "botocore" in sys.modules, "cpu_s": cpu.user + cpu.system}))


if __name__ == "__main__":
    main()
