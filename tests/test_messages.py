"""The wire format (CONTRACT.md): strict request validation, exact outgoing field sets."""

from __future__ import annotations

import base64
import copy
import json
import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from ai_service.errors import InvalidInput, UnsafeKey
from ai_service.keys import validate_key
from ai_service.messages import (
    Artifact,
    Box,
    Cancel,
    ConversionCancelled,
    ConversionCompleted,
    ConversionFailed,
    ConversionOptions,
    ConversionRequest,
    ConversionStarted,
    ConversionUpdate,
    Detection,
    EpochUpdate,
    ImageData,
    ImagePath,
    ImageResult,
    InferenceCompleted,
    InferenceFailed,
    InferenceParams,
    InferenceRequest,
    InvalidRequest,
    TrainingCancelled,
    TrainingCompleted,
    TrainingFailed,
    TrainingRequest,
    TrainingStarted,
    _Message,
    is_terminal,
    parse_request,
    readable_job_id,
    utc_now,
)

MAX = 16 * 1024 * 1024

# The specification's training request, verbatim.
TRAINING_EXAMPLE: dict[str, Any] = {
    "job_id": "abc12345",
    "dataset": {"s3_prefix": "datasets/my-dataset/", "name": "my-dataset"},
    "output": {"prefix": "models/yolov8n", "model_name": "my-dataset.pt"},
    "hyperparams": {"model": "yolov8n", "epochs": 100, "batch": 16, "imgsz": 640},
}

CONVERSION_EXAMPLE: dict[str, Any] = {
    "job_id": "conv0001",
    "model": {"path": "models/yolov8n/my-dataset.pt"},
    "formats": ["onnx", "torchscript"],
    "options": {"imgsz": 640, "half": False, "int8": False, "dynamic": False,
                "simplify": True, "opset": None, "batch": 1},
    "output": {"prefix": "models/yolov8n/exports"},
}

# The contract's "<base64 JPEG or PNG>" placeholder, replaced by real base64.
PNG_HEADER = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
INFERENCE_EXAMPLE: dict[str, Any] = {
    "job_id": "inf0001",
    "model": {"path": "models/yolov8n/my-dataset.pt"},
    "images": [{"path": "images/street.jpg"}, {"data": PNG_HEADER}],
    "params": {"conf": 0.25, "iou": 0.7, "imgsz": 640, "max_det": 300, "classes": None},
}

TRAINING_FIELDS = [
    ("job_id",),
    ("dataset",),
    ("dataset", "s3_prefix"),
    ("dataset", "name"),
    ("output",),
    ("output", "prefix"),
    ("output", "model_name"),
    ("hyperparams",),
    ("hyperparams", "model"),
    ("hyperparams", "epochs"),
    ("hyperparams", "batch"),
    ("hyperparams", "imgsz"),
]

BAD_KEYS = [
    pytest.param("../etc/passwd", id="leading-dotdot"),
    pytest.param("models/../../secret", id="inner-dotdot"),
    pytest.param("models/..", id="trailing-dotdot"),
    pytest.param("/abs/path.pt", id="leading-slash"),
    pytest.param("models\\x.pt", id="backslash"),
    pytest.param("models/x\x00.pt", id="nul"),
    pytest.param("models//x.pt", id="double-slash"),
    pytest.param("", id="empty"),
    pytest.param("a" * 1025, id="too-long"),
]


_DELETE = object()


def training(**changes: Any) -> dict[str, Any]:
    """The training example with changes applied: ``a__b=v`` sets ``a.b``; ``_DELETE`` removes it."""
    data = copy.deepcopy(TRAINING_EXAMPLE)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return data


def body(data: Any) -> bytes:
    return json.dumps(data).encode()


