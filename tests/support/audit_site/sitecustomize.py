"""Loaded by any Python started with this folder on PYTHONPATH and ``AUDIT_LOG`` set.

Records in ``$AUDIT_LOG``, one line each, what a worker must never do during a job:
network access beyond loopback (``socket.connect`` to, or ``getaddrinfo`` of, a
non-loopback address) and every process it starts (a test then looks for pip/uv).
The first line, ``hook installed``, proves the hook was active.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_LOG = os.environ.get("AUDIT_LOG")
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "", "ip6-localhost"}


def _loopback(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).lower()
    return host in _LOOPBACK_NAMES or host.startswith("127.") or host.startswith("::ffff:127.")


def _write(line: str) -> None:
    assert _LOG is not None
    with open(_LOG, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {line}\n")


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address and not _loopback(address[0]):
            _write(f"connect {address!r}")
    elif event == "socket.getaddrinfo":
        if not _loopback(args[0]):
            _write(f"getaddrinfo {args[0]!r}")
    elif event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.system", "os.spawn"):
        _write(f"spawn {event} {args!r}"[:2000])


if _LOG:
    _write(f"hook installed {sys.argv!r}")
    sys.addaudithook(_hook)
