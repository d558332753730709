"""utils.py: every script ends on a user's error in one line (exit 1) and on Ctrl-C in one line
(exit 130), also while it imports; --help answers before torch loads; an output folder is checked
before any work; files are written whole (write_atomic, write_json); locked(); argparse range
checks and errors as one line (Parser).

    .venv/bin/python -m pytest -q tests/test_utils.py
"""
import ast
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]


def ended(main, capsys, **kw):
    """(exit status, stderr) of utils.run(main)."""
    with pytest.raises(SystemExit) as out:
        utils.run(main, **kw)
    code = out.value.code
    if isinstance(code, str):  # sys.exit("message"): Python prints it to stderr and exits 1
        print(code, file=sys.stderr)
        code = 1
    return code, capsys.readouterr().err


def raising(e):
    def main():
        raise e
    return main


def test_errors_and_ctrl_c_end_in_one_line(capsys):
    assert ended(raising(ValueError("--train: unknown dataset ID 'XYZ'")), capsys) == \
        (1, "error: --train: unknown dataset ID 'XYZ'\n")
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/last.pt")
    assert ended(raising(full), capsys) == \
        (1, "error: /data/run/last.pt: No space left on device\n")
    no_log = FileNotFoundError("no log.jsonl in runs/x (train.py writes it)")
    assert ended(raising(no_log), capsys) == \
        (1, "error: no log.jsonl in runs/x (train.py writes it)\n")
    worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                        "ValueError: images.npy of IDR is damaged")
    assert ended(raising(worker), capsys) == \
        (1, "error: ValueError: images.npy of IDR is damaged\n")
    assert ended(raising(KeyboardInterrupt()), capsys, interrupted="interrupted: rerun it") == \
        (130, "interrupted: rerun it\n")
    assert ended(raising(KeyboardInterrupt("interrupted at step 4; resume from x")), capsys) == \
        (130, "interrupted at step 4; resume from x\n")
    missing = ImportError("export to ONNX needs onnx and onnxruntime: pip install onnx onnxruntime")
    assert ended(raising(missing), capsys) == (1, f"error: {missing}\n")
    moved = OSError(errno.EXDEV, "Invalid cross-device link", "a.pt", None, "b.pt")
    assert ended(raising(moved), capsys) == (1, "error: a.pt -> b.pt: Invalid cross-device link\n")
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        utils.run(raising(RuntimeError("bug")))


def entry_points():
    """The scripts a user runs: every file that calls utils.start (top level, data/, bench/)."""
    files = sorted([*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("bench/*.py")])
    return [p for p in files if p.name != "utils.py" and "utils.start(__name__" in p.read_text()]


def test_every_script_ends_through_utils_run():
    scripts = entry_points()
    assert len(scripts) >= 14
    for path in scripts:
        tree = ast.parse(path.read_text())
        # the last `if __name__ == "__main__":` block (average.py has two: start before torch, run)
        mains = [n for n in tree.body
                 if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        block = mains[-1]
        assert ast.unparse(block.body[-1]).startswith("utils.run(main"), path.name


def test_writable_folder_is_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("keep")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ValueError) as err:
            utils.writable_folder(bad, "-o", "write x.pt there")
        msg = str(err.value)  # the flag, the folder, what was to be written there, and why not
        assert msg.startswith(f"-o {bad}") and "x.pt" in msg and "a file" in msg, msg
        assert "\n" not in msg, msg
    assert (tmp_path / "afile").read_text() == "keep"
    made = utils.writable_folder(tmp_path / "new" / "deeper", "--save-maps")
    assert made.is_dir() and list(made.iterdir()) == []  # the probe is gone


