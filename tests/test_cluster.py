"""Node loss on a real three-node RabbitMQ cluster (tests/support/cluster.py), with a real
inference worker and a real training worker under load: a kill -9 of the node a worker
is on, a kill -9 of the node leading the request queue, and a clean stop that keeps a
node down 30 s before it returns.  Nothing a BE was promised is lost; every worker
consumes again within 10 s of losing its node, and its publisher is on a live node."""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ai_service.broker import Topology
from ai_service.cancels import cancel_stream_name
from ai_service.config import Settings
from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.cluster import Answer, Cluster, ClusterClient
from tests.support.cluster import cluster as cluster  # the session fixture
from tests.support.procs import STARTED
from tests.support.sse import free_port
from tests.test_inference import b64, request, shapes
from tests.test_training import train_request

log = logging.getLogger("tests.cluster")

pytestmark = pytest.mark.xdist_group("cluster")

NODE_INFO = re.compile(
    r'^ai_broker_node_info\{component="(?P<component>consumer|publisher)",node="(?P<node>[^"]+)"\} 1\.0$', re.M)
STATE = re.compile(r"^ai_consumer_state (?P<state>\S+)$", re.M)
#: The issue's promise: a worker that lost its node consumes again within this many seconds.
RECOVERY = 10.0
#: The generous bound past which a worker that lost its node fails the test instead of hanging it.
BOUND = 60.0
#: How long the clean stop keeps its node down (the issue's "down for 30 s and back").
AWAY = 30.0


