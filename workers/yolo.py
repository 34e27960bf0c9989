"""Running Ultralytics safely and offline: the one place workers touch its switches.

Ultralytics reads most of its configuration from environment variables *when it is
first imported*, reaches the network by default (fonts, assets, pip) and unpickles
``.pt`` files with ``weights_only=False``.  Workers therefore call
:func:`prepare_ultralytics` at start-up, before anything imports ``ultralytics``, and
load every model file through :func:`safe_load_model`.

Importing this module has no side effects and does not import torch or ultralytics;
they are imported lazily inside the functions that need them.

Findings in the installed Ultralytics (8.4.190), which the tests pin:

* ``ULTRALYTICS_SAFE_LOAD=1`` exists (``ultralytics.utils.SAFE_LOAD``, read once at
  import).  ``nn.tasks.torch_safe_load`` then loads with ``torch.load(weights_only=True)``
  plus an allow-list of Ultralytics/torch model classes registered per checkpoint
  (``_SafeLoad``), and ``parse_model`` resolves yaml activations without ``eval``.
  It silently falls back to an unsafe load on torch < 2.6 (``_SafeLoad.SUPPORTED``);
  :func:`ensure_safe_load` refuses to go on in that case.
* ``utils.torch_utils.select_device`` no longer writes ``CUDA_VISIBLE_DEVICES`` (older
  releases did); given a ``torch.device`` it canonicalises it via ``parse_device``
  (``cuda:0`` -> ``"0"``, ``cpu`` -> ``"cpu"``) and on CPU resets torch to
  ``cpu_count - 1`` threads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ai_service.config import ConfigError
from ai_service.errors import InvalidInput, ObjectNotFound

if TYPE_CHECKING:  # pragma: no cover - typing only; never imported at run time here
    import torch
    from ultralytics.models import YOLO

log = logging.getLogger("workers.yolo")

__all__ = [
    "MODEL_NAME_RE",
    "ensure_safe_load",
    "is_out_of_memory",
    "model_yaml",
    "prepare_ultralytics",
    "safe_load_model",
    "select_device",
    "set_cpu_threads",
]

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")

# Switches forced on every call: they decide whether a job can reach the network,
# run pip, or execute code from a model file.
_FORCED_ENV = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "ULTRALYTICS_SAFE_LOAD": "1",
}

# Module-level constants Ultralytics computes from the environment at import time,
# and the value each must have; re-applied when ultralytics was imported too early.
_IMPORT_TIME_CONSTANTS: dict[str, bool] = {"SAFE_LOAD": True, "AUTOINSTALL": False, "ONLINE": False}


# --- environment ---------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_fonts(font_dir: Path) -> None:
    """Put a TTF where ``check_font`` looks first, so it never downloads Arial from GitHub."""
    mpl = _package_dir("matplotlib")
    source = mpl / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf" if mpl else None
    if source is None or not source.is_file():
        log.warning("matplotlib's DejaVuSans.ttf not found; Ultralytics may try to download Arial.ttf")
        return
    font_dir.mkdir(parents=True, exist_ok=True)
    for name in _FONT_NAMES:
        target = font_dir / name
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        # copy then rename: several workers may share one work_dir
        fd, tmp = tempfile.mkstemp(dir=font_dir, prefix=f".{name}.")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)


def _patch_imported_ultralytics() -> None:
    """Re-apply the switches to an Ultralytics that was imported before we set them.

    Its ``SAFE_LOAD``/``AUTOINSTALL``/``ONLINE`` are module constants read once at
    import; they are copied into several modules by ``from ... import``.
    """
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "ultralytics" or name.startswith("ultralytics.")):
            continue
        for attr, value in _IMPORT_TIME_CONSTANTS.items():
            if attr in vars(module) and module_constant(module, attr) is not value:
                set_module_constant(module, attr, value)


def module_constant(module: ModuleType, name: str) -> object:
    """An Ultralytics constant as ``module`` holds it.

    Ultralytics copies its import-time switches into many modules by ``from ... import``;
    those copies are not re-exported names, so they are read from the module's namespace.
    """
    return vars(module).get(name)


def set_module_constant(module: ModuleType, name: str, value: object) -> None:
    """Replace ``module``'s copy of an Ultralytics constant (see :func:`module_constant`)."""
    vars(module)[name] = value


