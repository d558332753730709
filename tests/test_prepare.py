"""data/prepare.py: the prepared cache, written once: no-op re-runs, concurrent preparations,
caches without their sources, the split protocol recorded, bad inputs and full disks leaving
nothing behind, black images, the command line.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_prepare.py
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_prepare.py -k real   # real IDRiD

References are independent of the code under test: the authors' draw re-written from nntools'
random_split (the nntools_split fixture), the space a preparation needs computed here, lesion shares
recounted from the cached bitmasks.
"""
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.prepare
from data.cache import PreparedDataset
from data.datasets import dataset_root, list_samples
from data.ids import DATASET_IDS
from data.prepare import prepare_cache
from data.splits import make_splits

ROOT = Path(__file__).resolve().parents[1]


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def _copy(synth_root, tmp_path, folder):
    """A private copy of one synthetic dataset (free to damage) -> its --data-root."""
    root = tmp_path / "raw"
    shutil.copytree(synth_root / folder, root / folder)
    return root


# ----------------------------------------------------------------------- no-op re-runs, concurrency

def test_prepare_rerun_is_a_noop(cache_dir, synth_root, tmp_path, capsys, monkeypatch):
    out = cache_dir / "MES" / "128"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(data.prepare, "_TABLE_SHOWN", set())  # as in another process, which says
    monkeypatch.setattr(data.prepare, "_LINE_SAID", set())  # "up to date" once
    assert prepare_cache("MES", synth_root, cache_dir, 128) == out
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # A changed option or source file rebuilds (into a private cache: cache_dir is shared).
    prepare_cache("FGA", synth_root, tmp_path, 64)
    meta = tmp_path / "FGA" / "64" / "meta.json"
    first = meta.stat().st_mtime_ns
    prepare_cache("FGA", synth_root, tmp_path, 64)
    assert meta.stat().st_mtime_ns == first
    prepare_cache("FGA", synth_root, tmp_path, 64, thresholds={"FGA": 127})
    assert meta.stat().st_mtime_ns != first
    assert json.loads(meta.read_text())["options"]["mask_threshold"] == 127
    # no temporary folders left
    assert sorted(p.name for p in (tmp_path / "FGA").iterdir()) == ["64"]


CONCURRENT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from data.prepare import prepare_cache
Path(sys.argv[2]).touch()  # ready
while not Path(sys.argv[3]).exists():  # start together
    time.sleep(0.002)
prepare_cache("FGA", sys.argv[4], sys.argv[5], 64, workers=1)
"""


def test_concurrent_preparations_take_turns(synth_root, tmp_path):
    """Two processes preparing the same cache at once (make -j, several jobs on first use): both
    succeed, the cache is prepared once, and nothing is left behind."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    argv = [[sys.executable, "-c", CONCURRENT, str(ROOT), str(tmp_path / f"ready{k}"), str(go),
             str(synth_root), str(cache)] for k in range(2)]
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in argv]
    for k in range(2):
        for _ in range(3000):
            if (tmp_path / f"ready{k}").exists() or procs[k].poll() is not None:
                break
            time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    printed = "".join(o for o, _ in outs)
    assert printed.count("prepared 12 images") == 1 and printed.count("up to date") == 1, printed
    meta = cache / "FGA" / "64" / "meta.json"
    first = meta.stat().st_mtime_ns
    assert prepare_cache("FGA", synth_root, cache, 64, verbose=False) == meta.parent
    assert meta.stat().st_mtime_ns == first
    # no lock, tmp or old folders
    assert sorted(p.name for p in (cache / "FGA").iterdir()) == ["64"]


