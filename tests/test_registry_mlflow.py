"""The MLflow backend of the registry against a real SQLite-backed MLflow model registry (no mocks).

One database for the module (MLflow's migrations take seconds); each test uses its own model names.
Every check of what MLflow holds asks MLflow itself through its own client, not through deepship."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from deepship.errors import ConfigError, PackageError
from deepship.registry import open_registry
from deepship.registry.history import build_lineage, rollback
from deepship.registry.mlflow import MlflowRegistry, parse_mlflow_uri  # imports mlflow only when a registry opens
from test_registry import fake_package, hammer, macro_f1_by_hand, run_cli, two_packages, writable  # noqa: F401 (a fixture)

from conftest import FORBIDDEN_IN_RUNTIME, read_json

for module in ("mlflow", "sqlalchemy", "alembic"):
    pytest.importorskip(module, reason=f'the MLflow registry backend needs {module}: pip install "deepship[mlflow]"')


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A registry database in its own folder, used while the working directory is an empty folder, which
    must still be empty when the module is done; three packages that differ in their model bytes."""
    root = tmp_path_factory.mktemp("mlflow")
    cwd = root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # tests never reach out to the network
        uri = f"mlflow+sqlite:///{root / 'db' / 'reg.db'}"
        from mlflow import MlflowClient

        reg = open_registry(uri)
        tracking = f"sqlite:///{root / 'db' / 'reg.db'}"
        yield SimpleNamespace(uri=uri, reg=reg, cwd=cwd, store=root / "db" / "reg-packages",
                              pkgs=[fake_package(root / f"pkg{i}", payload=f"model {i}".encode()) for i in (1, 2, 3)],
                              mlflow=MlflowClient(tracking_uri=tracking, registry_uri=tracking))
        assert sorted(os.listdir(cwd)) == []


def mlflow_versions(env: SimpleNamespace, name: str) -> dict[int, object]:
    return {int(mv.version): mv for mv in env.mlflow.search_model_versions(f"name='{name}'")}


def mlflow_aliases(env: SimpleNamespace, name: str) -> dict[str, int]:
    return {a: int(v) for a, v in env.mlflow.get_registered_model(name).aliases.items()}


def sha256_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------ the mapping
def test_versions_and_aliases_are_mlflow_versions_and_aliases(env: SimpleNamespace) -> None:
    reg, (p1, p2, _) = env.reg, env.pkgs
    assert isinstance(reg, MlflowRegistry)
    first = reg.register(p1, "sentiment", alias="production")
    second = reg.register(p2, "sentiment", alias="challenger")
    assert (first.version, second.version) == (1, 2)

    assert mlflow_aliases(env, "sentiment") == {"production": 1, "challenger": 2}
    stored = mlflow_versions(env, "sentiment")
    assert sorted(stored) == [1, 2]
    for number, package in ((1, p1), (2, p2)):
        copy = env.store / "sentiment" / str(number)  # the documented layout
        assert stored[number].source == str(copy)
        assert stored[number].tags["deepship.sha256"] == read_json(package / "package.json")["manifest_sha256"]
        assert sha256_tree(copy) == sha256_tree(package)  # the package's files, nothing added
        assert not (copy / "model.onnx").stat().st_mode & 0o222 and not copy.stat().st_mode & 0o222  # read-only

    production = reg.resolve("sentiment@production")
    assert (production.version, production.path, production.aliases) == (1, env.store / "sentiment" / "1", ["production"])
    assert reg.resolve("sentiment").version == 2  # no alias, no version: the newest
    assert reg.aliases("sentiment") == {"production": 1, "challenger": 2}
    assert [v.version for v in reg.versions("sentiment")] == [1, 2]
    assert "sentiment" in reg.models()


