"""The resources one benchmark run shares between its sections, and what a section returns."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai_service.broker import Topology
from ai_service.config import Settings
from bench.common import Figure, Listener, Sender, delete_topology
from tests.support.amqp import BrokerNames, new_names
from tests.support.s3 import S3Server


@dataclass
class Section:
    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def figure(self, key: str, name: str, unit: str, **kw: Any) -> Figure:
        fig = Figure(key=key, name=name, unit=unit, **kw)
        self.figures.append(fig)
        return fig

    def get(self, key: str) -> Figure | None:
        for fig in self.figures:
            if fig.key == key:
                return fig
        return None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "seconds": round(self.seconds, 1), "error": self.error,
                "notes": self.notes, "extra": self.extra,
                "figures": [f.to_json() for f in self.figures]}


class Bench:
    """Unique queue names on the shared broker, a SeaweedFS bucket, a BE, a temp dir."""

    def __init__(self, root: Path, s3: S3Server, *, quick: bool) -> None:
        self.root = root
        self.s3 = s3
        self.quick = quick
        self.repeats = 2 if quick else 3
        self.names: BrokerNames = new_names(RABBITMQ_QUEUE_TYPE="quorum")
        self.env = self.names.env()
        self.settings: Settings = Settings.from_env(self.env)
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            os.environ.pop(name, None)
        os.environ.update(s3.env())  # this process is the BE and the operator: boto3 finds the server
        self.bucket = s3.create_bucket(f"bench-{uuid.uuid4().hex[:12]}")
        host, port = self.settings.rabbitmq_host, self.settings.rabbitmq_port
        self.sender = Sender(host, port)
        assert self.sender.connection is not None
        Topology(self.settings).declare(self.sender.connection)
        s = self.settings
        self.listener = Listener(host, port, [s.train_update_queue, s.train_result_queue, s.convert_update_queue,
                                              s.convert_result_queue, s.infer_result_queue])
        self._workers = 0
        #: the ``aws`` command (awscli), when installed
        self.aws: str | None = None

    def storage(self) -> Any:
        from ai_service.storage import S3Storage

        return S3Storage(self.bucket)

    def worker_env(self, work_dir: Path, label: str, **extra: str) -> dict[str, str]:
        self._workers += 1
        return {
            **self.env,
            **self.s3.env(),
            "STORAGE_BACKEND": "s3",
            "S3_BUCKET": self.bucket,
            "WORK_DIR": str(work_dir),
            "WORKER_NAME": f"bench/{label}-{self._workers}",
            "LOG_LEVEL": "INFO",
            **extra,
        }

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def close(self) -> None:
        self.listener.stop()
        self.sender.close()
        delete_topology(self.settings.rabbitmq_host, self.settings.rabbitmq_port, self.env)
