"""deepship.serving: endpoints, the bad-input table, micro-batching, reload under load, metrics, the
prediction log, graceful shutdown, SIGHUP, a fuzz test, and no torch in the serving process.

Servers run in-process (uvicorn in a thread, loopback, port 0) or, for signals, as a child process.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deepship.cli import main as serve_main
from deepship.errors import ConfigError
from deepship.runtime.predictor import Prediction, Predictor
from deepship.serving.app import create_app
from deepship.serving.batching import MicroBatcher
from deepship.serving.metrics import ServeMetrics
from deepship.serving.predlog import PredictionLog
from deepship.serving.settings import ServeSettings, load_settings
from deepship.serving.state import ServingState

from conftest import FORBIDDEN_IN_RUNTIME, copy_package, rewrite_manifest, toy_image

REPO = Path(__file__).resolve().parents[1]
POS = ["the movie was great and wonderful", "a superb delightful story", "lovely excellent film"]
NEG = ["awful boring plot", "the film was terrible and painful", "dreadful horrible scene"]
RECORD_KEYS = {"id", "label", "confidence", "probs", "abstained", "model_version", "latency_ms", "ts",
               "request_id", "input_stats"}


# ------------------------------------------------------------------------------------ helpers
@dataclass
class Running:
    url: str
    server: uvicorn.Server
    state: ServingState

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0)


@contextmanager
def running(package: Path, **options: Any) -> Iterator[Running]:
    """The app under a real uvicorn on a free loopback port, in a thread; stopped (gracefully) on exit."""
    app = create_app(package, ServeSettings(**options))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(1200):  # bounded: model load + warm-up
        if server.started or not thread.is_alive():
            break
        time.sleep(0.05)
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Running(f"http://127.0.0.1:{port}", server, app.state.serving)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def png_bytes(label: str = "red", size: int = 32, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    toy_image(np.random.default_rng(seed), label, size).save(buffer, format="PNG")
    return buffer.getvalue()


def solid_png(colour: tuple[int, int, int], size: int | tuple[int, int] = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size if isinstance(size, tuple) else (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def relabelled_package(package: Path, dst: Path, suffix: str) -> Path:
    """A copy whose labels and model_version differ: tells apart which model answered (manifest re-sealed)."""
    copy = copy_package(package, dst)
    manifest = json.loads((copy / "package.json").read_text())
    manifest["labels"] = [f"{label}-{suffix}" for label in manifest["labels"]]
    manifest["model_version"] = f"{manifest['model_version']}-{suffix}"
    rewrite_manifest(copy, manifest)
    return copy


def assert_error(response: httpx.Response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"], body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]


# ----------------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def text_server(text_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    log = tmp_path_factory.mktemp("serve-log") / "text.jsonl"
    with running(text_package, max_items=8, max_text_chars=200, max_body_bytes=64 * 1024, max_wait_ms=2.0,
                 log_path=str(log)) as server:
        yield server


@pytest.fixture(scope="module")
def image_server(image_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    log = tmp_path_factory.mktemp("serve-log") / "image.jsonl"
    with running(image_package, max_items=4, max_image_pixels=128 * 128, max_body_bytes=512 * 1024,
                 max_wait_ms=2.0, log_path=str(log)) as server:
        yield server


# --------------------------------------------------------------------------------- endpoints
def test_text_predictions_match_the_predictor_in_request_order(text_server: Running, text_package: Path) -> None:
    texts = [POS[0], NEG[0], POS[1], NEG[1]]
    with text_server.client() as client:
        response = client.post("/v1/predict", json={"inputs": texts}, headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = Predictor.load(text_package).predict(texts)
    assert [p["label"] for p in body["predictions"]] == [p.label for p in expected]
    for got, want in zip(body["predictions"], expected):
        assert got["probs"] == pytest.approx(want.probs, abs=1e-5)
        assert got["confidence"] == pytest.approx(want.confidence, abs=1e-5)
        assert got["abstained"] is want.abstained and got["truncated"] is False
    assert body["model_version"] == Predictor.load(text_package).model_version
    assert body["request_id"] == "req-42" == response.headers["x-request-id"]  # a tame client id is echoed


def test_an_unsafe_client_request_id_is_replaced(text_server: Running) -> None:
    with text_server.client() as client:
        response = client.post("/v1/predict", json={"inputs": [POS[0]]}, headers={"X-Request-ID": "x" * 65})
    assert response.status_code == 200
    assert response.json()["request_id"] != "x" * 65 and len(response.json()["request_id"]) == 32


def test_images_by_base64_json_and_by_multipart_upload_agree(image_server: Running, image_package: Path) -> None:
    images = [png_bytes("red", seed=1), png_bytes("green", seed=2), png_bytes("blue", seed=3)]
    expected = Predictor.load(image_package).predict(images)
    with image_server.client() as client:
        as_json = client.post("/v1/predict", json={"images": [b64(x) for x in images]})
        data_url = client.post("/v1/predict", json={"images": ["data:image/png;base64," + b64(images[0])]})
        upload = client.post("/v1/predict", files=[("images", (f"{i}.png", x, "image/png")) for i, x in enumerate(images)])
    for response in (as_json, upload):
        assert response.status_code == 200, response.text
        assert [p["label"] for p in response.json()["predictions"]] == [p.label for p in expected]
        for got, want in zip(response.json()["predictions"], expected):
            assert got["probs"] == pytest.approx(want.probs, abs=1e-5)
    assert data_url.json()["predictions"][0]["label"] == expected[0].label


def test_each_uploaded_image_is_decoded_once(image_server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode that validates an upload is the one the model gets (no second decode on the model thread)."""
    from deepship.runtime import modality as predictor_module
    from deepship.runtime import preprocess
    from deepship.serving import requests as requests_module

    decodes = []
    original = preprocess.load_image

    def counting(source):
        if isinstance(source, bytes):
            decodes.append(len(source))
        return original(source)

    for module in (preprocess, predictor_module, requests_module):
        monkeypatch.setattr(module, "load_image", counting)
    images = [png_bytes("red", seed=4), png_bytes("blue", seed=5)]
    with image_server.client() as client:
        response = client.post("/v1/predict", json={"images": [b64(x) for x in images]})
    assert response.status_code == 200, response.text
    assert decodes == [len(x) for x in images]


