"""`bench runtime`: batch-1 latency of the package in onnxruntime vs the run's checkpoint in torch eager."""

from __future__ import annotations

from typing import Any

from deepship.bench.common import ratio


def bench_runtime(run_dir: str, package: str, runs: int = 200, blocks: int = 4) -> list[dict[str, Any]]:
    """CPU batch-1 p50: onnxruntime (the package) vs torch eager (the run's best.ckpt), on one real
    validation input through each path's own preprocessing; the calls take turns in blocks."""
    import numpy as np
    import torch

    from deepship.data.split import load_splits
    from deepship.evaluation.latency import median_ms, time_in_turns
    from deepship.export.onnx import training_inputs
    from deepship.run import load_run
    from deepship.runtime.predictor import Predictor

    run, predictor = load_run(run_dir), Predictor.load(package)
    sample = load_splits(run.config).val.inputs[:1]
    torch_inputs, arrays = training_inputs(run, sample), predictor.preprocess(sample)
    binding = predictor.session.io_binding()

    def bound() -> np.ndarray:
        """The same call through IO binding (inputs and logits bound on the CPU)."""
        for name in predictor.input_names:
            binding.bind_cpu_input(name, arrays[name])
        binding.bind_output("logits", "cpu")
        predictor.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    np.testing.assert_allclose(bound(), predictor.run(arrays), rtol=1e-5, atol=1e-6)  # same answer
    with torch.inference_mode():
        times = time_in_turns({"torch_eager": lambda: run.module(**torch_inputs),
                               "onnxruntime": lambda: predictor.run(arrays), "onnxruntime_iobinding": bound},
                              runs, blocks)
    p50 = {name: median_ms(seconds) for name, seconds in times.items()}
    return [{"kind": "runtime", "model": run.config.model.backbone, "precision": predictor.manifest.get("precision"),
             "threads": torch.get_num_threads(), "torch_eager_p50_ms": round(p50["torch_eager"], 3),
             "onnxruntime_p50_ms": round(p50["onnxruntime"], 3),
             "onnxruntime_over_torch": ratio(p50["onnxruntime"], p50["torch_eager"]),
             "onnxruntime_iobinding_p50_ms": round(p50["onnxruntime_iobinding"], 3),
             "iobinding_over_plain": ratio(p50["onnxruntime_iobinding"], p50["onnxruntime"])}]
