"""tune.py on a real PostgreSQL server: two workers, one SIGKILLed mid-trial and restarted at once; the study
reaches --trials complete trials, the dead trial resumes from its last.pt, nothing is counted twice.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_tune_postgres.py

The server is this test's own: initdb in a temporary folder, a free loopback port, stopped afterwards. Skipped
only where PostgreSQL's binaries are absent (PG_BIN, default /usr/lib/postgresql/15/bin).
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch

import tune
from test_tune import COMPLETE, TINY_TRAIN, check_resumed, finish, worker

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def as_server_user(argv, user):
    """initdb refuses to run as root: as root, run PostgreSQL's commands as `user`."""
    return ["runuser", "-u", user, "--", *argv] if user else argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """postgresql://...@127.0.0.1:PORT/optuna on a fresh server, stopped (and its folder removed) afterwards."""
    if not all((PG_BIN / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")):
        pytest.skip(f"PostgreSQL binaries (initdb, pg_ctl, createdb) not found in {PG_BIN} (set PG_BIN)")
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.fail("running as root, and there is no 'postgres' user to run initdb as")
    # NOTE: not pytest's tmp_path: its parents are private to root, and the server runs as another user.
    folder = Path(tempfile.mkdtemp(prefix="tune-pg-"))
    if user:
        shutil.chown(folder, user)
    data, port, log = folder / "data", free_port(), folder / "server.log"
    run = lambda *argv: subprocess.run(as_server_user([str(a) for a in argv], user), check=True,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    run(PG_BIN / "initdb", "-D", data, "-U", "tune", "-A", "trust", "--no-sync", "-E", "UTF8")
    started = False
    try:
        run(PG_BIN / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start",
            "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off")
        started = True
        run(PG_BIN / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "tune", "optuna")
        yield f"postgresql://tune:secret@127.0.0.1:{port}/optuna"
    except subprocess.CalledProcessError as e:
        server_log = log.read_text() if log.exists() else ""
        pytest.fail(f"{e.cmd[-1]} failed: {e.stderr}\n{server_log}")
    finally:
        if started:
            subprocess.run(as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                           "stop"], user), capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def kill_when_mid_trial(proc, url, study_name, deadline=600):
    """SIGKILL `proc` once a trial it runs (RUNNING, its pid) has written last.pt; that trial's run dir and the
    step its last.pt holds."""
    tic, study = time.monotonic(), None
    while time.monotonic() - tic < deadline:
        assert proc.poll() is None, "the worker ended before it could be killed mid-trial"
        try:  # NOTE: loaded once it exists; creating it here would race the workers creating the tables
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
    argv = lambda seed: ["--train", "IDR", "--data-root", str(synth_root), "--cache", str(cache),  # noqa: E731
                         "--study", "pg", "--storage", postgres_url, "--runs-dir", str(tmp_path / "runs"),
                         "--plot-dir", str(tmp_path / "plots"), "--trials", "3", "--seed", str(seed),
                         "--encoders", "test_resnet", "--decoder-widths", "8,8,8,8,8", "--resolutions", "64",
                         "--iters", "10", "--val-every", "2", "--pruner", "none", "--", *TINY_TRAIN]
    logs = [tmp_path / name for name in ("a.log", "b.log", "a-again.log")]
    a, b = worker(argv(0), logs[0]), worker(argv(1), logs[1])
    run_dir, step = kill_when_mid_trial(a, postgres_url, "pg")
    again = worker(argv(0), logs[2])  # restarted at once, as a job scheduler would
    outputs = finish([b, again], logs[1:])
    # Whichever worker starts a trial next sees the dead process and queues its trial again; one resumes it.
    assert sum(f"resuming {run_dir} from step {step}" in out for out in outputs) == 1
    study = optuna.load_study(study_name="pg", storage=tune.driver_url(postgres_url))
    retry = check_resumed(study, run_dir, step, trials=3, iters=10)
    assert retry.state == COMPLETE
