"""The benchmark harness (`deepship bench ...`): its arithmetic against hand-computed values, its timing loop on a
fake clock, the tiny CPU modes end to end (no timing assertions), and the training loop's host syncs."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from deepship import cli
from deepship.bench.common import ratio
from deepship.config import load_config
from deepship.evaluation import latency
from deepship.training import fit

from conftest import image_config, text_config, write_config


def bench_lines(capsys: pytest.CaptureFixture) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------------- arithmetic
def test_ratio_against_hand_computed_values() -> None:
    assert ratio(3.0, 4.0) == 0.75 and ratio(2.0, 3.0) == 0.667 and ratio(2.0, 3.0, 2) == 0.67
    assert ratio(451.1, 437.2) == 1.032  # the docs' training-step row
    assert ratio(None, 4.0) is None and ratio(5.0, 0.0) is None and ratio(0.0, 5.0) is None


def test_pipeline_ratios_are_against_the_first_row() -> None:
    from deepship.bench.pipeline import with_ratios

    rows = with_ratios([{"name": "memory", "x": 400.0}, {"name": "pil", "x": 300.0}, {"name": "broken", "x": 0.0}], "x")
    assert [(r["baseline"], r["ratio"]) for r in rows] == [("memory", 1.0), ("memory", 0.75), ("memory", None)]


def test_summarize_takes_first_call_costs_out_of_the_steady_state() -> None:
    from deepship.bench.pipeline import summarize

    # (batch size, shape, seconds): shape 16 costs 0.5 s on its first step, 0.1 s after; shape 32 runs once
    row = summarize("x", [(8, 16, 0.5), (8, 16, 0.1), (8, 16, 0.1), (8, 32, 0.3)])
    assert row["shapes"] == {16: {"steps": 3, "first_s": 0.5, "first_call_s": 0.4},
                             32: {"steps": 1, "first_s": 0.3, "first_call_s": None}}
    assert row["distinct_shapes"] == 2 and row["steps"] == 4
    assert row["samples_per_s_with_first_calls"] == 32.0  # 32 samples in 1.0 s
    assert row["samples_per_s"] == 53.33  # 32 samples in 1.0 - 0.4 s


def test_serve_ratios_compare_batching_on_with_off_at_the_same_concurrency() -> None:
    from deepship.bench.serve import add_ratios

    rows = [{"batching": "off", "concurrency": 1, "throughput_rps": 100.0, "p99_ms": 10.0},
            {"batching": "on", "concurrency": 1, "throughput_rps": 150.0, "p99_ms": 8.0},
            {"batching": "off", "concurrency": 4, "throughput_rps": 200.0, "p99_ms": None},
            {"batching": "on", "concurrency": 4, "throughput_rps": 300.0, "p99_ms": 12.0},
            {"batching": "on", "concurrency": 16, "throughput_rps": 310.0, "p99_ms": 30.0}]
    add_ratios(rows)
    assert [(r.get("throughput_vs_off"), r.get("p99_vs_off")) for r in rows] == [
        (None, None), (1.5, 0.8), (None, None), (1.5, None), (None, None)]
    assert "throughput_vs_off" not in rows[0] and "throughput_vs_off" not in rows[4]  # no baseline: no ratio


def test_percentiles_interpolate_linearly_in_ms() -> None:
    assert latency.percentiles_ms([0.005, 0.001, 0.003, 0.002, 0.004]) == {"p50": 3.0, "p95": 4.8, "p99": 4.96}
    assert latency.percentiles_ms([]) == {"p50": None, "p95": None, "p99": None}


# ---------------------------------------------------------------------------------- timing loop
class FakeClock:
    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations = 0.0, iter(durations)

    def __call__(self) -> float:
        return self.now

    def call(self) -> None:
        self.now += next(self.durations)


def test_time_calls_times_each_call_after_untimed_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock([10.0, 10.0, 1.0, 2.0, 3.0])
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    assert latency.time_calls(clock.call, runs=3, warmup=2) == [1.0, 2.0, 3.0]
    assert latency.median_ms([0.001, 0.004, 0.002]) == 2.0


def test_time_in_turns_alternates_warmed_up_blocks() -> None:
    order: list[str] = []
    times = latency.time_in_turns({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                  runs=4, blocks=2, warmup=1)
    assert order == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # per block: 1 warm-up + 2 timed, then the other
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}


# ----------------------------------------------------------------------------- tiny CPU modes
def test_bench_train_compares_the_toolkit_step_with_a_plain_loop(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "train", "--modality", "image", "--steps", "3", "--batch-size", "4",
                     "--image-size", "32", "--device", "cpu"]) == 0
    (row,) = bench_lines(capsys)
    assert (row["kind"], row["device"], row["precision"], row["steps"], row["image_size"]) == \
        ("train_step", "cpu", "32-true", 3, 32)
    assert row["plain_samples_per_s"] > 0 and row["toolkit_samples_per_s"] > 0
    assert row["peak_gpu_memory_mib"] is None  # reported on CUDA only


def test_bench_train_takes_a_local_text_model(tiny_bert_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """--backbone: any local Hugging Face folder (the GPU script uses MiniLM's shape with random weights)."""
    assert cli.main(["bench", "train", "--modality", "text", "--backbone", str(tiny_bert_dir), "--steps", "2",
                     "--batch-size", "4", "--seq-len", "16", "--device", "cpu"]) == 0
    (row,) = bench_lines(capsys)
    assert row["backbone"] == str(tiny_bert_dir) and row["seq_len"] == 16 and row["toolkit_samples_per_s"] > 0


def test_bench_runtime_times_the_package_and_its_run(tiny_text_run: Path, text_package: Path, tiny_bert_dir: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "runtime", "--run", str(tiny_text_run), "--package", str(text_package),
                     "--runs", "8"]) == 0
    (row,) = bench_lines(capsys)
    assert (row["kind"], row["model"], row["precision"]) == ("runtime", str(tiny_bert_dir), "fp32")
    assert row["threads"] == torch.get_num_threads()
    assert row["torch_eager_p50_ms"] > 0 and row["onnxruntime_p50_ms"] > 0 and row["onnxruntime_iobinding_p50_ms"] > 0


