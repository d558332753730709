"""The run folder of train.py (OUT): who holds it, whether a resume may go on, which snapshots
stay, and log.jsonl. The standard library and utils only: train.py --help lists RESUMABLE before
torch loads.

    OUT/.lock               held by the one train.py of this folder (lock_run)
    OUT/last.pt, best.pt    what a run resumes from, what it selected (train.py writes them)
    OUT/snapshots/step_N.pt the validated weights prune_snapshots keeps (SWA, soups)
    OUT/log.jsonl           a line per log step and per validation (append_log, trim_log)
"""
import fcntl
import json
import os
import socket

import utils

# The flags that may differ between a run and its resume (train.py --help lists them).
RESUMABLE = ("iters", "stop_at", "val_every", "snapshot_every", "log_every", "workers", "device",
             "dtype", "compile", "channels_last", "sync_bn", "data_root", "cache", "root", "out",
             "test")


def lock_run(out):
    """Hold OUT/.lock (fcntl.flock) for the run's life: a second train.py on the same --out refuses
    at once. NOTE: the kernel drops a flock when its process ends, killed or not: no stale lock.
    Returns the file descriptor; closing it releases the lock."""
    utils.writable_folder(out, "--out", "write the run there")  # one line naming the flag
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process not yet named"
        os.close(fd)
        raise ValueError(f"{out} is in use by another train.py ({holder}); wait for it to end or "
                         f"pass another --out") from None
    os.ftruncate(fd, 0)  # then name the holder, for the line that refuses the next train.py
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def plain(value):
    """argparse values -> JSON-able (tuples become lists), as args.json holds them."""
    return json.loads(json.dumps(value))


def check_resume_args(recorded, args, path, step):
    """Refuse to continue the run of `path` (at `step`) under settings other than its own: its
    args.json would describe a run that never happened. Only the RESUMABLE flags may change."""
    now = plain(vars(args))
    differ = [k for k in now if k not in RESUMABLE and k in recorded and recorded[k] != now[k]]
    if differ:
        shown = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
        changes = ", ".join(f"--{k.replace('_', '-')} {shown(recorded[k])} -> {shown(now[k])}"
                            for k in differ)
        raise ValueError(f"{path} was trained with other settings ({changes}); rerun with the "
                         f"run's own flags to resume it, or pass another --out (train.py --help "
                         f"lists the flags that may change)")
    if args.iters < step:
        raise ValueError(f"--iters {args.iters} is below step {step} of {path}; resume with "
                         f"--iters >= {step} or pass another --out")


def remove_partial_writes(out):
    """Remove the temporary files (.NAME.XXXXXXXX.tmp, as large as a checkpoint) of writes a killed
    run left. Only train.py writes these names in a run folder. Hold OUT/.lock."""
    ours = ("last.pt", "best.pt", "args.json", "log.jsonl", "curves.png")
    for path in [*out.glob(".*.tmp"), *(out / "snapshots").glob(".*.tmp")]:
        if path.parent.name == "snapshots" or path.name[1:].rsplit(".", 2)[0] in ours:
            path.unlink(missing_ok=True)


def snapshot_path(out, step):
    return out / "snapshots" / f"step_{step:06d}.pt"


def val_loss_minima(history):
    """Steps of the validations whose loss is lower than both neighbours' (paper section 2.5)."""
    return {b["step"] for a, b, c in zip(history, history[1:], history[2:])
            if b["loss"] < min(a["loss"], c["loss"])}


def history_length(args):
    """How many validation records last.pt keeps: the last --keep-last (at least the latest) and
    the two before them, which judge whether the first of those is a local minimum."""
    return max(1, args.keep_last) + 2


def prune_snapshots(out, history, args, finished=False, step=None):
    """The one snapshot rule (docs/TRAINING.md), after each validation and on resume, idempotent.
    Of the validations in `history`, snapshots/step_N.pt stays when its loss is a local minimum,
    when it is one of the last --keep-last (at least the latest while training) or a
    --snapshot-every step; files of steps after `step` (default: the latest validation's) go.
    NOTE: the first record of a full history has lost its left neighbour: it was judged one
    validation earlier, with both; left alone."""
    full = len(history) >= history_length(args)  # records were dropped (train.validate_and_save)
    judged = {r["step"] for r in (history[1:] if full else history)}  # see the NOTE
    n = args.keep_last if finished else max(1, args.keep_last)  # the last validations kept
    keep = val_loss_minima(history) | ({r["step"] for r in history[-n:]} if n else set())
    latest = step if step is not None else history[-1]["step"] if history else -1
    for path in sorted((out / "snapshots").glob("*step_*.pt")):
        at = int(path.stem.rsplit("_", 1)[1])
        if path.name.startswith("pending_"):  # NOTE: the older two-state layout: the same weights
            os.replace(path, snapshot_path(out, at))
            path = snapshot_path(out, at)
        periodic = args.snapshot_every and at % args.snapshot_every == 0
        if at > latest or (at in judged and at not in keep and not periodic):
            path.unlink()


def append_log(path, record):
    """One line of OUT/log.jsonl (NaN as null); a full disk is one OSError naming the log."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(utils.null_nan(record)) + "\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def trim_log(path, step):
    """On resume, drop the log lines after the checkpoint's step (they will be redone) and a last
    line cut short by a crash."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    utils.write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))
