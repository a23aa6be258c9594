#!/usr/bin/env bash
# On a GPU machine: the GPU tests, the tune sweep and the benchmark, each logging under $RESULTS_DIR
# (default gpu-results/). Run from the repository root, with prebuilt FlashInfer kernels and
# wheels where the machine is offline (docs/offline-gpu.md):
#   bash benchmarks/gpu_run.sh tests tune bench        # any subset, in that order
# HARDWARE=h100|h200|auto (default auto) picks the profile; TUNE_NAME (default tuned) names the one tune writes. Extra Hydra overrides for a step:
# TUNE_ARGS='tune.repeats=1' BENCH_ARGS="'bench.levels=[op]'".
set -uo pipefail
RESULTS_DIR=${RESULTS_DIR:-gpu-results}
mkdir -p "$RESULTS_DIR"
# offline machines: RD_WHEELS=dir of wheels to install first, RD_ACTIVATE=script that points
# FlashInfer at prebuilt kernels (docs/offline-gpu.md)
if [ -n "${RD_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$RD_WHEELS"/*.whl >/dev/null 2>&1
fi
if [ -n "${RD_ACTIVATE:-}" ]; then source "$RD_ACTIVATE"; fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$RESULTS_DIR/card.txt"
for step in "$@"; do
  start=$(date +%s)
  case $step in
    tests) python -m pytest -v -p no:cacheprovider tests/gpu > "$RESULTS_DIR/gpu_tests.txt" 2>&1 ;;
    tune) eval python -m rangedispatch.cli.tune "tune.name=${TUNE_NAME:-tuned}" "hardware=${HARDWARE:-auto}" "tune.out_dir=$RESULTS_DIR/tune" \
            "${TUNE_ARGS:-}" > "$RESULTS_DIR/tune.log" 2>&1 ;;
    bench) eval python -m rangedispatch.cli.bench "hardware=${HARDWARE:-auto}" "bench.out_dir=$RESULTS_DIR/bench" \
             "${BENCH_ARGS:-}" > "$RESULTS_DIR/bench.log" 2>&1 ;;
    *) echo "unknown step $step (tests, tune, bench)"; exit 2 ;;
  esac
  echo "$step: exit $? in $(( $(date +%s) - start )) s" | tee -a "$RESULTS_DIR/steps.txt"
done
