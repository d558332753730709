"""tune.py: the search space as train.py reads it, a study that completes / continues / survives
failures, interrupted and killed trials resumed (a SIGKILLed worker's at once, a live worker's
never, one that keeps dying given up), pruning, a blank model not chosen, two workers on one SQLite
file, the --show PNGs, one-line errors (bad --storage, --study), optuna's public API only; two
workers on a PostgreSQL server of the test's own (the postgres_url fixture, tests/conftest.py), one
killed.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_tune.py
"""
import ast
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

import optuna
import pytest
import sqlalchemy
import torch

import train
import tune

ROOT = Path(__file__).resolve().parents[1]
COMPLETE, FAIL, PRUNED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                          optuna.trial.TrialState.PRUNED)
RUNNING, WAITING = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING
# Tiny trials: 4 steps of 2 patches of 64 px, validated at steps 2 and 4, on the synthetic IDRiD.
TINY_TRAIN = ["--patch", "64", "--batch", "2", "--no-pretrained", "--device", "cpu",
              "--dtype", "float32", "--workers", "0", "--log-every", "2"]




@pytest.fixture(scope="module")
def tiny(synth_root, tmp_path_factory):
    """tune.py argv builder for a study in its own tmp dir; the cache is prepared once, before
    any worker."""
    from data import prepare_cache

    cache = tmp_path_factory.mktemp("tune_cache")
    prepare_cache("IDR", synth_root, cache, 64)

    def argv(tmp, study="s", trials=3, *extra):
        return ["--train", "IDR", "--data-root", str(synth_root), "--cache", str(cache),
                "--study", study, "--storage", f"sqlite:///{tmp}/tune.db",
                "--runs-dir", str(tmp / "runs"), "--plot-dir", str(tmp / "plots"),
                "--trials", str(trials), "--encoders", "test_resnet",
                "--decoder-widths", "16,16,8,8,8", "8,8,8,8,8", "--resolutions", "64",
                "--iters", "4", "--val-every", "2", *extra, "--", *TINY_TRAIN]
    return argv


def show(tmp, study):
    return ["--study", study, "--storage", f"sqlite:///{tmp}/tune.db",
            "--plot-dir", str(tmp / "plots"), "--show"]


def load(tmp, study="s"):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp}/tune.db")


def open_study(args):
    """The study of a parsed tune.py command line and its storage, as tune.py opens them."""
    storage = tune.make_storage(args.storage, args.storage_timeout)
    return tune.open_study(args, storage), storage


def beat(storage, study, number):
    """One heartbeat of trial `number`, as its worker's optuna heartbeat thread writes it."""
    study_id = storage.get_study_id_from_name(study.study_name)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, number))


