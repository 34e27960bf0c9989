"""Running Ultralytics offline and safely: environment, model loading, devices, names.

Ultralytics is imported lazily inside the tests, after the session fixture has called
``prepare_ultralytics``; if another test module imported it earlier, the fixture's
call patches the already-loaded switches, which one test checks in a fresh process.
The real checkpoint comes from a 1-epoch training run in a subprocess (~7 s, once per
session) that also checks ``CUDA_VISIBLE_DEVICES`` and the network in a clean process.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ai_service.config import ConfigError
from ai_service.errors import InvalidInput, ObjectNotFound
from ai_service.shapes import draw_shapes_image
from workers.yolo import (
    MODEL_NAME_RE,
    is_out_of_memory,
    model_yaml,
    prepare_ultralytics,
    safe_load_model,
    select_device,
    set_cpu_threads,
)

REPO = Path(__file__).resolve().parents[1]


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def yolo_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared Ultralytics environment for the whole session (set before any import)."""
    work = tmp_path_factory.mktemp("yolo-work")
    prepare_ultralytics(work)
    return work


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail and record any DNS lookup or socket connect made during the test."""
    calls: list[Any] = []

    def getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        calls.append(("getaddrinfo", args[:2]))
        raise OSError("network disabled in tests")

    def connect(self: socket.socket, address: Any) -> None:
        calls.append(("connect", address))
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield calls
    assert calls == [], f"tried to reach the network: {calls}"


# The training run: a fresh interpreter where prepare_ultralytics runs before the first
# ultralytics import, exactly like a worker; it reports what it saw as JSON.
_TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys
    from pathlib import Path

    calls = []
    def _blocked(name):
        def fn(*args, **kwargs):
            calls.append([name, repr(args[:2])])
            raise OSError("network disabled")
        return fn
    socket.getaddrinfo = _blocked("getaddrinfo")
    socket.socket.connect = _blocked("connect")

    from ai_service.shapes import generate_shapes_dataset
    from workers.yolo import model_yaml, prepare_ultralytics, select_device

    root = Path(sys.argv[1])
    prepare_ultralytics(root / "work")
    data = generate_shapes_dataset(root / "ds", n_train=8, n_val=4, size=64, seed=1)
    data.write_text(f"path: {data.parent}\\n" + data.read_text())  # as the worker does

    import ultralytics.nn.tasks as tasks
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import select_device as ul_select_device

    device = select_device("cpu")
    ul_select_device(device, verbose=False)
    after_select = os.environ.get("CUDA_VISIBLE_DEVICES")
    model = YOLO(model_yaml("yolov8n"))
    model.train(data=str(data), epochs=1, imgsz=32, batch=4, device=device, workers=0,
                project=str(root / "runs"), name="t", exist_ok=True, plots=False, amp=False)
    print("RESULT " + json.dumps({
        "cvd_after_select": after_select,
        "cvd_after_train": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "safe_load": tasks.SAFE_LOAD,
        "weights": str(root / "runs" / "t" / "weights"),
        "network": calls,
    }))
    """
)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real Ultralytics checkpoint: yolov8n.yaml trained 1 epoch at imgsz 32 on 8 images."""
    root = tmp_path_factory.mktemp("trained")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3", "PYTHONPATH": str(REPO)}
    for name in ("YOLO_OFFLINE", "ULTRALYTICS_SAFE_LOAD", "YOLO_CONFIG_DIR", "YOLO_AUTOINSTALL"):
        env.pop(name, None)  # the script must set them itself
    out = subprocess.run(
        [sys.executable, "-c", _TRAIN_SCRIPT, str(root)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


@pytest.fixture(scope="session")
def best_pt(trained: dict[str, Any]) -> Path:
    path = Path(trained["weights"]) / "best.pt"
    assert path.is_file()
    return path


# --- prepare_ultralytics -------------------------------------------------------------


def test_prepare_sets_the_offline_and_safe_load_switches_and_installs_fonts(yolo_work: Path) -> None:
    assert os.environ["YOLO_OFFLINE"] == "1"
    assert os.environ["YOLO_AUTOINSTALL"] == "0"
    assert os.environ["ULTRALYTICS_SAFE_LOAD"] == "1"
    assert os.environ["YOLO_CONFIG_DIR"] == str(yolo_work.resolve() / "ultralytics")
    assert os.environ["MPLCONFIGDIR"] == str(yolo_work.resolve() / "mpl")
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        font = yolo_work / "ultralytics" / "Ultralytics" / name
        assert font.is_file()
        assert font.read_bytes()[:4] == b"\x00\x01\x00\x00"


def test_prepare_is_idempotent(yolo_work: Path) -> None:
    before = {k: os.environ.get(k) for k in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "MPLCONFIGDIR", "YOLO_VERBOSE")}
    prepare_ultralytics(yolo_work)
    prepare_ultralytics(yolo_work)
    assert {k: os.environ.get(k) for k in before} == before


def test_check_font_finds_arial_without_the_network(yolo_work: Path, no_network: list[Any]) -> None:
    from ultralytics.utils.checks import check_font

    assert check_font("Arial.ttf") is not None
    assert check_font("Arial.Unicode.ttf") is not None


def test_importing_workers_yolo_has_no_side_effects() -> None:
    code = (
        "import os, sys; before = dict(os.environ); import workers.yolo; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ultralytics')); "
        "print(heavy, dict(os.environ) == before)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] True"


def test_prepare_after_an_early_ultralytics_import_still_enforces_safe_loading(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        for k in ("ULTRALYTICS_SAFE_LOAD", "YOLO_AUTOINSTALL", "YOLO_OFFLINE"):
            os.environ.pop(k, None)
        os.environ["YOLO_CONFIG_DIR"] = sys.argv[1] + "/early"
        import ultralytics.nn.tasks as tasks, ultralytics.utils as u, ultralytics.utils.checks as c
        assert tasks.SAFE_LOAD is False and c.AUTOINSTALL is True
        from workers.yolo import prepare_ultralytics
        prepare_ultralytics(Path(sys.argv[1]) / "late")
        print(tasks.SAFE_LOAD, u.SAFE_LOAD, c.AUTOINSTALL, c.ONLINE, (u.USER_CONFIG_DIR / "Arial.ttf").is_file())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True True False False True"


# --- training in a clean process: CUDA_VISIBLE_DEVICES and the network -----------------


def test_training_leaves_cuda_visible_devices_alone(trained: dict[str, Any]) -> None:
    assert trained["cvd_after_select"] == "3"
    assert trained["cvd_after_train"] == "3"


def test_training_and_dataset_checks_make_no_network_calls(trained: dict[str, Any]) -> None:
    assert trained["network"] == []
    assert trained["safe_load"] is True


def test_ultralytics_select_device_keeps_cuda_visible_devices_for_our_devices(
    yolo_work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ultralytics.utils.torch_utils import select_device as ul_select_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    threads = set_cpu_threads()
    chosen = ul_select_device(select_device("cpu"), verbose=False)
    assert chosen.type == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert threads == (os.cpu_count() or 1)


# --- safe_load_model -----------------------------------------------------------------


def test_a_real_checkpoint_loads_safely_and_predicts(yolo_work: Path, best_pt: Path, no_network: list[Any]) -> None:
    model = safe_load_model(best_pt)
    image, _truth = draw_shapes_image(64, 123)

    results: list[Any] = list(model.predict(image, imgsz=32, device=select_device("cpu"), verbose=False))

    assert model.task == "detect"
    assert model.names == {0: "circle", 1: "square"}
    assert len(results) == 1
    assert results[0].orig_shape == (64, 64)
    assert results[0].boxes is not None


class _SystemPayload:
    """Unpickling calls os.system: the classic crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    """Unpickling runs arbitrary Python through builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _PathPayload:
    """Unpickling calls Path.write_text on a PosixPath (a class Ultralytics does allow)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pwned"))


