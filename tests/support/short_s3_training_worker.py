"""The test training worker (tests.support.training_worker) on an S3 client that gives up
fast: ``TEST_S3_TIMEOUT`` seconds to connect and to read, one attempt per call, so that a
paused S3 server (SIGSTOP) is a retryable ``StorageError`` within seconds, not minutes."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from ai_service.cli import exit_now_if_forced
from ai_service.config import Settings
from ai_service.logs import setup_logging
from ai_service.operation import Operation, Resources
from ai_service.storage import S3Storage
from ai_service.storage.s3 import make_s3_client
from ai_service.worker import run_worker
from tests.support import training_worker


def load(settings: Settings) -> Operation:
    op = training_worker.load(settings)
    inner = op.setup
    timeout = float(os.environ.get("TEST_S3_TIMEOUT", "2"))

    def setup(resources: Resources) -> None:
        assert settings.s3_bucket
        client = make_s3_client(connect_timeout=timeout, read_timeout=timeout, max_attempts=1)
        resources.storage = S3Storage(settings.s3_bucket, client=client)
        if inner is not None:
            inner(resources)

    return replace(op, setup=setup)


def main() -> int:
    settings = Settings.from_env().for_program("train-test")
    setup_logging(settings, op="train")
    return exit_now_if_forced(run_worker(settings, "train", load))


if __name__ == "__main__":
    sys.exit(main())
