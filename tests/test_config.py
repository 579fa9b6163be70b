"""Config loading: defaults, overrides, and one clear exit-2 line for every kind of mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepship import cli
from deepship.config import Config, apply_overrides, load_config
from deepship.errors import ConfigError

from conftest import write_config, write_text_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(tmp_path: Path) -> dict:
    csv_path = write_text_csv(tmp_path / "train.csv", n_per_class=5)
    return {
        "task": "text_classification",
        "data": {"train": str(csv_path)},
        "model": {"backbone": "all-MiniLM-L6-v2"},
        "train": {"out_dir": str(tmp_path / "runs"), "run_name": "r"},
    }


def test_defaults_and_types(base: dict, tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", base))
    assert cfg.data.val_fraction == 0.1 and cfg.data.pad_to_multiple_of == 16
    assert cfg.train.lr == 1e-4 and cfg.train.precision == "auto" and cfg.model.pretrained is True
    assert cfg.run_dir == tmp_path / "runs" / "r"


def test_set_overrides_parse_yaml_scalars(base: dict, tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", base),
                      ["train.lr=3e-4", "train.max_epochs=7", "data.num_workers=null", "model.pretrained=false"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_epochs == 7
    assert cfg.data.num_workers is None and cfg.model.pretrained is False


def test_overrides_create_nested_keys() -> None:
    raw: dict = {}
    apply_overrides(raw, ["a.b.c=1", "a.d=x"])
    assert raw == {"a": {"b": {"c": 1}, "d": "x"}}


BAD_CASES = [
    # (id, mutation of the raw config or --set list, text the error must contain)
    ("unknown-key", {"train": {"lrr": 0.1}}, "train.lrr: unknown key"),
    ("unknown-section", {"optim": {"lr": 0.1}}, "optim: unknown key"),
    ("wrong-type", {"train": {"batch_size": "many"}}, "train.batch_size"),
    ("float-for-int", {"train": {"max_epochs": 2.5}}, "train.max_epochs"),
    ("negative-lr", {"train": {"lr": -1.0}}, "train.lr: Input should be greater than 0"),
    ("val-fraction-high", {"data": {"val_fraction": 1.5}}, "data.val_fraction: Input should be less than 1"),
    ("val-fraction-zero", {"data": {"val_fraction": 0.0}}, "data.val_fraction: Input should be greater than 0"),
    ("missing-train-file", {"data": {"train": "nope/missing.csv"}}, "data.train[0]: 'nope/missing.csv' does not exist"),
    ("missing-val-file", {"data": {"val": "missing-val.csv"}}, "data.val[0]: 'missing-val.csv' does not exist"),
    ("bad-task", {"task": "regression"}, "task: Input should be 'text_classification' or 'image_classification'"),
    ("bad-precision", {"train": {"precision": "fp8"}}, "train.precision"),
    ("bad-run-name", {"train": {"run_name": "../escape"}}, "train.run_name: '../escape' is not a plain directory name"),
    ("unknown-demo", {"data": {"train": "demo:nothing/train.csv"}}, "unknown demo dataset 'nothing'"),
    ("unknown-source-key", {"data": {"train": [{"path": "x", "colum": "t"}]}},
     "data.train[0].colum: unknown key; allowed keys here: ['label_column', 'path'"),
    ("bad-max-bad-fraction", {"data": {"max_bad_fraction": 2}}, "data.max_bad_fraction"),
    ("missing-weights", {"model": {"pretrained": "weights.pth"}}, "model.pretrained: weights file 'weights.pth' not found"),
]


def _merge(raw: dict, patch: dict) -> dict:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            _merge(raw[key], value)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("case_id,patch,expected", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_exits_2_naming_the_key(case_id, patch, expected, base, tmp_path, capsys) -> None:
    path = write_config(tmp_path / "c.yaml", _merge(base, patch))
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "runs").exists()  # failed before anything was built or written


def test_missing_required_keys(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "c.yaml", {"data": {}})
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "task: required key is missing" in err and "data.train: required key is missing" in err


@pytest.mark.parametrize("content,expected", [("task: [unclosed", "not valid YAML"),
                                              ("- a\n- b\n", "expected a mapping")])
def test_unreadable_yaml(tmp_path: Path, capsys, content: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert cli.main(["train", "--config", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_bad_set_syntax_and_missing_config(base: dict, tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "c.yaml", base)
    assert cli.main(["train", "--config", str(path), "--set", "train.lr"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_set_override_is_validated(base: dict, tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "c.yaml", base)
    assert cli.main(["train", "--config", str(path), "--set", "train.batch_size=0"]) == 2
    assert "train.batch_size: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_single_class_data_exits_2(tmp_path: Path, capsys) -> None:
    csv_path = tmp_path / "one.csv"
    csv_path.write_text("text,label\nhello,a\nworld,a\nagain,a\n")
    raw = {"task": "text_classification", "data": {"train": str(csv_path)},
           "model": {"backbone": "all-MiniLM-L6-v2"}, "train": {"out_dir": str(tmp_path / "runs")}}
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert "a classifier needs at least 2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_shipped_configs_are_valid() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "sweep" in raw:
            continue  # sweep configs (a base config plus sweep:) are checked in tests/test_sweep.py
        # The GPU starting points name the user's data, which is not here; everything else must hold.
        cfg = Config.model_validate(raw, context={"skip_path_checks": True})
        assert cfg.task in ("text_classification", "image_classification"), path


def test_text_quickstart_config_reads_its_generated_data() -> None:
    from deepship.data.split import load_splits

    splits = load_splits(load_config(ROOT / "configs" / "quickstart_text.yaml"))
    assert splits.classes == ["cooking", "sports", "technology", "weather"]
    assert len(splits.train) + len(splits.val) == 4 * 160 and len(splits.test) == 4 * 40
    assert len(splits.val) == pytest.approx(0.15 * 640, abs=4)  # val_fraction 0.15, stratified per class


def test_script_wrapper_exit_code(base: dict, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", _merge(base, {"train": {"lr": -1}}))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_data_report_refuses_a_bad_config_in_one_line(base: dict, tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "c.yaml", _merge(base, {"data": {"val_fraction": 2}}))
    assert cli.main(["data-report", "--config", str(path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "data.val_fraction" in err[0], err
    assert not (tmp_path / "report").exists() and not (tmp_path / "runs").exists()


def test_fsdp_with_gradient_clipping_is_refused_at_load_time(tmp_path: Path) -> None:
    """Lightning's FSDP precision plugin raises at the first step when asked to clip: say so before training."""
    from pydantic import ValidationError

    base = {"task": "image_classification", "data": {"train": "x"}, "model": {"pretrained": False}}
    with pytest.raises(ValidationError, match="strategy fsdp cannot clip gradients through Lightning"):
        Config.model_validate({**base, "train": {"strategy": "fsdp"}}, context={"skip_path_checks": True})
    ok = Config.model_validate({**base, "train": {"strategy": "fsdp", "grad_clip": None}},
                               context={"skip_path_checks": True})
    assert ok.train.strategy == "fsdp" and ok.train.grad_clip is None


