"""The HTTP server: a FastAPI app over one model package, torch-free.

`create_app(package_dir, settings)` builds the app; its lifespan loads the package, warms it up and
starts the micro-batcher before the first request, and on shutdown (after uvicorn has let in-flight
requests finish) drains the batcher and flushes the prediction log.

Every request is validated at the edge (body size, content type, JSON shape, item count, text
length, base64, image size and decodability); a bad one gets a 4xx `{"error": {"code", "message"},
"request_id"}` that says what to send instead, and the next request is served normally.

Reload (SIGHUP or POST /admin/reload) loads and warms the new package first, then swaps one
reference: a request picks its model once, at its start, so it sees the old or the new model, never
a mix. The replaced model stays loaded as `previous` for POST /admin/rollback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import re
import signal
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepship.errors import DataError, DeepshipError
from deepship.runtime.predictor import Prediction, Predictor
from deepship.runtime.preprocess import ImageSpec, load_image, preprocess_image
from deepship.runtime.stats import TEXT_SIGNALS, image_stats
from deepship.serving.batching import MicroBatcher
from deepship.serving.predlog import PredictionLog, log_path_for_worker
from deepship.serving.settings import ServeSettings

logger = logging.getLogger("deepship.serving")

ENDPOINTS = ("/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/admin/reload", "/admin/rollback")
INLINE_JSON_BYTES = 64 * 1024  # bigger bodies are parsed on a worker thread, not the event loop
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # a client's X-Request-ID is echoed only if it is this tame
JSON_EXAMPLE = {"text": '{"inputs": ["some text", ...]}', "image": '{"images": ["<base64 bytes>", ...]}'}


# ------------------------------------------------------------------------------------ errors
class ApiError(Exception):
    """A request problem with its HTTP status, a stable code and a message that says what to send."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(request_id: str | None, status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}, "request_id": request_id}, status_code=status)


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


# ---------------------------------------------------------------------------- API schema (docs)
class TextRequest(BaseModel):
    inputs: list[str] = Field(description="texts to classify, at most max_items", min_length=1)


class ImageRequest(BaseModel):
    images: list[str] = Field(description="base64-encoded image files (a data: URL prefix is allowed)", min_length=1)


class PredictionOut(BaseModel):
    label: str
    confidence: float
    probs: dict[str, float]
    abstained: bool
    truncated: bool = Field(False, description="the text was cut to max_text_chars before prediction")


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]
    model_version: str
    request_id: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str | None


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 413, 415, 503)}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"oneOf": [TextRequest.model_json_schema(), ImageRequest.model_json_schema()]}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}


# ---------------------------------------------------------------------------------- metrics
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


# ------------------------------------------------------------------------- input validation
@dataclass
class ParsedInput:
    """One validated input: what the predictor gets, summary stats for the log, and the raw form if logged."""

    value: str | np.ndarray  # a text, or an image preprocessed from the decode that validated it
    stats: dict[str, Any]
    raw: str | None = None
    truncated: bool = False


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def parse_json_object(body: bytes, example: str) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(400, "invalid_json", f"request body is empty; send JSON like {example}")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise ApiError(400, "invalid_json", f"request body is not valid JSON ({reason}); send JSON like {example}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_request", f"expected a JSON object, got {json_type(payload)}; send {example}")
    return payload


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")


def payload_items(payload: dict[str, Any], modality: str, settings: ServeSettings) -> list[str]:
    """The list under "inputs" (text) or "images" (image), checked for shape and count."""
    key, other = ("inputs", "images") if modality == "text" else ("images", "inputs")
    example = JSON_EXAMPLE[modality]
    if other in payload:
        raise ApiError(400, "wrong_modality", f'this is a {modality} model; send {example}, not "{other}"')
    unknown = sorted(set(payload) - {key})
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown key(s) {unknown}; send {example}")
    items = payload.get(key)
    if not isinstance(items, list):
        got = "nothing" if key not in payload else json_type(items)
        raise ApiError(400, "invalid_request", f'"{key}" must be a list of strings, got {got}; send {example}')
    if not items:
        raise ApiError(400, "empty_input", f'"{key}" is empty; send at least one item')
    if len(items) > settings.max_items:
        raise ApiError(413, "too_many_items", f'{len(items)} items in "{key}" is over max_items={settings.max_items}; '
                                              "split them over several requests")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ApiError(400, "invalid_request", f"{key}[{index}]: expected a string, got {json_type(item)}")
    return items


