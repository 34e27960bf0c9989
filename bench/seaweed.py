"""SeaweedFS for the benchmark, on ports of its own so that it runs beside a test session.

``weed mini`` takes fixed ports (S3 8333, filer 8888, master 9333, volume 9340, admin
23646, each +10000 for gRPC): the test suite's instance (tests/support/s3.py) uses the
defaults, this one moves every port up by ``OFFSET``.  Loopback only, telemetry off.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.s3 import S3Server, _port_open

OFFSET = 30000
PORTS = {"s3": 8333 + OFFSET, "filer": 8888 + OFFSET, "master": 9333 + OFFSET, "volume": 9340 + OFFSET,
         "admin": 23646 + OFFSET}


class BenchS3(S3Server):
    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir, port=PORTS["s3"])

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        busy = [p for p in PORTS.values() if _port_open(p)]
        if busy:
            raise RuntimeError(f"ports {busy} are in use on 127.0.0.1: is another benchmark running?")
        data = self.base_dir
        (data / "log").mkdir(parents=True, exist_ok=True)
        config = data / "s3.json"
        identity = {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        config.write_text(json.dumps({"identities": [identity]}))
        sockets = Path(tempfile.mkdtemp(prefix="weed-bench-"))
        self._sockets = sockets
        cmd = [
            str(self.binary), f"-logdir={data / 'log'}", "mini", f"-dir={data}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            f"-s3.port={PORTS['s3']}", f"-filer.port={PORTS['filer']}", f"-master.port={PORTS['master']}",
            f"-volume.port={PORTS['volume']}", f"-admin.port={PORTS['admin']}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}", f"-s3.config={config}",
        ]
        self._log = open(data / "weed.out", "ab")  # closed in stop()
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        self._paused = False
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise


@contextlib.contextmanager
def bench_s3(base_dir: Path) -> Iterator[BenchS3]:
    server = BenchS3(base_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
