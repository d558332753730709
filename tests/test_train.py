"""train.py: loss, schedule, patch stream, validation, resume bit-identity, checkpoints and
snapshots, DDP, the run folder's lock, faults (NaN, Ctrl-C, a full disk, a deleted last.pt),
--lesions, --style-condition, CLI errors.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_train.py
"""
import errno
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import average
import model
import protocol
import runfolder
import stops
import train
import utils
from data import LESIONS, PreparedDataset
from model import build_model, config_from_dict, load_checkpoint, load_models

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "test_resnet", "--no-pretrained", "--resolution", "128", "--patch", "64",
        "--batch", "2", "--device", "cpu", "--dtype", "float32", "--workers", "0", "--warmup", "2"]


def argv(synth_root, cache_dir, out, *extra, train_ids="IDR"):
    return ["--train", train_ids, "--data-root", str(synth_root), "--cache", str(cache_dir),
            "--out", str(out), *TINY, *extra]


def tiny_args(synth_root, cache_dir, out, *extra, train_ids="IDR"):
    return train.parse_args(argv(synth_root, cache_dir, out, *extra, train_ids=train_ids))


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def files_written(out):
    """{name: mtime} of a run folder's files, less OUT/.lock: every train.py takes the lock (and
    writes its pid into it) before it reads last.pt, even to find the run finished or to refuse
    it."""
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


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
    ref_dice = sum(1 - (2 * (p[:, c] * y[:, c]).sum() + 1) / (p[:, c].sum() + y[:, c].sum() + 1)
                   for c in range(4)) / 4
    torch.testing.assert_close(train.compute_loss(logits, masks, fov, "dice"), ref_dice)
    # The probability form (validation) agrees with the logit form (training).
    for kind in ("bce", "dice", "bce+dice"):
        torch.testing.assert_close(
            train.compute_loss(torch.sigmoid(logits), masks, fov, kind, probs=True),
            train.compute_loss(logits, masks, fov, kind), rtol=1e-4, atol=1e-5)


def test_loss_leaves_lesions_not_annotated_out():
    """A lesion an image's dataset does not annotate is no negative: its pixels leave the BCE, its
    gradient is 0, and a channel no patch annotates leaves the Dice mean (issue 25)."""
    torch.manual_seed(1)
    logits = (torch.randn(3, 4, 8, 10, dtype=torch.float64) * 3).requires_grad_()
    masks = (torch.rand(3, 4, 8, 10) > 0.7).double()
    fov = torch.rand(3, 8, 10) > 0.2
    ann = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)  # CWS: none
    sel = fov[:, None] & ann[:, :, None, None]  # (3, 4, 8, 10): the pixels that count
    ref_bce = F.binary_cross_entropy_with_logits(logits[sel], masks[sel])
    p = torch.sigmoid(logits)
    ref_dice = []
    for c in range(3):  # the channels some patch annotates
        b = ann[:, c]
        pc, yc = p[b, c] * fov[b], masks[b, c] * fov[b]
        ref_dice.append(1 - (2 * (pc * yc).sum() + 1) / (pc.sum() + yc.sum() + 1))
    ref_dice = sum(ref_dice) / 3
    for kind, ref in (("bce", ref_bce), ("dice", ref_dice), ("bce+dice", ref_bce + ref_dice)):
        got = train.compute_loss(logits, masks, fov, kind, annotated=ann)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        grad, = torch.autograd.grad(got, logits)
        assert not grad[~ann].any() and grad[sel].abs().sum() > 0  # no gradient where unannotated
        # all annotated: exactly the loss without the mask
        assert torch.equal(
            train.compute_loss(logits, masks, fov, kind, annotated=torch.ones_like(ann)),
            train.compute_loss(logits, masks, fov, kind))


def test_a_batch_that_annotates_no_trained_lesion_is_a_zero_loss_not_nan():
    """train.py --lesions HE on IDR + a dataset annotating EX only: a batch of that dataset's
    patches alone annotates no trained channel; the loss is 0 with a zero gradient (it was a NaN,
    reported as a divergence)."""
    logits = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    masks = (torch.rand(2, 1, 8, 8) > 0.5).double()
    fov = torch.ones(2, 8, 8, dtype=torch.bool)
    none = torch.zeros(2, 1, dtype=torch.bool)
    for kind in ("bce", "dice", "bce+dice"):
        got = train.compute_loss(logits, masks, fov, kind, annotated=none)
        assert got.item() == 0.0, kind
        grad, = torch.autograd.grad(got, logits)
        assert not grad.any()


def test_lesions_no_training_image_annotates(synth_root, generic_dataset, tmp_path, capsys):
    """A dataset of one's own annotating EX only: --lesions HE is one line naming the flag and the
    lesion, before any step; the default (all four) trains and records EX only, with a note, so
    that evaluate.py and predict.py never use a head nothing trained."""
    root = generic_dataset(("EX",))
    out = tmp_path / "he"
    with pytest.raises(ValueError) as err:
        train.run(tiny_args(synth_root, tmp_path / "cache", out, "--iters", "4", "--lesions", "HE",
                            "--root", f"ABC={root}", train_ids="ABC"))
    assert str(err.value).startswith("--lesions HE: no training image of ABC annotates HE")
    assert not out.exists()  # failed before writing anything: no folder holding only .lock
    out = tmp_path / "default"
    train.run(tiny_args(synth_root, tmp_path / "cache", out, "--iters", "4", "--val-every", "2",
                        "--root", f"ABC={root}", train_ids="ABC"))
    assert "note: no training image of ABC annotates HE,MA,CWS" in capsys.readouterr().out
    for name in ("best.pt", "last.pt"):
        assert tuple(torch.load(out / name, weights_only=True)["model_cfg"]["lesions"]) == ("EX",)


