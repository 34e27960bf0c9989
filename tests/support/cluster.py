"""A private three-node RabbitMQ cluster on loopback (FIELD-NOTES: "A three-node cluster
from private nodes on one machine"), for tests and soak runs that lose a node.

The nodes are ``aitc1@localhost`` .. ``aitc3@localhost`` on AMQP ports 5690-5692 (their
Erlang distribution ports +20000), each with its own directory under one temp directory
owned by the ``rabbitmq`` user; node 2 and 3 join node 1.  The shared broker on 5672 is
never touched.  A machine-wide lock keeps two sessions from fighting over the ports.

What a test can do to it: :meth:`Cluster.stop` (clean shutdown), :meth:`Cluster.kill9`
(SIGKILL of the node's Erlang VM), :meth:`Cluster.start` (the same node on the same
directories: it rejoins), and ask which node leads a quorum queue (:meth:`Cluster.leader`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from ai_service.broker import NodeRing, Topology, close_quietly, connect, pika_boundary
from ai_service.config import Settings
from ai_service.errors import BrokerError
from tests.support.rabbit import PrivateNode, exclusive, scratch
from tests.support.rabbit import available as available  # re-exported: rabbitmq-server is installed

T = TypeVar("T")

BASE_PORT = 5690
SIZE = 3
LOCK_FILE = Path(tempfile.gettempdir()) / "ait-cluster.lock"


class ClusterNode(PrivateNode):
    """One node of the cluster (a :class:`~tests.support.rabbit.PrivateNode` on loopback)."""

    def __init__(self, base: Path, index: int) -> None:
        super().__init__(base / f"node{index + 1}", f"aitc{index + 1}@localhost", BASE_PORT + index, loopback=True)
        self.index = index

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``: this node's entry in ``RABBITMQ_HOST`` (it listens on loopback only)."""
        return f"127.0.0.1:{self.port}"