class Scraped:
    """A worker as its /metrics tell it: the nodes its consumer and publisher are on, and
    whether the consumer consumes."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def read(self) -> tuple[dict[str, int], bool]:
        """({component: node index}, back): ``back`` once the consumer is connected with its
        channel open -- consuming, or (a training worker busy with its job) ready to as soon
        as it is free."""
        try:
            with urllib.request.urlopen(self.url, timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return {}, False
        nodes = {m["component"]: int(m["node"].rsplit(":", 1)[1]) for m in NODE_INFO.finditer(text)}
        state = STATE.search(text)
        return nodes, bool(state and float(state["state"]) >= 1.0)

    def node(self, cluster: Cluster, component: str = "consumer") -> int:
        nodes, _ = self.read()
        assert component in nodes, f"the worker's /metrics name no broker node for its {component}"
        return cluster.index_of(nodes[component])

    def consuming_again(self, cluster: Cluster, lost: int, since: float) -> float:
        """Seconds from ``since`` until the consumer is on a node other than ``lost`` and consuming."""
        return self._until(lambda nodes, back: back and "consumer" in nodes
                           and cluster.index_of(nodes["consumer"]) != lost, since, f"consuming after losing {lost}")

    def publishing_again(self, cluster: Cluster, lost: int, since: float) -> float:
        """Seconds from ``since`` until the publisher says it is on a node other than ``lost``."""
        return self._until(lambda nodes, _: "publisher" in nodes and cluster.index_of(nodes["publisher"]) != lost,
                           since, f"publisher on another node after losing {lost}")

    def _until(self, done: Callable[[dict[str, int], bool], bool], since: float, what: str) -> float:
        deadline = since + BOUND
        while time.monotonic() < deadline:
            if done(*self.read()):
                return time.monotonic() - since
            time.sleep(0.1)
        raise AssertionError(f"{self.url}: not {what} within {BOUND} s: {self.read()}")


class InferenceLoad(threading.Thread):
    """Sends inference requests one after another (a few a second) until stopped."""

    def __init__(self, settings: Settings, image: str) -> None:
        super().__init__(daemon=True)
        self.client = ClusterClient(settings, name="test cluster load")
        self.image = image
        self.sent: list[str] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                job_id = f"infer-{len(self.sent)}"
                self.client.publish(self.client.settings.infer_request_queue,
                                    request(job_id, "models/shapes.pt", [{"data": self.image}]))
                self.sent.append(job_id)
                time.sleep(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.client.close()


def by_job(answers: list[Answer]) -> dict[str, list[Answer]]:
    out: dict[str, list[Answer]] = {}
    for a in answers:
        out.setdefault(str(a.body["job_id"]), []).append(a)
    return out


def wait_terminals(client: ClusterClient, queue: str, job_ids: set[str], seen: list[Answer], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not job_ids <= set(by_job(seen)):
        if time.monotonic() > deadline:
            missing = sorted(job_ids - set(by_job(seen)))
            raise AssertionError(f"{len(missing)} jobs unanswered on {queue} after {timeout} s: {missing[:10]}")
        seen.extend(client.drain(queue))
        time.sleep(0.3)


def test_workers_under_load_lose_nothing_when_a_node_is_killed_or_stopped_and_consume_again_soon(
    cluster: Cluster, start_worker: WorkerFactory, worker_env: dict[str, str], trained_model: dict[str, Any],
    shapes_dir: Path,
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_dir(shapes_dir, "datasets/shapes")
    storage.upload_file(Path(trained_model["model"]), "models/shapes.pt")
    env = {**cluster.env(), "RABBITMQ_PORT": str(cluster.nodes[0].port)}
    settings = Settings.from_env({**worker_env, **env})
    client = ClusterClient(settings, declare=True)
    infer_port, train_port = free_port(), free_port()
    procs = [start_worker(op, env={**env, "METRICS_PORT": str(port)}, name=op, wait_started=False)
             for op, port in (("infer", infer_port), ("train", train_port))]
    for proc in procs:  # both start at once: their imports overlap
        proc.wait_log(STARTED, timeout=180)
    workers = {"infer": Scraped(infer_port), "train": Scraped(train_port)}
    topology = Topology(settings)
    promised = {q: ("quorum", 3) for qs in map(topology.queues, topology.ops)
                for q in (qs.request, qs.dlq, qs.lease, qs.update, qs.result) if q}
    promised[cancel_stream_name(settings)] = ("stream", 3)
    held = cluster.queues()
    assert {q: held.get(q) for q in promised} == promised  # a replica of each on every node
    trainings = {"train-a": 2, "train-b": 3}  # each under way while a node goes: its epochs come on other nodes
    client.publish(settings.train_request_queue, train_request("train-a", epochs=trainings["train-a"]))
    load = InferenceLoad(settings, b64(shapes(0)[0]))
    load.start()
    recovery: dict[str, list[float]] = {"infer": [], "train": []}
    publishers: dict[str, list[float]] = {"infer": [], "train": []}

    def lose(n: int, how: str, away: float = 2.0) -> None:
        """Lose node ``n`` (``kill9`` or a clean ``stop``) for ``away`` seconds under load:
        each worker on it consumes again elsewhere, every publisher is on a live node."""
        consumers = [name for name, w in workers.items() if w.node(cluster) == n]
        on_it = [name for name, w in workers.items() if w.node(cluster, "publisher") == n]
        since = time.monotonic()
        cluster.kill9(n) if how == "kill9" else cluster.stop(n)
        for name in consumers:
            recovery[name].append(round(workers[name].consuming_again(cluster, n, since), 2))
        for name, worker in workers.items():  # every publisher, wherever its consumer was
            seconds = worker.publishing_again(cluster, n, since)
            if name in on_it:
                publishers[name].append(round(seconds, 2))
        log.info("node %d (%s): consuming again %s, publishing %s", n, how, recovery, publishers)
        time.sleep(max(0.0, since + away - time.monotonic()))  # load keeps coming while the node is away
        cluster.start(n)

    lose(workers["infer"].node(cluster), "kill9")  # the node the inference worker is on
    lose(cluster.leader(settings.infer_request_queue), "kill9")  # the node leading its request queue
    client.publish(settings.train_request_queue, train_request("train-b", epochs=trainings["train-b"]))
    procs[1].wait_log("[train-b] Training", timeout=BOUND)  # the clean stop comes in the middle of it
    lose(workers["train"].node(cluster), "stop", away=AWAY)  # the training worker's node, down 30 s and back
    time.sleep(1)
    load.done.set()
    load.join(BOUND)
    assert load.error is None, load.error

    infer_answers: list[Answer] = []
    wait_terminals(client, settings.infer_result_queue, set(load.sent), infer_answers, timeout=BOUND)
    train_results: list[Answer] = []
    wait_terminals(client, settings.train_result_queue, set(trainings), train_results, timeout=240)
    updates = client.drain(settings.train_update_queue)
    client.close()
    print(f"cluster: {len(load.sent)} inference requests sent, {len(by_job(infer_answers))} answered "
          f"({len(infer_answers)} answers); consuming again after (s): {recovery}; "
          f"publisher on a live node after (s): {publishers}")

    assert max(recovery["infer"] + recovery["train"]) <= RECOVERY, recovery
    assert len(load.sent) >= 10, (load.sent, recovery)
    assert recovery["infer"], (load.sent, recovery)
    for job_id, answers in by_job(infer_answers).items():
        assert {a.body["type"] for a in answers} == {"inference_completed"}, answers
        assert len({a.message_id for a in answers}) == 1, f"{job_id} answered as different messages: {answers}"
    for job_id, results in by_job(train_results).items():
        assert len({a.message_id for a in results}) == 1, f"{job_id}: more than one terminal message: {results}"
        assert results[0].body["type"] == "training_completed", results[0].body
    announced = Counter((str(u.body["job_id"]), int(u.body["current_epoch"]))
                        for u in {u.message_id: u for u in updates if u.body["type"] == "epoch_update"}.values())
    for job_id, total in trainings.items():  # every epoch announced, once (copies share their message_id)
        assert {e: n for (j, e), n in announced.items() if j == job_id} == dict.fromkeys(range(1, total + 1), 1)


def test_the_broker_node_gauge_names_one_node_per_component_and_follows_a_move() -> None:
    from ai_service.metrics import Metrics

    metrics = Metrics()
    metrics.on_broker_node("consumer", "node-a:5672")
    metrics.on_broker_node("publisher", "node-a:5672")
    metrics.on_broker_node("consumer", "node-b:5673")

    text = metrics.render().decode()
    assert 'ai_broker_node_info{component="consumer",node="node-b:5673"} 1.0' in text
    assert 'ai_broker_node_info{component="publisher",node="node-a:5672"} 1.0' in text
    assert 'component="consumer",node="node-a:5672"' not in text
