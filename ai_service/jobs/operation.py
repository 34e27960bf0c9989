"""The wiring every recorded long job shares (training, conversion): one place, not one per worker."""

from __future__ import annotations

from collections.abc import Callable

from ai_service.config import Settings
from ai_service.jobs.ledger import record_cancel
from ai_service.messages import JobRequest
from ai_service.operation import FailureFactory, Handler, Operation, Resources, SettleMode
from ai_service.registry import OperationSpec


def recorded_operation(
    spec: OperationSpec,
    settings: Settings,
    *,
    request_model: type[JobRequest],
    handler: Handler,
    failure: FailureFactory,
    setup: Callable[[Resources], None],
) -> Operation:
    """A long job's :class:`Operation`: named and sized by its registry ``spec``, settled once
    recorded (then by its lease), with cancels written to its record by :func:`record_cancel`."""
    return Operation(
        name=spec.name,
        request_model=request_model,
        handler=handler,
        failure=failure,
        prefetch=spec.prefetch(settings),
        setup=setup,
        on_cancel=record_cancel,
        settle=SettleMode.ONCE_RECORDED,
    )
