"""What the server measures: Prometheus metrics in the app's own registry, and the pure-ASGI middleware
that gives every request an id, enforces the body size limit, and counts requests and latency."""

from __future__ import annotations

import os
import re
import time
import uuid

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepship.runtime.predictor import Prediction
from deepship.serving.schemas import ApiError, error_response

# requests to other paths share the label "other": a scanner cannot grow the metrics without bound
ENDPOINTS = ("/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/admin/reload", "/admin/rollback")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # a client's X-Request-ID is echoed only if it is this tame


class ServeMetrics:
    """Prometheus metrics in the app's own registry (several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("deepship_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("deepship_request_latency_seconds", "HTTP request latency", ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("deepship_batch_size", "inputs per model call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.predictions = Counter("deepship_predictions", "predictions by predicted class", ["label"], registry=r)
        self.confidence = Histogram("deepship_prediction_confidence", "top-class probability", registry=r,
                                    buckets=(.1, .2, .3, .4, .5, .6, .7, .8, .9, .95, .99, 1.0))
        self.abstentions = Counter("deepship_abstentions", "predictions below the package's thresholds", registry=r)
        self.model_info = Gauge("deepship_model_info", "1 for the model version being served, 0 for replaced ones",
                                ["model_version"], registry=r, multiprocess_mode="liveall")
        self.reloads = Counter("deepship_reloads", "model reloads and rollbacks by result", ["result"], registry=r)
        self.log_dropped = Counter("deepship_prediction_log_dropped", "log records dropped (writer behind)", registry=r)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # --workers N: sum every worker's files
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def observe_predictions(self, predictions: list[Prediction]) -> None:
        for p in predictions:
            self.predictions.labels(p.label).inc()
            self.confidence.observe(p.confidence)
            if p.abstained:
                self.abstentions.inc()


class ObserveMiddleware:
    """Pure ASGI (no per-request task): request id, body size limit, request count and latency by endpoint."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = client_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status, start = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if declared_length(scope) > self.max_body_bytes:  # refuse before reading a byte of it
                await error_response(request_id, 413, "body_too_large", self.too_large())(scope, receive, send_with_id)
            else:
                await self.app(scope, self.limited(receive), send_with_id)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def limited(self, receive: Receive) -> Receive:
        """Chunked bodies have no Content-Length: count as they arrive and stop at the limit."""
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise ApiError(413, "body_too_large", self.too_large())
            return message

        return receive_limited

    def too_large(self) -> str:
        return (f"request body is over max_body_bytes={self.max_body_bytes}; "
                "send fewer or smaller inputs per request")


def request_id_of(request: Request) -> str | None:
    """The id ObserveMiddleware gave this request (the client's X-Request-ID when it is tame)."""
    return request.scope.get("state", {}).get("request_id")


def client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if REQUEST_ID.match(text) else None
    return None


def declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0  # the HTTP server already rejects malformed lengths
    return 0