def test_model_health_and_readiness_endpoints(text_server: Running, text_package: Path) -> None:
    manifest = json.loads((text_package / "package.json").read_text())
    with text_server.client() as client:
        model = client.get("/v1/model").json()
        health, ready = client.get("/healthz"), client.get("/readyz")
        openapi = client.get("/openapi.json").json()
    assert model["model_version"] == manifest["model_version"] and model["labels"] == manifest["labels"]
    assert model["metrics"] == manifest["metrics"] and model["thresholds"] == manifest["thresholds"]
    assert model["modality"] == "text" and "files" not in model and "config" not in model  # no build-host details
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200 and ready.json()["model_version"] == manifest["model_version"]
    content = openapi["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}


def test_not_ready_before_the_model_is_loaded(text_package: Path) -> None:
    app = create_app(text_package)  # lifespan not run: no model yet

    async def probe() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/healthz"), await client.get("/readyz"), await client.post(
                "/v1/predict", json={"inputs": ["x"]})

    health, ready, predict = asyncio.run(probe())
    assert health.status_code == 200
    assert_error(ready, 503, "not_ready", "loading")
    assert_error(predict, 503, "not_ready", "retry")


# ------------------------------------------------------------------------- the bad-input table
MULTIPART_EMPTY = {"content": b"--xyz--\r\n", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}
TEXT_CASES = {
    "non-json": ({"content": b"not json", "headers": {"content-type": "application/json"}},
                 400, "invalid_json", "not valid JSON"),
    "empty-body": ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "invalid_json", "empty"),
    "deeply-nested": ({"content": b"[" * 50_000, "headers": {"content-type": "application/json"}},
                      400, "invalid_json", "not valid JSON"),
    "bad-utf8": ({"content": b'{"inputs": ["\xff\xfe"]}', "headers": {"content-type": "application/json"}},
                 400, "invalid_json", "not valid JSON"),
    "json-array": ({"json": ["a"]}, 400, "invalid_request", "expected a JSON object, got an array"),
    "inputs-not-list": ({"json": {"inputs": "a text"}}, 400, "invalid_request", '"inputs" must be a list'),
    "inputs-missing": ({"json": {}}, 400, "invalid_request", "got nothing"),
    "inputs-empty-list": ({"json": {"inputs": []}}, 400, "empty_input", '"inputs" is empty'),
    "empty-string": ({"json": {"inputs": ["ok", ""]}}, 400, "empty_input", "inputs[1]: empty text"),
    "whitespace-string": ({"json": {"inputs": [" \n\t"]}}, 400, "empty_input", "inputs[0]: empty text"),
    "not-a-string": ({"json": {"inputs": ["ok", 3]}}, 400, "invalid_request", "inputs[1]: expected a string"),
    "lone-surrogate": ({"content": b'{"inputs": ["\\ud800"]}', "headers": {"content-type": "application/json"}},
                       400, "invalid_text", "unpaired surrogate"),
    "images-to-text-model": ({"json": {"images": ["aGVsbG8="]}}, 400, "wrong_modality", "this is a text model"),
    "unknown-key": ({"json": {"inputs": ["ok"], "extra": 1}}, 400, "invalid_request", "unknown key(s) ['extra']"),
    "too-many-items": ({"json": {"inputs": ["ok"] * 9}}, 413, "too_many_items", "max_items=8"),
    "body-too-large": ({"json": {"inputs": ["x" * 70_000]}}, 413, "body_too_large", "max_body_bytes=65536"),
    "chunked-body-too-large": ({"content": iter([b'{"inputs": ["'] + [b"y" * 8192] * 10 + [b'"]}']),
                                "headers": {"content-type": "application/json"}}, 413, "body_too_large", "max_body_bytes"),
    "text-plain": ({"content": b"hello", "headers": {"content-type": "text/plain"}},
                   415, "unsupported_media_type", "'text/plain' is not supported"),
    "no-content-type": ({"content": b'{"inputs": ["ok"]}'}, 415, "unsupported_media_type", "'none'"),
    "multipart-to-text-model": ({"files": [("images", ("a.png", b"x", "image/png"))]},
                                415, "unsupported_media_type", "a text model takes application/json"),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_bad_text_requests_get_a_4xx_and_the_next_request_is_served(text_server: Running, case: str) -> None:
    request, status, code, fragment = TEXT_CASES[case]
    with text_server.client() as client:
        assert_error(client.post("/v1/predict", **request), status, code, fragment)
        assert client.post("/v1/predict", json={"inputs": [POS[0]]}).status_code == 200


