r"""Optuna search over train.py's settings: the paper's TPE study (section 2.3), on one machine or
many.

    python tune.py --train IDR,DDR --data-root data_raw --trials 1000 --study idr-ddr
    python tune.py --train IDR --data-root demo/data --encoders test_resnet --resolutions 128 \
        --iters 20 --val-every 10 --trials 8 -- --patch 64 --batch 4 --no-pretrained --device cpu
    python tune.py --train IDR,DDR --data-root /data --study idr-ddr \
        --storage postgresql://me:pw@dbhost/optuna --seed $RANK
    python tune.py --study idr-ddr --show   # the best trial's train.py command, history PNGs

Each trial samples train.py flags (search_space below), trains in-process through train.parse_args
+ train.run under RUNS_DIR/<study>/trial_<n>, and reports the validation score after every
validation so the pruner can stop poor trials early. Every trial's train.py command line is stored
with it. --trials is the total the study should reach: rerunning continues the count. Arguments
after `--` go to train.py unchanged (e.g. `-- --batch 4 --patch 256 --dtype bfloat16`).

The objective is floor-free by default (validation Dice): under the protocol's AUPR a blank map
scores (1 + prevalence) / 2, and a short study picked a near-blank model (val AUPR 0.504, Dice
0.01). A killed worker's trial (SIGKILL, preempted node) is failed and queued again, keeping its
run dir, so the retry resumes from its last.pt: at once when the rerun is on the same machine (the
dead process is seen there), otherwise once its Optuna heartbeat is GRACE_PERIOD (120) s old. A
live worker's trial is never taken over; a trial whose worker keeps dying is given up after
MAX_RETRY (2) retries. More in docs/STUDY.md, "The Optuna search".
"""
import argparse
import copy
import gc
import importlib.util
import os
import re
import shlex
import shutil
import socket
import sqlite3
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import utils
from data.flags import add_dataset_list


# ----------------------------------------------------------------------------- command line
def _list(kind):
    """An argparse type: 'a,b,c' -> [kind(a), kind(b), kind(c)], not empty."""
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
    """'off,on' -> [False, True]: the --attention choices, without duplicates."""
    values = _list(str)(text)
    if any(v not in ("on", "off") for v in values):
        raise argparse.ArgumentTypeError(f"expected on, off or on,off, got {text!r}")
    return [v == "on" for v in dict.fromkeys(values)]


