"""The model registry: versions, aliases, events, the writer lock, verification on load, rollback, lineage, promotion."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FORBIDDEN_IN_RUNTIME, copy_package, read_json, rewrite_manifest
from deepship import cli
from deepship.errors import ConfigError, PackageError
from deepship.registry import ModelRef, RegistryBusy, open_registry, parse_ref
from deepship.registry.directory import DirectoryRegistry
from deepship.registry.history import alias_stack


# ------------------------------------------------------------------------------------- helpers
def fake_package(folder: Path, payload: bytes = b"onnx bytes", format_version: int = 1, **extra) -> Path:
    """A sealed package whose model.onnx is arbitrary bytes: enough for everything but loading the model."""
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(payload)
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    files = {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in ("model.onnx", "tokenizer/vocab.txt")}
    rewrite_manifest(folder, {"format_version": format_version, "task": "text_classification", "labels": ["neg", "pos"],
                              "files": files, "model_version": f"fake-{files['model.onnx'][:12]}",
                              "run": {"name": "fake", "dir": "/runs/fake"}, "config": {"train": {"lr": 0.1}},
                              "training_data": {"fingerprint": "fp-123", "num_samples": 7}, **extra})
    return folder


def run_cli(*argv: str) -> int:
    return cli.main(["registry", *argv])


def writable(path: Path) -> Path:
    """Stored versions are read-only; a test that tampers with one opens it up first (as an attacker could)."""
    for p in [path, *path.parents][:4]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return path


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return fake_package(tmp_path / "pkg")


@pytest.fixture
def reg(tmp_path: Path) -> DirectoryRegistry:
    return DirectoryRegistry(tmp_path / "registry")


# ------------------------------------------------------------------------------ refs and URIs
def test_parse_ref() -> None:
    assert parse_ref("sentiment") == ModelRef("sentiment")
    assert parse_ref("sentiment@production") == ModelRef("sentiment", alias="production")
    assert parse_ref("registry:sentiment:12") == ModelRef("sentiment", version=12)
    for bad in ("a@b:3", "a:0", "a:x", "a@3prod", "", "../etc", "a b"):
        with pytest.raises(ConfigError):
            parse_ref(bad)


def test_open_registry_by_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_registry(tmp_path / "r").root == tmp_path / "r"
    assert open_registry(f"file:{tmp_path}/r").root == tmp_path / "r"
    assert open_registry(f"file://{tmp_path}/r").root == tmp_path / "r"
    monkeypatch.setenv("DEEPSHIP_REGISTRY", str(tmp_path / "env"))
    assert open_registry().root == tmp_path / "env"
    with pytest.raises(ConfigError, match="unknown scheme"):
        open_registry("s3://bucket/registry")


# ------------------------------------------------------------------------ register and resolve
def test_register_resolve_round_trip_and_immutability(text_package: Path, tmp_path: Path) -> None:
    from deepship.runtime.predictor import Predictor

    source = copy_package(text_package, tmp_path / "source")
    reg = DirectoryRegistry(tmp_path / "registry")
    info = reg.register(source, "sentiment", alias="challenger")
    manifest = read_json(source / "package.json")
    assert (info.name, info.version, info.aliases) == ("sentiment", 1, ["challenger"])
    assert info.sha256 == manifest["manifest_sha256"]
    canonical = json.dumps(manifest["config"], sort_keys=True, separators=(",", ":")).encode()
    assert info.lineage["config_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert info.lineage["run_dir"] == manifest["run"]["dir"]
    assert info.lineage["data_fingerprint"] == manifest["training_data"]["fingerprint"] is not None
    stored = {p.relative_to(info.path).as_posix() for p in info.path.rglob("*") if p.is_file()}
    assert stored == {"package.json", "version.json", *manifest["files"]}
    for rel in manifest["files"]:
        assert (info.path / rel).read_bytes() == (source / rel).read_bytes()
        assert not (info.path / rel).stat().st_mode & 0o222  # read-only
    texts = ["a great wonderful film", "an awful boring movie"]
    expected = [p.probs for p in Predictor.load(source).predict(texts)]

    # the source changing afterwards does not reach the stored version
    shutil.rmtree(source)
    resolved = reg.resolve("sentiment@challenger")
    assert resolved.path == info.path and resolved.version == 1
    assert [p.probs for p in Predictor.load(resolved.path).predict(texts)] == expected


def test_version_numbers_are_never_reused(reg: DirectoryRegistry, pkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepship.registry import directory

    assert [reg.register(pkg, "m").version for _ in range(2)] == [1, 2]
    real_copy = shutil.copyfile
    calls = []

    def failing_copy(src, dst, *a, **k):
        calls.append(src)
        if len(calls) == 2:  # the disk fills halfway through the copy
            raise OSError(28, "No space left on device", str(dst))
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(directory.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError):
        reg.register(pkg, "m")
    monkeypatch.setattr(directory.shutil, "copyfile", real_copy)
    assert reg.register(pkg, "m").version == 4  # 3 was handed out to the failed register
    folder = reg.model_dir("m")
    assert sorted(p.name for p in (folder / "versions").iterdir()) == ["1", "2", "4"]
    assert list((folder / ".staging").iterdir()) == []
    assert [e["version"] for e in reg.events("m") if e["event"] == "register"] == [1, 2, 4]


def test_a_killed_register_leaves_no_version_and_its_staging_is_cleared(reg: DirectoryRegistry, pkg: Path) -> None:
    reg.register(pkg, "m")
    leftover = reg.model_dir("m") / ".staging" / "2.99999"
    (leftover / "tokenizer").mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    leftover.chmod(0o555)  # killed after it was made read-only
    assert reg.register(pkg, "m").version == 2
    assert not leftover.exists()


def test_register_refuses_a_bad_package_before_taking_a_number(reg: DirectoryRegistry, pkg: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    (pkg / "model.onnx").write_bytes(b"changed")
    assert run_cli("register", str(pkg), "--name", "m", "--registry", str(reg.root)) == 2
    assert str(pkg / "model.onnx") in capsys.readouterr().err
    assert reg.models() == []


# ------------------------------------------------------------------------------- verification
@pytest.mark.parametrize("target", ["tokenizer/vocab.txt", "model.onnx"])
def test_a_tampered_stored_file_fails_the_load(reg: DirectoryRegistry, pkg: Path, target: str,
                                               capsys: pytest.CaptureFixture) -> None:
    info = reg.register(pkg, "m", alias="production")
    writable(info.path / target).write_bytes(b"tampered")
    with pytest.raises(PackageError, match="sha256 does not match"):
        reg.resolve("m@production")
    assert run_cli("show", "m@production", "--registry", str(reg.root)) == 2
    err = capsys.readouterr().err
    assert str(info.path / target) in err and len(err.strip().splitlines()) == 1


def test_a_tampered_stored_manifest_fails_the_load(reg: DirectoryRegistry, pkg: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    info = reg.register(pkg, "m")
    manifest = read_json(info.path / "package.json")
    writable(info.path / "package.json")
    # resealed with a valid own hash (as a re-export would be): only the registered digest catches it
    rewrite_manifest(info.path, {**manifest, "labels": ["pos", "neg"]})
    assert run_cli("show", "m:1", "--registry", str(reg.root)) == 2
    assert str(info.path / "package.json") in capsys.readouterr().err
    # edited without resealing: the manifest's own hash catches it
    (info.path / "package.json").write_text(json.dumps({**manifest, "labels": ["x", "y"]}))
    assert run_cli("show", "m:1", "--registry", str(reg.root)) == 2
    assert str(info.path / "package.json") in capsys.readouterr().err
    # a stored manifest claiming a newer format than this install reads
    rewrite_manifest(info.path, {**manifest, "format_version": 99})
    assert run_cli("show", "m:1", "--registry", str(reg.root)) == 2
    assert "format_version 99" in capsys.readouterr().err


def test_writes_to_an_unknown_model_leave_nothing_behind(reg: DirectoryRegistry, pkg: Path) -> None:
    reg.register(pkg, "m")
    with pytest.raises(ConfigError, match="unknown model 'other'"):
        reg.set_alias("other", "production", 1)
    with pytest.raises(ConfigError, match="unknown model 'other'"):
        reg.log_event("other", {"event": "deploy", "version": 1})
    assert sorted(p.name for p in (reg.root / "models").iterdir()) == ["m"]


def test_an_extra_file_in_a_stored_version_fails_the_load(reg: DirectoryRegistry, pkg: Path) -> None:
    info = reg.register(pkg, "m")
    writable(info.path / "tokenizer")
    (info.path / "tokenizer" / "added.json").write_text("{}")
    with pytest.raises(PackageError, match="added.json: not part of the registered package"):
        reg.resolve("m")


def test_unknown_name_alias_or_version_exit_2(reg: DirectoryRegistry, pkg: Path, capsys: pytest.CaptureFixture) -> None:
    reg.register(pkg, "m", alias="production")
    for ref, words in [("nope@production", "unknown model 'nope'"), ("m@staging", "no alias 'staging'"),
                       ("m:7", "no such version")]:
        assert run_cli("show", ref, "--registry", str(reg.root)) == 2
        assert words in capsys.readouterr().err
    assert run_cli("alias", "m", "production", "9", "--registry", str(reg.root)) == 2
    assert reg.aliases("m") == {"production": 1}


def test_a_newer_package_format_exits_2(reg: DirectoryRegistry, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    newer = fake_package(tmp_path / "newer", format_version=99)
    assert run_cli("register", str(newer), "--name", "m", "--registry", str(reg.root)) == 2
    err = capsys.readouterr().err.strip()
    assert "format_version 99" in err and "upgrade deepship" in err and len(err.splitlines()) == 1
    assert reg.models() == []


# ----------------------------------------------------------------------------------- aliases
def test_set_alias_logs_from_and_to_and_skips_no_moves(reg: DirectoryRegistry, pkg: Path) -> None:
    for _ in range(3):
        reg.register(pkg, "m")
    reg.set_alias("m", "production", 1)
    reg.set_alias("m", "production", 3, reason="hotfix")
    reg.set_alias("m", "production", 3)  # unchanged: no event
    moves = [(e["from"], e["to"], e.get("reason")) for e in reg.events("m") if e["event"] == "alias"]
    assert moves == [(None, 1, None), (1, 3, "hotfix")]
    assert reg.aliases("m") == {"production": 3} and reg.alias_target("m", "staging") is None


KILL_DURING_REPLACE = """
import os, sys
from deepship import files
from deepship.registry.directory import DirectoryRegistry
reg = DirectoryRegistry(sys.argv[1])
files.os.replace = lambda *a: os._exit(9)  # the process dies after writing the temp file, before the rename
reg.set_alias("m", "production", 2)
"""


def test_a_crash_between_write_and_rename_leaves_the_old_aliases(reg: DirectoryRegistry, pkg: Path) -> None:
    reg.register(pkg, "m", alias="production")
    reg.register(pkg, "m")
    before = (reg.model_dir("m") / "aliases.json").read_text()
    result = subprocess.run([sys.executable, "-c", KILL_DURING_REPLACE, str(reg.root)], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert (reg.model_dir("m") / ".aliases.json.tmp").is_file()  # the new content got as far as the temp file
    assert (reg.model_dir("m") / "aliases.json").read_text() == before
    assert reg.aliases("m") == {"production": 1}
    reg.set_alias("m", "production", 2)  # the next writer is not confused by the leftover
    assert reg.aliases("m") == {"production": 2}


def test_a_torn_event_line_is_ignored_and_cut_by_the_next_writer(reg: DirectoryRegistry, pkg: Path) -> None:
    reg.register(pkg, "m")
    path = reg.model_dir("m") / "events.jsonl"
    with open(path, "a") as f:
        f.write('{"event": "alias", "se')  # a writer killed mid-line
    assert [e["seq"] for e in reg.events("m")] == [1]
    reg.log_event("m", {"event": "deploy", "version": 1, "host": "h", "port": 1, "pid": 2})
    assert [e["seq"] for e in reg.events("m")] == [1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())


# ------------------------------------------------------------------------------- concurrency
def hammer(root: str, package: str, worker: int, rounds: int) -> None:
    reg = open_registry(root)
    mine = None
    for i in range(rounds):
        if i % 2 == 0:
            mine = reg.register(package, "m", actor=f"worker{worker}").version
        else:
            reg.set_alias("m", f"w{worker}", mine, actor=f"worker{worker}")


def test_concurrent_writers_lose_nothing(reg: DirectoryRegistry, pkg: Path) -> None:
    workers, rounds = 4, 25
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=hammer, args=(str(reg.root), str(pkg), w, rounds)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers
    registers, moves = workers * ((rounds + 1) // 2), workers * (rounds // 2)
    versions = reg.versions("m")
    assert [v.version for v in versions] == list(range(1, registers + 1))
    for v in versions:
        reg.resolve(f"m:{v.version}")  # every one verifies
    events = reg.events("m")
    assert [e["seq"] for e in events] == list(range(1, registers + moves + 1))
    assert sorted(e["version"] for e in events if e["event"] == "register") == list(range(1, registers + 1))
    for w in range(workers):
        own = [e for e in events if e["actor"] == f"worker{w}"]
        mine = [e["version"] for e in own if e["event"] == "register"]
        assert [e["to"] for e in own if e["event"] == "alias"] == mine[:rounds // 2]  # each move to its latest
        assert reg.alias_target("m", f"w{w}") == mine[rounds // 2 - 1]
    assert read_json(reg.model_dir("m") / "model.json")["next_version"] == registers + 1


def hold_lock(root: str, ready, release) -> None:
    with DirectoryRegistry(root).lock("m"):
        ready.set()
        release.wait(30)


def test_a_held_lock_times_out_naming_the_holder(reg: DirectoryRegistry, pkg: Path) -> None:
    reg.register(pkg, "m")
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(str(reg.root), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RegistryBusy, match=f"held by pid {holder.pid} "):
            with reg.lock("m", timeout=0.2):
                pass
        assert RegistryBusy("x").exit_code == 1
    finally:
        release.set()
        holder.join(30)
    with reg.lock("m", timeout=5):  # free again
        with reg.lock("m"):  # re-entrant in the holding thread
            reg.set_alias("m", "production", 1)
    assert reg.aliases("m") == {"production": 1}


# ---------------------------------------------------------------------------------- rollback
def test_rollback_walks_back_the_alias_history(reg: DirectoryRegistry, pkg: Path, capsys: pytest.CaptureFixture) -> None:
    for _ in range(3):
        reg.register(pkg, "m")
    for version in (1, 2, 3):
        reg.set_alias("m", "production", version)
    root = str(reg.root)
    assert run_cli("rollback", "m", "production", "--registry", root) == 0
    assert reg.alias_target("m", "production") == 2
    assert run_cli("rollback", "m", "production", "--registry", root) == 0
    assert reg.alias_target("m", "production") == 1
    assert run_cli("rollback", "m", "production", "--registry", root) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    rollbacks = [(e["from"], e["to"]) for e in reg.events("m") if e["event"] == "rollback"]
    assert rollbacks == [(3, 2), (2, 1)]
    reg.set_alias("m", "production", 3)  # a new move after rollbacks: rolling back returns to 1
    assert run_cli("rollback", "m", "production", "--registry", root) == 0
    assert reg.alias_target("m", "production") == 1


def test_alias_stack_by_hand() -> None:
    events = [{"event": "alias", "alias": "p", "from": None, "to": 1}, {"event": "alias", "alias": "c", "from": None, "to": 5},
              {"event": "promote", "alias": "p", "from": 1, "to": 2}, {"event": "alias", "alias": "p", "from": 2, "to": 4},
              {"event": "rollback", "alias": "p", "from": 4, "to": 2}, {"event": "promote_refused", "alias": "p"}]
    assert alias_stack(events, "p") == [1, 2]
    assert alias_stack(events, "c") == [5]
    assert alias_stack([{"event": "alias", "alias": "p", "from": 7, "to": 8}], "p") == [7, 8]


# ----------------------------------------------------------------------------------- lineage
def test_lineage_chain(text_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reg = DirectoryRegistry(tmp_path / "registry")
    reg.register(text_package, "sentiment", alias="challenger")
    reg.set_alias("sentiment", "production", 1, event="promote")
    reg.log_event("sentiment", {"event": "deploy", "version": 1, "alias": "production", "host": "10.0.0.5",
                                "port": 8000, "pid": 4242})
    out = tmp_path / "lineage.json"
    assert run_cli("lineage", "sentiment@production", "--out", str(out), "--registry", str(reg.root)) == 0
    lineage = read_json(out)
    assert json.loads(capsys.readouterr().out) == lineage
    manifest = read_json(text_package / "package.json")
    assert lineage["data"]["fingerprint"] == manifest["training_data"]["fingerprint"] is not None
    assert lineage["training"]["config"] == manifest["config"]
    canonical = json.dumps(manifest["config"], sort_keys=True, separators=(",", ":")).encode()
    assert lineage["training"]["config_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert lineage["training"]["run_dir"] == manifest["run"]["dir"]
    assert lineage["package"]["sha256"] == manifest["manifest_sha256"]
    assert lineage["package"]["source"] == str(text_package.resolve())
    assert lineage["registry"]["version"] == 1 and lineage["registry"]["aliases_now"] == ["challenger", "production"]
    assert [(e["event"], e["alias"], e["from"], e["to"]) for e in lineage["alias_history"]] == [
        ("alias", "challenger", None, 1), ("promote", "production", None, 1)]
    (deploy,) = lineage["deployments"]
    assert (deploy["host"], deploy["port"], deploy["pid"]) == ("10.0.0.5", 8000, 4242) and deploy["ts"]


# --------------------------------------------------------------------------------- torch-free
TORCH_FREE_CHECK = """
import json, sys
from deepship import cli
from deepship.registry import open_registry
from deepship.runtime.predictor import Predictor
reg = open_registry(sys.argv[2])
reg.register(sys.argv[1], "m", alias="production")
Predictor.load(reg.resolve("m@production").path)
codes = [cli.main(["registry", *c.split(), "--registry", sys.argv[2]])
         for c in ("list", "show m@production", "alias m staging 1", "lineage m@production")]