IMAGE_CASES = {
    "bad-base64": ({"json": {"images": ["not base64 !!"]}}, 400, "invalid_base64", "images[0]: not valid base64"),
    "empty-string": ({"json": {"images": [""]}}, 400, "empty_input", "images[0]: empty image"),
    "not-an-image": ({"json": {"images": [b64(b"just some text bytes")]}}, 400, "invalid_image", "not a readable image"),
    "truncated-png": ({"json": {"images": [b64(png_bytes()), b64(png_bytes()[:200])]}},
                      400, "invalid_image", "images[1]: cannot decode"),
    "too-many-pixels": ({"json": {"images": [b64(solid_png((9, 9, 9), size=200))]}},
                        413, "image_too_large", "200x200 pixels is over max_image_pixels=16384"),
    "too-elongated": ({"json": {"images": [b64(solid_png((9, 9, 9), size=(500, 1)))]}},  # 500 px, 18500x37 resized
                      413, "image_too_large", "500x1 is too elongated"),
    "too-many-items": ({"json": {"images": [b64(png_bytes())] * 5}}, 413, "too_many_items", "max_items=4"),
    "texts-to-image-model": ({"json": {"inputs": ["a text"]}}, 400, "wrong_modality", "this is a image model"),
    "upload-not-an-image": ({"files": [("images", ("a.png", b"\x89PNG garbage", "image/png"))]},
                            400, "invalid_image", "images[0]: not a readable image"),
    "upload-empty-file": ({"files": [("images", ("a.png", b"", "image/png"))]}, 400, "empty_input", "empty file"),
    "upload-too-many": ({"files": [("images", (f"{i}.png", png_bytes(), "image/png")) for i in range(5)]},
                        413, "too_many_items", "max_items"),
    "upload-text-field": ({"data": {"note": "hi"}, "files": [("images", ("a.png", png_bytes(), "image/png"))]},
                          400, "invalid_request", "form field 'note' is not a file"),
    "upload-no-files": (MULTIPART_EMPTY, 400, "empty_input", "no files"),
    "multipart-no-boundary": ({"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
                              400, "invalid_multipart", "could not be parsed"),
    "xml": ({"content": b"<a/>", "headers": {"content-type": "application/xml"}},
            415, "unsupported_media_type", "application/json or multipart/form-data"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image_requests_get_a_4xx_and_the_next_request_is_served(image_server: Running, case: str) -> None:
    request, status, code, fragment = IMAGE_CASES[case]
    with image_server.client() as client:
        assert_error(client.post("/v1/predict", **request), status, code, fragment)
        assert client.post("/v1/predict", json={"images": [b64(png_bytes())]}).status_code == 200


def test_unknown_paths_and_methods_get_json_errors(text_server: Running) -> None:
    with text_server.client() as client:
        assert_error(client.get("/v2/predict"), 404, "not_found", "no endpoint /v2/predict")
        assert_error(client.get("/v1/predict"), 405, "method_not_allowed", "GET is not allowed")
        assert_error(client.post("/admin/reload"), 404, "not_found", "/admin/reload")  # admin is opt-in


def test_long_texts_are_truncated_with_a_flag_or_rejected(text_package: Path) -> None:
    long_text = POS[0] + " and more" * 40  # 393 characters
    with running(text_package, max_text_chars=100) as server, server.client() as client:
        body = client.post("/v1/predict", json={"inputs": [POS[0], long_text]}).json()
        cut = client.post("/v1/predict", json={"inputs": [long_text[:100]]}).json()
    assert [p["truncated"] for p in body["predictions"]] == [False, True]
    assert body["predictions"][1]["probs"] == pytest.approx(cut["predictions"][0]["probs"], abs=1e-5)  # what was served
    with running(text_package, max_text_chars=100, text_overflow="reject") as server, server.client() as client:
        assert_error(client.post("/v1/predict", json={"inputs": [POS[0], long_text]}), 413, "text_too_long",
                     "inputs[1]: 393 characters is over max_text_chars=100")


# ------------------------------------------------------------------------------------ batching
def fake_predict(items: list[Any]) -> list[str]:
    if "bad" in items:
        raise ValueError("bad input")
    return [f"result:{x}" for x in items]


def test_batcher_groups_jobs_keeps_order_and_isolates_a_failing_job() -> None:
    async def scenario() -> tuple[MicroBatcher, list[Any], MicroBatcher, list[Any]]:
        sizes: list[int] = []
        batcher = MicroBatcher(fake_predict, max_batch_size=4, max_wait_ms=10_000, on_batch=sizes.append)
        await batcher.start()
        jobs = [[f"a{i}"] for i in range(6)] + [[f"b{i}" for i in range(6)]] + [[f"c{i}" for i in range(4)]]
        results = await asyncio.gather(*(batcher.submit(job) for job in jobs))
        await batcher.close()
        # a full batch leaves at once, whatever max_wait_ms says: a0-a3 | a4,a5 (the 6-item job does not fit,
        # so it leads the next batch) | b0-b5 alone (bigger than max_batch_size, never split) | c0-c3
        assert sizes == [4, 2, 6, 4]
        isolating = MicroBatcher(fake_predict, max_batch_size=3, max_wait_ms=10_000)
        await isolating.start()
        mixed = await asyncio.gather(*(isolating.submit(job) for job in (["x"], ["bad"], ["y"])),
                                     return_exceptions=True)
        await isolating.close()
        return batcher, [results, jobs], isolating, mixed

    _, (results, jobs), _, mixed = asyncio.run(scenario())
    assert results == [[f"result:{x}" for x in job] for job in jobs]  # each job gets its own slice, in order
    assert mixed[0] == ["result:x"] and mixed[2] == ["result:y"]
    assert isinstance(mixed[1], ValueError)


def test_batching_off_makes_one_call_per_request() -> None:
    async def scenario() -> list[int]:
        sizes: list[int] = []
        batcher = MicroBatcher(fake_predict, max_batch_size=64, max_wait_ms=10_000, enabled=False, on_batch=sizes.append)
        await batcher.start()
        await asyncio.gather(*(batcher.submit([i]) for i in range(5)))
        await batcher.close()
        return sizes

    assert asyncio.run(scenario()) == [1, 1, 1, 1, 1]


async def post_concurrently(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json=body) for body in bodies))


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_model_calls_and_get_their_own_results(text_package: Path, batching: bool) -> None:
    texts = [f"{(POS + NEG)[i % 6]} {'scene ' * (i % 5)}" for i in range(24)]  # varied lengths: varied padding
    expected = Predictor.load(text_package).predict(texts)
    with running(text_package, batching=batching, max_batch_size=8, max_wait_ms=200.0) as server:
        responses = asyncio.run(post_concurrently(server.url, [{"inputs": [t]} for t in texts]))
        with server.client() as client:
            samples = metric_samples(client.get("/metrics").text)
    calls = samples[("deepship_batch_size_count", ())]  # model calls (the warm-up bypasses the batcher)
    assert all(r.status_code == 200 for r in responses)
    for response, want in zip(responses, expected):  # matched to the right request, not just the right multiset
        got = response.json()["predictions"][0]
        assert got["label"] == want.label and got["probs"] == pytest.approx(want.probs, abs=1e-4)
    if batching:
        assert calls < len(texts)
        assert samples[("deepship_batch_size_bucket", (("le", "8.0"),))] == samples[("deepship_batch_size_count", ())]
    else:
        assert calls == len(texts)


# ------------------------------------------------------------------------------------- reload
def test_reload_under_load_fails_no_request_and_never_mixes_models(text_package: Path, tmp_path: Path) -> None:
    v2 = relabelled_package(text_package, tmp_path / "v2", "v2")
    v1 = Predictor.load(text_package).model_version
    labels = {v1: set(Predictor.load(text_package).labels), f"{v1}-v2": set(Predictor.load(v2).labels)}
    with running(text_package, admin=True, max_wait_ms=5.0, max_batch_size=4) as server:
        results, swaps = asyncio.run(load_while_swapping(server.url, v2))
    assert len(results) >= 60 and all(status == 200 for status, _, _, _ in results)
    for _, version, predicted, _ in results:  # every answer comes wholly from the model it names
        assert set(predicted) <= labels[version]
    assert [s.status_code for s in swaps] == [200, 200]
    assert swaps[0].json() == {"model_version": f"{v1}-v2", "previous_version": v1}
    assert swaps[1].json() == {"model_version": v1, "previous_version": f"{v1}-v2"}
    # requests that began after a swap returned and ended before the next one began: only the model of their phase
    phases = {phase: {version for _, version, _, p in results if p == phase} for phase in (0, 1, 2)}
    assert phases == {0: {v1}, 1: {f"{v1}-v2"}, 2: {v1}}


Result = tuple[int, "str | None", list[str], "int | None"]


async def load_while_swapping(url: str, v2: Path) -> tuple[list[Result], list[httpx.Response]]:
    """4 clients post in a loop; reload to v2 after 20 answers, roll back after 20 more, stop after 20 more."""
    results: list[Result] = []
    phase = {"begun": 0, "done": 0}  # swaps begun / swaps whose response has arrived
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        async def worker(seed: int) -> None:
            for i in range(400):  # bounded even if the swaps never come
                if stop.is_set():
                    return
                before = (phase["begun"], phase["done"])
                response = await client.post("/v1/predict", json={"inputs": [(POS + NEG)[(seed + i) % 6], POS[i % 3]]})
                clean = before[0] == before[1] == phase["begun"]  # no swap in progress or begun meanwhile
                body = response.json()
                results.append((response.status_code, body.get("model_version"),
                                [p["label"] for p in body.get("predictions", [])], before[0] if clean else None))

        async def swapper() -> list[httpx.Response]:
            swaps = []
            for path, request in (("/admin/reload", {"package": str(v2)}), ("/admin/rollback", None)):
                await wait_for_answers(results, len(results) + 20)
                phase["begun"] += 1
                swaps.append(await client.post(path, json=request) if request else await client.post(path))
                phase["done"] += 1
            await wait_for_answers(results, len(results) + 20)
            stop.set()
            return swaps

        *_, swaps = await asyncio.gather(*(worker(seed) for seed in range(4)), swapper())
    return results, swaps


async def wait_for_answers(results: list, count: int) -> None:
    for _ in range(6000):  # bounded
        if len(results) >= count:
            return
        await asyncio.sleep(0.005)


def test_failed_reloads_keep_serving_and_rollback_needs_a_previous_model(text_package: Path, image_package: Path,
                                                                         tmp_path: Path) -> None:
    broken = copy_package(text_package, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"tampered")
    version = Predictor.load(text_package).model_version
    with running(text_package, admin=True) as server, server.client() as client:
        assert_error(client.post("/admin/rollback"), 409, "no_previous_model", "no previous model")
        failed = client.post("/admin/reload", json={"package": str(broken)})
        assert_error(failed, 422, "reload_failed", "model.onnx: sha256 does not match package.json")
        assert failed.json()["error"]["message"].endswith(f"; still serving {version}")
        assert_error(client.post("/admin/reload", json={"package": str(image_package)}), 422, "reload_failed",
                     "a image model, but this server serves text")
        assert_error(client.post("/admin/reload", json={"package": 3}), 400, "invalid_request", "or an empty body")
        assert client.post("/v1/predict", json={"inputs": [POS[0]]}).json()["model_version"] == version
        samples = metric_samples(client.get("/metrics").text)
    assert samples[("deepship_reloads_total", (("result", "failed"),))] == 2


def test_reload_function_swaps_the_model_atomically(text_package: Path, tmp_path: Path) -> None:
    """What SIGHUP calls, driven directly: the new model serves only once it is loaded and warm."""
    v2 = relabelled_package(text_package, tmp_path / "v2", "v2")

    async def scenario() -> tuple[str, str, str, str]:
        state = ServingState(text_package, ServeSettings(), ServeMetrics())
        await state.start()
        before = state.serving_slot()
        state.package_dir = v2  # as if the package folder had been replaced on disk
        await state.reload_on_signal()
        after = state.serving_slot()
        (prediction, _stats), = await after.batcher.submit([POS[0]])  # text batches return (prediction, stats)
        labels = prediction.label
        await state.stop()
        return before.version, after.version, state.previous.version, labels

    before, after, previous, label = asyncio.run(scenario())
    assert after == before + "-v2" and previous == before and label.endswith("-v2")


# --------------------------------------------------------------------------- metrics and log
def test_metrics_count_requests_batches_classes_confidence_and_version(text_package: Path) -> None:
    with running(text_package) as server, server.client() as client:
        answers = [client.post("/v1/predict", json={"inputs": [POS[i % 3], NEG[i % 3]]}).json() for i in range(3)]
        client.post("/v1/predict", json={"inputs": []})
        samples = metric_samples(client.get("/metrics").text)
    predictions = [p for a in answers for p in a["predictions"]]
    assert samples[("deepship_requests_total", (("endpoint", "/v1/predict"), ("status", "200")))] == 3
    assert samples[("deepship_requests_total", (("endpoint", "/v1/predict"), ("status", "400")))] == 1
    assert samples[("deepship_request_latency_seconds_count", (("endpoint", "/v1/predict"),))] == 4
    assert samples[("deepship_batch_size_sum", ())] == 6  # the warm-up bypasses the batcher
    for label in {p["label"] for p in predictions}:
        assert samples[("deepship_predictions_total", (("label", label),))] == sum(p["label"] == label for p in predictions)
    assert samples[("deepship_prediction_confidence_count", ())] == 6
    assert samples[("deepship_prediction_confidence_sum", ())] == pytest.approx(sum(p["confidence"] for p in predictions))
    assert samples[("deepship_abstentions_total", ())] == sum(p["abstained"] for p in predictions)
    version = answers[0]["model_version"]
    assert samples[("deepship_model_info", (("model_version", version),))] == 1


def test_abstentions_are_counted(text_package: Path, tmp_path: Path) -> None:
    metrics = ServeMetrics()
    metrics.observe_predictions([Prediction("a", 0.4, {"a": 0.4, "b": 0.6}, True), Prediction("b", 0.9, {}, False)])
    samples = metric_samples(metrics.render().decode())
    assert samples[("deepship_abstentions_total", ())] == 1
    assert samples[("deepship_predictions_total", (("label", "a"),))] == 1
    strict = copy_package(text_package, tmp_path / "strict")  # a re-sealed manifest with other thresholds
    manifest = json.loads((strict / "package.json").read_text())
    manifest["thresholds"] = {"min_confidence": 1.01}  # unreachable: every prediction abstains
    rewrite_manifest(strict, manifest)
    with running(strict) as server, server.client() as client:
        answer = client.post("/v1/predict", json={"inputs": [POS[0], NEG[0], POS[1]]}).json()
        samples = metric_samples(client.get("/metrics").text)
    assert [p["abstained"] for p in answer["predictions"]] == [True, True, True]
    assert samples[("deepship_abstentions_total", ())] == 3


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prediction_log_has_the_prediction_record_plus_input_stats(text_package: Path, image_package: Path,
                                                               tmp_path: Path) -> None:
    log = tmp_path / "text.jsonl"
    with running(text_package, log_path=str(log)) as server, server.client() as client:
        answer = client.post("/v1/predict", json={"inputs": [POS[0], NEG[0]]}).json()
    records = read_log(log)  # the server has stopped: the writer has flushed everything
    assert [set(r) for r in records] == [RECORD_KEYS, RECORD_KEYS]
    assert [r["id"] for r in records] == [f"{answer['request_id']}:0", f"{answer['request_id']}:1"]
    assert [r["label"] for r in records] == [p["label"] for p in answer["predictions"]]
    tokens = Predictor.load(text_package).input_stats([POS[0]])[0]  # the monitor's signals, as export profiled them
    assert records[0]["input_stats"] == {"chars": len(POS[0]), "words": len(POS[0].split()), "truncated": False,
                                         "tokens": tokens["tokens"], "unk_share": tokens["unk_share"],
                                         "tokens_truncated": False}
    assert tokens["tokens"] == len(POS[0].split())  # toy words are whole tokens of the tiny vocabulary
    assert records[0]["model_version"] == answer["model_version"] and records[0]["latency_ms"] > 0

    image_log = tmp_path / "image.jsonl"
    with running(image_package, log_path=str(image_log), log_inputs=True) as server, server.client() as client:
        white, black = solid_png((255, 255, 255)), solid_png((0, 0, 0), size=30)
        assert client.post("/v1/predict", json={"images": [b64(white), b64(black)]}).status_code == 200
    stats = [r["input_stats"] for r in read_log(image_log)]
    assert stats == [{"width": 40, "height": 40, "bytes": len(white), "format": "PNG", "brightness": 1.0, "contrast": 0.0},
                     {"width": 30, "height": 30, "bytes": len(black), "format": "PNG", "brightness": 0.0, "contrast": 0.0}]
    assert [r["input"] for r in read_log(image_log)] == [b64(white), b64(black)]  # raw inputs only with log_inputs


def test_logged_texts_are_tokenized_once(text_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log's token signals come from the tokenization the model used, not from a second one."""
    from deepship.runtime.preprocess import TextPreprocessor

    with running(text_package, log_path=str(tmp_path / "log.jsonl")) as server:
        calls, real = [], TextPreprocessor.tokenize
        monkeypatch.setattr(TextPreprocessor, "tokenize", lambda self, texts: calls.append(len(texts)) or real(self, texts))
        with server.client() as client:
            assert client.post("/v1/predict", json={"inputs": POS[:2]}).status_code == 200
    assert calls == [2]  # one batch tokenization for prediction and log
    records = read_log(tmp_path / "log.jsonl")
    assert [r["input_stats"]["tokens"] > 0 for r in records] == [True, True]


def test_prediction_log_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    log = PredictionLog(path, max_bytes=2000, backups=2)
    for i in range(60):
        log.write([{"id": str(i), "label": "a", "pad": "x" * 100}])
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["p.jsonl", "p.jsonl.1", "p.jsonl.2"]  # older ones beyond `backups` are gone
    for name in files[1:]:
        assert 2000 <= (tmp_path / name).stat().st_size < 2200  # rotated right after passing the limit
    ids = [int(r["id"]) for name in ("p.jsonl.2", "p.jsonl.1", "p.jsonl") for r in read_log(tmp_path / name)]
    assert ids == list(range(60 - len(ids), 60))  # the newest records, in order, none lost in between


# ------------------------------------------------------------------------------ lifecycle
def test_shutdown_lets_in_flight_requests_finish(text_package: Path) -> None:
    with running(text_package, max_wait_ms=1000.0, max_batch_size=64) as server:
        outcome: dict[str, Any] = {}

        def post() -> None:
            with server.client() as client:
                outcome["response"] = client.post("/v1/predict", json={"inputs": [POS[0]]})

        thread = threading.Thread(target=post)
        thread.start()
        batcher = server.state.current.batcher
        for _ in range(2000):  # bounded: until the request sits in the 1 s batching window
            if batcher.in_flight:
                break
            time.sleep(0.005)
        assert batcher.in_flight == 1
        server.server.should_exit = True  # what SIGTERM does
        thread.join(timeout=60)
    assert outcome["response"].status_code == 200
    assert outcome["response"].json()["predictions"][0]["label"] == Predictor.load(text_package).predict([POS[0]])[0].label
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz", timeout=5.0)


def test_sighup_reloads_the_package_folder_and_sigterm_exits_cleanly(text_package: Path, tmp_path: Path) -> None:
    package = copy_package(text_package, tmp_path / "current")
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--package", str(package),
                                "--port", str(port), "--no-access-log"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: get_json(url + "/readyz").get("status") == "ready"), process.stderr
        old = get_json(url + "/v1/model")["model_version"]
        manifest = json.loads((package / "package.json").read_text())
        manifest["model_version"] = old + "-hup"
        staging = tmp_path / "staging"
        staging.mkdir()
        rewrite_manifest(staging, manifest)  # a re-export with the new version: the manifest hash still holds
        os.replace(staging / "package.json", package / "package.json")  # a deploy replaces files atomically
        process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: get_json(url + "/v1/model").get("model_version") == old + "-hup")
        assert get_json(url + "/v1/model")["previous_version"] == old
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = process.stderr.read()
    assert "Application shutdown complete" in log and "Traceback" not in log


