"""The BE side of the HTTP jobs API for ``ai-service submit|demo --http URL``.

Standard library only (no FastAPI, no torch): POST a request, then read the job's
``text/event-stream``; a dropped stream (the worker restarted) is reopened with
``Last-Event-ID``, so nothing is shown twice or skipped.  ``HTTP_TOKEN`` is sent as the
bearer token when set.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ai_service.errors import HttpFailure as HttpFailure  # defined in errors.py, importable from here as before

#: How long a stream may stay silent before it counts as dead and is reopened (the server
#: sends a keepalive comment every 15 s; a timed-out socket cannot be read again).
READ_TIMEOUT = 40.0
#: How long to keep reopening a stream that dropped before the terminal message.
RECONNECT_FOR = 120.0


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


def _headers(token: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def post(base: str, path: str, body: bytes, token: str, timeout: float = 60.0) -> Answer:
    """POST JSON; any HTTP status is an :class:`Answer` (a refused connection raises HttpFailure)."""
    request = urllib.request.Request(base.rstrip("/") + path, data=body, method="POST",
                                     headers=_headers(token, {"Content-Type": "application/json"}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # the operator's URL
            return Answer(response.status, _json(response.read()), dict(response.headers))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, _json(exc.read()), dict(exc.headers))
    except (urllib.error.URLError, OSError) as exc:
        raise HttpFailure(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def events(base: str, job_id: str, token: str, *, deadline: float | None = None) -> Iterator[dict[str, Any] | None]:
    """The job's messages (None on each silent tick) until the terminal one (then it returns)."""
    url = f"{base.rstrip('/')}/v1/jobs/{job_id}/events"
    last_id: str | None = None
    failing_since: float | None = None
    while True:
        headers = _headers(token, {"Accept": "text/event-stream"})
        if last_id:
            headers["Last-Event-ID"] = last_id
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                              timeout=READ_TIMEOUT)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 404, 400):
                raise HttpFailure(f"{url}: HTTP {exc.code}", exc.code, _json(exc.read())) from None
            response = None
        except (urllib.error.URLError, OSError):
            response = None
        if response is not None:
            failing_since = None
            with response:
                for message, event_id in _read(response, deadline):
                    if message is None:
                        yield None
                        continue
                    last_id = event_id or last_id
                    yield message
                    if str(message.get("type", "")).endswith(("_completed", "_failed", "_cancelled")):
                        return
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            yield None
            return
        failing_since = failing_since or now
        if now - failing_since > RECONNECT_FOR:
            raise HttpFailure(f"lost the events stream of {job_id} at {base} for {RECONNECT_FOR:.0f} s")
        yield None
        time.sleep(1.0)


def _read(response: Any, deadline: float | None) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    fields: dict[str, str] = {}
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            return
        try:
            raw = response.readline()
        except OSError:  # timed out (silent past READ_TIMEOUT) or dropped: reopen
            return
        if not raw:
            return  # the server ended the stream (or went away): reopen after the last id
        line = raw.decode(errors="replace").rstrip("\r\n")
        if line == "":
            if "data" in fields:
                try:
                    data = json.loads(fields["data"])
                except ValueError:
                    data = None
                if isinstance(data, dict):
                    yield data, fields.get("id")
            fields = {}
        elif line.startswith(":"):
            yield None, None  # keepalive: a tick for the caller
        else:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
