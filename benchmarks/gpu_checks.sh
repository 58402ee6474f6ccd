#!/usr/bin/env bash
# The GPU checks and figures in one run, for a machine with one CUDA GPU:
#   1. the tests that need CUDA: the network's field on the GPU against the CPU's, warps
#      against scipy, mixed precision close to float32 with float32 fields and losses;
#   2. full-size (160x224x192) inference, float32 and mixed precision (bf16 where the GPU has
#      it): seconds and peak memory per pair;
#   3. one full-size training step: float32, checkpointing, mixed precision, both.
# Tables are printed and appended to benchmarks/RESULTS.md with the GPU's name; the folder
# given (default gpu_checks) receives each log and the sections appended (RESULTS_new.md).
# Needs the runtime requirements (requirements.txt) and pytest; nothing is downloaded.
#
#     bash benchmarks/gpu_checks.sh [OUTPUT_FOLDER]
set -uo pipefail
out=${1:-gpu_checks}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -c "import sys, torch
if not torch.cuda.is_available():
    sys.exit(f'gpu_checks.sh: torch {torch.__version__} sees no CUDA GPU')
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 2
before=$(wc -l < benchmarks/RESULTS.md)
status=0
python3 -m pytest -q -p no:cacheprovider -k "cuda or amp" tests/models/test_plcreg.py tests/utils/test_spatial.py \
    tests/engine/test_amp.py 2>&1 | tee "$out/tests.log" || status=1
python3 benchmarks/bench_inference.py --device cuda --amp --runs 5 --warmup 2 --write \
    --label "Full-size inference on a GPU: fp32 and mixed precision" 2>&1 | tee "$out/inference.log" || status=1
python3 benchmarks/bench_train.py --device cuda --runs 3 --warmup 1 --write \
    --label "Full-size training step on a GPU: fp32, checkpointing, mixed precision" 2>&1 | tee "$out/train.log" \
    || status=1
tail -n +"$((before + 1))" benchmarks/RESULTS.md > "$out/RESULTS_new.md"
exit $status