def free_port() -> int:
    from deepship.bench.serve import free_port as pick

    return pick()


def get_json(url: str) -> dict[str, Any]:
    try:
        return httpx.get(url, timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return {}


def wait_until(condition: Any, attempts: int = 600) -> bool:
    for _ in range(attempts):  # bounded poll, 0.1 s apart
        if condition():
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------------------------- fuzz
# any code point, lone surrogates included (st.text leaves them out; json.dumps writes them as \\udXXXX)
CODE_POINTS = st.integers(0xD800, 0xDFFF) | st.integers(0, 0x10FFFF)  # surrogates are rare in the full range: add them
ANY_TEXT = st.text(max_size=30) | st.lists(CODE_POINTS, max_size=12).map(lambda cps: "".join(map(chr, cps)))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TEXT_BODIES = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["inputs", "images", "x"]), JSON_VALUES, max_size=2).map(
        lambda v: json.dumps(v).encode()),
    st.lists(st.text(max_size=300) | ANY_TEXT, max_size=10).map(lambda v: json.dumps({"inputs": v}).encode()),
    st.binary(max_size=300),
)
CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                 "multipart/form-data; boundary=b", "application/x-www-form-urlencoded", ""])


def assert_not_a_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"code", "message"}


@hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=TEXT_BODIES, content_type=CONTENT_TYPES)
def test_fuzzed_text_requests_never_get_a_500(text_server: Running, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    with text_server.client() as client:
        assert_not_a_server_error(client.post("/v1/predict", content=body, headers=headers))


IMAGE_ITEMS = st.one_of(st.binary(max_size=200).map(b64), st.text(max_size=40),
                        st.binary(max_size=100).map(lambda tail: b64(png_bytes()[:60] + tail)))


@hyp_settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(IMAGE_ITEMS, min_size=1, max_size=3), upload=st.booleans())
def test_fuzzed_image_requests_never_get_a_500(image_server: Running, items: list[str], upload: bool) -> None:
    with image_server.client() as client:
        if upload:
            files = [("images", (f"{i}.bin", x.encode(), "application/octet-stream")) for i, x in enumerate(items)]
            response = client.post("/v1/predict", files=files)
        else:
            response = client.post("/v1/predict", json={"images": items})
    assert_not_a_server_error(response)


