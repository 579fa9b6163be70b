"""Training end to end on CPU: models learn, the run directory is complete and self-consistent."""

from __future__ import annotations

import csv
import json
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from deepship import cli
from deepship.callbacks import HISTORY_COLUMNS
from deepship.config import Config, ModelConfig, load_config
from deepship.errors import ConfigError
from deepship.models.backbones import build_backbone
from deepship.training import resolve_precision

from conftest import (
    RT_POLARITY,
    evaluate_by_hand,
    image_config,
    text_config,
    train_run,
    write_config,
    write_image_folder,
)


RUNS = ["tiny_image_run", "tiny_text_run"]


def read_history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("run, chance", [("tiny_image_run", 1 / 3), ("tiny_text_run", 1 / 2)])
def test_tiny_runs_learn_the_separable_problem(run: str, chance: float, request) -> None:
    metrics = read_metrics(request.getfixturevalue(run))
    assert metrics["val"]["accuracy"] >= chance + 0.45, metrics["val"]
    assert metrics["val"]["macro_f1"] >= 0.8
    history = read_history(request.getfixturevalue(run))
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])


@pytest.mark.parametrize("run", RUNS)
def test_run_directory_contents(run: str, request) -> None:
    run_dir: Path = request.getfixturevalue(run)
    for name in ("config.yaml", "labels.json", "best.ckpt", "last.ckpt", "history.csv", "metrics.json"):
        assert (run_dir / name).is_file(), name
    cfg = load_config(run_dir / "config.yaml")  # the resolved config is itself a valid config
    assert cfg.train.max_epochs == {"tiny_image_run": 10, "tiny_text_run": 6}[run] and cfg.run_dir == run_dir
    labels = json.loads((run_dir / "labels.json").read_text())
    assert labels == sorted(labels) and len(labels) >= 2
    history = read_history(run_dir)
    epochs = cfg.train.max_epochs
    assert list(history[0]) == HISTORY_COLUMNS and [int(r["epoch"]) for r in history] == list(range(1, epochs + 1))
    metrics = read_metrics(run_dir)
    assert set(metrics["val"]) == {"accuracy", "macro_f1", "loss"}
    assert metrics["epochs"] == epochs and 1 <= metrics["best_epoch"] <= epochs
    assert metrics["device"] == "cpu" and metrics["precision"] == "32-true"
    assert metrics["train_samples_per_s"] > 0 and metrics["num_samples"]["train"] > metrics["num_samples"]["val"]
    if cfg.task == "text_classification":
        assert (run_dir / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("run", RUNS)
def test_metrics_json_is_what_history_and_best_ckpt_reproduce(run: str, request) -> None:
    run_dir: Path = request.getfixturevalue(run)
    metrics = read_metrics(run_dir)
    best_row = read_history(run_dir)[metrics["best_epoch"] - 1]
    assert float(best_row["val_accuracy"]) == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
    assert float(best_row["val_macro_f1"]) == pytest.approx(metrics["val"]["macro_f1"], abs=1e-6)
    assert float(best_row["val_loss"]) == pytest.approx(metrics["val"]["loss"], abs=1e-6)
    # best is best: no epoch has a higher val macro-F1
    assert max(float(r["val_macro_f1"]) for r in read_history(run_dir)) == pytest.approx(metrics["val"]["macro_f1"])

    # Independent re-evaluation: rebuild the model from the run dir, run the val split by hand.
    by_hand = evaluate_by_hand(run_dir)
    assert by_hand["accuracy"] == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
    assert by_hand["macro_f1"] == pytest.approx(metrics["val"]["macro_f1"], abs=1e-6)
    assert by_hand["loss"] == pytest.approx(metrics["val"]["loss"], abs=1e-5)


def test_seeded_cpu_runs_reproduce(image_dir: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        raw = image_config(image_dir, tmp_path / "runs", run_name=name, max_epochs=2)
        runs.append(train_run(raw, tmp_path / f"{name}.yaml"))
    strip_time = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip_time(read_history(runs[0])) == strip_time(read_history(runs[1]))
    assert read_metrics(runs[0])["val"] == read_metrics(runs[1])["val"]
    a = torch.load(runs[0] / "best.ckpt", weights_only=True)["state_dict"]
    b = torch.load(runs[1] / "best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_dir_is_not_overwritten(tiny_image_run: Path, tmp_path: Path, capsys) -> None:
    cfg = load_config(tiny_image_run / "config.yaml")
    before = (tiny_image_run / "metrics.json").read_bytes()
    path = write_config(tmp_path / "again.yaml", cfg.model_dump(mode="json"))
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tiny_image_run / "metrics.json").read_bytes() == before


def test_unreachable_imagenet_weights_give_a_clear_error(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match=r"model.pretrained: cannot get ImageNet weights.*local state_dict file.*false"):
        build_backbone("image_classification", ModelConfig(pretrained=True), None, 3)


def test_pretrained_from_local_state_dict(tmp_path: Path) -> None:
    from torchvision.models import mobilenet_v2

    torch.manual_seed(123)
    source = mobilenet_v2()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model_cfg = ModelConfig.model_validate({"pretrained": str(tmp_path / "w.pth")})
    net = build_backbone("image_classification", model_cfg, None, 3).net.model
    assert torch.equal(net.features[0][0].weight, source.features[0][0].weight)
    assert net.classifier[1].out_features == 3  # new head for our classes


def test_pretrained_file_with_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Payload()))
    model_cfg = ModelConfig.model_validate({"pretrained": str(tmp_path / "evil.pth")})
    with pytest.raises(ConfigError, match="cannot load .* as a weights-only state_dict"):
        build_backbone("image_classification", model_cfg, None, 3)


