"""The export formats of the installed Ultralytics, a request's plan, and what a worker can build."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai_service.errors import InvalidInput
from ai_service.messages import ConversionRequest

#: Names BEs may use for a format, mapped to Ultralytics' own (``tflite`` is Ultralytics'
#: deprecated name of its LiteRT export; the others are its documented aliases).
ALIASES = {"tensorrt": "engine", "trt": "engine", "tflite": "litert", "mlpackage": "coreml"}

#: Formats whose exporter forces INT8 and so needs calibration images (from the exporter source).
CALIBRATED_FORMATS = frozenset({"deepx", "axelera", "imx", "edgetpu", "qnn", "hailo", "xilinx"})

#: Python modules (import name, pip name) each exporter imports or ``check_requirement``s,
#: read from ``ultralytics/engine/exporter.py`` and ``ultralytics/utils/export/*.py``
#: (8.4.x).  ``onnx``-based formats also need what ``onnx`` needs.
REQUIRED_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "torchscript": (),
    "onnx": (("onnx", "onnx"),),
    "openvino": (("openvino", "openvino"),),
    "engine": (("onnx", "onnx"), ("tensorrt", "tensorrt")),
    "coreml": (("coremltools", "coremltools"),),
    "coreai": (("coreai_torch", "coreai-torch"), ("coreai", "coreai-torch")),
    "saved_model": (
        ("onnx", "onnx"), ("tensorflow", "tensorflow"), ("onnx2tf", "onnx2tf"), ("tf_keras", "tf_keras"),
        ("sng4onnx", "sng4onnx"), ("onnx_graphsurgeon", "onnx_graphsurgeon"), ("ai_edge_litert", "ai-edge-litert"),
    ),
    "litert": (("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert")),
    "paddle": (("paddle", "paddlepaddle"), ("x2paddle", "x2paddle")),
    "mnn": (("onnx", "onnx"), ("MNN", "MNN")),
    "ncnn": (("ncnn", "ncnn"), ("pnnx", "pnnx")),
    "imx": (("model_compression_toolkit", "model-compression-toolkit"), ("edgemdt_tpc", "edge-mdt-tpc"),
            ("edgemdt_cl", "edge-mdt-cl")),
    "rknn": (("onnx", "onnx"), ("rknn", "rknn-toolkit2")),
    "executorch": (("executorch", "executorch"),),
    "axelera": (("onnx", "onnx"), ("axelera", "axelera-devkit")),
    "deepx": (("onnx", "onnx"), ("dx_com", "dx_com")),
    "qnn": (("onnx", "onnx"), ("onnxruntime_qnn", "onnxruntime-qnn")),
    "hailo": (("onnx", "onnx"), ("hailo_sdk_client", "the Hailo Dataflow Compiler (hailo_sdk_client)")),
    "ascend": (("onnx", "onnx"),),
    "xilinx": (("onnx", "onnx"), ("quark", "amd-quark")),
}
REQUIRED_MODULES["pb"] = REQUIRED_MODULES["saved_model"]
REQUIRED_MODULES["edgetpu"] = REQUIRED_MODULES["saved_model"]

#: Command-line tools some exporters run.
REQUIRED_TOOLS = {"ascend": "atc", "edgetpu": "edgetpu_compiler"}

#: Formats that can only be built on a CUDA GPU.
GPU_FORMATS = frozenset({"engine"})


@dataclass(frozen=True)
class FormatSpec:
    """One Ultralytics export format as the installed exporter describes it."""

    name: str
    suffix: str
    arguments: frozenset[str]
    fp16: bool
    int8: bool


@dataclass(frozen=True)
class ConversionState:
    """What the conversion worker's setup prepared once: the installed exporter's formats."""

    formats: dict[str, FormatSpec]


def export_table() -> dict[str, FormatSpec]:
    """Every export format of the installed Ultralytics (``.pt`` itself excluded)."""
    from ultralytics.engine import exporter

    export_formats: Callable[[], dict[str, list[Any]]] = exporter.export_formats  # untyped upstream
    table = export_formats()
    specs: dict[str, FormatSpec] = {}
    for name, suffix, arguments in zip(table["Argument"], table["Suffix"], table["Arguments"], strict=True):
        if name == "-":
            continue
        specs[name] = FormatSpec(
            name=name,
            suffix=suffix,
            arguments=frozenset(arguments),
            fp16=name in exporter.FP16_FORMATS,
            int8=name in exporter.INT8_FORMATS,
        )
    return specs


@dataclass(frozen=True)
class Plan:
    """One requested format: the name the BE used and the Ultralytics format it means."""

    requested: str
    spec: FormatSpec

    @property
    def name(self) -> str:
        return self.spec.name


def plan_formats(request: ConversionRequest, table: dict[str, FormatSpec]) -> list[Plan]:
    """Validate the formats and options against each other; raise InvalidInput naming each problem."""
    opts = request.options
    problems: list[str] = []
    unknown = [f for f in request.formats if ALIASES.get(f, f) not in table]
    if unknown:
        problems.append(
            f"formats: unknown format(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(table))}"
            f" (aliases: {', '.join(sorted(ALIASES))})"
        )
    plans = [Plan(f, table[ALIASES.get(f, f)]) for f in request.formats if f not in unknown]
    canonical = [p.name for p in plans]
    repeated = sorted({n for n in canonical if canonical.count(n) > 1})
    if repeated:
        problems.append(f"formats: {', '.join(repeated)} requested twice (under an alias)")
    if opts.half and opts.int8:
        problems.append("options: half and int8 exclude each other; ask for one precision")
    if opts.int8:
        no_int8 = [p.requested for p in plans if not p.spec.int8]
        if no_int8:
            allowed = ", ".join(sorted(n for n, s in table.items() if s.int8))
            problems.append(f"options.int8: not available for {', '.join(no_int8)} (INT8 formats: {allowed})")
    if opts.half:
        no_half = [p.requested for p in plans if not p.spec.fp16]
        if no_half:
            allowed = ", ".join(sorted(n for n, s in table.items() if s.fp16))
            problems.append(f"options.half: not available for {', '.join(no_half)} (FP16 formats: {allowed})")
    needs_data = opts.int8 or any(p.name in CALIBRATED_FORMATS for p in plans)
    if needs_data and request.dataset is None:
        problems.append("dataset: INT8 export needs dataset.s3_prefix, whose val images calibrate it")
    if problems:
        raise InvalidInput("invalid request: " + "; ".join(problems))
    return plans


def precision(options: Any) -> str:
    return "int8" if options.int8 else "fp16" if options.half else "fp32"


def unsupported_reason(plan: Plan, options: Any, device: Any) -> str | None:
    """Why this worker cannot build ``plan`` (a missing package, tool or GPU), or None."""
    name = plan.name
    on_gpu = getattr(device, "type", "cpu") == "cuda"
    if name in GPU_FORMATS and not on_gpu:
        return f"{plan.requested} (TensorRT) needs a CUDA GPU; this worker runs on the CPU"
    if name == "torchscript" and options.half and not on_gpu:
        return "FP16 torchscript needs a CUDA GPU; this worker runs on the CPU (ask for fp32)"
    modules = list(REQUIRED_MODULES.get(name, ()))
    if name == "onnx" and (options.simplify or options.int8):
        modules.append(("onnxruntime", "onnxruntime"))
    if name == "onnx" and options.simplify:
        modules.append(("onnxslim", "onnxslim"))
    if name == "openvino" and options.int8:
        modules.append(("nncf", "nncf"))
    missing = sorted({pip for module, pip in modules if not _module_available(module)})
    if missing:
        return f"{plan.requested} export needs the Python package(s) {', '.join(missing)}, not installed on this worker"
    tool = REQUIRED_TOOLS.get(name)
    if tool is not None and shutil.which(tool) is None:
        return f"{plan.requested} export needs the {tool!r} tool, not found on this worker's PATH"
    return None


def _module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is broken or half installed
        return False


def export_arguments(plan: Plan, request: ConversionRequest, device: Any, data_yaml: Path | None) -> dict[str, Any]:
    """The ``model.export()`` arguments for one format: only the options it takes.

    ``dynamic``/``simplify``/``opset``/``batch`` apply where the format takes them and
    are left out elsewhere (Ultralytics refuses non-default arguments a format does not
    list); precision was validated already.
    """
    opts = request.options
    args: dict[str, Any] = {"format": plan.name, "imgsz": opts.imgsz, "device": device, "verbose": False}
    takes = plan.spec.arguments
    if "batch" in takes:
        args["batch"] = opts.batch
    if "dynamic" in takes:
        args["dynamic"] = opts.dynamic
    if "simplify" in takes:
        args["simplify"] = opts.simplify
    if "opset" in takes and opts.opset is not None:
        args["opset"] = opts.opset
    if opts.int8:
        args["quantize"] = 8
    elif opts.half:
        args["quantize"] = 16
    if data_yaml is not None and "data" in takes and (opts.int8 or plan.name in CALIBRATED_FORMATS):
        args["data"] = str(data_yaml)
    return args