def build_parser():
    """tune.py's own flags (train.py's come after `--`): the study, then the search space."""
    p = utils.Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- train.py options]")
    g = p.add_argument_group("study")
    # folders=False: one's own dataset's --root goes to train.py, after `--`
    add_dataset_list(g, "--train", "datasets the trials train and validate on, e.g. IDR,DDR; "
                     "required unless --show", folders=False)
    g.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data_raw"),
                   help="passed to train.py (default: %(default)s)")
    g.add_argument("--cache", default="cache",
                   help="prepared-data cache, passed to train.py (default: %(default)s)")
    g.add_argument("--study", default=None,
                   help="study name (default: the --train combination, e.g. IDR+DDR)")
    g.add_argument("--storage", default=None,
                   help="optuna storage URL; an RDB URL (postgresql://, mysql://) shares the study "
                        "between machines (default: sqlite:///tune/<study>.db)")
    g.add_argument("--storage-timeout", type=float, default=60,
                   help="seconds to wait for a SQLite study file another process holds locked, "
                        "at the start and at each later access (default: %(default)s)")
    g.add_argument("--trials", type=int, default=1000,
                   help="total trials the study should reach, all workers together "
                        "(default: %(default)s)")
    g.add_argument("--worker-trials", type=int, default=None,
                   help="at most this many trials in this process, e.g. per batch job "
                        "(default: no limit)")
    g.add_argument("--objective", choices=("dice", "ap", "aupr"), default="dice",
                   help="validation mean over lesions to maximise; aupr lets a blank model win "
                        "(docs/STUDY.md) (default: %(default)s)")
    g.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                   help="early stopping of poor trials (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="TPE sampler seed; give each parallel worker its own "
                        "(default: %(default)s)")
    g.add_argument("--runs-dir", default="runs/tune",
                   help="trial runs go to RUNS_DIR/<study>/trial_<n> (default: %(default)s)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished trials' *.pt files; otherwise only args.json and log.jsonl "
                        "stay (default: %(default)s)")
    g.add_argument("--plot-dir", default="tune",
                   help="history and importance PNGs go here as <study>_*.png "
                        "(default: %(default)s)")
    g.add_argument("--show", action="store_true",
                   help="run no trial: print the best one and write the PNGs "
                        "(default: %(default)s)")
    g.add_argument("--members", type=int, default=0, metavar="K",
                   help="with --show: also write PLOT_DIR/<study>_members.txt, the K best trials "
                        "of the best one's architecture (docs/STUDY.md) "
                        "(default: %(default)s = none)")

    g = p.add_argument_group("search space (paper section 2.3; comma-separated choices)")
    g.add_argument("--encoders", type=_list(str),
                   default="legacy_seresnet101.in1k,seresnext50_32x4d,resnet50",
                   help="timm features_only encoders (default: %(default)s)")
    g.add_argument("--decoder-widths", type=_widths, nargs="+",
                   default=["256,128,64,32,16", "128,64,32,16,8"], metavar="WIDTHS",
                   help="decoder channel lists to choose from, one argument each, deepest first "
                        "(default: 256,128,64,32,16 128,64,32,16,8)")
    g.add_argument("--attention", type=_on_off, default="off,on",
                   help="scSE decoder attention choices (default: %(default)s)")
    g.add_argument("--resolutions", type=_list(int), default="1024,1536",
                   help="prepared image sizes (default: %(default)s)")
    g.add_argument("--lr-range", type=_list(float), default="1e-5,1e-2",
                   help="learning-rate range LOW,HIGH, sampled on a log scale "
                        "(default: %(default)s)")
    g.add_argument("--optimizers", type=_list(str), default="adam,adamw,sgd",
                   help="(default: %(default)s)")
    g.add_argument("--losses", type=_list(str), default="bce,dice,bce+dice",
                   help="(default: %(default)s)")
    g.add_argument("--iters", type=int, default=2000,
                   help="training steps per trial (default: %(default)s)")
    g.add_argument("--val-every", type=int, default=250,
                   help="validate and report to the pruner every N steps (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=None,
                   help="LR warmup steps per trial (default: ITERS // 20)")
    return p


# --help before optuna and torch load (seconds); a --help after `--` is train.py's, answered later
utils.start(__name__, None if "--" in sys.argv else build_parser)

import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from model import ModelConfig, build_model  # noqa: E402

# train.py flags written by tune.py for every trial: passing one of them after `--` is an error.
OWNED_FLAGS = ("--train", "--out", "--data-root", "--cache", "--lr", "--optimizer", "--loss",
               "--resolution", "--encoder", "--decoder-channels", "--decoder-attention", "--iters",
               "--val-every", "--warmup", "--val-metric")
# Choices that fix the categorical distributions of a study: optuna cannot change them once trials
# exist.
FIXED_SETTINGS = ("train", "objective", "encoders", "decoder_widths", "attention", "resolutions",
                  "optimizers", "losses")
# A study name names files (tune/<study>.db, RUNS_DIR/<study>/, <study>_history.png): a plain file
# name only.
STUDY_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
# Workers write Optuna's heartbeat every HEARTBEAT_INTERVAL s; a trial of another machine whose
# heartbeat is older than GRACE_PERIOD s is taken for dead. MAX_RETRY: a trial whose worker keeps
# dying (it kills the node) is given up after that many retries.
HEARTBEAT_INTERVAL, GRACE_PERIOD, MAX_RETRY = 20, 120, 2
# Optuna's callback that queues a failed trial again: RetryHeartbeatStaleTrialCallback since
# optuna 4.9, RetryFailedTrialCallback before (a name optuna 6 removes).
RETRY = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
         or optuna.storages.RetryFailedTrialCallback)


