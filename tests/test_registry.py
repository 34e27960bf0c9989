"""The operation registry: every list of operations is built from it, and a fake fourth
operation (``echo``, tests/support/echo_operation.py) added only through its spec gets
its topology on the real broker, its CLI subcommands, its AsyncAPI channels, its worker
dispatch, its HTTP routes and its heartbeats."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import httpx
import pika
import pika.exceptions
import pytest
from pydantic import ValidationError

from ai_service import asyncapi, messages, publisher, supervisor
from ai_service.asyncapi.components import CONTROL_MESSAGES
from ai_service.broker import Topology, connect, queue_names
from ai_service.cli import WORKER_MODULES, build_parser, main
from ai_service.cli.payloads import build_request, check_request
from ai_service.cli.worker import load_operation
from ai_service.config import Settings
from ai_service.dashboard import state as dashboard_state
from ai_service.http.app import routers_for
from ai_service.http.jobs import JobsApi
from ai_service.registry import OPERATIONS, Registry, UnknownOperation
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, BrokerNames
from tests.support.echo_operation import ECHO, EchoFailed, EchoRequest
from tests.support.sse import events, free_port, wait_http
from tests.test_heartbeats import beat, listen

WITH_ECHO = OPERATIONS.plus(ECHO)


def test_the_service_runs_train_convert_and_infer_in_that_order() -> None:
    assert OPERATIONS.names() == ("train", "convert", "infer")
    assert OPERATIONS.recorded() == ("train", "convert")
    assert [spec.name for spec in OPERATIONS if spec.rpc] == ["infer"]


def test_every_list_of_operations_is_the_registry() -> None:
    names = OPERATIONS.names()
    assert names == supervisor.OPS
    assert WORKER_MODULES == {"train": "workers.training", "convert": "workers.conversion",
                              "infer": "workers.inference"}
    # The models cannot import the registry (it imports them): their lists must agree with it.
    assert names == messages.OPERATIONS
    terminal = {doc.model.model_fields["type"].default for spec in OPERATIONS for doc in spec.results}
    assert terminal == messages.TERMINAL_TYPES == OPERATIONS.terminal_types()
    assert dashboard_state.RECORDED_OPS == OPERATIONS.recorded() == ("train", "convert")
    assert publisher.ERROR_CODES == {"train": "training_error", "convert": "export_error", "infer": "inference_error"}
    assert publisher.HINTS["infer"] == "lower max_det, raise conf or send fewer images per request"
    assert publisher.HINTS["train"] == publisher.HINTS["convert"] == ECHO.too_big_hint
    prefetch = Settings(infer_prefetch=3)
    assert [spec.prefetch(prefetch) for spec in OPERATIONS] == [1, 1, 3]  # the workers' Operation.prefetch
    # A heartbeat's operation is checked against the registry; the document lists its names.
    operation = asyncapi.document()["components"]["schemas"]["WorkerHeartbeat"]["properties"]["operation"]
    assert operation == {"enum": list(names), "title": "Operation", "type": "string"}


def test_a_heartbeat_names_an_operation_of_the_registry_it_is_checked_against() -> None:
    (heartbeat, _), = ((doc, r) for doc, r in CONTROL_MESSAGES if doc.name == "workerHeartbeat")
    echo = {**heartbeat.example, "operation": "echo"}
    assert messages.WorkerHeartbeat.model_validate(echo, context={"operations": WITH_ECHO.names()}).operation == "echo"
    with pytest.raises(ValidationError, match="'echo' is not a registered operation"):
        messages.WorkerHeartbeat.model_validate(echo, context={"operations": OPERATIONS.names()})
    with pytest.raises(ValidationError, match="operation"):
        messages.WorkerHeartbeat.model_validate({**echo, "operation": "echo.#"})
    schema = asyncapi.document(None, WITH_ECHO)["components"]["schemas"]["WorkerHeartbeat"]
    assert schema["properties"]["operation"]["enum"] == ["train", "convert", "infer", "echo"]


def test_the_http_job_routes_of_a_fake_recorded_operation_come_from_its_spec() -> None:
    api = JobsApi(Settings(), "echo", None, operations=WITH_ECHO)
    assert (api.request_model, api.failure_model, api.long_ops) == (EchoRequest, EchoFailed,
                                                                    ("train", "convert", "echo"))
    assert api._ops() == ("echo", "train", "convert")
    assert ECHO.failure_model is EchoFailed
    assert ECHO.terminal_types() == {"echo_completed", "echo_failed"}
    [router] = routers_for("echo", Settings(), None, operations=WITH_ECHO)
    assert "/echo" in {getattr(route, "path", "") for route in router.routes}
    assert routers_for("echo", Settings(), None) == []  # not in the default registry
    with pytest.raises(UnknownOperation):
        JobsApi(Settings(), "echo", None)


def test_queue_names_come_from_the_settings_the_spec_names() -> None:
    settings = Settings(train_request_queue="t.req", convert_update_queue="c.upd", infer_result_queue="i.res")
    assert queue_names(settings, "train").request == "t.req"
    assert queue_names(settings, "convert").update == "c.upd"
    infer = queue_names(settings, "infer")
    assert (infer.update, infer.result, infer.dlq, infer.lease) == (None, "i.res", "infer_request_q.dlq",
                                                                   "infer_request_q.lease")
    with pytest.raises(UnknownOperation, match="unknown operation 'echo'"):
        queue_names(settings, "echo")
    with pytest.raises(ValueError, match="unknown operation"):
        OPERATIONS["nope"]


def test_a_registry_keeps_its_order_and_plus_appends() -> None:
    assert WITH_ECHO.names() == ("train", "convert", "infer", "echo")
    assert "echo" in WITH_ECHO
    assert "echo" not in OPERATIONS
    assert OPERATIONS.get("echo") is None
    assert WITH_ECHO.get("echo") is ECHO
    assert len(Registry(())) == 0


@pytest.fixture
def echo_settings(names: BrokerNames) -> Iterator[Settings]:
    settings = names.settings()
    yield settings
    echo = ECHO.queues(settings)
    with contextlib.suppress(pika.exceptions.AMQPError), contextlib.closing(
        connect(settings, client_name="test-registry-cleanup")
    ) as connection:
        channel = connection.channel()
        for queue in (echo.request, echo.dlq, echo.lease, echo.result):
            channel.queue_delete(queue)


def test_a_fake_operation_gets_its_queues_and_bindings_on_the_real_broker(echo_settings: Settings) -> None:
    echo = ECHO.queues(echo_settings)
    with contextlib.closing(connect(echo_settings, client_name="test-registry")) as connection:
        Topology(echo_settings, operations=WITH_ECHO).declare(connection)
        channel = connection.channel()
        for queue in (echo.request, echo.dlq, echo.lease, echo.result):
            channel.queue_declare(queue, passive=True)  # raises 404 when missing
        # no update queue: the spec has no update messages
        assert echo.update is None
        channel.confirm_delivery()
        channel.basic_publish(echo_settings.events_exchange, "echo.result.e1", b'{"type": "echo_completed"}',
                              mandatory=True)
        channel.basic_publish(echo_settings.dead_letter_exchange, echo.request, b"{}", mandatory=True)
        for queue, body in ((echo.result, b'{"type": "echo_completed"}'), (echo.dlq, b"{}")):
            method, _, got = channel.basic_get(queue, auto_ack=True)
            assert method is not None, queue
            assert got == body, queue


def test_the_cli_builds_and_validates_a_fake_operations_request_from_its_form(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser(WITH_ECHO)
    args = parser.parse_args(["submit", "echo", "--text", "hi", "--job-id", "e1"])
    assert args.spec is ECHO
    payload = build_request(args, ECHO)
    assert payload == {"job_id": "e1", "text": "hi"}
    assert json.loads(check_request(ECHO, payload, Settings())) == payload
    assert parser.parse_args(["worker", "echo"]).op == "echo"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "echo"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser.parse_args(["dlq", "--help"])
    assert "(train, convert, infer, echo)" in capsys.readouterr().out


def test_the_asyncapi_document_of_a_fake_operation_has_its_channels_and_messages(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = asyncapi.document(None, WITH_ECHO)
    assert doc["channels"]["echoRequests"]["address"] == "ai.events.echo_request_q"
    assert doc["channels"]["echoResults"]["address"] == "echo.result.{job_id}"
    assert "echoUpdates" not in doc["channels"]
    assert doc["components"]["messages"]["echoRequest"]["name"] == "echo_request"
    assert doc["components"]["messages"]["echoCompleted"]["examples"][0]["payload"]["text"] == "hello"
    assert "EchoRequest" in doc["components"]["schemas"]
    assert "receiveEchoRequest" in doc["operations"]
    assert "(`op` = train, convert, infer or echo)" in doc["info"]["description"]
    assert main(["asyncapi"], operations=WITH_ECHO) == 0
    assert "echoRequests:" in capsys.readouterr().out
    assert "echo" not in asyncapi.render()  # the default document is untouched


def test_the_worker_dispatch_loads_a_fake_operation_from_its_module() -> None:
    operation = load_operation(ECHO, Settings())
    assert operation.name == "echo"
    assert operation.request_model is EchoRequest


def test_a_real_worker_process_serves_a_fake_operation_over_amqp_and_http_and_its_heartbeats_name_it(
    echo_settings: Settings, start_worker: WorkerFactory, be: BE, capsys: pytest.CaptureFixture[str],
) -> None:
    beats = listen(be)
    port = free_port()
    start_worker(module="tests.support.echo_worker", env={"HEARTBEAT_SECONDS": "1", "HTTP_PORT": str(port)},
                 name="echo")
    assert beat(be, beats, "test/echo/echo", state="idle").body["operation"] == "echo"
    echo = ECHO.queues(echo_settings)
    request = EchoRequest(job_id="echo-1", text="hello there").model_dump_json().encode()
    with contextlib.closing(connect(echo_settings, client_name="test-registry-be")) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", echo.request, request, pika.BasicProperties(delivery_mode=2), mandatory=True)
        answer = None
        for _ in range(600):  # until the worker answers (the test's timeout bounds it)
            method, properties, body = channel.basic_get(echo.result, auto_ack=True)
            if method is not None:
                answer = (method.routing_key, properties.type, json.loads(body))
                break
            connection.sleep(0.1)
    assert answer is not None, "no echo_completed on the echo result queue"
    routing_key, kind, message = answer
    assert routing_key == "echo.result.echo-1"
    assert kind == "echo_completed"
    assert (message["job_id"], message["status"], message["text"]) == ("echo-1", "completed", "hello there")

    # Its HTTP job routes, from its spec: submitted through its request queue, followed to its result.
    base = f"http://127.0.0.1:{port}"
    wait_http(base)
    answer = httpx.post(f"{base}/v1/echo", json={"job_id": "echo-2", "text": "over http"}, timeout=30)
    assert answer.status_code == 202, answer.text
    seen = list(events(base + answer.json()["events"]))
    assert [(e.type, e.data["text"]) for e in seen] == [("echo_completed", "over http")]
    assert httpx.get(f"{base}/v1/jobs/echo-2", timeout=10).json()["state"] == "completed"
    bad = httpx.post(f"{base}/v1/echo", json={"job_id": "echo-3"}, timeout=30)
    assert bad.status_code == 400, bad.text
    assert bad.json()["type"] == "echo_failed"
    assert "text" in bad.json()["error_message"]
    # The CLI follows it over HTTP to its own terminal message.
    capsys.readouterr()
    argv = ["submit", "echo", "--text", "via the cli", "--job-id", "echo-4", "--http", base, "--follow",
            "--timeout", "60"]
    assert main(argv, operations=WITH_ECHO) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "via the cli"