def _torch_save(obj: Any, path: Path) -> None:
    import torch

    torch.save(obj, path)


def _raw_pickle(obj: Any, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj))


def _inside_real_checkpoint(best: Path) -> Any:
    def write(payload: Any, path: Path) -> None:
        import torch

        ckpt = torch.load(best, map_location="cpu", weights_only=False)  # our own, trusted file
        ckpt["train_args"]["callbacks"] = payload
        torch.save(ckpt, path)

    return write


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload_cls", [_SystemPayload, _ExecPayload, _PathPayload])
@pytest.mark.parametrize("container", ["torch.save", "raw pickle", "inside a real checkpoint"])
def test_a_crafted_pickle_is_refused_without_running_its_code(
    yolo_work: Path, best_pt: Path, tmp_path: Path, payload_cls: type, container: str
) -> None:
    write = {"torch.save": _torch_save, "raw pickle": _raw_pickle}.get(container) or _inside_real_checkpoint(best_pt)
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    write(payload_cls(marker), evil)

    with pytest.raises(InvalidInput, match="not a valid Ultralytics checkpoint"):
        safe_load_model(evil)
    assert not marker.exists()

    # The payload is real: an unrestricted load does run it.
    import torch

    control = tmp_path / "control"
    write(payload_cls(control), evil)
    # A torch.load of a raw pickle fails (bad magic number) after running the payload.
    with contextlib.suppress(RuntimeError, pickle.UnpicklingError, AttributeError, TypeError):
        torch.load(evil, map_location="cpu", weights_only=False)
    assert control.exists()


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"this is not a model\n", b"", b"PK\x03\x04 truncated zip"],
    ids=["random bytes", "text", "empty", "truncated zip"],
)
def test_files_that_are_not_checkpoints_are_invalid_input(yolo_work: Path, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)

    with pytest.raises(InvalidInput, match="not a valid Ultralytics checkpoint"):
        safe_load_model(path)


def test_plain_tensors_and_state_dicts_are_invalid_input(yolo_work: Path, tmp_path: Path) -> None:
    import torch

    for i, obj in enumerate([torch.zeros(3), {"weight": torch.zeros(3)}, {"model": None}]):
        path = tmp_path / f"m{i}.pt"
        torch.save(obj, path)
        with pytest.raises(InvalidInput):
            safe_load_model(path)


