"""train.py under faults and bad input: each failure one clear line or a correct recovery, nothing lost.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_train_faults.py
"""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
import model
import protocol
import train
from data import PreparedDataset
from model import load_models

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "test_resnet", "--no-pretrained", "--resolution", "128", "--patch", "64", "--batch", "2",
        "--device", "cpu", "--dtype", "float32", "--workers", "0", "--warmup", "2"]


def argv(synth_root, cache_dir, out, *extra):
    return ["--train", "IDR", "--data-root", str(synth_root), "--cache", str(cache_dir), "--out", str(out),
            *TINY, *extra]


def tiny_args(synth_root, cache_dir, out, *extra):
    return train.parse_args(argv(synth_root, cache_dir, out, *extra))


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


# ----------------------------------------------------------------------------- snapshots on disk, not in memory
def test_killed_run_leaves_no_pending_file_that_misleads_the_rerun(synth_root, cache_dir, tmp_path, monkeypatch):
    # Scripted validation losses: the local minima (paper section 2.5) are steps 4 and 8. The first run is
    # killed while saving last.pt at step 6, after step 4's pending file was judged and renamed; a garbage
    # pending file of step 8 (as a later killed run might leave) waits in the folder.
    script = {2: 5.0, 4: 3.0, 6: 4.0, 8: 2.0, 10: 6.0}
    order = iter([2, 4, 6, 6, 8, 10])  # steps of the validate calls: killed at 6, resumed from last.pt at 4
    seen = {}

    def fake_validate(model, val_sets, device, dtype, loss_kind, lesions=None):
        step = next(order)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if step in seen:  # the redone validation sees the very same weights (CPU resume is bit-identical)
            assert all(torch.equal(seen[step][k], v) for k, v in state.items())
        seen[step] = state
        return {"loss": script[step], "mean_aupr": 0.5, "mean_ap": 0.5, "mean_dice": 0.5, "aupr": [0.5] * 4,
                "ap": [0.5] * 4, "dice": [0.5] * 4}

    class Killed(Exception):
        pass

    real_save_last, killed = train.save_last, []

    def save_last_killed_at_6(s):
        if s.step == 6 and not killed:
            killed.append(1)
            raise Killed
        real_save_last(s)

    monkeypatch.setattr(train, "validate", fake_validate)
    monkeypatch.setattr(train, "save_last", save_last_killed_at_6)
    out = tmp_path / "run"
    common = ["--iters", "10", "--val-every", "2", "--val-metric", "loss", "--keep-last", "0"]  # minima only
    with pytest.raises(Killed):
        train.run(tiny_args(synth_root, cache_dir, out, *common))
    snaps = out / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["pending_step_000006.pt", "step_000004.pt"]
    garbage = torch.load(snaps / "step_000004.pt", weights_only=True)
    garbage["model"] = {k: torch.zeros_like(v) for k, v in garbage["model"].items()}
    torch.save(garbage, snaps / "pending_step_000008.pt")

    train.run(tiny_args(synth_root, cache_dir, out, *common))
    assert sorted(p.name for p in snaps.iterdir()) == ["step_000004.pt", "step_000008.pt"]  # nothing pending left
    for s in (4, 8):
        snap = torch.load(snaps / f"step_{s:06d}.pt", weights_only=True)
        assert snap["snapshot"] == "validation" and snap["step"] == s and snap["metric"] == script[s]
        for k, v in seen[s].items():
            assert torch.equal(snap["model"][k], v), (s, k)


# ----------------------------------------------------------------------------- one run per folder
HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import train
from pathlib import Path
fd = train.lock_run(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_second_run_on_the_same_out_refuses_at_once(synth_root, cache_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(out)], stdout=subprocess.PIPE,
                              text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        # The same command line from a third process: one line naming the folder and the holder's pid.
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv(synth_root, cache_dir, out, "--iters", "4")],
                                capture_output=True, text=True, env=env(), timeout=120)
        assert second.returncode == 1
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert str(out) in second.stderr and f"pid {holder.pid}" in second.stderr and "--out" in second.stderr
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            train.lock_run(out)  # this process too
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait(timeout=30)
    os.close(train.lock_run(out))  # a dead process's lock is gone by itself