def parse_texts(texts: list[str], settings: ServeSettings) -> list[ParsedInput]:
    out = []
    for index, text in enumerate(texts):
        if not text.strip():
            raise ApiError(400, "empty_input", f"inputs[{index}]: empty text; send at least one non-space character")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON "\ud800" decodes to a lone surrogate the tokenizer cannot take
            raise ApiError(400, "invalid_text", f"inputs[{index}]: not valid Unicode (unpaired surrogate); "
                                                "send UTF-8 text") from None
        value, truncated = text, False
        if len(text) > settings.max_text_chars:
            if settings.text_overflow == "reject":
                raise ApiError(413, "text_too_long", f"inputs[{index}]: {len(text)} characters is over "
                                                     f"max_text_chars={settings.max_text_chars}; shorten the text")
            value, truncated = text[: settings.max_text_chars], True
        stats = {"chars": len(text), "words": len(text.split()), "truncated": truncated}
        out.append(ParsedInput(value, stats, raw=text if settings.log_inputs else None, truncated=truncated))
    return out


def decode_base64(text: str, where: str) -> bytes:
    if text.startswith("data:"):  # data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)  # line-wrapped (MIME) base64 is fine
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"{where}: not valid base64 ({exc}); send the image file's bytes "
                                              "base64-encoded") from None
    if not data:
        raise ApiError(400, "empty_input", f"{where}: empty image; send the image file's bytes base64-encoded")
    return data


