#!/usr/bin/env bash
# The device run (bench/gpu/README.md): on a lent GPU, from the repository root with .whl carried,
#   bash bench/gpu/run.sh                 # installs the bundle, then every phase of bench/gpu/device_run.py
#   bash bench/gpu/run.sh --cpu-smoke     # the same phases on this CPU, tiny and fp32 (the test suite runs it)
# Results and logs go to $OUT (the device tool's folder that comes back), else ./gpu_run_out.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_run_out}
mkdir -p "$OUT"
t0=$(date +%s)
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    PY=${PY:-.venv/bin/python}
    echo "== install: skipped (--cpu-smoke runs in this checkout's venv)"
else
    PY=python3
    site=/tmp/sftdist_site
    rm -rf "$site" && mkdir -p "$site"
    # The device's own torch (its CUDA build) stays; the bundle adds what the image lacks (make gpu-bundle).
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    # sftdist from this working tree, laid out as its wheel would be (conf/ is the package sftdist.conf)
    mkdir -p "$site/sftdist" && cp -r sftdist/. "$site/sftdist/" && cp -r conf "$site/sftdist/conf"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    # DeepSpeed travels with no ops prebuilt: its fused Adam builds once here (nvcc), before the timed runs, in
    # the directory sftdist's runs load ops from (build_locks.use_env_extensions_dir).
    $PY -c "from sftdist.engine.build_locks import use_env_extensions_dir as use; print('ops in', use())
from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" 2>&1 | tail -2 || true
    echo "== install: $(( $(date +%s) - t0 )) s"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
if [[ "${1:-}" != "--cpu-smoke" ]]; then
    # The tests only a GPU can run (varlen attention, no host sync in a forward, Liger, bf16 training).
    timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt" | tail -8 || true
    echo "== gpu tests: $(( $(date +%s) - t0 )) s"
fi
# Everything within 8 minutes: the driver stops starting optional rows when its share is spent.
$PY bench/gpu/device_run.py --out "$OUT" --budget-s $(( 470 - ($(date +%s) - t0) )) "$@" 2>&1 \
    | tee "$OUT/gpu_run_console.txt"
echo "== total: $(( $(date +%s) - t0 )) s"
