"""The sweep on a real Slurm (issue 27): make slurm-sweep, make slurm-tune, slurm_task.sh.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_slurm.py

The sbatch lines of `make -n slurm-sweep` / `slurm-tune`, and what sbatch and the tasks' make
receive through the shell (stand-ins for sbatch and squeue: no Slurm needed). Then a cluster of
this module's own, as root only (CI; anyone else is skipped in one line): Debian's slurm-wlm and
munge (installed with apt-get where missing), munged, slurmctld and slurmd on free ports in a
temporary folder. `make slurm-sweep` submits 3 combinations x 2 seeds as one job array (a second
submission is refused) and one task is sent its time-limit warning mid-training; a warned task's
slow save, bounded requeues (failures, time limits), a cancelled task; `make slurm-tune` runs two
tune.py workers against one PostgreSQL study. Afterwards the daemons are stopped by their pids and
the folder is removed. About 3 minutes on 2 busy cores. train.py's own stop signals (SIGUSR1 /
SIGTERM, exit 75) are tested in test_train.py.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

# train.py flags of the tune workers: tiny, CPU
TINY_TRAIN = ["--patch", "64", "--batch", "2", "--no-pretrained", "--device", "cpu", "--dtype",
              "float32", "--workers", "0", "--log-every", "2"]

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the sbatch lines
def make(*args, env=None, check=True):
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def make_n(*args):
    """The one line of `make -n TARGET` that submits."""
    (line,) = [line for line in make("-n", *args).stdout.splitlines() if "sbatch" in line]
    return line


def test_slurm_sweep_plan_is_one_array_of_the_runs_not_done(tmp_path):
    done = tmp_path / "IDR+MES" / "s1"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    line = make_n("slurm-sweep", "SEEDS=2", f"RUNS={tmp_path}", "SLURM_PARALLEL=4",
                  "TRAIN_FLAGS=--no-pretrained --lr 'a b'", "SLURM_FLAGS=--partition=gpu --qos=x")
    sweep = re.search(r"id=\$\((sbatch .*?)\) && id=", line)[1]  # the array's sbatch command
    assert re.search(r"sbatch --parsable .*--requeue --open-mode=append --signal=B:USR1@600 "
                     r"--time=24:00:00 --cpus-per-task=8 --gres=gpu:1 --partition=gpu --qos=x "
                     r"--job-name=sweep --comment=\"\$runs\" --array=0-60%4 ", sweep), sweep
    # the array is tagged with RUNS (absolute), and not submitted while one of that RUNS is queued
    assert line.startswith(f"runs=$(realpath -m -- '{tmp_path}') && if squeue -h --me -n sweep "
                           f"-o %k | grep -qxF -- \"$runs\"; then echo \"error: "), line
    targets = sweep.split(" -- ")[1].split()  # 31 combinations x 2 seeds, one done
    assert len(targets) == len(set(targets)) == 61 and f"{done}/results.json" not in targets
    assert targets[0] == f"{tmp_path}/IDR/s0/results.json"
    assert f"--output={tmp_path}/slurm/sweep_%A_%a.log slurm_task.sh 1 " in sweep
    # every setting of the sweep reaches the tasks' make, quoted for the shell; no GPU pinning
    assert """'TRAIN_FLAGS=--no-pretrained --lr '\\''a b'\\''' """ in sweep
    assert f"'RUNS={tmp_path}' " in sweep and "'ENCODER=legacy_seresnet101.in1k'" in sweep
    assert " GPUS= -- " in sweep
    assert "--dependency=afterany:$id --job-name=report --time=2:00:00 " in line
    assert " report) && " in line
    # the datasets too, one's own among them, with the flags naming their folders
    line = make_n("slurm-sweep", "SEEDS=1", f"RUNS={tmp_path}", "DATASETS=IDR,ABC",
                  "DATA_FLAGS=--root ABC=/data/clinic")
    assert "--array=0-2 " in line and "'DATASETS=IDR,ABC' " in line and "'TESTS=IDR,ABC' " in line
    assert "'DATA_FLAGS=--root ABC=/data/clinic' " in line and f"{tmp_path}/IDR+ABC/s0/" in line
    assert "--dependency=afterany:$id" in line and " report) && " in line
    line = make_n("slurm-sweep", "SEEDS=1", f"RUNS={tmp_path}", "SLURM_GRES=", "SLURM_REPORT=")
    assert "--gres" not in line and "--array=0-30 " in line and "dependency" not in line
    line = make_n("slurm-sweep", "COMBOS=IDR+MES", f"RUNS={tmp_path}", "SEEDS=2")
    assert "--array=0-0 " in line and f"-- {tmp_path}/IDR+MES/s0/results.json)" in line
    (tmp_path / "IDR+MES" / "s0").mkdir()
    (tmp_path / "IDR+MES" / "s0" / "results.json").write_text("{}")
    assert make("slurm-sweep", "COMBOS=IDR+MES", f"RUNS={tmp_path}", "SEEDS=2").stdout == \
        f"slurm-sweep: every run of the plan has its results.json in {tmp_path}; nothing to " \
        f"submit\n"


def test_slurm_tune_needs_one_database_and_gives_each_worker_its_seed(tmp_path):
    line = make_n("slurm-tune", "TUNE_STORAGE=postgresql://me@db/optuna", "TUNE_WORKERS=3",
                  f"RUNS={tmp_path}")
    assert "--job-name=tune --array=0-2 " in line
    assert " tune -- TUNE_SEED=0 TUNE_SEED=1 TUNE_SEED=2)" in line
    assert "'TUNE_STORAGE=postgresql://me@db/optuna'" in line
    plan = make("-n", "tune", "TUNE_SEED=2", "TUNE_STORAGE=pg://me@db/o", "TUNE_FLAGS=--trials 9")
    assert "--storage 'pg://me@db/o' --seed 2 --trials 9" in plan.stdout
    done = make("slurm-tune", f"RUNS={tmp_path}", check=False)
    assert done.returncode != 0
    assert done.stderr.startswith("error: make slurm-tune needs TUNE_STORAGE=postgresql://")
    assert not (tmp_path / "slurm").exists()


# Stand-ins for sbatch, squeue and the python of the tasks: each appends its name and argv as one
# JSON line to $STUB_CALLS; sbatch answers job 4242, squeue prints $STUB_QUEUE.
STUB = """import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
print({"sbatch": "4242", "squeue": os.environ.get("STUB_QUEUE", "")}.get(name, ""))
"""


def stubs(folder, queue=""):
    """-> (the environment to run make with, calls(): the stand-ins' [name, *argv] so far)."""
    bin_dir, calls = folder / "bin", folder / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("sbatch", "squeue", "python"):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{STUB}")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_CALLS=str(calls),
               STUB_QUEUE=queue)

    def read():
        return [json.loads(line) for line in calls.read_text().splitlines()]
    return env, read


