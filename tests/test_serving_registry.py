"""Serving a registry alias: `serve --model registry:NAME@ALIAS` resolves the alias at startup, follows its moves
through the reload path (warm-up first, old version kept), logs deploy events, and keeps serving when the alias
moves to a version that does not load.

The server runs as a child process (`scripts/serve.py`), as in production: its pid and port are in the events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from deepship.cli import main as serve_main
from deepship.registry import open_registry
from deepship.runtime.predictor import Predictor

from conftest import FORBIDDEN_IN_RUNTIME
from test_serving import POS, free_port, get_json, metric_samples, relabelled_package, wait_until

REPO = Path(__file__).resolve().parents[1]
NAME = "topics"


@pytest.fixture
def registry(text_package: Path, tmp_path: Path) -> Path:
    """A registry with two versions of one tiny text model, told apart by their labels; production -> 1."""
    root = tmp_path / "registry"
    reg = open_registry(root)
    reg.register(text_package, NAME, alias="production")
    reg.register(relabelled_package(text_package, tmp_path / "v2", "v2"), NAME)
    return root


@pytest.fixture
def served(registry: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`serve --model registry:topics@production` reading the alias every 0.2 s, with a prediction log."""
    port = free_port()
    log = tmp_path / "preds.jsonl"
    command = [sys.executable, str(REPO / "scripts" / "serve.py"), "--model", f"registry:{NAME}@production",
               "--registry", str(registry), "--port", str(port), "--watch-interval", "0.2", "--log", str(log),
               "--no-access-log"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: get_json(url + "/readyz").get("status") == "ready"), "the server did not start"
        yield {"url": url, "port": port, "process": process, "log": log, "registry": open_registry(registry)}
    finally:
        process.terminate()
        process.wait(timeout=60)


def served_registry_version(url: str) -> Any:
    return get_json(url + "/v1/model").get("registry", {}).get("registry_version")


def post_until_stopped(url: str, stop: threading.Event, statuses: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=30.0) as client:
        while not stop.is_set():
            statuses.append(client.post("/v1/predict", json={"inputs": [POS[0]]}).status_code)


def test_alias_moves_are_deployed_with_events_and_every_answer_names_its_version(served: dict[str, Any],
                                                                                 text_package: Path) -> None:
    url, reg = served["url"], served["registry"]
    v1 = Predictor.load(text_package).model_version
    model = get_json(url + "/v1/model")
    manifest = json.loads((text_package / "package.json").read_text())  # what the registered package says
    assert model["model_version"] == v1
    assert model["registry"] == {
        "name": NAME, "version": 1, "alias": "production", "registry_version": f"{NAME}:1",
        "lineage": {"data_fingerprint": manifest["training_data"]["fingerprint"], "run_dir": manifest["run"]["dir"],
                    "package_sha256": manifest["manifest_sha256"], "registered_at": reg.resolve(f"{NAME}:1").created},
        "ref": f"{NAME}@production", "alias_target": 1, "refused": None, "previous_registry_version": None}
    assert manifest["training_data"]["fingerprint"] and manifest["run"]["dir"]  # not a None == None match

    stop, statuses = threading.Event(), []
    client = threading.Thread(target=post_until_stopped, args=(url, stop, statuses))
    client.start()
    try:
        reg.set_alias(NAME, "production", 2)
        assert wait_until(lambda: served_registry_version(url) == f"{NAME}:2")
        answer = httpx.post(url + "/v1/predict", json={"inputs": [POS[0]]}).json()
        reg.set_alias(NAME, "production", 1)  # back to the version still loaded as previous: a rollback
        assert wait_until(lambda: served_registry_version(url) == f"{NAME}:1")
    finally:
        stop.set()
        client.join(timeout=60)
    assert statuses and set(statuses) == {200}  # nobody saw the swaps
    assert answer["model_version"] == f"{v1}-v2" and answer["registry_version"] == f"{NAME}:2"
    assert answer["predictions"][0]["label"].endswith("-v2")
    samples = metric_samples(httpx.get(url + "/metrics").text)
    assert samples[("deepship_reloads_total", (("result", "reloaded"),))] == 1
    assert samples[("deepship_reloads_total", (("result", "rolled_back"),))] == 1

    where = {"alias": "production", "host": "127.0.0.1", "port": served["port"], "pid": served["process"].pid}
    deploys = [e for e in reg.events(NAME) if e["event"] == "deploy"]
    assert [{k: e.get(k) for k in ("version", "from", *where)} for e in deploys] == [
        {"version": 1, "from": None, **where}, {"version": 2, "from": 1, **where}, {"version": 1, "from": 2, **where}]

    served["process"].terminate()
    served["process"].wait(timeout=60)  # flushes the prediction log
    records = [json.loads(line) for line in served["log"].read_text().splitlines()]
    pairs = {(r["registry_version"], r["model_version"], r["label"].endswith("-v2")) for r in records}
    assert pairs == {(f"{NAME}:1", v1, False), (f"{NAME}:2", f"{v1}-v2", True)}  # each answer from the one it names


