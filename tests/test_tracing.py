"""Traces across the message boundary: a request's W3C ``traceparent`` in, one trace of
spans for its job, and the trace carried on in every message the job sends.

The unit tests trace through an SDK provider and in-memory exporter of their own
(``tracing.configure``); the end-to-end test runs the real training worker against the
real broker and a tiny OTLP/HTTP collector in this process (an in-memory exporter cannot
live in another process).
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ai_service import tracing
from ai_service.config import Settings
from ai_service.consumer import Consumer, _Delivery
from ai_service.errors import AIServiceError
from ai_service.messages import TrainingFailed, TrainingRequest, TrainingStarted
from ai_service.operation import DeliveryInfo, JobContext, Operation, Resources
from ai_service.publisher import Publisher
from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, Received

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
#: No OTEL variable reaches a worker started with this (an empty endpoint is no endpoint).
NO_OTEL = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}


def train_request(job_id: str, epochs: int = 2) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": "datasets/shapes/", "name": "shapes"},
        "output": {"prefix": "models/yolov8n", "model_name": f"{job_id}.pt"},
        "hyperparams": {"model": "yolov8n", "epochs": epochs, "batch": 8, "imgsz": 64},
    }


def parse_traceparent(value: Any) -> tuple[str, str]:
    """(trace id, span id) of a ``traceparent`` header value."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    version, trace_id, span_id, flags = text.split("-")
    assert version == "00", text
    assert len(trace_id) == 32, text
    assert len(span_id) == 16, text
    assert len(flags) == 2, text
    return trace_id, span_id


# --- unit: extraction on the consumer side, injection on the publish side --------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    yield exporter
    tracing.configure(None)
    provider.shutdown()


def _failure(job_id: str, error: AIServiceError) -> TrainingFailed:
    return TrainingFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


def run_one_delivery(tmp_path: Path, headers: dict[str, Any],
                     handler: Callable[[TrainingRequest, JobContext], None] | None = None) -> Publisher:
    """One delivery through the real Consumer's handler path and the real Publisher (its
    spool opened, its thread not started: what it would send stays in ``_pending``)."""
    settings = Settings.from_env({"WORK_DIR": str(tmp_path / "work"), "STORAGE_DIR": str(tmp_path / "storage")})

    def announce(request: TrainingRequest, ctx: JobContext) -> None:
        ctx.update(TrainingStarted(job_id=request.job_id, total_epochs=1, worker=ctx.worker, resumed_from_epoch=0))

    op = Operation(name="train", request_model=TrainingRequest, handler=handler or announce, failure=_failure)
    publisher = Publisher(settings, spool_dir=tmp_path / "spool")
    publisher.spool.open()
    consumer = Consumer(settings, op, publisher, Resources(settings=settings))
    body = json.dumps(train_request("trace01")).encode()
    info = DeliveryInfo(redelivered=False, delivery_count=0, reply_to=None, correlation_id=None, headers=headers,
                        body=body)
    consumer._handle(_Delivery(tag=1, generation=0, info=info))
    return publisher


def only(found: list[ReadableSpan], what: str) -> ReadableSpan:
    assert len(found) == 1, f"expected one {what} span, got {[s.name for s in found]}"
    return found[0]


