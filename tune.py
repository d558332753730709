"""Optuna search over train.py's settings: the paper's TPE study (section 2.3), on one machine or many.

    python tune.py --train IDR,DDR --data-root data_raw --trials 1000 --study idr-ddr
    python tune.py --train IDR --data-root demo/data --encoders test_resnet --resolutions 128 --iters 20 --val-every 10 --trials 8 -- --patch 64 --batch 4 --no-pretrained --device cpu
    python tune.py --train IDR,DDR --data-root /data --study idr-ddr --storage postgresql://me:pw@dbhost/optuna --seed $RANK
    python tune.py --study idr-ddr --show     # best trial as a train.py command line, history + importances PNGs

Each trial samples train.py flags (search_space below), trains in-process through train.parse_args +
train.run under RUNS_DIR/<study>/trial_<n>, and reports the validation score after every validation
so the pruner can stop poor trials early. Every trial's train.py command line is stored with it.
--trials is the total the study should reach: rerunning continues the count. Arguments after `--`
go to train.py unchanged (e.g. `-- --batch 4 --patch 256 --dtype bfloat16`).
"""
import argparse
import gc
import os
import shlex
import shutil
import socket
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import optuna
import sqlalchemy
import torch

import data
import train
from model import ModelConfig, build_model

# train.py flags written by tune.py for every trial: passing one of them after `--` is an error.
OWNED_FLAGS = ("--train", "--out", "--data-root", "--cache", "--lr", "--optimizer", "--loss", "--resolution",
               "--encoder", "--decoder-channels", "--decoder-attention", "--iters", "--val-every", "--warmup",
               "--val-metric")
# Choices that fix the categorical distributions of a study: optuna cannot change them once trials exist.
FIXED_SETTINGS = ("train", "objective", "encoders", "decoder_widths", "attention", "resolutions", "optimizers",
                  "losses")


# ----------------------------------------------------------------------------- command line
def _list(kind):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values
    return parse


