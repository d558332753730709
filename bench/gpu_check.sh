#!/usr/bin/env bash
# The GPU check of issue 17: one command, <= 8 minutes on one H100/H200-class GPU, one JSON of figures.
#   pip install -r requirements.txt -r requirements-dev.txt     # once, on the GPU machine (or carry a .venv)
#   bash bench/gpu_check.sh gpu_check_out                       # -> gpu_check_out/gpu_check.json + logs/
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh out         # another interpreter
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh /tmp/dry       # dry run: every step at toy sizes on the CPU
# Steps (each under its own `timeout`; a failed step is recorded and the next one runs):
#   env            GPU name, torch / triton / CUDA versions
#   pytest_cuda    tests/test_kernels.py -k cuda with the compiled Triton kernel (TRITON_INTERPRET=0)
#   counts         binned_counts on 1536 px maps, float32 and bfloat16: GB/s vs a copy of the same bytes
#                  (target >= 70 %), speed vs torchmetrics on the same GPU (target >= 20x)
#   bench_metrics  bench/bench_metrics.py --device cuda: counts vs torchmetrics and the twin, its own timings
#   share          counting's share of an evaluate.py pass: forward of the paper's model vs counting, per image
#   train_step     bench/bench_train.py: legacy_seresnet101, 512 px, batch 8, bfloat16 + channels_last, eager
#                  and torch.compile, vs smp.Unet("se_resnet101") (target ratio <= 1.0), patches/s, peak memory
#   synth, train, evaluate   train.py ~200 steps on synthetic 1536 px data in bfloat16 + channels_last, then
#                  evaluate.py on its best.pt
#   torchrun       torchrun --nproc-per-node 1 train.py --sync-bn (NCCL)
#   resume         train.py killed with -9 once last.pt exists, rerun: must print "resuming" and finish
# No network is needed: every model is built with random weights (--no-pretrained).
set -u

OUT=${1:-gpu_check_out}
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
# A shared CPU is slower than the GPU machine at everything (startup included): the dry run's limits
# are the GPU's times GPU_CHECK_SCALE (default 3 on the CPU, 1 on CUDA), its budget as well.
if [ "$DEVICE" = cpu ]; then SCALE=${GPU_CHECK_SCALE:-3}; else SCALE=${GPU_CHECK_SCALE:-1}; fi
BUDGET=${GPU_CHECK_BUDGET:-$((480 * SCALE))}  # seconds for the whole check: no step runs past what is left
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT/logs" "$OUT/steps" "$OUT/work"
OUT=$(cd "$OUT" && pwd)
START=$SECONDS

if [ "$DEVICE" = cpu ]; then
  # Dry run: the same commands at toy sizes, a tiny encoder, no code generation for torch.compile
  ENCODER=test_resnet; PEER_ENCODER=tu-test_resnet; MAP_SIZE=256; MAP_IMAGES=2; REPEATS=2
  PATCH=64; RESOLUTION=128; BATCH=4; SYNTH_SIZE=192; ITERS=20; VAL_EVERY=10; STEPS=2; RESUME=(10 2)
  COMPILE_BACKEND=eager; WORKERS=0; DECODER="--decoder-channels 32,16,16,8,8"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  # The paper's settings (REFERENCE: docs/PROTOCOL.md): 1536 px images, 512 px patches, batch 8
  ENCODER=legacy_seresnet101.in1k; PEER_ENCODER=se_resnet101; MAP_SIZE=1536; MAP_IMAGES=32; REPEATS=10
  PATCH=512; RESOLUTION=1536; BATCH=8; SYNTH_SIZE=1536; ITERS=200; VAL_EVERY=100; STEPS=10; RESUME=(60 20)
  COMPILE_BACKEND=inductor; WORKERS=4; DECODER=""
  export TRITON_INTERPRET=0  # NOTE: tests/conftest.py sets it to 1 unless it is set: the GPU must compile
fi

