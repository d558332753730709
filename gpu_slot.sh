#!/usr/bin/env sh
# Run a command pinned to the first free GPU of a list, so `make -j N all-combos GPUS=0,1,2,3` gives each
# job its own GPU. A GPU is "taken" while its flock is held; the lock dies with the process, so a killed
# sweep leaves nothing stale.
#   sh gpu_slot.sh 0,1,2,3 python train.py --train IDR ...
#   sh gpu_slot.sh "" python train.py ...        (empty list: run unpinned)
gpus=$1; shift
[ -z "$gpus" ] && exec "$@"
lockdir=${GPU_LOCK_DIR:-/tmp}
# NOTE: flock exits BUSY when the GPU's lock is held: a code no program here exits with (the
# scripts: 1 on an error, 130 on Ctrl-C; train.py 75 when a signal stopped it), so a command's own
# exit is never taken for "busy" and the command rerun on the next GPU.
BUSY=111
while :; do
  for g in $(echo "$gpus" | tr ',' ' '); do
    flock -n -E "$BUSY" "$lockdir/retlesions-gpu$g.lock" env CUDA_VISIBLE_DEVICES="$g" "$@"
    rc=$?
    [ "$rc" -ne "$BUSY" ] && exit "$rc"
  done
  sleep 5
done
