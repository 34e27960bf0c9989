"""Deterministic message_ids (CONTRACT.md, Common rules): the same message of the same job
has the same id whoever sends it and however often, so a BE drops the copies."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ai_service.message_ids import job_message_id, message_id_of
from ai_service.messages import (
    Box,
    ConversionUpdate,
    Detection,
    EpochUpdate,
    ImageResult,
    InferenceCompleted,
    TrainingCompleted,
    TrainingStarted,
)
from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, Received
from tests.test_inference import request, shapes
from tests.test_long_jobs import Journal, long_env
from tests.test_training import train_request


def epoch(job_id: str, n: int, **extra: Any) -> dict[str, Any]:
    return EpochUpdate(job_id=job_id, current_epoch=n, total_epochs=8, progress=12.5 * n, metrics={},
                       **extra).to_json_dict()


def test_the_same_epoch_of_the_same_job_has_one_id_whenever_it_is_sent() -> None:
    first, again = epoch("j1", 3), epoch("j1", 3, eta_seconds=4.0)
    again["timestamp"] = "2030-01-01T00:00:00+00:00"

    assert job_message_id("train", "j1", "epoch_update", first) == job_message_id("train", "j1", "epoch_update", again)


def test_the_id_read_off_a_message_object_is_the_id_of_its_json_for_every_kind_of_detail() -> None:
    """The outbox sends a message's bytes without building its dict; the id must not change."""
    messages = [
        EpochUpdate(job_id="j1", current_epoch=7, total_epochs=8, progress=87.5, metrics={}),
        ConversionUpdate(job_id="j1", current_format="onnx", progress=50.0),
        TrainingStarted(job_id="j1", total_epochs=8, resumed_from_epoch=3, worker="w"),
        TrainingStarted(job_id="j1", total_epochs=8, worker="w"),
        InferenceCompleted(job_id="j1", model_path="m.pt", results=[], inference_time_ms=1.0),
    ]
    ids = set()
    for message in messages:
        from_json = job_message_id("train", "j1", message.type, message.to_json_dict())
        assert message_id_of("train", "j1", message) == from_json
        ids.add(from_json)
    assert len(ids) == len(messages), "the detail field tells them apart"


def test_an_answers_json_bytes_carry_exactly_its_json_dict_nested_detections_included() -> None:
    detections = [Detection(class_id=i, class_name=f"c{i} é", confidence=0.1 + i / 3,
                            box=Box(x1=i, y1=1e-7, x2=1e16, y2=i + 0.125)) for i in range(5)]
    answer = InferenceCompleted(job_id="j1", model_path="m.pt", inference_time_ms=2.5, results=[
        ImageResult(image="0", width=64, height=48, detections=detections),
        ImageResult(image="a/b.png", width=1, height=1, detections=[])])

    raw = answer.to_json_bytes()

    assert json.loads(raw) == answer.to_json_dict()
    assert b'": ' not in raw, "compact, as json.dumps(separators=(',', ':'))"
    assert b', "' not in raw
    assert "é".encode() in raw, "UTF-8, not \\u escapes"


def test_ids_differ_by_epoch_format_type_job_and_operation() -> None:
    base = job_message_id("train", "j1", "epoch_update", epoch("j1", 3))
    others = {
        job_message_id("train", "j1", "epoch_update", epoch("j1", 4)),
        job_message_id("train", "j2", "epoch_update", epoch("j2", 3)),
        job_message_id("convert", "j1", "epoch_update", epoch("j1", 3)),
        job_message_id("train", "j1", "training_completed", {}),
        job_message_id("convert", "j1", "conversion_update", {"current_format": "onnx"}),
        job_message_id("convert", "j1", "conversion_update", {"current_format": "torchscript"}),
    }
    assert base not in others
    assert len(others) == 6


def test_a_terminal_has_one_id_per_job_whatever_it_reports() -> None:
    done = [TrainingCompleted(job_id="j1", model_path=p, final_metrics={}, training_time=t).to_json_dict()
            for p, t in (("a.pt", 1.0), ("b.pt", 2.0))]

    assert len({job_message_id("train", "j1", "training_completed", d) for d in done}) == 1


def results_of(be: BE, job_id: str, n: int, timeout: float) -> list[Received]:
    got: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        msg = be.get(be.settings.infer_result_queue)
        if msg is None:
            be.connection.sleep(0.05)
        elif msg.body["job_id"] == job_id:
            got.append(msg)
    return got


def test_an_answer_sent_again_after_its_worker_died_before_acking_has_the_same_message_id(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], trained_model: dict[str, Any],
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_file(Path(trained_model["model"]), "models/shapes.pt")
    image, _ = shapes(0)
    storage.write_bytes("images/one.png", image)
    victim = start_worker(module="tests.support.answer_then_die_worker", name="victim")
    be.send(be.settings.infer_request_queue, request("twice", "models/shapes.pt", [{"path": "images/one.png"}]))

    first = results_of(be, "twice", 1, timeout=120)
    assert victim.wait(60) != 0, "the worker did not die after answering"
    assert len(first) == 1
    start_worker("infer", name="after")
    second = results_of(be, "twice", 1, timeout=120)

    assert len(second) == 1, "the redelivered request was not answered"
    assert first[0].type == second[0].type == "inference_completed"
    assert first[0].properties.message_id == second[0].properties.message_id


def test_a_resumed_job_sends_an_epoch_again_with_the_id_it_had(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path,
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_dir(shapes_dir, "datasets/shapes")
    journal = Journal(be)
    victim = start_worker("train", env=long_env(), name="victim")
    be.send_train(train_request("again", epochs=3))
    journal.wait_epoch("again", 2)
    victim.kill()
    # Its record forgets epoch 2 (as when a record write is lost): the resumed run sends it again.
    key = "jobs/train/again.json"
    record = json.loads(storage.read_bytes(key))
    record["last_epoch"] = 1
    storage.write_bytes(key, json.dumps(record).encode())
    start_worker("train", env=long_env(), name="resumed")
    assert journal.wait_terminal("again")["type"] == "training_completed"

    sent = [(m.body["current_epoch"], m.properties.message_id) for m in journal.messages
            if m.body["job_id"] == "again" and m.type == "epoch_update"]
    assert [n for n, _ in sent].count(2) == 2, sent
    assert len({i for n, i in sent if n == 2}) == 1
    assert len({i for _, i in sent}) == len({n for n, _ in sent}) == 3


def _strict(raw: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(raw, parse_constant=refuse)


def test_a_nan_metric_is_null_whether_the_message_is_sent_replayed_from_its_record_or_streamed() -> None:
    from ai_service.http.events import format_event
    from ai_service.http.outbox import Entry
    from ai_service.messages import json_bytes

    update = EpochUpdate(job_id="j1", current_epoch=2, total_epochs=8, progress=25.0,
                         metrics={"loss": float("nan"), "mAP50": float("inf"), "precision": 0.5})
    stored = json.loads(json.dumps(update.to_json_dict()))  # a job record keeps NaN as Python reads it

    sent, replayed = _strict(update.to_json_bytes()), _strict(json_bytes(stored))
    assert sent == replayed
    assert sent["metrics"] == {"loss": None, "mAP50": None, "precision": 0.5}
    streamed = format_event(Entry(id="1", kind="update", type="epoch_update", data=stored))
    assert _strict(streamed.split(b"data: ", 1)[1].strip()) == sent