def test_missing_files_and_other_suffixes_are_refused_before_loading(yolo_work: Path, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        safe_load_model(tmp_path / "absent.pt")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(InvalidInput):
        safe_load_model(onnx)


def test_a_local_name_ultralytics_would_rewrite_is_refused_instead_of_downloading(
    yolo_work: Path, best_pt: Path, no_network: list[Any]
) -> None:
    # Ultralytics maps '.../yolov5s.pt' to '.../yolov5su.pt' (when the path has no 'u') and then downloads it
    target = Path("/tmp") / f"aiservice-{os.getpid()}-yolov5s.pt"
    target.write_bytes(best_pt.read_bytes())
    try:
        with pytest.raises(ValueError, match="another name"):
            safe_load_model(target)
    finally:
        target.unlink()


def test_yaml_activations_are_never_evaluated(yolo_work: Path, tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    marker = tmp_path / "pwned"
    cfg = yaml_model_load(model_yaml("yolov8n"))
    cfg["activation"] = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"

    with pytest.raises(TypeError, match="unsupported activation"):
        DetectionModel(cfg, nc=2, verbose=False)
    assert not marker.exists()


# --- select_device -------------------------------------------------------------------


def test_select_device_maps_the_setting_to_a_torch_device() -> None:
    import torch

    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    expected_auto = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert select_device("auto") == expected_auto
    for setting in ("cuda", "cuda:0", "0", "gpu"):
        if torch.cuda.is_available():
            assert select_device(setting) == torch.device("cuda", 0)
        else:
            with pytest.raises(ConfigError, match="no CUDA device"):
                select_device(setting)


@pytest.mark.parametrize("setting", ["1", "cuda:1", "0,1", "mps", "tpu", ""])
def test_select_device_refuses_anything_but_the_first_visible_gpu(setting: str) -> None:
    with pytest.raises(ConfigError, match="DEVICE must be"):
        select_device(setting)


# --- is_out_of_memory ----------------------------------------------------------------


def test_out_of_memory_errors_are_recognised_and_others_are_not() -> None:
    import torch

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    if hasattr(torch, "OutOfMemoryError"):
        assert is_out_of_memory(torch.OutOfMemoryError("boom"))
    assert is_out_of_memory(MemoryError())
    cpu_oom = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate"
    assert is_out_of_memory(RuntimeError(cpu_oom))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    def wrapped_memory_error() -> None:
        try:
            raise MemoryError()
        except MemoryError as inner:
            raise ValueError("wrapped") from inner

    with pytest.raises(ValueError, match="wrapped") as wrapped:
        wrapped_memory_error()
    assert is_out_of_memory(wrapped.value)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of range"))
    assert not is_out_of_memory(KeyboardInterrupt())


def test_a_real_cpu_allocation_failure_is_recognised() -> None:
    import torch

    # 1 EiB: more than any x86_64/arm64 address space, so even overcommit refuses it.
    with pytest.raises(Exception) as caught:  # noqa: PT011 - which class torch raises is what is tested
        torch.empty(1 << 60, dtype=torch.uint8)
    assert is_out_of_memory(caught.value), repr(caught.value)


# --- model names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("yolov8n", "yolov8n.yaml"),
        ("yolo11n", "yolo11n.yaml"),
        ("yolov8x.yaml", "yolov8x.yaml"),
        ("yolov5nu", "yolov5n.yaml"),
        ("yolov3-tinyu", "yolov3-tiny.yaml"),
        ("yolov9t", "yolov9t.yaml"),
        ("yolov10b", "yolov10b.yaml"),
        ("yolo12s", "yolo12s.yaml"),
        ("yolo26n", "yolo26n.yaml"),
    ],
)
def test_model_yaml_accepts_detection_models(name: str, expected: str) -> None:
    assert model_yaml(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "yolov8n-seg",
        "yolo11n-cls",
        "yolo11n-pose",
        "yolov8n-obb",
        "yolov8s-world",
        "yoloe-11s",
        "rtdetr-l",
        "resnet50",
        "../x",
        "yolov8n.pt",
        "models/yolov8n",
        "yolov8",
        "YOLOV8N",
        "yolov8n\n",
        "yolov7",
        "yolo11q",
        "",
        "yolov8n-p6",
    ],
)
def test_model_yaml_rejects_other_tasks_and_anything_else(name: str) -> None:
    with pytest.raises(InvalidInput, match="not a supported detection model"):
        model_yaml(name)
    assert not MODEL_NAME_RE.fullmatch(name)


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n", "yolov5nu", "yolov10n", "yolov9t", "yolo26n"])
def test_accepted_names_build_detection_models_from_yaml_offline(
    yolo_work: Path, no_network: list[Any], name: str
) -> None:
    from ultralytics import YOLO

    model = YOLO(model_yaml(name))

    assert model.task == "detect"
    assert model.ckpt_path is None  # built from the yaml, no weights fetched
