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
run Ghostscript), and limits on images, formats and sizes; :mod:`soak.payloads` plants
the objects they point at.
"""

from __future__ import annotations

import gzip
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soak.payloads import b64, eps, small_png, tiff_claiming
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


class Generic:
    """The helpers every generic entry is built with, for one operation: its job_id (``jid``),
    a valid request to make hostile (``ok``), and ``add``, which collects the entries."""

    def __init__(self, op: str, refs: dict[str, str]) -> None:
        self.op = op
        self.refs = refs
        self.out: list[Entry] = []

    def jid(self, name: str) -> str:
        return f"hx-{self.op}-{name}"

    def add(self, name: str, body: bytes | dict[str, Any], expect: str = "answer+dlq", job: str | None = "auto",
            **props: Any) -> None:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        job_id = self.jid(name) if job == "auto" else job
        self.out.append(Entry(f"{self.op}:{name}", self.op, raw, job_id, expect, props))

    def ok(self, name: str) -> dict[str, Any]:
        return base(self.op, self.jid(name), self.refs)


def generic(op: str, refs: dict[str, str]) -> list[Entry]:
    """About 40 hostile messages built on a valid ``op`` request."""
    g = Generic(op, refs)
    unreadable(g)
    invalid(g)
    odd(g)
    return g.out


def unreadable(g: Generic) -> None:
    """Bodies no request can be read from (not JSON, not an object, no usable job_id), and the
    encodings json.loads accepts anyway."""
    add, ok, jid = g.add, g.ok, g.jid
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


def invalid(g: Generic) -> None:
    """A readable job_id with invalid content: wrong fields, types, sizes and storage keys."""
    add, ok, jid, op = g.add, g.ok, g.jid, g.op
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


def odd(g: Generic) -> None:
    """Valid-looking requests with odd keys or AMQP properties, and a cancel in the request queue."""
    add, ok, jid, op = g.add, g.ok, g.jid, g.op
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


class Specific:
    """Collects the operation-specific entries (``add``), with the planted objects' keys (``refs``)."""

    def __init__(self, refs: dict[str, str]) -> None:
        self.refs = refs
        self.out: list[Entry] = []

    def add(self, op: str, name: str, body: dict[str, Any], expect: str = "answer") -> None:
        self.out.append(Entry(f"{op}:{name}", op, json.dumps(body).encode(), str(body["job_id"]), expect))


def specific(refs: dict[str, str]) -> list[Entry]:
    """The entries only one operation has: its planted payloads and its own limits."""
    s = Specific(refs)
    train_cases(s)
    convert_cases(s)
    infer_cases(s)
    return s.out


def train_cases(s: Specific) -> None:
    """Datasets with Python YAML tags, pickled label caches, escapes and symlinks; reserved keys;
    pickled pretrained weights; hyperparameters out of range."""
    add, refs = s.add, s.refs

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


def convert_cases(s: Specific) -> None:
    """Models that are pickles or garbage; reserved output; formats and options out of range."""
    add, refs = s.add, s.refs

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


def infer_cases(s: Specific) -> None:
    """Images that lie, bomb or are not images; reserved and untrusted models; params out of range."""
    add, refs = s.add, s.refs

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


def build(refs: dict[str, str]) -> list[Entry]:
    entries = [e for op in ("train", "convert", "infer") for e in generic(op, refs)]
    return entries + specific(refs)
