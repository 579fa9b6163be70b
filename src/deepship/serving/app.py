"""The HTTP server: a FastAPI app over one model package, torch-free.

`create_app(package_dir, settings)` builds the app; its lifespan loads the package, warms it up and
starts the micro-batcher before the first request, and on shutdown (after uvicorn has let in-flight
requests finish) drains the batcher and flushes the prediction log.

Every request is validated at the edge (deepship.serving.requests); a bad one gets a 4xx
`{"error": {"code", "message"}, "request_id"}` that says what to send instead, and the next request
is served normally. Models, reload and rollback live in deepship.serving.state.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepship.errors import DataError
from deepship.runtime.predictor import Prediction
from deepship.serving.alias import AliasDeployment, RegistryModel
from deepship.serving.metrics import ObserveMiddleware, ServeMetrics, request_id_of
from deepship.serving.modality import read_inputs
from deepship.serving.predlog import log_path_for_worker
from deepship.serving.requests import ParsedInput, parse_json_object
from deepship.serving.schemas import ERRORS, PREDICT_BODY, ApiError, ErrorResponse, PredictResponse, error_response
from deepship.serving.settings import ServeSettings
from deepship.serving.state import ModelSlot, ServingState, install_sighup

logger = logging.getLogger("deepship.serving")


def prediction_json(p: Prediction, item: ParsedInput) -> dict[str, Any]:
    return {"label": p.label, "confidence": p.confidence, "probs": p.probs, "abstained": p.abstained,
            "truncated": item.truncated}


def public_manifest(slot: ModelSlot, previous: ModelSlot | None,
                    deployment: AliasDeployment | None = None) -> dict[str, Any]:
    """The manifest minus file hashes and training paths (local details of the build host), plus, when serving
    from a registry, the served version with its lineage and what the watched alias points at."""
    manifest = {k: v for k, v in slot.predictor.manifest.items() if k not in ("files", "config", "run")}
    described = {**manifest, "modality": slot.predictor.modality.name, "loaded_at": slot.loaded_at,
                 "previous_version": previous.version if previous else None}
    if deployment is not None:
        registry = slot.origin.describe() if slot.origin else {"registry_version": None}
        previous_origin = previous.origin if previous else None
        described["registry"] = {**registry, **deployment.describe(),
                                 "previous_registry_version": previous_origin.tag if previous_origin else None}
    return described


def create_app(model: str | Path | RegistryModel, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving a package folder, or a registry reference (an alias is followed as it moves);
    the model loads when the app starts (lifespan)."""
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    registry_model = model if isinstance(model, RegistryModel) else None
    # a registry version's folder is known only once the lifespan has resolved it: AliasDeployment.start sets it
    state = ServingState("." if registry_model else model, settings, metrics)
    deployment = AliasDeployment(registry_model, state) if registry_model else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await (deployment.start() if deployment else state.start())
        remove_handler = install_sighup(state)
        try:
            yield
        finally:
            remove_handler()
            if deployment is not None:
                await deployment.stop()
            await state.stop()

    app = FastAPI(title="deepship", description="Classify texts or images with a deepship model package.",
                  version="1", lifespan=lifespan)
    app.state.serving = state
    app.add_middleware(ObserveMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    add_error_handlers(app)
    add_routes(app, state, deployment)
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


def add_routes(app: FastAPI, state: ServingState, deployment: AliasDeployment | None = None) -> None:
    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
              summary="Classify texts (JSON) or images (JSON base64 or multipart upload)")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        slot = state.serving_slot()  # chosen once: this request sees one model, even across a reload
        inputs = await read_inputs(request, slot.modality, state.settings, slot.predictor.spec)
        try:
            results = await slot.batcher.submit([item.value for item in inputs])
        except DataError as exc:  # validation passed but the runtime refused the input: still the client's
            raise ApiError(400, "invalid_input", str(exc)) from None
        predictions = [prediction for prediction, _ in results]
        for item, (_, stats) in zip(inputs, results):
            item.stats.update(stats)  # e.g. token signals for the monitor, as in the reference profile
        latency_ms = (time.perf_counter() - start) * 1000
        request_id = request_id_of(request) or uuid.uuid4().hex
        state.record(slot, inputs, predictions, request_id, latency_ms)
        return JSONResponse({"predictions": [prediction_json(p, i) for p, i in zip(predictions, inputs)],
                             **slot.version_fields(), "request_id": request_id})

    @app.get("/v1/model", summary="The package manifest: version, labels, metrics, thresholds, preprocessing")
    async def model() -> dict[str, Any]:
        slot = state.serving_slot()
        return public_manifest(slot, state.previous, deployment)

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and warmed up", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict[str, Any]:
        slot = state.serving_slot()
        return {"status": "ready", **slot.version_fields()}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


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
    registry_model = os.environ.get("DEEPSHIP_SERVE_REGISTRY_MODEL")
    model = RegistryModel(**json.loads(registry_model)) if registry_model else os.environ["DEEPSHIP_SERVE_PACKAGE"]
    return create_app(model, settings)

