#!/usr/bin/env bash
# Every GPU check and benchmark in one go, sized for a short loan of one H100/H200 (about 13 minutes):
#
#   OUT=gpu-results bash bench/gpu_checks.sh          # from the repository root, ssltrain and its extras installed
#   OUT=gpu-results bash bench/gpu_checks.sh bench-vit-methods bench-kernels    # only these steps (a loan's calls
#                                                     # are limited to 10 minutes each: split the steps over two)
#
# Each step writes its output under $OUT and a failing step does not stop the others; the summary at the end says
# which failed. DALI must be importable for the dali rows and tests (pip install 'ssltrain[dali]', or the NGC image).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
failed=()

only=" $* "
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output (skipped when not asked for)
    local name=$1 limit=$2
    shift 2
    if [ "$only" != "  " ] && [[ "$only" != *" $name "* ]]; then
        return
    fi
    echo "== $name (limit ${limit}s)"
    if ! timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1; then
        failed+=("$name")
    fi
    tail -n 25 "$OUT/$name.txt"
}

{ nvidia-smi -L; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
step pytest-gpu 240 python -m pytest -q -m gpu -p no:cacheprovider tests
step bench-kernels 180 python bench/kernels.py --quick --json "$OUT/kernels.json"
step bench-train 240 python bench/train.py --steps 20 --json "$OUT/train.json"
step bench-data 120 python bench/data.py --images 1000 --seconds 20
step bench-vit-methods 300 python bench/vit_methods.py --steps 50 --json "$OUT/vit_methods.json"
echo "failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