def test_text_backbone_for_image_task_and_vice_versa() -> None:
    with pytest.raises(ConfigError, match="unknown image backbone 'bert-base-uncased'"):
        build_backbone("image_classification", ModelConfig(backbone="bert-base-uncased"), None, 2)
    with pytest.raises(ConfigError, match="'mobilenet_v2' is an image backbone but task is text_classification"):
        build_backbone("text_classification", ModelConfig(), None, 2)


def test_auto_precision(monkeypatch) -> None:
    cfg = Config.model_validate({"task": "image_classification", "data": {"train": "x"}},
                                context={"skip_path_checks": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(cfg) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision(cfg) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision(cfg) == "16-mixed"
    assert resolve_precision(cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "32-true"})})) \
        == "32-true"


@pytest.mark.gpu
def test_cuda_run_uses_mixed_precision(image_dir: Path, tmp_path: Path) -> None:
    run = train_run(image_config(image_dir, tmp_path / "runs", max_epochs=2), tmp_path / "c.yaml")
    metrics = read_metrics(run)
    assert metrics["device"].startswith("cuda") and metrics["precision"] in ("bf16-mixed", "16-mixed")


@pytest.mark.slow
@pytest.mark.skipif(not RT_POLARITY.is_dir(), reason=f"the rt-polarity data ({RT_POLARITY}) is absent")
def test_real_minilm_on_rt_polarity_beats_070(tmp_path: Path) -> None:
    from deepship.bench import rt_polarity_rows, write_csv_splits

    train, test = write_csv_splits(rt_polarity_rows(RT_POLARITY), tmp_path, {"train": 600, "test": 400})  # disjoint
    raw = {"task": "text_classification",
           "data": {"train": str(train), "test": str(test), "val_fraction": 0.15, "max_length": 64},
           "model": {"backbone": "all-MiniLM-L6-v2"},
           "train": {"max_epochs": 3, "batch_size": 16, "lr": 5e-5, "out_dir": str(tmp_path / "runs"),
                     "run_name": "rt"}}
    metrics = read_metrics(train_run(raw, tmp_path / "rt.yaml"))
    assert metrics["test"]["accuracy"] > 0.70, metrics


def test_text_net_builds_the_sdpa_mask_on_the_device_with_the_models_own_logits(tiny_bert_dir: Path) -> None:
    """TextNet hands transformers a 4-D mask (no host check for padding); the logits stay the model's own."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deepship.models.backbones import TextNet

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    assert model.config._attn_implementation == "sdpa"
    batch = AutoTokenizer.from_pretrained(tiny_bert_dir)(["short", "a much longer sentence with more words in it"],
                                                         padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # the first row is padded
    net = TextNet(model)
    assert net.sdpa_mask(batch["attention_mask"]).shape == (2, 1, 1, batch["input_ids"].shape[1])
    with torch.no_grad():
        ours, theirs = net(**batch), model(**batch).logits
        unmasked = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, theirs)
    assert not torch.equal(ours[0], unmasked[0])  # the mask is applied: the padded row differs


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert",
                                        "albert", "gpt2"])
def test_the_device_built_mask_is_used_only_where_it_gives_the_same_logits(model_type: str) -> None:
    """Encoders in BIDIRECTIONAL_ENCODERS get the 4-D mask with unchanged logits; a decoder (causal masks, which
    a 4-D mask would replace) keeps the 2-D one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from deepship.models.backbones import BIDIRECTIONAL_ENCODERS, TextNet

    sizes = {"distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
             "gpt2": dict(n_embd=32, n_layer=2, n_head=2, pad_token_id=0)}.get(
        model_type, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         embedding_size=32))
    config = AutoConfig.for_model(model_type, num_labels=3, vocab_size=100, max_position_embeddings=80, **sizes)
    config._attn_implementation = "sdpa"
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids, mask = torch.randint(5, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[0, 7:] = 0
    net = TextNet(model)
    assert (net.sdpa_mask(mask).ndim == 4) == (model_type in BIDIRECTIONAL_ENCODERS)
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=ids, attention_mask=mask),
                                   model(input_ids=ids, attention_mask=mask).logits)