def parse_args(argv=None):
    """tune.py's own flags before `--`, train.py's after it; user errors raise a one-line
    ValueError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    args.train_extra = argv[cut + 1:]
    for flag in args.train_extra:
        if flag.split("=")[0] in OWNED_FLAGS:
            raise ValueError(f"{flag.split('=')[0]} after `--` would override what tune.py sets; "
                             f"use tune.py's own flags (--train, --data-root, --cache, --iters, "
                             f"--val-every, --warmup, the search space)")
    if args.train is None and not args.show:
        raise ValueError("--train is required (e.g. --train IDR,DDR)")
    if args.train is not None:  # train.py's own checks of the flags after `--`, before any trial
        # (one's own dataset of --train needs its --root ID=DIR there)
        train.build_parser().parse_args(["--train", ",".join(args.train)] + args.train_extra)
    if args.study is None:
        if args.train is None:
            raise ValueError("--show needs --study (or --train, whose combination name is the "
                             "default study)")
        args.study = data.combo_name(args.train)
    if not STUDY_NAME.fullmatch(args.study):
        raise ValueError(f"--study {args.study!r}: a study name must be a plain file name "
                         f"(letters, digits, . _ + -, not starting with '.'): it names "
                         f"tune/<study>.db and RUNS_DIR/<study>/")
    if args.storage is None:
        args.storage = f"sqlite:///tune/{args.study}.db"
    if not args.storage_timeout > 0:
        raise ValueError(f"--storage-timeout must be > 0 seconds, got {args.storage_timeout:g}")
    if len(args.lr_range) != 2 or not 0 < args.lr_range[0] <= args.lr_range[1]:
        raise ValueError(f"--lr-range must be LOW,HIGH with 0 < LOW <= HIGH, got {args.lr_range}")
    for flag, choices in (("--optimizers", ("adam", "adamw", "sgd")),
                          ("--losses", ("bce", "dice", "bce+dice"))):  # train.py's choices
        for v in getattr(args, flag[2:]):
            if v not in choices:
                raise ValueError(f"{flag}: unknown choice {v!r} (choose from {', '.join(choices)})")
    if args.members < 0:
        raise ValueError(f"--members must be >= 0, got {args.members}")
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
    """train.py command line of a trial: the search-space values, the fixed settings, then the
    `--` extras."""
    argv = ["--train", ",".join(args.train)] + (["--out", str(out)] if out is not None else [])
    argv += ["--data-root", str(args.data_root), "--cache", str(args.cache),
             "--encoder", params["encoder"], "--decoder-channels", params["decoder_channels"]]
    argv += ["--decoder-attention"] if params["decoder_attention"] else []
    argv += ["--resolution", str(params["resolution"]), "--optimizer", params["optimizer"],
             "--loss", params["loss"],
             "--lr", repr(params["lr"]),  # repr: the exact float, so the command reproduces it
             "--iters", str(args.iters), "--val-every", str(args.val_every),
             "--warmup", str(args.warmup), "--val-metric", args.objective]
    return argv + list(args.train_extra)


def command_line(argv):
    """A train.py argument list as the shell command that runs it."""
    return "python train.py " + shlex.join(argv)


def without_out(argv):
    """The trial's command minus --out: train.py then writes to its default runs/<COMBO>/s<SEED>."""
    i = argv.index("--out") if "--out" in argv else None
    return argv if i is None else argv[:i] + argv[i + 2:]