def invalid(model: type[BaseModel], data: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_request(model, body(data), MAX)
    return info.value


# --- training request -----------------------------------------------------------------


def test_the_specifications_training_example_validates() -> None:
    request, payload = parse_request(TrainingRequest, body(TRAINING_EXAMPLE), MAX)

    assert payload == TRAINING_EXAMPLE
    assert request.job_id == "abc12345"
    assert request.dataset.s3_prefix == "datasets/my-dataset/"
    assert request.dataset.name == "my-dataset"
    assert request.output.model_key == "models/yolov8n/my-dataset.pt"
    assert (request.hyperparams.model, request.hyperparams.epochs) == ("yolov8n", 100)
    assert (request.hyperparams.batch, request.hyperparams.imgsz) == (16, 640)
    assert request.hyperparams.ultralytics_overrides() == {}


@pytest.mark.parametrize("path", TRAINING_FIELDS, ids=".".join)
def test_every_field_of_the_training_example_is_required(path: tuple[str, ...]) -> None:
    data = training(**{"__".join(path): _DELETE})

    err = invalid(TrainingRequest, data)

    assert f"{'.'.join(path)}: Field required" in err.message
    assert err.error_code == "invalid_request"
    assert err.job_id == (None if path == ("job_id",) else "abc12345")


def test_a_missing_imgsz_is_invalid_not_defaulted() -> None:
    with pytest.raises(ValidationError):
        TrainingRequest.model_validate(training(hyperparams__imgsz=_DELETE))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", 10001),
        ("epochs", -1),
        ("batch", 0),
        ("batch", -2),
        ("batch", 1025),
        ("imgsz", 31),
        ("imgsz", 8193),
    ],
)
def test_hyperparams_out_of_range_are_refused(field: str, value: int) -> None:
    err = invalid(TrainingRequest, training(**{f"hyperparams__{field}": value}))

    assert f"hyperparams.{field}:" in err.message


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 1), ("epochs", 10000), ("batch", -1), ("batch", 1), ("batch", 256), ("imgsz", 32), ("imgsz", 4096)],
)
def test_hyperparams_at_the_edges_of_their_ranges_are_accepted(field: str, value: int) -> None:
    request, _ = parse_request(TrainingRequest, body(training(**{f"hyperparams__{field}": value})), MAX)

    assert getattr(request.hyperparams, field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch", "16"),
        ("epochs", True),
        ("epochs", 1.5),
        ("epochs", 100.0),
        ("imgsz", "640"),
        ("imgsz", None),
        ("model", 8),
        ("patience", "10"),
        ("cos_lr", "true"),
        ("cos_lr", 1),
    ],
)
def test_wrong_types_are_refused_without_coercion(field: str, value: Any) -> None:
    err = invalid(TrainingRequest, training(**{f"hyperparams__{field}": value}))

    assert f"hyperparams.{field}:" in err.message


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("", id="top"),
        pytest.param("dataset__", id="dataset"),
        pytest.param("output__", id="output"),
        pytest.param("hyperparams__", id="hyperparams"),
    ],
)
def test_unknown_fields_are_refused_at_every_level(where: str) -> None:
    err = invalid(TrainingRequest, training(**{f"{where}surprise": 1}))

    location = where.replace("__", ".") + "surprise"
    assert f"{location}: unknown field" in err.message
    assert err.job_id == "abc12345"


OPTIONAL_HYPERPARAMS: dict[str, Any] = {
    "patience": 10,
    "lr0": 0.01,
    "lrf": 0.1,
    "optimizer": "AdamW",
    "seed": 42,
    "workers": 2,
    "cos_lr": False,
    "close_mosaic": 5,
    "fraction": 0.5,
    "cache": "disk",
    "pretrained": "models/base/yolov8n.pt",
}


def test_optional_hyperparams_are_accepted_and_passed_through_except_pretrained() -> None:
    data = training()
    data["hyperparams"].update(OPTIONAL_HYPERPARAMS)

    request, _ = parse_request(TrainingRequest, body(data), MAX)

    expected = {k: v for k, v in OPTIONAL_HYPERPARAMS.items() if k != "pretrained"}
    assert request.hyperparams.ultralytics_overrides() == expected
    assert request.hyperparams.pretrained == "models/base/yolov8n.pt"


