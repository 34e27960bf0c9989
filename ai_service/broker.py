"""The pika boundary: connection parameters (TLS, heartbeat, no password in reprs),
connecting with errors wrapped into our own tree, and idempotent topology declaration.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable, Iterator
from functools import wraps
from typing import Any, ParamSpec, TypeVar, cast

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ai_service.cancels import declare_cancel_stream
from ai_service.config import BrokerNode, Settings
from ai_service.errors import AuthenticationFailed, BrokerError, ConnectionClosed, NotRouted, QueueNotFound
from ai_service.registry import OPERATIONS, Registry
from ai_service.registry import QueueNames as QueueNames  # re-exported: the consumer's and client's import

log = logging.getLogger("ai_service.broker")

def connection_parameters(
    settings: Settings, *, client_name: str, node: BrokerNode | None = None
) -> pika.ConnectionParameters:
    """pika parameters for one node (the first of ``RABBITMQ_HOST`` by default); TLS
    verifies that node's certificate against its own host name."""
    node = settings.rabbitmq_nodes[0] if node is None else node
    ssl_options = None
    if settings.rabbitmq_ssl:
        context = ssl.create_default_context(cafile=settings.rabbitmq_ca_file)
        if settings.rabbitmq_cert_file:
            context.load_cert_chain(settings.rabbitmq_cert_file, settings.rabbitmq_key_file)
        ssl_options = pika.SSLOptions(context, server_hostname=node.host)
    # pika-stubs types the timeouts as numbers.Real, which mypy cannot match: go via Any.
    options: dict[str, Any] = dict(
        blocked_connection_timeout=300.0,
        socket_timeout=10.0,
        stack_timeout=30.0,
    )
    if ssl_options is not None:
        options["ssl_options"] = ssl_options
    return pika.ConnectionParameters(
        host=node.host,
        port=node.port,
        virtual_host=settings.rabbitmq_vhost,
        credentials=pika.PlainCredentials(settings.rabbitmq_user, settings.rabbitmq_password),
        heartbeat=settings.rabbitmq_heartbeat,
        connection_attempts=1,
        client_properties={"connection_name": client_name, "product": "ai-service"},
        **options,
    )


def node_parameters(settings: Settings, *, client_name: str, start: int = 0) -> list[pika.ConnectionParameters]:
    """One parameter set per node of ``RABBITMQ_HOST``, beginning at node ``start`` (modulo
    their number) and wrapping round: pika's connect tries them in this order and keeps
    the first that answers."""
    nodes = settings.rabbitmq_nodes
    first = start % len(nodes)
    return [connection_parameters(settings, client_name=client_name, node=node)
            for node in nodes[first:] + nodes[:first]]


class NodeRing:
    """Which node the next connection tries first: the configured order to begin with,
    then the node after the one a connection was last on, so a reconnect after losing a
    node goes to the next one instead of waiting on the lost one first.

    One per reconnect loop (consumer, publisher): each loop owns its own ring."""

    def __init__(self, settings: Settings) -> None:
        self.nodes = settings.rabbitmq_nodes
        self.start = 0

    def connected(self, node: BrokerNode | None) -> None:
        """Remember the node a connection is on: the next connect begins after it."""
        if node in self.nodes:
            self.start = (self.nodes.index(node) + 1) % len(self.nodes)


def connected_node(connection: pika.BlockingConnection) -> BrokerNode | None:
    """The node of ``RABBITMQ_HOST`` ``connection`` is on (pika keeps the parameters that won)."""
    impl = getattr(connection, "_impl", None)
    params = getattr(impl, "params", None)
    if params is None:
        return None
    return BrokerNode(str(params.host), int(params.port))


def broker_name(connection: pika.BlockingConnection) -> str | None:
    """The broker's own name for itself (``cluster_name`` of its connection.start), if sent."""
    props = getattr(getattr(connection, "_impl", None), "server_properties", None) or {}
    name = props.get("cluster_name")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return str(name) if name else None


def describe_connection(connection: pika.BlockingConnection) -> str:
    """``node-b:5673 (rabbit@node-b)`` -- which node a connection is on, for the log."""
    node = connected_node(connection)
    where = str(node) if node is not None else "?"
    name = broker_name(connection)
    return f"{where} ({name})" if name else where


def pump(connection: pika.BlockingConnection, seconds: float) -> None:
    """Process I/O (heartbeats, deliveries, callbacks) for up to ``seconds``."""
    connection.process_data_events(time_limit=cast(Any, seconds))