def run_trial(trial, args):
    """Objective: train one trial in-process, report every validation, return the best
    validation score."""
    # First of all: who runs the trial, so that a rerun can tell a dead worker's trial from a live
    # one's.
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    # NOTE: with the trial's number: a queued copy of the trial inherits the record, not its worker.
    trial.set_user_attr("process", {**this_process(), "trial": trial.number})
    params = search_space(trial, args)
    # NOTE: the retry of a trial that was interrupted (Ctrl-C) or whose worker died inherits its
    # user attributes, so it resumes the same run directory from last.pt (train.py's own resume).
    out = trial.user_attrs.get("run_dir")
    if out is None:
        out = str(Path(args.runs_dir) / args.study / f"trial_{trial.number:04d}")
        if Path(out).exists():  # left over from an earlier study of the same name (storage deleted)
            print(f"note: removing stale {out}")
            shutil.rmtree(out)
        trial.set_user_attr("run_dir", out)
    argv = train_argv(params, args, out)
    trial.set_user_attr("argv", argv)
    print(f"trial {trial.number}: {command_line(argv)}", flush=True)
    key = f"mean_{args.objective}"

    def on_validate(step, metrics):  # train.py calls it after each validation
        if key not in metrics:
            raise ValueError(f"--objective {args.objective}: train.py's validation gives no {key}")
        trial.report(metrics[key], step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"val {key} {metrics[key]:.4f} at step {step}")

    keep = args.keep_checkpoints
    try:
        result = train.run(train.parse_args(argv), on_validate=on_validate)
    except optuna.TrialPruned:
        raise
    except KeyboardInterrupt:
        # Ctrl-C: optuna records this trial as failed; a queued copy resumes its run dir on the
        # next start.
        (frozen,) = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number]
        # NOTE: a deep copy, as optuna passes it: the callback extends the retry history in place.
        retry_callback(max_retry=None)(trial.study, copy.deepcopy(frozen))
        keep = True
        raise
    except Exception as e:  # OOM, a diverged (NaN) run, an encoder that cannot be built: fails
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        raise
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # NOTE: after an OOM the next trial needs the blocks back
        if not keep:
            # 1000 trials of SE-ResNet101 checkpoints would fill a disk; logs stay for the record.
            for name in ("last.pt", "best.pt"):
                Path(out, name).unlink(missing_ok=True)
            shutil.rmtree(Path(out, "snapshots"), ignore_errors=True)
    if key not in result:
        raise ValueError(f"--objective {args.objective}: train.py's result gives no {key}")
    # the run's best validation score (--val-metric is the objective): what best.pt holds
    return result["best"]


# ------------------------------------------------------------------------- dead or alive workers
# Optuna's documented heartbeat (make_storage) fails a RUNNING trial once its heartbeat is
# GRACE_PERIOD s old and queues a copy through RETRY; the copy resumes the run dir. Alone, it
# cannot resume a killed worker's trial at once: the heartbeat is its only sign of life, and a
# rerun started right after the kill finds it fresh, starts a new trial instead and, once --trials
# is reached counting the dead trial, ends without resuming it. A grace period of seconds would
# take the trials of live workers whose heartbeat is late instead. Optuna has no public way to
# mark a trial stale now or never (its private RDBStorage._get_stale_trial_ids alone decides), so
# the smallest piece stays here: the worker process recorded with each trial, judged where this
# machine sees it (Linux /proc), acted on through public methods only (study.tell, RETRY, the
# storage's record_heartbeat).
def _proc_stat(pid):
    """(state letter, start time in clock ticks since boot) of a process, from Linux's /proc;
    None if none."""
    try:
        # the fields after "pid (name)": the name may hold spaces and brackets
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (OSError, IndexError, ValueError):
        return None


def _machine():
    """Where a PID means one process: host, kernel boot and PID namespace; None where /proc cannot
    tell. NOTE: a host name alone is not enough: containers and cloned machines share names."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def this_process(pid=None):
    """The record of a worker process kept with its trial: machine, PID and start time.
    NOTE: the start time tells a reused PID (another process since) from the worker: without it a
    dead worker's trial could look alive, and be vouched for, for ever."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    return {"machine": _machine(), "pid": pid, "start": stat and stat[1]}


def worker_alive(process):
    """True or False for a trial's worker on this machine; None where it is out of sight (the
    heartbeat decides)."""
    if not process or process.get("machine") is None or process["machine"] != _machine():
        return None
    stat = _proc_stat(process["pid"])
    # Z: killed, not yet reaped; X: dead; another start time: the PID was reused
    return stat is not None and stat[0] not in "ZX" and stat[1] == process["start"]