# --set: several KEY=VALUE items after one flag (as Hydra / LightningCLI users type them) or the flag repeated
SET_COMMANDS = [["train", "--config", "c.yaml"], ["data-report", "--config", "c.yaml"],
                ["evaluate", "--package", "p", "--data", "d.csv", "--out", "o"],
                ["monitor", "--package", "p", "--current", "log.jsonl", "--out", "o"], ["serve", "--package", "p"],
                ["sweep", "--config", "s.yaml"], ["learning-curve", "--config", "c.yaml"],
                ["registry", "promote", "m"], ["retrain", "--champion", "registry:m@production", "--log", "l.jsonl",
                                               "--labels", "y.csv", "--out", "w"]]


@pytest.mark.parametrize("command", SET_COMMANDS, ids=lambda c: c[0])
def test_set_takes_several_items_or_repeats(command: list[str]) -> None:
    items = ["a.b=1", "data.train=my file=v2.csv", "c=x y"]  # values may hold spaces and '='
    parser = cli.build_parser()
    one_flag = parser.parse_args([*command, "--set", *items])
    repeated = parser.parse_args([*command, "--set", items[0], "--set", items[1], "--set", items[2]])
    mixed = parser.parse_args([*command, "--set", items[0], items[1], "--set", items[2]])
    assert one_flag.set == repeated.set == mixed.set == items
    assert parser.parse_args(command).set == []


def test_set_items_stop_at_the_next_option(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["data-report", "--config", "c.yaml", "--set", "a=1", "b=2", "--out", "r"])
    assert (args.set, args.out, args.config) == (["a=1", "b=2"], "r", "c.yaml")


def test_several_set_items_apply_in_order(base: dict, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", base)
    cfg = load_config(path, ["train.lr=3e-4", "train.batch_size=8", "data.text_column=my col=x", "train.lr=1e-3"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.data.text_column) == (1e-3, 8, "my col=x")


@pytest.mark.parametrize("command", [["train"], ["data-report"]])
def test_a_set_item_without_equals_is_one_line_naming_it(command: list[str], base: dict, tmp_path: Path,
                                                         capsys) -> None:
    path = write_config(tmp_path / "c.yaml", base)
    assert cli.main([*command, "--config", str(path), "--set", "train.lr=3e-4", "oops"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --set 'oops': expected key=value (a dotted key, '=', then a YAML value)\n"
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_serve_set_item_without_equals_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    assert cli.main(["serve", "--package", str(tmp_path), "--set", "max_items=3", "oops"]) == 2
    assert capsys.readouterr().err == "error: --set 'oops': expected key=value (a dotted key, '=', then a YAML value)\n"


def test_section_overrides_name_a_malformed_item() -> None:
    from deepship.config import ObjectiveConfig, validate_section

    with pytest.raises(ConfigError, match=r"^--set 'oops': expected key=value"):
        validate_section(ObjectiveConfig, "objective", {}, ["objective.min=0.9", "oops"], "evaluate", "min=0.9")
    got = validate_section(ObjectiveConfig, "objective", {}, ["objective.min=0.9", "objective.metric=accuracy"],
                           "evaluate", "min=0.9")
    assert (got.min, got.metric) == (0.9, "accuracy")
