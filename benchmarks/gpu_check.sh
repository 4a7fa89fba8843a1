#!/usr/bin/env bash
# The prepared GPU check (issue 19): everything a CUDA machine can tell us that a CPU cannot, in one run of
# under 8 minutes on one H100/H200, written as markdown + JSON under one folder.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--data-root DIR] [--dry-run]
#
#   1. environment: GPU, driver, torch, CUDA (env.json)
#   2. the CUDA-only tests: pytest -m cuda (tests.txt; tests/conftest.py marks them)
#   3. mimkd bench, resnet32x4 -> resnet8x4, batch 64: kd, crd, mimkd, mimkd:critic_locations=16 in bf16 +
#      channels_last (batches already on the device), then the same with --compile (bench_bf16*, with the
#      projected 240-epoch CIFAR-100 times)
#   4. memory banks on the GPU at ImageNet size: mimkd bench --bank-size 1281167 --batch-size 256
#   5. a short real run on Fashion-MNIST: a teacher for 1 epoch, then kd and mimkd students, bf16,
#      data on the device (runs/, their summary.json)
#   6. a 1-GPU NCCL torchrun smoke test of mimkd distill (torchrun/)
#   summary.md + summary.json: every step's status and time, the key figures.
#
# --dry-run: the same steps on the CPU with tiny settings and gloo instead of NCCL (tests/test_gpu_check.py
# runs it, so the script stays runnable where no GPU is lent). Fashion-MNIST is read from --data-root, else
# data/fashion-mnist in the repository (carry it to a machine without internet), else Debian's
# /usr/share/datasets/fashion-mnist. A failed step is recorded and the next one runs; exit status 1 if any
# step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=runs/gpu_check
DRY=0
DATA_ROOT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --data-root) DATA_ROOT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR, --data-root DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -z "$DATA_ROOT" ]; then
  for d in data/fashion-mnist /usr/share/datasets/fashion-mnist; do
    [ -d "$d" ] && DATA_ROOT="$d" && break
  done
fi
mkdir -p "$OUT"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"

if [ "$DRY" = 1 ]; then
  DEV=cpu; PREC=fp32; BATCH=4; BSTEPS="--steps 1 --warmup 1 --rounds 1 --no-isolate"; BANK_N=5000; BANK_B=4
  METHODS="kd,mimkd:critic_locations=16"
  FRACTION=0.01; MAXSTEPS="--set train.max_steps_per_epoch=3"; COMPILE=""
  TESTS_TIMEOUT=120
else
  DEV=cuda; PREC=bf16; BATCH=64; BSTEPS="--steps 20 --warmup 5 --rounds 2"; BANK_N=1281167; BANK_B=256
  METHODS="kd,crd,mimkd,mimkd:critic_locations=16"
  FRACTION=0.1; MAXSTEPS=""; COMPILE="--compile"
  TESTS_TIMEOUT=150
fi

# step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record {"step", "rc", "seconds"}
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "[gpu_check] $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$STEPS"
  echo "[gpu_check] $name: rc $rc in $((SECONDS - start)) s"
  return 0
}

step env 60 "$PY" -c '
import json, sys, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
' "$OUT/env.json"

step tests "$TESTS_TIMEOUT" "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider

step bench_bf16 150 "$PY" -m mimkd bench --teacher resnet32x4 --student resnet8x4 --methods "$METHODS" \
  --device "$DEV" --precision "$PREC" --batch-size "$BATCH" $BSTEPS --out "$OUT/bench_$PREC"
if [ -n "$COMPILE" ]; then
  step bench_bf16_compile 180 "$PY" -m mimkd bench --teacher resnet32x4 --student resnet8x4 \
    --methods "$METHODS" --device "$DEV" --precision "$PREC" --batch-size "$BATCH" $BSTEPS $COMPILE \
    --out "$OUT/bench_${PREC}_compile"
fi
step banks 90 "$PY" -m mimkd bench --bank-size "$BANK_N" --batch-size "$BANK_B" --methods crd,mimkd \
  --device "$DEV" --out "$OUT/banks"

RUNS="$OUT/runs"
COMMON=(--data fashion_mnist --data-root "$DATA_ROOT" --device "$DEV" --no-progress --out "$RUNS"
  --set train.precision="$PREC" --set train.measure_latency=false)
step teacher 90 "$PY" -m mimkd train --model cnn_teacher "${COMMON[@]}" --name teacher --epochs 1 \
  --batch-size 128 $MAXSTEPS
for method in kd mimkd; do
  step "student_$method" 90 "$PY" -m mimkd distill --teacher "$RUNS/teacher/best.pt" --student conv4mp_w32 \
    --method "$method" "${COMMON[@]}" --name "$method" --epochs 2 --train-fraction "$FRACTION" \
    --batch-size 64 --set train.data_on_device=auto $MAXSTEPS
done

TORCHRUN="$(dirname "$PY")/torchrun"
[ -x "$TORCHRUN" ] || TORCHRUN=torchrun
step torchrun 120 "$TORCHRUN" --nproc_per_node 1 \
  --master_addr 127.0.0.1 --master_port 29517 -m mimkd distill --teacher "$RUNS/teacher/best.pt" \
  --student conv4mp_w32 --method crd --data fashion_mnist --data-root "$DATA_ROOT" --device "$DEV" \
  --no-progress --out "$OUT/torchrun" --name crd --epochs 1 --train-fraction 0.02 --batch-size 32 \
  --set train.max_steps_per_epoch=8 --set train.measure_latency=false

"$PY" benchmarks/gpu_check_summary.py "$OUT" --dry-run "$DRY"
