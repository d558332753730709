"""train.py: loss, schedule, patch stream, resume bit-identity, checkpoints, DDP, NaN guard, CLI errors.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_train.py
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "test_resnet", "--no-pretrained", "--resolution", "128", "--patch", "64", "--batch", "2",
        "--device", "cpu", "--dtype", "float32", "--workers", "0", "--warmup", "2"]


def tiny_args(synth_root, cache_dir, out, *extra, train_ids="IDR"):
    return train.parse_args(["--train", train_ids, "--data-root", str(synth_root), "--cache", str(cache_dir),
                             "--out", str(out), *TINY, *extra])




def read_log(run_dir, split):
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# ----------------------------------------------------------------------------- pure pieces
def test_loss_counts_only_fov_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9, 11) * 3
    masks = (torch.rand(2, 4, 9, 11) > 0.7).float()
    fov = torch.rand(2, 9, 11) > 0.3
    # Reference: plain BCE over the FOV pixels only, selected by boolean indexing.
    sel = fov[:, None].expand_as(logits)
    ref = F.binary_cross_entropy_with_logits(logits[sel], masks[sel])
    got = train.compute_loss(logits, masks, fov, "bce")
    torch.testing.assert_close(got, ref)
    # Anything outside the FOV leaves every loss unchanged.
    noisy = torch.where(sel, logits, torch.randn_like(logits) * 50)
    for kind in ("bce", "dice", "bce+dice"):
        torch.testing.assert_close(train.compute_loss(noisy, masks, fov, kind),
                                   train.compute_loss(logits, masks, fov, kind))
    # Soft Dice against a brute-force loop over lesions.
    p = torch.sigmoid(logits) * fov[:, None]
    y = masks * fov[:, None]
    ref_dice = sum(1 - (2 * (p[:, c] * y[:, c]).sum() + 1) / (p[:, c].sum() + y[:, c].sum() + 1) for c in range(4)) / 4
    torch.testing.assert_close(train.compute_loss(logits, masks, fov, "dice"), ref_dice)
    # The probability form (validation) agrees with the logit form (training).
    for kind in ("bce", "dice", "bce+dice"):
        torch.testing.assert_close(train.compute_loss(torch.sigmoid(logits), masks, fov, kind, probs=True),
                                   train.compute_loss(logits, masks, fov, kind), rtol=1e-4, atol=1e-5)


def test_lr_schedule_warmup_then_cosine():
    f = [train.lr_factor(s, warmup=4, iters=20) for s in range(20)]
    assert f[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])  # linear, never 0 at the first step
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # cosine decays monotonically
    assert train.lr_factor(20, 4, 20) == pytest.approx(0.0)
    assert train.lr_factor(12, 4, 20) == pytest.approx(0.5)  # half way through the decay


def test_step_sampler_slices_one_global_stream():
    single = list(train.StepSampler(0, 5, batch=4))
    assert single == list(range(20))
    # Two ranks with half the batch read disjoint halves of the same global batches.
    r0, r1 = list(train.StepSampler(0, 5, 2, 0, 2)), list(train.StepSampler(0, 5, 2, 1, 2))
    for s in range(5):
        assert sorted(r0[2 * s:2 * s + 2] + r1[2 * s:2 * s + 2]) == single[4 * s:4 * s + 4]
    # Starting at step 3 is the tail of the stream: what a resumed run reads.
    assert list(train.StepSampler(3, 5, 4)) == single[12:]
    assert len(train.StepSampler(3, 5, 4)) == 8


# ----------------------------------------------------------------------------- training runs
def test_short_run_lowers_training_loss(synth_root, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(synth_root, cache_dir, out, "--iters", "40", "--val-every", "40", "--log-every", "1",
                     "--lr", "1e-2", "--loss", "bce")
    result = train.run(args)
    losses = [r["loss"] for r in read_log(out, "train")]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert result["finished"] and result["step"] == 40 and math.isfinite(result["loss"])
    (val,) = read_log(out, "val")
    assert set(val["aupr"]) == {"EX", "HE", "MA", "CWS"}


@pytest.fixture(scope="module")
def straight_run(synth_root, cache_dir, tmp_path_factory):
    """An uninterrupted 6-step run, validating every 2 steps (dropout on, so the RNG state matters)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    calls = []
    args = tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2", "--snapshot-every", "3",
                     "--dropout", "0.3", "--val-metric", "loss")
    result = train.run(args, on_validate=lambda step, m: calls.append((step, m)))
    return out, args, result, calls


def test_on_validate_sees_every_validation(straight_run):
    _, _, result, calls = straight_run
    assert [s for s, _ in calls] == [2, 4, 6]
    step, m = calls[-1]
    assert m["step"] == 6 and len(m["aupr"]) == 4 and len(m["dice"]) == 4 and m["metric"] == m["loss"]
    assert result["loss"] == m["loss"] and result["best"] == min(c[1]["loss"] for c in calls)


