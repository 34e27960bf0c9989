"""A small ``text/event-stream`` reader for tests (a real HTTP client: httpx)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SseEvent:
    id: str
    type: str
    data: dict[str, Any]


def events(url: str, *, last_event_id: str | None = None, timeout: float = 240,
           headers: dict[str, str] | None = None) -> Iterator[SseEvent]:
    """The events of one stream until the server ends it (an AssertionError past ``timeout`` seconds)."""
    sent = dict(headers or {})
    if last_event_id:
        sent["Last-Event-ID"] = last_event_id
    deadline = time.monotonic() + timeout  # keepalives never let a read time out: bound the whole stream
    with httpx.stream("GET", url, headers=sent, timeout=httpx.Timeout(30, connect=10)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"{url}: the stream did not end within {timeout} s"
            if line == "":
                if "data" in fields:
                    yield SseEvent(fields.get("id", ""), fields.get("event", "message"), json.loads(fields["data"]))
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value


def wait_http(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{base} did not answer within {timeout} s")
