"""cli.py: every script ends on a user's error in one line (exit 1) and on Ctrl-C in one line (exit 130); an
output folder is checked before any work; a checkpoint write on a full disk is one OSError naming the file.

    .venv/bin/python -m pytest -q tests/test_cli.py
"""
import ast
import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import average
import utils
import model
from model import save_checkpoint

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
    assert ended(raising(full), capsys) == (1, "error: /data/run/last.pt: No space left on device\n")
    assert ended(raising(FileNotFoundError("no log.jsonl in runs/x (train.py writes it)")), capsys) == \
        (1, "error: no log.jsonl in runs/x (train.py writes it)\n")
    worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nValueError: images.npy of IDR is damaged")
    assert ended(raising(worker), capsys) == (1, "error: ValueError: images.npy of IDR is damaged\n")
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


def test_every_script_ends_through_cli_run():
    scripts = sorted(p for p in ROOT.glob("*.py") if p.name != "cli.py" and 'if __name__ == "__main__":' in p.read_text())
    scripts += [ROOT / "data" / "prepare.py", ROOT / "data" / "synthetic.py", ROOT / "bench" / "real_he.py"]
    assert len(scripts) >= 13
    for path in scripts:
        tree = ast.parse(path.read_text())
        (block,) = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert ast.unparse(block.body[-1]).startswith("utils.run(main"), path.name


def test_writable_folder_is_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("keep")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ValueError, match=r"^-o .*afile.*: cannot write x.pt there \(a file, not a folder"):
            utils.writable_folder(bad, "-o", "write x.pt there")
    assert (tmp_path / "afile").read_text() == "keep"
    made = utils.writable_folder(tmp_path / "new" / "deeper", "--save-maps")
    assert made.is_dir() and list(made.iterdir()) == []  # the probe is gone


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""
    room = 100

    def write(self, b):
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_checkpoint_on_a_full_disk_is_one_oserror_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "model_cfg": {}, "step": 2})
    monkeypatch.setattr(model, "open", lambda p, mode: FullDisk(p, mode.replace("b", "")), raising=False)
    with pytest.raises(OSError) as err:  # torch's zip writer turned it into "RuntimeError: unexpected pos"
        save_checkpoint(path, {"model": {"w": torch.zeros(10_000)}, "model_cfg": {}, "step": 4})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert utils.message(err.value) == f"{path}: cannot write the checkpoint (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no .tmp left
    assert torch.load(path, weights_only=True)["step"] == 2


def test_average_refuses_an_unwritable_output_before_reading_any_checkpoint(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a folder"):
        average.check_out(tmp_path, force=False)
    # the command line: one line, exit 1, nothing read (the checkpoints named do not even exist)
    r = subprocess.run([sys.executable, str(ROOT / "average.py"), "soup", str(tmp_path / "missing.pt"),
                        "-o", str(tmp_path / "afile" / "soup.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == \
        [f"error: -o {tmp_path / 'afile'}: cannot write soup.pt there (a file, not a folder, is in the way)"]


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
    # while it is written, no glob for the file's suffix sees the temporary file (report.py lists *_overlay.*)
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
# Each entry point with a command a user runs; the Ctrl-C lands in the imports, before main().
STARTING = {
    "train": ["train.py", "--train", "IDR", "--data-root", "missing", "--device", "cpu"],
    "evaluate": ["evaluate.py", "--ckpt", "missing.pt", "--test", "IDR", "--data-root", "missing"],
    "average": ["average.py", "soup", "missing.pt", "-o", "soup"],
    "fig4": ["fig4.py", "--train", "IDR", "--runs-dir", "missing"],
    "characterize": ["characterize.py", "--data-root", "missing"],
    "report": ["report.py", "missing", "-o", "report"],
    "tune": ["tune.py", "--study", "missing", "--show"],
    "interop": ["interop.py", "onnx", "missing.pt", "m.onnx"],
    "curves": ["curves.py", "missing"],
    "hub": ["hub.py", "IDR"],
    "prepare": ["-m", "data.prepare", "--dataset", "IDR", "--data-root", "missing"],
    "synthetic": ["-m", "data.synthetic", "--out", "synth"],
    "real_he": ["bench/real_he.py", "--out", "real_he"],
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


def test_early_ctrl_c_handler_lasts_until_run(capsys):
    import signal

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    cli.early_ctrl_c(False)  # a script imported by another (tune.py imports train.py): no change
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:
        cli.early_ctrl_c(True)
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
        signal.signal(signal.SIGINT, signal.default_int_handler)