def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import maps

    path = utils.write_atomic(tmp_path / "new" / "a.json", lambda tmp: tmp.write_text("old"))
    assert path.read_text() == "old"

    def half_then_full(tmp):
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as err:
        utils.write_atomic(path, half_then_full)
    assert utils.message(err.value) == f"{path}: No space left on device"
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    # while it is written, no glob for the file's suffix sees the temporary file (report.py lists
    # *_overlay.*)
    seen = []

    def save_jpeg(tmp):
        Image.new("RGB", (4, 4)).save(tmp, format="JPEG")
        seen.extend(tmp_path.glob("*.jpg"))
        seen.extend(tmp_path.glob("x*"))
    jpg = utils.write_atomic(tmp_path / "x.jpg", save_jpeg)
    assert Image.open(jpg).format == "JPEG" and seen == []
    # a probability map on a full disk: one OSError naming it, no half PNG left
    real = Path.write_bytes

    def full_after_10_bytes(self, data):
        real(self, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", full_after_10_bytes)
    with pytest.raises(OSError, match="No space left"):
        maps.save_grey_png(tmp_path / "maps" / "p_HE.png", np.zeros((8, 8), np.uint8))
    assert list((tmp_path / "maps").iterdir()) == []


# ---- Ctrl-C while a script imports torch (issue 23): one line, exit 130 ----
# Each entry point (utils.start) with a command a user runs; the Ctrl-C lands in the imports,
# before main().
STARTING = {
    "train": ["train.py", "--train", "IDR", "--data-root", "missing", "--device", "cpu"],
    "evaluate": ["evaluate.py", "--ckpt", "missing.pt", "--test", "IDR", "--data-root", "missing"],
    "average": ["average.py", "soup", "missing.pt", "-o", "soup"],
    "fig4": ["fig4.py", "missing", "--test", "IDR"],
    "characterize": ["characterize.py", "--data-root", "missing"],
    "report": ["report.py", "missing", "-o", "report"],
    "tune": ["tune.py", "--study", "missing", "--show"],
    "interop": ["interop.py", "onnx", "missing.pt", "m.onnx"],
    "curves": ["curves.py", "missing"],
    "authors": ["authors.py", "IDR"],
    "predict": ["predict.py", "--ckpt", "missing.pt", "--images", "missing"],
    "prepare": ["-m", "data.prepare", "--dataset", "IDR", "--data-root", "missing"],
    "synthetic": ["-m", "data.synthetic", "--out", "synth"],
    "check": ["-m", "data.check", "--root", "ABC=missing"],
    "coarsen": ["-m", "data.coarsen", "--dataset", "IDR", "--out", "copy",
                "--data-root", "missing"],
    "real": ["bench/real.py", "--out", "real"],
    "real_styles": ["bench/real_styles.py", "--out", "real_styles"],
    "bench_images": ["bench/bench_images.py", "--skip-network", "--photos", "1"],
    "bench_metrics": ["bench/bench_metrics.py", "--images", "1", "--size", "64"],
    "bench_data": ["bench/bench_data.py", "--n", "1"],
    "bench_train": ["bench/bench_train.py", "--steps", "1"],
    "gpu_check": ["bench/gpu_check.py", "env", "--json", "env.json"],
}


def interrupt_while_importing(argv, cwd, delay):
    """Start `python argv`, send SIGINT `delay` s after it loaded its first extension module from
    site-packages (numpy, torch: its slow imports are under way) -> (exit status, stderr), or None
    when it ended before."""
    import signal
    import time

    # NOTE: SIGINT at its default in the child: in a background job (`make test &`) it is ignored
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    p = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, text=True,
                         preexec_fn=default_sigint, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if "-packages/" in Path(f"/proc/{p.pid}/maps").read_text():
                break
        except OSError:
            break
        time.sleep(0.002)
    time.sleep(delay)
    if p.poll() is not None:  # it ended before the signal: nothing to conclude
        p.communicate()
        return None
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    return p.returncode, err


def test_every_entry_point_is_interrupted_while_importing():
    """STARTING names every script calling utils.start: a new entry point gets its Ctrl-C test."""
    names = {p.stem for p in entry_points()}
    assert names == set(STARTING)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", list(STARTING))
def test_ctrl_c_while_importing_is_one_line(name, tmp_path):
    # Before any work and, were it later, in main(): one line, exit 130, no traceback.
    argv = [str(ROOT / a) if a.endswith(".py") else a for a in STARTING[name]]
    delays = (0.0, 0.2) if name in ("train", "evaluate", "average") else (0.0,)
    ended = [interrupt_while_importing(argv, tmp_path, d) for d in delays]
    ended = [r for r in ended if r is not None]
    assert ended, f"{name} ended before any Ctrl-C"
    for status, err in ended:
        assert status == 130 and "Traceback" not in err, (name, status, err)
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("interrupted"), err


def test_early_ctrl_c_handler_lasts_until_run(capsys, monkeypatch):
    import signal

    monkeypatch.setattr(sys, "argv", ["script.py"])  # no --help: start() only installs its handler
    # Python's own handler to begin with (a background job, `make test &`, starts with SIGINT
    # ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    utils.start("train")  # a script imported by another (tune.py imports train.py): no change
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:
        utils.start("__main__")
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        # main() runs with Python's KeyboardInterrupt again: run() ends it with its own line
        seen = []
        def main():
            seen.append(signal.getsignal(signal.SIGINT))
            signal.raise_signal(signal.SIGINT)
        status = ended(main, capsys, interrupted="interrupted: rerun it")
        assert status == (130, "interrupted: rerun it\n")
        assert seen == [signal.default_int_handler]
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- --help before torch loads (issue 24): the script's parser answers, torch never imported ----
# (the command, a flag its help names, the slow modules it must not have imported)
HELP = {"train": (["train.py", "--help"], "--train", ("torch",)),
        "evaluate": (["evaluate.py", "--help"], "--ckpt", ("torch",)),
        "average": (["average.py", "--help"], "ensemble", ("torch",)),
        "average soup": (["average.py", "soup", "--help"], "--greedy", ("torch",)),
        "authors": (["authors.py", "--help"], "combo", ("torch",)),
        "predict": (["predict.py", "--help"], "--images", ("torch",)),
        "fig4": (["fig4.py", "--help"], "--bn-batches", ("torch",)),
        "interop": (["interop.py", "--help"], "from-smp", ("torch",)),
        "tune": (["tune.py", "--help"], "--study", ("torch",)),
        "characterize": (["characterize.py", "--help"], "--datasets", ("torch", "matplotlib")),
        "curves": (["curves.py", "--help"], "run_dirs", ("matplotlib",)),
        "report": (["report.py", "--help"], "--real-styles", ("matplotlib", "numpy"))}


@pytest.mark.parametrize("name", list(HELP))
def test_help_answers_without_importing_torch(name):
    """`python X.py --help` as a user runs it (the script as __main__), then a look at what it
    imported: the help is printed, the exit status is 0, and torch (seconds to import; for the
    plotting scripts matplotlib) is not in sys.modules. Nothing is timed."""
    argv, flag, absent = HELP[name]
    code = ("import runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "    status = 'no exit'\n"
            "except SystemExit as e:\n"
            "    status = e.code\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'numpy', 'matplotlib')"
            " if m in sys.modules)\n"
            "print('@@', status, heavy)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    *help_text, last = r.stdout.strip().splitlines()
    help_text = "\n".join(help_text)
    assert f"usage: {argv[0]}" in help_text and flag in help_text, r.stdout[-2000:]
    status, imported = last.removeprefix("@@ ").split(" ", 1)
    assert status in ("0", "None") and not any(f"'{m}'" in imported for m in absent), last


# ---- one phrase of a cause, JSON results, locks, argparse ----
def test_reason_is_the_root_cause_in_one_phrase():
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as e:
            raise ValueError("could not reach the hub.\nSecond line") from e
    except ValueError as e:
        assert utils.reason(e) == "ConnectionRefusedError: [Errno 111] Connection refused"
    first = ValueError("first sentence. Second one.\nmore")
    assert utils.reason(first) == "ValueError: first sentence"
    assert utils.reason(KeyError()) == "KeyError"


def test_write_json_nan_as_null_number_lists_on_one_line(tmp_path):
    import json
    import math

    obj = {"tp": list(range(11)), "aupr": [0.5, float("nan"), -1.5e-3],
           "nested": {"x": (float("inf"), 2)}, "text": "a [\n b", "ok": 0.25}
    path = tmp_path / "deep" / "results.json"
    utils.write_json(path, obj)
    text = path.read_text()
    assert json.loads(text) == {"tp": list(range(11)), "aupr": [0.5, None, -1.5e-3],
                                "nested": {"x": [None, 2]}, "text": "a [\n b", "ok": 0.25}
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: every reader takes it
    # one line per list of numbers
    assert '"tp": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]' in text.splitlines()[1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temporary file
    assert utils.null_nan([math.nan, (1.0, -math.inf)]) == [None, [1.0, None]]


def test_locked_waits_for_the_holder_and_removes_the_file(tmp_path, capsys):
    import threading
    import time

    path = tmp_path / "sub" / ".lock"
    entered = threading.Event()

    def other():
        with utils.locked(path, waiting="waiting for the lock"):
            entered.set()
    with utils.locked(path):
        assert path.exists()
        t = threading.Thread(target=other)
        t.start()
        printed = ""
        deadline = time.monotonic() + 60
        while "waiting for the lock" not in printed and time.monotonic() < deadline:
            time.sleep(0.01)
            printed += capsys.readouterr().out
        assert "waiting for the lock" in printed  # the other one found it held, said so, and waits
        assert not entered.is_set()
    t.join(60)
    assert entered.is_set() and not path.exists()  # it ran once released; each holder removes it
    with utils.locked(path):  # taken again at once
        pass


def test_check_range_and_parser_errors_are_one_line(capsys):
    p = utils.Parser(prog="x.py")
    p.add_argument("--lr", type=utils.check_range(float, 0, low_open=True), default=1.0)
    p.add_argument("--p", type=utils.check_range(float, 0, 1), default=0.5)
    p.add_argument("--iters", type=utils.check_range(int, 1), required=True)
    args = p.parse_args(["--iters", "1", "--lr", "1e-9", "--p", "0"])
    assert vars(args) == {"lr": 1e-9, "p": 0.0, "iters": 1}
    assert p.parse_args(["--iters", "7", "--p", "1"]).p == 1.0  # both bounds included
    for argv, names in ((["--iters", "1", "--lr", "0"], ("--lr", "> 0", "0")),
                        (["--iters", "1", "--lr", "-1"], ("--lr", "-1")),
                        (["--iters", "1", "--lr", "nan"], ("--lr", "nan")),
                        (["--iters", "1", "--p", "1.5"], ("--p", "<= 1", "1.5")),
                        (["--iters", "0"], ("--iters", ">= 1", "0")),
                        (["--iters", "2.5"], ("--iters", "int", "'2.5'")),
                        ([], ("--iters",)),
                        (["--iters", "1", "--itres", "2"], ("--itres",))):
        with pytest.raises(ValueError) as err:
            p.parse_args(argv)
        msg = str(err.value)
        assert all(n in msg for n in names) and "\n" not in msg, (argv, msg)
        assert capsys.readouterr().err == ""  # no usage block: run() prints the one line
    # through utils.run: the one `error:` line, exit status 1
    assert ended(lambda: p.parse_args(["--iters", "1", "--lr", "-1"]), capsys)[0] == 1
