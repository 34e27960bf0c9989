"""Section 4, ``corpus``: malformed and hostile requests (:mod:`soak.corpus`) to all three
request queues, each answered or dead-lettered as the contract says, none running code,
writing the service's records or following a symlink out; and an oversized answer that must
not stall a worker's publishing."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Got
from soak import corpus, payloads
from soak.harness import Harness
from soak.world import IMGSZ_INFER, MODEL_KEY, Part, World, crash_lines, terminals_by_job


def corpus_section(world: World, h: Harness) -> Part:
    """Send every hostile case of :mod:`soak.corpus`, wait until each is answered or dead-lettered
    as the contract says, and check that none ran code, wrote service records or leaked a file."""
    part = Part("corpus", "Malformed and hostile messages to the three request queues")
    markers = world.root / "markers"
    markers.mkdir(exist_ok=True)
    refs = payloads.plant(world.storage, markers, world.shapes)
    refs["model"] = MODEL_KEY
    entries = corpus.build(refs)
    queues = {"train": h.settings.train_request_queue, "convert": h.settings.convert_request_queue,
              "infer": h.settings.infer_request_queue}
    send_corpus(h, entries, queues)
    dlq = DeadLetters(h, queues, entries)
    wait_settled(h, dlq, entries)
    dlq.close()
    terms = terminals_by_job(h.messages())
    per_op = Counter(e.op for e in entries)
    part.add(f"messages sent: {len(entries)} ({', '.join(f'{n} {op}' for op, n in per_op.items())}); distinct "
             f"hostile cases: {len({e.name.split(':', 1)[1] for e in entries})}")
    tally = Outcomes.count(entries, terms, dlq.dead)
    tally.lines(part)
    ran = payloads_ran(part, markers)
    touched = records_touched(part, world, refs)
    leaked = symlink_leaks(part, world)
    crash_lines(part, h)
    part.data.update({"entries": len(entries), "answered": tally.answered, "dead_lettered": tally.dead_lettered,
                      "neither": tally.neither, "unaccounted": len(tally.unaccounted), "codes": dict(tally.codes),
                      "payloads_ran": ran, "records_touched": touched, "symlink_leaks": len(leaked),
                      "outcomes": tally.table})
    return part


def send_corpus(h: Harness, entries: list[corpus.Entry], queues: dict[str, str]) -> None:
    """Publish each entry as it is, with its own properties: a missing or odd content_type is one of the cases."""
    for e in entries:
        props = dict(e.props)
        content_type = props.pop("content_type", "application/json")
        h.sender.send(queues[e.op], e.body, content_type=content_type, **props)


class DeadLetters:
    """Counts what reached each ``<queue>.dlq``, per corpus entry: a dead-lettered body is matched
    back to its entry by (op, sha256 of the body), since hostile messages need not carry a job_id."""

    def __init__(self, h: Harness, queues: dict[str, str], entries: list[corpus.Entry]) -> None:
        channel = h.sender.connection.channel() if h.sender.connection is not None else None
        assert channel is not None
        self.channel = channel
        self.queues = queues
        self.digest = {(e.op, hashlib.sha256(e.body).hexdigest()): e for e in entries}
        self.dead: Counter[str] = Counter()

    def drain(self) -> None:
        """Take (and ack) everything in the DLQs now, so a later drain only sees new arrivals."""
        for op, queue in self.queues.items():
            while True:
                method, _, body = self.channel.basic_get(f"{queue}.dlq", auto_ack=True)
                if method is None:
                    break
                raw = body if isinstance(body, bytes) else str(body or "").encode()
                entry = self.digest.get((op, hashlib.sha256(raw).hexdigest()))
                self.dead[entry.name if entry else f"{op}:?"] += 1

    def close(self) -> None:
        self.channel.close()


def outcome(e: corpus.Entry, terms: dict[str, list[Got]], dead: Counter[str]) -> tuple[bool, bool]:
    """(answered, dead-lettered) for one entry."""
    return bool(e.job_id and terms.get(e.job_id)), dead.get(e.name, 0) > 0


def needs_answer(e: corpus.Entry) -> bool:
    """The entry's ``expect`` asks for a terminal message for its job_id."""
    return "answer" in e.expect or e.expect == "any-terminal"