def tiny_text_net(tiny_bert_dir: Path, attention_dropout: float):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deepship.models.backbones import TextNet

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir,
                                                               attention_probs_dropout_prob=attention_dropout)
    batch = AutoTokenizer.from_pretrained(tiny_bert_dir)(["short", "a much longer sentence with more words in it"],
                                                         padding=True, return_tensors="pt")
    return TextNet(model).train(), dict(batch)


def test_sdpa_backends_are_measured_on_the_real_model_and_the_fastest_kept(tiny_bert_dir: Path) -> None:
    from deepship.models.attention import fastest, measure_backends

    net, inputs = tiny_text_net(tiny_bert_dir, attention_dropout=0.0)
    rng = torch.get_rng_state()
    timings = measure_backends(net, inputs, ("flash", "efficient", "math"), repeats=2)
    # CPU has a flash kernel and a math one, and no memory-efficient kernel
    assert timings["flash"] > 0 and timings["math"] > 0 and timings["efficient"] is None
    assert fastest(timings) == min(("flash", "math"), key=timings.__getitem__)
    assert all(p.grad is None for p in net.parameters())  # measured through autograd.grad: no trace left
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws do not shift training's random stream

    # dropout inside attention: CPU's fused kernel cannot run it, so only math is usable
    net, inputs = tiny_text_net(tiny_bert_dir, attention_dropout=0.1)
    timings = measure_backends(net, inputs, ("flash", "math"), repeats=1)
    assert timings["flash"] is None and fastest(timings) == "math"