def test_resume_is_bit_identical(straight_run, synth_root, cache_dir, tmp_path):
    ref_dir, _, _, _ = straight_run
    out = tmp_path / "run"
    common = ["--iters", "6", "--val-every", "2", "--snapshot-every", "3", "--dropout", "0.3", "--val-metric", "loss"]
    # Stop between two validations (step 3), then rerun the same command.
    stopped = train.run(tiny_args(synth_root, cache_dir, out, *common, "--stop-at", "3"))
    assert not stopped["finished"]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    train.run(tiny_args(synth_root, cache_dir, out, *common))
    ref = torch.load(ref_dir / "last.pt", weights_only=True)
    got = torch.load(out / "last.pt", weights_only=True)
    assert got["step"] == ref["step"] == 6
    assert ref["model"].keys() == got["model"].keys()
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], got["model"][k]), k
    for i, state in ref["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, got["optimizer"]["state"][i][name]), (i, name)
    assert got["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"]
    # The logs agree too (the training lines after the stop are not duplicated).
    assert [r["loss"] for r in read_log(out, "val")] == [r["loss"] for r in read_log(ref_dir, "val")]
    assert [r["step"] for r in read_log(out, "train")] == [r["step"] for r in read_log(ref_dir, "train")]
    names = [sorted(p.name for p in (d / "snapshots").iterdir()) for d in (out, ref_dir)]
    assert names[0] == names[1]


def test_checkpoints_load_weights_only_without_prefixes(straight_run):
    out, args, _, _ = straight_run
    paths = [out / "last.pt", out / "best.pt", *sorted((out / "snapshots").glob("step_*.pt"))]
    assert out / "snapshots" / "step_000003.pt" in paths and out / "snapshots" / "step_000006.pt" in paths
    for path in paths:
        ckpt = torch.load(path, weights_only=True)
        for key in ("model", "model_cfg", "args", "step", "epoch", "optimizer", "scaler", "metric", "version"):
            assert key in ckpt, (path, key)
        assert ckpt["version"] == 1 and ckpt["args"]["train"] == ["IDR"]
        assert ckpt["model_cfg"]["encoder"] == "test_resnet"
        assert not [k for k in ckpt["model"] if k.startswith(("module.", "_orig_mod."))]
        assert any(k.startswith("encoder.") for k in ckpt["model"])
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["optimizer"] is not None and last["scaler"] is None  # float32: no GradScaler
    assert json.loads((out / "args.json").read_text())["seed"] == args.seed


def test_val_loss_minima_are_kept_as_snapshots(synth_root, cache_dir, tmp_path, monkeypatch):
    # Scripted validation losses at steps 2, 4, 6, 8, 10: the local minima (lower than both
    # neighbours, paper section 2.5) are steps 4 and 8. The run stops at step 5, between the candidate
    # (4) and the validation that proves it a minimum (6), so the candidate must survive the resume.
    script = {2: 5.0, 4: 3.0, 6: 4.0, 8: 2.0, 10: 6.0}
    seen = {}

    def fake_validate(model, val_sets, device, dtype, loss_kind, lesions=None):
        step = 2 * (len(seen) + 1)
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"loss": script[step], "mean_aupr": 0.5, "mean_ap": 0.5, "mean_dice": 0.5, "aupr": [0.5] * 4,
                "ap": [0.5] * 4, "dice": [0.5] * 4}

    monkeypatch.setattr(train, "validate", fake_validate)
    out = tmp_path / "run"
    common = ["--iters", "10", "--val-every", "2", "--val-metric", "loss", "--keep-last", "0"]  # minima only
    train.run(tiny_args(synth_root, cache_dir, out, *common, "--stop-at", "5"))
    train.run(tiny_args(synth_root, cache_dir, out, *common))
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_000004.pt", "step_000008.pt"]
    for s in (4, 8):
        snap = torch.load(out / "snapshots" / f"step_{s:06d}.pt", weights_only=True)
        assert snap["snapshot"] == "validation" and snap["step"] == s and snap["metric"] == script[s]
        assert snap["optimizer"] is None  # model-only: averaging needs no optimizer state
        for k, v in seen[s].items():
            assert torch.equal(snap["model"][k], v), (s, k)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == 8 and best["metric"] == 2.0


