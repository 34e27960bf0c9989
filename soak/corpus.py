"""Malformed and hostile requests for every request queue.

Each :class:`Entry` is one message (body bytes and AMQP properties) with what the
service should do with it:

* ``answer``: a ``*_failed`` (or, for the few valid-but-odd ones, any terminal) message
  for its ``job_id`` -- when a job_id can be read from it;
* ``dlq``: it ends in ``<request queue>.dlq`` (rejected without requeue);
* ``silent_ok``: neither is required (e.g. an answer addressed to a ``reply_to`` queue
  that does not exist).

Generic entries (bad JSON, wrong encodings, depth bombs, huge fields, wrong types,
unknown fields, traversal keys, ...) are built for each of the three operations from a
valid request of that operation, so that the hostile part sits in real fields.
Operation-specific entries add pickle-payload ``.pt`` models (``__reduce__`` creates a
marker directory: it must never exist), YAML with Python tags, pickled label caches,
decompression-bomb and header-lying images, formats Pillow must not decode (EPS would
run Ghostscript), and limits on images, formats and sizes.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from tests.support.pngs import png_bomb, png_claiming

MiB = 1024 * 1024


@dataclass
class Entry:
    name: str
    op: str
    body: bytes
    job_id: str | None
    expect: str = "answer+dlq"  # answer | dlq | answer+dlq | any-terminal | silent_ok
    props: dict[str, Any] = field(default_factory=dict)


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


# --- valid requests to make hostile ----------------------------------------------------


def base(op: str, job_id: str, refs: dict[str, str]) -> dict[str, Any]:
    if op == "train":
        return {"job_id": job_id, "dataset": {"s3_prefix": refs["missing_dataset"], "name": "ds"},
                "output": {"prefix": "models/soak", "model_name": f"{job_id}.pt"},
                "hyperparams": {"model": "yolov8n", "epochs": 1, "batch": 8, "imgsz": 32}}
    if op == "convert":
        return {"job_id": job_id, "model": {"path": refs["missing_model"]}, "formats": ["onnx"],
                "options": {"imgsz": 64}, "output": {"prefix": "models/soak/exports"}}
    return {"job_id": job_id, "model": {"path": refs["model"]}, "images": [{"data": b64(small_png())}],
            "params": {"imgsz": 64}}


def key_field(op: str) -> tuple[str, ...]:
    """Where the main storage key sits in each operation's request."""
    return {"train": ("dataset", "s3_prefix"), "convert": ("model", "path"), "infer": ("model", "path")}[op]


def with_key(body: dict[str, Any], op: str, key: Any) -> dict[str, Any]:
    outer, inner = key_field(op)
    return {**body, outer: {**body[outer], inner: key}}


def deep(n: int) -> str:
    return "[" * n + "]" * n


