"""A process that uses the real Publisher and its on-disk spool, for cross-process tests.

``python -m tests.support.publish_script spool N``
    Publish N numbered messages (``{"n": i}``, routing key ``train.result.spool-<i>``)
    with the broker unreachable (point ``RABBITMQ_PORT`` at a closed port), print one
    JSON line ``{"spooled": [message_id, ...]}`` and ``SPOOLED``, then sleep until
    killed.  The messages stay unconfirmed, in the spool under ``WORK_DIR``.
``python -m tests.support.publish_script inflight N GO_FILE``
    As ``spool``, but connected: wait until the publisher is connected, print
    ``CONNECTED``, wait for ``GO_FILE`` to exist, then publish (a test holds the broker's
    confirms back in between, so the messages are sent and stay unconfirmed).
``python -m tests.support.publish_script drain``
    Start a Publisher on the same spool (same ``WORK_DIR`` and ``WORKER_NAME``) with the
    broker reachable, wait until everything left there is confirmed, print
    ``DRAINED <pending>`` and exit 0 (1 when something is still pending).

Settings come from the environment, as in a worker.  A spool held by another live
process makes ``Publisher.start`` raise ``SpoolLocked``; it is left to propagate.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ai_service.broker import Topology
from ai_service.config import Settings
from ai_service.logs import setup_logging
from ai_service.publisher import Publisher
from ai_service.worker import spool_dir


def main(argv: list[str]) -> int:
    mode = argv[0]
    settings = Settings.from_env().for_program("publish-script")
    setup_logging(settings)
    publisher = Publisher(settings, spool_dir=spool_dir(settings, "train"), topology=Topology(settings, ops=("train",)))
    publisher.start()
    if mode == "inflight":
        if not publisher.wait_connected(30):
            return 1
        print("CONNECTED", flush=True)
        while not Path(argv[2]).exists():
            time.sleep(0.02)
    if mode in ("spool", "inflight"):
        count = int(argv[1])
        ids = []
        for i in range(count):
            receipt = publisher.publish(
                settings.events_exchange,
                f"train.result.spool-{i}",
                json.dumps({"n": i}).encode(),
                message_type="training_completed",
                correlation_id=f"spool-{i}",
            )
            ids.append(receipt.message_id)
        print(json.dumps({"spooled": ids, "pending": publisher.pending}), flush=True)
        print("SPOOLED", flush=True)
        while True:
            time.sleep(1)
    if mode == "drain":
        ok = publisher.flush(timeout=30)
        pending = publisher.pending
        publisher.stop(timeout=5)
        print(f"DRAINED {pending}", flush=True)
        return 0 if ok else 1
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
