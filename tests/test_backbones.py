"""Image backbones by torchvision name: head, layer groups, weights files, training and export per family."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import onnx
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from deepship import cli
from deepship.config import ModelConfig, load_config
from deepship.errors import ConfigError
from deepship.models.backbones import build_backbone, classification_head
from deepship.models.image_backbones import image_spec
from deepship.runtime.preprocess import ImageSpec

from conftest import export, image_config, read_json, write_config, write_image_folder


@dataclass(frozen=True)
class Case:
    """What torchvision's own definition of the model says (read off its source), not what deepship derives."""

    name: str
    stem_conv: str  # the first convolution: must sit in the bottom layer group
    head_container: str  # the classifier module: none of it is in a layer group
    head: str  # the Linear that becomes the new head
    groups: int  # layer groups, bottom -> top
    top: str  # the top layer group
    embedding_dim: int  # the head's input width (the exported embeddings)
    dropout: bool  # the classifier's dropout is kept


CASES = {c.name: c for c in (
    Case("mobilenet_v2", "features.0.0", "classifier", "classifier.1", 19, "features.18", 1280, True),
    Case("mobilenet_v3_small", "features.0.0", "classifier", "classifier.3", 13, "features.12", 1024, True),
    Case("efficientnet_b0", "features.0.0", "classifier", "classifier.1", 9, "features.8", 1280, True),
    Case("resnet18", "conv1", "fc", "fc", 5, "layer4", 512, False),
    Case("resnet50", "conv1", "fc", "fc", 5, "layer4", 2048, False),
    Case("convnext_tiny", "features.0.0", "classifier", "classifier.2", 8, "features.7", 768, False),
    Case("regnet_y_400mf", "stem.0", "fc", "fc", 5, "trunk_output.block4", 440, False),
)}


def build(name: str, num_classes: int = 3, **model: object):
    return build_backbone("image_classification", ModelConfig(**{"backbone": name, "pretrained": False, **model}),
                          None, num_classes)


@pytest.mark.parametrize("name", sorted(CASES))
def test_head_and_layer_groups_follow_the_torchvision_definition(name: str) -> None:
    case = CASES[name]
    backbone = build(name, num_classes=4)
    model = backbone.net.model
    head = model.get_submodule(case.head)
    assert classification_head(backbone.net) is head and isinstance(head, nn.Linear)
    assert head.out_features == 4
    assert any(isinstance(m, nn.Dropout) for m in model.get_submodule(case.head_container).modules()) == case.dropout
    # every parameter outside the classifier in exactly one group, groups in definition (= forward) order
    backbone_params = [p for n, p in model.named_parameters() if not n.startswith(f"{case.head_container}.")]
    grouped = [p for layer in backbone.layers for p in layer.parameters()]
    assert len(backbone.layers) == case.groups
    assert [id(p) for p in grouped] == [id(p) for p in backbone_params]
    assert any(p is model.get_submodule(case.stem_conv).weight for p in backbone.layers[0].parameters())
    assert [id(p) for p in backbone.layers[-1].parameters()] == [id(p) for p in model.get_submodule(case.top).parameters()]
    assert backbone.channels_last is True


def test_preprocessing_follows_the_weights_eval_transform() -> None:
    # torchvision's documented eval transforms: EfficientNet-B0 resize 256 bicubic / crop 224, ResNet-50 V2
    # weights resize 232 / crop 224, ConvNeXt-T resize 236 / crop 224, MobileNetV3-S resize 256 / crop 224,
    # MobileNetV2 V1 weights (pinned) resize 256 / crop 224
    names = ("efficientnet_b0", "resnet50", "convnext_tiny", "mobilenet_v3_small", "mobilenet_v2")
    specs = {n: image_spec(n, None) for n in names}
    assert [(s.image_size, s.resize_size, s.interpolation) for s in specs.values()] == \
        [(224, 256, "bicubic"), (224, 232, "bilinear"), (224, 236, "bilinear"), (224, 256, "bilinear"),
         (224, 256, "bilinear")]
    assert specs["resnet50"].mean == (0.485, 0.456, 0.406) and specs["resnet50"].std == (0.229, 0.224, 0.225)
    # an explicit size keeps the transform's resize/crop ratio: 64 * 256 / 224 = 73.1
    assert image_spec("efficientnet_b0", 64).resize_size == 73 and build("resnet18", image_size=40).preprocessing == \
        ImageSpec(image_size=40, resize_size=46)  # ResNet-18 V1 weights: resize 256 / crop 224; 40 * 256 / 224 = 45.7


class StartWeights(Callback):
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.net = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
        self.lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("small") / "train", n_per_class=8)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"resnet50"}))  # resnet50: resnet18's family, 2x the export
def test_each_family_trains_two_steps_exports_and_passes_parity(name: str, small_images: Path, tmp_path: Path) -> None:
    from deepship.training import fit

    case = CASES[name]
    raw = image_config(small_images, tmp_path / "runs", max_epochs=1, limit_train_batches=2, batch_size=4)
    raw["model"]["backbone"] = name
    # gradual from epoch 0 trains the top group only; layer_decay and freeze_bn (a no-op without BatchNorm)
    raw["finetune"] |= {"strategy": "gradual", "unfreeze_epoch": 0, "layer_decay": 0.5, "freeze_bn": True,
                        "schedule": "constant", "linear_probe": False}
    raw["train"] |= {"lr": 1e-2}
    start = StartWeights()
    run_dir = fit(load_config(write_config(tmp_path / "c.yaml", raw)), [start])

    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    end = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    bottom, top = f"model.{case.stem_conv}.weight", f"model.{case.head}.weight"
    assert torch.equal(end[bottom], start.net[bottom])  # frozen: the bottom group
    assert not torch.equal(end[top], start.net[top])
    assert any(not torch.equal(end[k], start.net[k]) for k in start.net if k.startswith(f"model.{case.top}."))
    n = case.groups  # layer i of n gets lr * 0.5 ** (n - i)
    assert start.lrs["layer0/decay"] == pytest.approx(1e-2 * 0.5 ** n)
    assert start.lrs[f"layer{n - 1}/decay"] == pytest.approx(1e-2 * 0.5) and start.lrs["head/decay"] == 1e-2

    package = export(run_dir, tmp_path / "pkg")
    parity = read_json(package / "parity.json")
    assert parity["passed"] is True and parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] <= 1e-4
    outputs = onnx.load(str(package / "model.onnx")).graph.output
    assert outputs[1].type.tensor_type.shape.dim[1].dim_value == case.embedding_dim


