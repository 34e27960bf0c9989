"""SeaweedFS for the benchmark, on ports of its own so that it runs beside a test session.

The test suite's instances take slots at offsets 0..900 (tests/support/s3.py); the
benchmark's move every port up by one of ``OFFSETS`` instead (30000, 30100, ...: the
same 100-apart spacing, so that two benchmarks run side by side, each on the first set
of ports nothing else holds).  Loopback only, telemetry off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.support.s3 import S3Server, seaweedfs

OFFSET = 30000
OFFSETS = tuple(range(OFFSET, OFFSET + 1000, 100))


@contextlib.contextmanager
def bench_s3(base_dir: Path) -> Iterator[S3Server]:
    with seaweedfs(base_dir, offsets=OFFSETS) as server:
        yield server
