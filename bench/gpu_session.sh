#!/usr/bin/env bash
# One call on a lent GPU machine (its Python has torch and triton; `pip install -e .` fails there):
# the package is run from the tree, with kernels/ and csrc/ copied where the installed layout has them.
#   bash bench/gpu_session.sh tests|passes|training|autoclip|adamw ...   (results under $OUT, or bench/results)
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
rm -rf torch_clip_fused/kernels torch_clip_fused/csrc
cp -r kernels torch_clip_fused/kernels
cp -r csrc torch_clip_fused/csrc
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for what in "$@"; do
  case "$what" in
    tests) timeout ${TESTS_TIMEOUT:-280} python3 -m pytest -q -n ${TESTS_WORKERS:-8} -p no:cacheprovider -o addopts="" --timeout 120 -rfE tests \
             >"$OUT/tests.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed|node down|Fatal" "$OUT/tests.log" | cut -c1-300 | tail -40 ;;
    passes) timeout 300 python3 bench/benchmark_passes_cuda.py --out "$OUT" ${PASSES_ARGS:-} 2>&1 | tail -40 ;;
    training) timeout 300 python3 bench/benchmark_training.py --device cuda --out "$OUT" ${TRAINING_ARGS:-} 2>&1 | tail -30 ;;
    autoclip) timeout 120 python3 bench/autoclip_history_cost.py --device cuda --out "$OUT" 2>&1 | tail -12 ;;
    adamw) timeout 400 python3 bench/benchmark_adamw.py --device cuda --out "$OUT" ${ADAMW_ARGS:-} 2>&1 | tail -45 ;;
    *) echo "unknown part $what"; exit 2 ;;
  esac
done
