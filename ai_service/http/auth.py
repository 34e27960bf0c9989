"""``HTTP_TOKEN``: ``/v1/*`` needs ``Authorization: Bearer <token>`` when it is set.

The comparison is constant-time; the token is never logged or echoed.  Health and
metrics never need it.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

#: The ``WWW-Authenticate`` challenge of a 401 (RFC 6750).
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ai-service"'}


def token_matches(header: str | None, token: str) -> bool:
    """True when ``header`` is ``Bearer <token>`` (scheme case-insensitive, constant-time compare)."""
    if not header:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


async def require_token(request: Request) -> None:
    """FastAPI dependency of every ``/v1`` route: 404 on a metrics-only listener, 401 without the token."""
    state = request.app.state
    api_ports: frozenset[int] | None = getattr(state, "api_ports", None)
    if api_ports is not None:
        server = request.scope.get("server")
        if server is None or server[1] not in api_ports:
            raise HTTPException(status_code=404, detail="not found")
    token: str = getattr(state, "http_token", "")
    if token and not token_matches(request.headers.get("authorization"), token):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token (HTTP_TOKEN)", headers=CHALLENGE)