def test_union_trains_each_lesion_on_the_datasets_that_annotate_it(synth_root, generic_dataset,
                                                                    tmp_path, monkeypatch):
    """IDR (all four lesions) + a dataset of one's own annotating EX and HE: the loss gets each
    patch's annotated lesions (ABC's patches: MA and CWS out), validation scores MA on IDR's
    images."""
    root = generic_dataset(("EX", "HE"))
    real, seen = train.compute_loss, []

    def spy(scores, masks, fov, kind, probs=False, annotated=None):
        if not probs:
            seen.append(annotated.clone())
        return real(scores, masks, fov, kind, probs, annotated=annotated)

    monkeypatch.setattr(train, "compute_loss", spy)
    out = tmp_path / "run"
    train.run(tiny_args(synth_root, tmp_path / "cache", out, "--iters", "6", "--val-every", "6",
                        "--batch", "4", "--root", f"ABC={root}", train_ids="IDR,ABC"))
    rows = {tuple(r.tolist()) for a in seen for r in a}
    assert rows == {(True,) * 4, (True, True, False, False)}, rows  # both datasets' patches seen
    val = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
           if r["split"] == "val"][-1]
    assert val["ap"]["MA"] is not None and math.isfinite(val["loss"])


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


def test_validation_loss_is_pooled_over_the_set():
    """validation_loss from hand-made sums: BCE per pixel and lesion, soft Dice over the lesions
    present."""
    sums = [torch.tensor(v, dtype=torch.float64) for v in
            ([8.0, 4.0, 2.0, 2.0], [100.0] * 4, [3.0, 0.0, 1.0, 0.0], [10.0, 5.0, 2.0, 1.0],
             [5.0, 0.0, 2.0, 0.0])]
    bce = 16.0 / 400
    # EX and MA: HE and CWS are absent
    dice = ((2 * 3 + 1) / (10 + 5 + 1), (2 * 1 + 1) / (2 + 2 + 1))
    assert train.validation_loss(sums, "bce") == pytest.approx(bce)
    assert train.validation_loss(sums, "dice") == pytest.approx(1 - sum(dice) / 2)
    assert train.validation_loss(sums, "bce+dice") == pytest.approx(bce + 1 - sum(dice) / 2)


# ----------------------------------------------------------------------------- training runs
def test_short_run_lowers_training_loss(synth_root, cache_dir, tmp_path, read_log):
    out = tmp_path / "run"
    args = tiny_args(synth_root, cache_dir, out, "--iters", "40", "--val-every", "40",
                     "--log-every", "1", "--lr", "1e-2", "--loss", "bce")
    result = train.run(args)
    losses = [r["loss"] for r in read_log(out, "train")]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert result["finished"] and result["step"] == 40 and math.isfinite(result["loss"])
    (val,) = read_log(out, "val")
    assert set(val["aupr"]) == {"EX", "HE", "MA", "CWS"}


STRAIGHT = ["--iters", "6", "--val-every", "2", "--snapshot-every", "3", "--dropout", "0.3",
            "--val-metric", "loss"]