def inspect_image(data: bytes, where: str, settings: ServeSettings, spec: ImageSpec
                  ) -> tuple[Image.Image, dict[str, Any]]:
    """Size check from the header (before decoding: no decompression bombs), then a full decode and stats.
    The caller preprocesses this same decoded image for the model: one decode per upload."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            (width, height), fmt = header.size, header.format
    except Exception as exc:  # noqa: BLE001 - any decoder failure on client bytes is the client's bad image
        raise ApiError(400, "invalid_image", f"{where}: not a readable image ({type(exc).__name__}); "
                                             "send a JPEG, PNG, WebP, GIF, BMP or TIFF file") from None
    if width * height > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{where}: {width}x{height} pixels is over max_image_pixels="
                                               f"{settings.max_image_pixels}; downscale the image first")
    # preprocessing resizes the shorter side up or down to spec.resize_size: an extreme aspect ratio (1 x 100000)
    # would blow up there; the same pixel limit applies to the resized image
    scale = spec.resize_size / max(1, min(width, height))
    if round(width * scale) * round(height * scale) > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{where}: {width}x{height} is too elongated (resized for the model it "
                                               f"would exceed max_image_pixels={settings.max_image_pixels}); crop it")
    try:
        img = load_image(data)  # the runtime's own decoder: EXIF orientation, alpha on white, RGB
    except DataError:
        raise ApiError(400, "invalid_image", f"{where}: cannot decode the image (truncated or corrupt); "
                                             "send the complete file") from None
    except Exception as exc:  # noqa: BLE001 - e.g. Pillow's DecompressionBombError, odd plugin errors
        raise ApiError(400, "invalid_image", f"{where}: cannot decode the image ({type(exc).__name__}); "
                                             "send a complete JPEG/PNG file") from None
    # the monitor's image signals, computed as export computed the reference (deepship.runtime.stats)
    return img, {"bytes": len(data), "format": fmt, **image_stats(img)}


def parse_images(sources: list[tuple[str, bytes | str]], settings: ServeSettings, spec: ImageSpec
                 ) -> list[ParsedInput]:
    """(where, base64 text or raw bytes) -> validated, preprocessed inputs: each upload is decoded once, and
    its model array ((3, S, S) float32, small whatever the photo's size) is all a queued request holds. CPU-bound,
    so callers run it off the loop, in parallel across requests."""
    out = []
    for where, source in sources:
        data = decode_base64(source, where) if isinstance(source, str) else source
        if not data:
            raise ApiError(400, "empty_input", f"{where}: empty file; upload the image's bytes")
        img, stats = inspect_image(data, where, settings, spec)
        try:
            array = preprocess_image(img, spec)
        except Exception as exc:  # noqa: BLE001 - a decodable image the resize still refuses is the client's
            raise ApiError(400, "invalid_image", f"{where}: cannot preprocess the image ({type(exc).__name__}); "
                                                 "send an ordinary RGB photo") from None
        raw = base64.b64encode(data).decode("ascii") if settings.log_inputs else None
        out.append(ParsedInput(array, stats, raw=raw))
    return out


def parse_text_json(body: bytes, settings: ServeSettings) -> list[ParsedInput]:
    return parse_texts(payload_items(parse_json_object(body, JSON_EXAMPLE["text"]), "text", settings), settings)


def parse_image_json(body: bytes, settings: ServeSettings, spec: ImageSpec) -> list[ParsedInput]:
    items = payload_items(parse_json_object(body, JSON_EXAMPLE["image"]), "image", settings)
    return parse_images([(f"images[{i}]", text) for i, text in enumerate(items)], settings, spec)


async def read_multipart(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """Uploaded files in order, as (field[i], bytes); non-file fields are refused."""
    try:
        form = await request.form(max_files=settings.max_items, max_fields=settings.max_items)
    except (MultiPartException, StarletteHTTPException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        if str(detail).startswith("Too many"):
            raise ApiError(413, "too_many_items", f"{detail} (max_items); split the files over several requests") from None
        raise ApiError(400, "invalid_multipart", f"multipart body could not be parsed ({detail}); "
                                                 "upload files as multipart/form-data fields named 'images'") from None
    try:
        files: list[tuple[str, bytes]] = []
        for index, (name, value) in enumerate(form.multi_items()):
            if not isinstance(value, UploadFile):
                raise ApiError(400, "invalid_request", f"form field '{name}' is not a file; upload image files only")
            files.append((f"{name}[{index}]", await value.read()))
    finally:
        await form.close()
    if not files:
        raise ApiError(400, "empty_input", "no files in the multipart body; upload images as fields named 'images'")
    return files


async def read_inputs(request: Request, predictor: Predictor, settings: ServeSettings) -> list[ParsedInput]:
    kind, modality = media_type(request), predictor.modality
    if kind == "application/json" or kind.endswith("+json"):
        body = await request.body()
        if modality == "text":
            if len(body) <= INLINE_JSON_BYTES:
                return parse_text_json(body, settings)  # small texts: a thread hop would cost more than the parse
            return await run_in_threadpool(parse_text_json, body, settings)
        return await run_in_threadpool(parse_image_json, body, settings, predictor.spec)
    if kind == "multipart/form-data":
        if modality != "image":
            raise ApiError(415, "unsupported_media_type", f"a text model takes application/json {JSON_EXAMPLE['text']}")
        files = await read_multipart(request, settings)
        return await run_in_threadpool(parse_images, files, settings, predictor.spec)
    accepted = "application/json" + (" or multipart/form-data" if modality == "image" else "")
    raise ApiError(415, "unsupported_media_type", f"Content-Type '{kind or 'none'}' is not supported; send {accepted} "
                                                  f"like {JSON_EXAMPLE[modality]}")


# ----------------------------------------------------------------------------- model serving
@dataclass
class ModelSlot:
    """A loaded package and its own batcher: one batch never mixes models."""

    predictor: Predictor
    batcher: MicroBatcher
    package_dir: Path
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def version(self) -> str:
        return self.predictor.model_version


def warm_up(predictor: Predictor) -> None:
    """The first onnxruntime call allocates and plans; pay for it before /readyz says ready."""
    if predictor.modality == "text":
        predictor.predict(["warm-up"])
        return
    size = getattr(predictor.spec, "image_size", 224)
    # the path the batcher runs: arrays preprocessed from a decoded image
    predictor.predict_arrays([preprocess_image(Image.new("RGB", (size, size), (128, 128, 128)), predictor.spec)])


class ServingState:
    """The current model (and the previous one, for rollback), readiness, metrics and the prediction log."""

    def __init__(self, package_dir: str | Path, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.package_dir, self.settings, self.metrics = Path(package_dir), settings, metrics
        self.current: ModelSlot | None = None
        self.previous: ModelSlot | None = None
        self.ready = False
        self.predlog: PredictionLog | None = None
        self._swap = asyncio.Lock()  # one reload/rollback at a time

    async def start(self) -> None:
        if self.settings.log_path:
            self.predlog = PredictionLog(self.settings.log_path, self.settings.log_max_bytes, self.settings.log_backups,
                                         self.settings.log_queue_size, on_drop=self.metrics.log_dropped.inc)
        self.current = await self.load(self.package_dir)
        self.metrics.model_info.labels(self.current.version).set(1)
        self.ready = True

    async def stop(self) -> None:
        """After uvicorn has drained in-flight requests: finish queued batches, flush the log."""
        self.ready = False
        for slot in (self.current, self.previous):
            if slot is not None:
                await slot.batcher.close()
        if self.predlog is not None:
            await run_in_threadpool(self.predlog.close)

    async def load(self, package_dir: Path) -> ModelSlot:
        # hashes + session take seconds: off the event loop; no spin-waiting threads (see build_session)
        predictor = await run_in_threadpool(Predictor.load, package_dir, spinning=False)
        if self.settings.warmup:
            await run_in_threadpool(warm_up, predictor)
        s = self.settings
        # One tokenization (text) or decode (image, in the request thread) per input: a batch returns each
        # prediction with the input statistics the log needs (texts' token signals; images have theirs already).
        run = predictor.predict_with_stats if predictor.modality == "text" else \
            (lambda arrays: [(p, None) for p in predictor.predict_arrays(arrays)])
        batcher = MicroBatcher(run, s.max_batch_size, s.max_wait_ms, s.batching,
                               on_batch=self.metrics.batch_size.observe)
        await batcher.start()
        return ModelSlot(predictor, batcher, Path(package_dir))

    def serving_slot(self) -> ModelSlot:
        if not self.ready or self.current is None:
            raise ApiError(503, "not_ready", "the model is loading or the server is shutting down; retry shortly")
        return self.current

    async def reload(self, package_dir: str | Path | None = None) -> dict[str, Any]:
        """Load, warm up, then swap; a package that fails to load leaves the current model serving."""
        async with self._swap:
            target = Path(package_dir) if package_dir else self.package_dir
            try:
                slot = await self.load(target)
            except DeepshipError as exc:
                self.metrics.reloads.labels("failed").inc()
                raise ApiError(422, "reload_failed", f"{exc}; still serving {self.version()}") from None
            if self.current is not None and slot.predictor.modality != self.current.predictor.modality:
                await slot.batcher.close()
                self.metrics.reloads.labels("failed").inc()
                raise ApiError(422, "reload_failed", f"{target}: a {slot.predictor.modality} model, but this server "
                                                     f"serves {self.current.predictor.modality}; start another server")
            evicted = self.previous
            self.previous, self.current = self.current, slot  # the swap: one step on the event loop
            self.package_dir = target  # a later SIGHUP reloads from here
            self.publish_versions()
            self.metrics.reloads.labels("reloaded").inc()
            if evicted is not None and evicted is not self.previous:
                await evicted.batcher.close()  # requests still holding it fall back to unbatched calls
            return self.describe_swap()

    async def rollback(self) -> dict[str, Any]:
        async with self._swap:
            if self.previous is None:
                raise ApiError(409, "no_previous_model", "there is no previous model to roll back to; reload one first")
            self.current, self.previous = self.previous, self.current
            self.package_dir = self.current.package_dir
            self.publish_versions()
            self.metrics.reloads.labels("rolled_back").inc()
            return self.describe_swap()

    async def reload_on_signal(self) -> None:
        try:
            result = await self.reload()
            logger.warning("SIGHUP: now serving %s (previous %s)", result["model_version"], result["previous_version"])
        except ApiError as exc:
            logger.error("SIGHUP: %s", exc.message)

    def publish_versions(self) -> None:
        if self.previous is not None:
            self.metrics.model_info.labels(self.previous.version).set(0)
        if self.current is not None:
            self.metrics.model_info.labels(self.current.version).set(1)

    def version(self) -> str | None:
        return self.current.version if self.current else None

    def describe_swap(self) -> dict[str, Any]:
        return {"model_version": self.version(), "previous_version": self.previous.version if self.previous else None}

    def record(self, slot: ModelSlot, inputs: list[ParsedInput], predictions: list[Prediction], request_id: str,
               latency_ms: float) -> None:
        """Metrics now (cheap); log records to the writer thread."""
        self.metrics.observe_predictions(predictions)
        if self.predlog is None:
            return
        ts = datetime.now(timezone.utc).isoformat()
        records = []
        for index, (item, p) in enumerate(zip(inputs, predictions)):
            record = {"id": f"{request_id}:{index}", "label": p.label, "confidence": p.confidence, "probs": p.probs,
                      "abstained": p.abstained, "model_version": slot.version, "latency_ms": round(latency_ms, 3),
                      "ts": ts, "request_id": request_id, "input_stats": item.stats}
            if item.raw is not None:
                record["input"] = item.raw
            records.append(record)
        self.predlog.write(records)


def prediction_json(p: Prediction, item: ParsedInput) -> dict[str, Any]:
    return {"label": p.label, "confidence": p.confidence, "probs": p.probs, "abstained": p.abstained,
            "truncated": item.truncated}


def public_manifest(slot: ModelSlot, previous: ModelSlot | None) -> dict[str, Any]:
    """The manifest minus file hashes and training paths (local details of the build host)."""
    manifest = {k: v for k, v in slot.predictor.manifest.items() if k not in ("files", "config", "run")}
    return {**manifest, "modality": slot.predictor.modality, "loaded_at": slot.loaded_at,
            "previous_version": previous.version if previous else None}


# ----------------------------------------------------------------------------------- the app
def install_sighup(state: ServingState) -> Callable[[], None]:
    """SIGHUP -> reload from the package folder. Only the main thread may own signals (not in tests' threads)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(state.reload_on_signal()))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def create_app(package_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving the package at `package_dir`; the model loads when the app starts (lifespan)."""
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    state = ServingState(package_dir, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        remove_handler = install_sighup(state)
        try:
            yield
        finally:
            remove_handler()
            await state.stop()

    app = FastAPI(title="deepship", description="Classify texts or images with a deepship model package.",
                  version="1", lifespan=lifespan)
    app.state.serving = state
    app.add_middleware(ObserveMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    add_error_handlers(app)
    add_routes(app, state)
    if settings.admin:
        add_admin_routes(app, state)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request_id_of(request), exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        hint = {404: f"no endpoint {request.url.path}; see /docs", 405: f"{request.method} is not allowed on "
                                                                         f"{request.url.path}; see /docs"}
        return error_response(request_id_of(request), exc.status_code, codes.get(exc.status_code, "http_error"),
                              hint.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(request_id_of(request), 422, "invalid_request", f"{where}: {first['msg']}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(request_id_of(request), 500, "internal_error",
                              "unexpected server error; the server log has the traceback for this request_id")


def add_routes(app: FastAPI, state: ServingState) -> None:
    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
              summary="Classify texts (JSON) or images (JSON base64 or multipart upload)")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        slot = state.serving_slot()  # chosen once: this request sees one model, even across a reload
        inputs = await read_inputs(request, slot.predictor, state.settings)
        try:
            results = await slot.batcher.submit([item.value for item in inputs])
        except DataError as exc:  # validation passed but the runtime refused the input: still the client's
            raise ApiError(400, "invalid_input", str(exc)) from None
        predictions = [prediction for prediction, _ in results]
        for item, (_, stats) in zip(inputs, results):
            if stats is not None:  # token signals for the monitor, as in the reference profile
                item.stats.update({k: stats[k] for k in TEXT_SIGNALS + ("tokens_truncated",)})
        latency_ms = (time.perf_counter() - start) * 1000
        request_id = request_id_of(request) or uuid.uuid4().hex
        state.record(slot, inputs, predictions, request_id, latency_ms)
        return JSONResponse({"predictions": [prediction_json(p, i) for p, i in zip(predictions, inputs)],
                             "model_version": slot.version, "request_id": request_id})

    @app.get("/v1/model", summary="The package manifest: version, labels, metrics, thresholds, preprocessing")
    async def model() -> dict[str, Any]:
        slot = state.serving_slot()
        return public_manifest(slot, state.previous)

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and warmed up", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict[str, Any]:
        slot = state.serving_slot()
        return {"status": "ready", "model_version": slot.version}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class ReloadRequest(BaseModel):
    package: str | None = Field(None, description="package folder to load; default: the one being served (re-read)")


def add_admin_routes(app: FastAPI, state: ServingState) -> None:
    @app.post("/admin/reload", summary="Load a package, warm it up, swap it in; the old one is kept for rollback",
              responses={400: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
    async def reload(request: Request) -> dict[str, Any]:
        body = await request.body()
        package = None
        if body.strip():
            payload = parse_json_object(body, '{"package": "/path/to/package"}')
            unknown = sorted(set(payload) - {"package"})
            package = payload.get("package")
            if unknown or not (package is None or isinstance(package, str)):
                raise ApiError(400, "invalid_request", 'send {"package": "/path/to/package"} or an empty body')
        return await state.reload(package)

    @app.post("/admin/rollback", summary="Swap back to the previous model",
              responses={409: {"model": ErrorResponse}})
    async def rollback() -> dict[str, Any]:
        return await state.rollback()


def create_app_from_env() -> FastAPI:
    """uvicorn factory for --workers N: each worker process builds its own app from the CLI's environment."""
    settings = ServeSettings.model_validate_json(os.environ["DEEPSHIP_SERVE_SETTINGS"])
    workers = int(os.environ.get("DEEPSHIP_SERVE_WORKERS", "1"))
    if settings.log_path:
        settings = settings.model_copy(update={"log_path": str(log_path_for_worker(settings.log_path, workers))})
    return create_app(os.environ["DEEPSHIP_SERVE_PACKAGE"], settings)

