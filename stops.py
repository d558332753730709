"""How a training run stops early and says so: Ctrl-C (Interrupted) and the stop signals of a
scheduler (Stopped). A stop signal is only recorded while train.py runs; its loop stops at the end
of the step, where saving last.pt is safe, and exits EXIT_STOPPED (docs/TRAINING.md).
"""
import signal
import threading

import torch
import torch.distributed as dist


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, carrying the line that says how to resume (tune.py catches it)."""


# Stop signals: Slurm's warning before a time limit (sbatch --signal=B:USR1@S), a preemption or
# scancel (SIGTERM). EX_TEMPFAIL (sysexits.h): stopped, last.pt written; rerun to resume.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_STOPPED = 75
_received = []  # the stop signals received during run(); train_loop looks after every step


class Stopped(Interrupted):
    """A stop signal ended the run after a step, last.pt written there: main() exits EXIT_STOPPED;
    tune.py takes it as a Ctrl-C (the trial is queued again and resumes from last.pt)."""


def catch_stop_signals():
    """From now on a stop signal is only recorded (the loop stops at the end of the step, where
    saving is safe) -> the handlers it replaced, for restore_signals. Only the main thread may set
    handlers (Python's rule): elsewhere (optuna's threads) the signals keep theirs."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: _received.append(signum))
    return previous


def restore_signals(previous):
    for s, handler in previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn. NOTE: a scheduler signals every process of the job; a worker
    killed by SIGTERM would end the run ("DataLoader worker exited unexpectedly") unsaved. A worker
    started by spawn/forkserver keeps the default action until this runs; one that ignores SIGTERM
    ends with the main process, or by the scheduler's SIGKILL after its KillWait."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def any_rank_received(world, device):
    """Did this process (under DDP: any rank; all must stop at the same step) get a stop signal?"""
    if world == 1:
        return bool(_received)
    flag = torch.tensor(float(bool(_received)), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def stopped(how):
    """The Stopped exception of a received stop signal: "stopped by SIGUSR1 HOW (exit 75)"."""
    name = signal.Signals(_received[0]).name if _received else "another rank's signal"
    return Stopped(f"stopped by {name} {how} (exit {EXIT_STOPPED})")