def test_full_disk_at_a_checkpoint_is_one_oserror_and_the_rerun_resumes(synth_root, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    writes = []
    real_open = open

    def disk_full_at_the_second_last_pt(path, mode="r", *a, **kw):  # last.pt of step 4 finds the disk full
        if Path(path).name.startswith(".last.pt.") and str(path).endswith(".tmp"):  # utils.write_atomic's name
            writes.append(path)
            if len(writes) == 2:
                return FullDisk(path, "w")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(model, "open", disk_full_at_the_second_last_pt, raising=False)
    with pytest.raises(OSError) as err:
        train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2"))
    assert utils.message(err.value) == f"{out / 'last.pt'}: cannot write the checkpoint (No space left on device)"
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2 and not list(out.glob(".last.pt.*"))
    monkeypatch.undo()  # space freed: the same command resumes from step 2 and finishes
    assert train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2"))["step"] == 6
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if r["split"] == "val"] == [2, 4, 6]


class FullDisk(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_ctrl_c_is_one_line_exit_130_and_last_pt_resumes(synth_root, cache_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *argv(synth_root, cache_dir, out, "--iters", "5000",
                                                            "--val-every", "2")]
    # preexec_fn: a test runner started in the background (`cmd &`) has SIGINT ignored, which the child would inherit
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not (out / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few more steps, maybe in the middle of a validation or a checkpoint write
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last_line = stderr.replace("\r", "\n").strip().splitlines()[-1]  # the lines above it are the progress bar
    assert last_line.startswith("interrupted at step ") and f"resume from {out / 'last.pt'}" in last_line
    saved = int(last_line.rsplit("saved at step ", 1)[1].rstrip(")"))
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == saved and saved % 2 == 0 and saved <= int(last_line.split()[3].rstrip(";"))
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    # Rerunning the same command (shortened with --stop-at, which may change) resumes from it.
    result = train.run(tiny_args(synth_root, cache_dir, out, "--iters", "5000", "--val-every", "2",
                                 "--stop-at", str(saved + 1)))
    assert result["finished"] is False and torch.load(out / "last.pt", weights_only=True)["step"] == saved + 1


# ----------------------------------------------------------------------------- divergence first seen in validation
def test_nan_in_validation_is_the_divergence_hint(synth_root, cache_dir, tmp_path, monkeypatch):
    real_predict, broken = protocol.predict, []

    def nan_after_first_validation(models, x, dtype=torch.float32, tta=False, style=None):
        p = real_predict(models, x, dtype, tta, style)
        return p * float("nan") if broken else p  # e.g. an overflow only the eval-mode network shows

    monkeypatch.setattr(protocol, "predict", nan_after_first_validation)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2", "--val-metric", "loss"),
                  on_validate=lambda step, m: broken.append(step))
    msg = str(err.value)
    assert "\n" not in msg and "validation loss is nan at step 4" in msg and "--lr" in msg and "float32" in msg
    assert f"{out / 'last.pt'} is the last good checkpoint" in msg
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["pending_step_000002.pt"]


# ----------------------------------------------------------------------------- bad flags: one line, before any setup
@pytest.mark.parametrize("extra, flag", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--iters", "0"], "--iters"), (["--batch", "0"], "--batch"),
    (["--patch", "256"], "--patch 256"), (["--warmup", "-1"], "--warmup"), (["--dropout", "1"], "--dropout"),
    (["--workers", "-1"], "--workers"), (["--stop-at", "0"], "--stop-at"), (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--val-every", "0"], "--val-every"), (["--lesion-patches", "2"], "--lesion-patches"), (["--decoder-channels", "16,0,8,8,8"], "--decoder-channels"),
])
def test_bad_flag_is_one_line_naming_it(extra, flag, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "prepare_cache", lambda *a, **k: pytest.fail("data setup reached"))
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("model setup reached"))
    with pytest.raises(ValueError) as err:
        train.parse_args(argv(tmp_path, tmp_path / "cache", tmp_path / "run", *extra))
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device cuda: no CUDA GPU") as err:
        train.parse_args(["--train", "IDR", "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert "\n" not in str(err.value)


def test_warmup_longer_than_the_run_is_scaled_with_a_warning(tmp_path, capsys):
    args = train.parse_args(["--train", "IDR", "--out", str(tmp_path), "--device", "cpu", "--iters", "200"])
    err = capsys.readouterr().err.strip().splitlines()
    assert args.warmup == 20 and len(err) == 1 and "--warmup 500 >= --iters 200" in err[0]
    assert train.lr_factor(args.warmup, args.warmup, args.iters) == 1.0  # the peak --lr is reached
    # The toy command of the docstring (and --help) reaches its learning rate with no warning.
    doc = train.__doc__.split("\n\n")[1].replace("\\\n", " ")
    toy = next(line for line in doc.splitlines() if "toy scale" in line).split("#")[0].split()[2:]
    toy = train.parse_args(toy)
    assert capsys.readouterr().err == "" and toy.warmup < toy.iters
    assert [round(train.lr_factor(s, toy.warmup, toy.iters), 6) for s in (toy.warmup - 1, toy.warmup)] == \
        [round(toy.warmup / (toy.warmup + 1), 6), 1.0]


# ----------------------------------------------------------------------------- selection a blank model can't win
@pytest.fixture(scope="module")
def trained_and_blank(synth_root, cache_dir, tmp_path_factory):
    """A model trained 80 toy steps (BCE) and a blank twin: head weight 0, bias -20, so p ~ 2e-9 everywhere."""
    out = tmp_path_factory.mktemp("blank") / "run"
    train.run(tiny_args(synth_root, cache_dir, out, "--iters", "80", "--val-every", "80", "--lr", "1e-2",
                        "--loss", "bce"))
    (trained,) = load_models(out / "last.pt")
    (blank,) = load_models(out / "last.pt")
    with torch.no_grad():
        blank.head.weight.zero_()
        blank.head.bias.fill_(-20.0)
    return trained, blank, [PreparedDataset(cache_dir, "IDR", 128, "val")]


def test_validation_loss_prefers_a_trained_model_to_a_blank_one(trained_and_blank):
    trained, blank, val_sets = trained_and_blank
    assert train.build_parser().get_default("val_metric") == "loss"  # the paper's rule is the default
    got = {name: train.validate(m, val_sets, "cpu", torch.float32, "bce")
           for name, m in (("trained", trained), ("blank", blank))}
    rule = train.build_parser().get_default("val_metric")
    value = {k: train.selection_value(v, rule) for k, v in got.items()}
    assert train.is_better(rule, value["trained"], value["blank"])
    assert not train.is_better(rule, value["blank"], value["trained"])
    # Why AUPR alone is not a safe rule: the blank map scores (1 + prevalence) / 2 under the protocol
    # (precision = prevalence at t = 0, nothing predicted above it, the (0, 1) anchor). Prevalence by numpy.
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
    # The default loss: its soft Dice is pooled over the whole validation set (a per-image Dice with +1
    # smoothing scored a blank map 0 on every lesion an image lacks, and the blank model won).
    trained, blank, val_sets = trained_and_blank
    got = {name: train.validate(m, val_sets, "cpu", torch.float32, "bce+dice")
           for name, m in (("trained", trained), ("blank", blank))}
    assert got["trained"]["loss"] < got["blank"]["loss"]
    # the floor-free AP ranks them the same way; a blank map's AP is the prevalence (below 0.05 here)
    assert got["trained"]["mean_ap"] > got["blank"]["mean_ap"] and got["blank"]["mean_ap"] < 0.05
    for rule in ("loss", "dice", "ap"):
        value = {k: train.selection_value(v, rule) for k, v in got.items()}
        assert not train.is_better(rule, value["blank"], value["trained"]), rule


def test_validation_loss_is_pooled_over_the_set():
    """validation_loss from hand-made sums: BCE per pixel and lesion, soft Dice over the lesions present."""
    sums = [torch.tensor(v, dtype=torch.float64) for v in
            ([8.0, 4.0, 2.0, 2.0], [100.0] * 4, [3.0, 0.0, 1.0, 0.0], [10.0, 5.0, 2.0, 1.0], [5.0, 0.0, 2.0, 0.0])]
    bce = 16.0 / 400
    dice = ((2 * 3 + 1) / (10 + 5 + 1), (2 * 1 + 1) / (2 + 2 + 1))  # EX and MA: HE and CWS are absent
    assert train.validation_loss(sums, "bce") == pytest.approx(bce)
    assert train.validation_loss(sums, "dice") == pytest.approx(1 - sum(dice) / 2)
    assert train.validation_loss(sums, "bce+dice") == pytest.approx(bce + 1 - sum(dice) / 2)


# ----------------------------------------------------------------------------- nothing lost (issue 23)
def test_run_folder_without_last_pt_is_never_retrained_over(synth_root, cache_dir, tmp_path):
    """last.pt deleted (it is 3x best.pt, the first file a user prunes): a rerun with a larger --iters or another
    --train refuses in one line naming the folder, and every file of the run stays as it was."""
    out = tmp_path / "run"
    train.run(tiny_args(synth_root, cache_dir, out, "--iters", "6", "--val-every", "2"))
    (out / "last.pt").unlink()
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    before = {p: p.read_bytes() for p in files}
    for extra in (["--iters", "8"], ["--iters", "6"]):
        with pytest.raises(ValueError) as e:
            train.run(tiny_args(synth_root, cache_dir, out, "--val-every", "2", *extra))
        assert str(e.value).startswith(f"{out} holds a run") and "no last.pt" in str(e.value)
        assert "--out" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:  # another training set into the same folder
        train.run(train.parse_args(["--train", "MES"] + argv(synth_root, cache_dir, out, "--iters", "8")[2:]))
    assert "--train IDR -> MES" in str(e.value) and "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in files} == before
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv(synth_root, cache_dir, out, "--iters", "8")],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_resume_removes_the_temporary_files_of_a_killed_write(synth_root, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = ("--iters", "4", "--val-every", "2")
    train.run(tiny_args(synth_root, cache_dir, out, *args, "--stop-at", "2"))
    left = [out / ".last.pt.1a2b3c4d.tmp", out / ".best.pt.5e6f7a8b.tmp", out / "snapshots" / ".step_000002.pt.0c1d2e3f.tmp"]
    for p in left:
        p.write_bytes(b"\0" * 4096)  # a checkpoint write killed half-way
    foreign = out / ".results.json.9a8b7c6d.tmp"  # evaluate.py's, maybe being written right now: not ours
    foreign.write_text("{")
    train.run(tiny_args(synth_root, cache_dir, out, *args))
    assert not any(p.exists() for p in left) and foreign.exists()


def test_every_run_keeps_its_last_validations_for_swa(synth_root, cache_dir, tmp_path, monkeypatch):
    """A steadily falling validation loss has no local minimum: the weights of the last --keep-last validations
    are kept as snapshots all the same, so average.py swa (and Figure 4) has them in every run."""
    losses = iter([5.0, 4.0, 3.0, 2.0, 1.0])
    seen = {}

    def falling(model, val_sets, device, dtype, loss_kind, lesions=None):
        step = 2 * (len(seen) + 1)
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"loss": next(losses), "mean_aupr": 0.5, "mean_ap": 0.5, "mean_dice": 0.5, "aupr": [0.5] * 4,
                "ap": [0.5] * 4, "dice": [0.5] * 4}

    monkeypatch.setattr(train, "validate", falling)
    out = tmp_path / "run"
    common = ("--iters", "10", "--val-every", "2", "--val-metric", "loss")
    train.run(tiny_args(synth_root, cache_dir, out, *common, "--stop-at", "7"))  # resumed between validations
    train.run(tiny_args(synth_root, cache_dir, out, *common))
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_000008.pt", "step_000010.pt"]
    for s in (8, 10):
        snap = torch.load(out / "snapshots" / f"step_{s:06d}.pt", weights_only=True)
        assert snap["step"] == s and all(torch.equal(snap["model"][k], v) for k, v in seen[s].items())
    import average

    assert len(average.select_snapshots(out)) == 2
