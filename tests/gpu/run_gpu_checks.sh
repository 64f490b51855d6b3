#!/usr/bin/env bash
# The project's GPU check, on a machine with a CUDA GPU: the GPU test suite (tests/gpu: every entry
# point on the GPU), then the training benchmark's DeepSeek-V2-Lite proxy (megatron_r1 with its
# grouped-GEMM experts against transformers 4.57; where the machine's own transformers is 5.x, a
# second run against its grouped_mm experts), in under 8 minutes, then a summary. (SequentialMLP's
# figures, measured before: shared/notes/gpu.md; `--moe-grouped-gemm` instead of `--only` adds them.)
# What it prints goes to $OUT/gpu_checks.log too when OUT is set.
#
#   bash tests/gpu/run_gpu_checks.sh [WHEELS_DIR]
#
# A machine without megatron-core (or with another transformers) gets the project's pins from
# WHEELS_DIR (default .gpu-wheels; fill it with ../shared/gpu/fetch_wheels.sh on a machine with a
# network): megatron-core under /tmp/site, transformers 4.57 and its tokenizers under
# /tmp/site-transformers4, both put first on PYTHONPATH (the second bench run leaves the latter out).
set -uo pipefail
cd "$(dirname "$0")/../.."
wheels=${1:-.gpu-wheels}
log=${OUT:-/tmp}/gpu_checks.log
exec > >(tee "$log") 2>&1

base_path=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ -d "$wheels" ]] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheels"/megatron_core-*.whl
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-transformers4 \
        $(ls "$wheels"/*.whl | grep -v megatron_core-)
    base_path=/tmp/site:$base_path
    export PYTHONPATH=/tmp/site-transformers4:$base_path
else
    export PYTHONPATH=$base_path
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
timeout 300 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -o addopts="" --durations=0 -rfE
tests_status=$?
tests_seconds=$((SECONDS - start))

start=$SECONDS
# --profile: each trainer's heaviest GPU operators over one step, for the next optimisation.
timeout 110 python3 benchmarks/bench_train.py --config v2-lite-proxy --only megatron_r1+gg,transformers \
    --warmup 1 --rounds 2 --steps 2 --profile
bench_status=$?
bench_seconds=$((SECONDS - start))

# transformers 5.x's DeepSeek-V3 runs its experts as grouped GEMMs (grouped_mm) by default: the
# second peer, where the machine's own transformers is 5.x.
bench5="not run (no transformers 5.x here)"
if PYTHONPATH=$base_path python3 -c "import sys, transformers; sys.exit(int(transformers.__version__.split('.')[0]) < 5)"
then
    start=$SECONDS
    PYTHONPATH=$base_path timeout 90 python3 benchmarks/bench_train.py --config v2-lite-proxy \
        --only megatron_r1+gg,transformers --warmup 1 --rounds 2 --steps 2
    bench5="exit $? in $((SECONDS - start)) s"
fi

echo
echo "=== GPU checks: tests/gpu exit $tests_status in ${tests_seconds} s; bench_train.py exit $bench_status" \
    "in ${bench_seconds} s; against transformers 5.x: $bench5"
[[ $tests_status -eq 0 && $bench_status -eq 0 ]]