@pytest.fixture(scope="module")
def straight_run(synth_root, cache_dir, tmp_path_factory):
    """An uninterrupted 6-step run, validating every 2 steps (dropout on, so the RNG state
    matters)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    calls = []
    args = tiny_args(synth_root, cache_dir, out, *STRAIGHT)
    result = train.run(args, on_validate=lambda step, m: calls.append((step, m)))
    return out, args, result, calls


def test_on_validate_sees_every_validation(straight_run):
    _, _, result, calls = straight_run
    assert [s for s, _ in calls] == [2, 4, 6]
    step, m = calls[-1]
    assert (m["step"] == 6 and len(m["aupr"]) == 4 and len(m["dice"]) == 4
            and m["metric"] == m["loss"])
    assert result["loss"] == m["loss"] and result["best"] == min(c[1]["loss"] for c in calls)


def test_resume_is_bit_identical(straight_run, synth_root, cache_dir, tmp_path, read_log):
    ref_dir, _, _, _ = straight_run
    out = tmp_path / "run"
    # Stop between two validations (step 3), then rerun the same command.
    stopped = train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT, "--stop-at", "3"))
    assert not stopped["finished"]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT))
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
    assert ([r["loss"] for r in read_log(out, "val")]
            == [r["loss"] for r in read_log(ref_dir, "val")])
    assert ([r["step"] for r in read_log(out, "train")]
            == [r["step"] for r in read_log(ref_dir, "train")])
    names = [sorted(p.name for p in (d / "snapshots").iterdir()) for d in (out, ref_dir)]
    assert names[0] == names[1]


def test_checkpoints_load_weights_only_without_prefixes(straight_run):
    out, args, _, _ = straight_run
    paths = [out / "last.pt", out / "best.pt", *sorted((out / "snapshots").glob("step_*.pt"))]
    assert (out / "snapshots" / "step_000003.pt" in paths
            and out / "snapshots" / "step_000006.pt" in paths)
    for path in paths:
        ckpt = torch.load(path, weights_only=True)
        for key in ("model", "model_cfg", "args", "step", "epoch", "optimizer", "scaler", "metric",
                    "version"):
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
    # neighbours, paper section 2.5) are steps 4 and 8. The run stops at step 5, between the
    # candidate (4) and the validation that proves it a minimum (6), so the candidate must survive
    # the resume.
    script = {2: 5.0, 4: 3.0, 6: 4.0, 8: 2.0, 10: 6.0}
    seen = {}

    def fake_validate(model, val_sets, device, dtype, loss_kind, lesions=None):
        step = 2 * (len(seen) + 1)
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"loss": script[step], "mean_aupr": 0.5, "mean_ap": 0.5, "mean_dice": 0.5,
                "aupr": [0.5] * 4, "ap": [0.5] * 4, "dice": [0.5] * 4}

    monkeypatch.setattr(train, "validate", fake_validate)
    out = tmp_path / "run"
    common = ["--iters", "10", "--val-every", "2", "--val-metric", "loss",
              "--keep-last", "0"]  # minima only
    train.run(tiny_args(synth_root, cache_dir, out, *common, "--stop-at", "5"))
    train.run(tiny_args(synth_root, cache_dir, out, *common))
    assert (sorted(p.name for p in (out / "snapshots").iterdir())
            == ["step_000004.pt", "step_000008.pt"])
    for s in (4, 8):
        snap = torch.load(out / "snapshots" / f"step_{s:06d}.pt", weights_only=True)
        assert (snap["snapshot"] == "validation" and snap["step"] == s
                and snap["metric"] == script[s])
        assert snap["optimizer"] is None  # model-only: averaging needs no optimizer state
        for k, v in seen[s].items():
            assert torch.equal(snap["model"][k], v), (s, k)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == 8 and best["metric"] == 2.0


def test_finished_run_is_not_retrained(straight_run, capsys):
    out, args, _, _ = straight_run
    before = files_written(out)
    result = train.run(args)
    assert result["finished"] and result["step"] == 6
    assert "already finished" in capsys.readouterr().out
    assert files_written(out) == before


def test_on_validate_exception_propagates(synth_root, cache_dir, tmp_path):
    class Pruned(Exception):
        pass

    def prune(step, metrics):
        raise Pruned(step)

    out = tmp_path / "run"
    with pytest.raises(Pruned):
        train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2"),
                  on_validate=prune)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2  # saved before the callback


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth_root, cache_dir, tmp_path,
                                                       monkeypatch):
    real, calls = train.compute_loss, []

    def nan_from_step_5(scores, masks, fov, kind, probs=False, **kw):
        loss = real(scores, masks, fov, kind, probs, **kw)
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
    assert ("\n" not in msg and "nan" in msg and "step 5" in msg and "--lr" in msg
            and "float32" in msg)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------- snapshots on disk (one rule)
def test_killed_run_leaves_no_snapshot_that_misleads_the_rerun(synth_root, cache_dir, tmp_path,
                                                               monkeypatch):
    # Scripted validation losses: the local minima (paper section 2.5) are steps 4 and 8. The first
    # run is killed while saving last.pt at step 6, after step 6's snapshot was written and step 4
    # judged a minimum; garbage weights of steps 8 and 10 (as a later killed run might leave; step 8
    # in the older two-state layout, as pending_step_000008.pt) wait in the folder: none may survive
    # or stand in for the real steps.
    script = {2: 5.0, 4: 3.0, 6: 4.0, 8: 2.0, 10: 6.0}
    # steps of the validate calls: killed at 6, resumed from last.pt at 4
    order = iter([2, 4, 6, 6, 8, 10])
    seen = {}

    def fake_validate(model, val_sets, device, dtype, loss_kind, lesions=None):
        step = next(order)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        # the redone validation sees the very same weights (CPU resume is bit-identical)
        if step in seen:
            assert all(torch.equal(seen[step][k], v) for k, v in state.items())
        seen[step] = state
        return {"loss": script[step], "mean_aupr": 0.5, "mean_ap": 0.5, "mean_dice": 0.5,
                "aupr": [0.5] * 4, "ap": [0.5] * 4, "dice": [0.5] * 4}

    class Killed(Exception):
        pass

    real_save_last, killed = train.save_last, []

    def save_last_killed_at_6(state, master):
        if state.step == 6 and not killed:
            killed.append(1)
            raise Killed
        real_save_last(state, master)

    monkeypatch.setattr(train, "validate", fake_validate)
    monkeypatch.setattr(train, "save_last", save_last_killed_at_6)
    out = tmp_path / "run"
    common = ["--iters", "10", "--val-every", "2", "--val-metric", "loss",
              "--keep-last", "0"]  # minima only
    with pytest.raises(Killed):
        train.run(tiny_args(synth_root, cache_dir, out, *common))
    snaps = out / "snapshots"
    # every validation's weights are on disk at once: 4 (a minimum) and 6 (the latest, not yet
    # judged)
    assert sorted(p.name for p in snaps.iterdir()) == ["step_000004.pt", "step_000006.pt"]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    garbage = torch.load(snaps / "step_000004.pt", weights_only=True)
    garbage["model"] = {k: torch.zeros_like(v) for k, v in garbage["model"].items()}
    for name in ("pending_step_000008.pt", "step_000010.pt"):
        torch.save(garbage, snaps / name)

    train.run(tiny_args(synth_root, cache_dir, out, *common))
    # nothing else left
    assert sorted(p.name for p in snaps.iterdir()) == ["step_000004.pt", "step_000008.pt"]
    for s in (4, 8):
        snap = torch.load(snaps / f"step_{s:06d}.pt", weights_only=True)
        assert (snap["snapshot"] == "validation" and snap["step"] == s
                and snap["metric"] == script[s])
        for k, v in seen[s].items():
            assert torch.equal(snap["model"][k], v), (s, k)


def test_every_run_keeps_its_last_validations_for_swa(synth_root, cache_dir, tmp_path, monkeypatch):
    """A steadily falling validation loss has no local minimum: the weights of the last
    --keep-last validations are kept as snapshots all the same, so average.py swa (and Figure 4)
    has them in every run."""
    losses = iter([5.0, 4.0, 3.0, 2.0, 1.0])
    seen = {}

    def falling(model, val_sets, device, dtype, loss_kind, lesions=None):
        step = 2 * (len(seen) + 1)
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"loss": next(losses), "mean_aupr": 0.5, "mean_ap": 0.5, "mean_dice": 0.5,
                "aupr": [0.5] * 4, "ap": [0.5] * 4, "dice": [0.5] * 4}

    monkeypatch.setattr(train, "validate", falling)
    out = tmp_path / "run"
    common = ("--iters", "10", "--val-every", "2", "--val-metric", "loss")
    # resumed between validations
    train.run(tiny_args(synth_root, cache_dir, out, *common, "--stop-at", "7"))
    train.run(tiny_args(synth_root, cache_dir, out, *common))
    assert (sorted(p.name for p in (out / "snapshots").iterdir())
            == ["step_000008.pt", "step_000010.pt"])
    for s in (8, 10):
        snap = torch.load(out / "snapshots" / f"step_{s:06d}.pt", weights_only=True)
        assert snap["step"] == s and all(torch.equal(snap["model"][k], v)
                                         for k, v in seen[s].items())
    assert len(average.select_snapshots(out)) == 2


def test_resume_removes_the_temporary_files_of_a_killed_write(synth_root, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = ("--iters", "4", "--val-every", "2")
    train.run(tiny_args(synth_root, cache_dir, out, *args, "--stop-at", "2"))
    left = [out / ".last.pt.1a2b3c4d.tmp", out / ".best.pt.5e6f7a8b.tmp",
            out / "snapshots" / ".step_000002.pt.0c1d2e3f.tmp"]
    for p in left:
        p.write_bytes(b"\0" * 4096)  # a checkpoint write killed half-way
    # evaluate.py's, maybe being written right now: not ours
    foreign = out / ".results.json.9a8b7c6d.tmp"
    foreign.write_text("{")
    train.run(tiny_args(synth_root, cache_dir, out, *args))
    assert not any(p.exists() for p in left) and foreign.exists()


# ----------------------------------------------------------------- one run per folder, nothing lost
HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import runfolder
from pathlib import Path
fd = runfolder.lock_run(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_out_blocked_by_a_file_is_one_line_naming_the_flag(synth_root, cache_dir, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "run"):
        with pytest.raises(ValueError) as err:
            train.run(tiny_args(synth_root, cache_dir, out, "--iters", "2"))
        assert one_line(err).startswith(f"--out {out}: cannot write the run there"), err.value
    assert blocker.read_text() == "keep me"


def test_second_run_on_the_same_out_refuses_at_once(synth_root, cache_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(out)],
                              stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        # The same command line from a third process: one line naming the folder and the holder's
        # pid.
        second = subprocess.run([sys.executable, str(ROOT / "train.py"),
                                 *argv(synth_root, cache_dir, out, "--iters", "4")],
                                capture_output=True, text=True, env=env(), timeout=120)
        assert second.returncode == 1
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert (str(out) in second.stderr and f"pid {holder.pid}" in second.stderr
                and "--out" in second.stderr)
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            runfolder.lock_run(out)  # this process too
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait(timeout=30)
    os.close(runfolder.lock_run(out))  # a dead process's lock is gone by itself


def test_run_gives_back_the_cuda_kernel_settings_it_changed(synth_root, cache_dir, tmp_path,
                                                           monkeypatch):
    """On a GPU, training turns on cuDNN autotuning and TF32; run() puts the process's own settings
    back, so that best.pt scored in the same process (--test, make all-combos) runs as evaluate.py
    runs it. The GPU branch is forced here: without a GPU the flags are plain switches."""
    flags = train.CUDA_SPEED_FLAGS
    real, own, during = train.fast_cuda_kernels, [getattr(m, name) for m, name in flags], []

    def on_a_gpu(device):
        previous = real(torch.device("cuda"))
        during.extend(getattr(m, name) for m, name in flags)
        return previous

    monkeypatch.setattr(train, "fast_cuda_kernels", on_a_gpu)
    try:
        for m, name in flags:  # NOTE: by hand: monkeypatch cannot undo torch.backends.cuda.matmul's
            setattr(m, name, False)
        train.run(tiny_args(synth_root, cache_dir, tmp_path / "run", "--iters", "2",
                            "--val-every", "2"))
        assert during == [True, True, True]
        assert [getattr(m, name) for m, name in flags] == [False] * 3
    finally:
        for (m, name), value in zip(flags, own):
            setattr(m, name, value)
    assert real(torch.device("cpu")) == {}  # a CPU run changes nothing


def test_lock_is_taken_before_last_pt_is_read(synth_root, cache_dir, tmp_path, monkeypatch):
    """The one read of last.pt happens with OUT/.lock held: a second train.py on the same --out
    never reads a last.pt that the run holding the lock is replacing."""
    out = tmp_path / "run"
    order = []
    real_lock, real_load = runfolder.lock_run, train.load_resume
    monkeypatch.setattr(runfolder, "lock_run", lambda o: order.append("lock") or real_lock(o))
    monkeypatch.setattr(train, "load_resume", lambda *a: order.append("read") or real_load(*a))
    train.run(tiny_args(synth_root, cache_dir, out, "--iters", "2", "--val-every", "2"))
    assert order == ["lock", "read"]


def test_resume_with_other_settings_is_refused_in_one_line(straight_run, synth_root, cache_dir,
                                                           tmp_path):
    out, args, _, _ = straight_run
    before = files_written(out)
    with pytest.raises(ValueError) as err:
        train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT, "--lr", "1e-3", "--loss", "bce",
                            "--patch", "32"))
    msg = str(err.value)
    assert "\n" not in msg and str(out / "last.pt") in msg and "--out" in msg
    for change in ("--lr 0.0003 -> 0.001", "--loss bce+dice -> bce", "--patch 64 -> 32"):
        assert change in msg, msg
    with pytest.raises(ValueError, match="--train IDR -> IDR,MES"):
        train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT, train_ids="IDR,MES"))
    with pytest.raises(ValueError) as err:
        train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT[2:], "--iters", "4"))
    assert "--iters 4" in one_line(err) and "step 6" in str(err.value)
    # The flags that may change on resume are accepted (here: a finished run, so nothing to do).
    assert train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT, "--log-every", "3",
                               "--stop-at", "9"))["finished"]
    assert files_written(out) == before  # args.json was not rewritten
    # The number of training images is recorded (evaluate.py copies it into results.json, report.py
    # orders by it).
    n = len(PreparedDataset(cache_dir, "IDR", 128, "train"))
    assert json.loads((out / "args.json").read_text())["n_train_images"] == n > 0
    assert torch.load(out / "best.pt", weights_only=True)["args"]["n_train_images"] == n


def test_run_folder_without_last_pt_is_never_retrained_over(synth_root, cache_dir, tmp_path):
    """last.pt deleted (it is 3x best.pt, the first file a user prunes): a rerun with a larger
    --iters or another --train refuses in one line naming the folder, and every file of the run
    stays as it was."""
    out = tmp_path / "run"
    train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2"))
    (out / "last.pt").unlink()
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    before = {p: p.read_bytes() for p in files}
    for extra in (["--iters", "8"], ["--iters", "6"]):
        with pytest.raises(ValueError) as e:
            train.run(tiny_args(synth_root, cache_dir, out, "--val-every", "2", *extra))
        assert str(out) in one_line(e) and "last.pt" in str(e.value) and "--out" in str(e.value)
    with pytest.raises(ValueError) as e:  # another training set into the same folder
        train.run(tiny_args(synth_root, cache_dir, out, "--iters", "8", train_ids="MES"))
    assert "--train IDR -> MES" in one_line(e)
    assert {p: p.read_bytes() for p in files} == before
    r = subprocess.run([sys.executable, str(ROOT / "train.py"),
                        *argv(synth_root, cache_dir, out, "--iters", "8")],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert (r.returncode == 1 and r.stderr.startswith("error:")
            and len(r.stderr.strip().splitlines()) == 1)


# ------------------------------------------------------------------- faults: one line, nothing lost
class FullDisk(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_at_a_checkpoint_is_one_oserror_and_the_rerun_resumes(
        synth_root, cache_dir, tmp_path, monkeypatch, read_log):
    out = tmp_path / "run"
    writes = []
    real_open = open

    # last.pt of step 4 finds the disk full
    def disk_full_at_the_second_last_pt(path, mode="r", *a, **kw):
        # save_checkpoint's name
        if Path(path).name.startswith(".last.pt.") and str(path).endswith(".tmp"):
            writes.append(path)
            if len(writes) == 2:
                return FullDisk(path, "w")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(model, "open", disk_full_at_the_second_last_pt, raising=False)
    with pytest.raises(OSError) as err:
        train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2"))
    msg = utils.message(err.value)
    assert (msg.startswith(str(out / "last.pt")) and "No space left on device" in msg
            and "\n" not in msg)
    assert (torch.load(out / "last.pt", weights_only=True)["step"] == 2
            and not list(out.glob(".last.pt.*")))
    monkeypatch.undo()  # space freed: the same command resumes from step 2 and finishes
    assert train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6",
                               "--val-every", "2"))["step"] == 6
    assert [r["step"] for r in read_log(out, "val")] == [2, 4, 6]


def test_ctrl_c_keeps_last_pt_and_the_rerun_is_bit_identical(
        straight_run, synth_root, cache_dir, tmp_path, monkeypatch, capsys, read_log):
    ref_dir = straight_run[0]
    real, calls = train.compute_loss, []

    def ctrl_c_at_step_5(scores, masks, fov, kind, probs=False, **kw):
        if not probs:
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
        return real(scores, masks, fov, kind, probs, **kw)

    out = tmp_path / "run"
    monkeypatch.setattr(train, "compute_loss", ctrl_c_at_step_5)
    with pytest.raises(KeyboardInterrupt) as err:  # tune.py catches KeyboardInterrupt
        train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT))
    msg = one_line(err)  # what to do, naming the step it stopped at, the file and its step
    assert (msg.startswith("interrupted at step 4") and str(out / "last.pt") in msg
            and "saved at step 4" in msg)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "compute_loss", real)
    capsys.readouterr()
    train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT))
    ref, got = (torch.load(d / "last.pt", weights_only=True) for d in (ref_dir, out))
    assert got["step"] == 6 and all(torch.equal(ref["model"][k], got["model"][k])
                                    for k in ref["model"])
    # Each validation prints one line above the bar; the run ends with a summary naming its outputs.
    printed = capsys.readouterr().out.splitlines()
    (val,) = read_log(out, "val")[-1:]
    (line,) = [p for p in printed if p.startswith("step 6: ")]
    assert (f"val loss {val['loss']:.4f}" in line and f"EX {val['dice']['EX']:.3f}" in line
            and "best" in line)
    (summary,) = [p for p in printed if p.startswith("done: ")]
    assert (str(out / "best.pt") in summary and str(out / "curves.png") in summary
            and "at step" in summary)


def test_ctrl_c_is_one_line_exit_130_and_last_pt_resumes(synth_root, cache_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"),
           *argv(synth_root, cache_dir, out, "--iters", "5000", "--val-every", "2")]
    # preexec_fn: a test runner started in the background (`cmd &`) has SIGINT ignored, which the
    # child would inherit
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not (out / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few more steps, maybe in the middle of a validation or a checkpoint write
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    # the lines above it are the progress bar
    last_line = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last_line.startswith("interrupted at step ") and str(out / "last.pt") in last_line
    saved = int(last_line.rsplit("saved at step ", 1)[1].rstrip(")"))
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["step"] == saved and saved % 2 == 0
            and saved <= int(last_line.split()[3].rstrip(";")))
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    # Rerunning the same command (shortened with --stop-at, which may change) resumes from it.
    result = train.run(tiny_args(synth_root, cache_dir, out, "--iters", "5000", "--val-every", "2",
                                 "--stop-at", str(saved + 1)))
    assert (result["finished"] is False
            and torch.load(out / "last.pt", weights_only=True)["step"] == saved + 1)


def test_nan_in_validation_is_the_divergence_hint(synth_root, cache_dir, tmp_path, monkeypatch):
    real_predict, broken = protocol.predict, []

    def nan_after_first_validation(models, x, dtype=torch.float32, tta=False, style=None):
        p = real_predict(models, x, dtype, tta, style)
        # e.g. an overflow only the eval-mode network shows
        return p * float("nan") if broken else p

    monkeypatch.setattr(protocol, "predict", nan_after_first_validation)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2",
                            "--val-metric", "loss"),
                  on_validate=lambda step, m: broken.append(step))
    msg = one_line(err)
    assert ("validation loss" in msg and "nan" in msg and "step 4" in msg and "--lr" in msg
            and "float32" in msg)
    assert str(out / "last.pt") in msg  # the last good checkpoint, named
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 2
    # step 2's snapshot (the latest validation's, kept until judged); the diverged step 4 wrote none
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_000002.pt"]


# ------------------------------------------------------------------------- DDP and the command line
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), str(tmp_path), "--train", "IDR", "--data-root", str(synth_root),
           "--cache", str(cache_dir), "--out", "run", *TINY, "--iters", "3", "--val-every", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "rank1")) == []  # rank 1 wrote nothing
    run_dir = tmp_path / "rank0" / "run"
    assert {"last.pt", "best.pt", "args.json", "log.jsonl"} <= set(os.listdir(run_dir))
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["step"] == 3 and len(last["rng"]["torch"]) == 2  # one RNG state per rank
    assert not [k for k in last["model"] if k.startswith(("module.", "_orig_mod."))]
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_lesion_weights_flag(synth_root, cache_dir, tmp_path):
    assert tiny_args(synth_root, cache_dir, tmp_path, "--lesion-weights",
                     "ma=4").lesion_weights == (1.0, 1.0, 4.0, 1.0)
    assert tiny_args(synth_root, cache_dir, tmp_path, "--lesion-weights",
                     "CWS=0.5,EX=2").lesion_weights == (2.0, 1.0, 1.0, 0.5)
    for bad in ("XX=2", "MA", "MA=-1", "MA=x", "EX=0,HE=0,MA=0,CWS=0"):
        with pytest.raises(ValueError) as err:
            tiny_args(synth_root, cache_dir, tmp_path, "--lesion-weights", bad)
        assert "--lesion-weights" in one_line(err), bad


def test_bad_train_flag_is_a_one_line_error(tmp_path):
    cases = {"IDR,XYZ": "'XYZ'", "": "empty"}  # the flag, and what is wrong with its value
    # Both processes at once: most of their time is importing torch on a busy CPU.
    procs = {ids: subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--train", ids,
                                    "--data-root", str(tmp_path), "--out", str(tmp_path / "run")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for ids in cases}
    for ids, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert (stderr.strip().startswith("error:") and "--train" in stderr
                and cases[ids] in stderr), stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, flag", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--iters", "0"], "--iters"),
    (["--batch", "0"], "--batch"), (["--patch", "256"], "--patch 256"),
    (["--warmup", "-1"], "--warmup"), (["--dropout", "1"], "--dropout"),
    (["--workers", "-1"], "--workers"), (["--stop-at", "0"], "--stop-at"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--val-every", "0"], "--val-every"),
    (["--lesion-patches", "2"], "--lesion-patches"),
    (["--decoder-channels", "16,0,8,8,8"], "--decoder-channels"),
])
def test_bad_flag_is_one_line_naming_it(extra, flag, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "prepare_cache", lambda *a, **k: pytest.fail("data setup reached"))
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("model setup reached"))
    with pytest.raises(ValueError) as err:
        train.parse_args(argv(tmp_path, tmp_path / "cache", tmp_path / "run", *extra))
    assert flag in one_line(err)
    assert not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        train.parse_args(["--train", "IDR", "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert "--device cuda" in one_line(err) and "no CUDA GPU" in str(err.value)


def test_warmup_longer_than_the_run_is_scaled_with_a_warning(tmp_path, capsys):
    args = train.parse_args(["--train", "IDR", "--out", str(tmp_path), "--device", "cpu",
                             "--iters", "200"])
    err = capsys.readouterr().err.strip().splitlines()
    assert args.warmup == 20 and len(err) == 1 and "--warmup 500 >= --iters 200" in err[0]
    assert train.lr_factor(args.warmup, args.warmup, args.iters) == 1.0  # the peak --lr is reached
    # The toy command of the docstring (and --help) reaches its learning rate with no warning.
    doc = train.__doc__.split("\n\n")[1].replace("\\\n", " ")
    toy = next(line for line in doc.splitlines() if "toy" in line).split("#")[0].split()[2:]
    toy = train.parse_args(toy)
    assert capsys.readouterr().err == "" and toy.warmup < toy.iters
    assert [round(train.lr_factor(s, toy.warmup, toy.iters), 6)
            for s in (toy.warmup - 1, toy.warmup)] == [round(toy.warmup / (toy.warmup + 1), 6), 1.0]


# ---------------------------------------------------------------- selection a blank model can't win
@pytest.fixture(scope="module")
def trained_and_blank(synth_root, cache_dir, tmp_path_factory):
    """A model trained 80 toy steps (BCE) and a blank twin: head weight 0, bias -20, so p ~ 2e-9
    everywhere."""
    out = tmp_path_factory.mktemp("blank") / "run"
    train.run(tiny_args(synth_root, cache_dir, out, "--iters", "80", "--val-every", "80",
                        "--lr", "1e-2", "--loss", "bce"))
    (trained,) = load_models(out / "last.pt")
    (blank,) = load_models(out / "last.pt")
    with torch.no_grad():
        blank.head.weight.zero_()
        blank.head.bias.fill_(-20.0)
    return trained, blank, [PreparedDataset(cache_dir, "IDR", 128, "val")]


def selected(metrics, rule):
    """The value best.pt follows under --val-metric `rule`: the loss, or the lesions' mean score."""
    return metrics["loss"] if rule == "loss" else metrics[f"mean_{rule}"]