class Cluster:
    """Three clustered private nodes; ``n`` is a node's index (0, 1, 2) everywhere."""

    def __init__(self, base: Path, size: int = SIZE) -> None:
        self.base = base
        self.nodes = [ClusterNode(base, i) for i in range(size)]

    @property
    def rabbitmq_host(self) -> str:
        """The ``RABBITMQ_HOST`` node list of the whole cluster."""
        return ",".join(node.address for node in self.nodes)

    def env(self) -> dict[str, str]:
        """Broker settings for a worker or client of this cluster."""
        return {"RABBITMQ_HOST": self.rabbitmq_host, "RABBITMQ_USER": "guest", "RABBITMQ_PASSWORD": "guest"}

    def boot(self) -> None:
        """Start every node at once, then join nodes 2.. to node 1."""
        for node in self.nodes:
            node.stop_stale()  # left by a killed session: we hold the lock
        for node in self.nodes:
            node.launch()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.await_startup(), self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        self.await_members(len(self.nodes))

    def await_members(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` nodes are running in the cluster (seen from any live node)."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.os_pid() is None:
                    continue
                result = node.ctl("cluster_status", "--formatter", "json", check=False, timeout=30)
                with contextlib.suppress(ValueError):
                    if result.returncode == 0 and len(json.loads(result.stdout)["running_nodes"]) == count:
                        return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the cluster did not reach {count} running nodes within {timeout} s")
            time.sleep(0.5)

    def stop(self, n: int) -> None:
        self.nodes[n].stop()

    def kill9(self, n: int) -> None:
        self.nodes[n].kill9()

    def start(self, n: int) -> None:
        """Start node ``n`` again on its directories: it rejoins the cluster."""
        node = self.nodes[n]
        node.launch()
        node.await_startup()
        self.await_members(sum(1 for other in self.nodes if other.os_pid() is not None))

    def live(self) -> list[int]:
        return [node.index for node in self.nodes if node.os_pid() is not None]

    def index_of(self, node_name_or_port: str | int) -> int:
        """The index of a node named ``aitcN@localhost`` or listening on a port."""
        for node in self.nodes:
            if node_name_or_port in (node.name, node.port, str(node.port)):
                return node.index
        raise KeyError(node_name_or_port)

    def leader(self, queue: str, timeout: float = 30.0) -> int:
        """The index of the node that leads quorum queue ``queue`` (asked of a live node,
        retried while an election is still going on)."""
        deadline = time.monotonic() + timeout
        while True:
            for n in self.live():
                result = self.nodes[n].ctl("list_queues", "--quiet", "--no-table-headers", "name", "leader",
                                           check=False, timeout=30)
                for line in result.stdout.splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == queue and parts[1] in {x.name for x in self.nodes}:
                        return self.index_of(parts[1])
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no leader for {queue!r} within {timeout} s")
            time.sleep(0.5)

    def queues(self) -> dict[str, tuple[str, int]]:
        """Every queue of the cluster: its type and how many nodes hold a replica of it."""
        for n in self.live():
            result = self.nodes[n].ctl("list_queues", "name", "type", "members", "--formatter", "json",
                                       check=False, timeout=30)
            if result.returncode == 0:
                return {q["name"]: (q["type"], len(q.get("members") or [n])) for q in json.loads(result.stdout)}
        raise RuntimeError("no live node answered list_queues")

    def connected_node(self, connection_name_part: str) -> int | None:
        """The node a client connection (``connection_name`` containing the text) is on."""
        for n in self.live():
            result = self.nodes[n].ctl("list_connections", "--quiet", "--no-table-headers", "node",
                                       "client_properties", check=False, timeout=30)
            for line in result.stdout.splitlines():
                if connection_name_part in line:
                    return self.index_of(line.split()[0])
        return None

    def shutdown(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(timeout=30), self.nodes))


@contextlib.contextmanager
def private_cluster(lock_timeout: float = 600.0) -> Iterator[Cluster]:
    """A booted three-node cluster, always stopped and wiped afterwards (also on failure)."""
    with exclusive(LOCK_FILE, lock_timeout, "the private RabbitMQ cluster"), scratch("ait-cluster-") as base:
        cluster = Cluster(base)
        try:
            cluster.boot()
            yield cluster
        finally:
            cluster.shutdown()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The private three-node cluster, booted once per session (for tests grouped with
    ``@pytest.mark.xdist_group("cluster")`` so that one xdist worker holds it)."""
    if not available():
        pytest.fail("rabbitmq-server is not installed: the cluster tests need it (make install)")
    with private_cluster() as booted:
        yield booted


# --- a BE stand-in that rides out node loss --------------------------------------------


@dataclass
class Answer:
    body: dict[str, Any]
    message_id: str | None
    queue: str


class ClusterClient:
    """Publishes with confirms and reads queues through the node list, reconnecting (to
    the next node, by :class:`NodeRing`) whenever its node goes away.  One per thread."""

    def __init__(self, settings: Settings, *, name: str = "test cluster client", declare: bool = False,
                 patience: float = 60.0) -> None:
        self.settings = settings
        self.name = name
        self.patience = patience
        self.ring = NodeRing(settings)
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.reconnects = 0
        if declare:
            self._retry(lambda: Topology(settings).declare(self._connection()))

    def _connection(self) -> pika.BlockingConnection:
        if self.connection is None or not self.connection.is_open:
            if self.connection is not None:
                self.reconnects += 1
            self.connection = connect(self.settings, client_name=self.name, ring=self.ring)
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
        return self.connection

    def _channel(self) -> BlockingChannel:
        self._connection()
        assert self.channel is not None
        return self.channel

    def _retry(self, action: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.patience
        while True:
            try:
                with pika_boundary():
                    return action()
            except BrokerError:
                close_quietly(self.connection)
                self.connection = None
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def publish(self, queue: str, body: dict[str, Any]) -> None:
        """Publish until the broker confirms it (a publish cut off is sent again: a
        duplicate, never a loss, as a real BE's retry would)."""
        raw = json.dumps(body).encode()
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        self._retry(lambda: self._channel().basic_publish("", queue, raw, properties=props, mandatory=True))

    def drain(self, queue: str) -> list[Answer]:
        out: list[Answer] = []

        def read() -> None:
            while True:
                method, props, body = self._channel().basic_get(queue, auto_ack=True)
                if method is None or body is None:
                    return
                out.append(Answer(json.loads(body), props.message_id if props else None, queue))

        self._retry(read)
        return out

    def close(self) -> None:
        close_quietly(self.connection)
