"""ASGI middleware: request-body bound (413 before the body is parsed) and per-route metrics."""
from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _json_error(status: int, code: str, message: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
    start = {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                start, body = _json_error(413, "body_too_large", too_big)
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(too_big)
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:  # raised where the body was read outside FastAPI's parsing
            start, body = _json_error(413, "body_too_large", too_big)
            await send(start)
            await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    """A streamed (chunked) body grew past the bound. FastAPI reports errors while reading a
    body as a 400 caused by this; the error handlers turn that back into 413."""


class MetricsMiddleware:
    """Counts requests and latency per route template (never per raw path: ids would explode labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Server-side time to the response head, for clients and benchmarks (W3C Server-Timing).
                elapsed = (time.perf_counter() - start) * 1000
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"server-timing", f"app;dur={elapsed:.3f}".encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = getattr(scope.get("app").state, "hypergen", None) if scope.get("app") else None
            route = scope.get("route")
            if state is not None:
                path = getattr(route, "path", "unmatched")
                state.metrics.requests.labels(path, scope["method"], str(status)).inc()
                state.metrics.latency.labels(path).observe(time.perf_counter() - start)