forbidden = json.loads(sys.argv[3])
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_the_registry_imports_no_torch(text_package: Path, tmp_path: Path) -> None:
    forbidden = [*FORBIDDEN_IN_RUNTIME, "deepship.config", "deepship.evaluation"]
    result = subprocess.run([sys.executable, "-c", TORCH_FREE_CHECK, str(text_package), str(tmp_path / "r"),
                             json.dumps(forbidden)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"codes": [0, 0, 0, 0], "loaded": []}


# --------------------------------------------------------------------------------- promotion
def scramble_head(package: Path, out: Path) -> Path:
    """A copy whose classifier's two output rows are swapped: every prediction flips to the other class."""
    import onnx
    from onnx import numpy_helper

    copy = copy_package(package, out)
    model = onnx.load(str(copy / "model.onnx"))
    swapped = 0
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if "classifier" in init.name:  # the head's (labels, hidden) weight and (labels,) bias
            init.CopyFrom(numpy_helper.from_array(array[::-1].copy(), init.name))
            swapped += 1
    assert swapped == 2, swapped
    onnx.save(model, str(copy / "model.onnx"))
    manifest = read_json(copy / "package.json")
    manifest["files"]["model.onnx"] = hashlib.sha256((copy / "model.onnx").read_bytes()).hexdigest()
    rewrite_manifest(copy, manifest)
    return copy


def macro_f1_by_hand(package: Path, data: Path) -> float:
    import csv

    from sklearn.metrics import f1_score

    from deepship.runtime.predictor import Predictor

    with open(data) as f:
        rows = list(csv.DictReader(f))
    predicted = [p.label for p in Predictor.load(package).predict([r["text"] for r in rows])]
    return float(f1_score([r["label"] for r in rows], predicted, average="macro"))


@pytest.fixture(scope="module")
def two_packages(text_package: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(good, scrambled, labeled data) with macro-F1 clearly apart on the data."""
    from conftest import write_text_csv

    root = tmp_path_factory.mktemp("promote")
    return text_package, scramble_head(text_package, root / "scrambled"), write_text_csv(root / "test.csv", 30, seed=7)


def promote_cli(reg: DirectoryRegistry, data: Path | None, *extra: str) -> int:
    return run_cli("promote", "m", "--registry", str(reg.root), "--bootstrap", "200", "--latency-runs", "3",
                   *(["--data", str(data)] if data else []), *extra)


def test_promotion_refuses_a_worse_candidate(two_packages, reg: DirectoryRegistry, capsys: pytest.CaptureFixture) -> None:
    good, bad, data = two_packages
    good_f1, bad_f1 = macro_f1_by_hand(good, data), macro_f1_by_hand(bad, data)
    assert good_f1 > 0.9 and bad_f1 < 0.1
    reg.register(good, "m", alias="production")
    reg.register(bad, "m", alias="challenger")
    assert promote_cli(reg, data) == 4
    assert reg.aliases("m") == {"production": 1, "challenger": 2}
    event = reg.events("m")[-1]
    assert event["event"] == "promote_refused" and event["to"] == 2 and event["from"] == 1
    assert event["candidate"]["value"] == pytest.approx(bad_f1) and event["current"]["value"] == pytest.approx(good_f1)
    assert event["diff"] == pytest.approx(bad_f1 - good_f1) and event["diff_ci95"][0] < 0
    assert f"{bad_f1:.4f}" in event["reason"] and f"{good_f1:.4f}" in event["reason"]
    out = capsys.readouterr().out
    assert out.startswith("refused: ") and f"{good_f1:.4f}" in out
    reports = Path(event["reports"])
    assert reports.parent == reg.model_dir("m") / "promotions"
    assert read_json(reports / "current" / "report.json")["comparison"]["challenger_value"] == pytest.approx(bad_f1)


def test_promotion_accepts_a_better_candidate_and_force_is_logged(two_packages, reg: DirectoryRegistry) -> None:
    good, bad, data = two_packages
    reg.register(bad, "m", alias="production")
    reg.register(good, "m", alias="challenger")
    assert promote_cli(reg, data) == 0
    assert reg.aliases("m") == {"production": 2, "challenger": 2}
    event = reg.events("m")[-1]
    assert (event["event"], event["from"], event["to"], event.get("forced")) == ("promote", 1, 2, None)
    assert event["diff_ci95"][0] > 0

    reg.set_alias("m", "challenger", 1)  # the worse one again, forced through
    assert promote_cli(reg, data, "--force") == 0
    assert reg.alias_target("m", "production") == 1
    event = reg.events("m")[-1]
    assert (event["event"], event["to"], event["forced"]) == ("promote", 1, True)
    assert event["diff"] == pytest.approx(macro_f1_by_hand(bad, data) - macro_f1_by_hand(good, data))


def test_with_no_current_holder_only_the_gates_apply(two_packages, reg: DirectoryRegistry,
                                                     capsys: pytest.CaptureFixture) -> None:
    good, bad, data = two_packages
    reg.register(bad, "m", alias="challenger")
    assert promote_cli(reg, data, "--set", "objective.min=0.5") == 4
    assert "FAIL: macro_f1 >= 0.5" in capsys.readouterr().out
    assert reg.aliases("m") == {"challenger": 1}
    reg.register(good, "m", alias="challenger")
    assert promote_cli(reg, data, "--set", "objective.min=0.5") == 0
    assert reg.aliases("m") == {"challenger": 2, "production": 2}
    assert reg.events("m")[-1]["current"] is None


def test_promotion_without_data_or_candidate_says_what_to_pass(two_packages, reg: DirectoryRegistry,
                                                               capsys: pytest.CaptureFixture) -> None:
    good, _, data = two_packages
    reg.register(good, "m", alias="production")
    assert promote_cli(reg, data) == 2
    assert "no such alias" in capsys.readouterr().err
    reg.register(good, "m", alias="challenger")
    assert promote_cli(reg, None) == 2  # the tiny package's config records no data.test
    assert "pass --data" in capsys.readouterr().err
    assert [e["event"] for e in reg.events("m")].count("promote_refused") == 0