def generic(op: str, refs: dict[str, str]) -> list[Entry]:
    """About 40 hostile messages built on a valid ``op`` request."""
    out: list[Entry] = []

    def jid(name: str) -> str:
        return f"hx-{op}-{name}"

    def add(name: str, body: bytes | dict[str, Any], expect: str = "answer+dlq", job: str | None = "auto",
            **props: Any) -> None:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        job_id = jid(name) if job == "auto" else job
        out.append(Entry(f"{op}:{name}", op, raw, job_id, expect, props))

    def ok(name: str) -> dict[str, Any]:
        return base(op, jid(name), refs)

    # not JSON at all, or not an object: nothing to answer, dead-lettered
    add("empty", b"", "dlq", None)
    add("text", b"hello, worker", "dlq", None)
    add("truncated", json.dumps(ok("truncated")).encode()[:40], "dlq", None)
    add("null", b"null", "dlq", None)
    add("array", b"[]", "dlq", None)
    add("string", b'"train me"', "dlq", None)
    add("number", b"12345", "dlq", None)
    add("trailing-garbage", json.dumps(ok("trailing-garbage")).encode() + b" }{ trailing", "dlq", None)
    add("nul-bytes", b"\x00" * 64, "dlq", None)
    add("latin1", b'{"job_id": "' + jid("latin1").encode() + b'", "name": "caf\xe9 cr\xe8me"}', "dlq", None)
    add("gzip", gzip.compress(json.dumps(ok("gzip")).encode()), "dlq", None, content_encoding="gzip")
    add("pickle-body", pickle.dumps(ok("pickle-body")), "dlq", None, content_type="application/x-python-pickle")
    add("depth-bomb", deep(200_000).encode(), "dlq", None)
    add("huge-int", b'{"job_id": "' + jid("huge-int").encode() + b'", "x": ' + b"9" * 100_000 + b"}", "dlq", None)
    add("over-limit", b'{"job_id": "' + jid("over-limit").encode() + b'", "pad": "' + b"A" * (17 * MiB) + b'"}',
        "dlq", None)
    # encodings json.loads accepts: a valid request would be run (it fails on a missing reference)
    add("utf16", json.dumps(ok("utf16")).encode("utf-16"), "any-terminal")
    add("utf8-bom", b"\xef\xbb\xbf" + json.dumps(ok("utf8-bom")).encode(), "any-terminal")
    # job_id itself hostile: no job_id can be read, dead-lettered
    for name, value in (("jid-traversal", "../../etc/passwd"), ("jid-long", "j" * 65), ("jid-unicode", "jöb-ü"),
                        ("jid-int", 123), ("jid-null", None), ("jid-newline", "abc\ndef"), ("jid-empty", "")):
        body = {**ok(name), "job_id": value}
        add(name, body, "dlq", None)
    # readable job_id, invalid content: answered invalid_request and dead-lettered
    add("missing-fields", {"job_id": jid("missing-fields")})
    add("unknown-field", {**ok("unknown-field"), "debug": True})
    outer, inner = key_field(op)
    add("unknown-nested", {**ok("unknown-nested"), outer: {**ok("x")[outer], "__class__": "os.system"}})
    add("proto-pollution", {**ok("proto-pollution"), "__proto__": {"admin": True}, "constructor": {}})
    add("wrong-types", {k: ([v] if k != "job_id" else v) for k, v in ok("wrong-types").items()})
    add("nested-depth", {**ok("nested-depth"), "extra": json.loads(deep(500))})
    nan_field = {"train": ("hyperparams", "lr0"), "convert": ("options", "imgsz"), "infer": ("params", "conf")}[op]
    add("nan", json.dumps({**ok("nan"), nan_field[0]: {**ok("x")[nan_field[0]], nan_field[1]: float("nan")}}).encode(),
        "any-terminal")
    add("infinity", json.dumps({**ok("infinity"), nan_field[0]: {**ok("x")[nan_field[0]],
                                                                 nan_field[1]: float("inf")}}).encode())
    add("huge-string", {**ok("huge-string"), outer: {**ok("x")[outer], inner: "k" * (2 * MiB)}})
    add("many-keys", {**ok("many-keys"), **{f"k{i}": i for i in range(50_000)}})
    for name, key in (("key-traversal", "../../../etc/passwd"), ("key-absolute", "/etc/passwd"),
                      ("key-backslash", "..\\..\\windows\\system32"), ("key-nul", "models/a\u0000b.pt"),
                      ("key-dot-segment", "models/./x.pt"), ("key-long", "k/" * 600), ("key-int", 42),
                      ("key-control", "models/\u001b[31mred.pt")):
        add(name, with_key(ok(name), op, key))
    # valid shape, odd but harmless: any terminal answer
    add("key-percent", with_key(ok("key-percent"), op, "..%2f..%2fetc%2fpasswd"), "any-terminal")
    add("key-unicode-slash", with_key(ok("key-unicode-slash"), op, "models/\u2215..\u2215x.pt"), "any-terminal")
    add("dup-keys", b'{"job_id": "' + jid("shadowed").encode() + b'", ' + json.dumps(ok("dup-keys")).encode()[1:],
        "any-terminal")
    # AMQP-level oddities on a valid request
    add("forged-delivery-count", ok("forged-delivery-count"), "any-terminal",
        headers={"x-delivery-count": "many", "x-death": "not a list"})
    # the lease header is internal: refused where a job record is kept, ignored by inference
    add("forged-lease", ok("forged-lease"), "any-terminal" if op == "infer" else "answer+dlq",
        headers={"x-ai-lease": "0" * 32})
    add("reply-to-nowhere", ok("reply-to-nowhere"), "silent_ok", reply_to="no-such-queue-soak",
        correlation_id="c" * 255)
    add("cancel-in-request-queue", {"type": "cancel", "job_id": jid("cancel-in-request-queue")})
    return out


