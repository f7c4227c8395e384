#!/usr/bin/env bash
# One GPU session in one command: install the carried wheels, say what the machine is, run the GPU smoke
# test (bench/gpu_smoke.py) and the GPU benchmarks, and leave logs and JSON in $OUT (7 files).
#
#   bash .gpu/gpu_session.sh            # from the checkout's root, with .gpu/ laid out as below
#   bash .gpu/gpu_session.sh smoke      # only the smoke test, ZeRO-2 then ZeRO-3
#
# .gpu/ (ignored by git, carried to the GPU machine; bench/gpu_pack.sh builds it):
#   whl/       cp312 manylinux wheels of what the machine lacks: ray (without its Java jar and dashboard
#              web UI), deepspeed (pure, no compiled ops), pydantic, jsonschema, tensorboardX, ...
#   src/       vallex/ and bench/ of the branch under test (imported first: PYTHONPATH)
#   prepare/   the smoke test's prepared corpus with its recognizer (written on CPU by gpu_smoke.py)
# Every step has its own time limit inside LIMIT seconds (the device call's own limit is a little more),
# most important first: a step that overruns costs the ones after it, never the files already written.
set -u
cd "$(dirname "$0")/.." || exit 1
G=$(basename "$(dirname "$0")")
LIMIT=${LIMIT:-340}
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
left() { echo $((LIMIT - SECONDS - ${1:-0})); }
step() {  # step NAME SECONDS LOGFILE command...: runs it with a limit that fits the time left
  local name=$1 want=$2 logf=$3
  shift 3
  local t
  t=$(left 5)
  ((t < want)) || t=$want
  if ((t < 20)); then
    echo "[$SECONDS s] $name: skipped, $(left) s left" | tee -a "$OUT/$logf"
    return
  fi
  echo "[$SECONDS s] $name (limit $t s): $*" | tee -a "$OUT/$logf"
  # From src/: Ray puts the driver's working directory first on its workers' sys.path, so a run from
  # the checkout's root would train with the checkout's vallex/, not the one under test.
  (cd "$SRC" && timeout -k 5 "$t" "$@") >>"$OUT/$logf" 2>&1
  echo "[$SECONDS s] $name: exit $?" | tee -a "$OUT/$logf"
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl || exit 1
SRC=$PWD/$G/src
PREPARED=$PWD/$G/prepare
export PYTHONPATH=$SRC:/tmp/site PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5
export PATH=/tmp/site/bin:$PATH
{
  nvidia-smi
  nproc
  free -g
  python3 -c "import sys, torch, ray, deepspeed, pydantic, numpy, pyarrow; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'pydantic', pydantic.__version__, 'numpy', numpy.__version__, 'pyarrow', pyarrow.__version__)"
} >"$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

if [ "${1:-}" = smoke ]; then
  step "smoke ZeRO-2, ZeRO-3" 300 smoke.log python3 bench/gpu_smoke.py --stages 2 3 --steps 30 \
    --prepared "$PREPARED" --out /tmp/smoke --json "$OUT/smoke.json"
  tar czf "$OUT/logs.tgz" --ignore-failed-read /tmp/smoke/logs /tmp/smoke/zero*/train/metrics.jsonl \
    /tmp/ray/session_*/logs/worker-*.err 2>/dev/null
  grep -hE " (PASS|FAIL|PASSED|FAILED)|step +[0-9]+/|ZeRO-| [a-z][a-z] +[0-9]" "$OUT/smoke.log" | cut -c1-400
  echo "[$SECONDS s] done"
  exit 0
fi

# 1. The smoke test, ZeRO-2: the real trainer on the GPU, bf16, evaluations, a checkpoint and a resume.
step "smoke ZeRO-2" 170 smoke.log python3 bench/gpu_smoke.py --stages 2 --steps 30 \
  --prepared "$PREPARED" --out /tmp/smoke2 --json "$OUT/smoke_zero2.json"
# 2. The GPU figures: MFU fp32 vs bf16 (the demo's model and the paper's size), then DeepSpeed's stages
#    and precisions against plain PyTorch on the GPU.
step "bench/model.py small" 45 bench.log python3 bench/model.py --device cuda --size small --steps 10
step "bench/model.py paper" 60 bench.log python3 bench/model.py --device cuda --size paper --batch 32 --steps 10
step "bench/train.py --gpu" 120 bench.log python3 bench/train.py --gpu --d-model 1024 --layers 12 --batch 32 --steps 15
# 3. What an evaluation costs against training on the GPU (the demo's model and settings, 1 rank, fp32).
step "bench/evaluation.py cuda" 90 bench.log python3 bench/evaluation.py --device cuda --repeats 2 train.num_workers=1
# 4. The smoke test again with ZeRO-3, if time is left.
step "smoke ZeRO-3" 150 smoke.log python3 bench/gpu_smoke.py --stages 3 --steps 15 \
  --prepared "$PREPARED" --out /tmp/smoke3 --json "$OUT/smoke_zero3.json"

# The vallex logs of both smoke runs and Ray's worker logs (what a failure leaves), for reading here.
tar czf "$OUT/logs.tgz" --ignore-failed-read /tmp/smoke2/logs /tmp/smoke3/logs \
  /tmp/smoke2/zero2/train/metrics.jsonl /tmp/smoke3/zero3/train/metrics.jsonl \
  /tmp/ray/session_*/logs/worker-*.err 2>/dev/null
ls -la "$OUT"
# What matters, in the call's own output too (the files come back beside it).
grep -hE " (PASS|FAIL|PASSED|FAILED)|step +[0-9]+/" "$OUT/smoke.log" | cut -c1-400
grep -hvE "^\[20|Warning|warn|^ *$|INFO|WARNING" "$OUT/bench.log" | tail -60
echo "[$SECONDS s] done"