def describe_endpoint(settings: Settings) -> str:
    """Where we connect, for logs: user, the node list, vhost -- never the password."""
    scheme = "amqps" if settings.rabbitmq_ssl else "amqp"
    vhost = "/" if settings.rabbitmq_vhost == "/" else "/" + settings.rabbitmq_vhost
    nodes = ",".join(str(node) for node in settings.rabbitmq_nodes)
    return f"{scheme}://{settings.rabbitmq_user}@{nodes}{vhost}"


def connect(settings: Settings, *, client_name: str, ring: NodeRing | None = None) -> pika.BlockingConnection:
    """Open a blocking connection to the first node that answers (from ``ring``'s start);
    pika's errors come out as our BrokerError family."""
    start = ring.start if ring is not None else 0
    try:
        # pika takes a sequence of parameters (pika-stubs types only one): try each in turn.
        nodes = cast(Any, node_parameters(settings, client_name=client_name, start=start))
        connection = pika.BlockingConnection(nodes)
    except pika.exceptions.ProbableAuthenticationError as exc:
        raise AuthenticationFailed(f"(403) ACCESS_REFUSED - {exc}") from None
    except pika.exceptions.ProbableAccessDeniedError as exc:
        raise AuthenticationFailed(f"(403) ACCESS_REFUSED to vhost {settings.rabbitmq_vhost!r} - {exc}") from None
    except pika.exceptions.AMQPError as exc:
        raise ConnectionClosed(describe_pika_error(exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionClosed(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. AMQPConnectorStackTimeout is no AMQPError
        raise ConnectionClosed(describe_pika_error(exc)) from None
    if ring is not None:
        ring.connected(connected_node(connection))
    if len(settings.rabbitmq_nodes) > 1:
        log.info("[RMQ] Connected to %s for %s", describe_connection(connection), client_name)
    return connection


def describe_pika_error(exc: BaseException) -> str:
    """pika exceptions often stringify to '' or a nested tuple; make them readable."""
    if isinstance(exc, pika.exceptions.AMQPConnectionError) and exc.args:
        inner = exc.args[0]
        if isinstance(inner, BaseException):
            return describe_pika_error(inner)
        if hasattr(inner, "exception"):  # pika's connection-workflow errors
            return describe_pika_error(inner.exception)
    text = str(exc) or repr(exc)
    return f"{exc.__class__.__name__}: {text}"


def queue_names(settings: Settings, op: str, operations: Registry = OPERATIONS) -> QueueNames:
    """The queues of ``op`` as ``settings`` name them (``ValueError`` for an unknown one)."""
    return operations[op].queues(settings)


def routing_key(op: str, kind: str, job_id: str) -> str:
    """``<op>.<update|result>.<job_id>`` -- what observers bind to."""
    return f"{op}.{kind}.{job_id}"


class Topology:
    """Declares every exchange, queue and binding the service uses, idempotently.

    A queue that already exists with other arguments is used as it is (passive
    declare) with one warning per queue and process, never a crash loop.
    """

    def __init__(self, settings: Settings, ops: Iterable[str] | None = None, *,
                 operations: Registry = OPERATIONS) -> None:
        self.settings = settings
        self.operations = operations
        self.ops = operations.names() if ops is None else tuple(ops)
        self._warned: set[str] = set()

    def queues(self, op: str) -> QueueNames:
        """The queues of ``op`` from this topology's registry (a test's fake operation too)."""
        return queue_names(self.settings, op, self.operations)

    def declare(self, connection: pika.BlockingConnection) -> None:
        s = self.settings
        channel = connection.channel()
        try:
            channel.exchange_declare(s.events_exchange, "topic", durable=True)
            channel.exchange_declare(s.control_exchange, "fanout", durable=True)
            channel.exchange_declare(s.dead_letter_exchange, "direct", durable=True)
            declare_cancel_stream(connection, s)  # cancels kept while no worker runs
            for op in self.ops:
                names = queue_names(s, op, self.operations)
                channel = self._queue(connection, channel, names.request, self.request_arguments(names))
                channel = self._queue(connection, channel, names.dlq, self.dlq_arguments())
                channel.queue_bind(names.dlq, s.dead_letter_exchange, routing_key=names.request)
                channel = self._queue(connection, channel, names.lease, self.lease_arguments(names))
                for kind, queue in (("update", names.update), ("result", names.result)):
                    if queue is None:
                        continue
                    channel = self._queue(connection, channel, queue, self._typed({}))
                    channel.queue_bind(queue, s.events_exchange, routing_key=f"{op}.{kind}.#")
        except pika.exceptions.AMQPError as exc:
            raise ConnectionClosed(f"declaring topology failed: {describe_pika_error(exc)}") from None
        finally:
            if channel.is_open:
                channel.close()

    def request_arguments(self, names: QueueNames) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-dead-letter-exchange": self.settings.dead_letter_exchange,
            "x-dead-letter-routing-key": names.request,
        }
        if self.settings.rabbitmq_queue_type == "quorum":
            args["x-delivery-limit"] = self.settings.rabbitmq_delivery_limit
        return self._typed(args)

    def lease_arguments(self, names: QueueNames) -> dict[str, Any]:
        """The holding queue's messages expire into the request queue.  A quorum queue
        dead-letters *at most once* by default: a lease message expiring while the request
        queue's leader is lost (its node killed) is dropped -- seen on the test cluster, 5
        and 10 of 400 -- and with it the job's way back should its worker die.  At least
        once (RabbitMQ 3.10+, needs ``reject-publish``) keeps it until the request queue
        has it (400 of 400)."""
        args: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.request}
        if self.settings.rabbitmq_queue_type == "quorum":
            args |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        return self._typed(args)

    def dlq_arguments(self) -> dict[str, Any]:
        """Dead letters are inspected (and returned) by people: never drop them for
        having been looked at too often (RabbitMQ 4 gives quorum queues a limit of 20)."""
        if self.settings.rabbitmq_queue_type == "quorum":
            return self._typed({"x-delivery-limit": 1_000_000})
        return self._typed({})

    def _typed(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"x-queue-type": self.settings.rabbitmq_queue_type, **args}

    def _queue(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, name: str, args: dict[str, Any]
    ) -> BlockingChannel:
        """Declare ``name``; on 406 inequivalent arguments fall back to a passive declare."""
        try:
            channel.queue_declare(name, durable=True, arguments=cast(Any, args))
            return channel
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:
                raise
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "[RMQ] ⚠️ Queue %r already exists with other arguments (%s); using it as it is",
                    name,
                    exc.reply_text,
                )
            channel = connection.channel()
            channel.queue_declare(name, passive=True)
            return channel