def test_alias_moves_reach_mlflow_and_rollback_walks_the_event_log(env: SimpleNamespace,
                                                                 capsys: pytest.CaptureFixture) -> None:
    reg = env.reg
    for package in env.pkgs:
        reg.register(package, "rb")
    for version in (1, 2, 3):
        reg.set_alias("rb", "production", version)
        assert mlflow_aliases(env, "rb") == {"production": version}
    assert rollback(reg, "rb", "production") == (3, 2)
    assert mlflow_aliases(env, "rb") == {"production": 2}
    assert run_cli("rollback", "rb", "production", "--registry", env.uri) == 0
    assert mlflow_aliases(env, "rb") == {"production": 1}
    assert run_cli("rollback", "rb", "production", "--registry", env.uri) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    events = [json.loads(line) for line in (env.store / "rb" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["register"] * 3 + ["alias"] * 3 + ["rollback"] * 2
    assert [(e["from"], e["to"]) for e in events if e["event"] != "register"] == [
        (None, 1), (1, 2), (2, 3), (3, 2), (2, 1)]
    assert [e["seq"] for e in events] == list(range(1, 9))


def test_lineage_through_the_shared_code(env: SimpleNamespace) -> None:
    reg = env.reg
    reg.register(env.pkgs[0], "lin", alias="challenger", lineage={"trigger": "drift"})
    reg.set_alias("lin", "production", 1, event="promote")
    lineage = build_lineage(reg, reg.resolve("lin@production"))
    assert lineage["data"]["fingerprint"] == "fp-123"  # what fake_package writes
    assert lineage["training"]["run_dir"] == "/runs/fake"
    assert lineage["package"]["source"] == str(env.pkgs[0].resolve())
    assert lineage["registry"]["extra"] == {"trigger": "drift"}
    assert lineage["registry"]["aliases_now"] == ["challenger", "production"]
    assert [(e["event"], e["alias"]) for e in lineage["alias_history"]] == [("alias", "challenger"),
                                                                            ("promote", "production")]
    assert json.loads(mlflow_versions(env, "lin")[1].tags["deepship.lineage"])["trigger"] == "drift"


def test_promotion_through_the_shared_code_moves_the_mlflow_alias(env: SimpleNamespace,
                                                                  request: pytest.FixtureRequest) -> None:
    good, bad, data = request.getfixturevalue("two_packages")  # the directory backend's tests' packages
    env.reg.register(bad, "promo", alias="production")
    env.reg.register(good, "promo", alias="challenger")
    assert run_cli("promote", "promo", "--registry", env.uri, "--data", str(data), "--bootstrap", "200",
                   "--latency-runs", "3") == 0
    assert mlflow_aliases(env, "promo") == {"production": 2, "challenger": 2}
    event = env.reg.events("promo")[-1]
    assert (event["event"], event["alias"], event["from"], event["to"]) == ("promote", "production", 1, 2)
    assert event["diff"] == pytest.approx(macro_f1_by_hand(good, data) - macro_f1_by_hand(bad, data))
    assert Path(event["reports"]).parent == env.store / "promo" / "promotions"


# ---------------------------------------------------------------------------------- verification
def test_a_tampered_copy_fails_the_load_exit_2(env: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    info = env.reg.register(env.pkgs[0], "tampered", alias="production")
    writable(info.path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(PackageError, match="sha256 does not match"):
        env.reg.resolve("tampered@production")
    assert run_cli("show", "tampered@production", "--registry", env.uri) == 2
    err = capsys.readouterr().err
    assert str(info.path / "model.onnx") in err and len(err.strip().splitlines()) == 1


def test_unknown_model_alias_or_version_exit_2(env: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    env.reg.register(env.pkgs[0], "known", alias="production")
    for ref, words in [("nope@production", "unknown model 'nope'"), ("known@staging", "no alias 'staging'"),
                       ("known:7", "no such version")]:
        assert run_cli("show", ref, "--registry", env.uri) == 2
        assert words in capsys.readouterr().err
    assert run_cli("alias", "known", "production", "9", "--registry", env.uri) == 2
    assert mlflow_aliases(env, "known") == {"production": 1}


def test_an_alias_mlflow_reserves_is_refused_before_anything_is_written(env: SimpleNamespace) -> None:
    for reserved in ("v2", "Latest"):
        with pytest.raises(ConfigError, match="MLflow reserves"):
            env.reg.register(env.pkgs[0], "reserved", alias=reserved)
    assert env.mlflow.search_model_versions("name='reserved'") == []
    assert not (env.store / "reserved" / "1").exists()
    env.reg.register(env.pkgs[0], "reserved", alias="production")
    with pytest.raises(ConfigError, match="MLflow reserves"):
        env.reg.set_alias("reserved", "v1", 1)
    assert mlflow_aliases(env, "reserved") == {"production": 1}


def test_a_version_deleted_in_mlflow_never_gets_a_wrong_source(env: SimpleNamespace) -> None:
    """MLflow never reuses a number, even a deleted version's: the copy follows MLflow's numbering."""
    env.reg.register(env.pkgs[0], "gap")
    env.mlflow.create_model_version("gap", "/somewhere/else")  # version 2, made outside deepship ...
    env.mlflow.delete_model_version("gap", "2")  # ... and deleted there
    info = env.reg.register(env.pkgs[1], "gap")
    stored = mlflow_versions(env, "gap")
    assert info.version == max(stored) and stored[info.version].source == str(env.store / "gap" / str(info.version))
    assert sorted(p.name for p in (env.store / "gap").iterdir() if p.name.isdigit()) == ["1", str(info.version)]
    assert sha256_tree(env.reg.resolve(f"gap:{info.version}").path) == sha256_tree(env.pkgs[1])


# -------------------------------------------------------------------------------------- the CLI
def test_cli_list_and_show(env: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    env.reg.register(env.pkgs[0], "cli", alias="production")
    env.reg.register(env.pkgs[1], "cli", alias="challenger")
    capsys.readouterr()
    env.mlflow.create_registered_model("another tool's model")  # a name deepship would refuse: listed without it
    assert run_cli("list", "--registry", env.uri) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "cli\t2 versions\tchallenger=2 production=1" in listed
    assert not any("another tool" in line for line in listed)
    assert run_cli("show", "cli@production", "--registry", env.uri) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version"], shown["path"], shown["aliases"]) == (1, str(env.store / "cli" / "1"), ["production"])


CLI_IN_FRESH_PROCESS = """
import json, sys
from deepship import cli
codes = [cli.main(["registry", *c.split(), "--registry", sys.argv[1]]) for c in ("list", "show cli@production")]
forbidden = json.loads(sys.argv[2])
print(json.dumps({"codes": codes, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in forbidden)}))
"""


def test_a_fresh_process_writes_nothing_in_its_working_directory_and_loads_no_torch(env: SimpleNamespace,
                                                                                    tmp_path: Path) -> None:
    if "cli" not in env.reg.models():
        env.reg.register(env.pkgs[0], "cli", alias="production")
    here = tmp_path / "elsewhere"
    here.mkdir()
    run_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", CLI_IN_FRESH_PROCESS, env.uri, json.dumps(FORBIDDEN_IN_RUNTIME)],
                            cwd=here, env=run_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"codes": [0, 0], "loaded": []}
    assert sorted(os.listdir(here)) == []


# ------------------------------------------------------------------------------------------- URIs
def test_mlflow_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # a relative SQLite path is fixed against the working directory when opened; the store sits beside it
    assert parse_mlflow_uri("mlflow+sqlite:///sub/reg.db") == (f"sqlite:///{tmp_path}/sub/reg.db",
                                                               tmp_path / "sub" / "reg-packages")
    assert parse_mlflow_uri("mlflow+sqlite:////abs/r.db?store=/mnt/m") == ("sqlite:////abs/r.db", Path("/mnt/m"))
    assert parse_mlflow_uri("mlflow+https://mlflow.example:5000/base?store=/mnt/models") == (
        "https://mlflow.example:5000/base", Path("/mnt/models"))
    with pytest.raises(ConfigError, match=r"\?store=/mnt/models"):
        open_registry("mlflow+http://mlflow.example:5000")
    with pytest.raises(ConfigError, match="unsupported MLflow URI"):
        open_registry("mlflow+postgresql://db/registry")
    for no_file in ("mlflow+sqlite:///", "mlflow+sqlite://", "mlflow+sqlite://reg.db", "mlflow+sqlite:///:memory:"):
        with pytest.raises(ConfigError, match="name a database file"):
            open_registry(no_file)
    assert sorted(os.listdir(tmp_path)) == []


# ------------------------------------------------------------------------------------ concurrency
@pytest.mark.slow  # four fresh interpreters each import MLflow: 20-40 s on 2 busy cores
def test_concurrent_writers_get_distinct_numbers_and_matching_sources(env: SimpleNamespace) -> None:
    """The directory backend's writers (register, then move an own alias, in turn) on one MLflow model."""
    import multiprocessing

    workers, rounds = 4, 4
    ctx = multiprocessing.get_context("spawn")  # a fresh MLflow client per process: no database handle crosses a fork
    procs = [ctx.Process(target=hammer, args=(env.uri, str(env.pkgs[w % 3]), w, rounds)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * workers
    registers, moves = workers * rounds // 2, workers * rounds // 2
    stored = mlflow_versions(env, "m")
    assert sorted(stored) == list(range(1, registers + 1))
    events = env.reg.events("m")
    assert [e["seq"] for e in events] == list(range(1, registers + moves + 1))
    for number, mv in stored.items():
        assert mv.source == str(env.store / "m" / str(number))
        worker = next(e["actor"] for e in events if e["event"] == "register" and e["version"] == number)
        assert sha256_tree(Path(mv.source)) == sha256_tree(env.pkgs[int(worker.removeprefix("worker")) % 3])
    for w in range(workers):
        own = [e["version"] for e in events if e["event"] == "register" and e["actor"] == f"worker{w}"]
        assert mlflow_aliases(env, "m")[f"w{w}"] == own[-1]


def test_without_the_sql_store_packages_one_line_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as on an install of mlflow-skinny alone
    monkeypatch.setitem(sys.modules, "alembic", None)
    assert run_cli("list", "--registry", f"mlflow+sqlite:///{tmp_path}/reg.db") == 2
    assert capsys.readouterr().err.strip() == ('error: the MLflow registry backend needs sqlalchemy, alembic: '
                                               'pip install "deepship[mlflow]"')
    assert sorted(os.listdir(tmp_path)) == []