def test_a_requests_traceparent_parents_the_consume_span_and_the_published_message_carries_the_trace_on(
    spans: InMemorySpanExporter, tmp_path: Path,
) -> None:
    publisher = run_one_delivery(tmp_path, {"traceparent": TRACEPARENT, "tracestate": "be=1"})
    consume = only([s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER], "consume")
    assert consume.context is not None
    assert consume.parent is not None
    assert format(consume.context.trace_id, "032x") == TRACE_ID
    assert format(consume.parent.span_id, "016x") == PARENT_ID
    assert consume.parent.is_remote
    assert consume.attributes is not None
    assert consume.attributes["messaging.system"] == "rabbitmq"
    assert consume.attributes["ai.job_id"] == "trace01"
    assert consume.attributes["ai.outcome"] == "ack"

    [envelope] = list(publisher._pending)
    headers = envelope.properties["headers"]
    trace_id, span_id = parse_traceparent(headers["traceparent"])
    assert trace_id == TRACE_ID
    assert headers["tracestate"] == "be=1"
    # The header names the publish span, a PRODUCER child of the consume span; it ends on the confirm.
    publisher._receipts[envelope.seq]._set()  # the broker's confirm, simulated
    publish = only([s for s in spans.get_finished_spans() if s.kind is SpanKind.PRODUCER], "publish")
    assert publish.context is not None
    assert publish.parent is not None
    assert format(publish.context.span_id, "016x") == span_id
    assert publish.parent.span_id == consume.context.span_id
    assert publish.attributes is not None
    assert publish.attributes["messaging.destination.name"] == publisher.settings.events_exchange
    assert publish.attributes["messaging.rabbitmq.destination.routing_key"] == "train.update.trace01"
    assert publish.attributes["ai.message.type"] == "training_started"
    assert publish.attributes["ai.publish.outcome"] == "confirmed"


def test_a_request_without_traceparent_starts_a_trace_of_its_own_when_tracing_is_on(
    spans: InMemorySpanExporter, tmp_path: Path,
) -> None:
    publisher = run_one_delivery(tmp_path, {})
    consume = only([s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER], "consume")
    assert consume.parent is None
    assert consume.context is not None
    [envelope] = list(publisher._pending)
    trace_id, _ = parse_traceparent(envelope.properties["headers"]["traceparent"])
    assert trace_id == format(consume.context.trace_id, "032x")


class _BrokenTracer:
    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracer broken")


class _BrokenProvider:
    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        return _BrokenTracer()


def test_a_broken_tracer_only_logs_and_the_job_still_runs_and_publishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def handler(request: TrainingRequest, ctx: JobContext) -> None:
        with tracing.span("inside the job"):
            ran.append(request.job_id)
        ctx.update(TrainingStarted(job_id=request.job_id, total_epochs=1, worker=ctx.worker, resumed_from_epoch=0))

    tracing._warned.clear()
    tracing.configure(_BrokenProvider())  # type: ignore[arg-type]
    try:
        publisher = run_one_delivery(tmp_path, {"traceparent": TRACEPARENT}, handler)
    finally:
        tracing.configure(None)
    assert ran == ["trace01"]
    [envelope] = list(publisher._pending)
    assert "traceparent" not in (envelope.properties.get("headers") or {})
    assert "[Tracing] start_span failed" in caplog.text


def test_a_predict_batch_span_is_a_child_of_its_first_request_and_linked_to_every_request_it_answers(
    spans: InMemorySpanExporter,
) -> None:
    from tests.test_inference import fake_engine, fake_job, fake_model

    engine = fake_engine(max_batch=8)
    model = fake_model()
    jobs, requests = [], []
    for n in range(3):
        with tracing.span(f"request {n}", kind="consumer") as request:
            job = fake_job(model, [n + 1])
            job.trace = tracing.current()
            requests.append(request.context)
        jobs.append(job)
        engine.enter()
        engine.submit(job)
    engine.start()
    assert [len(job.future.result(5).detections) for job in jobs] == [1, 1, 1]
    by_name = {s.name: s for s in spans.get_finished_spans()}
    batch = by_name["predict batch"]
    request_ids = [by_name[f"request {n}"].context.span_id for n in range(3)]
    assert batch.parent is not None
    assert batch.parent.span_id == request_ids[0]
    assert [link.context.span_id for link in batch.links] == request_ids
    assert batch.attributes is not None
    assert batch.attributes["ai.batch.requests"] == 3


