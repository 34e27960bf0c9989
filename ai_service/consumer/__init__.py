"""The consumer runtime: I/O on one thread, handlers on others, one settle policy.

* :mod:`.policy` -- :func:`settle`, the one mapping from an outcome to what happens to
  the delivery and to the job (and :func:`decide`, its delivery half).
* :mod:`.tracker` -- requests running or answered in this process; delivery counts.
* :mod:`.control` -- the cancel hook's one thread and its bounded queue.
* :mod:`.handlers` -- one delivery on a pool thread, from parse to settlement.
* :mod:`.settling` -- ack / reject / requeue on the I/O thread.
* :mod:`.cancelling` -- cancels from the fanout and the cancel stream, on the I/O thread.
* :mod:`.loop` -- :class:`Consumer`: the I/O thread, reconnects, warm and forced stops.
* :mod:`.outbox` -- :class:`DeliveryOutbox`: what a handler publishes for its delivery.
"""

from __future__ import annotations

from ai_service.consumer.control import CONTROL_DROP_WARNING_INTERVAL, ControlExecutor
from ai_service.consumer.handlers import REDELIVERY_WAIT, TERMINAL_CONFIRM_TIMEOUT, Delivery
from ai_service.consumer.loop import Consumer
from ai_service.consumer.outbox import DeliveryOutbox
from ai_service.consumer.policy import (
    Decision,
    JobFate,
    Outcome,
    Settlement,
    SettleMode,
    backoff,
    decide,
    settle,
)
from ai_service.consumer.tracker import (
    DELIVERY_COUNT_HEADER,
    RequestTracker,
    came_back_from,
    count_deliveries,
    readable_job_id_from,
)
from ai_service.errors import InternalError

#: The old private name of :class:`Delivery` (tests build one by hand).
_Delivery = Delivery

__all__ = [
    "CONTROL_DROP_WARNING_INTERVAL",
    "DELIVERY_COUNT_HEADER",
    "REDELIVERY_WAIT",
    "TERMINAL_CONFIRM_TIMEOUT",
    "Consumer",
    "ControlExecutor",
    "Decision",
    "Delivery",
    "DeliveryOutbox",
    "InternalError",
    "JobFate",
    "Outcome",
    "RequestTracker",
    "SettleMode",
    "Settlement",
    "backoff",
    "came_back_from",
    "count_deliveries",
    "decide",
    "readable_job_id_from",
    "settle",
]