def prepare_ultralytics(work_dir: Path, *, verbose: bool | None = None) -> None:
    """Make Ultralytics offline, pip-free and safe-loading; call once at worker start.

    Sets ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=0``, ``ULTRALYTICS_SAFE_LOAD=1``,
    ``YOLO_CONFIG_DIR=<work_dir>/ultralytics`` and ``MPLCONFIGDIR=<work_dir>/mpl``, and
    ``YOLO_VERBOSE`` (default False: the worker reports progress itself; an operator's
    own ``YOLO_VERBOSE`` is kept unless ``verbose`` is given).  Copies matplotlib's
    DejaVuSans as ``Arial.ttf``/``Arial.Unicode.ttf`` into the settings directory.

    Must run before ``ultralytics`` is first imported, because it reads these at import.
    If it was imported already (a test runner, a careless import), the safety switches
    are patched into the loaded modules and the fonts are also put in its settings
    directory; the config/matplotlib directories then stay whatever they were.
    Idempotent: calling it again is cheap and harmless.
    """
    work_dir = Path(work_dir).resolve()
    config_dir = work_dir / "ultralytics"
    mpl_dir = work_dir / "mpl"
    mpl_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(_FORCED_ENV)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["MPLCONFIGDIR"] = str(mpl_dir)
    if verbose is not None:
        os.environ["YOLO_VERBOSE"] = "True" if verbose else "False"
    else:
        os.environ.setdefault("YOLO_VERBOSE", "False")
    # Idle OpenMP threads sleep instead of spinning (torch reads this when it loads).  A
    # worker shares its host with other workers and the broker; spinning threads there
    # collapse: inference fell from 321 to 3-71 img/s, a 20-epoch CPU training took x7
    # longer under load (docs/PERFORMANCE.md).  An operator may set OMP_WAIT_POLICY.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # get_user_config_dir() appends "Ultralytics" to YOLO_CONFIG_DIR
    _install_fonts(config_dir / "Ultralytics")

    utils = sys.modules.get("ultralytics.utils")
    if utils is not None:
        log.warning("ultralytics was imported before prepare_ultralytics(); patching its safety switches")
        _patch_imported_ultralytics()
        loaded_dir = getattr(utils, "USER_CONFIG_DIR", None)
        if isinstance(loaded_dir, Path) and loaded_dir != config_dir / "Ultralytics":
            _install_fonts(loaded_dir)


def ensure_safe_load() -> None:
    """Guarantee Ultralytics loads checkpoints with ``weights_only=True``, or refuse.

    Cheap; call it before anything that makes Ultralytics read a ``.pt`` we did not write
    ourselves (``YOLO(path)``, ``train(pretrained=...)``, ``train(resume=True)``).
    Imports ultralytics (run :func:`prepare_ultralytics` first).
    """
    if os.environ.get("ULTRALYTICS_SAFE_LOAD") != "1":
        os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    import ultralytics.nn.tasks as tasks

    if not getattr(tasks, "_SafeLoad", None) or not tasks._SafeLoad.SUPPORTED:
        raise RuntimeError("this torch/ultralytics cannot load checkpoints with weights_only=True; refusing")
    if module_constant(tasks, "SAFE_LOAD") is not True:
        _patch_imported_ultralytics()


# --- loading models ------------------------------------------------------------------


def _invalid_model(path: Path) -> InvalidInput:
    return InvalidInput(f"model file {path.name} is not a valid Ultralytics checkpoint (unsafe or corrupt pickle)")


def safe_load_model(path: Path) -> YOLO:
    """Load a local Ultralytics ``.pt`` without letting its pickle run code.

    Uses Ultralytics' own restricted loader (``weights_only=True`` + allow-list), never
    a download: the path must be an existing local file.  A pickle that references
    anything outside the allow-list, and any file that is not a checkpoint (random
    bytes, text, a plain state dict, TorchScript), raises :class:`InvalidInput`.
    A missing file raises :class:`ObjectNotFound`; out-of-memory errors propagate.
    """
    path = Path(path)
    if not path.is_file():
        raise ObjectNotFound(f"model file {path.name} does not exist")
    if path.suffix.lower() != ".pt":
        raise InvalidInput(f"model file {path.name} is not a .pt checkpoint")
    ensure_safe_load()
    from ultralytics.models import YOLO
    from ultralytics.utils.checks import check_yolov5u_filename

    resolved = str(path.resolve())
    if check_yolov5u_filename(resolved, verbose=False) != resolved:
        # Ultralytics would silently look for '...yolov5su.pt' instead (and try to download it)
        raise ValueError(f"store the model under another name than {path.name!r} (Ultralytics renames it)")
    try:
        return YOLO(resolved)
    except OSError:
        raise  # the disk, not the file's content
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        detail = (str(exc).strip().splitlines() or [""])[0]
        log.warning("refused model file %s: %s: %s", path, type(exc).__name__, detail)
        raise _invalid_model(path) from exc


# --- devices and threads -------------------------------------------------------------


def select_device(setting: str) -> torch.device:
    """Turn the ``DEVICE`` setting into a ``torch.device``: auto, cpu, or the first visible GPU.

    ``auto`` -> ``cuda:0`` if CUDA is available, else ``cpu``; ``cuda``/``cuda:0``/``0``
    -> ``cuda:0``.  Only the first *visible* device is ever used: supervisord pins each
    worker with ``CUDA_VISIBLE_DEVICES``.  We hand Ultralytics this ``torch.device``,
    never a string like ``"0"``: older Ultralytics ``select_device`` wrote
    ``CUDA_VISIBLE_DEVICES`` from a string before CUDA was initialised, which could move
    the job onto physical GPU 0; 8.4.x no longer writes it but still reinterprets
    numeric strings (``"3"`` means torch index 0 under ``CUDA_VISIBLE_DEVICES=3``).  A
    ``torch.device`` index is always relative to the visible set.
    """
    import torch

    value = setting.strip().lower()
    if value == "cpu":
        return torch.device("cpu")
    if value == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if value in ("cuda", "cuda:0", "0", "gpu"):
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(f"DEVICE={setting!r} but no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible!r})")
        return torch.device("cuda", 0)
    raise ConfigError(
        f"DEVICE must be auto, cpu, cuda or cuda:0 (the first visible GPU; pin GPUs with "
        f"CUDA_VISIBLE_DEVICES), not {setting!r}"
    )


