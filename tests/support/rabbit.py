"""Private RabbitMQ nodes beside the shared one (FIELD-NOTES), for tests that stop,
kill, restart or reconfigure a broker.  :class:`PrivateNode` is one such node, used
alone here (:func:`private_broker`, ``ait@localhost`` on 5673) and three at a time by
:mod:`tests.support.cluster`.  Only one of each can run at a time (fixed node names and
ports): each takes a machine-wide lock (:func:`exclusive`), so pytest sessions running
at once wait for each other instead of fighting over the node.

Things learnt making it work here:

* Run as root, ``rabbitmq-server`` switches to the ``rabbitmq`` user, so the node's
  directory must be owned by it *and every directory above it must be traversable by
  it*: pytest's ``tmp_path`` (under ``/tmp/pytest-of-root``, mode 0700) is not.  Use
  :func:`scratch`, which makes a traversable directory under the system temp dir.
* ``rabbitmqctl await_startup`` fails at once (exit 69) when the node has not
  registered with epmd yet, so it is retried until the node answers.
* A ``rabbitmqctl stop`` sent while the node is still booting does nothing; the node
  then boots anyway.  :meth:`PrivateNode.stop` therefore also kills the node's own
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
#: A private node's Erlang distribution port is its AMQP port plus this.
DIST_OFFSET = 20000
DIST_PORT = PORT + DIST_OFFSET
LOCK_FILE = Path(tempfile.gettempdir()) / "ait-private-broker.lock"


def available() -> bool:
    return shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None


class PrivateNode:
    """One private node: its name, ports, directories (under ``base``) and the
    ``rabbitmqctl`` to reach it.  ``loopback``: listen on 127.0.0.1 only."""

    def __init__(self, base: Path, name: str = NODE, port: int = PORT, *, config: str = "",
                 loopback: bool = False) -> None:
        self.name = name
        self.port = port
        self.dist_port = port + DIST_OFFSET
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        listener = f"127.0.0.1:{port}" if loopback else str(port)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {listener}\nloopback_users = none\n{config}\n")
        (base / "enabled_plugins").write_text("[].\n")

    @property
    def pid_file(self) -> Path:
        return self.base / "mnesia" / f"{self.name}.pid"

    def env(self) -> dict[str, str]:
        b = self.base
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }

    def ctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["rabbitmqctl", "-n", self.name, *args], env=self.env(), check=False,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr[-2000:]}\n{self.log_tail()}")
        return result

    def start(self, timeout: float = 90.0) -> None:
        """Start the node on its directories and wait until it answers."""
        self.launch()
        self.await_startup(timeout)

    def launch(self) -> None:
        """``rabbitmq-server -detached`` on this node's directories (returns at once)."""
        if os.geteuid() == 0 and shutil.which("chown"):
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=False)
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def await_startup(self, timeout: float = 90.0) -> None:
        """Until the node answers (``await_startup`` fails at once before epmd knows it)."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(int(deadline - time.monotonic()), 1)
            result = self.ctl("await_startup", "--timeout", str(left), check=False, timeout=left + 10)
            if result.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} did not start within {timeout} s: {result.stderr[-2000:]}\n"
                                   f"{self.log_tail()}")
            time.sleep(0.3)

    def os_pid(self) -> int | None:
        """The node's Erlang VM while it is alive."""
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
        return self.ctl("status", check=False, timeout=30).returncode == 0

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown; the VM is killed if it is still there after ``timeout``."""
        self.ctl("stop", check=False, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.os_pid() is not None:
            time.sleep(0.2)
        self.kill9()

    def stop_stale(self, timeout: float = 30.0) -> None:
        """Stop a node of this name left running by a killed session (its pid file lies in
        that session's directory, so ask the node itself until it is gone)."""
        if not self.running():
            return
        self.ctl("stop", check=False, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            time.sleep(0.5)

    def kill9(self) -> None:
        """SIGKILL the node's VM: no goodbye to its peers or its clients."""
        pid = self.os_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.os_pid() is not None:
            time.sleep(0.05)

    def log_tail(self, chars: int = 2000) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "".join(p.read_text(errors="replace")[-chars:] for p in logs)


#: The single private node of :func:`private_broker` (its users' name for it).
PrivateBroker = PrivateNode


@contextlib.contextmanager
def exclusive(lock_file: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold the machine-wide lock of ``what`` (private nodes have fixed names and ports)."""
    lock_file.touch(exist_ok=True)
    with open(lock_file, "rb+") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"another test session holds {what}") from None
                time.sleep(0.5)
        yield


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A directory for private nodes that the ``rabbitmq`` user can traverse (mkdtemp's
    0700 would keep it out), wiped afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def private_broker(config: str = "", lock_timeout: float = 300.0) -> Iterator[PrivateNode]:
    """A started private node, always stopped and wiped afterwards (also on failure)."""
    with exclusive(LOCK_FILE, lock_timeout, "the private RabbitMQ node"), scratch("ait-rabbit-") as base:
        broker = PrivateNode(base, config=config)
        try:
            broker.stop_stale()  # left over by a killed session: we hold the lock, so it is stale
            broker.start()
            yield broker
        finally:
            broker.stop(timeout=30)
