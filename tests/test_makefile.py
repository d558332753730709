"""The Makefile: the sweep plan (make all-combos, make fig4-sweep), the members file,
gpu_slot.sh, and a miniature `make demo` end to end."""
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IDS = ("IDR", "DDR", "FGA", "RET", "MES")
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")


def make(*args, timeout=600):
    out = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("seeds", [1, 3])
def test_all_combos_plan_lists_31_x_seeds_runs(seeds, tmp_path):
    plan = make("-n", "all-combos", f"SEEDS={seeds}", f"RUNS={tmp_path}/runs", "GPUS=")
    trains = [line for line in plan.splitlines() if "python train.py --train " in line]
    assert len(trains) == 31 * seeds
    runs = {(re.search(r"--train (\S+)", t)[1], re.search(r"--seed (\d+)", t)[1]) for t in trains}
    expected = {("+".join(c), str(s)) for r in range(1, 6) for c in itertools.combinations(IDS, r)
                for s in range(seeds)}
    assert runs == expected  # canonical names (IDR DDR FGA RET MES order), every seed once
    for t in trains:  # each run writes its own folder, named after its combination and seed
        combo, seed = re.search(r"--train (\S+)", t)[1], re.search(r"--seed (\d+)", t)[1]
        assert f"--out {tmp_path}/runs/{combo}/s{seed} " in t
    # each run scores its best.pt itself (train.py --test); evaluate.py only with EVAL_FLAGS
    assert all(" --test IDR,DDR,FGA,RET,MES " in t for t in trains)
    assert "evaluate.py" not in plan
    plan = make("-n", "all-combos", f"SEEDS={seeds}", f"RUNS={tmp_path}/runs", "GPUS=",
                "EVAL_FLAGS=--tta").splitlines()
    evals = [line for line in plan if "python evaluate.py --ckpt " in line]
    assert len(evals) == 31 * seeds and all(line.endswith(" --tta") for line in evals)
    assert not any(" --test " in line for line in plan if "python train.py" in line)


def test_all_combos_settings_reach_every_run(tmp_path):
    plan = make("-n", "all-combos", "SEEDS=1", f"RUNS={tmp_path}", "RESOLUTION=256", "ITERS=77",
                "ENCODER=resnet18", "TRAIN_FLAGS=--no-pretrained")
    trains = [line for line in plan.splitlines() if "python train.py" in line]
    assert all("--resolution 256" in t and "--iters 77" in t and "--encoder resnet18" in t
               and t.rstrip().endswith("--no-pretrained") for t in trains)


def test_finished_runs_are_not_redone(tmp_path):
    done = tmp_path / "IDR" / "s0"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    plan = make("-n", "all-combos", "SEEDS=1", f"RUNS={tmp_path}")
    assert "--train IDR --seed 0 " not in plan and "--train DDR --seed 0 " in plan


