# Errors every protocol reports the same way: {"error": {message, type, param, code}} with the HTTP status.
"""vLLM's error shape for the OpenAI API (``{"error": {"message", "type", "param", "code"}}``), with request
validation reported as 400 (FastAPI's default would be 422, which OpenAI clients do not expect). The same
:class:`APIError` becomes a gRPC status (:data:`GRPC_CODES`) and a WebSocket error event.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pipeloom.serving")

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    410: "GoneError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# gRPC status names for the HTTP statuses above (grpc.StatusCode attribute names).
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 410: "NOT_FOUND",
              413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class APIError(Exception):
    """A request that fails with ``status`` (400, 401, 404, 410, 413, 429, 500, 503) and a message for the user."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or ERROR_TYPES.get(status, "Error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def overloaded(reason: str) -> APIError:
    """429 at once (TGI's "Model is overloaded"), with a hint to retry."""
    return APIError(429, f"Model is overloaded: {reason}; retry later", type="overloaded",
                    headers={"Retry-After": "1"})


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first bad field's dotted name."""
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
        fields = []
        for part in loc:  # field names, not pydantic's union member tags ("constrained-str", "list[int]")
            if not part.isidentifier():
                break
            fields.append(part)
        name = ".".join(fields)
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        if param is None and name:
            param = name
        value = err.get("input")
        if isinstance(value, (bytes, bytearray)) and not loc:
            parts.append("the request body must be a JSON object (send it with Content-Type: application/json)")
            continue
        shown = repr(value)[:60] if not isinstance(value, dict) else "an object"
        parts.append(f"{name or 'body'}: {err.get('msg', 'invalid')} (got {shown})")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """400 for validation, the error JSON for every HTTPException and APIError, 500 (logged) for the rest."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(err.errors()))
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return APIError(err.status_code, message).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(err).__name__}: {err}").response()
