"""Fine-tuning mechanisms, each proven by its effect on weights, optimizer or loss (CPU, tiny models)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.modules.batchnorm import _BatchNorm

from deepship import cli
from deepship.config import Config, load_config
from deepship.data.datamodule import ClassificationData
from deepship.data.split import load_splits
from deepship.models.backbones import build_backbone
from deepship.models.classifier import BatchMixer
from deepship.models.finetuning import frozen_layer_count, layerwise_param_groups, lr_factor
from deepship.run import build_module, loss_settings
from deepship.runtime.preprocess import TextPreprocessor, TextSpec

from conftest import evaluate_by_hand, image_config, text_config, write_config


class Recorder(Callback):
    """Snapshots at every train epoch start/end: weights, requires_grad per layer, optimizer groups."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}
        self.trainable_layers: dict[int, list[bool]] = {}
        self.bn_training: dict[int, list[bool]] = {}
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.final: dict[str, Any] = {}

    @staticmethod
    def weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.net.state_dict().items()}

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        self.start[epoch] = self.weights(module)
        self.trainable_layers[epoch] = [all(p.requires_grad for p in layer.parameters()) for layer in module.layers]
        self.bn_training[epoch] = [m.training for layer in module.layers for m in layer.modules()
                                   if isinstance(m, _BatchNorm)]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after_step.append(self.weights(module))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.end[trainer.current_epoch] = self.weights(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        groups = trainer.optimizers[0].param_groups
        self.final = {"names": [g["name"] for g in groups], "lrs": [g["lr"] for g in groups],
                      "requires_grad": [p.requires_grad for p in module.net.parameters()],
                      "global_step": trainer.global_step}


def image_run(image_dir: Path, tmp_path: Path, finetune: dict, recorder: Recorder | None = None,
              extra: tuple = (), model: dict | None = None, **train: Any) -> Path:
    from deepship.training import fit

    raw = image_config(image_dir, tmp_path / "runs", **{"max_epochs": 1, "limit_train_batches": 3, **train})
    raw["finetune"] = {"warmup_ratio": 0.0, **finetune}
    raw["model"].update(model or {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    return fit(cfg, [c for c in (recorder, *extra) if c is not None])


def backbone_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.startswith("model.features.")]


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> list[str]:
    return [k for k in keys if a[k].is_floating_point() and not torch.equal(a[k], b[k])]


# ---------------------------------------------------------------------------------- freezing
def test_freeze_trains_the_head_only_and_keeps_frozen_batchnorm_stats(image_dir: Path, tmp_path: Path) -> None:
    rec = Recorder()
    image_run(image_dir, tmp_path, {"strategy": "freeze"}, rec)
    before, after = rec.start[0], rec.end[0]
    keys = backbone_keys(before)
    assert changed(before, after, keys) == []  # weights and BatchNorm running stats untouched
    assert changed(before, after, ["model.classifier.1.weight", "model.classifier.1.bias"]) != []
    assert not any(rec.bn_training[0])  # frozen BatchNorm in eval mode


def test_freeze_then_unfreeze_trains_the_backbone_from_the_unfreeze_epoch(image_dir: Path, tmp_path: Path) -> None:
    rec = Recorder()
    image_run(image_dir, tmp_path, {"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 1}, rec, max_epochs=2)
    keys = backbone_keys(rec.start[0])
    assert changed(rec.start[0], rec.end[0], keys) == []
    assert len(changed(rec.start[1], rec.end[1], keys)) > 0.9 * len([k for k in keys if "num_batches" not in k])
    assert rec.trainable_layers[0] == [False] * 19 and rec.trainable_layers[1] == [True] * 19
    assert all(rec.bn_training[1])


def test_gradual_unfreezes_one_group_from_the_top_per_step() -> None:
    counts = [frozen_layer_count("gradual", e, 5, unfreeze_epoch=1, unfreeze_every=2) for e in range(8)]
    assert counts == [5, 4, 4, 3, 3, 2, 2, 1]
    assert [frozen_layer_count("full", e, 5, 1, 1) for e in (0, 3)] == [0, 0]
    assert [frozen_layer_count("freeze", e, 5, 1, 1) for e in (0, 3)] == [5, 5]


def test_gradual_in_training(image_dir: Path, tmp_path: Path) -> None:
    rec = Recorder()
    image_run(image_dir, tmp_path, {"strategy": "gradual", "unfreeze_epoch": 1, "unfreeze_every": 1}, rec,
              max_epochs=3, limit_train_batches=1)
    assert rec.trainable_layers[0] == [False] * 19
    assert rec.trainable_layers[1] == [False] * 18 + [True]
    assert rec.trainable_layers[2] == [False] * 17 + [True, True]


# ----------------------------------------------------------------------------- learning rates
def test_layerwise_lrs_follow_the_decay(tiny_bert_dir: Path) -> None:
    cfg = Config.model_validate({"task": "text_classification", "data": {"train": "x"},
                                 "model": {"backbone": str(tiny_bert_dir)}}, context={"skip_path_checks": True})
    backbone = build_backbone(cfg.task, cfg.model, cfg.data, 2)
    assert len(backbone.layers) == 3  # embeddings + 2 transformer blocks
    groups = layerwise_param_groups(backbone.net, backbone.layers, head_lr=1e-3, backbone_lr=2e-4,
                                    layer_decay=0.5, weight_decay=0.01)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["layer0/decay"] == pytest.approx(2e-4 * 0.5**3)  # embeddings: furthest from the head
    assert lrs["layer1/decay"] == pytest.approx(2e-4 * 0.5**2)
    assert lrs["layer2/decay"] == pytest.approx(2e-4 * 0.5**1)
    assert lrs["head/decay"] == pytest.approx(1e-3)
    for g in groups:  # no weight decay on biases and norm weights
        assert (g["weight_decay"] == 0.0) == all(p.ndim <= 1 for p in g["params"])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(backbone.net.parameters()))  # every parameter exactly once


def test_optimizer_in_training_has_the_configured_groups(image_dir: Path, tmp_path: Path) -> None:
    rec = Recorder()
    image_run(image_dir, tmp_path, {"layer_decay": 0.8, "head_lr": 1e-2, "backbone_lr": 1e-3, "schedule": "constant"},
              rec)
    lrs = dict(zip(rec.final["names"], rec.final["lrs"]))
    assert lrs["head/decay"] == pytest.approx(1e-2)
    assert lrs["layer18/decay"] == pytest.approx(1e-3 * 0.8)
    assert lrs["layer0/decay"] == pytest.approx(1e-3 * 0.8**19)


def test_schedules() -> None:
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)  # warming up
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant") == 1.0
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)


# ------------------------------------------------------------------------------ loss and data
def test_class_weights_change_the_loss_as_computed_by_hand(tmp_path: Path) -> None:
    cfg = Config.model_validate({"task": "image_classification", "data": {"train": "x"},
                                 "model": {"pretrained": False, "image_size": 32},
                                 "finetune": {"class_weights": "auto", "label_smoothing": 0.0}},
                                context={"skip_path_checks": True})
    labels = ["a"] * 8 + ["b"] * 2  # imbalanced 4:1
    loss = loss_settings(cfg, ["a", "b"], labels)
    assert loss["class_weights"] == pytest.approx((10 / (2 * 8), 10 / (2 * 2)))
    backbone = build_backbone(cfg.task, cfg.model, cfg.data, 2)
    module = build_module(cfg, backbone, ["a", "b"], loss)
    logits = torch.tensor([[2.0, 0.0], [0.5, 0.1], [0.0, 1.0], [1.0, 3.0]])
    targets = torch.tensor([0, 0, 1, 0])
    w = torch.tensor(loss["class_weights"])
    logp = torch.log_softmax(logits, 1)
    by_hand = -(w[targets] * logp[torch.arange(4), targets]).sum() / w[targets].sum()
    assert module.loss_fn(logits, targets).item() == pytest.approx(by_hand.item())
    unweighted = torch.nn.functional.cross_entropy(logits, targets)
    assert not math.isclose(module.loss_fn(logits, targets).item(), unweighted.item(), rel_tol=1e-3)


def test_explicit_class_weights_must_name_real_classes() -> None:
    from deepship.errors import ConfigError

    cfg = Config.model_validate({"task": "image_classification", "data": {"train": "x"},
                                 "finetune": {"class_weights": {"zebra": 2.0}}}, context={"skip_path_checks": True})
    with pytest.raises(ConfigError, match=r"finetune.class_weights: unknown classes \['zebra'\]"):
        loss_settings(cfg, ["a", "b"], ["a", "b"])


def test_balanced_sampler_draws_classes_equally(tmp_path: Path) -> None:
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs", n_per_class=4, classes=("red",))
    write_image_folder(root, n_per_class=36, classes=("blue",))
    cfg = Config.model_validate({"task": "image_classification", "data": {"train": str(root), "val_fraction": 0.25},
                                 "model": {"pretrained": False, "image_size": 32},
                                 "finetune": {"sampler": "balanced"}})
    splits = load_splits(cfg)
    data = ClassificationData(cfg, splits, build_backbone(cfg.task, cfg.model, cfg.data, 2))
    data.setup()
    targets = np.array([splits.classes.index(y) for y in splits.train.labels])
    sampler = data.train_dataloader().sampler  # draws are a function of (seed, epoch): one per epoch
    drawn = np.bincount(np.concatenate([targets[list(sampler.order(epoch))] for epoch in range(20)]), minlength=2)
    share = drawn / drawn.sum()
    assert splits.train.labels.count("red") / len(splits.train) < 0.15  # the data is imbalanced
    assert abs(share[0] - 0.5) < 0.08  # the sampler is not


@pytest.mark.parametrize("mixup,cutmix", [(1.0, 0.0), (0.0, 1.0)])
def test_mixed_images_carry_the_share_their_soft_targets_say(mixup: float, cutmix: float) -> None:
    """Image i is the constant i and has class i: a mixed image's pixels must average to the mean
    of the class indices weighted by its soft target (MixUp: every pixel; CutMix: by area)."""
    torch.manual_seed(0)
    mixer = BatchMixer(num_classes=4, mixup=mixup, cutmix=cutmix)
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    mixed, soft = mixer(images, torch.arange(4))
    assert soft.shape == (4, 4) and torch.allclose(soft.sum(1), torch.ones(4))
    assert (soft.max(1).values < 1.0).all()  # every sample is mixed with another one
    by_target = soft @ torch.arange(4.0)
    torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), by_target, atol=1e-5, rtol=0)
    distinct = {round(float(v), 4) for v in mixed[0].flatten()}
    assert len(distinct) == (1 if mixup else 2)  # MixUp blends every pixel; CutMix pastes a box