def test_training_records_the_measured_sdpa_backend(tiny_text_run: Path) -> None:
    chosen = json.loads((tiny_text_run / "metrics.json").read_text())["sdpa_backend"]
    # the tiny BERT has attention dropout: on CPU only the math kernel runs it
    assert chosen["setting"] == "auto" and chosen["chosen"] == "math"
    assert chosen["ms_per_step"]["flash"] is None and chosen["ms_per_step"]["math"] > 0
    state = torch.load(tiny_text_run / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    assert any(v.get("chosen") == "math" for v in state.values() if isinstance(v, dict))  # a resume keeps it


def test_a_named_sdpa_backend_that_cannot_run_is_a_config_error(text_csv: Path, tiny_bert_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from conftest import text_config

    raw = text_config(text_csv, tiny_bert_dir, tmp_path / "runs", max_epochs=1, sdpa_backend="efficient")
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: train.sdpa_backend: efficient cannot run this model's attention on cpu")


def test_a_saved_classifier_with_other_labels_gets_a_fresh_head_and_keeps_its_encoder(tiny_bert_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)  # a 2-label head
    cfg = Config.model_validate({"task": "text_classification", "data": {"train": "x.csv"},
                                 "model": {"backbone": str(tiny_bert_dir)}}, context={"skip_path_checks": True})
    built = build_backbone(cfg.task, cfg.model, cfg.data, 5).net.model
    assert built.classifier.out_features == 5
    torch.testing.assert_close(built.bert.encoder.state_dict(), saved.bert.encoder.state_dict())


def test_a_resume_on_other_hardware_measures_the_sdpa_backend_again(tiny_bert_dir: Path) -> None:
    """The stored choice is kept only where it was measured (device, precision, setting)."""
    from deepship.callbacks import AttentionBackend

    class FakeTrainer:
        world_size, is_global_zero, precision = 1, True, "32-true"
        strategy = type("S", (), {"root_device": torch.device("cpu")})()
        precision_plugin = type("P", (), {"forward_context": staticmethod(lambda: __import__("contextlib").nullcontext())})()

    net, inputs = tiny_text_net(tiny_bert_dir, attention_dropout=0.0)
    module = type("M", (), {"net": net, "device": torch.device("cpu")})()
    callback = AttentionBackend("auto", inputs)
    callback.load_state_dict({"chosen": "cudnn", "timings": {"cudnn": 1.0},
                              "measured_on": {"device": "cuda (NVIDIA H100)", "precision": "bf16-mixed", "setting": "auto"}})
    callback.on_train_start(FakeTrainer(), module)
    assert callback.chosen in ("flash", "math") and net.sdpa_backend == callback.chosen  # re-measured here
    assert callback.measured_on == {"device": "cpu", "precision": "32-true", "setting": "auto"}
    kept = AttentionBackend("auto", inputs)
    kept.load_state_dict(callback.state_dict())
    kept.timings = {"sentinel": 0.0}
    kept.on_train_start(FakeTrainer(), module)
    assert kept.timings == {"sentinel": 0.0}  # same place: the stored choice, no new measurement


def test_a_saved_model_whose_encoder_does_not_fit_its_config_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """ignore_mismatched_sizes is for the head only: a mismatched encoder weight is a config error, not random."""
    import json as json_module
    import shutil

    broken = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    config = json_module.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 48  # the saved feed-forward weights are 64 wide
    (broken / "config.json").write_text(json_module.dumps(config))
    cfg = Config.model_validate({"task": "text_classification", "data": {"train": "x.csv"},
                                 "model": {"backbone": str(broken)}}, context={"skip_path_checks": True})
    with pytest.raises(ConfigError, match=r"encoder weights of other shapes than its config \(bert\.encoder"):
        build_backbone(cfg.task, cfg.model, cfg.data, 2)


def test_train_prints_a_header_and_a_summary_ending_with_the_export_command(tmp_path: Path, capsys, caplog) -> None:
    images = write_image_folder(tmp_path / "images", n_per_class=8)  # 3 classes x 8: per class 2 val, 6 train
    config = write_config(tmp_path / "c.yaml", image_config(images, tmp_path / "runs", max_epochs=1, batch_size=4))
    assert cli.main(["train", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "tiny-image"
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[:2] == ["train: cpu, precision 32-true; samples: train 18, val 6", f"run directory: {run_dir}"]
    assert out[-1] == f"next: deepship export --run {run_dir} --out packages/tiny-image"
    assert out[-4].startswith("done: 1 epochs in ") and out[-4].endswith("best epoch 1")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert out[-3] == "val: " + " ".join(f"{k}={v:.4f}" for k, v in metrics["val"].items())
    assert out[-2] == "linear probe: not run (model.pretrained is false: there is no pretrained backbone to probe)"
    # Lightning's info lines reach the root logger under pytest (caplog); in a terminal they go to stderr
    shown = captured.out + captured.err + "\n".join(r.getMessage() for r in caplog.records)
    for chatter in ("GPU available", "TPU available", "Tip:", "Total params", "Restoring states"):
        assert chatter not in shown, chatter


def test_a_text_run_exports_offline_after_its_backbone_folder_is_gone(text_csv: Path, tiny_bert_dir: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:
    """load_run and export rebuild the tokenizer and the architecture from the run directory, never from
    model.backbone (which may be gone, or be a hub id that would be downloaded again)."""
    import socket

    from deepship.run import load_run

    backbone = Path(shutil.copytree(tiny_bert_dir, tmp_path / "backbone"))
    run = train_run(text_config(text_csv, backbone, tmp_path / "runs", max_epochs=1), tmp_path / "c.yaml")
    shutil.rmtree(backbone)

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = load_run(run)
    assert loaded.module.net.model.config.hidden_size == 32 and loaded.module.net.model.config.num_labels == 2
    assert loaded.backbone.tokenizer("Great film")["input_ids"] == [101, 2307, 2143, 102]  # the uncased WordPiece
    package = tmp_path / "package"
    assert cli.main(["export", "--run", str(run), "--out", str(package)]) == 0
    run_files = sorted(p.name for p in (run / "tokenizer").iterdir())
    assert sorted(p.name for p in (package / "tokenizer").iterdir()) == run_files
    for name in run_files:
        assert (package / "tokenizer" / name).read_bytes() == (run / "tokenizer" / name).read_bytes(), name
