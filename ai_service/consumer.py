"""The consumer runtime: I/O on one thread, handlers on others, one settle decision.

* The I/O thread owns the connection and only pumps it (``process_data_events``), so
  heartbeats flow however long a handler runs.
* Handlers run on a thread pool sized by the operation's prefetch.  They hand results
  back to the I/O thread through ``add_callback_threadsafe``; nothing else touches the
  channel.
* :func:`decide` is the single place that maps a handler's outcome to ack,
  reject-to-DLQ or requeue.
* The loop reconnects after refused connections, broker restarts
  (CONNECTION_FORCED), lost streams and channel closures; it backs off hard on
  ACCESS_REFUSED.
* Stopping is warm first (stop taking messages, let running handlers finish), forced on
  a second request (hand unfinished deliveries back to the queue).
* Control messages (cancels) cost the I/O thread a lookup; the operation's ``on_cancel``
  hook runs on one :class:`ControlExecutor` thread fed by a bounded queue (a flood of
  cancels is dropped past it, never turned into threads).
* Anything the I/O thread did not expect ends it as a *crash* (:attr:`Consumer.crashed`),
  which the worker turns into a non-zero exit for its supervisor.
* Classic queues count nothing: the consumer counts deliveries itself
  (:data:`DELIVERY_COUNT_HEADER`), republishing a request it retries (confirmed) before
  acking the original, so the delivery limit holds on any queue type.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import ValidationError

from ai_service import tracing
from ai_service.broker import (
    QueueNames,
    Topology,
    connect,
    describe_endpoint,
    describe_pika_error,
    pump,
    queue_names,
    routing_key,
)
from ai_service.config import Settings
from ai_service.errors import (
    AIServiceError,
    AuthenticationFailed,
    BrokerError,
    InvalidInput,
    JobHandedBack,
    PermanentError,
    RetryableError,
)
from ai_service.jobs import LEASE_HEADER
from ai_service.limits import Limits
from ai_service.messages import Cancel, InvalidRequest, _Message, derived_message_id, parse_request, readable_job_id
from ai_service.metrics import CONNECTED, CONSUMING, DISCONNECTED
from ai_service.operation import DeliveryInfo, JobContext, Operation, Resources
from ai_service.publisher import Backoff, Publisher, Receipt

log = logging.getLogger("ai_service.consumer")

#: How long a finished handler waits for its terminal message's confirm before settling.
TERMINAL_CONFIRM_TIMEOUT = 30.0
#: How long a redelivered request waits for a first run of it still going in this process.
REDELIVERY_WAIT = 300.0
#: With classic queues (no ``x-delivery-count``), the deliveries the consumer counted:
#: set on the copy of a request it republishes for a retry.
DELIVERY_COUNT_HEADER = "x-ai-delivery-count"
#: At most one "control queue full" warning per this many seconds (with the count dropped).
CONTROL_DROP_WARNING_INTERVAL = 10.0


class Outcome(enum.Enum):
    ACK = "ack"
    REJECT = "reject"  # dead-letter to <queue>.dlq
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    #: The error to answer the BE with (a ``*_failed`` message), if any.
    report: AIServiceError | None = None


class InternalError(PermanentError):
    error_code = "internal_error"


def decide(error: BaseException | None, delivery_count: int, delivery_limit: int) -> Decision:
    """The one mapping from a handler's outcome to what happens to the delivery.

    * success -> ack
    * invalid input -> answer ``invalid_request`` (or the error's code), dead-letter
    * permanent failure -> answer with its code, ack (the job is over)
    * retryable failure -> requeue, unless this was the last delivery the queue allows:
      then answer and dead-letter, so the BE still gets exactly one terminal message
    * job handed back (warm shutdown) -> requeue, no answer
    * anything unexpected (a bug) -> answer ``internal_error``, dead-letter for replay
    """
    if error is None:
        return Decision(Outcome.ACK)
    if isinstance(error, JobHandedBack):
        return Decision(Outcome.REQUEUE)
    if isinstance(error, InvalidInput):
        return Decision(Outcome.REJECT, error)
    if isinstance(error, RetryableError):
        if delivery_count + 1 >= delivery_limit:
            return Decision(Outcome.REJECT, error)
        return Decision(Outcome.REQUEUE)
    if isinstance(error, AIServiceError):
        return Decision(Outcome.ACK, error)
    return Decision(Outcome.REJECT, InternalError("internal error in the worker; the request was dead-lettered"))


@dataclass
class _Delivery:
    tag: int
    generation: int
    info: DeliveryInfo
    ctx: JobContext | None = None
    props: pika.BasicProperties | None = None  # as delivered, for a counted retry's copy
    acked: bool = False
    seen: _Seen | None = None  # this run, in the RequestTracker
    prior: _Seen | None = None  # for a redelivery: an earlier run of the same request in this process
    digest: bytes = b""

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.tag)


@dataclass
class _Seen:
    done: threading.Event = field(default_factory=threading.Event)
    answered: bool = False


class RequestTracker:
    """Requests in progress in this process, and the ones it answered.

    When the connection drops while a request is handled, or after it was answered but
    before the broker got its ack (an ack is never confirmed), the broker delivers it
    again (``redelivered``), possibly while the first run is still going.  Jobs with a
    job record (training, conversion) recognise that themselves; for the rest (inference)
    this tracker makes the redelivery wait for the first run and, if that one answered,
    be acked without a second answer.  Keyed by a digest of the body; the newest
    ``capacity`` answered requests are kept; a restart of the process forgets them.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[bytes, _Seen] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(body: bytes) -> bytes:
        return hashlib.sha256(body).digest()

    def begin(self, digest: bytes) -> _Seen:
        with self._lock:
            entry = self._seen[digest] = _Seen()
            self._seen.move_to_end(digest)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
            return entry

    def finish(self, digest: bytes) -> None:
        """The request was settled: keep it if it was answered (its ack may still be lost)."""
        with self._lock:
            entry = self._seen.get(digest)
            if entry is not None and not entry.answered:
                del self._seen[digest]

    def get(self, digest: bytes) -> _Seen | None:
        with self._lock:
            return self._seen.get(digest)

    def answered_before(self, digest: bytes, timeout: float) -> bool:
        """For a redelivery: wait for a first run still going, then True if it answered."""
        entry = self.get(digest)
        return entry is not None and entry.done.wait(timeout) and entry.answered


def count_deliveries(headers: dict[str, Any], redelivered: bool, *, counted_by_us: bool) -> int:
    """How many times this request was delivered before (0 on its first delivery).

    Quorum queues say it (``x-delivery-count``).  With ``counted_by_us`` (classic queues)
    our own :data:`DELIVERY_COUNT_HEADER` says it for the copies the consumer
    republished.  A redelivery (the broker gave it back after a lost connection or a
    crash) counts one more, and at least 1.
    """

    def number(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    count = number(headers.get("x-delivery-count"))
    if counted_by_us:
        count = max(count, number(headers.get(DELIVERY_COUNT_HEADER)) + (1 if redelivered else 0))
    if redelivered:
        count = max(count, 1)
    return count


class ControlExecutor:
    """Runs the operation's control hook (``on_cancel``) on ONE thread, from a bounded queue.

    :meth:`submit` never blocks and never starts a thread: a job already waiting is not
    queued twice, and past ``maxsize`` waiting cancels the rest is dropped (counted in
    ``ai_control_messages_total{result="dropped"}``, warned about at most every
    :data:`CONTROL_DROP_WARNING_INTERVAL` seconds).  Every worker on the fanout gets each
    cancel, and the job's own worker acts on it before this queue (see
    :meth:`Consumer._on_control`).
    """

    def __init__(
        self, hook: Callable[[str, Resources], None], resources: Resources, *, maxsize: int, name: str = "control"
    ) -> None:
        self.hook = hook
        self.resources = resources
        self.metrics = resources.metrics
        self.maxsize = max(1, maxsize)
        self._queue: queue.Queue[str | None] = queue.Queue(self.maxsize)
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._dropped = 0  # since the last warning
        self._dropped_total = 0
        self._last_warning = 0.0
        #: What ended the control thread, if anything did (the consumer then crashes too).
        self.crashed: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job_id: str) -> str:
        """Queue ``job_id`` for the hook: ``queued``, ``duplicate`` or ``dropped``."""
        with self._lock:
            if job_id in self._waiting:
                result = "duplicate"
            else:
                try:
                    self._queue.put_nowait(job_id)
                except queue.Full:
                    result = "dropped"
                else:
                    self._waiting.add(job_id)
                    result = "queued"
        self.metrics.control_messages.labels(result).inc()
        if result == "dropped":
            self._warn_dropped(job_id)
        return result

    def _warn_dropped(self, job_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._dropped += 1
            self._dropped_total += 1
            if now - self._last_warning < CONTROL_DROP_WARNING_INTERVAL and self._last_warning:
                return
            dropped, total, self._dropped, self._last_warning = self._dropped, self._dropped_total, 0, now
        log.warning(
            "[RMQ] ⚠️ Control queue full (%d cancels waiting for the cancel hook, CONTROL_QUEUE_SIZE): "
            "dropping cancels for jobs not running here (%d since the last warning, %d in all; the last for "
            "job %s); at most one such warning every %.0f s",
            self.maxsize, dropped, total, job_id, CONTROL_DROP_WARNING_INTERVAL,
        )

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop after the hook call in progress; cancels still waiting are abandoned."""
        self._stopping.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)
        left = self._queue.qsize()
        if left:
            log.info("[RMQ] %d cancel(s) for jobs not running here left unrecorded at stop", left)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - e.g. a hook calling sys.exit()
            self.crashed = exc
            log.critical("[RMQ] ❌ Control thread crashed: %r", exc, exc_info=exc)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None:
                continue
            with self._lock:
                self._waiting.discard(job_id)
            if self._stopping.is_set():
                return
            try:
                self.hook(job_id, self.resources)
            except Exception:  # noqa: BLE001 - a hook must not kill the worker
                log.exception("[RMQ] Cancel hook failed for job %s", job_id)


class Consumer:
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
        self.names: QueueNames = queue_names(settings, operation.name)
        self.publisher = publisher
        self.resources = resources
        self.topology = topology or Topology(settings)
        self._pool = ThreadPoolExecutor(max_workers=operation.prefetch, thread_name_prefix=f"{operation.name}-job")
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        #: Keyed by (channel generation, delivery tag): tags restart at 1 on every new
        #: channel, while a handler from before a reconnect may still be running.
        self._inflight: dict[tuple[int, int], _Delivery] = {}
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
                            name=f"{operation.name}-control")
            if operation.on_cancel is not None
            else None
        )

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self.control is not None:
            self.control.start()
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
        except BaseException as exc:  # noqa: BLE001 - recorded for the worker's exit code
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
        except BaseException:  # noqa: BLE001 - already crashing; the worker exits non-zero anyway
            log.exception("[RMQ] Cleaning up after the crash failed")

    def _run_loop(self) -> None:
        backoff = Backoff(cap=self.settings.reconnect_max_delay)
        while True:
            try:
                self._connect_and_consume(backoff)
            except AuthenticationFailed as exc:
                log.error("[RMQ] ❌ Failed to connect to RabbitMQ: %s", exc.message)
                backoff.attempt = 30  # back off hard: credentials will not fix themselves
            except (BrokerError, pika.exceptions.AMQPError, OSError) as exc:
                message = exc.message if isinstance(exc, BrokerError) else describe_pika_error(exc)
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
        name = f"ai-service {self.op.name} consumer ({self.settings.worker_name})"
        connection = connect(self.settings, client_name=name)
        self._connection = connection
        self.topology.declare(connection)
        channel = connection.channel()
        self._channel = channel
        self._generation += 1
        channel.basic_qos(prefetch_count=self.op.prefetch)
        control = channel.queue_declare("", exclusive=True, auto_delete=True)
        control_queue = str(control.method.queue)
        channel.queue_bind(control_queue, self.settings.control_exchange)
        channel.basic_consume(control_queue, self._on_control, auto_ack=True)
        if self.started.is_set():
            log.info("[RMQ] Reconnected to %s", describe_endpoint(self.settings))
            self.metrics.reconnects.labels("consumer").inc()
        backoff.reset()
        self.connected.set()
        self.metrics.consumer_state.set(CONNECTED)
        while not self._stop.is_set():
            if self._consumer_tag is None and self.busy < self.op.prefetch and not self._paused():
                self._consumer_tag = channel.basic_consume(self.names.request, self._on_message)
                if not self.started.is_set():
                    log.info(
                        "[RMQ] ✅ RabbitMQ consumer started (queue %r on %s, prefetch %d)",
                        self.names.request,
                        describe_endpoint(self.settings),
                        self.op.prefetch,
                    )
                    self.started.set()
                self.consuming.set()
                self.metrics.consumer_state.set(CONSUMING)
            pump(connection, 0.5)
            self._drain_calls()
            if not channel.is_open:
                raise BrokerError("channel was closed by the broker")
            if self.control is not None and self.control.crashed is not None:
                raise RuntimeError("the control thread crashed") from self.control.crashed
        # Warm stop: stop taking messages, keep pumping until handlers are done.
        self._cancel_consumer()
        self.consuming.clear()
        while self._inflight and not self._force.is_set():
            pump(connection, 0.5)
            self._drain_calls()
            if not channel.is_open:
                raise BrokerError("channel was closed by the broker")
        if self._force.is_set():
            self._hand_back_all()

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
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def _wake(self) -> None:
        connection = self._connection
        if connection is not None:
            try:
                connection.add_callback_threadsafe(lambda: None)
            except Exception:  # noqa: BLE001 - connection already gone; the loop polls
                pass

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

    def _on_control(
        self, channel: BlockingChannel, method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        """A lookup on the I/O thread; the hook goes to the one control thread's queue."""
        try:
            cancel = Cancel.model_validate_json(body)
        except ValidationError:
            self.metrics.control_messages.labels("malformed").inc()
            log.debug("[RMQ] Ignoring a malformed control message")
            return
        matched = False
        with self._inflight_lock:
            for d in self._inflight.values():
                if d.ctx is not None and d.ctx.job_id == cancel.job_id:
                    d.ctx.cancelled.set()
                    matched = True
        if matched:
            log.info("[RMQ] Cancel requested for job %s (running here)", cancel.job_id)
        else:
            log.debug("[RMQ] Cancel requested for job %s (not running here)", cancel.job_id)
        if self.control is not None:
            self.control.submit(cancel.job_id)
        else:
            self.metrics.control_messages.labels("no_hook").inc()

    def _on_message(
        self, channel: BlockingChannel, method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        headers = dict(props.headers or {})
        info = DeliveryInfo(
            redelivered=bool(method.redelivered),
            delivery_count=count_deliveries(headers, bool(method.redelivered), counted_by_us=self.counts_deliveries),
            reply_to=props.reply_to,
            correlation_id=props.correlation_id,
            headers=headers,
            body=body,
        )
        delivery = _Delivery(tag=method.delivery_tag or 0, generation=self._generation, info=info, props=props)
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

    def _count_redelivery(self, channel: BlockingChannel, delivery: _Delivery) -> bool:
        """Classic queues: a redelivery whose first run is not in this process (its worker
        died or lost its connection) is counted durably before it runs again: past the
        delivery limit it is dead-lettered unrun (a request that kills its worker every
        time); otherwise a copy carrying the count replaces it.  True when settled here."""
        count = delivery.info.delivery_count
        job = readable_job_id_from(delivery.info.body) or "?"
        if count >= self.settings.rabbitmq_delivery_limit:
            log.error("[Handler] [%s] Delivered %d times without being settled (the worker died on it?): "
                      "dead-lettering it (RABBITMQ_DELIVERY_LIMIT=%d)", job, count,
                      self.settings.rabbitmq_delivery_limit)
            channel.basic_reject(delivery.tag, requeue=False)
            self.metrics.jobs.labels(self.op.name, "dead_lettered").inc()
            return True
        if self._republish_counted(delivery, count):
            log.info("[Handler] [%s] Redelivered: counted as delivery %d of %d", job, count + 1,
                     self.settings.rabbitmq_delivery_limit)
            channel.basic_ack(delivery.tag)
            return True
        return False

    # --- handler threads -------------------------------------------------------------

    def _handle(self, delivery: _Delivery) -> None:
        with self._handlers_cond:
            self._handlers_running += 1
        info = delivery.info
        span = tracing.consume(self.names.request, info.headers, op=self.op.name, correlation_id=info.correlation_id,
                               redelivered=info.redelivered, delivery_count=info.delivery_count,
                               body_size=len(info.body))
        try:
            self._handle_delivery(delivery)
        finally:
            span.end()
            with self._handlers_cond:
                self._handlers_running -= 1
                self._handlers_cond.notify_all()

    def _handle_delivery(self, delivery: _Delivery) -> None:
        started = time.monotonic()
        error: BaseException | None = None
        job_id: str | None = None
        prior = delivery.prior
        if prior is not None and prior.done.wait(REDELIVERY_WAIT) and prior.answered:
            log.info("[Handler] [%s] Answered before the connection dropped; acknowledging the redelivery only",
                     readable_job_id_from(delivery.info.body) or "?")
            self._call_on_io(lambda: self._settle(delivery, Outcome.ACK))
            return
        seen = delivery.seen = delivery.seen or self.tracker.begin(delivery.digest)
        try:
            request, _ = parse_request(self.op.request_model, delivery.info.body, self.settings.max_message_bytes,
                                       self.limits)
            job_id = str(request.job_id)
            tracing.current_span().set("ai.job_id", job_id)
            ctx = JobContext(
                op=self.op.name,
                job_id=job_id,
                settings=self.settings,
                resources=self.resources,
                delivery=delivery.info,
                outbox=DeliveryOutbox(self, job_id, delivery.info),
                ack_now_cb=lambda: self._call_on_io(lambda: self._ack_early(delivery)),
            )
            if self._stop.is_set():
                ctx.shutdown.set()
            delivery.ctx = ctx
            ctx.log.info("Received %s request (delivery %d)", self.op.name, delivery.info.delivery_count + 1)
            self.op.handler(request, ctx)
        except InvalidRequest as exc:
            job_id = exc.job_id
            error = exc
        except BaseException as exc:  # noqa: BLE001 - every outcome goes through decide()
            error = exc
            if job_id is None:
                job_id = readable_job_id_from(delivery.info.body)
        decision = decide(error, delivery.info.delivery_count, self.settings.rabbitmq_delivery_limit)
        self._log_outcome(job_id, error, decision)
        job_ctx = delivery.ctx
        already_answered = job_ctx is not None and job_ctx.terminal is not None
        self._trace_outcome(job_id, error, decision, job_ctx)
        receipt: Receipt | None = None
        if decision.report is not None and job_id is not None and not already_answered:
            failure = self.op.failure(job_id, decision.report)
            receipt = DeliveryOutbox(self, job_id, delivery.info).emit("result", failure)
        elif job_ctx is not None:
            receipt = job_ctx.terminal_receipt
        if receipt is not None:
            seen.answered = True  # spooled at least: it reaches the BE
        seen.done.set()
        if receipt is not None:
            receipt.wait(TERMINAL_CONFIRM_TIMEOUT)
        retry = decision.outcome is Outcome.REQUEUE and error is not None and not isinstance(error, JobHandedBack)
        if retry:
            time.sleep(min(30.0, 2.0 ** delivery.info.delivery_count))
        self.handled += 1
        self._count(delivery, decision, started)
        counted = retry and self.counts_deliveries
        self._call_on_io(lambda: self._settle(delivery, decision.outcome, counted_retry=counted))

    @staticmethod
    def _trace_outcome(job_id: str | None, error: BaseException | None, decision: Decision,
                       ctx: JobContext | None) -> None:
        span = tracing.current_span()
        span.set("ai.job_id", job_id)
        span.set("ai.outcome", decision.outcome.value)
        terminal = ctx.terminal if ctx is not None else None
        span.set("ai.job.status", getattr(terminal, "status", None))
        if decision.report is not None:
            span.fail(decision.report if error is None or isinstance(error, AIServiceError) else error)
        elif getattr(terminal, "error_code", None):
            span.fail(f"{getattr(terminal, 'type', 'failed')}: {getattr(terminal, 'error_code', '')}")

    def _count(self, delivery: _Delivery, decision: Decision, started: float) -> None:
        ctx = delivery.ctx
        if ctx is not None and ctx.terminal is not None:
            status = str(getattr(ctx.terminal, "status", "completed"))
        elif decision.report is not None:
            status = "invalid" if decision.outcome is Outcome.REJECT else "failed"
        else:
            status = "requeued" if decision.outcome is Outcome.REQUEUE else "no_result"
        self.metrics.jobs.labels(self.op.name, status).inc()
        self.metrics.job_seconds.labels(self.op.name).observe(time.monotonic() - started)

    def _log_outcome(self, job_id: str | None, error: BaseException | None, decision: Decision) -> None:
        prefix = f"[Handler] [{job_id or '?'}]"
        if error is None:
            log.info("%s Done", prefix, extra={"job_id": job_id, "op": self.op.name})
        elif isinstance(error, AIServiceError):
            log.warning(
                "%s %s: %s -> %s",
                prefix,
                error.error_code,
                error.message,
                decision.outcome.value,
                extra={"job_id": job_id, "op": self.op.name},
            )
        else:
            log.error(
                "%s Unexpected error -> %s",
                prefix,
                decision.outcome.value,
                exc_info=error,
                extra={"job_id": job_id, "op": self.op.name},
            )

    # --- settling (I/O thread) -------------------------------------------------------

    def _ack_early(self, delivery: _Delivery) -> None:
        """Stop consuming first (so no new job arrives while this one runs), then ack."""
        if not self._usable(delivery):
            return
        self._cancel_consumer()
        assert self._channel is not None
        self._channel.basic_ack(delivery.tag)
        delivery.acked = True

    def _settle(self, delivery: _Delivery, outcome: Outcome, *, counted_retry: bool = False) -> None:
        with self._inflight_lock:
            self._inflight.pop(delivery.key, None)
        usable = delivery.acked or self._usable(delivery)
        if delivery.seen is not None:
            self.tracker.finish(delivery.digest)
        if delivery.acked:
            return
        if not usable:
            log.warning(
                "[RMQ] Delivery %d belongs to a closed channel; the broker has already requeued it",
                delivery.tag,
            )
            return
        assert self._channel is not None
        if outcome is Outcome.REQUEUE and counted_retry and self._republish_counted(
            delivery, delivery.info.delivery_count + 1
        ):
            self._channel.basic_ack(delivery.tag)
        elif outcome is Outcome.ACK:
            self._channel.basic_ack(delivery.tag)
        elif outcome is Outcome.REJECT:
            self._channel.basic_reject(delivery.tag, requeue=False)
        else:
            self._channel.basic_nack(delivery.tag, requeue=True)

    def _republish_counted(self, delivery: _Delivery, count: int) -> bool:
        """Classic queues: put a copy of the request (same body and properties, its
        deliveries so far in :data:`DELIVERY_COUNT_HEADER`) at the end of its queue,
        confirmed, on this connection.  True when the broker confirmed it (the original
        may be acked); False: leave the original to the uncounted path."""
        connection = self._connection
        if connection is None:
            return False
        props = copy.copy(delivery.props) if delivery.props is not None else pika.BasicProperties()
        props.headers = {**(props.headers or {}), DELIVERY_COUNT_HEADER: count}
        try:
            if self._retry_channel is None or not self._retry_channel.is_open:
                self._retry_channel = connection.channel()
                self._retry_channel.confirm_delivery()
            self._retry_channel.basic_publish("", self.names.request, delivery.info.body, properties=props,
                                              mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError, pika.exceptions.ChannelClosed) as exc:
            self._retry_channel = None
            log.warning("[RMQ] Could not republish delivery %d with its count (%s); leaving it uncounted",
                        delivery.tag, describe_pika_error(exc))
            return False
        self.metrics.retries_republished.labels(self.op.name).inc()
        return True

    def _usable(self, delivery: _Delivery) -> bool:
        return (
            self._channel is not None
            and self._channel.is_open
            and delivery.generation == self._generation
        )

    def _hand_back_all(self) -> None:
        with self._inflight_lock:
            deliveries = list(self._inflight.values())
            self._inflight.clear()
        for d in deliveries:
            if not d.acked and self._usable(d):
                assert self._channel is not None
                self._channel.basic_nack(d.tag, requeue=True)
                log.warning("[RMQ] Forced stop: delivery %d handed back to the queue", d.tag)


def readable_job_id_from(body: bytes) -> str | None:
    try:
        return readable_job_id(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        return None


class DeliveryOutbox:
    """Everything a handler publishes for one delivery goes through the shared publisher."""

    def __init__(self, consumer: Consumer, job_id: str, info: DeliveryInfo) -> None:
        self.publisher = consumer.publisher
        self.settings = consumer.settings
        self.names = consumer.names
        self.op = consumer.op.name
        self.job_id = job_id
        self.info = info
        #: The job's trace context (its consume span), for publishes from other threads.
        self.trace = tracing.current()

    def _correlation(self) -> str:
        return self.info.correlation_id or self.job_id

    #: The last ``progress`` this job published (read by :meth:`Consumer.current_jobs`).
    progress: float | None = None

    def emit(self, kind: str, message: _Message, *, message_id: str | None = None) -> Receipt:
        progress = getattr(message, "progress", None)
        self.progress = float(progress) if isinstance(progress, (int, float)) else self.progress
        message_type = str(getattr(message, "type", ""))
        if message_id is None and self.op == "infer" and kind == "result":
            # Inference keeps no job record: an answer sent again after a redelivery the
            # tracker could not recognise (a broker restart) carries the same message_id.
            message_id = derived_message_id("infer", self.job_id, message_type)
        return self.republish(kind, message.to_json_dict(), message_type, message_id)

    def republish(
        self, kind: str, payload: dict[str, Any], message_type: str, message_id: str | None
    ) -> Receipt:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        if kind == "result" and self.info.reply_to:
            exchange, key = "", self.info.reply_to
        else:
            exchange, key = self.settings.events_exchange, routing_key(self.op, kind, self.job_id)
        with tracing.within(self.trace):
            return self.publisher.publish(
                exchange, key, body, message_type=message_type, correlation_id=self._correlation(),
                message_id=message_id,
            )

    def _request(self, exchange: str, key: str, **extra: Any) -> Receipt:
        headers = {k: v for k, v in self.info.headers.items() if not k.startswith("x-") or k == LEASE_HEADER}
        headers.update(extra.pop("headers", {}))
        with tracing.within(self.trace):
            return self.publisher.publish(
                exchange, key, self.info.body, message_type="request", correlation_id=self.info.correlation_id,
                headers=headers or None, **extra,
            )

    def lease(self, token: str, ttl_ms: int) -> Receipt:
        return self._request("", self.names.lease, headers={LEASE_HEADER: token}, expiration=str(ttl_ms))

    def resubmit(self) -> Receipt:
        headers = {k: v for k, v in self.info.headers.items() if k != LEASE_HEADER}
        info, self.info = self.info, DeliveryInfo(**{**self.info.__dict__, "headers": headers})
        try:
            return self._request("", self.names.request)
        finally:
            self.info = info

    def dead_letter(self) -> Receipt:
        return self._request(self.settings.dead_letter_exchange, self.names.request)