@pytest.mark.parametrize("name", sorted(OPTIONAL_HYPERPARAMS))
def test_ultralytics_overrides_passes_exactly_the_optional_hyperparams_that_were_set(name: str) -> None:
    data = training(**{f"hyperparams__{name}": OPTIONAL_HYPERPARAMS[name]})

    request, _ = parse_request(TrainingRequest, body(data), MAX)

    overrides = request.hyperparams.ultralytics_overrides()
    assert overrides == ({} if name == "pretrained" else {name: OPTIONAL_HYPERPARAMS[name]})


def test_an_integer_learning_rate_is_accepted_as_a_number() -> None:
    request, _ = parse_request(TrainingRequest, body(training(hyperparams__lr0=1)), MAX)

    assert request.hyperparams.ultralytics_overrides() == {"lr0": 1.0}


@pytest.mark.parametrize(
    ("field", "value"),
    [("optimizer", "Sgd"), ("cache", "tape"), ("fraction", 0), ("fraction", 1.5), ("lr0", 0), ("lr0", float("nan"))],
)
def test_optional_hyperparams_out_of_their_domain_are_refused(field: str, value: Any) -> None:
    err = invalid(TrainingRequest, training(**{f"hyperparams__{field}": value}))

    assert f"hyperparams.{field}" in err.message


@pytest.mark.parametrize("job_id", ["a", "A-z_0-9", "x" * 64, "abc12345"])
def test_job_ids_of_1_to_64_safe_characters_are_accepted(job_id: str) -> None:
    request, _ = parse_request(TrainingRequest, body(training(job_id=job_id)), MAX)

    assert request.job_id == job_id


@pytest.mark.parametrize(
    "job_id",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 65, id="65-chars"),
        pytest.param("a/b", id="slash"),
        pytest.param("a b", id="space"),
        pytest.param("a.b", id="dot"),
        pytest.param("abc\n", id="trailing-newline"),
        pytest.param("é", id="non-ascii"),
        pytest.param(12345, id="number"),
    ],
)
def test_job_ids_outside_the_pattern_are_refused_and_not_carried(job_id: Any) -> None:
    err = invalid(TrainingRequest, training(job_id=job_id))

    assert "job_id:" in err.message
    assert err.job_id is None
    assert readable_job_id({"job_id": job_id}) is None


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_storage_keys_are_refused_by_validate_key(key: str) -> None:
    with pytest.raises(UnsafeKey):
        validate_key(key)


