#!/usr/bin/env bash
# The project's GPU check, on a machine with a CUDA GPU: the GPU test suite (tests/gpu: every entry
# point on the GPU) and the training benchmark's DeepSeek-V2-Lite proxy against transformers, in
# under 8 minutes, then a summary. What it prints goes to $OUT/gpu_checks.log too when OUT is set.
#
#   bash tests/gpu/run_gpu_checks.sh [WHEELS_DIR]
#
# A machine without megatron-core (or with another transformers) gets the project's pins from
# WHEELS_DIR (default .gpu-wheels; fill it with ../shared/gpu/fetch_wheels.sh on a machine with a
# network), installed under /tmp/site and put first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/../.."
wheels=${1:-.gpu-wheels}
log=${OUT:-/tmp}/gpu_checks.log
exec > >(tee "$log") 2>&1

if [[ -d "$wheels" ]] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v python >/dev/null; then  # the examples call `python`
    mkdir -p /tmp/gpu-check-bin && ln -sf "$(command -v python3)" /tmp/gpu-check-bin/python
    export PATH=/tmp/gpu-check-bin:$PATH
fi
python3 - <<'PY' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU here: nothing to check")
import megatron.core, transformers
print(f"GPU: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}; python {sys.version.split()[0]}, "
      f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}")
PY

start=$SECONDS
timeout 330 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -o addopts="" --durations=0 -rfE
tests_status=$?
tests_seconds=$((SECONDS - start))

start=$SECONDS
timeout 120 python3 benchmarks/bench_train.py --config v2-lite-proxy --warmup 1 --rounds 2 --steps 2
bench_status=$?
bench_seconds=$((SECONDS - start))

echo
echo "=== GPU checks: tests/gpu exit $tests_status in ${tests_seconds} s; bench_train.py exit $bench_status in ${bench_seconds} s"
[[ $tests_status -eq 0 && $bench_status -eq 0 ]]