def test_leftovers_of_interrupted_preparations_are_removed(synth_root, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / "cache" / "FGA"
    stale = [parent / f".tmp-64-{dead.pid}-1234abcd", parent / ".old-64-5678abcd"]
    # a preparation still running (this process); another resolution (its own lock and clean-up)
    kept = [parent / f".tmp-64-{os.getpid()}-live0000", parent / f".tmp-640-{dead.pid}-other000"]
    for d in stale + kept:
        d.mkdir(parents=True)
        (d / "images.npy").write_bytes(b"x" * 100)
    prepare_cache("FGA", synth_root, tmp_path / "cache", 64, verbose=False)
    assert not any(d.exists() for d in stale) and all(d.exists() for d in kept)


# ----------------------------------------------------------------------------- options and sources

def test_existing_cache_without_sources_must_match_the_options(synth_root, tmp_path,
                                                               dataset_folders):
    raw, cache, gone = tmp_path / "raw", tmp_path / "cache", tmp_path / "gone"
    for ds in ("FGA", "RET"):
        shutil.copytree(synth_root / dataset_folders[ds], raw / dataset_folders[ds])
    ids = [s.id for s in list_samples("FGA", raw / "Seg-set")]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids[:8], "test": ids[8:]}))
    same = {"split_files": {"FGA": str(split)}, "split_seed": 2}
    prepare_cache("FGA", raw, cache, 64, verbose=False, **same)
    prepare_cache("RET", raw, cache, 64, ret_he="all", verbose=False)
    found = prepare_cache("FGA", gone, cache, 64, ret_he="all", verbose=False, **same)
    assert found == cache / "FGA" / "64"
    found = prepare_cache("RET", gone, cache, 64, ret_he="all", verbose=False)
    assert found == cache / "RET" / "64"
    for ds, options, words in (  # the flag as given, and the cache's value
            ("FGA", {**same, "thresholds": {"FGA": 127}}, "--mask-threshold FGA=127 (cache: 0)"),
            ("FGA", {**same, "split_seed": 3}, "--split-seed 3 (cache: 2)"),
            ("FGA", {"split_seed": 2}, f"--splits FGA=default (cache: {split})"),
            ("RET", {}, "--ret-he retinal (cache: all)")):
        with pytest.raises(FileNotFoundError) as err:
            prepare_cache(ds, gone, cache, 64, verbose=False, **options)
        msg = one_line(err)
        assert msg.startswith(ds) and "sources not found" in msg, msg
        assert str(cache / ds / "64") in msg and words in msg, msg
    # same file name, other content
    split.write_text(json.dumps({"train": ids[:7], "test": ids[7:]}))
    with pytest.raises(FileNotFoundError) as err:
        prepare_cache("FGA", gone, cache, 64, verbose=False, **same)
    msg = one_line(err)
    assert f"--splits FGA={split}" in msg and "content changed" in msg, msg


def test_split_protocol_is_recorded_and_re_prepares_the_cache(synth_root, tmp_path, nntools_split):
    cache = tmp_path / "cache"
    prepare_cache("FGA", synth_root, cache, 32, verbose=False)
    splits = json.loads((cache / "FGA/32/splits.json").read_text())
    assert splits["protocol"] == "paper"
    prepare_cache("FGA", synth_root, cache, 32, split_protocol="authors", verbose=False)
    splits = json.loads((cache / "FGA/32/splits.json").read_text())
    meta = json.loads((cache / "FGA/32/meta.json").read_text())
    assert splits["protocol"] == meta["options"]["split_protocol"] == "authors"
    ids = sorted(meta["ids"])
    trainval, test = nntools_split(ids, [int(0.8 * 12), 12 - int(0.8 * 12)])
    assert splits["test"] == sorted(test)
    flag = re.escape("--split-protocol paper (cache: authors)")  # the flag given, the cache's value
    with pytest.raises(FileNotFoundError, match=flag):
        prepare_cache("FGA", tmp_path / "gone", cache, 32, verbose=False)
    # splits.json is a valid --splits file (its "protocol" entry is ignored)
    s = make_splits(list_samples("FGA", synth_root / "Seg-set"), "FGA",
                    split_file=str(cache / "FGA/32/splits.json"))
    assert s["test"] == splits["test"]


# ------------------------------------------------------------------------- bad inputs leave nothing

def test_corrupt_image_leaves_no_cache(synth_root, tmp_path, no_cache_left):
    root = _copy(synth_root, tmp_path, "Seg-set")
    bad = sorted((root / "Seg-set" / "Original_Images").glob("*.png"))[4]
    bad.write_bytes(b"this is not a PNG")
    with pytest.raises(ValueError) as err:
        prepare_cache("FGA", root, tmp_path / "cache", 64)
    msg = one_line(err)
    assert str(bad) in msg and "corrupt or truncated" in msg, msg
    no_cache_left(tmp_path / "cache")


