"""A private RabbitMQ node beside the shared one (FIELD-NOTES), for tests that stop,
restart or reconfigure a broker.  Only one can run at a time (fixed node name/ports)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

NODE = "ait@localhost"
PORT = 5673
DIST_PORT = 25673


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
        }

    def start(self) -> None:
        if shutil.which("chown") and os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=False)
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["rabbitmqctl", "-n", NODE, "await_startup", "--timeout", "60"], env=self.env(),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-n", NODE, "stop"], env=self.env(), check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.running():
            time.sleep(0.2)

    def running(self) -> bool:
        r = subprocess.run(["rabbitmqctl", "-n", NODE, "status"], env=self.env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return r.returncode == 0

    def ctl(self, *args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-n", NODE, *args], env=self.env(), check=True,
                              capture_output=True, text=True).stdout