def test_validation_loss_prefers_a_trained_model_to_a_blank_one(trained_and_blank):
    trained, blank, val_sets = trained_and_blank
    # the paper's rule is the default
    assert train.build_parser().get_default("val_metric") == "loss"
    got = {name: train.validate(m, val_sets, "cpu", torch.float32, "bce")
           for name, m in (("trained", trained), ("blank", blank))}
    rule = train.build_parser().get_default("val_metric")
    value = {k: selected(v, rule) for k, v in got.items()}
    assert train.is_better(rule, value["trained"], value["blank"])
    assert not train.is_better(rule, value["blank"], value["trained"])
    # Why AUPR alone is not a safe rule: the blank map scores (1 + prevalence) / 2 under the
    # protocol (precision = prevalence at t = 0, nothing predicted above it, the (0, 1) anchor).
    # Prevalence by numpy.
    items = [val_sets[0][i] for i in range(len(val_sets[0]))]
    fov = np.stack([it["fov"] for it in items])  # (N, R, R)
    masks = np.stack([it["masks"] for it in items])  # (N, 4, R, R)
    for c in range(4):
        pos = masks[:, c][fov].sum()
        if pos:
            prevalence = pos / fov.sum()
            assert got["blank"]["aupr"][c] == pytest.approx((1 + prevalence) / 2, abs=1e-9)
            assert got["blank"]["dice"][c] == 0.0
    assert got["blank"]["mean_aupr"] > 0.5 and got["blank"]["mean_dice"] == 0.0


