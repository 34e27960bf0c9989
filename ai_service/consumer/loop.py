"""The consumer's I/O loop: one thread owns the connection and only pumps it.

* Heartbeats flow however long a handler runs: handlers run on a pool sized by the
  operation's prefetch and hand results back through ``add_callback_threadsafe``.
* The loop reconnects after refused connections, broker restarts (CONNECTION_FORCED),
  lost streams and channel closures; it backs off hard on ACCESS_REFUSED.
* Stopping is warm first (stop taking messages, let running handlers finish), forced on
  a second request (hand unfinished deliveries back to the queue).
* Anything the I/O thread did not expect ends it as a *crash* (:attr:`Consumer.crashed`),
  which the worker turns into a non-zero exit for its supervisor.

What it does with a delivery is in :mod:`.handlers` and :mod:`.settling`, with a cancel in
:mod:`.cancelling` (mixins); this module keeps the connection, the channels and stopping.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from ai_service.broker import (
    NodeRing,
    QueueNames,
    Topology,
    close_quietly,
    connected_node,
    describe_endpoint,
    describe_pika_error,
    pump,
    session,
)
from ai_service.cancels import CancelStream
from ai_service.config import Settings
from ai_service.consumer.cancelling import Cancelling
from ai_service.consumer.control import ControlExecutor
from ai_service.consumer.handlers import Delivery, Handlers
from ai_service.consumer.settling import Settling
from ai_service.consumer.tracker import RequestTracker, came_back_from, count_deliveries
from ai_service.errors import AuthenticationFailed, BrokerError
from ai_service.jobs.ledger import announce_lease_protocol
from ai_service.limits import Limits
from ai_service.metrics import CONNECTED, CONSUMING, DISCONNECTED
from ai_service.operation import DeliveryInfo, Operation, Resources
from ai_service.publisher import Backoff, Publisher

log = logging.getLogger("ai_service.consumer")


class Consumer(Cancelling, Handlers, Settling):
    """Consumes one operation's request queue and the control exchange."""

    def __init__(
        self,
        settings: Settings,
        operation: Operation,
        publisher: Publisher,
        resources: Resources,
        topology: Topology | None = None,
    ) -> None:
        self.settings = settings
        self.op = operation
        self.topology = topology or Topology(settings)
        self._nodes = NodeRing(settings)  # a reconnect begins at the node after the one it lost
        self.names: QueueNames = self.topology.queues(operation.name)
        self.publisher = publisher
        self.resources = resources
        self._pool = ThreadPoolExecutor(max_workers=operation.prefetch, thread_name_prefix=f"{operation.name}-job")
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        #: Keyed by (channel generation, delivery tag): tags restart at 1 on every new
        #: channel, while a handler from before a reconnect may still be running.
        self._inflight: dict[tuple[int, int], Delivery] = {}
        self._inflight_lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._generation = 0
        self._consumer_tag: str | None = None
        self._stop = threading.Event()
        self._force = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = threading.Event()  # consuming for the first time
        self.first_attempt_done = threading.Event()
        self.consuming = threading.Event()
        self.connected = threading.Event()
        self.handled = 0
        self.metrics = resources.metrics
        self.tracker = RequestTracker()
        self.limits = Limits.from_settings(settings)
        #: The exception that ended the I/O thread unasked (a bug), if one did.
        self.crashed: BaseException | None = None
        #: Classic queues do not count deliveries: count them ourselves (see count_deliveries).
        self.counts_deliveries = settings.rabbitmq_queue_type == "classic"
        self._retry_channel: BlockingChannel | None = None
        self._handlers_running = 0
        self._handlers_cond = threading.Condition()
        self.control = (
            ControlExecutor(operation.on_cancel, resources, maxsize=settings.control_queue_size,
                            name=f"{operation.name}-control", on_room=self._room_for_cancels)
            if operation.on_cancel is not None
            else None
        )
        #: Durable cancels (read from the cancel stream) for operations that act on cancels.
        self.cancels = CancelStream(settings) if self.control is not None else None
        self._stream_channel: BlockingChannel | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self.control is not None:
            self.control.start()
            if self.resources.storage is not None:  # long jobs: say how their leases are written
                announce_lease_protocol(self.resources.storage)
        self._thread = threading.Thread(target=self._run, name="consumer-io", daemon=True)
        self._thread.start()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, *, force: bool = False) -> None:
        """Warm stop: no new deliveries, running handlers finish. ``force``: hand back now."""
        if force:
            self._force.set()
        self._stop.set()
        with self._inflight_lock:
            for d in self._inflight.values():
                if d.ctx is not None:
                    d.ctx.shutdown.set()
        self._wake()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def busy(self) -> int:
        with self._inflight_lock:
            return len(self._inflight)

    def current_jobs(self) -> list[tuple[str, float | None]]:
        """(job_id, last progress it published) of each job running here, oldest first."""
        with self._inflight_lock:
            contexts = [d.ctx for d in self._inflight.values() if d.ctx is not None]
        return [(c.job_id, getattr(c.outbox, "progress", None)) for c in contexts]

    def wait_handlers(self, timeout: float) -> bool:
        """Wait until no handler thread runs (after a crash, settling is impossible and
        ``busy`` never drops); False if one still runs after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._handlers_cond:
            while self._handlers_running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._handlers_cond.wait(left)
        return True

    # --- I/O thread ------------------------------------------------------------------

    def _run(self) -> None:
        """The I/O thread.  Whatever it did not expect ends it as a crash, never silently."""
        try:
            self._run_loop()
        except BaseException as exc:  # recorded for the worker's exit code
            self.crashed = exc
            log.critical("[RMQ] ❌ Consumer crashed on its I/O thread: %s; the worker stops",
                         describe_pika_error(exc), exc_info=exc)
            self._after_crash()
        finally:
            if self.control is not None:
                self.control.stop()

    def _after_crash(self) -> None:
        """Close what is open; running handlers are told to stop (their deliveries go back
        to the queue with the connection)."""
        try:
            self.consuming.clear()
            self.connected.clear()
            self.first_attempt_done.set()
            self.metrics.consumer_state.set(DISCONNECTED)
            self._close_connection()
            with self._inflight_lock:
                for d in self._inflight.values():
                    if d.ctx is not None:
                        d.ctx.shutdown.set()
            self._pool.shutdown(wait=False, cancel_futures=True)
        except BaseException:  # already crashing; the worker exits non-zero anyway
            log.exception("[RMQ] Cleaning up after the crash failed")

    def _run_loop(self) -> None:
        backoff = Backoff(cap=self.settings.reconnect_max_delay)
        while True:
            try:
                self._connect_and_consume(backoff)
            except AuthenticationFailed as exc:
                log.error("[RMQ] ❌ Failed to connect to RabbitMQ: %s", exc.message)
                backoff.attempt = 30  # back off hard: credentials will not fix themselves
            except BrokerError as exc:  # the session maps pika's and the socket's errors
                message = exc.message
                if self.consuming.is_set():
                    log.warning("[RMQ] Connection lost: %s; reconnecting", message)
                else:
                    log.error("[RMQ] ❌ Failed to connect to RabbitMQ: %s", message)
            finally:
                self.consuming.clear()
                self.connected.clear()
                self.metrics.consumer_state.set(DISCONNECTED)
                self.first_attempt_done.set()
                self._close_connection()
            if self._stop.is_set() and (self._force.is_set() or not self._inflight):
                break
            delay = backoff.next()
            log.info("[RMQ] Retrying in %.1f s", delay)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not (self._force.is_set()):
                if self._stop.is_set() and not self._inflight:
                    break
                time.sleep(0.1)
            if self._force.is_set():
                break
        self._pool.shutdown(wait=not self._force.is_set(), cancel_futures=True)
        log.info("[RMQ] Consumer stopped")

    def _connect_and_consume(self, backoff: Backoff) -> None:
        """One connection's life, through the one primitive (:func:`broker.session`)."""
        name = f"ai-service {self.op.name} consumer ({self.settings.worker_name})"
        with session(self.settings, client_name=name, ring=self._nodes) as connection:
            self._connection = connection
            self.metrics.on_broker_node("consumer", str(connected_node(connection) or "unknown"))
            self.topology.declare(connection)
            channel = self._open_channel(connection)
            if self.started.is_set():
                log.info("[RMQ] Reconnected to %s", describe_endpoint(self.settings))
                self.metrics.reconnects.labels("consumer").inc()
            backoff.reset()
            self.connected.set()
            self.metrics.consumer_state.set(CONNECTED)
            self._consume(connection, channel)

    def _open_channel(self, connection: pika.BlockingConnection) -> BlockingChannel:
        """The channel deliveries come on, with this process's own control queue bound."""
        channel = connection.channel()
        self._channel = channel
        self._generation += 1
        channel.basic_qos(prefetch_count=self.op.prefetch)
        control = channel.queue_declare("", exclusive=True, auto_delete=True)
        control_queue = str(control.method.queue)
        channel.queue_bind(control_queue, self.settings.control_exchange)
        channel.basic_consume(control_queue, self._on_control, auto_ack=True)
        if self.cancels is not None:
            self._stream_channel = self.cancels.consume(connection, self._on_stream_cancel)
        return channel

    def _consume(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        while not self._stop.is_set():
            if self._consumer_tag is None and self.busy < self.op.prefetch and not self._paused() and (
                self.cancels is None or self._stream_channel is None or self.cancels.ready()
            ):
                self._consumer_tag = channel.basic_consume(self.names.request, self._on_message)
                if not self.started.is_set():
                    log.info("[RMQ] ✅ RabbitMQ consumer started (queue %r on %s, prefetch %d)",
                             self.names.request, describe_endpoint(self.settings), self.op.prefetch)
                    self.started.set()
                self.consuming.set()
                self.metrics.consumer_state.set(CONSUMING)
            self._pump_once(connection, channel)
            if self.control is not None and self.control.crashed is not None:
                raise RuntimeError("the control thread crashed") from self.control.crashed
            if self.publisher.crashed is not None:  # nothing would be answered: let supervisord restart us
                raise RuntimeError("the publisher thread crashed") from self.publisher.crashed
        # Warm stop: stop taking messages, keep pumping until handlers are done.
        self._cancel_consumer()
        self.consuming.clear()
        while self._inflight and not self._force.is_set():
            self._pump_once(connection, channel)
        if self._force.is_set():
            self._hand_back_all()

    def _pump_once(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        pump(connection, 0.5)
        self._drain_calls()
        self._hand_on_stream_cancels()
        if not channel.is_open:
            raise BrokerError("channel was closed by the broker")
        if self._stream_channel is not None and not self._stream_channel.is_open:
            raise BrokerError("the cancel stream's channel was closed by the broker")

    def _paused(self) -> bool:
        """Long jobs acked early keep the consumer off the queue until they end."""
        with self._inflight_lock:
            return any(d.acked for d in self._inflight.values())

    def _cancel_consumer(self) -> None:
        if self._consumer_tag is not None and self._channel is not None and self._channel.is_open:
            self._channel.basic_cancel(self._consumer_tag)
            self.metrics.consumer_state.set(CONNECTED)
        self._consumer_tag = None

    def _close_connection(self) -> None:
        self._consumer_tag = None
        self._retry_channel = None
        self._stream_channel = None
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)

    def _wake(self) -> None:
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):  # connection already gone; the loop polls
                connection.add_callback_threadsafe(lambda: None)

    def _call_on_io(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread (the only thread that touches the channel)."""
        self._calls.put(fn)
        self._wake()

    def _drain_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def _on_message(
        self, channel: BlockingChannel, method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        headers = dict(props.headers or {})
        counted = self.counts_deliveries or came_back_from(headers, self.names.lease)
        info = DeliveryInfo(
            redelivered=bool(method.redelivered),
            delivery_count=count_deliveries(headers, bool(method.redelivered), counted_by_us=counted),
            reply_to=props.reply_to,
            correlation_id=props.correlation_id,
            headers=headers,
            body=body,
        )
        delivery = Delivery(tag=method.delivery_tag or 0, generation=self._generation, info=info, props=props)
        # Registered here, in delivery order, so that a redelivery always finds its first run.
        delivery.digest = RequestTracker.digest(body)
        delivery.prior = self.tracker.get(delivery.digest) if info.redelivered else None
        if self.counts_deliveries and info.redelivered and delivery.prior is None and self._count_redelivery(
            channel, delivery
        ):
            return
        if delivery.prior is None:
            delivery.seen = self.tracker.begin(delivery.digest)
        with self._inflight_lock:
            self._inflight[delivery.key] = delivery
        self._pool.submit(self._handle, delivery)
