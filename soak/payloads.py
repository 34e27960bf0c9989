"""The hostile objects the corpus's requests point at, planted in the (local) storage before
the corpus is sent: pickle-payload ``.pt`` models (``__reduce__`` creates a marker directory:
it must never exist), YAML with Python tags, pickled label caches, list files and symlinks
leading out of the dataset, a download script, a finished job's record, a foreign
TorchScript file; and the lying or hostile image bytes the inference entries carry."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image


class Marker:
    """``__reduce__`` runs ``os.mkdir(path)`` on unpickling: evidence of code execution."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (self.path,))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"model": Marker(str(marker)), "train_args": {}}, protocol=2)


def evil_torch_checkpoint(marker: Path, dest: Path, probe: Path) -> None:
    """A real ``torch.save`` checkpoint whose pickle creates ``marker`` when loaded unsafely.

    Built in a subprocess (this process does not import torch); the subprocess also loads
    it once with ``weights_only=False`` against ``probe`` to show the payload is live.
    """
    import subprocess
    import sys

    code = (
        "import os, sys, torch\n"
        "class M:\n"
        "    def __init__(self, p): self.p = p\n"
        "    def __reduce__(self): return (os.mkdir, (self.p,))\n"
        "torch.save({'epoch': -1, 'model': M(sys.argv[1]), 'train_args': {}}, sys.argv[2])\n"
        "torch.save({'model': M(sys.argv[3])}, sys.argv[2] + '.probe')\n"
        "torch.load(sys.argv[2] + '.probe', weights_only=False)\n"
        "os.remove(sys.argv[2] + '.probe')\n"
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(marker), str(dest), str(probe)], check=True,
                   capture_output=True, timeout=300)


def tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian TIFF header whose IFD claims width x height, with no pixel data."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (279, 4, 1, width * height)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def small_png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def eps(marker: Path) -> bytes:
    """PostScript that makes a directory if an interpreter (Ghostscript) ever runs it."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
            b"(%pipe%mkdir " + str(marker).encode() + b") (w) file\nshowpage\n%%EOF\n")


def plant(storage_dir: Path, marker_dir: Path, shapes_dir: Path) -> dict[str, str]:
    """Put the hostile objects in the (local) storage; return their keys."""

    def put(key: str, data: bytes) -> str:
        path = storage_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return key

    refs = {"missing_dataset": "datasets/soak-none/", "missing_model": "models/soak-none.pt",
            "dataset": "datasets/soak-shapes/"}
    shutil.copytree(shapes_dir, storage_dir / "datasets" / "soak-shapes", dirs_exist_ok=True)
    plant_models(put, refs, storage_dir, marker_dir)
    plant_datasets(put, refs, storage_dir, marker_dir, shapes_dir)
    # A symlink out of STORAGE_DIR inside a dataset.
    refs["symlink"] = "datasets/soak-symlink/"
    shutil.copytree(shapes_dir, storage_dir / "datasets" / "soak-symlink", dirs_exist_ok=True)
    secret = storage_dir.parent / "soak-secret.png"
    secret.write_bytes(b"SOAK-SECRET" * 8)
    link = storage_dir / "datasets" / "soak-symlink" / "images" / "train" / "leak.png"
    if not link.is_symlink():
        os.symlink(secret, link)
    # A finished job's record that reserved-key requests aim at: its bytes must not change.
    refs["victim_name"] = "train/soak-victim.json"
    refs["victim_record"] = put("jobs/train/soak-victim.json", json.dumps(
        {"job_id": "soak-victim", "op": "train", "status": "completed", "terminal": {"type": "training_completed"},
         "terminal_message_id": "soak", "terminal_sent": True}).encode())
    # A TorchScript file the service did not export (TorchScript is code).
    refs["foreign_ts"] = put("models/foreign.torchscript", b"PK\x03\x04" + os.urandom(2048))
    return refs


def plant_models(put: Callable[[str, bytes], str], refs: dict[str, str], storage_dir: Path, marker_dir: Path) -> None:
    """Model files that are pickles (checked live first), garbage or an executable."""
    refs["evil"] = put("models/evil.pt", evil_pickle(marker_dir / "pickle-pt-ran"))
    evil_zip = storage_dir / "models" / "evil-zip.pt"
    probes = marker_dir.parent / "live-probes"
    probes.mkdir(parents=True, exist_ok=True)
    evil_torch_checkpoint(marker_dir / "torch-zip-ran", evil_zip, probes / "torch-zip")
    pickle.loads(evil_pickle(probes / "pickle"))  # our own payload, to show it is live
    if not ((probes / "torch-zip").is_dir() and (probes / "pickle").is_dir()):
        raise RuntimeError("the pickle payloads did not run when loaded unsafely: the corpus would prove nothing")
    refs["evil_zip"] = "models/evil-zip.pt"
    refs["marker_dir"] = str(marker_dir)
    refs["garbage_pt"] = put("models/garbage.pt", os.urandom(4096))
    refs["garbage_onnx"] = put("models/garbage.onnx", os.urandom(4096))
    refs["exe"] = put("models/tool.exe", b"MZ" + os.urandom(512))


def plant_datasets(put: Callable[[str, bytes], str], refs: dict[str, str], storage_dir: Path, marker_dir: Path,
                   shapes_dir: Path) -> None:
    """Datasets whose data.yaml has a Python tag, points outside or is no mapping, with pickled
    label caches, a list file naming images outside, or a download script."""
    refs["yaml_tag"] = "datasets/soak-yaml-tag/"
    put("datasets/soak-yaml-tag/data.yaml",
        f"train: !!python/object/apply:os.mkdir ['{marker_dir / 'yaml-ran'}']\nval: images\nnames: [a]\n".encode())
    refs["yaml_outside"] = "datasets/soak-yaml-outside/"
    put("datasets/soak-yaml-outside/data.yaml", b"train: ../../../../../../etc\nval: ../../../../etc\nnames: [a]\n")
    refs["yaml_list"] = "datasets/soak-yaml-list/"
    put("datasets/soak-yaml-list/data.yaml", b"- just\n- a list\n")
    refs["evil_cache"] = "datasets/soak-evil-cache/"
    shutil.copytree(shapes_dir, storage_dir / "datasets" / "soak-evil-cache", dirs_exist_ok=True)
    for split in ("train", "val"):
        put(f"datasets/soak-evil-cache/labels/{split}.cache", evil_pickle(marker_dir / f"cache-{split}-ran"))
    # A list file naming images outside the dataset, with a pickled label cache beside them.
    outside = storage_dir.parent / "soak-outside"
    shutil.copytree(shapes_dir, outside, dirs_exist_ok=True)
    for split in ("train", "val"):
        (outside / "labels" / f"{split}.cache").write_bytes(evil_pickle(marker_dir / f"outside-cache-{split}-ran"))
    refs["list_escape"] = "datasets/soak-list-escape/"
    shutil.copytree(shapes_dir, storage_dir / "datasets" / "soak-list-escape", dirs_exist_ok=True)
    put("datasets/soak-list-escape/train.txt",
        "\n".join(str(p) for p in sorted((outside / "images" / "train").iterdir())).encode())
    put("datasets/soak-list-escape/data.yaml", b"train: train.txt\nval: images/val\nnames: [circle, square]\n")
    # A data.yaml whose val is missing, with a download script (Ultralytics would exec it).
    refs["download"] = "datasets/soak-download/"
    shutil.copytree(shapes_dir, storage_dir / "datasets" / "soak-download", dirs_exist_ok=True)
    put("datasets/soak-download/data.yaml",
        f"train: images/train\nval: images/absent\nnames: [a, b]\n"
        f"download: \"import os; os.mkdir('{marker_dir / 'download-ran'}')\"\n".encode())


def victim_untouched(storage_dir: Path, refs: dict[str, str]) -> bool:
    """True while the planted job record still has the bytes :func:`plant` wrote."""
    raw = (storage_dir / refs["victim_record"]).read_bytes()
    return bool(json.loads(raw).get("terminal_message_id") == "soak") and raw.startswith(b'{"job_id": "soak-victim"')
