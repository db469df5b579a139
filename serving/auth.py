# Optional API key: `Authorization: Bearer <key>` on HTTP, WebSocket and gRPC alike; 401 / close 1008 / UNAUTHENTICATED.
"""With ``server.api_key`` set, every API route (``/v1/...``, ``/tokenize``, ``/detokenize``, ``/engine/...``) needs
the key; ``/health``, ``/version`` and ``/metrics`` stay open for probes and scrapers. Browsers cannot set
headers on a WebSocket, so ``/v1/ws`` also takes ``?api_key=``. Keys are compared in constant time.
"""

from __future__ import annotations

import secrets

from fastapi import Request

from .errors import APIError


def key_matches(expected: str | None, authorization: str | None, query_key: str | None = None) -> bool:
    """True when no key is configured, or the bearer token (or the query key) equals it."""
    if expected is None:
        return True
    given = None
    if authorization and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    elif query_key:
        given = query_key
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


def unauthorized() -> APIError:
    return APIError(401, "invalid or missing API key: send the header `Authorization: Bearer <key>`",
                    type="AuthenticationError")


def require_api_key(request: Request) -> None:
    """FastAPI dependency for the API routes."""
    if not key_matches(request.app.state.settings.api_key, request.headers.get("authorization")):
        raise unauthorized()
