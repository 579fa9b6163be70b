#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one device call (about 9 minutes on an H100/H200). Prepare first, here:
#   RT_POLARITY_DIR=/path/to/rt-polarity bash scripts/gpu_prepare.sh
# then on the GPU machine, carrying .gpu:   bash scripts/gpu_bench.sh
# Results: $OUT/gpu_bench.jsonl (one JSON line per measurement) and $OUT/log.txt (everything printed).
# Each step has its own time limit, so one slow step cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-bench}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
JSONL="$OUT/gpu_bench.jsonl"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
  || { echo "gpu_bench: wheels missing; run scripts/gpu_prepare.sh here and carry .gpu" | tee -a "$LOG"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__,
'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

# MiniLM-L6's architecture with random weights (speed does not depend on the weights)
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
config = AutoConfig.from_pretrained(".gpu/minilm", num_labels=2)
AutoModelForSequenceClassification.from_config(config).save_pretrained("/tmp/minilm-random")
AutoTokenizer.from_pretrained(".gpu/minilm").save_pretrained("/tmp/minilm-random")
EOF

step() {  # step SECONDS ARGS...: one benchmark, its JSON lines kept
  local limit=$1; shift
  echo "== bench $* (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" python3 scripts/bench.py "$@" 2>&1 | tee -a "$LOG" | grep '^{' >> "$JSONL"
}

step 90 train --modality image --batch-size 256 --image-size 224 --steps 50
step 180 train --modality image --batch-size 256 --image-size 224 --steps 50 --compile
step 90 train --modality text --batch-size 256 --seq-len 64 --steps 50 --backbone /tmp/minilm-random
step 120 pipeline --modality text --batch-size 256 --steps 100 --data .gpu/rt-polarity --backbone /tmp/minilm-random
python3 -c "from deepship.bench.pipeline import write_bench_jpegs as w; w('/tmp/jpegs', n=2048, size=(500, 375))"
step 150 pipeline --modality image --batch-size 256 --image-size 224 --steps 30 --data /tmp/jpegs

# A real (short) text training run: the SDPA backend it measures and its peak GPU memory, from metrics.json
python3 - <<'PYEOF' 2>&1 | tee -a "$LOG"
import csv, yaml
rows = [(line.strip(), label) for label in ("pos", "neg")
        for line in open(f".gpu/rt-polarity/rt-polarity.{label}", encoding="latin-1") if line.strip()]
with open("/tmp/rt.csv", "w", newline="") as f:
    csv.writer(f).writerows([("text", "label"), *rows])
yaml.safe_dump({"task": "text_classification", "data": {"train": "/tmp/rt.csv", "max_length": 128},
                "model": {"backbone": "/tmp/minilm-random"},
                "train": {"max_epochs": 1, "batch_size": 256, "limit_train_batches": 30, "out_dir": "/tmp/runs",
                          "run_name": "rt", "overwrite": True}}, open("/tmp/rt.yaml", "w"))
PYEOF
echo "== train rt-polarity (limit 120s)" | tee -a "$LOG"
timeout 120 python3 scripts/train.py --config /tmp/rt.yaml 2>&1 | tail -5 | tee -a "$LOG"
python3 -c "import json; m = json.load(open('/tmp/runs/rt/metrics.json')); print(json.dumps({'kind': 'text_run',
'sdpa_backend': m['sdpa_backend'], 'peak_gpu_memory_mib': m['peak_gpu_memory_mib'], 'precision': m['precision'],
'train_samples_per_s': m['train_samples_per_s'], 'device': m['device']}))" 2>&1 | tee -a "$LOG" | grep '^{' >> "$JSONL"

echo "== gpu-marked tests" | tee -a "$LOG"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_training.py tests/test_pipeline.py \
  tests/test_evaluation.py tests/test_perfbench.py -k "gpu or cuda or wait_for_the_device" 2>&1 | tee -a "$LOG"
echo "== done" | tee -a "$LOG"
