"""The ASGI guard in front of every route: HTTP metrics, API key, body size limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware so streaming responses and client disconnects
pass through untouched. The body is read here, up to the limit, before any route sees it: a client
that lies in Content-Length or streams a chunked body past the limit gets 413 without the server ever
holding more than `max_body_bytes`.
"""

from __future__ import annotations

import hmac

from ..metrics import ServerMetrics
from .errors import APIError

# Probes must work without credentials (kubelet, load balancers); so must FastAPI's pages that
# describe the routes (a browser opening /docs sends no key; they hold no data; vLLM leaves them
# open too, and --disable-fastapi-docs removes them).
PUBLIC_PATHS = frozenset({"/health", "/ready", "/ping", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
KNOWN_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/tokenize",
                          "/detokenize", "/version", "/health", "/ready", "/metrics", "/reset_prefix_cache",
                          "/ping", "/invocations"})


class GuardMiddleware:
    def __init__(self, app, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"  # bounded label cardinality
        status_seen = [0]

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_and_count, path)
        except Exception:
            status_seen[0] = status_seen[0] or 500  # the outer error middleware answers 500
            raise
        finally:
            # 499 (nginx's "client closed request") when the client left before any response.
            self.metrics.observe_http(route, status_seen[0] or 499)

    async def _guarded(self, scope, receive, send, path):
        if self.api_key is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
            return await _send_error(send, APIError(
                401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                return await _send_error(send, APIError(400, "Content-Length header is not an integer"))
            if declared_n > self.max_body_bytes:
                return await _send_error(send, _too_large(self.max_body_bytes, declared_n))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return await _send_error(send, _too_large(self.max_body_bytes, None))
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: only http.disconnect remains

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        value = _header(scope, b"authorization")
        if value is None:
            return False
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _too_large(limit: int, declared: int | None) -> APIError:
    size = f"{declared} bytes" if declared is not None else "more than that"
    return APIError(413, f"request body is too large: the limit is {limit} bytes, got {size}",
                    code="request_too_large")


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _send_error(send, err: APIError) -> None:
    body = err.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