# ------------------------------------------------------------------------------ cli, settings
def test_settings_reject_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_batch_sise: unknown key; allowed keys here: \[.*'max_batch_size'"):
        load_settings(None, ["max_batch_sise=8"])
    with pytest.raises(ConfigError, match="text_overflow"):
        load_settings(None, ["text_overflow=drop"])
    path = tmp_path / "serve.yaml"
    path.write_text("max_batch_size: 16\nlog_path: logs/p.jsonl\n")
    settings = load_settings(path, ["max_wait_ms=2.5"])
    assert (settings.max_batch_size, settings.log_path, settings.max_wait_ms) == (16, "logs/p.jsonl", 2.5)


def test_settings_files_are_read_like_configs(tmp_path: Path) -> None:
    """--settings shares --config's YAML reader: the same one-line errors with the file (and line) named."""
    with pytest.raises(ConfigError, match=rf"^--settings {re.escape(str(tmp_path))}: is a directory"):
        load_settings(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_items: 3\nmax_wait_ms: [1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))} line 3: not valid YAML"):
        load_settings(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- max_items: 3\n")
    with pytest.raises(ConfigError, match="expected a mapping of serve settings"):
        load_settings(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings(empty, ["max_wait_ms=3e-1"]).max_wait_ms == 0.3  # 3e-1: a float, unlike plain YAML 1.1


def test_serve_cli_refuses_a_bad_package_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert serve_main(["serve", "--package", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: no package.json; is this a deepship model package "
                                               "(deepship export)?")
    assert serve_main(["serve", "--package", str(tmp_path), "--set", "max_items=0"]) == 2
    assert "max_items" in capsys.readouterr().err


TORCH_FREE_CHECK = """
import asyncio, json, sys
import httpx
from deepship.serving import cli  # noqa: F401 - the CLI module is on the serving path too
from deepship.serving.app import create_app
app = create_app(sys.argv[1])
async def main():
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.post("/v1/predict", json={"inputs": ["a great film"]})).status_code
status = asyncio.run(main())
forbidden = json.loads(sys.argv[2])
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({"status": status, "loaded": loaded}))
"""


def test_serving_imports_no_torch(text_package: Path) -> None:
    # nor the training config schema: the serve settings share only its YAML and --set helpers
    forbidden = [*FORBIDDEN_IN_RUNTIME, "deepship.config"]
    result = subprocess.run([sys.executable, "-c", TORCH_FREE_CHECK, str(text_package), json.dumps(forbidden)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"status": 200, "loaded": []}