def test_without_otel_variables_setup_installs_no_sdk_provider() -> None:
    assert tracing.setup("train", env={}) is False
    assert not tracing.enabled()
    assert tracing.current() is None
    provider = trace.get_tracer_provider()
    assert isinstance(provider, trace.ProxyTracerProvider), provider  # the API's own, not the SDK's
    assert not any("OtelBatchSpanProcessor" in t.name for t in threading.enumerate())
    assert tracing.extract({"traceparent": TRACEPARENT}) is None
    assert tracing.inject({}) == {}
    # The standard switches: an endpoint turns it on, unless the SDK or the exporter is switched off.
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert tracing.off_reason(endpoint) is None
    assert tracing.off_reason({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}) is None
    assert tracing.off_reason({**endpoint, "OTEL_SDK_DISABLED": "true"}) == "OTEL_SDK_DISABLED=true"
    assert tracing.off_reason({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) == "OTEL_TRACES_EXPORTER=none"
    assert tracing.off_reason({"OTEL_SERVICE_NAME": "x"}) is not None


# --- end to end: the real training worker, the real broker, a tiny OTLP/HTTP collector ---


class Collector:
    """Accepts OTLP/HTTP protobuf exports on ``POST /v1/traces`` and keeps every span."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    raw = gzip.decompress(raw)
                elif encoding == "deflate":
                    raw = zlib.decompress(raw)
                collector.add(ExportTraceServiceRequest.FromString(raw))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-collector", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    attributes = {kv.key: _value(kv.value) for kv in s.attributes}
                    found.append({
                        "name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(), "attributes": attributes,
                        "links": [link.span_id.hex() for link in s.links], "resource": resource,
                    })
        with self.lock:
            self.spans.extend(found)

    def in_trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait(self, trace_id: str, ready: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> list[
            dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.in_trace(trace_id)
            if ready(found):
                return found
            time.sleep(0.1)
        raise AssertionError(f"the collector did not get the spans within {timeout} s: "
                             f"{sorted(s['name'] for s in self.in_trace(trace_id))}")


def _value(value: Any) -> Any:
    field = value.WhichOneof("value")
    return getattr(value, field) if field else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


SPAN_KIND_INTERNAL, SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 1, 4, 5


def follow(be: BE, job_id: str) -> tuple[list[Received], Received]:
    result = be.terminal(be.settings.train_result_queue, job_id, timeout=240)
    updates = [m for m in be.drain(be.settings.train_update_queue) if m.body["job_id"] == job_id]
    return updates, result


def test_a_traced_training_request_gets_one_trace_of_job_epoch_dataset_upload_and_publish_spans(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path, collector: Collector,
) -> None:
    LocalStorage(Path(worker_env["STORAGE_DIR"])).upload_dir(shapes_dir, "datasets/shapes")
    worker = start_worker("train", env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "", "OTEL_BSP_SCHEDULE_DELAY": "200",
                                        "OTEL_SDK_DISABLED": "", "OTEL_TRACES_EXPORTER": "", "OTEL_SERVICE_NAME": ""})
    assert "[Tracing] Exporting traces over OTLP/HTTP to " + collector.endpoint + "/v1/traces" in worker.log()
    be.send(be.settings.train_request_queue, train_request("traced1"), headers={"traceparent": TRACEPARENT})
    updates, result = follow(be, "traced1")
    assert result.type == "training_completed", result.body

    # Every message the job sent carries the request's trace on.
    epoch_updates = [m for m in updates if m.type == "epoch_update"]
    assert [m.body["current_epoch"] for m in epoch_updates] == [1, 2]
    for message in [*updates, result]:
        assert parse_traceparent((message.properties.headers or {})["traceparent"])[0] == TRACE_ID, message.type

    request_queue = be.settings.train_request_queue

    def complete(found: list[dict[str, Any]]) -> bool:
        names = [s["name"] for s in found]
        return f"process {request_queue}" in names and names.count("train epoch") == 2 and sum(
            s["attributes"].get("ai.message.type") == "training_completed" for s in found) == 1

    found = collector.wait(TRACE_ID, complete)
    by_id = {s["span_id"]: s for s in found}

    def named(name: str) -> list[dict[str, Any]]:
        return [s for s in found if s["name"] == name]

    [job] = named(f"process {request_queue}")
    assert job["kind"] == SPAN_KIND_CONSUMER
    assert job["parent"] == PARENT_ID
    assert job["attributes"]["ai.job_id"] == "traced1"
    assert job["attributes"]["ai.job.status"] == "completed"
    assert job["resource"]["service.name"] == "ai-service-train"
    epochs = sorted(named("train epoch"), key=lambda s: s["attributes"]["ai.epoch"])
    assert [e["attributes"]["ai.epoch"] for e in epochs] == [1, 2]
    assert all(e["parent"] == job["span_id"] and e["kind"] == SPAN_KIND_INTERNAL for e in epochs)
    assert all(e["attributes"]["ai.epoch.finished"] is True for e in epochs)
    [dataset] = named("dataset materialise")
    [sync] = named("dataset sync")
    assert dataset["parent"] == job["span_id"]
    assert sync["parent"] == dataset["span_id"]
    uploads = named("checkpoint upload")
    assert len(uploads) == 2
    assert {u["parent"] for u in uploads} == {e["span_id"] for e in epochs}
    [model_upload] = named("model upload")
    assert model_upload["parent"] == job["span_id"]

    publishes = [s for s in found if s["kind"] == SPAN_KIND_PRODUCER]
    assert all(p["attributes"]["messaging.system"] == "rabbitmq" for p in publishes)
    types = [p["attributes"]["ai.message.type"] for p in publishes]
    assert {"training_started", "epoch_update", "training_completed"} <= set(types)
    assert types.count("epoch_update") == 2
    # Each message's traceparent names its own publish span; an epoch's update is published inside its epoch.
    for message in [*epoch_updates, result]:
        _, span_id = parse_traceparent((message.properties.headers or {})["traceparent"])
        publish = by_id[span_id]
        assert publish["kind"] == SPAN_KIND_PRODUCER
        assert publish["attributes"]["ai.message.type"] == message.type
        assert publish["attributes"]["messaging.message.id"] == message.properties.message_id
    for message, epoch in zip(epoch_updates, epochs, strict=True):
        _, span_id = parse_traceparent((message.properties.headers or {})["traceparent"])
        assert by_id[span_id]["parent"] == epoch["span_id"]
    # Nothing of the job left the trace.
    assert all(s["trace_id"] == TRACE_ID for s in collector.spans if s["attributes"].get("ai.job_id") == "traced1")


def test_without_otel_variables_a_worker_traces_nothing_and_its_messages_carry_no_traceparent(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path,
) -> None:
    LocalStorage(Path(worker_env["STORAGE_DIR"])).upload_dir(shapes_dir, "datasets/shapes")
    worker = start_worker("train", env=NO_OTEL)
    be.send(be.settings.train_request_queue, train_request("untraced1", epochs=1), headers={"traceparent": TRACEPARENT})
    updates, result = follow(be, "untraced1")
    assert result.type == "training_completed", result.body
    assert [m.type for m in updates] == ["training_started", "epoch_update"]
    for message in [*updates, result]:
        assert "traceparent" not in (message.properties.headers or {}), message.type
    log = worker.log()
    assert "[Tracing] Off (no OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)" in log
    assert "[Tracing] Exporting" not in log


def test_a_worker_whose_collector_is_down_still_completes_its_job_and_only_logs(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    LocalStorage(Path(worker_env["STORAGE_DIR"])).upload_dir(shapes_dir, "datasets/shapes")
    worker = start_worker("train", env={**NO_OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                        "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    be.send(be.settings.train_request_queue, train_request("nocollector1", epochs=1),
            headers={"traceparent": TRACEPARENT})
    updates, result = follow(be, "nocollector1")
    assert result.type == "training_completed", result.body
    assert [m.type for m in updates] == ["training_started", "epoch_update"]
    for message in [*updates, result]:
        assert parse_traceparent((message.properties.headers or {})["traceparent"])[0] == TRACE_ID
    assert worker.stop(timeout=30) == 0  # the exit's flush gives up too (OTEL_EXPORTER_OTLP_TIMEOUT)
    assert "Failed to export spans batch" in worker.log()  # the SDK's exporter logged it, nothing more
