#!/usr/bin/env bash
# Every GPU check of one device lease, in one go (~10 min on an H200): the CUDA tests, then trials per hour and
# tokens/s of each decoder against HF `generate` for the 1B and 7B Llama shapes (bf16, random weights).
# Run from the repository root with evomerge's dependencies importable. The lent H200's python 3.12 lacks optuna,
# alembic, sqlalchemy, greenlet, colorlog, mako, cma, cmaes, pydantic(-core), annotated-types, typing-inspection,
# datasets, lm-eval (and its own needs), interegular and pytest: carry them as cp312 wheels (the device README's
# `pip download` line), install them with --target and put that folder on PYTHONPATH. The log goes to
# ${OUT:-runs}/gpu_check.log.
set -o pipefail
out=${OUT:-runs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    timeout 240 python3 -m pytest -q -rs -p no:cacheprovider -k cuda \
        tests/test_evaluate.py tests/test_merge.py tests/test_fused.py
    timeout 420 python3 benchmarks/search_throughput.py --device cuda --dtype bfloat16 --shapes 1b 7b \
        --sources 1 --docs 64 --batch-size 64 --new-tokens 64 --repeats 3
} 2>&1 | tee "$out/gpu_check.log"