def test_a_tampered_version_is_refused_once_and_the_old_one_keeps_serving(served: dict[str, Any],
                                                                          text_package: Path, tmp_path: Path) -> None:
    url, reg = served["url"], served["registry"]
    reg.register(relabelled_package(text_package, tmp_path / "v3", "v3"), NAME)
    model_file = reg.resolve(f"{NAME}:3").path / "model.onnx"
    os.chmod(model_file, 0o644)  # stored versions are read-only; someone changed it anyway
    model_file.write_bytes(b"tampered")
    reg.set_alias(NAME, "production", 3)
    assert wait_until(lambda: get_json(url + "/v1/model").get("registry", {}).get("refused"))
    model = get_json(url + "/v1/model")
    assert model["model_version"] == Predictor.load(text_package).model_version
    assert (model["registry"]["registry_version"], model["registry"]["alias_target"]) == (f"{NAME}:1", 3)
    assert model["registry"]["refused"]["version"] == 3
    assert "model.onnx: sha256 does not match package.json" in model["registry"]["refused"]["reason"]
    answer = httpx.post(url + "/v1/predict", json={"inputs": [POS[0]]}).json()
    assert answer["registry_version"] == f"{NAME}:1"

    wait_until(lambda: False, attempts=10)  # a second of polls that see the same broken target
    reg.set_alias(NAME, "production", 2)  # the alias moves on: the next good version is deployed
    assert wait_until(lambda: served_registry_version(url) == f"{NAME}:2")
    assert get_json(url + "/v1/model")["registry"]["refused"] is None
    kinds = [(e["event"], e.get("version")) for e in reg.events(NAME) if e["event"].startswith("deploy")]
    assert kinds == [("deploy", 1), ("deploy_failed", 3), ("deploy", 2)]  # the broken one was tried once
    served["process"].terminate()
    assert served["process"].wait(timeout=60) is not None
    stderr = served["process"].stderr.read()
    v1 = Predictor.load(text_package).model_version
    assert f"{NAME}@production moved to version 3, which failed to load (" in stderr and "Traceback" not in stderr
    assert f"); still serving {NAME}:1 ({v1})" in stderr


@pytest.mark.parametrize("model, fragment", [
    (f"registry:{NAME}@staging", f"{NAME}@staging: {NAME} has no alias 'staging' in {{root}}"),
    (f"registry:{NAME}:7", f"{NAME}:7: no such version in registry {{root}}"),
    (f"registry:{NAME}@1x@y", "alias '1x@y': use letters"),
    (f"{NAME}@production", f"--model {NAME}@production: expected registry:NAME@ALIAS, e.g. registry:topics@production "
                           "(for a package folder use --package)"),
])
def test_a_bad_reference_stops_the_server_with_one_line(registry: Path, model: str, fragment: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    assert serve_main(["serve", "--model", model, "--registry", str(registry)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and fragment.format(root=registry) in line


def test_package_and_model_are_exclusive_and_registry_needs_model(registry: Path, text_package: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        serve_main(["serve", "--package", str(text_package), "--model", f"registry:{NAME}@production"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert serve_main(["serve", "--package", str(text_package), "--registry", str(registry)]) == 2
    assert capsys.readouterr().err.strip() == ("error: --registry goes with --model registry:NAME@ALIAS, "
                                               "not with --package")


TORCH_FREE_CHECK = """
import asyncio, json, sys
import httpx
from deepship.serving.alias import parse_model_option
from deepship.serving.app import create_app
app = create_app(parse_model_option(sys.argv[1], sys.argv[2]))
async def main():
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.post("/v1/predict", json={"inputs": ["a great film"]})).json()["registry_version"]
answered_by = asyncio.run(main())
forbidden = json.loads(sys.argv[3])
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({"answered_by": answered_by, "loaded": loaded}))
"""


def test_serving_from_a_registry_imports_no_torch(registry: Path) -> None:
    result = subprocess.run([sys.executable, "-c", TORCH_FREE_CHECK, f"registry:{NAME}@production", str(registry),
                             json.dumps([*FORBIDDEN_IN_RUNTIME, "deepship.config"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"answered_by": f"{NAME}:1", "loaded": []}


def test_the_alias_bench_times_each_move_from_the_registry_log() -> None:
    from deepship.bench.serve_alias import deploy_timings

    events = [{"event": "alias", "alias": "production", "from": None, "to": 1, "ts": "2026-01-01T00:00:00+00:00"},
              {"event": "deploy", "version": 1, "load_seconds": 1.5, "ts": "2026-01-01T00:00:02+00:00"},
              {"event": "alias", "alias": "challenger", "from": None, "to": 2, "ts": "2026-01-01T00:00:03+00:00"},
              {"event": "alias", "alias": "production", "from": 1, "to": 2, "ts": "2026-01-01T00:00:10+00:00"},
              {"event": "deploy_failed", "version": 2, "ts": "2026-01-01T00:00:11+00:00"},
              {"event": "alias", "alias": "production", "from": 2, "to": 3, "ts": "2026-01-01T00:00:20.250000+00:00"},
              {"event": "deploy", "version": 3, "load_seconds": 2.0, "ts": "2026-01-01T00:00:23.500000+00:00"}]
    assert deploy_timings(events) == {1: {"seconds_to_deploy_event": 2.0, "load_seconds": 1.5},
                                      3: {"seconds_to_deploy_event": 3.25, "load_seconds": 2.0}}
