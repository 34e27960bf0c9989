"""Cancels on the I/O thread: from the control fanout and from the durable cancel stream,
each stopping the job if it runs here and handed once to the operation's cancel hook.

Mixed into :class:`~ai_service.consumer.loop.Consumer`; apart from the loop because it
is the one path with its own back-pressure (stream cancels wait, in order, for room in
the control queue: :mod:`.control`).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import pika
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import ValidationError

from ai_service.cancels import CancelStream
from ai_service.consumer.control import ControlExecutor
from ai_service.consumer.handlers import Delivery
from ai_service.messages import Cancel
from ai_service.metrics import Metrics

log = logging.getLogger("ai_service.consumer")


class Cancelling:
    """What the consumer does with a cancel (its consumers' callbacks, on the I/O thread)."""

    metrics: Metrics
    control: ControlExecutor | None
    cancels: CancelStream | None
    _stream_channel: BlockingChannel | None
    _inflight: dict[tuple[int, int], Delivery]
    _inflight_lock: threading.Lock

    if TYPE_CHECKING:  # in Consumer
        def _wake(self) -> None: ...

    def _on_control(
        self, channel: BlockingChannel, method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        """A cancel on the fanout: a lookup on the I/O thread; past the control queue's bound
        it is dropped (the cancel stream brings it again, at the control thread's pace)."""
        job_id = self._parse_cancel(body)
        if job_id is not None:
            self._cancel(job_id, drop=True)

    def _on_stream_cancel(
        self, channel: BlockingChannel, method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        """A cancel read from the cancel stream (also one sent before this worker started):
        acked once handed on, so that a flood waits in the broker."""
        assert self.cancels is not None
        offset = self.cancels.delivered(props.headers)
        tag = method.delivery_tag or 0
        job_id = None if self.cancels.is_sync(props.headers) else self._parse_cancel(body)
        if job_id is None:
            channel.basic_ack(tag)
            return
        self._stop_here(job_id)
        if not self.cancels.pending and self._hand_on(job_id, drop=False):
            channel.basic_ack(tag)
        else:
            self.cancels.pending.append((tag, job_id, offset))  # in order, behind those waiting

    def _room_for_cancels(self) -> None:
        """(control thread) Wake the I/O thread when stream cancels wait for the hook."""
        if self.cancels is not None and self.cancels.pending:
            self._wake()

    def _hand_on_stream_cancels(self) -> None:
        """Stream cancels that waited for room in the control queue, in order."""
        cancels, channel = self.cancels, self._stream_channel
        if cancels is None or channel is None or not channel.is_open:
            return
        while cancels.pending:
            tag, job_id, _ = cancels.pending[0]
            if not self._hand_on(job_id, drop=False):
                return
            cancels.pending.popleft()
            channel.basic_ack(tag)

    def _parse_cancel(self, body: bytes) -> str | None:
        try:
            return Cancel.model_validate_json(body).job_id
        except ValidationError:
            self.metrics.control_messages.labels("malformed").inc()
            log.debug("[RMQ] Ignoring a malformed control message")
            return None

    def _cancel(self, job_id: str, *, drop: bool) -> bool:
        """Stop ``job_id`` if it runs here and give it to the cancel hook once (a cancel comes
        on both the fanout and the stream); False when the hook's queue has no room."""
        self._stop_here(job_id)
        return self._hand_on(job_id, drop=drop)

    def _stop_here(self, job_id: str) -> None:
        matched = False
        with self._inflight_lock:
            for d in self._inflight.values():
                if d.ctx is not None and d.ctx.job_id == job_id:
                    d.ctx.cancelled.set()
                    matched = True
        if matched:
            log.info("[RMQ] Cancel requested for job %s (running here)", job_id)
        else:
            log.debug("[RMQ] Cancel requested for job %s (not running here)", job_id)
        if self.cancels is not None:
            self.cancels.read(job_id)

    def _hand_on(self, job_id: str, *, drop: bool) -> bool:
        if self.control is None:
            self.metrics.control_messages.labels("no_hook").inc()
            return True
        cancels = self.cancels
        if cancels is not None and cancels.handed(job_id):
            self.metrics.control_messages.labels("duplicate").inc()
            return True
        result = self.control.submit(job_id, drop=drop)
        if result == "full":
            return False
        if result != "dropped" and cancels is not None:
            cancels.hand(job_id)
        return True