@pytest.mark.parametrize("key", ["datasets/my-dataset/", "a", "models/yolov8n/my-dataset.pt", "a..b/c.d", "a" * 1024])
def test_safe_storage_keys_pass_validate_key_unchanged(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize(
    "field", ["dataset__s3_prefix", "output__prefix", "output__model_name", "hyperparams__pretrained"]
)
def test_unsafe_storage_keys_are_refused_in_every_training_key_field(field: str, key: str) -> None:
    err = invalid(TrainingRequest, training(**{field: key}))

    assert f"{field.replace('__', '.')}:" in err.message
    assert err.job_id == "abc12345"


def test_strings_over_1024_characters_are_refused() -> None:
    parse_request(TrainingRequest, body(training(dataset__name="n" * 1024)), MAX)

    err = invalid(TrainingRequest, training(dataset__name="n" * 1025))

    assert "dataset.name:" in err.message


# --- parse_request --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"job_id": "abc12345"', id="truncated"),
        pytest.param(b'[{"job_id": "abc12345"}]', id="array"),
        pytest.param(b'"abc12345"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"job_id": "abc\xff12345"}', id="invalid-utf8"),
        pytest.param(b'{"job_id": "abc12345", "n": 1' + b"0" * 5000 + b"}", id="huge-integer"),
        pytest.param(b"[" * 200_000 + b"]" * 200_000, id="deeply-nested"),
    ],
)
def test_unparseable_bodies_are_invalid_requests_without_a_job_id(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(TrainingRequest, raw, MAX)

    assert info.value.job_id is None
    assert isinstance(info.value, InvalidInput)
    assert info.value.error_code == "invalid_request"


def test_a_body_over_the_size_limit_is_refused_before_parsing() -> None:
    raw = body(TRAINING_EXAMPLE)
    parse_request(TrainingRequest, raw, len(raw))

    with pytest.raises(InvalidRequest) as info:
        parse_request(TrainingRequest, raw, len(raw) - 1)

    assert info.value.job_id is None
    assert "limit" in info.value.message


def test_a_readable_job_id_is_carried_when_other_fields_are_bad() -> None:
    err = invalid(TrainingRequest, {"job_id": "abc12345", "dataset": "nope"})

    assert err.job_id == "abc12345"
    assert err.message.startswith("invalid request: ")


def test_the_error_names_each_bad_field() -> None:
    data = training(hyperparams__epochs=0, hyperparams__batch="16", output__prefix="/abs", dataset__extra=1)

    err = invalid(TrainingRequest, data)

    for name in ("hyperparams.epochs", "hyperparams.batch", "output.prefix", "dataset.extra"):
        assert f"{name}:" in err.message


def test_the_error_does_not_echo_a_huge_input() -> None:
    huge = "Q" * 200_000
    data = training(dataset__name=huge, output__prefix="../" + huge, hyperparams__model=huge)
    data["hyperparams"]["W" * 50_000] = 1

    err = invalid(TrainingRequest, data)

    assert "QQQQQQQQ" not in err.message
    assert len(err.message) <= 2100
    assert "dataset.name:" in err.message


# --- outgoing messages ----------------------------------------------------------------

ARTIFACT = Artifact(format="onnx", path="models/yolov8n/exports/my-dataset.onnx", size_bytes=12345678,
                    sha256="ab" * 32, verified=True)
ARTIFACT_KEYS = {"format", "path", "size_bytes", "sha256", "verified"}

OUTGOING: list[tuple[_Message, set[str]]] = [
    (
        TrainingStarted(job_id="abc12345", total_epochs=100, worker="host-a/gpu0"),
        {"type", "job_id", "status", "total_epochs", "resumed_from_epoch", "worker", "timestamp"},
    ),
    (
        EpochUpdate(job_id="abc12345", current_epoch=15, total_epochs=100, progress=15.0,
                    metrics={"train_loss": 0.0234, "mAP50": 0.789, "box_loss": 0.0123, "cls_loss": 0.0089,
                             "dfl_loss": 0.0022}),
        {"type", "job_id", "status", "current_epoch", "total_epochs", "progress", "metrics", "timestamp"},
    ),
    (
        TrainingCompleted(job_id="abc12345", model_path="models/yolov8n/my-dataset.pt",
                          final_metrics={"final_mAP50": 0.892, "final_loss": 0.0156, "training_epochs": 100},
                          training_time=3600.5),
        {"type", "job_id", "status", "progress", "model_path", "final_metrics", "training_time", "timestamp"},
    ),
    (
        TrainingFailed(job_id="abc12345", current_epoch=23, error_code="out_of_memory",
                       error_message="CUDA out of memory", partial_metrics={"last_loss": 0.0234, "last_mAP50": 0.567}),
        {"type", "job_id", "status", "current_epoch", "error_code", "error_message", "partial_metrics", "timestamp"},
    ),
    (
        TrainingCancelled(job_id="abc12345", current_epoch=3, checkpoint_path="models/yolov8n/last.pt"),
        {"type", "job_id", "status", "current_epoch", "checkpoint_path", "timestamp"},
    ),
    (
        # conversion_started's fields are not spelled out: the training_started style.
        ConversionStarted(job_id="conv0001", formats=["onnx", "torchscript"], worker="host-a/convert"),
        {"type", "job_id", "status", "formats", "worker", "timestamp"},
    ),
    (
        ConversionUpdate(job_id="conv0001", current_format="onnx", progress=50.0),
        {"type", "job_id", "status", "current_format", "progress", "timestamp"},
    ),
    (
        ConversionCompleted(job_id="conv0001", artifacts=[ARTIFACT], conversion_time=12.3),
        {"type", "job_id", "status", "progress", "artifacts", "conversion_time", "timestamp"},
    ),
    (
        ConversionFailed(job_id="conv0001", error_code="unsupported_format", error_message="no GPU for engine",
                         failed_format="engine", artifacts=[ARTIFACT]),
        {"type", "job_id", "status", "error_code", "error_message", "failed_format", "artifacts", "timestamp"},
    ),
    (
        ConversionCancelled(job_id="conv0001"),
        {"type", "job_id", "status", "artifacts", "timestamp"},
    ),
    (
        InferenceCompleted(
            job_id="inf0001", model_path="models/yolov8n/my-dataset.pt", inference_time_ms=14.2,
            results=[ImageResult(image="images/street.jpg", width=1280, height=720, detections=[
                Detection(class_id=0, class_name="car", confidence=0.91, box=Box(x1=10.5, y1=20.0, x2=110.0, y2=90.25))
            ])],
        ),
        {"type", "job_id", "status", "model_path", "results", "inference_time_ms", "timestamp"},
    ),
    (
        InferenceFailed(job_id="inf0001", error_code="model_not_found", error_message="no such model"),
        {"type", "job_id", "status", "error_code", "error_message", "timestamp"},
    ),
]

OUTGOING_IDS = [str(message.to_json_dict()["type"]) for message, _ in OUTGOING]

STATUS = {"started": "running", "update": "running", "completed": "completed", "failed": "failed",
          "cancelled": "cancelled"}


@pytest.mark.parametrize(("message", "keys"), OUTGOING, ids=OUTGOING_IDS)
def test_outgoing_messages_serialise_to_exactly_the_contracts_fields(message: _Message, keys: set[str]) -> None:
    data = json.loads(message.to_json_bytes())

    assert set(data) == keys
    assert data == message.to_json_dict()
    assert data["type"] == message.type  # type: ignore[attr-defined]
    assert data["status"] == STATUS[data["type"].rsplit("_", 1)[1]]
    assert is_terminal(message) == (data["status"] in ("completed", "failed", "cancelled"))


def test_epoch_update_carries_eta_seconds_only_when_set() -> None:
    message = EpochUpdate(job_id="j", current_epoch=1, total_epochs=2, progress=50.0, metrics={}, eta_seconds=12.5)

    data = message.to_json_dict()

    assert data["eta_seconds"] == 12.5
    assert set(data) == OUTGOING[1][1] | {"eta_seconds"}


def test_epoch_update_carries_the_specifications_metrics_verbatim() -> None:
    data = OUTGOING[1][0].to_json_dict()

    assert data["metrics"] == {"train_loss": 0.0234, "mAP50": 0.789, "box_loss": 0.0123, "cls_loss": 0.0089,
                               "dfl_loss": 0.0022}
    assert (data["current_epoch"], data["total_epochs"], data["progress"]) == (15, 100, 15.0)


def test_training_cancelled_sends_a_null_checkpoint_path_when_there_is_none() -> None:
    data = json.loads(TrainingCancelled(job_id="abc12345", current_epoch=0).to_json_bytes())

    assert "checkpoint_path" in data
    assert data["checkpoint_path"] is None


def test_conversion_failed_sends_a_null_failed_format_when_there_is_none() -> None:
    data = ConversionFailed(job_id="c", error_code="storage_error", error_message="x").to_json_dict()

    assert data["failed_format"] is None
    assert data["artifacts"] == []


def test_conversion_update_carries_its_artifact_only_when_set() -> None:
    data = ConversionUpdate(job_id="c", current_format="onnx", progress=50.0, artifact=ARTIFACT).to_json_dict()

    assert set(data["artifact"]) == ARTIFACT_KEYS


def test_an_artifact_carries_its_verification_note_only_when_set() -> None:
    noted = ARTIFACT.model_copy(update={"verified": False, "verification": "no sample image"})

    data = ConversionCompleted(job_id="c", artifacts=[ARTIFACT, noted], conversion_time=1.0).to_json_dict()

    assert set(data["artifacts"][0]) == ARTIFACT_KEYS
    assert data["artifacts"][1]["verification"] == "no sample image"


def test_artifacts_and_detections_have_exactly_the_contracts_fields() -> None:
    completed = OUTGOING[7][0].to_json_dict()
    inference = OUTGOING[10][0].to_json_dict()

    assert set(completed["artifacts"][0]) == ARTIFACT_KEYS
    result = inference["results"][0]
    assert set(result) == {"image", "width", "height", "detections"}
    assert set(result["detections"][0]) == {"class_id", "class_name", "confidence", "box"}
    assert result["detections"][0]["box"] == {"x1": 10.5, "y1": 20.0, "x2": 110.0, "y2": 90.25}


ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00$")


@pytest.mark.parametrize(("message", "keys"), OUTGOING, ids=OUTGOING_IDS)
def test_timestamps_are_iso_8601_utc_with_offset(message: _Message, keys: set[str]) -> None:
    stamp = message.to_json_dict()["timestamp"]

    assert ISO_UTC.match(stamp), stamp
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0)