def specific(refs: dict[str, str]) -> list[Entry]:
    out: list[Entry] = []

    def add(op: str, name: str, body: dict[str, Any], expect: str = "answer") -> None:
        out.append(Entry(f"{op}:{name}", op, json.dumps(body).encode(), str(body["job_id"]), expect))

    def train(name: str, **changes: Any) -> dict[str, Any]:
        body = base("train", f"hs-train-{name}", refs)
        for k, v in changes.items():
            body[k] = {**body[k], **v} if isinstance(v, dict) and isinstance(body.get(k), dict) else v
        return body

    ds = {"s3_prefix": refs["dataset"], "name": "shapes"}
    add("train", "missing-dataset", train("missing-dataset"))
    add("train", "yaml-python-tag", train("yaml-python-tag", dataset={"s3_prefix": refs["yaml_tag"]}))
    add("train", "yaml-outside", train("yaml-outside", dataset={"s3_prefix": refs["yaml_outside"]}))
    add("train", "yaml-not-mapping", train("yaml-not-mapping", dataset={"s3_prefix": refs["yaml_list"]}))
    add("train", "pickled-label-cache", train("pickled-label-cache", dataset={"s3_prefix": refs["evil_cache"]}),
        "any-terminal")
    add("train", "list-file-escape", train("list-file-escape", dataset={"s3_prefix": refs["list_escape"]}))
    add("train", "download-script", train("download-script", dataset={"s3_prefix": refs["download"]}))
    add("train", "symlink-out", train("symlink-out", dataset={"s3_prefix": refs["symlink"]}))
    add("train", "reserved-output", train("reserved-output", dataset=ds,
                                          output={"prefix": "jobs", "model_name": refs["victim_name"]}),
        "answer+dlq")
    add("train", "reserved-dataset", train("reserved-dataset", dataset={"s3_prefix": "jobs/"}), "answer+dlq")
    add("train", "pretrained-pickle", train("pretrained-pickle", dataset=ds, hyperparams={"pretrained": refs["evil"]}),
        "answer")
    add("train", "pretrained-torch-zip",
        train("pretrained-torch-zip", dataset=ds, hyperparams={"pretrained": refs["evil_zip"]}), "answer")
    add("train", "pretrained-garbage",
        train("pretrained-garbage", dataset=ds, hyperparams={"pretrained": refs["garbage_pt"]}), "answer")
    for name, hp in (("epochs-0", {"epochs": 0}), ("epochs-huge", {"epochs": 10**9}), ("batch-0", {"batch": 0}),
                     ("imgsz-tiny", {"imgsz": 1}), ("optimizer-evil", {"optimizer": "__import__('os')"}),
                     ("hp-device", {"device": "cuda:7"}), ("hp-project", {"project": "/etc"}),
                     ("model-asset", {"model": "yolov8n.pt"}), ("model-traversal", {"model": "../../x"}),
                     ("epochs-bool", {"epochs": True}), ("epochs-float", {"epochs": 2.5})):
        add("train", name, train(name, hyperparams=hp), "answer+dlq")

    def conv(name: str, **changes: Any) -> dict[str, Any]:
        body = base("convert", f"hs-convert-{name}", refs)
        body.update(changes)
        return body

    add("convert", "model-missing", conv("model-missing"), "answer")
    add("convert", "reserved-output", conv("reserved-output", output={"prefix": "jobs/artifacts"}), "answer+dlq")
    add("convert", "model-pickle", conv("model-pickle", model={"path": refs["evil"]}), "answer")
    add("convert", "model-torch-zip", conv("model-torch-zip", model={"path": refs["evil_zip"]}), "answer")
    add("convert", "model-garbage", conv("model-garbage", model={"path": refs["garbage_pt"]}), "answer")
    for name, changes in (("formats-empty", {"formats": []}), ("formats-traversal", {"formats": ["../../x"]}),
                          ("formats-unknown", {"formats": ["exe"]}), ("formats-dup", {"formats": ["onnx", "onnx"]}),
                          ("formats-many", {"formats": [f"f{'x' * i}" for i in range(20)]}),
                          ("imgsz-huge", {"options": {"imgsz": 99999}}), ("opset-huge", {"options": {"opset": 1000}}),
                          ("output-traversal", {"output": {"prefix": "../../tmp"}})):
        add("convert", name, conv(name, **changes), "answer+dlq")

    def infer(name: str, images: list[dict[str, Any]] | None = None, **changes: Any) -> dict[str, Any]:
        body = base("infer", f"hs-infer-{name}", refs)
        if images is not None:
            body["images"] = images
        body.update(changes)
        return body

    add("infer", "png-bomb", infer("png-bomb", [{"data": b64(png_bomb())}]), "answer+dlq")
    add("infer", "png-header-lies", infer("png-header-lies", [{"data": b64(png_claiming(100_000, 100_000))}]),
        "answer+dlq")
    add("infer", "tiff-header-lies", infer("tiff-header-lies", [{"data": b64(tiff_claiming(60_000, 60_000))}]),
        "answer+dlq")
    add("infer", "png-truncated", infer("png-truncated", [{"data": b64(small_png()[:60])}]), "answer+dlq")
    add("infer", "eps", infer("eps", [{"data": b64(eps(Path(refs["marker_dir"]) / "eps-ran"))}]), "answer+dlq")
    add("infer", "svg", infer("svg", [{"data": b64(b"<svg xmlns='http://www.w3.org/2000/svg'/>")}]), "answer+dlq")
    add("infer", "base64-bad", infer("base64-bad", [{"data": "!!!not base64!!!"}]), "answer+dlq")
    add("infer", "too-many-images", infer("too-many-images", [{"data": b64(small_png(8))}] * 257), "answer+dlq")
    add("infer", "image-flood", infer("image-flood", [{"data": "!!"}] * 5000), "answer+dlq")
    add("infer", "max-det-huge", infer("max-det-huge", params={"max_det": 5000}), "answer+dlq")
    # containment classes: reserved keys, untrusted exported models
    add("infer", "image-reserved", infer("image-reserved", [{"path": refs["victim_record"]}]), "answer+dlq")
    add("infer", "model-reserved", infer("model-reserved", model={"path": "jobs/train/x/best.pt"}), "answer+dlq")
    add("infer", "torchscript-foreign", infer("torchscript-foreign", model={"path": refs["foreign_ts"]}), "answer")
    add("infer", "inline-too-big", infer("inline-too-big", [{"data": b64(b"\0" * (8 * MiB + 10))}]), "answer+dlq")
    add("infer", "image-traversal", infer("image-traversal", [{"path": "../../etc/passwd"}]), "answer+dlq")
    add("infer", "image-missing", infer("image-missing", [{"path": "images/none.png"}]), "answer")
    add("infer", "image-both", infer("image-both", [{"path": "images/x.png", "data": b64(small_png())}]),
        "answer+dlq")
    add("infer", "model-pickle", infer("model-pickle", model={"path": refs["evil"]}), "answer")
    add("infer", "model-torch-zip", infer("model-torch-zip", model={"path": refs["evil_zip"]}), "answer")
    add("infer", "model-garbage-onnx", infer("model-garbage-onnx", model={"path": refs["garbage_onnx"]}), "answer")
    add("infer", "model-exe", infer("model-exe", model={"path": refs["exe"]}), "answer")
    for name, params in (("conf-5", {"conf": 5}), ("imgsz-huge", {"imgsz": 10**6}),
                         ("classes-many", {"classes": list(range(2000))}), ("max-det-0", {"max_det": 0})):
        add("infer", name, infer(name, params=params), "answer+dlq")
    return out


def plant(storage_dir: Path, marker_dir: Path, shapes_dir: Path) -> dict[str, str]:
    """Put the hostile objects in the (local) storage; return their keys."""
    import shutil

    def put(key: str, data: bytes) -> str:
        path = storage_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return key

    refs = {"missing_dataset": "datasets/soak-none/", "missing_model": "models/soak-none.pt",
            "dataset": "datasets/soak-shapes/"}
    shutil.copytree(shapes_dir, storage_dir / "datasets" / "soak-shapes", dirs_exist_ok=True)
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


def victim_untouched(storage_dir: Path, refs: dict[str, str]) -> bool:
    """True while the planted job record still has the bytes :func:`plant` wrote."""
    raw = (storage_dir / refs["victim_record"]).read_bytes()
    return bool(json.loads(raw).get("terminal_message_id") == "soak") and raw.startswith(b'{"job_id": "soak-victim"')


def build(refs: dict[str, str]) -> list[Entry]:
    entries = [e for op in ("train", "convert", "infer") for e in generic(op, refs)]
    return entries + specific(refs)