def test_truncated_jpeg_leaves_no_cache_and_keeps_the_old_one(synth_root, tmp_path, no_cache_left):
    root = _copy(synth_root, tmp_path, "IDRiD")
    cache = tmp_path / "cache"
    prepare_cache("IDR", root, cache, 64)
    meta = (cache / "IDR" / "64" / "meta.json").read_text()
    bad = sorted((root / "IDRiD").rglob("*.jpg"))[2]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        prepare_cache("IDR", root, cache, 64)
    msg = one_line(err)
    assert str(bad) in msg and "corrupt or truncated" in msg, msg
    assert sorted(p.name for p in (cache / "IDR").iterdir()) == ["64"]  # no half-written folder
    # the complete old cache is untouched
    assert (cache / "IDR" / "64" / "meta.json").read_text() == meta
    shutil.rmtree(cache)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        prepare_cache("IDR", root, cache, 64)
    no_cache_left(cache)


def test_unknown_id_missing_root_and_empty_test_split(synth_root, tmp_path, monkeypatch,
                                                      no_cache_left):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="'XYZ'"):
        prepare_cache("XYZ", synth_root, cache, 64)
    monkeypatch.delenv("RET_ROOT", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        prepare_cache("RET", tmp_path / "empty", cache, 64)
    msg = one_line(err)
    # the folder expected, and the three ways to name another: two flags, an environment variable
    expected = tmp_path / "empty" / "retinal-lesions-v20191227"
    for name in (str(expected), "--data-root", "--root RET=DIR", "RET_ROOT"):
        assert name in msg, (name, msg)
    with pytest.raises(FileNotFoundError, match="/no/such/RET"):
        prepare_cache("RET", synth_root, cache, 64, roots={"RET": "/no/such/RET"})
    monkeypatch.setenv("RET_ROOT", str(synth_root / "retinal-lesions-v20191227"))
    assert dataset_root("RET", tmp_path / "empty") == synth_root / "retinal-lesions-v20191227"
    ids = [s.id for s in list_samples("MES", synth_root / "MAPLES-DR")]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids, "test": []}))
    with pytest.raises(ValueError) as err:
        prepare_cache("MES", synth_root, cache, 64, split_files={"MES": str(split)})
    msg = one_line(err)
    assert msg.startswith("MES") and "test split" in msg and "no images" in msg, msg
    no_cache_left(cache)


def test_real_idrid_without_testing_set_is_an_empty_test_split(fixture_idrid, tmp_path,
                                                               no_cache_left):
    with pytest.raises(ValueError) as err:
        prepare_cache("IDR", tmp_path, tmp_path / "cache", 64, roots={"IDR": fixture_idrid})
    msg = one_line(err)
    assert msg.startswith("IDR") and "test split" in msg and "no images" in msg, msg
    no_cache_left(tmp_path / "cache")


def test_real_idrid_he_mask_survives_preparation(fixture_idrid, tmp_path):
    ids = [s.id for s in list_samples("IDR", fixture_idrid)]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids[:3], "test": ids[3:]}))
    prepare_cache("IDR", tmp_path / "none", tmp_path / "cache", 1024, roots={"IDR": fixture_idrid},
                  split_files={"IDR": str(split)})
    ds = PreparedDataset(tmp_path / "cache", "IDR", 1024, "all")
    assert ds.ids == ids
    for i, s in enumerate(list_samples("IDR", fixture_idrid)):
        item, geo = ds[i], ds.geometry(i)
        original = (np.asarray(Image.open(s.masks["HE"][0])) > 0).sum()
        x0, y0, x1, y1 = geo["box"]
        scale2 = geo["size"][0] / (x1 - x0) * geo["size"][1] / (y1 - y0)
        he = item["masks"][1]
        assert abs(he.sum() / (original * scale2) - 1) < 0.1, (s.id, he.sum(), original * scale2)
        assert (he & item["fov"]).sum() >= 0.99 * he.sum()


# ----------------------------------------------------------------------------- full disk

def _usage(free):
    return lambda path: namedtuple("usage", "total used free")(10 ** 12, 0, free)