def quick_heartbeat(monkeypatch):
    """A 1 s heartbeat and grace period instead of 20 s / 120 s, in the storages tune.py opens."""
    monkeypatch.setattr(tune, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(tune, "GRACE_PERIOD", 1)


def val_scores(run_dir, key="mean_dice"):
    """The validation scores of a run, read back from its log.jsonl (NaN is written as null)."""
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return {r["step"]: (math.nan if r[key] is None else r[key]) for r in map(json.loads, lines)
            if r["split"] == "val"}


# --------------------------------------------------------------------------- the search space alone
def test_search_space_is_what_train_py_reads():
    args = tune.parse_args(["--train", "DDR,IDR", "--encoders", "test_resnet,resnet18",
                            "--resolutions", "128,256", "--lr-range", "1e-4,1e-2",
                            "--optimizers", "adam,sgd", "--losses", "dice,bce+dice",
                            "--decoder-widths", "32,16,8,8,8", "16,8,8,8,8", "--iters", "20",
                            "--val-every", "5", "--", "--patch", "64", "--batch", "4"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = {k: set() for k in ("encoder", "resolution", "optimizer", "loss", "decoder_channels",
                               "decoder_attention")}
    for _ in range(40):
        trial = study.ask()
        params = tune.search_space(trial, args)
        assert params == trial.params  # the flags' names are the optuna parameter names
        # train.py's own parser is the reference: every sampled value arrives as sampled.
        t = train.parse_args(tune.train_argv(params, args, out="runs/x"))
        assert t.train == ["IDR", "DDR"] and t.out == "runs/x" and t.patch == 64 and t.batch == 4
        assert t.lr == params["lr"] and 1e-4 <= t.lr <= 1e-2  # exact float through the command line
        assert t.encoder in ("test_resnet", "resnet18") and t.resolution in (128, 256)
        assert t.optimizer in ("adam", "sgd") and t.loss in ("dice", "bce+dice")
        assert t.decoder_channels == tuple(int(c) for c in params["decoder_channels"].split(","))
        assert t.decoder_attention is params["decoder_attention"]
        # floor-free default
        assert (t.iters, t.val_every, t.warmup, t.val_metric) == (20, 5, 1, "dice")
        for k in seen:
            seen[k].add(params[k])
        study.tell(trial, 0.0)
    assert all(len(v) == 2 for v in seen.values())  # every choice is reachable
    # Single choices and a toy range from flags.
    toy = tune.parse_args(["--train", "IDR", "--encoders", "test_resnet", "--resolutions", "128",
                           "--attention", "on", "--lr-range", "3e-4,3e-4"])
    params = tune.search_space(optuna.create_study().ask(), toy)
    assert (params["encoder"], params["resolution"], params["decoder_attention"]) == (
        "test_resnet", 128, True)
    assert params["lr"] == pytest.approx(3e-4)


def test_defaults_are_paper_scale():
    args = tune.parse_args(["--train", "IDR,DDR"])
    assert args.trials == 1000 and args.resolutions == [1024, 1536] and args.study == "IDR+DDR"
    assert args.encoders[0] == "legacy_seresnet101.in1k" and "seresnext50_32x4d" in args.encoders
    assert args.storage == "sqlite:///tune/IDR+DDR.db" and args.attention == [False, True]
    assert args.objective == "dice"  # floor-free: a blank map scores 0, not (1 + prevalence) / 2
    assert tune.parse_args(["--train", "IDR", "--study", "idr-ddr_v2.1"]).study == "idr-ddr_v2.1"


@pytest.mark.parametrize("argv, message", [
    (["--train", "IDR", "--", "--lr", "1e-3"], "--lr after `--` would override"),
    (["--train", "IDR", "--", "--out=x"], "--out after `--` would override"),
    (["--train", "IDR", "--lr-range", "1e-2,1e-4"], "--lr-range must be LOW,HIGH"),
    (["--train", "IDR", "--optimizers", "adam,lion"], "--optimizers: unknown choice 'lion'"),
    (["--train", "XYZ"], "unknown dataset ID 'XYZ'"),
    ([], "--train is required"),
    (["--show"], "--show needs --study"),
    # Study names name files: anything but a plain file name would write elsewhere or collide.
    (["--train", "IDR", "--study", "x?y"], "--study 'x?y': a study name must be a plain file name"),
    (["--train", "IDR", "--study", "../../escape"],
     "--study '../../escape': a study name must be a plain file name"),
    (["--train", "IDR", "--study", "a/b"], "--study 'a/b': a study name must be a plain file name"),
    (["--train", "IDR", "--study", ""], "--study '': a study name must be a plain file name"),
    (["--train", "IDR", "--study", ".db"], "--study '.db': a study name must be a plain file name"),
])
def test_user_errors_are_one_line(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        tune.parse_args(argv)
    assert "\n" not in str(e.value)


def test_show_without_a_study(tmp_path):
    with pytest.raises(FileNotFoundError, match="no study database .*nope.db"):
        tune.main(["--study", "x", "--storage", f"sqlite:///{tmp_path}/nope.db", "--show"])
    assert not (tmp_path / "nope.db").exists()


def test_bad_encoder_stops_before_the_study_exists(tmp_path):
    argv = ["--train", "IDR", "--encoders", "test_resnet,no_such_net",
            "--storage", f"sqlite:///{tmp_path}/t.db", "--", "--no-pretrained"]
    with pytest.raises(ValueError,
                       match="^--encoders / --decoder-widths: unknown timm encoder 'no_such_net'"):
        tune.main(argv)
    assert not (tmp_path / "t.db").exists()  # a typo must not fix the search space of a new study


# ----------------------------------------------------------------------- studies (real tiny trials)
def test_study_completes_continues_and_shows(tiny, tmp_path, capsys):
    tune.main(tiny(tmp_path, "s", 3))
    out = capsys.readouterr().out
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [COMPLETE] * 3
    for t in study.trials:
        # The objective is the best validation mean Dice, as written in the trial's own log.
        scores = val_scores(t.user_attrs["run_dir"])
        assert sorted(scores) == [2, 4] and sorted(t.intermediate_values) == [2, 4]
        assert t.value == pytest.approx(max(scores.values()))
        assert t.intermediate_values[2] == pytest.approx(scores[2], nan_ok=True)
        # Logs stay, checkpoints go (1000 trials of checkpoints would fill a disk).
        assert not list(Path(t.user_attrs["run_dir"]).rglob("*.pt"))
    # The best trial as a ready-to-run train.py command (without the trial's --out).
    command = [line for line in out.splitlines() if line.startswith("python train.py ")]
    assert len(command) == 1
    argv = shlex.split(command[0])[2:]
    best = study.best_trial
    assert "--out" not in argv
    assert argv == [a for a in best.user_attrs["argv"]
                    if a not in ("--out", best.user_attrs["run_dir"])]
    t = train.parse_args(argv)
    assert (t.lr, t.optimizer, t.loss, t.decoder_attention) == (
        best.params["lr"], best.params["optimizer"], best.params["loss"],
        best.params["decoder_attention"])

    # Rerun with --trials 4: the study continues to 4, it does not run 4 more.
    tune.main(tiny(tmp_path, "s", 4))
    trials = load(tmp_path).trials
    assert ([t.number for t in trials] == [0, 1, 2, 3]
            and len({t.user_attrs["run_dir"] for t in trials}) == 4)
    # the resumed sampler does not replay trial 0
    assert trials[3].params["lr"] != trials[0].params["lr"]
    # Changing a categorical choice of an existing study is refused (optuna cannot mix them).
    with pytest.raises(ValueError, match="was created with --encoders test_resnet, not resnet18"):
        tune.main(tiny(tmp_path, "s", 5, "--encoders", "resnet18"))

    # --show: no new trial; history and (>= 2 completed trials) importances as PNGs.
    capsys.readouterr()
    tune.main(show(tmp_path, "s"))
    out = capsys.readouterr().out
    assert "4 complete" in out and "python train.py " in out and len(load(tmp_path).trials) == 4
    for name in ("s_history.png", "s_importances.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --members K: the K best trials of the best one's architecture as a members table for the sweep
    tune.main(show(tmp_path, "s") + ["--members", "3"])
    lines = [x for x in (tmp_path / "plots" / "s_members.txt").read_text().splitlines()
             if not x.startswith("#")]
    shared = ("encoder", "decoder_channels", "decoder_attention", "resolution")
    ranked = sorted((t for t in load(tmp_path).trials
                     if all(t.params[k] == best.params[k] for k in shared)),
                    key=lambda t: -t.value)[:3]
    assert [x.split(":")[0] for x in lines] == [f"s{n}" for n in range(len(ranked))]
    # each line parses as train.py flags giving that trial's values
    for line, t in zip(lines, ranked):
        a = train.parse_args(["--train", "IDR", "--patch", "16", "--device", "cpu"]
                             + shlex.split(line.split(":", 1)[1].split("#")[0]))
        assert (a.lr, a.optimizer, a.loss, a.resolution) == (
            t.params["lr"], t.params["optimizer"], t.params["loss"], t.params["resolution"])


def test_failed_trial_is_recorded_and_study_goes_on(tiny, tmp_path, monkeypatch, capsys):
    real_run, calls = train.run, []

    def oom_once(args, on_validate=None):  # the first trial runs out of memory, the next ones train
        calls.append(args.out)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_run(args, on_validate)

    monkeypatch.setattr(train, "run", oom_once)
    tune.main(tiny(tmp_path, "f", 2))
    trials = load(tmp_path, "f").trials
    assert [t.state for t in trials] == [FAIL, COMPLETE]
    assert trials[0].user_attrs["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "python train.py " in capsys.readouterr().out

    # --show with one completed trial: the history, and importances skipped with the reason.
    tune.main(show(tmp_path, "f"))
    out = capsys.readouterr().out
    assert "1 complete, 1 fail" in out and "importances need >= 2 completed trials" in out
    assert ((tmp_path / "plots" / "f_history.png").exists()
            and not (tmp_path / "plots" / "f_importances.png").exists())

    # A worker whose first 3 trials all fail stops with
    # one line instead of burning through --trials.
    monkeypatch.setattr(train, "run", lambda args, on_validate=None: (_ for _ in ()).throw(
        ValueError("loss is nan")))
    with pytest.raises(ValueError, match="the first 3 trials of this worker all failed"):
        tune.main(tiny(tmp_path, "bad", 50))
    assert [t.state for t in load(tmp_path, "bad").trials] == [FAIL] * 3


def test_a_dataset_of_ones_own_in_the_search(generic_dataset, tmp_path, capsys):
    """tune.py --train ABC, its --root after `--`: the trial trains on the generic folder (prepared
    into the cache on first use), records it, and the best trial's command names it."""
    root = generic_dataset(("EX", "HE"))
    argv = ["--train", "ABC", "--data-root", str(tmp_path / "none"),
            "--cache", str(tmp_path / "cache"), "--study", "own",
            "--storage", f"sqlite:///{tmp_path}/tune.db", "--runs-dir", str(tmp_path / "runs"),
            "--plot-dir", str(tmp_path / "plots"), "--trials", "1", "--encoders", "test_resnet",
            "--decoder-widths", "8,8,8,8,8", "--resolutions", "64", "--iters", "4",
            "--val-every", "2", "--", *TINY_TRAIN, "--root", f"ABC={root}"]
    tune.main(argv)
    (trial,) = load(tmp_path, "own").trials
    assert trial.state == COMPLETE, trial.user_attrs.get("error")
    recorded = json.loads((Path(trial.user_attrs["run_dir"]) / "args.json").read_text())
    assert recorded["train"] == ["ABC"] and recorded["root"] == [f"ABC={root}"]
    assert sorted(val_scores(trial.user_attrs["run_dir"])) == [2, 4]
    assert (tmp_path / "cache" / "ABC" / "64" / "meta.json").is_file()
    command = [x for x in capsys.readouterr().out.splitlines() if x.startswith("python train.py ")]
    assert len(command) == 1 and f"--root ABC={root}" in command[0], command


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_pruned_trials_stop_training_early(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "make_pruner", lambda args: AlwaysPrune())
    tune.main(tiny(tmp_path, "p", 1))
    (t,) = load(tmp_path, "p").trials
    assert t.state == PRUNED and list(t.intermediate_values) == [2]
    # training stopped at the first validation
    assert sorted(val_scores(t.user_attrs["run_dir"])) == [2]


def test_interrupted_trial_resumes_from_its_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    real_run = train.run

    def interrupted_at_step_2(args, on_validate=None):  # Ctrl-C right after the first validation
        def hook(step, metrics):
            on_validate(step, metrics)
            raise KeyboardInterrupt
        return real_run(args, hook)

    monkeypatch.setattr(train, "run", interrupted_at_step_2)
    # utils.run: one line, 130
    with pytest.raises(KeyboardInterrupt, match="interrupted: rerun the same command"):
        tune.main(tiny(tmp_path, "i", 1))
    run_dir = Path(load(tmp_path, "i").trials[0].user_attrs["run_dir"])
    assert (run_dir / "last.pt").exists()  # kept for the resume

    monkeypatch.setattr(train, "run", real_run)
    tune.main(tiny(tmp_path, "i", 1))
    assert f"resuming {run_dir} from step 2" in capsys.readouterr().out
    first, again = load(tmp_path, "i").trials
    assert (first.state, again.state) == (FAIL, COMPLETE)
    # Same trial resumed: same parameters and run dir, the
    # interrupted trial's report carried over, one count.
    assert again.params == first.params and again.user_attrs["run_dir"] == str(run_dir)
    assert sorted(again.intermediate_values) == [2, 4]
    assert again.value == pytest.approx(max(val_scores(run_dir).values()))
    assert tune.trial_count(load(tmp_path, "i")) == (1, 0)


# the hand-made RUNNING trial of a dead worker
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_killed_workers_trial_is_retried_in_its_run_dir(tiny, tmp_path, monkeypatch):
    """A worker of another machine (no process record this one can judge) killed: optuna's
    heartbeat decides."""
    quick_heartbeat(monkeypatch)
    argv = tiny(tmp_path, "k", 1)
    args = tune.parse_args(argv)
    study, storage = open_study(args)
    # A worker started trial 0 and was killed (SIGKILL, preempted node): RUNNING, heartbeat silent.
    trial = study.ask()
    tune.search_space(trial, args)
    trial.set_user_attr("run_dir", str(tmp_path / "runs" / "k" / "trial_0000"))
    beat(storage, study, trial.number)
    # NOTE: SQLite's CURRENT_TIMESTAMP has 1 s resolution: > 2 s makes a 1 s grace certain
    time.sleep(2.2)
    tune.main(argv)
    dead, retry = load(tmp_path, "k").trials
    assert (dead.state, retry.state) == (FAIL, COMPLETE)
    assert retry.params == dead.params and retry.user_attrs["run_dir"] == dead.user_attrs["run_dir"]
    assert tune.trial_count(load(tmp_path, "k")) == (1, 0)


def worker(argv, log):
    """A tune.py process writing to the file `log`: files, not pipes, so that no worker ever
    waits for the test to read its output (a pipe read after the other worker's end can fill and
    stall a worker)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "tune.py", *argv], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, text=True)


def finish(procs, logs, timeout=900):
    """Wait for the workers; on a failure, show the end of each worker's log."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    text = "\n".join(f"--- {log}\n" + Path(log).read_text()[-3000:] for log in logs)
    assert [p.returncode for p in procs] == [0] * len(procs), text
    return [Path(log).read_text() for log in logs]


def test_two_workers_share_one_sqlite_study(tiny, tmp_path):
    """Two processes started together, 2 trials each (2 steps), on one fresh SQLite file: 4
    trials, none lost."""
    # NOTE: this once failed in a full-suite run on a loaded 2-core machine. Its
    # workers' output went to pipes read one after the other and it had a 240 s limit:
    # timing, not SQLite (3 workers x 40 trials on one file and fresh-file starts show
    # no lock error). Output to files, a limit for a loaded machine.
    logs = [tmp_path / f"worker{seed}.log" for seed in (0, 1)]
    procs = [worker(tiny(tmp_path, "w", 100, "--worker-trials", "2", "--seed", str(seed),
                         "--iters", "2"), log)
             for seed, log in zip((0, 1), logs)]
    finish(procs, logs)
    trials = load(tmp_path, "w").trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert [t.state for t in trials] == [COMPLETE] * 4
    workers = [t.user_attrs["worker"].split(":")[-1] for t in trials]
    assert sorted(workers.count(str(p.pid)) for p in procs) == [2, 2]
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4


# ---------------------------------------------------------------------------- dead and live workers
def dead_process():
    """The record of a process that ran on this machine and is gone (SIGKILLed and reaped)."""
    p = subprocess.Popen(["sleep", "60"])
    record = tune.this_process(p.pid)
    p.kill()
    p.wait()
    return record


def hand_made_trial(study, storage, args, run_dir, process):
    """A RUNNING trial as a worker leaves it: parameters, run dir, its process, a fresh
    heartbeat."""
    trial = study.ask()
    tune.search_space(trial, args)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("process", {**process, "trial": trial.number})
    beat(storage, study, trial.number)
    return trial


@pytest.mark.skipif(tune._machine() is None, reason="needs Linux's /proc to see processes")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the hand-made RUNNING trial
def test_dead_local_worker_is_retried_at_once(tiny, tmp_path):
    """The heartbeat is fresh (the grace period is 120 s), yet the worker is gone: an immediate
    rerun retries it."""
    argv = tiny(tmp_path, "d", 1)
    args = tune.parse_args(argv)
    study, storage = open_study(args)
    run_dir = tmp_path / "runs" / "d" / "trial_0000"
    hand_made_trial(study, storage, args, run_dir, dead_process())
    tic = time.monotonic()
    tune.main(argv)
    assert time.monotonic() - tic < tune.GRACE_PERIOD  # not waiting for the heartbeat
    dead, retry = load(tmp_path, "d").trials
    assert (dead.state, retry.state) == (FAIL, COMPLETE)
    assert retry.params == dead.params and retry.user_attrs["run_dir"] == str(run_dir)
    # the retry's own worker, not the dead one
    assert retry.user_attrs["process"]["pid"] == os.getpid()
    assert tune.trial_count(load(tmp_path, "d")) == (1, 0)


@pytest.mark.skipif(tune._machine() is None, reason="needs Linux's /proc to see processes")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_live_workers_trial_is_not_taken(tiny, tmp_path, monkeypatch):
    """A live worker (this test process) whose heartbeat is late: its RUNNING trial is neither
    failed nor retried."""
    quick_heartbeat(monkeypatch)  # 1 s: the heartbeat goes stale
    argv = tiny(tmp_path, "l", 2)
    args = tune.parse_args(argv)
    run_dir = tmp_path / "runs" / "l" / "trial_0000"
    live = hand_made_trial(*open_study(args), args, run_dir, tune.this_process())
    # NOTE: SQLite's CURRENT_TIMESTAMP has 1 s resolution: > 2 s makes a 1 s grace certain
    time.sleep(2.2)
    tune.main(argv)
    trials = load(tmp_path, "l").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.RUNNING, COMPLETE]
    assert trials[0].number == live.number and not trials[0].user_attrs.get("error")
    # a new trial, not a retry
    assert trials[1].user_attrs["run_dir"] != trials[0].user_attrs["run_dir"]
    assert tune.trial_count(load(tmp_path, "l")) == (2, 0)


@pytest.mark.skipif(tune._machine() is None, reason="needs Linux's /proc to see processes")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_whose_worker_keeps_dying_is_given_up(tiny, tmp_path):
    """Each death queues a copy (same parameters and run dir), MAX_RETRY times, then the trial is
    given up; a copy just taken by a new worker, still holding the dead worker's record, is not
    taken for dead."""
    args = tune.parse_args(tiny(tmp_path, "g", 1))
    study, storage = open_study(args)
    run_dir = tmp_path / "runs" / "g" / "trial_0000"
    trial = hand_made_trial(study, storage, args, run_dir, dead_process())
    for _ in range(tune.MAX_RETRY):
        tune.settle_local_trials(study, storage)  # as a rerun on this machine does first
        (queued,) = study.get_trials(states=(WAITING,))
        assert queued.params == trial.params and queued.user_attrs["run_dir"] == str(run_dir)
        trial = study.ask()  # the next worker takes the copy ...
        assert trial.number == queued.number
        assert trial.user_attrs["process"]["trial"] != trial.number  # the dead worker's record
        tune.settle_local_trials(study, storage)
        assert study.trials[-1].state == RUNNING  # ... not taken for dead
        trial.set_user_attr("process", {**dead_process(), "trial": trial.number})  # ... dies too
    tune.settle_local_trials(study, storage)
    assert [t.state for t in study.trials] == [FAIL] * (tune.MAX_RETRY + 1)  # no copy: given up
    assert tune.trial_count(study) == (1, 0)  # one run dir, counted once


def kill_mid_trial(proc, runs, deadline=600):
    """SIGKILL `proc` once one of its trials has written last.pt (at a validation) and is still
    training; returns that trial's run dir and the step its last.pt holds."""
    tic = time.monotonic()
    while time.monotonic() - tic < deadline:
        assert proc.poll() is None, "the worker ended before it could be killed mid-trial"
        for last in Path(runs).glob("trial_*/last.pt"):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return last.parent, torch.load(last, weights_only=True, map_location="cpu")["step"]
        time.sleep(0.02)
    raise AssertionError("no trial validated in time")


def check_resumed(study, run_dir, step, trials, iters=20, every=2):
    """--trials complete trials; the killed trial failed and its one retry completed in the same
    run dir, resumed from last.pt's step; one count per trial, each validation of each run logged
    once."""
    everything = study.trials
    assert sum(t.state == COMPLETE for t in everything) == trials
    assert tune.trial_count(study) == (trials, 0)
    (dead,) = [t for t in everything if t.state == FAIL]
    (retry,) = [t for t in everything if t.system_attrs.get("failed_trial") == dead.number]
    assert dead.user_attrs["run_dir"] == retry.user_attrs["run_dir"] == str(run_dir)
    assert retry.state == COMPLETE and retry.params == dead.params and 0 < step < iters
    complete = [t for t in everything if t.state == COMPLETE]
    assert len({t.user_attrs["run_dir"] for t in complete}) == trials
    for t in complete:
        lines = [json.loads(x)
                 for x in (Path(t.user_attrs["run_dir"]) / "log.jsonl").read_text().splitlines()]
        assert ([r["step"] for r in lines if r["split"] == "val"]
                == list(range(every, iters + 1, every)))
    # The dead worker's reports are carried over, the retry reports from the resumed step on.
    assert sorted(retry.intermediate_values) == sorted(set(dead.intermediate_values)
                                                       | set(range(step + every, iters + 1, every)))
    assert retry.value == pytest.approx(max(val_scores(run_dir).values()))
    return retry


def test_sigkilled_worker_is_resumed_by_an_immediate_rerun(tiny, tmp_path):
    """A worker SIGKILLed mid-trial, the same command rerun at once: the trial resumes from its
    last.pt."""
    argv = tiny(tmp_path, "kill", 2, "--iters", "20", "--pruner", "none")
    first = worker(argv, tmp_path / "first.log")
    run_dir, step = kill_mid_trial(first, tmp_path / "runs" / "kill")
    (out,) = finish([worker(argv, tmp_path / "rerun.log")], [tmp_path / "rerun.log"])
    assert f"resuming {run_dir} from step {step}" in out
    check_resumed(load(tmp_path, "kill"), run_dir, step, trials=2)


# ----------------------------------------------------------------------------- objective, storage
def test_default_objective_does_not_pick_a_blank_model(tiny, tmp_path, monkeypatch):
    """A near-blank model (AUPR at its floor (1 + prevalence) / 2, Dice ~0) beside a trained one
    (lower AUPR, real Dice): the default objective picks the trained one; the protocol AUPR would
    pick the blank one."""
    # e.g. microaneurysms: a blank map's protocol AUPR is (1 + 0.008) / 2 = 0.504
    prevalence = 0.008
    # AP: a blank map scores the prevalence (its one threshold
    # recalls everything at precision = prevalence).
    blank = {"mean_aupr": (1 + prevalence) / 2, "mean_dice": 0.01, "mean_ap": prevalence,
             "loss": 0.05}
    # published MA AUPRs < 0.3
    trained = {"mean_aupr": 0.31, "mean_dice": 0.42, "mean_ap": 0.25, "loss": 0.04}

    # even trials are blank, odd ones trained (train.py's best rule)
    def scripted(args, on_validate=None):
        metrics = blank if int(Path(args.out).name.split("_")[1]) % 2 == 0 else trained
        for step in (2, 4):
            on_validate(step, dict(metrics))
        return {**metrics, "best": metrics[f"mean_{args.val_metric}"], "best_step": 4,
                "out": args.out}

    monkeypatch.setattr(train, "run", scripted)
    runs = [(None, "obj", 1), ("aupr", "obj-aupr", 0)]
    if "ap" in [a.choices for a in train.build_parser()._actions if a.dest == "val_metric"][0]:
        runs.append(("ap", "obj-ap", 1))
    for objective, study, best in runs:
        tune.main(tiny(tmp_path, study, 2, *(["--objective", objective] if objective else [])))
        s = load(tmp_path, study)
        assert s.best_trial.number == best and [t.state for t in s.trials] == [COMPLETE] * 2
    assert load(tmp_path, "obj").best_value == pytest.approx(0.42)


def test_objective_unknown_to_train_py_is_one_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("no trial may start"))
    choices = [a.choices for a in train.build_parser()._actions if a.dest == "val_metric"][0]
    if "ap" in choices:  # once train.py validates AP, --objective ap reads its mean_ap
        pytest.skip("train.py has --val-metric ap")
    with pytest.raises(ValueError, match=r"^--objective ap: this train.py has no --val-metric ap"):
        tune.main(tiny(tmp_path, "ap", 1, "--objective", "ap"))
    assert not (tmp_path / "tune.db").exists()


@pytest.mark.parametrize("url, message", [
    ("nonsense", "--storage nonsense: ArgumentError: Could not parse"),
    ("nosuchdb://me:secret@host/db", "--storage nosuchdb://me:***@host/db: NoSuchModuleError"),
    ("postgresql://me:secret@127.0.0.1:1/db", "--storage postgresql://me:***@127.0.0.1:1/db: "),
    ("sqlite:////proc/no/such/dir/t.db",
     "--storage sqlite:////proc/no/such/dir/t.db: FileNotFoundError"),
])
def test_bad_storage_is_one_line(url, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        open_study(tune.parse_args(["--train", "IDR", "--study", "s", "--storage", url]))
    assert "\n" not in str(e.value) and "secret" not in str(e.value)


def test_bad_storage_from_the_command_line_is_one_line(tmp_path):
    url = "postgresql://me:secret@127.0.0.1:1/optuna"  # port 1: nothing listens
    p = subprocess.run([sys.executable, "tune.py", "--train", "IDR", "--encoders", "test_resnet",
                        "--decoder-widths", "8,8,8,8,8", "--storage", url, "--", "--no-pretrained"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1 and p.stdout == "" and "secret" not in p.stderr
    assert p.stderr.count("\n") == 1
    assert p.stderr.startswith("error: --storage postgresql://me:***@127.0.0.1:1/optuna: ")


def test_tune_uses_only_optunas_public_api(tmp_path):
    """tune.py subclasses no optuna class and reads no private name (a leading _) of optuna or any
    other library, so an optuna release cannot break it silently; its storage is optuna's own
    RDBStorage, with the heartbeat on."""
    tree = ast.parse((ROOT / "tune.py").read_text())
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            found += [f"class {node.name}({b})" for b in bases if "optuna" in b]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            found += [m for m in modules if any(private(part) for part in m.split("."))]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            # argparse keeps no public list of an argument's choices: train.py's own parser is read
            if ast.unparse(node) != "train.build_parser()._actions":
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr"):
            names = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            found += [f"getattr(..., {n!r})" for n in names if isinstance(n, str) and private(n)]
    assert not found, found
    storage = tune.make_storage(f"sqlite:///{tmp_path}/t.db")
    assert type(storage) is optuna.storages.RDBStorage
    assert storage.get_heartbeat_interval() == tune.HEARTBEAT_INTERVAL


def test_train_same_list_syntax():
    """--train as every dataset-list flag reads it (data.flags.DatasetList); `--` still ends
    tune.py's flags."""
    args = tune.parse_args(["--train", "DDR", "idr", "--", "--batch", "4"])
    assert (args.train == ["IDR", "DDR"] and args.study == "IDR+DDR"
            and args.train_extra == ["--batch", "4"])
    assert tune.parse_args(["--train", "IDR+DDR,MES"]).train == ["IDR", "DDR", "MES"]
    assert tune.train_argv({"encoder": "e", "decoder_channels": "8,8,8,8,8",
                            "decoder_attention": False, "lr": 1e-3, "optimizer": "adam",
                            "loss": "bce", "resolution": 64}, args)[:2] == ["--train", "IDR,DDR"]


# ----------------------------------------------------------------------------- a locked study file
def test_locked_study_file_is_waited_for_then_one_line(tiny, tmp_path, capsys):
    """Another process holds the SQLite file's write lock (sqlite3's BEGIN EXCLUSIVE): tune.py says
    it waits and on what, gives up after --storage-timeout in one line naming the file, and goes on
    once the lock is gone."""
    import sqlite3
    import threading

    db = tmp_path / "tune.db"
    open_study(tune.parse_args(tiny(tmp_path, "w", 1)))  # the study exists
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        tic = time.monotonic()
        with pytest.raises(ValueError) as e:
            tune.main(tiny(tmp_path, "w", 1, "--storage-timeout", "1"))
        seconds = time.monotonic() - tic
        msg = str(e.value)
        assert "\n" not in msg and f"the study file {db} stayed locked" in msg, msg
        assert "--storage-timeout" in msg
        assert seconds < 30, seconds  # bounded: not 5 x 60 s of SQLite waits and optuna retries
        waiting = f"waiting for the study file {db}: another process holds it locked"
        assert waiting in capsys.readouterr().err
        # the lock goes away while tune.py waits: it goes on
        threading.Timer(2.5, holder.rollback).start()  # after the first second, which is silent
        tune.main(show(tmp_path, "w") + ["--storage-timeout", "30"])
    finally:
        holder.close()
    out = capsys.readouterr()
    assert "waiting for the study file" in out.err and "no completed trial yet" in out.out
    with pytest.raises(ValueError, match="--storage-timeout must be > 0"):
        tune.parse_args(tiny(tmp_path, "w", 1, "--storage-timeout", "0"))


# ---- on a real PostgreSQL server (conftest.postgres_url: its own server, started and stopped here)
def kill_when_mid_trial(proc, url, study_name, deadline=600):
    """SIGKILL `proc` once a trial it runs (RUNNING, its pid) has written last.pt; that trial's
    run dir and the step its last.pt holds."""
    tic, study = time.monotonic(), None
    while time.monotonic() - tic < deadline:
        assert proc.poll() is None, "the worker ended before it could be killed mid-trial"
        # NOTE: loaded once it exists; creating it here would race the workers creating the tables
        try:
            study = study or optuna.load_study(study_name=study_name, storage=tune.driver_url(url))
            trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # no study, or no tables yet
            trials = []
        for t in trials:
            last = Path(t.user_attrs.get("run_dir", "-")) / "last.pt"
            if t.user_attrs.get("worker", "").endswith(f":{proc.pid}") and last.exists():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return last.parent, torch.load(last, weights_only=True, map_location="cpu")["step"]
        time.sleep(0.1)
    raise AssertionError("no trial of the worker validated in time")


def test_two_workers_on_postgres_one_killed_and_restarted(postgres_url, synth_root, tmp_path):
    from data import prepare_cache

    cache = tmp_path / "cache"
    prepare_cache("IDR", synth_root, cache, 64)  # once, before the workers
    argv = lambda seed: ["--train", "IDR", "--data-root", str(synth_root), "--cache",  # noqa: E731
                         str(cache), "--study", "pg", "--storage", postgres_url,
                         "--runs-dir", str(tmp_path / "runs"),
                         "--plot-dir", str(tmp_path / "plots"), "--trials", "3",
                         "--seed", str(seed), "--encoders", "test_resnet",
                         "--decoder-widths", "8,8,8,8,8", "--resolutions", "64", "--iters", "10",
                         "--val-every", "2", "--pruner", "none", "--", *TINY_TRAIN]
    logs = [tmp_path / name for name in ("a.log", "b.log", "a-again.log")]
    a, b = worker(argv(0), logs[0]), worker(argv(1), logs[1])
    run_dir, step = kill_when_mid_trial(a, postgres_url, "pg")
    again = worker(argv(0), logs[2])  # restarted at once, as a job scheduler would
    outputs = finish([b, again], logs[1:])
    # Whichever worker starts a trial next sees the dead
    # process and queues its trial again; one resumes it.
    assert sum(f"resuming {run_dir} from step {step}" in out for out in outputs) == 1
    study = optuna.load_study(study_name="pg", storage=tune.driver_url(postgres_url))
    retry = check_resumed(study, run_dir, step, trials=3, iters=10)
    assert retry.state == COMPLETE