def test_bce_dice_validation_loss_prefers_a_trained_model_to_a_blank_one(trained_and_blank):
    # The default loss: its soft Dice is pooled over the whole validation set (a per-image Dice with
    # +1 smoothing scored a blank map 0 on every lesion an image lacks, and the blank model won).
    trained, blank, val_sets = trained_and_blank
    got = {name: train.validate(m, val_sets, "cpu", torch.float32, "bce+dice")
           for name, m in (("trained", trained), ("blank", blank))}
    assert got["trained"]["loss"] < got["blank"]["loss"]
    # the floor-free AP ranks them the same way; a blank map's AP is the prevalence (below 0.05
    # here)
    assert got["trained"]["mean_ap"] > got["blank"]["mean_ap"] and got["blank"]["mean_ap"] < 0.05
    for rule in ("loss", "dice", "ap"):
        value = {k: selected(v, rule) for k, v in got.items()}
        assert not train.is_better(rule, value["blank"], value["trained"]), rule


# ------------------------------------------------------------ --lesions: the others out of the loss
def test_untrained_lesions_get_no_gradient(he_run):
    # The head's bias of a lesion outside --lesions has no weight decay (train.make_optimizer): with
    # a zero gradient Adam leaves it exactly at its initial value; the trained lesion's bias moves.
    out, args = he_run
    ckpt = load_checkpoint(out / "last.pt")
    torch.manual_seed(args.init_seed)
    init = build_model(config_from_dict(ckpt["model_cfg"])).head.bias.detach()
    trained = ckpt["model"]["head.bias"]
    he = LESIONS.index("HE")
    for c in range(len(LESIONS)):
        if c == he:
            assert not torch.equal(trained[c], init[c])
        else:
            assert torch.equal(trained[c], init[c]), LESIONS[c]


