"""Messages the broker refuses for good (nacked ``NACK_LIMIT`` times in a row, or the channel
closed with 406 while they were in flight): out of the spool, into the refused file, their
replacement (a ``*_failed``, :mod:`.replacements`) published in their place.

Mixed into :class:`~ai_service.publisher.Publisher`, whose spool, receipts and pending
queue it edits under the publisher's lock; apart because it is the one path that swaps one
spooled message for another.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import pika.exceptions

from ai_service.config import Settings
from ai_service.publishing.receipts import Receipt
from ai_service.publishing.replacements import Replacer
from ai_service.spool import Envelope, RefusedLog, Spool

log = logging.getLogger("ai_service.publisher")

#: A message nacked this many times in a row is refused for good.
NACK_LIMIT = 3

#: ``on_refused(code, envelope, reason)`` with code ``too_large``, ``precondition_failed`` or ``nacked``.
RefusedHook = Callable[[str, Envelope, str], None]

_BROKER_SIZE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


class Refusals:
    """The refusal half of the pipeline's feed (called on the publisher thread)."""

    settings: Settings
    spool: Spool
    refused_log: RefusedLog
    refused_count: int
    _cond: threading.Condition
    _unconfirmed: dict[int, Envelope]
    _receipts: dict[int, Receipt]
    _nacks: dict[int, int]
    _replace: Replacer | None
    _on_refused: RefusedHook | None

    def on_nacked(self, envelope: Envelope) -> tuple[float, Envelope] | None:
        """What to send again after how many seconds: the message itself, or its replacement
        once it is refused for good; None when it is refused with nothing in its place."""
        count = self._nacks.get(envelope.seq, 0) + 1
        self._nacks[envelope.seq] = count
        if count < NACK_LIMIT:
            log.warning("[RMQ] Broker nacked message %s (%d of %d); will retry", envelope.message_id, count, NACK_LIMIT)
            return 0.5 * count, envelope
        self._nacks.pop(envelope.seq, None)  # a replacement takes the same seq: its nacks count afresh
        replacement = self._refuse(envelope, "nacked", (
            f"message of {len(envelope.body):,} bytes was nacked by the broker {NACK_LIMIT} times in a row "
            "(a queue at its x-max-length with overflow reject-publish, or a broker alarm)"))
        return (0.0, replacement) if replacement is not None else None

    def on_broker_refusal(self, envelope: Envelope, exc: pika.exceptions.ChannelClosedByBroker) -> None:
        self._refuse(envelope, *self._broker_refusal(envelope, exc))

    @staticmethod
    def _broker_refusal(envelope: Envelope, exc: pika.exceptions.ChannelClosedByBroker) -> tuple[str, str]:
        text = str(exc.reply_text)[:300]
        m = _BROKER_SIZE.search(text)
        if m:
            return "too_large", (f"message of {int(m.group(1)):,} bytes is larger than the broker's "
                                 f"{int(m.group(2)):,}-byte max_message_size (set MAX_MESSAGE_BYTES to it)")
        return "precondition_failed", (f"message of {len(envelope.body):,} bytes was refused by the broker "
                                       f"({exc.reply_code} {text})")

    def _refuse(self, envelope: Envelope, code: str, reason: str) -> Envelope | None:
        """Take a refused message out of the spool, its replacement (if any, returned) in its place."""
        with self._cond:
            receipt = self._receipts.get(envelope.seq)
        replacement = self._refused(envelope, code, reason, receipt)
        with self._cond:
            self._receipts.pop(envelope.seq, None)
            if replacement is not None:
                self.spool.swap(envelope, replacement)  # one record: never both, never neither
                if envelope.seq in self._unconfirmed:
                    self._unconfirmed[envelope.seq] = replacement
                if receipt is not None:
                    self._receipts[replacement.seq] = receipt
            else:
                self.spool.remove(envelope)
                self._unconfirmed.pop(envelope.seq, None)
            self._cond.notify_all()
        if replacement is None and receipt is not None:
            receipt._set()
        return replacement

    def _refused(self, envelope: Envelope, code: str, reason: str, receipt: Receipt | None) -> Envelope | None:
        """Record a refusal (log, refused file, hook) and return the replacement to publish, if any."""
        with self._cond:
            self.refused_count += 1
        replacement: Envelope | None = None
        if not envelope.replacement and self._replace is not None:
            try:
                replacement = self._replace(envelope, reason)
            except Exception:  # a broken hook must not stop publishing
                log.exception("[RMQ] Could not build a replacement for refused message %s", envelope.message_id)
            if replacement is not None:
                replacement.replacement = True
                if len(replacement.body) > self.settings.max_message_bytes:
                    log.error("[RMQ] The replacement for message %s is itself too large (%d bytes); dropping it",
                              envelope.message_id, len(replacement.body))
                    replacement = None
        log.error(
            "[RMQ] ❌ Message %s (%s) to %r/%r refused for good: %s; %s",
            envelope.message_id, envelope.properties.get("type"), envelope.exchange, envelope.routing_key, reason,
            f"publishing {replacement.message_id} ({replacement.properties.get('type')}) in its place"
            if replacement is not None else "dropped (kept in the refused file)",
        )
        try:
            self.refused_log.append(envelope, code, reason)
        except OSError as exc:
            log.error("[RMQ] Could not write %s: %s", self.refused_log.path, exc)
        if self._on_refused is not None:
            try:
                self._on_refused(code, envelope, reason)
            except Exception:  # metrics must not stop publishing
                log.exception("[RMQ] on_refused hook failed")
        if receipt is not None and receipt.refused_reason is None:
            receipt.refused_reason = reason
            receipt.replaced = replacement is not None
            receipt.replacement_id = replacement.message_id if replacement is not None else None
        return replacement
