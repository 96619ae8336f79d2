#!/usr/bin/env bash
# One prepared pass over the CUDA path, sized for a 10-minute device call (bench/README.md, GPU).
# Writes its logs to $OUT (or bench/out/gpu): the main job on CUDA, the test suite on CUDA,
# and CIFAR-scale training / attack throughput. Each step has its own time limit so a slow
# one cannot starve the rest. Wheels for packages the machine lacks (lpips, submitit) may sit
# in .whl/.
set -u
OUT=${OUT:-bench/out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 -c "import torch;print(torch.__version__, torch.cuda.get_device_name())"; } | tee "$OUT/machine.txt"
step() {  # step NAME SECONDS CMD...: run, log, time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}
STEPS=${STEPS:-"mainjob pytest bench"}  # also: levers (batch 512 + CUDA graphs), screen (seed spread)
for s in $STEPS; do case $s in
  mainjob) step mainjob "${MAIN_S:-170}" privbench run --results-dir /tmp/pbres --out /tmp/pbres/tables/main
           cp /tmp/pbres/tables/main/table.md "$OUT/table.md" 2>/dev/null ;;
  pytest)  step pytest "${TEST_S:-160}" python3 -m pytest -q -n 8 -m "not ray" -p no:cacheprovider --timeout 150 tests ;;
  bench)   step bench "${BENCH_S:-170}" python3 bench/bench.py --n-train 50000 --width 1 --epochs 3 --workers 8 \
             --defense none --defense gmm-cem --defense slot-cem --attack-images 2000 --out "$OUT/bench.json" ;;
  levers)  step levers "${LEVERS_S:-200}" python3 bench/bench.py --n-train 50000 --width 1 --epochs 3 --skip-reference \
             --batch-size 512 --compile reduce-overhead --defense none --defense gmm-cem --defense slot-cem \
             --attack-images 2000 --metric-images 2000 --out "$OUT/levers.json" ;;
  screen)  step screen "${SCREEN_S:-300}" python3 bench/lever_screen.py "$OUT/screen.jsonl" --workers "${WORKERS:-10}" \
             --seeds "${SEEDS:-0-29}" --deadline "${DEADLINE:-230}" ${PLAN:+--plan "$PLAN"} ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
tail -n 3 "$OUT"/*.log