def retry_callback(max_retry=MAX_RETRY):
    """Optuna's RETRY callback: it queues a WAITING copy of a failed trial with its parameters,
    user attributes (run_dir) and reports, so the copy resumes the run from its last.pt; it gives
    up after max_retry copies (None: never)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental; the old name is deprecated since optuna 4.9
        return RETRY(max_retry=max_retry, inherit_intermediate_values=True)


def settle_local_trials(study, storage):
    """Judge at once the RUNNING trials whose worker ran on this machine: a dead worker's trial
    is failed and queued again, as Optuna's heartbeat would GRACE_PERIOD s later; a live
    worker's heartbeat is recorded for it, so Optuna's check never takes its trial. Trials of
    other machines are left to Optuna's heartbeat."""
    running = optuna.trial.TrialState.RUNNING
    for t in study.get_trials(deepcopy=False, states=(running,)):
        process = t.user_attrs.get("process")
        if not isinstance(process, dict) or process.get("trial") != t.number:
            continue  # not yet started (or a queued copy's inherited record): the heartbeat decides
        alive = worker_alive(process)
        if alive:
            # NOTE: a live worker's heartbeat can be late (a suspended process; optuna's
            # heartbeat thread ends at a storage error, e.g. a SQLite file locked too long).
            study_id = storage.get_study_id_from_name(study.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.record_heartbeat(trial_id)
        elif alive is False:
            try:
                dead = study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # finished meanwhile: by its worker, or failed by another rerun first
            retry_callback()(study, dead)


# ----------------------------------------------------------------------------- the study
def sqlite_path(url):
    """The database file of a sqlite:/// URL, else None."""
    path = url[len("sqlite:///"):].split("?")[0] if url.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def masked(url):
    """The URL with its password as ***, for messages."""
    return re.sub(r"(://[^:/@]*):[^/]*@", r"\1:***@", url)


def _storage_error(url, e):
    """One line for a --storage that cannot work: what failed, in the driver's words, the
    password masked."""
    # DBAPIError: the driver's own message, without the SQL
    reason = str(getattr(e, "orig", None) or e)
    password = re.search(r"://[^:/@]*:([^/]*)@", url)
    if password and password.group(1):
        reason = reason.replace(password.group(1), "***")
    hint = " (the database's driver is missing; postgresql://: pip install psycopg2-binary)" \
        if isinstance(e, ImportError) else ""
    return ValueError(f"--storage {masked(url)}: {type(e).__name__}: "
                      f"{' '.join(reason.split())}{hint}")


def driver_url(url):
    """postgresql:// through psycopg2 where SQLAlchemy's default driver for it (psycopg 3 since
    SQLAlchemy 2.1) is not installed but psycopg2 (psycopg2-binary) is."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def locked(e):
    """Whether exception e comes from a SQLite file that stayed locked (optuna wraps it in its own
    errors)."""
    while e is not None:
        if "database is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _lock_error(url, timeout):
    """The one line for a SQLite study file locked longer than --storage-timeout."""
    return ValueError(f"--storage {masked(url)}: the study file {sqlite_path(url)} stayed locked "
                      f"by another process for {timeout:g} s (--storage-timeout); rerun once that "
                      f"process is done with it")


def wait_for_lock(url, timeout):
    """Take and release the write lock of a SQLite study file: where another process holds it, say
    so and wait up to timeout s in all for it, then one ValueError line. (SQLite would wait
    silently, and optuna retries.)"""
    # NOTE: workers sharing the file hold it for milliseconds at a time: the first second is silent
    first = min(1.0, timeout / 2)
    for attempt, wait in enumerate((first, timeout - first)):
        con = sqlite3.connect(sqlite_path(url), timeout=wait, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")  # the lock every write of optuna's takes
            con.execute("ROLLBACK")
            return
        except sqlite3.OperationalError as e:
            if not locked(e):
                raise _storage_error(url, e) from None
            if attempt:
                raise _lock_error(url, timeout) from None
            print(f"waiting for the study file {sqlite_path(url)}: another process holds it locked "
                  f"(up to {timeout:g} s, --storage-timeout)", file=sys.stderr, flush=True)
        finally:
            con.close()


def make_storage(url, timeout=60):
    """Optuna's RDB storage with its heartbeat: killed workers' trials are failed and queued again.
    An unusable URL (unparsable, no driver, unreachable server, unwritable file) stops here in one
    line, as does a SQLite file another process keeps locked for `timeout` s."""
    engine_kwargs = {}
    if url.startswith("sqlite:"):
        # NOTE: processes sharing one SQLite file wait for its lock (each access, up to timeout s)
        # instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": timeout}}
    try:
        if sqlite_path(url) is not None:
            sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlalchemy.create_engine(driver_url(url), **engine_kwargs)
        try:
            # reach the server once, before optuna's 30-70-line tracebacks could
            engine.connect().close()
        finally:
            engine.dispose()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.DBAPIError, ImportError, OSError) as e:
        raise _storage_error(url, e) from None
    if sqlite_path(url) is not None:
        wait_for_lock(url, timeout)
    callback = "heartbeat_stale_trial_callback"  # optuna >= 4.9, before: failed_trial_callback
    if not hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        callback = "failed_trial_callback"
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the heartbeat is marked experimental
                return optuna.storages.RDBStorage(
                    driver_url(url), engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                    **{callback: retry_callback()})
        except sqlalchemy.exc.SQLAlchemyError as e:
            if locked(e):  # it waited `timeout` s already: no retry
                raise _lock_error(url, timeout) from None
            # NOTE: workers started together on a new database race to create its tables; the
            # loser retries.
            if attempt == 4:
                raise _storage_error(url, e) from None
            time.sleep(1 + attempt)


def make_pruner(args):
    """--pruner: median (the default), hyperband or none."""
    if args.pruner == "median":
        # Compare from the second validation on, once 5 trials have finished.
        return optuna.pruners.MedianPruner(n_startup_trials=5,
                                           n_warmup_steps=min(args.iters, 2 * args.val_every))
    if args.pruner == "hyperband":  # resources in training steps: one rung per validation
        return optuna.pruners.HyperbandPruner(min_resource=args.val_every,
                                              max_resource=args.iters, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(args, storage):
    """The study --study in `storage` (make_storage): loaded for --show, else created/continued."""
    if args.show:
        try:
            return optuna.load_study(study_name=args.study, storage=storage)
        except KeyError:
            raise ValueError(f"no study {args.study!r} in {masked(args.storage)} "
                             f"(see --study, --storage)")
    study = optuna.create_study(study_name=args.study, storage=storage, pruner=make_pruner(args),
                                direction="maximize", load_if_exists=True)
    # NOTE: seeded with --seed + the trial count, so a resumed study does not replay its first
    # random trials. constant_liar: parallel workers see each other's running trials as poor, so
    # they explore elsewhere.
    seed = args.seed + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    settings = {k: getattr(args, k) for k in FIXED_SETTINGS}
    saved = study.user_attrs.get("settings")
    if saved is None:  # a new study: its settings are recorded, later runs must match them
        study.set_user_attr("settings", settings)
    else:
        for k in FIXED_SETTINGS:
            if saved[k] != settings[k]:
                raise ValueError(f"study {args.study!r} in {masked(args.storage)} was created "
                                 f"with --{k.replace('_', '-')} {_text(saved[k])}, not "
                                 f"{_text(settings[k])}: use the same value or another --study")
    return study


def _text(value):
    """A setting as it is written on the command line."""
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):  # --attention's on / off
        return {True: "on", False: "off"}.get(value, str(value))
    return str(value)


def trial_count(study):
    """(trials that count towards --trials, queued trials).

    A trial whose worker died or was interrupted lives on in its queued copy, which resumes the
    same run dir: it counts once, through the copy (optuna lists the trials a copy retries in its
    retry_history). Queued (WAITING) trials count once they start; one count per run directory in
    any case.
    """
    trials = study.get_trials(deepcopy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        retried = {n for t in trials for n in RETRY.retry_history(t)}
    waiting = [t.state == optuna.trial.TrialState.WAITING for t in trials]
    counted = {t.user_attrs.get("run_dir", t.number) for t, w in zip(trials, waiting)
               if not w and t.number not in retried}
    return len(counted), sum(waiting)


def _first_choices(args, resolution):
    """A trial's values taken from the first choice of each list: a command line to check."""
    return {"lr": args.lr_range[0], "optimizer": args.optimizers[0], "loss": args.losses[0],
            "resolution": resolution, "encoder": args.encoders[0],
            "decoder_channels": args.decoder_widths[0], "decoder_attention": False}


def check_inputs(args):
    """User errors stop here, once, rather than failing every trial: train.py's command line at
    every resolution, and every encoder with every decoder width list (built without weights)."""
    # The objective is also train.py's --val-metric (best.pt follows it): this train.py must know
    # it.
    (metrics,) = [a.choices for a in train.build_parser()._actions if a.dest == "val_metric"]
    if args.objective not in metrics:
        raise ValueError(f"--objective {args.objective}: this train.py has no --val-metric "
                         f"{args.objective} (it has {', '.join(metrics)}); choose another "
                         f"--objective")
    for resolution in args.resolutions:
        train.parse_args(train_argv(_first_choices(args, resolution), args))
    for encoder in args.encoders:
        for widths in args.decoder_widths:
            try:  # random weights: only the shapes are checked
                build_model(ModelConfig(encoder=encoder, pretrained=False,
                                        decoder_channels=_list(int)(widths)))
            except ValueError as e:
                raise ValueError(f"--encoders / --decoder-widths: {e}") from None


def prepare_data(args):
    """Prepare the caches of every resolution before the first trial (a no-op when up to date)."""
    targs = train.parse_args(train_argv(_first_choices(args, args.resolutions[0]), args))
    for resolution in args.resolutions:
        for ds_id in targs.train:
            data.prepare_cache(ds_id, targs.data_root, targs.cache, resolution,
                               **data.data_options(targs))


def optimize(study, storage, args):
    """Run trials one at a time until the study holds --trials of them (or this worker ran
    --worker-trials)."""
    states = []  # of this worker's trials
    record = lambda study, trial: states.append(trial.state)  # noqa: E731
    while args.worker_trials is None or len(states) < args.worker_trials:
        settle_local_trials(study, storage)  # dead workers' trials seen here -> FAIL + queued retry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental
            optuna.storages.fail_stale_trials(study)  # others: once their heartbeat is stale
        counted, waiting = trial_count(study)
        if counted >= args.trials and not waiting:  # queued retries still run
            break
        # NOTE: catch=(Exception,): a failing trial (OOM, NaN) is recorded as FAIL and the study
        # goes on.
        study.optimize(partial(run_trial, args=args), n_trials=1, catch=(Exception,),
                       callbacks=[record], gc_after_trial=True)
        # A bad setting common to all trials (not a bad trial) fails every one: stop instead of
        # burning GPUs.
        if len(states) >= 3 and all(s == optuna.trial.TrialState.FAIL for s in states):
            raise ValueError(f"the first {len(states)} trials of this worker all failed (see the "
                             f"log above); stopping")
    print(f"this worker ran {len(states)} trial(s); the study has {trial_count(study)[0]} of "
          f"{args.trials}")


# ----------------------------------------------------------------------------- results
def show(study, args):
    """Print the trial counts and the best trial as a train.py command; save history and
    importance PNGs."""
    trials = study.get_trials(deepcopy=False)
    states = {}  # "complete", "pruned", ... -> count
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    print(f"study {study.study_name!r} ({masked(args.storage)}): {len(trials)} trials: "
          + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print("no completed trial yet: nothing to show")
        return
    best = study.best_trial
    target = f"val mean {study.user_attrs.get('settings', {}).get('objective', 'score')}"
    print(f"best: trial {best.number}, {target} {best.value:.4f}, run dir "
          f"{best.user_attrs.get('run_dir')}")
    print("  " + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    print(command_line(without_out(best.user_attrs["argv"])))
    if args.members:
        write_members(complete, best, args.members,
                      Path(args.plot_dir) / f"{study.study_name}_members.txt")

    # matplotlib only here: only --show draws
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from optuna.visualization import matplotlib as ovm  # noqa: PLC0415

    plot_dir = Path(args.plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    path = plot_dir / f"{study.study_name}_history.png"
    ax = ovm.plot_optimization_history(study, target_name=target)
    utils.save_figure(ax.figure, path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    print(f"wrote {path}")
    # Importances compare completed trials: with fewer than 2, or no parameter that varied, there
    # is nothing to rank.
    path = plot_dir / f"{study.study_name}_importances.png"
    varied = [k for k in best.params if len({repr(t.params.get(k)) for t in complete}) > 1]
    if len(complete) < 2 or not varied:
        print(f"skipped {path}: parameter importances need >= 2 completed trials with different "
              f"parameters (the study has {len(complete)} completed, {len(varied)} parameter(s) "
              f"varied)")
        return
    try:
        ax = ovm.plot_param_importances(study, target_name=target)
    except (ImportError, RuntimeError, ValueError) as e:
        print(f"skipped {path}: {type(e).__name__}: {e}")
        return
    utils.save_figure(ax.figure, path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    print(f"wrote {path}")


# What members of one soup must share (average.py averages one architecture at one resolution)
SHARED = ("encoder", "decoder_channels", "decoder_attention", "resolution")


def write_members(complete, best, k, path):
    """The k best completed trials sharing the best one's SHARED settings, as a members table: a
    line "sN: train.py flags" per seed N (Makefile MEMBERS=FILE), best first."""
    same = [t for t in complete if all(t.params.get(key) == best.params.get(key) for key in SHARED)]
    same.sort(key=lambda t: -t.value)  # the objective is maximised
    shared = ", ".join(f"{key}={best.params.get(key)}" for key in SHARED)
    lines = [f"# {len(same[:k])} best trials of study architecture {shared}"]
    # a placeholder for the fixed settings: only the search space's flags are kept
    blank = argparse.Namespace(train=[], data_root="", cache="", iters=0, val_every=0, warmup=0,
                               objective="", train_extra=[])
    for n, t in enumerate(same[:k]):
        argv = train_argv(t.params, blank)
        flags = argv[argv.index("--encoder"):argv.index("--iters")]  # the search space's flags only
        lines.append(f"s{n}: {shlex.join(flags)}  # trial {t.number}, value {t.value:.4f}")
    utils.write_atomic(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    short = f" (only {len(same)} trials of that architecture)" if len(same) < k else ""
    print(f"wrote {path}: {min(k, len(same))} members{short}; make all-combos MEMBERS={path} "
          f"SEEDS={min(k, len(same))}")


def main(argv=None):
    """tune.py: a SQLite file locked while trials ran ends in the same one line as at the start."""
    args = parse_args(argv)
    try:
        run_study(args)
    except (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError) as e:
        if not locked(e):
            raise
        raise _lock_error(args.storage, args.storage_timeout) from None  # locked while trials ran


def run_study(args):
    """Trials until the study holds --trials (none with --show), then the best trial, the PNGs."""
    if not args.show:
        check_inputs(args)  # before the study exists: a typo must not fix the study's search space
    db = sqlite_path(args.storage)
    if args.show and db is not None and not db.exists():
        raise FileNotFoundError(f"no study database {db} (see --storage, --study)")
    storage = make_storage(args.storage, args.storage_timeout)
    study = open_study(args, storage)
    if not args.show:
        prepare_data(args)
        tic = time.perf_counter()
        try:
            optimize(study, storage, args)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("interrupted: rerun the same command to continue the study "
                                    "(the trial resumes from its last.pt)") from None
        print(f"done in {time.perf_counter() - tic:.0f} s")
    show(study, args)


if __name__ == "__main__":
    utils.run(main)