def test_timestamps_keep_microseconds_even_when_they_are_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    import ai_service.messages.base as messages  # where utc_now reads the clock

    class FixedClock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> "FixedClock":
            return cls(2024, 1, 15, 10, 30, 45, 0, tzinfo=tz)

    monkeypatch.setattr(messages, "datetime", FixedClock)

    assert utc_now() == "2024-01-15T10:30:45.000000+00:00"


def test_outgoing_json_is_utf8_not_ascii_escaped() -> None:
    raw = InferenceFailed(job_id="j", error_code="inference_error", error_message="caméra").to_json_bytes()

    assert "caméra".encode() in raw


# --- conversion request ---------------------------------------------------------------


def test_the_contracts_conversion_example_validates() -> None:
    request, _ = parse_request(ConversionRequest, body(CONVERSION_EXAMPLE), MAX)

    assert request.job_id == "conv0001"
    assert request.model.path == "models/yolov8n/my-dataset.pt"
    assert request.formats == ["onnx", "torchscript"]
    assert request.output.prefix == "models/yolov8n/exports"
    assert request.options == ConversionOptions()


def test_conversion_options_default_to_the_contracts_example_values() -> None:
    data = copy.deepcopy(CONVERSION_EXAMPLE)
    del data["options"]

    request, _ = parse_request(ConversionRequest, body(data), MAX)

    assert request.options.model_dump() == CONVERSION_EXAMPLE["options"]