@pytest.mark.parametrize(("argv", "needle"), [
    (["bench", "runtime"], "bench runtime: needs --run RUN_DIR and --package"),
    (["bench", "serve"], "bench serve: --package is required"),
    (["bench", "monitor"], "bench monitor: --package is required"),
    (["bench", "finetune"], "bench finetune: --data DIR is required: the rt-polarity folder"),
    (["bench", "export"], "bench export: --data DIR is required"),
    (["bench", "pipeline", "--modality", "text"], "bench pipeline --modality text: --data DIR is required"),
    (["bench", "serve", "--package", "p", "--concurrency", "1,x"], "--concurrency 1,x: expected comma-separated"),
    (["bench", "serve", "--package", "p", "--batching", "maybe"], "--batching maybe: give on, off or on,off"),
    (["bench", "train", "--steps", "0"], "bench train: --steps and --batch-size must be at least 1"),
    (["bench", "finetune", "--data", ".", "--variants", "full,fast"], "--variants full,fast: give a comma-separated"),
])
def test_bench_usage_errors_are_one_line_and_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_each_benchmark_gets_only_its_own_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The parser is shared: --out, --epochs, --runs given to `bench data` (which has none of them) are not passed on."""
    assert cli.main(["bench", "data", "--rows", "1500", "--out", str(tmp_path), "--epochs", "3", "--runs", "5"]) == 0
    assert bench_lines(capsys)[0]["rows"] == 1500


def test_bench_needs_both_rt_polarity_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "rt-polarity.pos").write_text("a fine film\n", encoding="latin-1")
    assert cli.main(["bench", "finetune", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"--data {tmp_path}: rt-polarity.neg missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


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
    assert "cache_build_s" not in rows["cpu_pil"]
    for row in rows.values():  # 256 generated JPEGs in one batch shape: every feed crops and resizes to 32 px
        assert (row["steps"], row["images"], row["baseline"], row["distinct_shapes"]) == (3, 256, "in_memory_tensors", 1)
        assert list(row["shapes"]) == ["32"] and row["shapes"]["32"]["steps"] == 3


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