def ensure_channel_open(channel: BlockingChannel) -> None:
    if not channel.is_open:
        raise ConnectionClosed("channel was closed by the broker")


def wrap_pika(exc: BaseException) -> BrokerError:
    """Map a pika exception to our tree (use as ``raise wrap_pika(e) from None``)."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return AuthenticationFailed(f"(403) ACCESS_REFUSED - {exc}")
    if isinstance(exc, pika.exceptions.UnroutableError):
        return NotRouted("the broker could not route the message")
    if isinstance(exc, pika.exceptions.NackError):
        return BrokerError("the broker refused the message (nack)")
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 404:
        return QueueNotFound(describe_pika_error(exc))
    return ConnectionClosed(describe_pika_error(exc))


# --- the one connection primitive ------------------------------------------------------

#: What the pika boundary turns into our tree: pika's own errors and the socket's.
PIKA_ERRORS: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)

P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def pika_boundary() -> Iterator[None]:
    """Inside, any pika (or socket) error comes out as our :class:`BrokerError` family."""
    try:
        yield
    except PIKA_ERRORS as exc:
        raise wrap_pika(exc) from None


def at_pika_boundary(fn: Callable[P, R]) -> Callable[P, R]:
    """:func:`pika_boundary` around every call of ``fn``."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with pika_boundary():
            return fn(*args, **kwargs)

    return wrapper


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close ``connection`` if it is open; a broken one may fail to close, and that is fine."""
    if connection is None or not connection.is_open:
        return
    with contextlib.suppress(Exception):  # closing a broken connection may fail: fine
        connection.close()


@contextlib.contextmanager
def session(
    settings: Settings, *, client_name: str, ring: NodeRing | None = None
) -> Iterator[pika.BlockingConnection]:
    """One connection to the broker: connect (refusals as :class:`AuthenticationFailed` /
    :class:`ConnectionClosed`), pika's errors inside the block mapped to our tree, and the
    connection closed on the way out whatever happened.  Consumer, publisher and the CLI
    client all connect through it; their reconnect loops are loops around it, each with
    its own :class:`NodeRing` so that a reconnect moves on to another node of a cluster."""
    connection = connect(settings, client_name=client_name, ring=ring)
    try:
        with pika_boundary():
            yield connection
    finally:
        close_quietly(connection)