def test_conversion_options_fill_in_what_is_left_out() -> None:
    data = copy.deepcopy(CONVERSION_EXAMPLE)
    data["options"] = {"half": True, "opset": 17}

    request, _ = parse_request(ConversionRequest, body(data), MAX)

    assert request.options.model_dump() == {**CONVERSION_EXAMPLE["options"], "half": True, "opset": 17}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"formats": ["onnx", "onnx"]}, "formats"),
        ({"formats": []}, "formats"),
        ({"formats": ["ONNX"]}, "formats.0"),
        ({"formats": "onnx"}, "formats"),
        ({"model": {"path": "../x.pt"}}, "model.path"),
        ({"output": {"prefix": "/exports"}}, "output.prefix"),
        ({"options": {"imgsz": 31}}, "options.imgsz"),
        ({"options": {"batch": 0}}, "options.batch"),
        ({"options": {"half": "yes"}}, "options.half"),
        ({"options": {"colour": True}}, "options.colour"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_conversion_requests_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    err = invalid(ConversionRequest, {**CONVERSION_EXAMPLE, **change})

    assert f"{field}:" in err.message
    assert err.job_id == "conv0001"


@pytest.mark.parametrize("field", ["job_id", "model", "formats", "output"])
def test_conversion_requests_require_their_fields(field: str) -> None:
    data = {k: v for k, v in CONVERSION_EXAMPLE.items() if k != field}

    err = invalid(ConversionRequest, data)

    assert f"{field}: Field required" in err.message


# --- inference request ----------------------------------------------------------------


def test_the_contracts_inference_example_validates() -> None:
    request, _ = parse_request(InferenceRequest, body(INFERENCE_EXAMPLE), MAX)

    first, second = request.images
    assert isinstance(first, ImagePath)
    assert first.path == "images/street.jpg"
    assert isinstance(second, ImageData)
    assert second.decoded().startswith(b"\x89PNG")
    assert request.params == InferenceParams()


def test_inference_params_default_to_the_contracts_example_values() -> None:
    data = {k: v for k, v in INFERENCE_EXAMPLE.items() if k != "params"}

    request, _ = parse_request(InferenceRequest, body(data), MAX)

    assert request.params.model_dump() == INFERENCE_EXAMPLE["params"]


@pytest.mark.parametrize(
    "image",
    [
        pytest.param({"data": "not base64!"}, id="bad-base64"),
        pytest.param({"data": "abc"}, id="bad-padding"),
        pytest.param({"path": "images/a.jpg", "data": PNG_HEADER}, id="both"),
        pytest.param({}, id="neither"),
        pytest.param({"path": "../a.jpg"}, id="unsafe-path"),
        pytest.param({"url": "http://example.com/a.jpg"}, id="unknown-field"),
        pytest.param("images/a.jpg", id="bare-string"),
    ],
)
def test_inference_images_are_either_a_path_or_base64_data(image: Any) -> None:
    err = invalid(InferenceRequest, {**INFERENCE_EXAMPLE, "images": [{"path": "ok.jpg"}, image]})

    assert "images.1" in err.message
    assert err.job_id == "inf0001"


def test_an_inference_request_needs_at_least_one_image() -> None:
    err = invalid(InferenceRequest, {**INFERENCE_EXAMPLE, "images": []})

    assert "images:" in err.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("conf", -0.01),
        ("conf", 1.01),
        ("iou", 1.5),
        ("imgsz", 31),
        ("imgsz", 8193),
        ("max_det", 0),
        ("classes", [-1]),
        ("classes", [1.5]),
        ("conf", "0.5"),
        ("agnostic", True),
    ],
)
def test_inference_params_out_of_range_are_refused(field: str, value: Any) -> None:
    err = invalid(InferenceRequest, {**INFERENCE_EXAMPLE, "params": {field: value}})

    assert f"params.{field}" in err.message


