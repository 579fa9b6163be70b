"""`deepship bench train|runtime` in tiny CPU mode: the harness measures what it says (no timing assertions)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from deepship import cli
from deepship.config import load_config
from deepship.training import fit

from conftest import image_config, text_config, write_config


def bench_lines(capsys: pytest.CaptureFixture) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_train_compares_the_toolkit_step_with_a_plain_loop(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "train", "--modality", "image", "--steps", "3", "--batch-size", "4",
                     "--image-size", "32", "--device", "cpu"]) == 0
    (row,) = bench_lines(capsys)
    assert row["kind"] == "train_step" and row["device"] == "cpu" and row["precision"] == "32-true"
    assert row["plain_samples_per_s"] > 0 and row["toolkit_samples_per_s"] > 0
    # the ratio is the two throughputs of the same run, not a stored figure
    assert row["toolkit_over_plain"] == pytest.approx(row["toolkit_samples_per_s"] / row["plain_samples_per_s"], abs=2e-3)
    assert row["peak_gpu_memory_mib"] is None  # reported on CUDA only


def test_bench_train_takes_a_local_text_model(tiny_bert_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """--backbone: any local Hugging Face folder (the GPU script uses MiniLM's shape with random weights)."""
    assert cli.main(["bench", "train", "--modality", "text", "--backbone", str(tiny_bert_dir), "--steps", "2",
                     "--batch-size", "4", "--seq-len", "16", "--device", "cpu"]) == 0
    (row,) = bench_lines(capsys)
    assert row["backbone"] == str(tiny_bert_dir) and row["seq_len"] == 16 and row["toolkit_samples_per_s"] > 0


def test_bench_runtime_times_both_runtimes_on_the_same_input(tiny_text_run: Path, text_package: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "runtime", "--run", str(tiny_text_run), "--package", str(text_package),
                     "--runs", "8"]) == 0
    (row,) = bench_lines(capsys)
    assert row["torch_eager_p50_ms"] > 0 and row["onnxruntime_p50_ms"] > 0
    assert row["onnxruntime_over_torch"] == pytest.approx(row["onnxruntime_p50_ms"] / row["torch_eager_p50_ms"],
                                                          abs=2e-3)
    # p50s are rounded to 1 us in the row: the ratio of the rounded values agrees to that rounding
    assert row["iobinding_over_plain"] == pytest.approx(row["onnxruntime_iobinding_p50_ms"] / row["onnxruntime_p50_ms"],
                                                        rel=0.02)


def test_bench_runtime_needs_a_run_and_a_package(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "runtime"]) == 2
    assert "needs --run RUN_DIR and --package" in capsys.readouterr().err


