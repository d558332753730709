#!/usr/bin/env sh
# Run a command pinned to the first free GPU of a list, so `make -j N all-combos GPUS=0,1,2,3` gives each
# job its own GPU. A GPU is "taken" while its flock is held; the lock dies with the process, so a killed
# sweep leaves nothing stale.
#   sh gpu_slot.sh 0,1,2,3 python train.py --train IDR ...
#   sh gpu_slot.sh "" python train.py ...        (empty list: run unpinned)
gpus=$1; shift
[ -z "$gpus" ] && exec "$@"
lockdir=${GPU_LOCK_DIR:-/tmp}
while :; do
  for g in $(echo "$gpus" | tr ',' ' '); do
    # -E 75: "this GPU is busy", distinct from the command's own exit codes
    flock -n -E 75 "$lockdir/retlesions-gpu$g.lock" env CUDA_VISIBLE_DEVICES="$g" "$@"
    rc=$?
    [ "$rc" -ne 75 ] && exit "$rc"
  done
  sleep 5
done