def test_inference_params_accept_a_class_filter() -> None:
    data = {**INFERENCE_EXAMPLE, "params": {"classes": [0, 2], "conf": 0, "iou": 1}}

    request, _ = parse_request(InferenceRequest, body(data), MAX)

    assert request.params.classes == [0, 2]


# --- control --------------------------------------------------------------------------


def test_a_cancel_message_validates() -> None:
    cancel, _ = parse_request(Cancel, b'{"type": "cancel", "job_id": "abc12345"}', MAX)

    assert (cancel.type, cancel.job_id) == ("cancel", "abc12345")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"job_id": "abc12345"}, id="no-type"),
        pytest.param({"type": "pause", "job_id": "abc12345"}, id="other-type"),
        pytest.param({"type": "cancel"}, id="no-job-id"),
        pytest.param({"type": "cancel", "job_id": "a/b"}, id="bad-job-id"),
        pytest.param({"type": "cancel", "job_id": "abc12345", "why": "x"}, id="unknown-field"),
    ],
)
def test_malformed_cancel_messages_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        parse_request(Cancel, body(data), MAX)


def test_a_ram_cache_is_accepted_when_the_operator_allows_it() -> None:
    from ai_service.limits import Limits

    data = body(training(hyperparams__cache="ram"))
    with pytest.raises(InvalidRequest, match="ALLOW_RAM_CACHE"):
        parse_request(TrainingRequest, data, MAX)
    request, _ = parse_request(TrainingRequest, data, MAX, Limits(allow_ram_cache=True))
    assert request.hyperparams.cache == "ram"