# ----------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name, weights_file", [("resnet18", "resnet18-f37072fd.pth"),
                                                ("efficientnet_b0", "efficientnet_b0_rwightman-7f5810bc.pth"),
                                                ("mobilenet_v2", "mobilenet_v2-b0353104.pth")])
def test_pretrained_true_offline_names_the_weights_file_to_fetch(name: str, weights_file: str, tmp_path: Path,
                                                                 monkeypatch) -> None:
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download to fall back on
    monkeypatch.setattr("torch.hub.urlopen", offline)
    with pytest.raises(ConfigError, match=rf"model.pretrained: cannot get ImageNet weights for {name} \(URLError\); "
                                          rf"set model.pretrained to a local state_dict file \(e.g. {weights_file}\)"):
        build_backbone("image_classification", ModelConfig(backbone=name, pretrained=True), None, 3)


def test_a_local_safetensors_file_with_the_familys_keys_loads(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file
    from torchvision.models import regnet_y_400mf

    torch.manual_seed(7)
    source = regnet_y_400mf(num_classes=10)  # another head: skipped with a note, the trunk loads
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model_cfg = ModelConfig.model_validate({"backbone": "regnet_y_400mf", "pretrained": str(tmp_path / "w.safetensors")})
    net = build_backbone("image_classification", model_cfg, None, 3).net.model
    assert torch.equal(net.trunk_output.block4[0].proj[0].weight, source.trunk_output.block4[0].proj[0].weight)
    assert torch.equal(net.stem[0].weight, source.stem[0].weight)
    assert net.fc.out_features == 3
    assert "note: model.pretrained: 2 head weights in" in capsys.readouterr().err  # fc.weight, fc.bias: 10 classes


def test_a_weights_file_of_another_model_is_a_config_error_naming_the_file(tmp_path: Path, capsys) -> None:
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), tmp_path / "resnet18.pth")
    write_image_folder(tmp_path / "imgs", n_per_class=4)
    raw = image_config(tmp_path / "imgs", tmp_path / "runs")
    raw["model"] = {"backbone": "resnet34", "pretrained": str(tmp_path / "resnet18.pth")}
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert f"model.pretrained: '{tmp_path / 'resnet18.pth'}' does not match resnet34" in err
    assert "missing backbone weights: layer1.2." in err  # resnet34 has 3 blocks in layer1, resnet18 two
    assert not (tmp_path / "runs" / "tiny-image" / "config.yaml").exists()  # refused before the run is written


def test_an_unknown_backbone_name_is_exit_2_naming_close_matches(tmp_path: Path, capsys) -> None:
    write_image_folder(tmp_path / "imgs", n_per_class=4)
    raw = image_config(tmp_path / "imgs", tmp_path / "runs")
    raw["model"]["backbone"] = "resnet19"
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert "model.backbone: unknown image backbone 'resnet19'; close matches: resnet18" in err
    assert len(err.strip().splitlines()) == 1


def test_a_convnext_without_batchnorm_keeps_freeze_bn_a_no_op() -> None:
    from deepship.models.finetuning import set_frozen

    backbone = build("convnext_tiny")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.net.modules())
    backbone.net.train()
    set_frozen(backbone.layers, 2, training=True, freeze_bn=True)
    assert [all(p.requires_grad for p in g.parameters()) for g in backbone.layers] == [False] * 2 + [True] * 6
    assert all(m.training for m in backbone.net.modules())  # LayerNorms and dropout stay as they were


def test_an_image_size_below_the_models_minimum_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model.image_size: 16 is below convnext_tiny's smallest input \(32 px\)"):
        build("convnext_tiny", image_size=16)


def test_generic_models_get_their_last_linear_replaced_and_their_top_level_blocks_as_groups() -> None:
    backbone = build("shufflenet_v2_x0_5", num_classes=5)
    model = backbone.net.model
    assert model.fc.out_features == 5 and backbone.channels_last is False
    # shufflenet: conv1, stage2..4 (Sequentials of 4, 8 and 4 blocks, one group each), conv5; fc is the head
    assert len(backbone.layers) == 1 + 4 + 8 + 4 + 1
    assert [id(p) for g in backbone.layers for p in g.parameters()] == \
        [id(p) for n, p in model.named_parameters() if not n.startswith("fc.")]


def test_googlenet_trains_its_main_head_and_loads_a_file_with_auxiliary_classifiers(tmp_path: Path) -> None:
    from torchvision.models import googlenet

    source = googlenet(aux_logits=True, init_weights=False)  # as torchvision's ImageNet file: aux1, aux2 included
    torch.save(source.state_dict(), tmp_path / "googlenet.pth")
    net = build("googlenet", pretrained=str(tmp_path / "googlenet.pth")).net
    assert torch.equal(net.model.inception5b.branch1.conv.weight, source.inception5b.branch1.conv.weight)
    assert net.train()(pixel_values=torch.zeros(2, 3, 64, 64)).shape == (2, 3)  # plain logits, no aux tuple