def _widths(text):
    """'256,128,64,32,16' -> the same string, checked (optuna choices must be plain values)."""
    try:
        return ",".join(str(int(c)) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _on_off(text):
    values = _list(str)(text)
    if any(v not in ("on", "off") for v in values):
        raise argparse.ArgumentTypeError(f"expected on, off or on,off, got {text!r}")
    return [v == "on" for v in dict.fromkeys(values)]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- train.py options]")
    g = p.add_argument_group("study")
    g.add_argument("--train", default=None,
                   help="datasets the trials train and validate on, e.g. IDR,DDR (required unless --show)")
    g.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data_raw"),
                   help="passed to train.py (default: %(default)s)")
    g.add_argument("--cache", default="cache", help="prepared-data cache, passed to train.py (default: %(default)s)")
    g.add_argument("--study", default=None, help="study name (default: the --train combination, e.g. IDR+DDR)")
    g.add_argument("--storage", default=None,
                   help="optuna storage URL; an RDB URL (postgresql://, mysql://) shares the study between "
                        "machines (default: sqlite:///tune/<study>.db)")
    g.add_argument("--trials", type=int, default=1000,
                   help="total trials the study should reach, all workers together (default: %(default)s)")
    g.add_argument("--worker-trials", type=int, default=None,
                   help="at most this many trials in this process, e.g. per batch job (default: no limit)")
    g.add_argument("--objective", choices=("aupr", "dice"), default="aupr",
                   help="validation mean over lesions to maximise (default: %(default)s)")
    g.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                   help="early stopping of poor trials (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="TPE sampler seed; give each parallel worker its own (default: %(default)s)")
    g.add_argument("--runs-dir", default="runs/tune",
                   help="trial runs go to RUNS_DIR/<study>/trial_<n> (default: %(default)s)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished trials' *.pt files; otherwise only args.json and log.jsonl stay "
                        "(default: %(default)s)")
    g.add_argument("--plot-dir", default="tune",
                   help="history and importance PNGs go here as <study>_*.png (default: %(default)s)")
    g.add_argument("--show", action="store_true",
                   help="run no trial: print the best one and write the PNGs (default: %(default)s)")

    g = p.add_argument_group("search space (paper section 2.3; comma-separated choices)")
    g.add_argument("--encoders", type=_list(str), default="legacy_seresnet101.in1k,seresnext50_32x4d,resnet50",
                   help="timm features_only encoders (default: %(default)s)")
    g.add_argument("--decoder-widths", type=_widths, nargs="+", default=["256,128,64,32,16", "128,64,32,16,8"],
                   metavar="WIDTHS", help="decoder channel lists to choose from, one argument each, deepest first "
                                          "(default: 256,128,64,32,16 128,64,32,16,8)")
    g.add_argument("--attention", type=_on_off, default="off,on",
                   help="scSE decoder attention choices (default: %(default)s)")
    g.add_argument("--resolutions", type=_list(int), default="1024,1536",
                   help="prepared image sizes (default: %(default)s)")
    g.add_argument("--lr-range", type=_list(float), default="1e-5,1e-2",
                   help="learning-rate range LOW,HIGH, sampled on a log scale (default: %(default)s)")
    g.add_argument("--optimizers", type=_list(str), default="adam,adamw,sgd", help="(default: %(default)s)")
    g.add_argument("--losses", type=_list(str), default="bce,dice,bce+dice", help="(default: %(default)s)")
    g.add_argument("--iters", type=int, default=2000, help="training steps per trial (default: %(default)s)")
    g.add_argument("--val-every", type=int, default=250,
                   help="validate and report to the pruner every N steps (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=None, help="LR warmup steps per trial (default: ITERS // 20)")
    return p


def parse_args(argv=None):
    """tune.py's own flags before `--`, train.py's after it; user errors raise a one-line ValueError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    args.train_extra = argv[cut + 1:]
    for flag in args.train_extra:
        if flag.split("=")[0] in OWNED_FLAGS:
            raise ValueError(f"{flag.split('=')[0]} after `--` would override what tune.py sets; use tune.py's own "
                             f"flags (--train, --data-root, --cache, --iters, --val-every, --warmup, the search space)")
    if args.train is not None:
        args.train = data.parse_dataset_ids(args.train)
    elif not args.show:
        raise ValueError("--train is required (e.g. --train IDR,DDR)")
    if args.study is None:
        if args.train is None:
            raise ValueError("--show needs --study (or --train, whose combination name is the default study)")
        args.study = data.combo_name(args.train)
    if args.storage is None:
        args.storage = f"sqlite:///tune/{args.study}.db"
    if len(args.lr_range) != 2 or not 0 < args.lr_range[0] <= args.lr_range[1]:
        raise ValueError(f"--lr-range must be LOW,HIGH with 0 < LOW <= HIGH, got {args.lr_range}")
    for flag, choices in (("--optimizers", ("adam", "adamw", "sgd")), ("--losses", ("bce", "dice", "bce+dice"))):
        for v in getattr(args, flag[2:]):
            if v not in choices:
                raise ValueError(f"{flag}: unknown choice {v!r} (choose from {', '.join(choices)})")
    for flag in ("trials", "iters", "val_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup is None:
        args.warmup = args.iters // 20
    # Duplicated choices would weigh one value twice in TPE's categorical prior.
    for key in ("encoders", "decoder_widths", "resolutions", "optimizers", "losses"):
        setattr(args, key, list(dict.fromkeys(getattr(args, key))))
    return args


# ----------------------------------------------------------------------------- one trial
def search_space(trial, args):
    """The paper's search (section 2.3): one trial's values, keyed by train.py's argument names."""
    return {
        "lr": trial.suggest_float("lr", *args.lr_range, log=True),
        "optimizer": trial.suggest_categorical("optimizer", args.optimizers),
        "loss": trial.suggest_categorical("loss", args.losses),
        "resolution": trial.suggest_categorical("resolution", args.resolutions),
        "encoder": trial.suggest_categorical("encoder", args.encoders),
        "decoder_channels": trial.suggest_categorical("decoder_channels", args.decoder_widths),
        "decoder_attention": trial.suggest_categorical("decoder_attention", args.attention),
    }


def train_argv(params, args, out=None):
    """train.py command line of a trial: the search-space values, the fixed settings, then the `--` extras."""
    argv = ["--train", ",".join(args.train)] + (["--out", str(out)] if out is not None else [])
    argv += ["--data-root", str(args.data_root), "--cache", str(args.cache),
             "--encoder", params["encoder"], "--decoder-channels", params["decoder_channels"]]
    argv += ["--decoder-attention"] if params["decoder_attention"] else []
    argv += ["--resolution", str(params["resolution"]), "--optimizer", params["optimizer"], "--loss", params["loss"],
             "--lr", repr(params["lr"]),  # repr: the exact float, so the command reproduces the trial
             "--iters", str(args.iters), "--val-every", str(args.val_every), "--warmup", str(args.warmup),
             "--val-metric", args.objective]
    return argv + list(args.train_extra)


def command_line(argv):
    return "python train.py " + shlex.join(argv)


def without_out(argv):
    """The trial's command minus --out: train.py then writes to its default runs/<COMBO>/s<SEED>."""
    i = argv.index("--out") if "--out" in argv else None
    return argv if i is None else argv[:i] + argv[i + 2:]


def run_trial(trial, args):
    """Objective: train one trial in-process, report every validation, return the best validation score."""
    params = search_space(trial, args)
    # NOTE: the retry of a trial that was interrupted (Ctrl-C) or whose worker died inherits its user
    # attributes, so it resumes the same run directory from last.pt (train.py's own resume).
    out = trial.user_attrs.get("run_dir")
    if out is None:
        out = str(Path(args.runs_dir) / args.study / f"trial_{trial.number:04d}")
        if Path(out).exists():  # left over from an earlier study of the same name (storage deleted)
            print(f"note: removing stale {out}")
            shutil.rmtree(out)
        trial.set_user_attr("run_dir", out)
    argv = train_argv(params, args, out)
    trial.set_user_attr("argv", argv)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    print(f"trial {trial.number}: {command_line(argv)}", flush=True)
    key, reported = f"mean_{args.objective}", {}

    def on_validate(step, metrics):
        reported[step] = metrics[key]
        trial.report(metrics[key], step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"val {key} {metrics[key]:.4f} at step {step}")

    keep = args.keep_checkpoints
    try:
        result = train.run(train.parse_args(argv), on_validate=on_validate)
    except optuna.TrialPruned:
        raise
    except KeyboardInterrupt:
        # Ctrl-C: optuna records this trial as failed; a queued copy resumes its run dir on the next start.
        trial.study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=trial.user_attrs, intermediate_values=reported))
        keep = True
        raise
    except Exception as e:  # OOM, a diverged (NaN) run, an encoder that cannot be built: the trial fails
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        raise
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # NOTE: after an OOM the next trial needs the cached blocks back
        if not keep:
            # 1000 trials of SE-ResNet101 checkpoints would fill a disk; logs stay for the record.
            for name in ("last.pt", "best.pt"):
                Path(out, name).unlink(missing_ok=True)
            shutil.rmtree(Path(out, "snapshots"), ignore_errors=True)
    return result["best"]  # best validation score of the run: what best.pt holds