def test_no_mixing_leaves_the_batch_alone() -> None:
    images, targets = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    mixed, out = BatchMixer(num_classes=3, mixup=0.0, cutmix=0.0)(images, targets)
    assert torch.equal(mixed, images) and torch.equal(out, targets)


def test_truncation_side_left_keeps_the_end(tiny_bert_dir: Path) -> None:
    text = " ".join(f"w{i}" for i in range(60)) + " finale"
    right = TextPreprocessor.from_file(tiny_bert_dir / "tokenizer.json", TextSpec(max_length=16))
    left = TextPreprocessor.from_file(tiny_bert_dir / "tokenizer.json", TextSpec(max_length=16, truncation_side="left"))
    finale = right.tokenizer.token_to_id("finale")
    assert finale not in right([text])["input_ids"][0] and finale in left([text])["input_ids"][0]


# -------------------------------------------------------------------------------------- EMA
def test_ema_weights_equal_the_hand_computed_average(image_dir: Path, tmp_path: Path) -> None:
    rec = Recorder()
    run = image_run(image_dir, tmp_path, {"ema_decay": 0.6}, rec)
    key = "model.classifier.1.weight"
    ema = rec.after_step[0][key]
    for snapshot in rec.after_step[1:]:  # AveragedModel copies at the first update, then averages
        ema = 0.6 * ema + 0.4 * snapshot[key]
    last = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert torch.allclose(last["state_dict"][f"net.{key}"], ema, atol=1e-6)  # checkpointed: EMA weights
    assert torch.equal(last["current_model_state"][f"net.{key}"], rec.after_step[-1][key])  # and the raw ones
    assert not torch.allclose(ema, rec.after_step[-1][key])