# --------------------------------------------------------------------------------- host syncs
class HostSyncCounter(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`.item()`, `bool(t)`, `torch.equal`): on a GPU each one waits
    for every queued kernel. The DataLoader's own work is left out: it runs on the host, in workers."""

    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.equal.default}

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            stack = traceback.extract_stack()[:-1]
            if not any("torch/utils/data/" in frame.filename for frame in stack):
                caller = next(f for f in reversed(stack) if "site-packages/torch/" not in f.filename)
                self.sites.append(f"{caller.filename.split('site-packages/')[-1]}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


class SyncProbe(Callback):
    """Host syncs between the starts of consecutive training batches, by global step."""

    def __init__(self) -> None:
        self.counter: HostSyncCounter | None = None
        self.by_step: list[tuple[int, bool, list[str]]] = []  # (step, epoch's last batch, sync sites)

    def _close(self) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.by_step.append((self.step, self.last, self.counter.sites))
            self.counter = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._close()
        self.step, self.last = trainer.global_step, batch_idx + 1 == trainer.num_training_batches
        self.counter = HostSyncCounter()
        self.counter.__enter__()

    def on_train_end(self, trainer, module) -> None:
        self._close()


def test_host_sync_counter_sees_a_loss_read() -> None:
    with HostSyncCounter() as counter:
        loss = torch.ones(3).mean()
        bool(torch.isfinite(loss))
        loss.item()
    assert len(counter.sites) == 2


@pytest.mark.parametrize("modality", ["image", "text"])
def test_training_steps_do_not_wait_for_the_device(modality: str, image_dir: Path, text_csv: Path,
                                                   tiny_bert_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No host sync inside the training loop except at log steps and epoch ends: the loss is not read per step
    (non-finite steps are skipped on the device), metrics accumulate on the device, the bar redraws on a timer."""
    from deepship import callbacks

    monkeypatch.setattr(callbacks, "PROGRESS_REFRESH_S", 1e9)  # the bar's timed redraw is a (rationed) sync
    if modality == "image":
        raw = image_config(image_dir, tmp_path / "runs", max_epochs=2, batch_size=8)
    else:
        raw = text_config(text_csv, tiny_bert_dir, tmp_path / "runs", max_epochs=2, batch_size=8)
    probe = SyncProbe()
    fit(load_config(write_config(tmp_path / "c.yaml", raw)), [probe])
    inner = [(step, sites) for step, last, sites in probe.by_step if not last]
    assert len(inner) >= 4
    assert [(step, sites) for step, sites in inner if sites] == []
    assert any(sites for _, last, sites in probe.by_step if last)  # the epoch ends do read (validation, logging)


class GraphCounter(Callback):
    """Distinct training batch shapes, and dynamo's compiled-graph count at each epoch start."""

    def __init__(self) -> None:
        self.shapes: set[tuple[int, ...]] = set()
        self.graphs_at_epoch_start: list[int] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        import torch._dynamo.utils

        self.graphs_at_epoch_start.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.shapes.add(tuple(batch[0]["input_ids"].shape))


def test_compiled_text_training_stops_compiling_after_the_first_epoch(tiny_bert_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile with length-grouped batches: a bounded number of graphs, none new after the first epoch,
    although batch lengths keep changing (dynamo's guards are the same under any backend; the eager backend
    spares the test inductor's code generation)."""
    import random

    import torch._dynamo

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compile_(self, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rng = random.Random(0)
    words = ["good", "bad", "fine", "movie", "plot", "acting", "great", "awful"]
    rows = [f"{' '.join(rng.choice(words) for _ in range(rng.randint(2, 60)))},{rng.choice(['pos', 'neg'])}"
            for _ in range(240)]
    (tmp_path / "t.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    raw = text_config(tmp_path / "t.csv", tiny_bert_dir, tmp_path / "runs", max_epochs=3, batch_size=16, compile=True)
    raw["data"]["max_length"] = 64
    counter = GraphCounter()
    fit(load_config(write_config(tmp_path / "c.yaml", raw)), [counter])
    assert len(counter.shapes) >= 3  # lengths 16, 32, 48, 64 (multiples of data.pad_to_multiple_of)
    first, second, third = counter.graphs_at_epoch_start
    assert second == third <= 6  # every shape of the data was met in epoch 1; later epochs compile nothing
    torch._dynamo.reset()


def test_bench_pipeline_image_compares_every_feed_with_in_memory_tensors(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "pipeline", "--modality", "image", "--steps", "3", "--batch-size", "8",
                     "--image-size", "32", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in bench_lines(capsys)}
    assert list(rows) == ["in_memory_tensors", "cpu_pil", "device_decode", "uint8_cache"]
    assert rows["in_memory_tensors"]["ratio"] == 1.0 and rows["uint8_cache"]["cache_build_s"] >= 0
    for row in rows.values():
        assert row["steps"] == 3 and row["images"] == 256 and row["baseline"] == "in_memory_tensors"
        assert row["ratio"] == pytest.approx(row["samples_per_s"] / rows["in_memory_tensors"]["samples_per_s"],
                                             abs=2e-3)


def test_bench_pipeline_text_measures_padding_and_shapes(tiny_bert_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    import random

    rng = random.Random(0)
    for suffix in ("pos", "neg"):  # rt-polarity's format: one sentence per line, latin-1
        lines = [" ".join(rng.choice(["a", "fine", "movie", "with", "dull", "plot"]) for _ in range(rng.randint(3, 70)))
                 for _ in range(100)]
        (tmp_path / f"rt-polarity.{suffix}").write_text("\n".join(lines) + "\n", encoding="latin-1")
    assert cli.main(["bench", "pipeline", "--modality", "text", "--data", str(tmp_path), "--backbone",
                     str(tiny_bert_dir), "--steps", "4", "--batch-size", "8", "--device", "cpu"]) == 0
    rows = {r["name"]: r for r in bench_lines(capsys)}
    assert list(rows) == ["pad_to_max_length", "pad_16_random_order", "grouped_pad_16", "grouped_pad_32"]
    assert rows["pad_to_max_length"]["distinct_shapes"] == 1  # one length: max_length
    # grouping similar lengths pads less than padding each random batch to its longest (same multiple)
    assert rows["grouped_pad_16"]["padding_share"] < rows["pad_16_random_order"]["padding_share"] \
        < rows["pad_to_max_length"]["padding_share"]
    assert all(set(shape) == {"steps", "first_s", "first_call_s"} for r in rows.values()
               for shape in r["shapes"].values())  # the first-call cost of each shape is reported
