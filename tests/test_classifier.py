"""ClassifierModule's training step: which batches MixUp/CutMix may touch."""

from __future__ import annotations

from pathlib import Path

import torch

from deepship.config import Config
from deepship.models.backbones import build_backbone
from deepship.run import build_module, loss_settings


def test_a_text_batch_is_never_mixed_even_when_mixup_is_configured(tiny_bert_dir: Path) -> None:
    cfg = Config.model_validate({"task": "text_classification", "data": {"train": "x"},
                                 "model": {"backbone": str(tiny_bert_dir)}, "finetune": {"mixup": 1.0}},
                                context={"skip_path_checks": True})
    backbone = build_backbone(cfg.task, cfg.model, cfg.data, 2)
    module = build_module(cfg, backbone, ["a", "b"], loss_settings(cfg, ["a", "b"], ["a", "b"]))
    module.eval()  # no dropout: the step's loss is a function of the inputs alone
    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    module.sync_free = True  # the finiteness check runs on the device, without asking a Trainer
    inputs = {"input_ids": torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    targets = torch.tensor([0, 1])
    with torch.no_grad():
        by_hand = torch.nn.functional.cross_entropy(module.net(**inputs).float(), targets)
        loss = module.model_step((inputs, targets), "train")
    assert torch.allclose(loss, by_hand, atol=1e-6)  # hard targets, unmixed token ids