def test_finished_run_is_not_retrained(straight_run, capsys):
    out, args, _, _ = straight_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = train.run(args)
    assert result["finished"] and result["step"] == 6
    assert "already finished" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_on_validate_exception_propagates(synth_root, cache_dir, tmp_path):
    class Pruned(Exception):
        pass

    def prune(step, metrics):
        raise Pruned(step)

    out = tmp_path / "run"
    with pytest.raises(Pruned):
        train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2"), on_validate=prune)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2  # saved before the callback


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth_root, cache_dir, tmp_path, monkeypatch):
    real, calls = train.compute_loss, []

    def nan_from_step_5(scores, masks, fov, kind, probs=False):
        loss = real(scores, masks, fov, kind, probs)
        if not probs:  # training calls only
            calls.append(1)
            if len(calls) >= 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train, "compute_loss", nan_from_step_5)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train.run(tiny_args(synth_root, cache_dir, out, "--iters", "10", "--val-every", "2"))
    msg = str(err.value)
    assert "\n" not in msg and "nan" in msg and "step 5" in msg and "--lr" in msg and "float32" in msg
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- DDP and the command line
WORKER = """
import os, runpy, sys
# Each rank works in its own directory, so a file written with a relative path shows who wrote it.
here = os.path.join(sys.argv[1], "rank" + os.environ["RANK"])
os.makedirs(here)
os.chdir(here)
sys.argv = [{train!r}] + sys.argv[2:]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_ddp_two_cpu_processes_only_rank0_writes(synth_root, cache_dir, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(train=str(ROOT / "train.py")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
           str(tmp_path), "--train", "IDR", "--data-root", str(synth_root), "--cache", str(cache_dir),
           "--out", "run", *TINY, "--iters", "3", "--val-every", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "rank1")) == []  # rank 1 wrote nothing
    run_dir = tmp_path / "rank0" / "run"
    assert {"last.pt", "best.pt", "args.json", "log.jsonl"} <= set(os.listdir(run_dir))
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["step"] == 3 and len(last["rng"]["torch"]) == 2  # one RNG state per rank
    assert not [k for k in last["model"] if k.startswith(("module.", "_orig_mod."))]
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_bad_train_flag_is_a_one_line_error(tmp_path):
    cases = {"IDR,XYZ": "error: --train: unknown dataset ID 'XYZ'", "": "error: --train: empty dataset list"}
    # Both processes at once: most of their time is importing torch on a busy CPU.
    procs = {ids: subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--train", ids, "--data-root",
                                    str(tmp_path), "--out", str(tmp_path / "run")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for ids in cases}
    for ids, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert stderr.strip().startswith(cases[ids]), stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- faults on a real run (issue 13)
def test_resume_with_other_settings_is_refused_in_one_line(straight_run, synth_root, cache_dir, tmp_path):
    out, args, _, _ = straight_run
    common = ["--iters", "6", "--val-every", "2", "--snapshot-every", "3", "--dropout", "0.3", "--val-metric", "loss"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ValueError) as err:
        train.run(tiny_args(synth_root, cache_dir, out, *common, "--lr", "1e-3", "--loss", "bce", "--patch", "32"))
    msg = str(err.value)
    assert "\n" not in msg and str(out / "last.pt") in msg and "another --out" in msg
    for change in ("--lr 0.0003 -> 0.001", "--loss bce+dice -> bce", "--patch 64 -> 32"):
        assert change in msg, msg
    with pytest.raises(ValueError, match="--train IDR -> IDR,MES"):
        train.run(tiny_args(synth_root, cache_dir, out, *common, train_ids="IDR,MES"))
    with pytest.raises(ValueError, match="--iters 4 is below step 6"):
        train.run(tiny_args(synth_root, cache_dir, out, *common[2:], "--iters", "4"))
    # The flags that may change on resume are accepted (here: a finished run, so nothing to do).
    assert train.run(tiny_args(synth_root, cache_dir, out, *common, "--log-every", "3", "--stop-at", "9"))["finished"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # args.json was not rewritten
    # The number of training images is recorded (evaluate.py copies it into results.json, report.py orders by it).
    n = len(train.PreparedDataset(cache_dir, "IDR", 128, "train"))
    assert json.loads((out / "args.json").read_text())["n_train_images"] == n > 0
    assert torch.load(out / "best.pt", weights_only=True)["args"]["n_train_images"] == n


def test_ctrl_c_keeps_last_pt_and_the_rerun_is_bit_identical(straight_run, synth_root, cache_dir, tmp_path,
                                                             monkeypatch, capsys):
    ref_dir = straight_run[0]
    real, calls = train.compute_loss, []

    def ctrl_c_at_step_5(scores, masks, fov, kind, probs=False):
        if not probs:
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
        return real(scores, masks, fov, kind, probs)

    out = tmp_path / "run"
    common = ["--iters", "6", "--val-every", "2", "--snapshot-every", "3", "--dropout", "0.3", "--val-metric", "loss"]
    monkeypatch.setattr(train, "compute_loss", ctrl_c_at_step_5)
    with pytest.raises(KeyboardInterrupt) as err:  # tune.py catches KeyboardInterrupt
        train.run(tiny_args(synth_root, cache_dir, out, *common))
    assert str(err.value) == f"interrupted at step 4; rerun the same command to resume from {out / 'last.pt'} " \
                             f"(saved at step 4)"
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "compute_loss", real)
    capsys.readouterr()
    train.run(tiny_args(synth_root, cache_dir, out, *common))
    ref, got = (torch.load(d / "last.pt", weights_only=True) for d in (ref_dir, out))
    assert got["step"] == 6 and all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    # Each validation prints one line above the bar; the run ends with a summary naming its outputs.
    printed = capsys.readouterr().out.splitlines()
    (val,) = read_log(out, "val")[-1:]
    (line,) = [p for p in printed if p.startswith("step 6: ")]
    assert f"val loss {val['loss']:.4f}" in line and f"EX {val['dice']['EX']:.3f}" in line and "best" in line
    (summary,) = [p for p in printed if p.startswith("done: ")]
    assert str(out / "best.pt") in summary and str(out / "curves.png") in summary and "at step" in summary
