#!/bin/bash
# One Slurm task of `make slurm-sweep` or `make slurm-tune` (docs/STUDY.md): runs COMMAND, followed
# by this array task's ITEM when a `--` list follows it, and requeues the task when Slurm warns it
# of its time limit.
#   sbatch --array=0-1 --requeue --open-mode=append --signal=B:USR1@600 slurm_task.sh 1 \
#       make RUNS=runs -- runs/IDR/s0/results.json runs/IDR/s1/results.json
#   sbatch --dependency=afterany:1234 slurm_task.sh 0 make report RUNS=runs
# RETRIES (the first argument): how many times a task whose COMMAND failed is requeued.
# SIGUSR1 (sbatch --signal=B:USR1@SECONDS: to this script only) is passed to all of COMMAND (make,
# train.py): train.py writes last.pt at the end of its step and exits 75, and the task requeues
# itself (scontrol requeue: the job needs --requeue; --open-mode=append keeps every attempt in one
# log); the next attempt resumes from last.pt. At most MAX_REQUEUES such requeues per task (20, or
# MAX_REQUEUES in the environment). SIGTERM (scancel, a preemption: Slurm requeues a preempted
# --requeue job itself) is passed on too, and the task ends there. Exit status: COMMAND's.
MAX_REQUEUES=${MAX_REQUEUES:-20}
retries=$1
shift
cmd=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do cmd+=("$1"); shift; done
if [ "$1" = -- ]; then
  shift
  item=${@:$((${SLURM_ARRAY_TASK_ID:-0} + 1)):1}
  if [ -z "$item" ]; then
    echo "slurm_task: error: no item for array task ${SLURM_ARRAY_TASK_ID:-(none)} of $#" >&2
    exit 2
  fi
  cmd+=("$item")
fi
job=$SLURM_JOB_ID
task=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID}
what=${item:-${cmd[*]}}
echo "slurm_task: $(date '+%F %T') job ${task:-$job} on $(hostname)," \
  "attempt $((${SLURM_RESTART_COUNT:-0} + 1)): $what"
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress bars: a log line every 30 s, not 10 a s

# NOTE: set -m runs COMMAND in a process group of its own, so a signal reaches all of it but not
# this script, whose trap would see it again (set +m then: no job-status lines in the log). There
# train.py ends its step, writes last.pt and exits 75 (its DataLoader workers ignore the signal);
# evaluate.py ends at once (the next attempt evaluates again). GNU make itself does not end (it
# catches SIGUSR1 to toggle its debug output; on SIGTERM it waits for its commands), but the shell
# it runs train.py in (/bin/sh -c) does, at once: make then reports "User defined signal 1" and
# exits while train.py is still saving. bash runs a trap only once the command it waits on
# returns: hence COMMAND in the background and `wait`.
got=
child=
forward() {
  got=${got:-$1}
  [ -n "$child" ] && kill -s "$1" -- "-$child" 2>/dev/null
}
group_alive() {  # a process of COMMAND's group still runs (zombies aside)
  ps -e -o pgid=,stat= | awk -v g="$child" '$1 == g && $2 !~ /^Z/ {n++} END {exit !n}'
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
set -m
"${cmd[@]}" &
child=$!
set +m
wait "$child"
rc=$?
while kill -0 "$child" 2>/dev/null; do  # wait returned for a trapped signal: wait for COMMAND
  wait "$child"
  rc=$?
done
# NOTE: COMMAND (make) may have ended before train.py (above): the task ends (and Slurm kills
# what is left) only once the whole group has ended, last.pt written.
while [ -n "$got" ] && group_alive; do sleep 1; done
[ "$rc" -eq 0 ] && exit 0

requeue() {  # back to pending: Slurm ends this attempt
  scontrol requeue "$job" && exit 0
  echo "slurm_task: error: scontrol requeue $job failed; submit the task again" >&2
  exit "$rc"
}
# Earlier attempts of this task that ended with a line starting with $1, counted in its log (its
# stdout, appended across attempts). NOTE: where stdout is no file (--output=/dev/null), every
# requeue of the task counts (SLURM_RESTART_COUNT: Slurm's own too), so that no count stays at 0
# and requeues a task forever.
earlier() {
  if [ -f "/proc/$$/fd/1" ]; then
    grep -c "^$1" "/proc/$$/fd/1"
  else
    echo "${SLURM_RESTART_COUNT:-0}"
  fi
}
case $got in
USR1)
  requeues=$(earlier 'slurm_task: time limit near')
  if [ "$requeues" -ge "$MAX_REQUEUES" ]; then
    echo "slurm_task: error: $what reached its time limit $((requeues + 1)) times; not" \
      "requeued again (MAX_REQUEUES in slurm_task.sh); a longer --time needs fewer" >&2
    exit "$rc"
  fi
  echo "slurm_task: time limit near (SIGUSR1): requeued; the next attempt resumes from last.pt"
  requeue ;;
TERM)
  echo "slurm_task: stopped by SIGTERM (scancel, or a preemption that Slurm requeues): exit $rc"
  exit "$rc" ;;
esac
# A failure of its own: requeued RETRIES times
failures=$(earlier 'slurm_task: failed')
if [ -n "$job" ] && [ "$failures" -lt "$retries" ]; then
  echo "slurm_task: failed (exit $rc): requeued, retry $((failures + 1)) of $retries"
  requeue
fi
echo "slurm_task: error: $what failed (exit $rc) $((failures + 1)) time(s); not requeued" \
  "again; the lines above say why" >&2
exit "$rc"
