#!/usr/bin/env bash
# Resume after a hard kill: start train.py, `kill -9` it once OUT/last.pt exists, rerun the same command;
# the rerun must print "resuming" and finish (exit 0, a final validation at --iters). Used by gpu_check.sh.
#   bash bench/gpu_check_resume.sh PYTHON OUT TRAIN_ARGS...      # TRAIN_ARGS without --out
#   bash bench/gpu_check_resume.sh .venv/bin/python /tmp/r --train IDR --data-root d --iters 20 --val-every 5
set -u
PY=$1 OUT=$2
shift 2
rm -rf "$OUT"

echo "-- first run, killed with -9 once $OUT/last.pt appears"
"$PY" train.py "$@" --out "$OUT" &
pid=$!
while kill -0 "$pid" 2>/dev/null && [ ! -f "$OUT/last.pt" ]; do sleep 0.1; done
if ! kill -9 "$pid" 2>/dev/null; then
  # NOTE: the run ended before we could kill it (too few steps for this GPU): nothing was tested
  wait "$pid"
  echo "error: the first run exited (rc $?) before it could be killed; raise --iters"
  exit 1
fi
wait "$pid" 2>/dev/null
echo "killed pid $pid at $(date +%T); last.pt present: $([ -f "$OUT/last.pt" ] && echo yes || echo no)"

echo "-- second run, same command"
"$PY" train.py "$@" --out "$OUT" 2>&1 | tee "$OUT.rerun.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "error: the resumed run failed (rc $rc)"
  exit 1
fi
if ! grep -q "resuming" "$OUT.rerun.log"; then
  echo "error: the rerun did not resume (no 'resuming' line): it started over"
  exit 1
fi
echo "resume ok: $(grep -m 1 resuming "$OUT.rerun.log")"