# ----------------------------------------------------------------------------- the study
def sqlite_path(url):
    """The database file of a sqlite:/// URL, else None."""
    path = url[len("sqlite:///"):].split("?")[0] if url.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def make_storage(url):
    """RDB storage with a heartbeat, so trials of killed workers are failed and retried (resuming their run)."""
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        if sqlite_path(url) is not None:
            sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
        # NOTE: several processes on one SQLite file wait for its lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat and retry are marked experimental
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
            retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=2, inherit_intermediate_values=True)}
        else:
            retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(
                max_retry=2, inherit_intermediate_values=True)}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=300,
                                          **retry)


def make_pruner(args):
    if args.pruner == "median":
        # Compare from the second validation on, once 5 trials have finished.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=min(args.iters, 2 * args.val_every))
    if args.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=args.val_every, max_resource=args.iters, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(args):
    if args.show and sqlite_path(args.storage) is not None and not sqlite_path(args.storage).exists():
        raise FileNotFoundError(f"no study database {sqlite_path(args.storage)} (see --storage, --study)")
    for attempt in range(5):
        try:
            storage = make_storage(args.storage)
            break
        except sqlalchemy.exc.SQLAlchemyError:
            # NOTE: workers started together on a new database race to create its tables; the loser retries.
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
    if args.show:
        try:
            return optuna.load_study(study_name=args.study, storage=storage)
        except KeyError:
            raise ValueError(f"no study {args.study!r} in {args.storage} (see --study, --storage)")
    study = optuna.create_study(study_name=args.study, storage=storage, pruner=make_pruner(args),
                                direction="maximize", load_if_exists=True)
    # NOTE: seeded with --seed + the trial count, so a resumed study does not replay its first random trials.
    # constant_liar: parallel workers see each other's running trials as poor, so they explore elsewhere.
    seed = args.seed + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    settings = {k: getattr(args, k) for k in FIXED_SETTINGS}
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
    else:
        for k in FIXED_SETTINGS:
            if saved[k] != settings[k]:
                raise ValueError(f"study {args.study!r} in {args.storage} was created with --{k.replace('_', '-')} "
                                 f"{_text(saved[k])}, not {_text(settings[k])}: use the same value or another --study")
    return study


def _text(value):
    """A setting as it is written on the command line."""
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def trial_count(study):
    """(trials that count towards --trials, queued trials).

    One count per run directory: the retry of a killed or interrupted trial shares its run_dir and is
    the same trial resumed. Queued (WAITING) trials count once they start.
    """
    trials = study.get_trials(deepcopy=False)
    waiting = [t.state == optuna.trial.TrialState.WAITING for t in trials]
    return len({t.user_attrs.get("run_dir", t.number) for t, w in zip(trials, waiting) if not w}), sum(waiting)


