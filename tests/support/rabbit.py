"""A private RabbitMQ node beside the shared one (FIELD-NOTES), for tests that stop,
restart or reconfigure a broker.  Only one can run at a time (fixed node name/ports):
:func:`private_broker` takes a machine-wide lock for it, so pytest sessions running at
once wait for each other instead of fighting over the node.

Things learnt making it work here:

* Run as root, ``rabbitmq-server`` switches to the ``rabbitmq`` user, so the node's
  directory must be owned by it *and every directory above it must be traversable by
  it*: pytest's ``tmp_path`` (under ``/tmp/pytest-of-root``, mode 0700) is not.  Use
  :func:`private_broker`, which makes its own directory under the system temp dir.
* ``rabbitmqctl await_startup`` fails at once (exit 69) when the node has not
  registered with epmd yet, so it is retried until the node answers.
* A ``rabbitmqctl stop`` sent while the node is still booting does nothing; the node
  then boots anyway.  :meth:`PrivateBroker.stop` therefore also kills the node's own
  process (by the pid in its pid file) when it is still there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

NODE = "ait@localhost"
PORT = 5673
DIST_PORT = 25673
LOCK_FILE = Path(tempfile.gettempdir()) / "ait-private-broker.lock"


def available() -> bool:
    return shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None


class PrivateBroker:
    def __init__(self, base: Path, config: str = "") -> None:
        self.base = base
        self.config = config
        self.port = PORT
        base.mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {PORT}\nloopback_users = none\n{config}\n")
        (base / "enabled_plugins").write_text("[].\n")

    def env(self) -> dict[str, str]:
        b = self.base
        return {
            **os.environ,
            "RABBITMQ_NODENAME": NODE,
            "RABBITMQ_NODE_PORT": str(PORT),
            "RABBITMQ_DIST_PORT": str(DIST_PORT),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }

    @property
    def pid_file(self) -> Path:
        return self.base / "mnesia" / f"{NODE}.pid"

    def start(self, timeout: float = 60.0) -> None:
        if shutil.which("chown") and os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=False)
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            left = int(deadline - time.monotonic())
            r = subprocess.run(["rabbitmqctl", "-n", NODE, "await_startup", "--timeout", str(max(left, 1))],
                               env=self.env(), check=False, capture_output=True, text=True)
            if r.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"private RabbitMQ node did not start within {timeout} s: {r.stderr[-2000:]}"
                                   f"\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self, timeout: float = 30.0) -> None:
        subprocess.run(["rabbitmqctl", "-n", NODE, "stop"], env=self.env(), check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.running() or self._node_pid() is not None):
            time.sleep(0.2)
        pid = self._node_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    def _node_pid(self) -> int | None:
        """The node's own OS pid while that process is alive (and is an Erlang VM)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"beam" in cmdline or b"erl" in cmdline else None

    def running(self) -> bool:
        r = subprocess.run(["rabbitmqctl", "-n", NODE, "status"], env=self.env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return r.returncode == 0

    def ctl(self, *args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-n", NODE, *args], env=self.env(), check=True,
                              capture_output=True, text=True).stdout

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "".join(p.read_text(errors="replace")[-chars:] for p in logs)


@contextlib.contextmanager
def private_broker(config: str = "", lock_timeout: float = 300.0) -> Iterator[PrivateBroker]:
    """A started private node, always stopped and wiped afterwards (also on failure)."""
    LOCK_FILE.touch(exist_ok=True)
    with open(LOCK_FILE, "rb+") as lock:
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RuntimeError("another test session holds the private RabbitMQ node") from None
                time.sleep(0.5)
        base = Path(tempfile.mkdtemp(prefix="ait-rabbit-"))
        broker = PrivateBroker(base, config)
        try:
            if broker.running():  # left over by a killed session: we hold the lock, so it is stale
                broker.stop()
            broker.start()
            yield broker
        finally:
            broker.stop()
            shutil.rmtree(base, ignore_errors=True)
