"""runfolder.py: the lock of a run folder, the resume check, the snapshot rule, log.jsonl.

    .venv/bin/python -m pytest -q tests/test_runfolder.py
"""
import argparse
import json
import os

import pytest

import runfolder


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    out = tmp_path / "run"
    fd = runfolder.lock_run(out)  # makes the folder
    try:
        with pytest.raises(ValueError, match=f"pid {os.getpid()}") as err:
            runfolder.lock_run(out)  # another open file description: flock refuses it
        assert str(out) in str(err.value) and "--out" in str(err.value)
    finally:
        os.close(fd)
    os.close(runfolder.lock_run(out))  # released with its descriptor


def test_resume_check_lets_only_the_resumable_flags_change(tmp_path):
    recorded = {"train": ["IDR"], "lr": 0.0003, "iters": 100, "workers": 8, "decoder_channels": [8]}
    same = argparse.Namespace(train=["IDR"], lr=0.0003, iters=200, workers=0, decoder_channels=(8,))
    runfolder.check_resume_args(recorded, same, tmp_path / "last.pt", step=50)  # --iters, --workers
    other = argparse.Namespace(**{**vars(same), "lr": 0.001, "train": ["IDR", "DDR"]})
    with pytest.raises(ValueError) as err:
        runfolder.check_resume_args(recorded, other, tmp_path / "last.pt", step=50)
    assert "--lr 0.0003 -> 0.001" in str(err.value) and "--train IDR -> IDR,DDR" in str(err.value)
    below = argparse.Namespace(**{**vars(same), "iters": 40})
    with pytest.raises(ValueError, match="--iters 40 is below step 50"):
        runfolder.check_resume_args(recorded, below, tmp_path / "last.pt", step=50)


def test_trim_log_keeps_the_lines_up_to_the_step_and_drops_a_cut_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (10, 20, 30, 40)]
    log.write_text("\n".join(lines) + '\n{"step": 50, "spl')  # a crash cut the last write short
    runfolder.trim_log(log, 30)
    assert log.read_text().splitlines() == lines[:3]
    runfolder.trim_log(tmp_path / "absent.jsonl", 30)  # a run that never logged: nothing to do


def test_only_train_pys_temporary_files_are_removed(tmp_path):
    (tmp_path / "snapshots").mkdir()
    ours = [tmp_path / ".last.pt.1a2b3c4d.tmp", tmp_path / ".log.jsonl.00aa11bb.tmp",
            tmp_path / "snapshots" / ".step_000002.pt.0c1d2e3f.tmp"]
    theirs = [tmp_path / ".results.json.9a8b7c6d.tmp", tmp_path / "last.pt"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    runfolder.remove_partial_writes(tmp_path)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


@pytest.mark.parametrize("keep_last, every", [(0, 0), (1, 0), (2, 6), (3, 4)])
def test_prune_snapshots_keeps_every_minimum_of_a_long_run(keep_last, every, tmp_path):
    """The snapshot rule over 20 validations (every 2 steps), against a brute-force reading of the
    whole loss curve: the local minima (paper section 2.5), the last --keep-last validations and the
    --snapshot-every steps stay, nothing else; a minimum stays after its neighbours have left the
    short history that last.pt keeps."""
    losses = [5, 3, 4, 2, 6, 1, 1.5, 0.5, 0.7, 0.9, 0.4, 0.6, 0.3, 0.2, 0.8, 0.1, 0.9, 0.85, 0.95,
              0.9]
    args = argparse.Namespace(keep_last=keep_last, snapshot_every=every)
    (tmp_path / "snapshots").mkdir()
    history = []
    for i, loss in enumerate(losses):  # train.validate_and_save's order: file, history, rule
        runfolder.snapshot_path(tmp_path, 2 * (i + 1)).write_bytes(b"")
        history = history + [{"step": 2 * (i + 1), "loss": loss}]
        history = history[-runfolder.history_length(args):]
        runfolder.prune_snapshots(tmp_path, history, args)
    runfolder.prune_snapshots(tmp_path, history, args, finished=True)
    steps = [2 * (i + 1) for i in range(len(losses))]
    want = {steps[i] for i in range(1, len(losses) - 1)
            if losses[i] < min(losses[i - 1], losses[i + 1])}
    want |= set(steps[len(steps) - keep_last:]) if keep_last else set()
    want |= {s for s in steps if every and s % every == 0}
    assert sorted(int(p.stem[5:]) for p in (tmp_path / "snapshots").iterdir()) == sorted(want)