step() {  # step NAME LIMIT_S CMD...: run CMD under timeout, log to logs/NAME.log, record "rc seconds"
  local name=$1 limit=$2 left t0 rc
  shift 2
  limit=$((limit * SCALE))
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 5 ]; then
    echo "skipped: the ${BUDGET} s budget of the check is spent" >"$OUT/logs/$name.log"
    echo "125 0" >"$OUT/steps/$name.rc"
    echo "== $name: skipped (budget spent)"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  awk -v rc="$rc" -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%d %.1f\n", rc, t1 - t0 }' \
    >"$OUT/steps/$name.rc"
  [ "$rc" -eq 0 ] || echo "   failed (rc $rc): $(tail -n 1 "$OUT/logs/$name.log")"
  return 0
}

# The run folders of train.py must start empty: a leftover last.pt would make `train` a resume
W=$OUT/work
rm -rf "$W/runs"
TRAIN_ARGS=(--train IDR --data-root "$W/data" --cache "$W/cache" --resolution "$RESOLUTION" --patch "$PATCH"
  --batch "$BATCH" --encoder "$ENCODER" --no-pretrained --device "$DEVICE" --dtype bfloat16 --channels-last
  --workers "$WORKERS" --log-every 10)
# shellcheck disable=SC2206  # DECODER is empty or one flag and its value
TRAIN_ARGS+=($DECODER)

step env 30 "$PY" bench/gpu_check.py env --json "$OUT/steps/env.json"
step pytest_cuda 60 "$PY" -m pytest -q tests/test_kernels.py -k cuda -rs --junitxml "$OUT/steps/pytest_cuda.xml"
step counts 60 "$PY" bench/gpu_check.py counts --device "$DEVICE" --images "$MAP_IMAGES" --size "$MAP_SIZE" \
  --repeats "$REPEATS" --json "$OUT/steps/counts.json"
step bench_metrics 40 "$PY" bench/bench_metrics.py --device "$DEVICE" --images "$MAP_IMAGES" --size "$MAP_SIZE" \
  --repeats 3
step share 35 "$PY" bench/gpu_check.py share --device "$DEVICE" --encoder "$ENCODER" --size "$MAP_SIZE" \
  --images "$REPEATS" --json "$OUT/steps/share.json"
step train_step 110 "$PY" bench/bench_train.py --device "$DEVICE" --encoder "$ENCODER" --peer-encoder "$PEER_ENCODER" \
  --size "$PATCH" --batch "$BATCH" --steps "$STEPS" --warmup 2 --no-float32 --compile \
  --compile-backend "$COMPILE_BACKEND" --json "$OUT/steps/train_step.json"

# Synthetic IDRiD at full size, prepared once so that `train` times training, not preprocessing
step synth 30 bash -c "rm -rf '$W/data' '$W/cache' && '$PY' -m data.synthetic --out '$W/data' --images 8 \
  --size $SYNTH_SIZE --datasets IDR && '$PY' -m data.prepare --dataset IDR --data-root '$W/data' \
  --cache '$W/cache' --resolution $RESOLUTION"
step train 75 "$PY" train.py "${TRAIN_ARGS[@]}" --out "$W/runs/train" --iters "$ITERS" --val-every "$VAL_EVERY"
step evaluate 25 "$PY" evaluate.py --ckpt "$W/runs/train/best.pt" --test IDR --data-root "$W/data" \
  --cache "$W/cache" --device "$DEVICE" --dtype bfloat16 --out "$OUT/steps/evaluate.json"
step torchrun 35 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 train.py "${TRAIN_ARGS[@]}" \
  --out "$W/runs/torchrun" --iters 20 --val-every 10 --sync-bn
step resume 45 bash bench/gpu_check_resume.sh "$PY" "$W/runs/resume" "${TRAIN_ARGS[@]}" \
  --iters "${RESUME[0]}" --val-every "${RESUME[1]}"

# Figures from the training logs (the steps' own rc says whether they passed), then everything into one JSON
for run in train torchrun resume; do
  [ -f "$W/runs/$run/log.jsonl" ] && "$PY" bench/gpu_check.py train-log "$W/runs/$run" \
    --json "$OUT/steps/$run.json" >/dev/null
done
"$PY" bench/gpu_check.py merge "$OUT"
echo "gpu check done in $((SECONDS - START)) s: $OUT/gpu_check.json, logs in $OUT/logs"
