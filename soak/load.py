"""The inference load the proxy, restart, sustained and cluster sections run under."""

from __future__ import annotations

import threading
import time

from bench.common import Got, Sender
from soak.harness import Harness
from soak.world import Part, World, await_stragglers, terminals_by_job


class InferLoad:
    """Sends one-image inference requests at a fixed rate on its own thread and connection."""

    def __init__(self, world: World, h: Harness, rate: float, tag: str) -> None:
        self.world = world
        self.h = h
        self.rate = rate
        self.tag = tag
        self.sent: dict[str, float] = {}
        self.unsent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"load-{tag}", daemon=True)

    def start(self) -> InferLoad:
        self._thread.start()
        return self

    def _run(self) -> None:
        sender = Sender(self.h.host, self.h.port)
        queue = self.h.settings.infer_request_queue
        started = time.monotonic()
        i = 0
        try:
            while not self._stop.is_set():
                due = started + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                    continue
                job_id = f"{self.tag}-{i}"
                at = time.time()
                if sender.send_retrying(queue, self.world.infer_request(job_id, i), timeout=60):
                    self.sent[job_id] = at
                else:
                    self.unsent += 1
                i += 1
        finally:
            sender.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)

    def answers(self) -> dict[str, list[Got]]:
        terms = terminals_by_job(self.h.messages())
        return {j: terms.get(j, []) for j in self.sent}

    def wait_answered(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.answers().values()):
                return True
            time.sleep(0.3)
        return False

    def settle(self, jobs: list[str], timeout: float) -> None:
        """After the load stopped: until every request sent and every training job in ``jobs``
        has its terminal message (or ``timeout``), then the stragglers (:func:`await_stragglers`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.h.check()
            if all(self.answers().values()) and all(terminals_by_job(self.h.messages()).get(j) for j in jobs):
                break
            time.sleep(0.5)
        await_stragglers(self.h)

    def lines(self, part: Part) -> list[float]:
        answers = self.answers()
        answered = {j: a for j, a in answers.items() if a}
        failed = [a[0].body for a in answered.values() if a[0].type != "inference_completed"]
        twice = {j: a for j, a in answered.items() if len({m.message_id for m in a}) > 1}
        latencies = [(min(m.t for m in a) - self.sent[j]) * 1000 for j, a in answered.items()]
        part.add(f"inference requests sent (confirmed by the broker): {len(self.sent)}; answered: {len(answered)}; "
                 f"unanswered: {len(answers) - len(answered)}")
        part.add(f"inference requests answered more than once (different message_ids): {len(twice)}")
        if failed:
            part.findings.append(f"{len(failed)} inference request(s) failed, e.g. {failed[0]}")
        if len(answers) > len(answered):
            part.fail(f"{len(answers) - len(answered)} inference request(s) never answered")
            part.lost += len(answers) - len(answered)
        if twice:
            part.fail(f"{len(twice)} inference request(s) answered twice after a redelivery "
                      "(at-least-once; the contract asks for exactly one terminal message)")
        if self.unsent:
            part.notes.append(f"{self.unsent} request(s) could not be sent at all (broker unreachable for 60 s)")
        return latencies