def test_not_enough_free_space_is_one_line_and_leaves_nothing(synth_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(data.prepare.shutil, "disk_usage", _usage(10 << 20))
    with pytest.raises(ValueError) as err:
        prepare_cache("MES", synth_root, cache, 64, verbose=False)
    msg = one_line(err)
    # 12 images x (RGB + one bitmask byte) at 64 px, + 2 % + 64 MiB
    need = 12 * 64 * 64 * 4 * 1.02 + (64 << 20)
    # the folder, the images and resolution, the space they need and the space free
    for name in (f"not enough free space in {cache / 'MES'}", "12 images", "64 px",
                 f"{need / 1e9:.2f} GB", "0.01 GB"):
        assert name in msg, (name, msg)
    assert not cache.exists()  # the folders this call created are gone too


def test_enospc_while_writing_removes_the_temporary_folder_and_keeps_the_old_cache(
        synth_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    prepare_cache("MES", synth_root, cache, 64, verbose=False)
    before = (cache / "MES/64/meta.json").read_text()
    real, calls = data.prepare.preprocess_sample, []

    def full(sample, *a, **k):
        calls.append(sample.id)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(sample, *a, **k)

    monkeypatch.setattr(data.prepare, "preprocess_sample", full)
    with pytest.raises(ValueError) as err:
        prepare_cache("MES", synth_root, cache, 64, thresholds={"MES": 10}, verbose=False,
                      workers=1)
    msg = one_line(err)
    assert f"no space left in {cache / 'MES'}" in msg and str(cache / "MES/64") in msg, msg
    assert sorted(p.name for p in (cache / "MES").iterdir()) == ["64"]  # no .tmp-* left
    assert (cache / "MES/64/meta.json").read_text() == before
    monkeypatch.setattr(data.prepare, "preprocess_sample", real)
    def no_room(fd, offset, length):  # the reservation itself finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.prepare.os, "posix_fallocate", no_room)
    with pytest.raises(ValueError, match="no space left in"):
        prepare_cache("MES", synth_root, cache, 64, thresholds={"MES": 10}, verbose=False)
    assert sorted(p.name for p in (cache / "MES").iterdir()) == ["64"]


# --------------------------------------------------------------------- damaged caches, black images

def test_garbled_cache_without_sources_is_one_line(small_cache, tmp_path):
    cache, out = small_cache
    (out / "meta.json").write_text("not json")
    with pytest.raises(ValueError) as err:
        prepare_cache("DDR", tmp_path / "gone", cache, 32, verbose=False)
    msg = one_line(err)
    assert msg.startswith("DDR") and "sources not found" in msg, msg
    assert str(out / "meta.json") in msg and "not valid JSON" in msg, msg


def test_black_image_warns_naming_it_and_the_summary_stays_sane(synth_root, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(synth_root / "Seg-set", raw / "Seg-set")
    black = sorted((raw / "Seg-set/Original_Images").glob("*.png"))[3]
    w, h = Image.open(black).size
    Image.new("RGB", (w, h)).save(black)
    lesion = np.zeros((h, w), np.uint8)
    # a lesion mask over half the black image: 0 FOV pixels, many lesion pixels
    lesion[: h // 2] = 255
    Image.fromarray(lesion).save(raw / "Seg-set/Hemohedge_Masks" / black.name)
    out = prepare_cache("FGA", raw, tmp_path / "cache", 64)
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, captured.err
    assert str(black) in warnings[0] and "no field of view" in warnings[0], warnings
    meta = json.loads((out / "meta.json").read_text())
    row = meta["ids"].index(black.stem)
    assert meta["fov_pixels"][row] == 0 and meta["lesion_pixels"][row][1] > 0
    shares = [float(x) for x in re.findall(r"(\d+\.\d+)%", captured.out)]
    assert len(shares) == 12 and all(0 <= x <= 100 for x in shares), captured.out
    # The reference: lesion pixels inside the FOV over FOV pixels, per split, from the cached
    # bitmasks.
    splits = json.loads((out / "splits.json").read_text())
    ds = PreparedDataset(tmp_path / "cache", "FGA", 64, "all")
    for k, name in enumerate(("train", "val", "test")):
        items = [ds[ds.ids.index(x)] for x in splits[name]]
        fov = sum(int(it["fov"].sum()) for it in items)
        he = sum(int((it["masks"][1] & it["fov"]).sum()) for it in items)
        assert shares[4 * k + 1] == pytest.approx(100 * he / fov, abs=0.006)


# ----------------------------------------------------------------------------- the command line

def test_prepare_command_line(synth_root, tmp_path):
    run = [sys.executable, "-m", "data.prepare", "--data-root", str(synth_root),
           "--cache", str(tmp_path)]
    ok = subprocess.run(run + ["--dataset", "mes", "ddr", "--resolution", "64"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""  # stderr is a pipe, no terminal: no progress bar in logs
    assert "MES @ 64 px" in ok.stdout and "DDR @ 64 px" in ok.stdout
    assert "CWS" in ok.stdout and "test" in ok.stdout
    splits = json.loads((tmp_path / "MES" / "64" / "splits.json").read_text())
    assert splits["protocol"] == "paper"
    images = sorted(p.stem for p in (synth_root / "MAPLES-DR").glob("*/fundus/*.jpg"))
    assert sorted(sum((splits[k] for k in ("train", "val", "test")), [])) == images
    bad = subprocess.run(run + ["--dataset", "XYZ"], cwd=ROOT, capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("error: ") and "--dataset" in lines[0] and "'XYZ'" in lines[0], lines
    usage = subprocess.run([sys.executable, "-m", "data.prepare", "--help"], cwd=ROOT,
                           capture_output=True, text=True)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: python -m data.prepare ")
    # one flag for the cache folder, the other scripts' --cache; the old --out is not offered
    assert "--cache CACHE" in usage.stdout and "--out" not in usage.stdout


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: where tqdm draws its bars."""

    def isatty(self):
        return True


def test_prepare_shows_a_bar_of_images_on_a_terminal(synth_root, tmp_path, monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    prepare_cache("RET", synth_root, tmp_path, 48, workers=2)
    n = len(PreparedDataset(tmp_path, "RET", 48, "all"))
    bars = term.getvalue()
    assert "RET @ 48 px: 100%" in bars and f"{n}/{n}" in bars and "image/s" in bars
    prepare_cache("RET", synth_root, tmp_path / "quiet", 48, verbose=False)
    assert term.getvalue() == bars  # verbose=False (evaluate.py inside fig4.py): no bar


def test_prepare_out_is_a_deprecated_cache(monkeypatch, tmp_path, capsys):
    """--out, this script's old name for --cache (older Makefiles and notes use it), still works,
    with a note."""
    calls = []
    monkeypatch.setattr(data.prepare, "prepare_cache",
                        lambda ds, root, cache, R, **kw: calls.append((ds, cache, R)))
    data.prepare.main(["--dataset", "IDR+MES", "--out", str(tmp_path), "--resolution", "64"])
    assert calls == [("IDR", str(tmp_path), 64), ("MES", str(tmp_path), 64)]
    err = capsys.readouterr().err
    assert err.startswith("note: ") and err.count("\n") == 1, err  # one line
    # the old flag, and what to type instead
    assert "--out" in err and f"--cache {tmp_path}" in err, err
    calls.clear()
    data.prepare.main(["--dataset", "all", "--cache", str(tmp_path)])
    assert calls == [(ds, str(tmp_path), 1536) for ds in DATASET_IDS]
    with pytest.raises(ValueError) as err:
        data.prepare.main(["--dataset", "IDR", "--out", "a", "--cache", "b"])
    msg = one_line(err)
    assert "--out a" in msg and "--cache b" in msg, msg


def test_split_table_once_then_one_line_once_per_process(synth_root, tmp_path, capsys,
                                                         monkeypatch):
    """The split table is printed when the cache is prepared; afterwards an up-to-date cache says
    one line (its split's sizes, counted here from PreparedDataset), once per process (a new
    process: the module's memory cleared), and `python -m data.prepare` prints the table."""
    prepare_cache("MES", synth_root, tmp_path, 32)
    prepare_cache("MES", synth_root, tmp_path, 32)  # the same process: nothing more
    printed = capsys.readouterr().out
    assert printed.count("(per lesion: images containing it") == 1 and "up to date" not in printed
    monkeypatch.setattr(data.prepare, "_TABLE_SHOWN", set())  # as in another process
    monkeypatch.setattr(data.prepare, "_LINE_SAID", set())
    for _ in range(3):
        prepare_cache("MES", synth_root, tmp_path, 32)
    lines = capsys.readouterr().out.strip().splitlines()
    sizes = [len(PreparedDataset(tmp_path, "MES", 32, s)) for s in ("train", "val", "test")]
    assert len(lines) == 1 and "up to date" in lines[0]
    assert f"{sizes[0]} train, {sizes[1]} val, {sizes[2]} test images" in lines[0]
    data.prepare.main(["--dataset", "MES", "--data-root", str(synth_root), "--cache",
                       str(tmp_path), "--resolution", "32"])
    printed = capsys.readouterr().out
    assert printed.count("(per lesion: images containing it") == 1 and "(up to date)" in printed