def set_cpu_threads(n: int | None = None) -> int:
    """Give torch ``n`` threads (default: every core) and return the number set.

    Ultralytics sets ``cpu_count - 1`` whenever predict or train starts on the CPU (1 of 2
    cores here), so call this after it has started (after warm-up, at each epoch start).

    Inference and conversion use it; training does not.  Training on the CPU keeps
    Ultralytics' own ``min(8, cpu_count - 1)`` threads, the faster choice measured side
    by side (2-core machine, yolov8n 20 epochs at 128 px: 13.9 s vs 17.7 s with every
    core; the spare core runs the checkpoint uploads, the publisher and the broker
    client; docs/PERFORMANCE.md).  On a GPU the torch CPU thread count hardly matters.
    """
    import torch

    threads = n if n is not None else (os.cpu_count() or 1)
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


_OOM_MESSAGES = ("out of memory", "defaultcpuallocator: can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) means memory ran out.

    Covers ``torch.cuda.OutOfMemoryError``, ``torch.OutOfMemoryError``, ``MemoryError``
    and the RuntimeErrors torch raises with "out of memory" / "DefaultCPUAllocator:
    can't allocate memory".  Does not import torch: if it is not loaded, no torch
    exception can exist.
    """
    torch_mod = sys.modules.get("torch")
    oom_types: list[type[BaseException]] = [MemoryError]
    if torch_mod is not None:
        candidates = (getattr(torch_mod, "OutOfMemoryError", None), getattr(torch_mod.cuda, "OutOfMemoryError", None))
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseException):
                oom_types.append(candidate)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, tuple(oom_types)):
            return True
        if isinstance(current, RuntimeError) and any(m in str(current).lower() for m in _OOM_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


# --- model names ---------------------------------------------------------------------

#: Detection architectures this service trains from scratch (from their yaml).  Names of
#: other tasks (``-seg``, ``-cls``, ``-pose``, ``-obb``, ``-world``, ``yoloe``, ``rtdetr``)
#: and anything else do not match.  ``model_yaml`` also checks the yaml is installed.
MODEL_NAME_RE = re.compile(
    r"^(?:"
    r"yolov[568][nsmlx]"  # v5/v6/v8: one yaml, scale letter picks the size
    r"|yolov5[nsmlx]u"  # Ultralytics' name for v5 trained with its loss; same yaml
    r"|yolov3(?:-tiny|-spp)?u?"  # v3: no scales
    r"|yolov9[tsmce]"  # v9: one yaml per size
    r"|yolov10[nsmblx]"  # v10: one yaml per size
    r"|yolo(?:11|12|26)[nsmlx]"  # 11/12/26: one yaml, scale letter
    r")$"
)

_MODEL_NAME_HINT = (
    "yolov5|yolov6|yolov8 + n/s/m/l/x, yolov5nu..., yolov3[-tiny|-spp][u], yolov9 + t/s/m/c/e, "
    "yolov10 + n/s/m/b/l/x, yolo11|yolo12|yolo26 + n/s/m/l/x"
)


def _find_model_cfg(filename: str) -> Path | None:
    root = _package_dir("ultralytics")
    if root is None:
        return None
    matches = sorted((root / "cfg" / "models").rglob(filename))
    return matches[0] if matches else None


def model_yaml(name: str) -> str:
    """Map a detection model name (``yolov8n``) to the yaml Ultralytics builds it from.

    Returns e.g. ``"yolov8n.yaml"``; Ultralytics resolves it like ``YOLO("yolov8n.yaml")``
    does: the file itself if shipped (``yolov10n.yaml``), else the scale letter is
    stripped (``yolov8.yaml``) and picked from ``scales``.  Never a ``.pt`` name: a bare
    official ``.pt`` name makes Ultralytics download weights.  ``.yaml`` is accepted and
    stripped; ``u`` names map to the plain yaml (``yolov5nu`` -> ``yolov5n.yaml``).
    Raises :class:`InvalidInput` for other tasks, unknown names and anything path-like.
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if not MODEL_NAME_RE.fullmatch(stem):
        raise InvalidInput(
            f"hyperparams.model {name!r} is not a supported detection model; expected one of: {_MODEL_NAME_HINT}"
        )
    if stem.startswith(("yolov5", "yolov3")) and stem.endswith("u"):
        stem = stem[:-1]
    filename = f"{stem}.yaml"
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", filename)  # as ultralytics.nn.tasks.yaml_model_load
    if _find_model_cfg(filename) is None and _find_model_cfg(unified) is None:
        raise InvalidInput(f"hyperparams.model {name!r} is not available in the installed Ultralytics")
    return filename