def test_miniature_demo_end_to_end(tmp_path):
    demo = tmp_path / "demo"
    make("demo", f"DEMO={demo}", "DEMO_IMAGES=8", "DEMO_SIZE=128", "DEMO_RESOLUTION=64",
         "DEMO_PATCH=32", "DEMO_ITERS=4", "DEMO_BATCH=2", "DEMO_COMBOS=IDR RET IDR+RET",
         "DEMO_FIG4=IDR+RET", timeout=900)
    for combo, seed in [("IDR", 0), ("RET", 0), ("IDR+RET", 0), ("IDR+RET", 1)]:
        res = json.loads((demo / "runs" / combo / f"s{seed}" / "results.json").read_text())
        assert res["train"] == combo.split("+") and set(res["results"]) == set(IDS)
    fig4 = json.loads((demo / "runs" / "IDR+RET" / "fig4.json").read_text())
    assert ({"baseline", "ensemble", "soup-encoder", "soup-decoder", "soup-full"}
            <= set(fig4["methods"]))
    styles = json.loads((demo / "report" / "characterize" / "characterize.json").read_text())
    assert set(styles["datasets"]) == set(IDS)
    report = (demo / "report" / "report.md").read_text()
    for png in re.findall(r"\(([^)]+\.png)\)", report):
        assert (demo / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "figure3.png" in report and "figure4.png" in report


@pytest.mark.skipif(shutil.which("flock") is None, reason="flock (util-linux) not installed")
def test_gpu_slot_pins_concurrent_jobs_to_different_gpus(tmp_path):
    env = {"GPU_LOCK_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    job = ["sh", str(ROOT / "gpu_slot.sh"), "0,1",
           "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"; sleep 2']
    procs = [subprocess.Popen(job, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    gpus = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert gpus == ["0", "1"]  # two jobs at once: each holds its own GPU
    third = subprocess.run(job[:2] + ["0,1", "sh", "-c", "exit 3"], env=env, timeout=60)
    # locks are released with the jobs; the command's exit code passes through
    assert third.returncode == 3
    unpinned = subprocess.run(["sh", str(ROOT / "gpu_slot.sh"), "",
                               "sh", "-c", 'echo "${CUDA_VISIBLE_DEVICES-unset}"'],
                              capture_output=True, text=True, env=env, timeout=60)
    assert unpinned.stdout.strip() == "unset"


def test_members_file_gives_each_seed_its_own_flags(tmp_path):
    """MEMBERS=FILE: the paper's members "trained with slightly different hyperparameters"
    (section 3.2); each seed's line comes after TRAIN_FLAGS (its flags win); a seed the file
    lacks stops that run in one line."""
    table = tmp_path / "members.txt"
    table.write_text("# seed: train.py flags\ns0: --lr 1e-4 --dropout 0.2\n"
                     "s1: --augment-p 0.5 --rotate 10\n")
    common = [f"RUNS={tmp_path}/runs", "PY=echo", f"MEMBERS={table}", "TRAIN_FLAGS=--dropout 0.1"]
    for seed, flags in ((0, "--dropout 0.1 --lr 1e-4 --dropout 0.2"),
                        (1, "--dropout 0.1 --augment-p 0.5 --rotate 10")):
        out = make(f"{tmp_path}/runs/IDR+MES/s{seed}/results.json", *common)
        # what `echo` printed: the argv
        line = next(t for t in out.splitlines() if t.startswith("train.py"))
        assert f"--seed {seed} " in line and " ".join(line.split()).endswith(flags), line
    r = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT),
                        f"{tmp_path}/runs/IDR/s2/results.json", *common],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"error: MEMBERS={table} has no line s2:" in r.stderr
    assert not any(t.startswith("train.py") for t in r.stdout.splitlines())  # the run never started


def test_make_fig4_sweep_plans_every_combination_with_two_seeds(tmp_path):
    """`make fig4-sweep`: fig4.py for each combination with best.pt of >= 2 seeds (s<N> folders
    only), with fig4's variables; a note for each combination it skips; none ready is an error."""
    runs = tmp_path / "runs"
    for run in ("IDR+MES/s0", "IDR+MES/s1", "IDR+MES/s5.bak", "IDR/s0", "RET/s0", "RET/s1.bak",
                "DDR+FGA+RET/s3", "DDR+FGA+RET/s10"):
        (runs / run).mkdir(parents=True)
        (runs / run / "best.pt").write_bytes(b"")
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "-n", "fig4-sweep", f"RUNS={runs}",
           "TESTS=IDR,MES", "FIG4_FLAGS=--bn both"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plans = [x for x in proc.stdout.splitlines() if x.startswith(".venv/bin/python fig4.py")]
    assert sorted(plans) == sorted(
        f".venv/bin/python fig4.py {runs}/{c} --test IDR,MES --data-root data_raw --cache cache "
        f"-o {runs}/{c}/fig4.json --bn both" for c in ("IDR+MES", "DDR+FGA+RET"))
    notes = [x for x in proc.stdout.splitlines() if x.startswith("note: fig4-sweep skips ")]
    for combo in ("IDR", "RET"):  # one seed each (s1.bak is no seed): the combination, seeds, where
        assert any(f"skips {combo}:" in x and "1 seed" in x and f"{runs}/{combo}/s*/" in x
                   for x in notes), notes
    # the combinations without a folder
    assert any("27 combination(s)" in x and str(runs) in x for x in notes), notes
    shutil.rmtree(runs / "IDR+MES")
    shutil.rmtree(runs / "DDR+FGA+RET")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()  # ours, then make's own "*** [fig4-sweep] Error 1"
    assert proc.returncode != 0 and err[1:] == [line for line in err[1:] if line.startswith("make")]
    assert err[0].startswith("error: ") and str(runs) in err[0] and "2 seeds" in err[0], err
    assert "make all-combos" in err[0], err  # what to run first


@pytest.mark.skipif(shutil.which("flock") is None, reason="flock (util-linux) not installed")
@pytest.mark.parametrize("gpus", ["0", "0,1"])
def test_gpu_slot_never_reruns_a_command_that_exits_75(gpus, tmp_path):
    """train.py exits 75 when a stop signal ended it (last.pt written): gpu_slot.sh returns that
    once, it does not take it for "this GPU is busy" and run the command again."""
    runs = tmp_path / "runs.txt"
    command = f'echo "$CUDA_VISIBLE_DEVICES" >> {runs}; exit 75'
    job = ["sh", str(ROOT / "gpu_slot.sh"), gpus, "sh", "-c", command]
    env = {"GPU_LOCK_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    try:
        done = subprocess.run(job, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gpu_slot.sh still running after 20 s: it ran the command on GPUs "
                    f"{runs.read_text().split()}")
    assert done.returncode == 75 and runs.read_text() == "0\n"


def test_all_combos_of_datasets_of_ones_own(tmp_path):
    """DATASETS=IDR,ABC: its 2^2 - 1 combinations x SEEDS, DATA_FLAGS (the own dataset's folder) in
    every training and evaluation, the test sets DATASETS by default; three datasets: 7
    combinations; an unknown ID stops make in one line naming it."""
    flags = "--root ABC=/data/clinic"
    plan = make("-n", "all-combos", "SEEDS=2", f"RUNS={tmp_path}", "DATASETS=idr,ABC",
                f"DATA_FLAGS={flags}", "GPUS=").splitlines()
    trains = [line for line in plan if "python train.py --train " in line]
    runs = {(re.search(r"--train (\S+)", t)[1], re.search(r"--seed (\d+)", t)[1]) for t in trains}
    assert len(trains) == 6 and runs == {(c, s) for c in ("IDR", "ABC", "IDR+ABC") for s in "01"}
    assert all(flags in line for line in trains)
    assert all(" --test idr,ABC " in line for line in trains), trains  # as given: parsed there
    plan = make("-n", "all-combos", "SEEDS=2", f"RUNS={tmp_path}", "DATASETS=idr,ABC",
                f"DATA_FLAGS={flags}", "GPUS=", "EVAL_FLAGS=--tta").splitlines()
    evals = [line for line in plan if "python evaluate.py --ckpt " in line]
    assert len(evals) == 6 and all(flags in line and " --test idr,ABC " in line for line in evals)
    ids = ("IDR", "ABC", "XY9")  # the five first, then one's own by name
    plan = make("-n", "all-combos", "SEEDS=1", f"RUNS={tmp_path}", "DATASETS=XY9,ABC,IDR")
    trains = {re.search(r"--train (\S+)", t)[1] for t in plan.splitlines() if "train.py" in t}
    assert trains == {"+".join(c) for r in (1, 2, 3) for c in itertools.combinations(ids, r)}
    assert make("print-combos", "DATASETS=IDR ABC").split() == ["IDR", "ABC", "IDR+ABC"]
    bad = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "-n", "all-combos",
                          "DATASETS=IDR,X"], capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1 and "DATASETS=IDR,X" in lines[0], bad.stderr
    assert "unknown dataset ID 'X'" in lines[0] and "python" not in bad.stdout


def test_tune_passes_data_flags_to_train_py():
    """`make tune DATA_FLAGS=--root ABC=DIR`: train.py's flags, after tune.py's `--` (TUNE_FLAGS'
    own `--` when it has one: tune.py takes one)."""
    def words(*args):  # tune.py's arguments in the planned line
        return make("-n", "tune", "VENV=", *args).split("tune.py", 1)[1].split()

    assert words("COMBO=IDR+ABC", "DATA_FLAGS=--root ABC=/data/clinic") == [
        "--train", "IDR,ABC", "--data-root", "data_raw", "--cache", "cache", "--",
        "--root", "ABC=/data/clinic"]
    plan = words("COMBO=IDR+ABC", "TUNE_FLAGS=--trials 3 -- --lesions HE",
                 "DATA_FLAGS=--root ABC=/x")
    assert plan[6:] == ["--trials", "3", "--", "--lesions", "HE", "--root", "ABC=/x"], plan
    assert words()[-1] == "cache"  # no DATA_FLAGS: nothing added


def test_make_help_lists_every_target_with_a_description():
    """`make help`: one line per user-facing target (every .PHONY one but the demo's internal
    demo-jobs), each with a description; it names no target the Makefile lacks."""
    text = (ROOT / "Makefile").read_text()
    phony = {t for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for t in line.split()}
    listed = {}
    for line in make("help").splitlines():
        names, _, what = line.strip().partition("  ")
        for name in names.split():
            listed[name] = what.strip()
    assert set(listed) == phony - {"demo-jobs"}, set(listed) ^ (phony - {"demo-jobs"})
    assert all(len(what.split()) >= 2 for what in listed.values()), listed
    rules = re.findall(r"^([a-z][a-z0-9 -]*):(?!=)", text, re.M)  # "report table2 ...:" too
    targets = {t for line in rules for t in line.split()}
    assert set(listed) <= targets
