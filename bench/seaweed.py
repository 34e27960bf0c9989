"""SeaweedFS for the benchmark, on ports of its own so that it runs beside a test session.

The test suite's instances take slots at offsets 0..900 (tests/support/s3.py); the
benchmark's moves every port up by ``OFFSET`` instead.  Loopback only, telemetry off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.support.s3 import S3Server, seaweedfs

OFFSET = 30000


@contextlib.contextmanager
def bench_s3(base_dir: Path) -> Iterator[S3Server]:
    with seaweedfs(base_dir, offsets=(OFFSET,)) as server:
        yield server
