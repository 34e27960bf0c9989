"""The sleepy worker whose publisher thread meets a bug when it declares the topology.

The consumer (on its own thread) declares the same topology and works; only the
publisher's thread raises ``RuntimeError("injected bug")``, so the publisher ends as a
crash while the consumer still runs.  The worker must then exit with the crash code
(supervisord restarts it) instead of consuming jobs it could never answer.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ai_service.broker import Topology
from ai_service.cli import exit_now_if_forced
from ai_service.config import Settings
from ai_service.logs import setup_logging
from ai_service.messages import TrainingRequest
from ai_service.operation import Operation
from ai_service.worker import run_worker
from tests.support import sleepy_worker
from workers.training import failure_message


class PublisherThreadBug(Topology):
    def declare(self, connection: Any) -> None:
        if threading.current_thread().name == "publisher":
            raise RuntimeError("injected bug: the publisher's declare fails (tests/support/publisher_bug_worker.py)")
        super().declare(connection)


def main() -> int:
    settings = Settings.from_env().for_program("publisher-bug")
    setup_logging(settings, op="train")
    op = Operation(name="train", request_model=TrainingRequest, handler=sleepy_worker.handle,
                   failure=failure_message)
    return exit_now_if_forced(run_worker(settings, "train", lambda _: op, topology=PublisherThreadBug(settings)))


if __name__ == "__main__":
    sys.exit(main())
