"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the matching status.

Every failure the server answers goes through `APIError`, so clients (the official `openai` library
included) always get the same shape, whether the failure came from parsing, validation, the engine, or a
middleware that answered before any route ran.
"""

from __future__ import annotations

import json

from ..engine.protocol import (EngineDeadError, EngineError, InvalidRequestError, PromptTooLongError,
                               QueueFullError)

# OpenAI's `type` strings for each status class.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine_error(exc: EngineError, retry_after_s: int = 1) -> APIError:
    """Map the engine's exceptions (nsa_serve.engine.protocol) to HTTP statuses."""
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc) or "the server's waiting queue is full; retry later",
                        code="queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc) or "the engine has stopped", code="engine_dead")
    return APIError(500, f"engine error: {exc}", code="engine_error")