def task_command(sbatch_argv):
    """The tasks' command in an sbatch argv (after `slurm_task.sh RETRIES`) -> (command, items)."""
    rest = sbatch_argv[sbatch_argv.index("slurm_task.sh") + 2:]
    if "--" not in rest:
        return rest, []
    return rest[:rest.index("--")], rest[rest.index("--") + 1:]


def test_slurm_sweep_arguments_reach_sbatch_and_the_tasks_make_whole(tmp_path):
    """A checkout whose path has a space and a &, settings with quotes, a $ and a &: sbatch gets
    every argument whole, and the tasks' make expands each setting to what this make does."""
    checkout = tmp_path / "my checkout & co"
    (checkout / "data").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", checkout)
    shutil.copy(ROOT / "data" / "ids.py", checkout / "data")  # the Makefile's list of combinations
    runs = os.path.realpath(checkout / "runs")
    # other arrays in the queue: another RUNS, and one whose RUNS starts like this one
    env, calls = stubs(tmp_path, queue=f"{runs}-old\n/elsewhere/runs\n")
    settings = ["COMBOS=IDR", "SEEDS=1", "TRAIN_FLAGS=--lr 'a b' --tag x$$y&z", "TESTS=IDR,MES"]
    cmd = ["make", "--no-print-directory", "-C", str(checkout), "-o", ".venv/.stamp"]
    done = subprocess.run([*cmd, "slurm-sweep", *settings, "SLURM_REPORT_TIME=0:30:00"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "slurm-sweep: job array 4242, 1 task(s)" in done.stdout
    (queue, array, report) = calls()
    assert queue == ["squeue", "-h", "--me", "-n", "sweep", "-o", "%k"]
    assert array[0] == report[0] == "sbatch"
    assert f"--chdir={checkout}" in array and f"--comment={runs}" in array
    assert f"--chdir={checkout}" in report and "--time=0:30:00" in report
    command, items = task_command(array)
    assert items == ["runs/IDR/s0/results.json"]
    # a task's make plans the same train.py and evaluate.py lines as this make
    task = subprocess.run([*command, "-n", *items], capture_output=True, text=True,
                          cwd=checkout, env=env, timeout=120)
    here = subprocess.run([*cmd, "-n", *items, *settings], capture_output=True, text=True,
                          env=env, timeout=120)
    assert task.returncode == here.returncode == 0, task.stderr + here.stderr
    assert "--tag x$y&z" in here.stdout and task.stdout == here.stdout


def test_tune_storage_reaches_tune_py_whole(tmp_path):
    """A --storage URL with a &, a space and a $ reaches tune.py as one argument, from `make tune`
    and from a `make slurm-tune` task."""
    url = "postgresql://me@db:5432/optuna?sslmode=require&application_name=a$b c"
    env, calls = stubs(tmp_path)
    py = f"PY={tmp_path / 'bin' / 'python'}"
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.stamp"]
    storage = f"TUNE_STORAGE={url.replace('$', '$$')}"  # a $ on make's command line: $$
    done = subprocess.run([*cmd, "tune", storage, "TUNE_SEED=2", "COMBO=IDR", py],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([*cmd, "slurm-tune", storage, "TUNE_WORKERS=1", "COMBO=IDR",
                           f"RUNS={tmp_path}"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    command, items = task_command(calls()[-1])
    assert items == ["TUNE_SEED=0"]
    done = subprocess.run([*command, *items, py], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    direct, _, task = calls()
    for argv, seed in ((direct, "2"), (task, "0")):
        assert argv[:2] == ["python", "tune.py"], argv
        assert argv[argv.index("--storage") + 1:argv.index("--storage") + 4] == \
            [url, "--seed", seed], argv


# --------------------------------------------------------------------- a Slurm cluster of our own
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def slurm_tools():
    """{tool: path}, after `apt-get install -y slurm-wlm munge` where one is missing and the tests
    run as root with apt-get (CI); a skip in one line for anyone else, a failure if apt-get
    fails."""
    paths = {t: shutil.which(t, path=SBIN_PATH) for t in SLURM_TOOLS}
    if all(paths.values()) and os.geteuid() != 0:
        pytest.skip("not root: the test's own Slurm runs its daemons as root (SlurmUser=root)")
    if all(paths.values()):
        return paths
    missing = ", ".join(t for t, p in paths.items() if p is None)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"no Slurm here ({missing} missing), and only root with apt-get installs it "
                    f"for these tests (apt-get install -y slurm-wlm munge)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "slurm-wlm", "munge"]
    for cmds in ([install], [["apt-get", "update"], install]):  # again with fresh package lists
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if done.returncode:
                break
        else:
            break
    if done.returncode:
        why = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}")
        pytest.fail(f"{' '.join(done.args)} failed: {why.splitlines()[-1]}", pytrace=False)
    paths = {t: shutil.which(t, path=SBIN_PATH) for t in SLURM_TOOLS}
    assert all(paths.values()), f"installed slurm-wlm and munge, and still missing: {paths}"
    return paths


def slurm_conf(folder, host, ports):
    """A single-node cluster, all its files in `folder`. NOTE: cred_expire is also how long a
    requeued job waits before it may start again (Slurm's default: 120 s); sched_interval=1: the
    main scheduler every second, not 60; config_overrides: CPUs=2 even on a smaller machine."""
    return f"""ClusterName=retlesions-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ReturnToService=2
KillWait=5
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def log_tails(folder, pattern="*.log"):
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}"
                     for p in sorted(Path(folder).glob(pattern)))


def wait_for(ready, timeout, what, daemons=(), folder=None, poll=0.5):
    """Poll ready() until it is true; a daemon that ended or the timeout fails, with the logs."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in daemons if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} ended" if dead else f"not within {timeout} s"
            logs = log_tails(folder) if folder else ""
            raise AssertionError(f"waiting for {what}: {why}\n{logs}")
        time.sleep(poll)


def test_a_user_not_root_is_told_why_the_cluster_tests_are_skipped(monkeypatch):
    """Only root starts the test's cluster, and installs Slurm (CI): anyone else, with Slurm or
    without, is skipped in one line, not failed."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(pytest.skip.Exception) as skipped:
        slurm_tools()
    msg = str(skipped.value)  # names every missing tool and the command that installs them
    assert all(tool in msg for tool in ("munged", "slurmctld", "slurmd", "sbatch", "squeue",
                                        "scancel", "scontrol", "sinfo")), msg
    assert "root" in msg and "apt-get install -y slurm-wlm munge" in msg, msg
    monkeypatch.setattr(shutil, "which", lambda tool, **k: f"/usr/bin/{tool}")
    with pytest.raises(pytest.skip.Exception) as skipped:
        slurm_tools()
    assert str(skipped.value).startswith("not root") and "SlurmUser=root" in str(skipped.value)


@pytest.fixture(scope="module")
def slurm(free_port):
    """A running single-node Slurm: .env (SLURM_CONF, its tools on the PATH), .run(*argv) -> stdout,
    .wait_for_jobs(timeout, logs) -> the job logs once no job is left."""
    tools = slurm_tools()
    folder = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host, (free_port(), free_port())))
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=SBIN_PATH, OMP_NUM_THREADS="1")
    daemons = []

    def start(name, *argv):
        with open(folder / f"{name}.out.log", "w") as out:
            daemons.append(subprocess.Popen([tools[name], *argv], stdout=out,
                                            stderr=subprocess.STDOUT, env=env))

    def run(*argv, timeout=60):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
        return done.stdout

    def queued():
        return subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True,
                              env=env, timeout=60).stdout.split()

    def wait_for_jobs(timeout, logs):
        wait_for(lambda: not queued(), timeout, "the jobs to end", folder=logs)
        return log_tails(logs)

    def node_state():
        return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              env=env, timeout=60).stdout.strip()

    try:
        start("munged", "-F", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
              f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
              f"--seed-file={folder}/munged.seed")
        wait_for(lambda: (folder / "munge.socket").exists(), 30, "munged", daemons, folder)
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf), "-N", host)
        wait_for(lambda: node_state() == "idle", 60, "an idle node", daemons, folder)
        yield SimpleNamespace(env=env, run=run, wait_for_jobs=wait_for_jobs)
    finally:
        try:
            if len(daemons) == 3 and queued():  # nothing of ours keeps running
                subprocess.run(["scancel", *queued()], env=env, timeout=60)
                wait_for(lambda: not queued(), 60, "the jobs to end", daemons, folder)
        finally:
            for p in reversed(daemons):  # slurmd, slurmctld, munged: by their pids
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------ the sweep on Slurm
def proc_status(pid):
    """/proc/PID/status as {field: value}; {} once the process has gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def has_signal(pid, field, sig):
    """Is `sig` in the signal mask `field` of process pid (SigCgt: caught; ShdPnd, SigPnd:
    pending)?"""
    mask = proc_status(pid).get(field) if pid else None
    return mask is not None and bool(int(mask, 16) >> (sig - 1) & 1)


def train_pid(out):
    """The pid of the train.py process of run folder `out` on this machine, or None."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:  # gone
            continue
        if argv[1:2] == [b"train.py"] and str(out).encode() in argv:
            return int(proc.name)
    return None


ITERS, VAL_EVERY = 80, 40
COMBOS, SEEDS = ("IDR", "MES", "IDR+MES"), 2
TOY = ["RESOLUTION=64", "PATCH=64", f"ITERS={ITERS}", "BATCH=2", "LR=1e-2", "ENCODER=test_resnet",
       f"VAL_EVERY={VAL_EVERY}", "TESTS=IDR,MES", "EVAL_FLAGS=--device cpu",
       "TRAIN_FLAGS=--no-pretrained --decoder-channels 16,8,8,8,8 --warmup 2 --device cpu "
       "--dtype float32 --workers 0 --log-every 1"]
NO_GPU = ["SLURM_GRES=", "SLURM_CPUS=1", "SLURM_TIME=10", "SLURM_WARN=60"]


def test_slurm_sweep_requeues_a_task_warned_of_its_time_limit(slurm, synth_root, tmp_path,
                                                              read_log):
    from data import prepare_cache

    cache, runs, report = tmp_path / "cache", tmp_path / "runs", tmp_path / "report"
    for ds in ("IDR", "MES"):
        prepare_cache(ds, synth_root, cache, 64, verbose=False)  # once, before the tasks
    sweep = [f"COMBOS={' '.join(COMBOS)}", f"SEEDS={SEEDS}", f"RUNS={runs}",
             f"DATA_ROOT={synth_root}", f"CACHE={cache}", f"REPORT={report}", *TOY, *NO_GPU]
    out = make("slurm-sweep", *sweep, env=slurm.env).stdout
    array = re.search(r"job array (\d+), 6 task\(s\)", out)
    assert array and re.search(r"job \d+ runs make report once the array has ended", out), out
    array, log0 = array[1], runs / "slurm" / f"sweep_{array[1]}_0.log"
    # Task 0 (IDR/s0) gets its time-limit warning mid-training, as sbatch --signal=B:USR1@60
    # sends it (to the batch shell only). NOTE: so that it lands before the run's last step, the
    # task's command (make, its shell, train.py: one process group) is stopped (SIGSTOP) once
    # train.py catches SIGUSR1; train.py goes on (SIGCONT) once the batch shell has passed the
    # signal on to it, the others once train.py has taken it (had make ended first, the kernel
    # would have sent the stopped train.py SIGHUP: an orphaned process group).
    warned = runs / "IDR" / "s0"
    wait_for(lambda: has_signal(train_pid(warned), "SigCgt", signal.SIGUSR1), 120,
             f"train.py of {warned} to catch SIGUSR1", poll=0.05)
    pid = train_pid(warned)
    group = os.getpgid(pid)
    os.killpg(group, signal.SIGSTOP)
    scancel = None
    try:
        wait_for(lambda: proc_status(pid)["State"].startswith("T"), 30, "train.py to stop")
        log = warned / "log.jsonl"
        steps = log.read_text().count('"split": "train"') if log.exists() else 0
        assert steps < ITERS, f"train.py of {warned} was stopped after its last step"
        # The same RUNS again while its array is queued (task 0 cannot end now): refused
        jobs = set(slurm.run("squeue", "-h", "-o", "%F").split())  # arrays, jobs
        again = make("slurm-sweep", *sweep, env=slurm.env, check=False)
        assert again.returncode != 0, again.stdout
        first = again.stderr.splitlines()[0]  # names the array's RUNS and the way out
        assert first.startswith("error: ") and f"RUNS={runs.resolve()} " in first, again.stderr
        assert "squeue --me -n sweep" in first and "scancel" in first, again.stderr
        assert set(slurm.run("squeue", "-h", "-o", "%F").split()) <= jobs  # nothing new
        (task0,) = [line.split()[1] for line in
                    slurm.run("squeue", "-h", "-o", "%i %A").splitlines()
                    if line.startswith(f"{array}_0 ")]
        # NOTE: Slurm 22.05 answers a signal to an array task "Job can not be altered now" once
        # it has delivered it, and scancel retries for minutes: it is stopped as soon as the
        # signal has reached train.py (before the requeued task may start again, which a retry
        # would signal too).
        scancel = subprocess.Popen(["scancel", "--signal=USR1", "--batch", task0], env=slurm.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pending = lambda: any(has_signal(pid, f, signal.SIGUSR1)  # noqa: E731
                              for f in ("ShdPnd", "SigPnd"))
        wait_for(pending, 60, "the signal to reach train.py")
        scancel.terminate()
        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: not pending(), 30, "train.py to take the signal")
    finally:
        if scancel is not None:
            scancel.terminate()
            scancel.wait()
        os.killpg(group, signal.SIGCONT)
    wait_for(lambda: "slurm_task: time limit near" in log0.read_text(), 120, "the requeue")
    logs = slurm.wait_for_jobs(400, runs / "slurm")

    for k, (combo, seed) in enumerate((c, s) for c in COMBOS for s in range(SEEDS)):
        run = runs / combo / f"s{seed}"
        res = json.loads((run / "results.json").read_text())
        assert res["train"] == combo.split("+") and set(res["results"]) == {"IDR", "MES"}
        # every step trained once, none twice, no restart from step 0; each validation once
        assert [r["step"] for r in read_log(run, "train")] == list(range(1, ITERS + 1)), run
        assert [r["step"] for r in read_log(run, "val")] == [VAL_EVERY, ITERS], run
        log = (runs / "slurm" / f"sweep_{array}_{k}.log").read_text()
        assert log.count(f"done: {ITERS} steps") == 1, log
        assert log.count(f"wrote {run / 'results.json'}") == 1, log
        if run != warned:
            assert "attempt 2" not in log and "resuming" not in log, log
    log = log0.read_text()
    last = re.escape(str(warned / "last.pt"))
    stopped = re.findall(rf"stopped by SIGUSR1 at step (\d+): {last} written", log)
    assert len(stopped) == 1 and 0 < int(stopped[0]) < ITERS, logs
    assert "slurm_task: time limit near (SIGUSR1): requeued" in log and "attempt 2:" in log
    assert log.count("resuming") == 1 and f"resuming {warned} from step {stopped[0]}\n" in log
    assert "attempt 3" not in log
    # the dependent job made the report of all six runs once the array had ended
    assert (report / "report.md").exists(), logs
    assert "error:" not in log_tails(runs / "slurm", "report_*.log"), logs


# Like train.py under make: noted at once, the signal ends the step, then a slow write (a large
# last.pt), exit 75; the next attempt finds the file and ends.
SLOW_SAVE = """import os, signal, sys, time
if os.path.exists(sys.argv[1]):
    print("resumed", flush=True)
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
print("running", flush=True)
while not got:
    time.sleep(0.1)
time.sleep(3)
open(sys.argv[1], "w").close()
print("saved", flush=True)
sys.exit(75)
"""


def test_a_warned_task_requeues_once_its_command_has_saved(slurm, tmp_path):
    (tmp_path / "slow_save.py").write_text(SLOW_SAVE)
    # `; true`: a shell that stays between the task and python, as make's does (and dies of USR1)
    command = f"{sys.executable} {tmp_path / 'slow_save.py'} {tmp_path / 'last'}; true"
    log = tmp_path / "warned.log"
    job = slurm.run("sbatch", "--parsable", f"--chdir={ROOT}", "--requeue", "--open-mode=append",
                    "--time=5", f"--output={log}", "slurm_task.sh", "1", "sh", "-c", command)
    wait_for(lambda: log.exists() and "running" in log.read_text(), 60, "the job to run")
    slurm.run("scancel", "--signal=USR1", "--batch", job.strip())
    slurm.wait_for_jobs(120, tmp_path)
    lines = [line for line in log.read_text().splitlines() if not line.startswith("slurmstepd")]
    assert lines[1:3] == ["running", "saved"] and lines[3].startswith("slurm_task: "), lines
    assert all(word in lines[3] for word in ("SIGUSR1", "requeued", "last.pt")), lines
    assert "attempt 2:" in lines[4] and lines[5:] == ["resumed"], lines


def test_a_failing_task_is_requeued_retries_times_and_a_cancelled_one_never(slurm, tmp_path):
    sbatch = ["sbatch", "--parsable", f"--chdir={ROOT}", "--requeue", "--open-mode=append",
              "--time=5"]
    failing = slurm.run(*sbatch, f"--output={tmp_path}/failing.log", "slurm_task.sh", "1",
                        "sh", "-c", "echo boom; exit 3").strip()
    # no log to count its failures in (stdout not a file): Slurm's count of its requeues stands in
    unlogged = slurm.run(*sbatch, "--output=/dev/null", f"--error={tmp_path}/unlogged.err",
                         "slurm_task.sh", "1", "sh", "-c", "exit 4").strip()
    # a command that, like train.py, notes SIGTERM, ends its step and exits 75
    stoppable = "import signal, sys, time\ngot = []\n" \
                "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n" \
                "print('running', flush=True)\nwhile not got: time.sleep(0.1)\nsys.exit(75)"
    cancelled = slurm.run(*sbatch, f"--output={tmp_path}/cancelled.log", "slurm_task.sh", "1",
                          sys.executable, "-c", stoppable).strip()
    log = tmp_path / "cancelled.log"
    wait_for(lambda: log.exists() and "running" in log.read_text(), 60, "the job to run")
    slurm.run("scancel", cancelled)
    slurm.wait_for_jobs(120, tmp_path)
    text = (tmp_path / "failing.log").read_text()
    assert text.splitlines().count("boom") == 2, text
    assert "slurm_task: failed (exit 3): requeued" in text and "retry 1 of 1" in text, text
    last = text.strip().splitlines()[-1]  # the command, its exit status, the tries, the end
    assert last.startswith("slurm_task: error: sh -c echo boom; exit 3 "), last
    assert all(word in last for word in ("(exit 3)", "2 time(s)", "not requeued")), last
    assert "ExitCode=3:0" in slurm.run("scontrol", "show", "job", failing)
    text = (tmp_path / "unlogged.err").read_text()
    last = text.strip().splitlines()[-1]
    assert last.startswith("slurm_task: error: sh -c exit 4 "), text
    assert all(word in last for word in ("(exit 4)", "2 time(s)", "not requeued")), text
    assert re.search(r" Restarts=1 .*ExitCode=4:0", slurm.run("scontrol", "show", "job", unlogged),
                     re.S)
    text = log.read_text()
    assert "slurm_task: stopped by SIGTERM (scancel, or a preemption that Slurm requeues): " \
           "exit 75" in text, text
    assert "attempt 2" not in text and "requeued," not in text


# Attempt 1 fails; attempts 2 and 3 are warned of their time limit (exit 75 as train.py).
FAIL_THEN_WARNED = """import os, signal, sys, time
attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1
if attempt == 1:
    sys.exit(3)
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
print("running", attempt, flush=True)
while not got:
    time.sleep(0.1)
sys.exit(75)
"""


def test_time_limit_requeues_are_counted_apart_from_failures(slurm, tmp_path):
    """MAX_REQUEUES=1: one time-limit requeue, whatever the failures' retries before it."""
    (tmp_path / "task.py").write_text(FAIL_THEN_WARNED)
    log = tmp_path / "task.log"
    job = slurm.run("sbatch", "--parsable", f"--chdir={ROOT}", "--requeue", "--open-mode=append",
                    "--time=5", "--export=ALL,MAX_REQUEUES=1", f"--output={log}",
                    "slurm_task.sh", "1", sys.executable, str(tmp_path / "task.py")).strip()
    for attempt in (2, 3):
        wait_for(lambda: log.exists() and f"running {attempt}\n" in log.read_text(), 120,
                 f"attempt {attempt} to run", folder=tmp_path)
        slurm.run("scancel", "--signal=USR1", "--batch", job)
    slurm.wait_for_jobs(120, tmp_path)
    lines = [line for line in log.read_text().splitlines() if line.startswith("slurm_task: ")]
    assert lines[1:] == [
        "slurm_task: failed (exit 3): requeued, retry 1 of 1", lines[2],
        "slurm_task: time limit near (SIGUSR1): requeued; the next attempt resumes from last.pt",
        lines[4], f"slurm_task: error: {sys.executable} {tmp_path / 'task.py'} reached its time "
        f"limit 2 times; not requeued again (MAX_REQUEUES in slurm_task.sh); a longer --time "
        f"needs fewer"], lines
    assert "attempt 2:" in lines[2] and "attempt 3:" in lines[4], lines


# --------------------------------------------------------------------- the Optuna search on Slurm
def test_slurm_tune_runs_workers_with_their_own_seeds_on_one_postgres_study(
        slurm, postgres_url, synth_root, tmp_path):
    import optuna

    import tune
    from data import prepare_cache

    cache, runs = tmp_path / "cache", tmp_path / "runs"
    prepare_cache("IDR", synth_root, cache, 64, verbose=False)
    flags = ["--study", "pg", "--runs-dir", str(tmp_path / "trials"), "--plot-dir",
             str(tmp_path / "plots"), "--trials", "4", "--worker-trials", "2", "--encoders",
             "test_resnet", "--decoder-widths", "8,8,8,8,8", "--resolutions", "64", "--iters", "4",
             "--val-every", "2", "--pruner", "none", "--", *TINY_TRAIN]
    out = make("slurm-tune", f"TUNE_STORAGE={postgres_url}", "TUNE_WORKERS=2", "COMBO=IDR",
               f"DATA_ROOT={synth_root}", f"CACHE={cache}", f"RUNS={runs}",
               f"TUNE_FLAGS={' '.join(flags)}", *NO_GPU, env=slurm.env).stdout
    array = re.search(r"job array (\d+), 2 worker\(s\)", out)
    assert array, out
    logs = slurm.wait_for_jobs(300, runs / "slurm")
    for k in (0, 1):
        log = (runs / "slurm" / f"tune_{array[1]}_{k}.log").read_text()
        storage = re.escape(f"--storage '{postgres_url}' --seed {k} ")  # as make echoes it
        assert re.search(rf"tune\.py --train IDR .*{storage}", log), log
        assert "this worker ran 2 trial(s)" in log, logs
    study = optuna.load_study(study_name="pg", storage=tune.driver_url(postgres_url))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4 and len({t.user_attrs["worker"] for t in done}) == 2