def test_ema_run_metrics_are_what_best_ckpt_reproduces(image_dir: Path, tmp_path: Path) -> None:
    """metrics.json must score best.ckpt's weights, not the EMA average held by the fit Trainer."""
    import json

    run = image_run(image_dir, tmp_path, {"ema_decay": 0.7}, max_epochs=3, limit_train_batches=2)
    metrics = json.loads((run / "metrics.json").read_text())
    by_hand = evaluate_by_hand(run)
    assert by_hand["accuracy"] == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
    assert by_hand["loss"] == pytest.approx(metrics["val"]["loss"], abs=1e-5)


# ------------------------------------------------------------------------------------ resume
class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.should_stop = True  # as if preempted right after last.ckpt was written


def test_resume_mid_freeze_then_unfreeze_matches_an_uninterrupted_run(image_dir: Path, tmp_path: Path) -> None:
    finetune = {"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 2, "layer_decay": 0.9}
    whole, first, second = Recorder(), Recorder(), Recorder()
    image_run(image_dir, tmp_path / "a", finetune, whole, max_epochs=3, limit_train_batches=2)
    image_run(image_dir, tmp_path / "b", finetune, first, extra=(StopAfterFirstEpoch(),), max_epochs=3,
              limit_train_batches=2)
    assert sorted(first.start) == [0]
    image_run(image_dir, tmp_path / "b", finetune, second, max_epochs=3, limit_train_batches=2, resume="auto")
    assert sorted(second.start) == [1, 2]  # continued, did not restart
    assert second.trainable_layers == {e: whole.trainable_layers[e] for e in (1, 2)}
    assert second.trainable_layers[1] == [False] * 19 and second.trainable_layers[2] == [True] * 19
    assert second.final["names"] == whole.final["names"]
    assert second.final["lrs"] == pytest.approx(whole.final["lrs"])  # same schedule position, same groups
    assert second.final["global_step"] == whole.final["global_step"] == 6
    assert second.final["requires_grad"] == whole.final["requires_grad"]
    history = (tmp_path / "b" / "runs" / "tiny-image" / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2", "3"]  # each epoch once, across the resume


# ---------------------------------------------------------------------------------- general
def test_compile_keeps_checkpoint_keys(tmp_path: Path) -> None:
    cfg = Config.model_validate({"task": "image_classification", "data": {"train": "x"},
                                 "model": {"pretrained": False, "image_size": 32}, "train": {"compile": True}},
                                context={"skip_path_checks": True})
    module = build_module(cfg, build_backbone(cfg.task, cfg.model, cfg.data, 2), ["a", "b"],
                          loss_settings(cfg, ["a", "b"], ["a", "b"]))
    keys = list(module.state_dict())
    module.configure_model()
    assert module.net._compiled_call_impl is not None  # compiled in place...
    assert list(module.state_dict()) == keys and not any("_orig_mod" in k for k in keys)  # ...same keys


def test_missing_logger_backend_is_a_config_error(image_dir: Path, tmp_path: Path, capsys) -> None:
    from importlib.util import find_spec

    if find_spec("mlflow"):
        pytest.skip(reason="mlflow is installed here; the case under test is mlflow absent")
    raw = image_config(image_dir, tmp_path / "runs", loggers=["csv", "mlflow"])
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert "train.loggers: 'mlflow' needs the mlflow package" in capsys.readouterr().err


def test_text_freeze_trains_only_the_classifier(text_csv: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    from deepship.training import fit

    rec = Recorder()
    raw = text_config(text_csv, tiny_bert_dir, tmp_path / "runs", max_epochs=1, limit_train_batches=2)
    raw["finetune"] = {"strategy": "freeze"}
    fit(load_config(write_config(tmp_path / "c.yaml", raw)), [rec])
    keys = [k for k in rec.start[0] if "embeddings" in k or "encoder.layer" in k]
    assert changed(rec.start[0], rec.end[0], keys) == []
    assert changed(rec.start[0], rec.end[0], ["model.classifier.weight"]) != []


EVERY_OPTION = {"class_weights": "auto", "sampler": "balanced", "label_smoothing": 0.1, "mixup": 0.2, "cutmix": 0.2,
                "ema_decay": 0.8, "layer_decay": 0.9, "schedule": "onecycle", "augment": "light"}


def test_every_option_on_trains_and_best_ckpt_reproduces_the_metrics(image_dir: Path, tmp_path: Path) -> None:
    """The options compose in a short run: weights, sampler, smoothing, mixup/cutmix, EMA, layer decay, onecycle."""
    import json

    run = image_run(image_dir, tmp_path, EVERY_OPTION, max_epochs=2, limit_train_batches=3)
    metrics, by_hand = json.loads((run / "metrics.json").read_text()), evaluate_by_hand(run)
    assert by_hand["accuracy"] == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
    assert by_hand["loss"] == pytest.approx(metrics["val"]["loss"], abs=1e-5) and math.isfinite(by_hand["loss"])


@pytest.mark.slow
def test_tiny_run_learns_with_every_option_on(image_dir: Path, tmp_path: Path) -> None:
    """With every option on, the model still learns (10 epochs from scratch)."""
    import json

    run = image_run(image_dir, tmp_path, EVERY_OPTION, max_epochs=10, limit_train_batches=None)
    assert json.loads((run / "metrics.json").read_text())["val"]["accuracy"] >= 0.6  # chance is 1/3


# ------------------------------------------------------------------ small-data recipes (freeze_bn, strategy auto)
def bn_stats(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in backbone_keys(state) if k.endswith(("running_mean", "running_var"))]


def conv_weights(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in backbone_keys(state) if k.endswith("weight") and state[k].ndim == 4]


def bn_scales(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in backbone_keys(state) if k.endswith("weight") and state[k].ndim == 1]


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_running_stats_while_the_backbone_trains(image_dir: Path, tmp_path: Path,
                                                                 freeze_bn: bool) -> None:
    rec = Recorder()
    image_run(image_dir, tmp_path, {"strategy": "full", "freeze_bn": freeze_bn}, rec)
    before, after = rec.start[0], rec.end[0]
    stats = bn_stats(before)
    assert len(stats) == 2 * 52  # MobileNetV2's features hold 52 BatchNorms
    assert len(changed(before, after, conv_weights(before))) == 52  # every conv trains either way
    assert len(changed(before, after, bn_scales(before))) == 52  # and every BatchNorm scale
    assert changed(before, after, stats) == ([] if freeze_bn else stats)
    assert rec.bn_training[0] == [not freeze_bn] * 52


def recipe_config(task: str = "image_classification", pretrained: bool | str = "w.safetensors",
                  **finetune: Any) -> Config:
    model = {"pretrained": pretrained} if task == "image_classification" else {"backbone": "tiny"}
    return Config.model_validate({"task": task, "data": {"train": "x"}, "model": model,
                                  "finetune": {"strategy": "auto", **finetune}, "train": {"lr": 2e-3}},
                                 context={"skip_path_checks": True})


@pytest.mark.parametrize("train_size,strategy,backbone_lr,freeze_bn", [
    (4999, "freeze_then_unfreeze", 2e-4, True),  # documented: below 5,000 images, backbone at train.lr x 0.1
    (5000, "full", None, False),
])
def test_auto_recipe_follows_the_documented_threshold(train_size: int, strategy: str, backbone_lr: float | None,
                                                      freeze_bn: bool) -> None:
    from deepship.models.finetuning import resolve_recipe

    for pretrained in ("w.safetensors", True):
        recipe = resolve_recipe(recipe_config(pretrained=pretrained), train_size, 2)
        assert (recipe.strategy, recipe.freeze_bn, recipe.unfreeze_epoch) == (strategy, freeze_bn, 1)
        assert recipe.backbone_lr == (pytest.approx(backbone_lr) if backbone_lr else None)
        assert recipe.head_lr is None  # the head keeps train.lr


@pytest.mark.parametrize("train_size,num_classes,head_init", [
    (119, 12, "probe"),  # documented: fewer than 10 training images per class start the head from the probe
    (120, 12, "random"),
    (19, 2, "probe"),
    (20, 2, "random"),
])
def test_auto_recipe_starts_few_shot_heads_from_the_probe(train_size: int, num_classes: int, head_init: str) -> None:
    from deepship.models.finetuning import describe_recipe, resolve_recipe

    cfg = recipe_config()
    recipe = resolve_recipe(cfg, train_size, num_classes)
    assert (recipe.strategy, recipe.head_init) == ("freeze_then_unfreeze", head_init)
    assert describe_recipe(cfg.finetune, recipe).endswith(", head from the linear probe") == (head_init == "probe")


def test_head_init_auto_belongs_to_the_auto_recipe_and_explicit_values_win() -> None:
    from deepship.models.finetuning import resolve_recipe

    for cfg in (recipe_config(pretrained=False), recipe_config(task="text_classification"),
                recipe_config(strategy="freeze_then_unfreeze")):
        assert resolve_recipe(cfg, 24, 12).head_init == "random"
    assert resolve_recipe(recipe_config(head_init="random"), 24, 12).head_init == "random"
    assert resolve_recipe(recipe_config(strategy="full", head_init="probe"), 24000, 12).head_init == "probe"


def test_auto_recipe_is_for_pretrained_image_backbones_and_keeps_explicit_values() -> None:
    from deepship.models.finetuning import resolve_recipe

    for cfg in (recipe_config(pretrained=False), recipe_config(task="text_classification")):
        recipe = resolve_recipe(cfg, 100, 2)
        assert (recipe.strategy, recipe.freeze_bn, recipe.backbone_lr) == ("full", False, None)
    recipe = resolve_recipe(recipe_config(backbone_lr=5e-5, freeze_bn=False, unfreeze_epoch=3, head_lr=1e-2), 100, 2)
    assert (recipe.strategy, recipe.freeze_bn, recipe.backbone_lr, recipe.unfreeze_epoch) == \
        ("freeze_then_unfreeze", False, 5e-5, 3)
    assert resolve_recipe(recipe_config(head_lr=1e-2), 100, 2).backbone_lr == pytest.approx(1e-3)  # head LR x 0.1
    for strategy in ("full", "gradual"):  # freeze_bn auto belongs to the auto recipe (its lower backbone LR)
        explicit = resolve_recipe(recipe_config(strategy=strategy), 100, 2)
        assert (explicit.strategy, explicit.freeze_bn, explicit.backbone_lr) == (strategy, False, None)


def test_auto_recipe_in_training_warms_the_head_up_then_trains_the_backbone_slower(image_dir: Path,
                                                                                   tmp_path: Path) -> None:
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    weights = tmp_path / "pretrained.pt"  # any weights file makes the backbone "pretrained"
    torch.save(mobilenet_v2().state_dict(), weights)
    rec = Recorder()
    image_run(image_dir, tmp_path, {"strategy": "auto", "schedule": "constant"}, rec, model={"pretrained": str(weights)},
              max_epochs=2, limit_train_batches=2, lr=3e-3)
    keys = backbone_keys(rec.start[0])
    assert rec.trainable_layers[0] == [False] * 19 and rec.trainable_layers[1] == [True] * 19
    assert changed(rec.start[0], rec.end[0], keys) == []  # epoch 0: the head alone
    assert len(changed(rec.start[1], rec.end[1], conv_weights(rec.start[1]))) == 52
    assert changed(rec.start[0], rec.end[1], bn_stats(rec.start[0])) == []  # pretrained statistics kept
    assert not any(rec.bn_training[1])
    lrs = dict(zip(rec.final["names"], rec.final["lrs"]))
    assert lrs["head/decay"] == pytest.approx(3e-3)
    assert [lrs[f"layer{i}/decay"] for i in range(19)] == pytest.approx([3e-4] * 19)
