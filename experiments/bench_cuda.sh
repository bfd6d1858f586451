#!/usr/bin/env bash
# Every CUDA check and benchmark in one go, about 5 minutes on one H100 / H200:
#
#   bash experiments/bench_cuda.sh [OUTPUT_DIR] [DATA_DIR]
#
# 1. the CUDA tests (tests/test_cuda.py) plus the decoder, sampler and learner tests;
# 2. the three bench suites on Q05 (bf16), each writing OUTPUT_DIR/<suite>_cuda_Q05.json, each
#    part timed against its floor (its products at the measured matmul rate; a decode step also
#    against the memory-bandwidth bound), 5 interleaved rounds for the spread;
# 3. the headline experiment's --quick version on the GPU (needs DATA_DIR, the folder
#    with ml-100k/ or reddit-v2/; skipped without it).
# Runs from the repository root with the python3 that has torch with CUDA (set PYTHON
# to choose another; SUITES to run fewer bench suites). Exits non-zero if any step
# failed; the other steps still run.
set -uo pipefail
out="${1:-experiments/results}"
data_dir="${2:-}"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"

echo "== tests"
"$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_decoder.py tests/test_rollout.py \
    tests/test_learner.py 2>&1 | tee "$out/pytest_cuda.log" || status=1

for suite in ${SUITES:-rollout logprobs step}; do
    echo "== bench $suite Q05"
    profile=""
    [ "$suite" != logprobs ] && profile="--profile"
    "$python" -m experiments.bench "$suite" --device cuda --config Q05 --repeats 5 $profile \
        --json "$out/${suite}_cuda_Q05.json" || status=1
done

if [ -n "$data_dir" ]; then
    echo "== rank_grpo_reddit --quick on the GPU"
    run_dir="$(mktemp -d)"
    RECRL_CACHE_DIR="$run_dir/cache" "$python" -m experiments.run rank_grpo_reddit --quick --device cuda \
        --data-dir "$data_dir" --out "$run_dir/run" || status=1
    cp "$run_dir/run/metrics.jsonl" "$out/rank_grpo_reddit_quick_cuda_metrics.jsonl" 2>/dev/null || true
fi
exit $status