def test_validation_scores_only_trained_lesions(he_run, read_log):
    out, _ = he_run
    he = LESIONS.index("HE")
    records = read_log(out, "val")
    assert records
    for record in records:
        dice = [float("nan") if record["dice"][name] is None else record["dice"][name]
                for name in LESIONS]  # null
        assert [math.isnan(v) for v in dice] == [c != he for c in range(len(LESIONS))]


# ----------------------------------------------------------------------------- --style-condition
def style_args(synth_root, tmp_path, out, *extra):
    return train.parse_args([
        "--train", "IDR,RET", "--out", str(out), "--data-root", str(synth_root),
        "--cache", str(tmp_path / "cache"), "--encoder", "test_resnet", "--no-pretrained",
        "--decoder-channels", "16,8,8,8,8", "--resolution", "64", "--patch", "64", "--batch", "4",
        "--iters", "2", "--val-every", "2", "--warmup", "1", "--lr", "1e-2", "--device", "cpu",
        "--dtype", "float32", "--workers", "0", *extra])


def test_train_style_condition_end_to_end(synth_root, tmp_path):
    out = tmp_path / "runs" / "cond"
    train.run(style_args(synth_root, tmp_path, out, "--style-condition", "style"))
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert (ckpt["model_cfg"]["style_tokens"] == ("fine", "coarse")
            and ckpt["args"]["style_condition"] == "style")
    films = [v for k, v in ckpt["model"].items() if "films" in k]
    # both tokens were trained
    assert all(torch.count_nonzero(v[t]) > 0 for v in films for t in (0, 1))
    (net,) = load_models(out / "best.pt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert (net(x, style="fine") - net(x, style="coarse")).abs().max() > 0
    with pytest.raises(ValueError) as err:  # a resume under another conditioning
        train.run(style_args(synth_root, tmp_path, out, "--iters", "3"))
    assert "--style-condition style -> off" in one_line(err)


def test_train_style_flag_errors(synth_root, tmp_path):
    with pytest.raises(ValueError) as err:
        style_args(synth_root, tmp_path, tmp_path / "x", "--characterize", str(tmp_path / "c.json"))
    assert "--characterize" in one_line(err) and "--style-condition" in str(err.value)
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(ValueError) as err:
        style_args(synth_root, tmp_path, tmp_path / "x", "--style-condition", "dataset",
                   "--characterize", str(tmp_path / "c.json"))
    assert "c.json" in one_line(err) and "JSON" in str(err.value)
    # not a choice: utils.Parser's one line, not argparse's exit 2
    with pytest.raises(ValueError) as err:
        style_args(synth_root, tmp_path, tmp_path / "x", "--style-condition", "labels")
    assert "--style-condition" in one_line(err) and "'labels'" in str(err.value)
    assert not (tmp_path / "x").exists()


# ---- stop signals (slurm_task.sh passes Slurm's time-limit warning on as SIGUSR1;
# preemption: SIGTERM)


def assert_same_run(ref_dir, out, read_log):
    """`out` ended with the weights, optimizer state and validations of `ref_dir`'s run (bit for
    bit on CPU)."""
    ref, got = (torch.load(d / "last.pt", weights_only=True) for d in (ref_dir, out))
    assert got["step"] == ref["step"] == 6
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], got["model"][k]), k
    for i, state in ref["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, got["optimizer"]["state"][i][name]), (i, name)
    val = [[(r["step"], r["loss"]) for r in read_log(d, "val")] for d in (ref_dir, out)]
    assert val[0] == val[1]
    # NOTE: a training line's loss is the mean since this process's last line: steps only
    assert [r["step"] for r in read_log(out, "train")] == \
        [r["step"] for r in read_log(ref_dir, "train")]


# ------------------------------------------------------------------------ train.py's stop signals
# train.py with a train_step that signals its process group (as slurm_task.sh passes Slurm's
# warning on: the main process and its DataLoader worker) once step AT is done
SIGNAL_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train, utils
step = train.train_step
def train_step(state, *rest):
    out = step(state, *rest)
    if state.step == {at}:
        os.killpg(os.getpgid(0), signal.{name})
    return out
train.train_step = train_step
sys.argv = ["train.py"] + sys.argv[1:]
utils.run(train.main)
"""


def test_sigusr1_writes_last_pt_exits_75_and_the_rerun_is_bit_identical(
        straight_run, synth_root, cache_dir, tmp_path, read_log):
    ref_dir, out = straight_run[0], tmp_path / "run"
    argv = ["--train", "IDR", "--data-root", str(synth_root), "--cache", str(cache_dir), "--out",
            str(out), *TINY, *STRAIGHT, "--workers", "1"]
    script = SIGNAL_AT.format(root=str(ROOT), at=3, name="SIGUSR1")
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
                          start_new_session=True)
    assert proc.returncode == stops.EXIT_STOPPED == 75, proc.stderr[-3000:]
    assert re.split(r"[\r\n]+", proc.stderr.strip())[-1] == \
        f"stopped by SIGUSR1 at step 3: {out / 'last.pt'} written; rerun the same command to " \
        f"resume (exit 75)"
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in read_log(out, "val")] == [2]
    train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT))  # the same command, to the end
    assert_same_run(ref_dir, out, read_log)


def test_sigterm_stops_in_process_and_restores_the_handlers(straight_run, synth_root, cache_dir,
                                                           tmp_path, monkeypatch, read_log):
    ref_dir, out = straight_run[0], tmp_path / "run"
    real = train.train_step

    def sigterm_at_step_4(state, *rest):  # a validation step: last.pt is already written there
        result = real(state, *rest)
        if state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(train, "train_step", sigterm_at_step_4)
    with pytest.raises(stops.Stopped) as err:
        train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT))
    assert str(err.value) == f"stopped by SIGTERM at step 4: {out / 'last.pt'} written; rerun " \
                             f"the same command to resume (exit 75)"
    assert isinstance(err.value, KeyboardInterrupt)  # tune.py queues the trial again
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "train_step", real)
    train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT))
    assert_same_run(ref_dir, out, read_log)


def test_a_stop_signal_during_the_last_step_is_not_lost(straight_run, synth_root, cache_dir,
                                                        tmp_path, monkeypatch, read_log):
    """Slurm's warning can land in the last step or the final validation: the run finishes (nothing
    to save) and still stops with exit 75, so the job script requeues before evaluate.py starts with
    too little time left; the rerun finds the run finished and ends normally."""
    ref_dir, out = straight_run[0], tmp_path / "run"
    real = train.train_step

    def sigusr1_at_the_last_step(state, *rest):
        result = real(state, *rest)
        if state.step == 6:  # --iters 6: the loop ends here, then validates
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(train, "train_step", sigusr1_at_the_last_step)
    with pytest.raises(stops.Stopped) as err:
        train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT))
    assert "SIGUSR1" in str(err.value) and "after the run finished at step 6" in str(err.value)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(train, "train_step", real)
    assert train.run(tiny_args(synth_root, cache_dir, out, *STRAIGHT))["finished"]  # no Stopped
    assert_same_run(ref_dir, out, read_log)


# ----------------------------------------------------------------------------- the end of a run
def test_test_flag_scores_best_pt_as_evaluate_py_does(synth_root, cache_dir, tmp_path, capsys):
    """--test MES: best.pt scored when training ends into OUT/results.json: the same file
    evaluate.py's command line writes for that checkpoint (protocol, fingerprint, scores); the last
    line is the next command (predict.py on photographs)."""
    out = tmp_path / "run"
    train.main(argv(synth_root, cache_dir, out, "--iters", "2", "--val-every", "2",
                    "--test", "MES"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"next: python predict.py --ckpt {out / 'best.pt'} --images ")
    ours = json.loads((out / "results.json").read_text())
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(out / "best.pt"),
                        "--test", "MES", "--data-root", str(synth_root), "--cache", str(cache_dir),
                        "--device", "cpu", "--out", str(tmp_path / "theirs.json")],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads((tmp_path / "theirs.json").read_text())
    assert ours == theirs and list(ours["results"]) == ["MES"]


def test_every_run_ends_with_the_next_command(synth_root, cache_dir, tmp_path, capsys):
    """--stop-at: the next command is the same without --stop-at, and running it resumes and
    finishes the run; then the next command scores best.pt with evaluate.py."""
    out = tmp_path / "run"
    first = argv(synth_root, cache_dir, out, "--iters", "4", "--val-every", "2", "--stop-at", "2")
    train.main(first)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("next: python train.py ") and "--stop-at" not in last
    command = shlex.split(last.split("#")[0])[3:]  # after "next: python train.py"
    assert command == first[:-2]
    train.main(command)
    printed = capsys.readouterr().out
    assert f"resuming {out}" in printed
    assert printed.strip().splitlines()[-1].startswith(
        f"next: python evaluate.py --ckpt {out / 'best.pt'} --test all --data-root {synth_root} "
        f"--cache {cache_dir}")