def settled(h: Harness, entries: list[corpus.Entry], dead: Counter[str]) -> bool:
    """Every entry has what its ``expect`` asks for (an answer, a dead letter, or both)."""
    terms = terminals_by_job(h.messages())
    for e in entries:
        answered, dlq = outcome(e, terms, dead)
        if needs_answer(e) and not answered:
            return False
        if "dlq" in e.expect and not dlq:
            return False
    return True


def wait_settled(h: Harness, dlq: DeadLetters, entries: list[corpus.Entry]) -> None:
    """Until settled and 3 s quiet (a late duplicate would still show), or a minute with nothing new
    (count what is missing), or 240 s in all: bounded whatever the workers do."""
    deadline = time.monotonic() + 240
    quiet_since = time.monotonic()
    last = (0, 0)
    while time.monotonic() < deadline:
        h.check()
        dlq.drain()
        now = (len(h.messages()), sum(dlq.dead.values()))
        if now != last:
            last, quiet_since = now, time.monotonic()
        if settled(h, entries, dlq.dead) and time.monotonic() - quiet_since > 3:
            break
        if time.monotonic() - quiet_since > 60:
            break  # nothing moved for a minute: count what is missing
        time.sleep(0.5)


@dataclass
class Outcomes:
    """What happened to the corpus entries, against what the contract asks of each."""

    answered: int = 0
    dead_lettered: int = 0
    both: int = 0
    neither: int = 0
    unaccounted: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    table: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def count(cls, entries: list[corpus.Entry], terms: dict[str, list[Got]], dead: Counter[str]) -> Outcomes:
        out = cls()
        for e in entries:
            a, d = outcome(e, terms, dead)
            out.add(e, a, d, terms[e.job_id][0] if a and e.job_id else None)
        return out

    def add(self, e: corpus.Entry, a: bool, d: bool, first: Got | None) -> None:
        """One entry: ``first`` is its first terminal message when answered."""
        body = first.body if first is not None else {}
        self.table[e.name] = {"answered": a, "dead_lettered": d, "expect": e.expect,
                              "answer": body.get("error_code") or body.get("type"),
                              "message": str(body.get("error_message", ""))[:200]}
        self.answered += a
        self.dead_lettered += d
        self.both += a and d
        self.neither += not a and not d
        if first is not None:
            self.codes[str(first.body.get("error_code", first.type))] += 1
        need_answer = needs_answer(e)
        need_dlq = "dlq" in e.expect
        if ((need_answer and not a) and (need_dlq and not d)) or (not a and not d and e.expect != "silent_ok"):
            self.unaccounted.append(e.name)
        elif (need_answer and not a) or (need_dlq and not d):
            self.differs.append(f"{e.name} (answered {a}, dead-lettered {d})")

    def lines(self, part: Part) -> None:
        part.add(f"answered (a *_failed/terminal message for its job_id): {self.answered}")
        part.add(f"dead-lettered (in <queue>.dlq): {self.dead_lettered}; both answered and dead-lettered: "
                 f"{self.both}")
        part.add("neither (dropped on purpose: answers addressed to a reply_to queue that does not exist): "
                 f"{self.neither}")
        part.add("answers by error_code: " + ", ".join(f"{c} {n}" for c, n in self.codes.most_common()))
        part.add("messages neither answered nor dead-lettered where the contract asks for one: "
                 f"{len(self.unaccounted)}")
        if self.unaccounted:
            part.fail(f"{len(self.unaccounted)} hostile message(s) vanished: {self.unaccounted[:8]}")
            part.lost += len(self.unaccounted)
        if self.differs:
            part.fail(f"{len(self.differs)} outcome(s) differ from the contract: {self.differs[:8]}")
        if self.codes.get("internal_error"):
            part.findings.append(f"{self.codes['internal_error']} answer(s) with internal_error (an unexpected "
                                 "exception in a worker)")