def _first_choices(args, resolution):
    return {"lr": args.lr_range[0], "optimizer": args.optimizers[0], "loss": args.losses[0], "resolution": resolution,
            "encoder": args.encoders[0], "decoder_channels": args.decoder_widths[0], "decoder_attention": False}


def check_inputs(args):
    """User errors stop here, once, rather than failing every trial: train.py's command line at every
    resolution, and every encoder with every decoder width list (built without weights)."""
    for resolution in args.resolutions:
        train.parse_args(train_argv(_first_choices(args, resolution), args))
    for encoder in args.encoders:
        for widths in args.decoder_widths:
            try:
                build_model(ModelConfig(encoder=encoder, pretrained=False, decoder_channels=_list(int)(widths)))
            except ValueError as e:
                raise ValueError(f"--encoders / --decoder-widths: {e}") from None


def prepare_data(args):
    """Prepare the caches of every resolution before the first trial (a no-op when up to date)."""
    targs = train.parse_args(train_argv(_first_choices(args, args.resolutions[0]), args))
    for resolution in args.resolutions:
        for ds_id in targs.train:
            data.prepare_cache(ds_id, targs.data_root, targs.cache, resolution, **data.data_options(targs))


def optimize(study, args):
    """Run trials one at a time until the study holds --trials of them (or this worker ran --worker-trials)."""
    states = []  # of this worker's trials
    record = lambda study, trial: states.append(trial.state)  # noqa: E731
    while args.worker_trials is None or len(states) < args.worker_trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental
            optuna.storages.fail_stale_trials(study)  # a killed worker's trial -> FAIL + a queued retry
        counted, waiting = trial_count(study)
        if counted >= args.trials and not waiting:  # queued retries still run
            break
        # NOTE: catch=(Exception,): a failing trial (OOM, NaN) is recorded as FAIL and the study goes on.
        study.optimize(partial(run_trial, args=args), n_trials=1, catch=(Exception,), callbacks=[record],
                       gc_after_trial=True)
        # A bad setting common to all trials (not a bad trial) fails every one: stop instead of burning GPUs.
        if len(states) >= 3 and all(s == optuna.trial.TrialState.FAIL for s in states):
            raise ValueError(f"the first {len(states)} trials of this worker all failed (see the log above); stopping")
    print(f"this worker ran {len(states)} trial(s); the study has {trial_count(study)[0]} of {args.trials}")


# ----------------------------------------------------------------------------- results
def show(study, args):
    """Print the trial counts and the best trial as a train.py command; save history and importance PNGs."""
    trials = study.get_trials(deepcopy=False)
    states = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    print(f"study {study.study_name!r} ({args.storage}): {len(trials)} trials: "
          + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print("no completed trial yet: nothing to show")
        return
    best = study.best_trial
    target = f"val mean {study.user_attrs.get('settings', {}).get('objective', 'score')}"
    print(f"best: trial {best.number}, {target} {best.value:.4f}, run dir {best.user_attrs.get('run_dir')}")
    print("  " + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    print(command_line(without_out(best.user_attrs["argv"])))

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from optuna.visualization import matplotlib as ovm  # noqa: PLC0415

    plot_dir = Path(args.plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    path = plot_dir / f"{study.study_name}_history.png"
    ax = ovm.plot_optimization_history(study, target_name=target)
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    print(f"wrote {path}")
    # Importances compare completed trials: with fewer than 2, or no parameter that varied, there is nothing to rank.
    path = plot_dir / f"{study.study_name}_importances.png"
    varied = [k for k in best.params if len({repr(t.params.get(k)) for t in complete}) > 1]
    if len(complete) < 2 or not varied:
        print(f"skipped {path}: parameter importances need >= 2 completed trials with different parameters "
              f"(the study has {len(complete)} completed, {len(varied)} parameter(s) varied)")
        return
    try:
        ax = ovm.plot_param_importances(study, target_name=target)
    except (ImportError, RuntimeError, ValueError) as e:
        print(f"skipped {path}: {type(e).__name__}: {e}")
        return
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    if not args.show:
        check_inputs(args)  # before the study exists: a typo must not fix the study's search space
    study = open_study(args)
    if not args.show:
        prepare_data(args)
        tic = time.perf_counter()
        try:
            optimize(study, args)
        except KeyboardInterrupt:
            sys.exit("interrupted: rerun the same command to continue the study (the trial resumes from its last.pt)")
        print(f"done in {time.perf_counter() - tic:.0f} s")
    show(study, args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