def payloads_ran(part: Part, markers: Path) -> list[str]:
    """The corpus payloads each mkdir a marker when unpickled/executed: any marker is code that ran."""
    ran = sorted(p.name for p in markers.iterdir())
    part.add(f"payloads that ran code (pickle .pt, torch zip, pickled label caches inside and outside the dataset, "
             f"list-file escapes, download scripts, YAML tag, EPS): {len(ran)}")
    if ran:
        part.fail(f"a hostile payload ran code in a worker: {ran}")
    return ran


def records_touched(part: Part, world: World, refs: dict[str, str]) -> int:
    """Requests naming reserved keys (JOBS_PREFIX) must not change the service's own records."""
    touched = 0 if payloads.victim_untouched(world.storage, refs) else 1
    part.add(f"service records touched by reserved-key requests: {touched}")
    if touched:
        part.fail("a request wrote into the service's own storage area (JOBS_PREFIX)")
    return touched


def symlink_leaks(part: Part, world: World) -> list[str]:
    """A dataset symlink points at a SOAK-SECRET file outside STORAGE_DIR: a copy of its content
    anywhere under the temp root means a worker followed the link."""
    leaked = [str(p) for p in world.root.rglob("*")
              if p.is_file() and not p.is_symlink() and "soak-secret" not in p.name
              and p.stat().st_size < 10**6 and b"SOAK-SECRET" in p.read_bytes()]
    part.add(f"copies of a file outside STORAGE_DIR that a dataset symlink pointed at: {len(leaked)}")
    if leaked:
        part.fail(f"a symlink was followed out of STORAGE_DIR: {leaked[:3]}")
    return leaked



# MAX_MESSAGE_BYTES of the "tight" infer worker: the request fits, its answer (>= 75 B an image) cannot
STALL_LIMIT = 3000


def stall_lines(world: World, h: Harness, part: Part) -> None:
    """An answer over MAX_MESSAGE_BYTES must become a small *_failed, and the answers behind it go on."""
    queue = f"{h.settings.infer_request_queue}-tight"
    h.worker("infer", "tight", INFER_REQUEST_QUEUE=queue, MAX_MESSAGE_BYTES=str(STALL_LIMIT))
    key = "images/soak-stall.png"
    (world.storage / key).parent.mkdir(parents=True, exist_ok=True)
    (world.storage / key).write_bytes(base64.b64decode(world.images[0]))
    params = {"conf": 0.001, "iou": 0.7, "imgsz": IMGSZ_INFER, "max_det": 1000, "classes": None}
    jobs = {"hs-stall-big": [{"path": key}] * 48, **{f"hs-stall-after{i}": [{"path": key}] for i in range(3)}}
    for job_id, images in jobs.items():
        body = {"job_id": job_id, "model": {"path": MODEL_KEY}, "images": images, "params": params}
        h.sender.send(queue, json.dumps(body).encode(), content_type="application/json")
    deadline = time.monotonic() + 120
    terms: dict[str, list[Got]] = {}
    while time.monotonic() < deadline:
        terms = terminals_by_job(h.messages())
        if all(terms.get(j) for j in jobs):
            break
        time.sleep(0.5)
    big = terms.get("hs-stall-big", [])
    replaced = bool(big) and big[0].type == "inference_failed" and "byte limit" in str(
        big[0].body.get("error_message", ""))
    after = sum(1 for j in jobs if j != "hs-stall-big" and terms.get(j) and terms[j][0].type == "inference_completed")
    stalled = 0 if replaced and after == 3 else 1
    part.add(f"oversized answer (48 images, conf 0.001, max_det 1000, MAX_MESSAGE_BYTES {STALL_LIMIT}): "
             f"{'replaced by a small inference_failed' if replaced else 'NOT replaced'}; answers behind it "
             f"delivered: {after} of 3; stalled publishers: {stalled}")
    if stalled:
        got = big[0].body if big else {}
        part.fail(f"an oversized answer stalled a worker's publishing (got {got.get('type')}: "
                  f"{str(got.get('error_message', ''))[:200]})")
    part.data["stalled_publishers"] = stalled

