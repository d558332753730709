"""evaluate.py end to end on the synthetic test sets, against brute-force counts and a float64
AUPR/Dice; the results file (merged per test set, under a lock, keyed on the weights); --lesions,
--style; one-line errors.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_evaluate.py
"""
import errno
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import evaluate
import utils
from data import LESIONS, PreparedDataset
from model import save_checkpoint
from protocol import predict_tiled

ROOT = Path(__file__).resolve().parents[1]
R = 128  # the conftest cache's resolution
# the protocol's float32 thresholds, independent of kernels/
T32 = np.linspace(0, 1, 11, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------
def brute_counts(probs, masks, roi):
    """probs float32 (N, 4, H, W), masks bool (N, 4, H, W), roi bool (N, H, W) -> tp (4, 11), fp
    (4, 11), pos (4,)."""
    tp = np.zeros((4, 11), np.int64)
    fp = np.zeros((4, 11), np.int64)
    pos = np.zeros(4, np.int64)
    for c in range(4):
        p, y = probs[:, c][roi], masks[:, c][roi]
        pos[c] = y.sum()
        for k, t in enumerate(T32):
            hit = p >= t
            tp[c, k] = (hit & y).sum()
            fp[c, k] = (hit & ~y).sum()
    return tp, fp, pos


def ref_metrics(tp, fp, pos):
    """The REFERENCE.md formula in float64, one lesion: (aupr, dice), NaN when the lesion is
    absent."""
    if pos == 0:
        return math.nan, math.nan
    tp, fp = np.asarray(tp, np.float64), np.asarray(fp, np.float64)
    prec = [tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] > 0 else 1.0 for k in range(11)] + [1.0]
    rec = [tp[k] / pos for k in range(11)] + [0.0]
    aupr = sum((rec[k] - rec[k + 1]) * (prec[k] + prec[k + 1]) / 2 for k in range(11))
    dice = 2 * tp[5] / (2 * tp[5] + fp[5] + (pos - tp[5]))
    return aupr, dice


@torch.no_grad()
def dataset_probs(models, ds):
    """Mean sigmoid probability of the models on every test image, one image at a time: (N, 4, R,
    R) float32."""
    out = []
    for i in range(len(ds)):
        # NOTE: contiguous NCHW as protocol.to_input gives it: a permuted
        # (channels_last) input runs other conv kernels whose float32 sums differ by
        # ~1e-6 on some CPUs, and a pixel at a threshold would move a count
        x = torch.from_numpy(ds[i]["image"]).permute(2, 0, 1)[None].contiguous().float() / 255
        ps = [torch.sigmoid(m(x)) for m in models]
        out.append((sum(ps[1:], ps[0]) / len(ps))[0].numpy())
    return np.stack(out)


def dataset_truth(ds):
    return (np.stack([ds[i]["masks"] for i in range(len(ds))]).astype(bool),
            np.stack([ds[i]["fov"] for i in range(len(ds))]).astype(bool))


def assert_block_matches(block, tp, fp, pos, n_images):
    assert block["n_images"] == n_images
    for c, lesion in enumerate(LESIONS):
        got = block["lesions"][lesion]
        assert got["tp"] == tp[c].tolist(), lesion
        assert got["fp"] == fp[c].tolist(), lesion
        assert got["pos"] == int(pos[c]), lesion
        aupr, dice = ref_metrics(tp[c], fp[c], pos[c])
        # every pixel has p >= t_0 = 0
        floor = (1 + pos[c] / (tp[c][0] + fp[c][0])) / 2 if pos[c] else math.nan
        for name, want in (("aupr", aupr), ("dice", dice), ("aupr_floor", floor)):
            if math.isnan(want):
                assert got[name] is None or math.isnan(got[name]), (lesion, name)
            else:
                assert got[name] == pytest.approx(want, rel=1e-12, abs=1e-12), (lesion, name)


# --------------------------------------------------------------------------------------------------
# Checkpoints: conftest's eval_ckpts, a tiny U-Net whose
# head is scaled so the probabilities spread over [0, 1]
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(eval_ckpts):
    return eval_ckpts


@pytest.fixture(scope="module")
def single(ckpts, cache_dir, synth_root, tmp_path_factory):
    """The single model on MES, maps written: (results dict, maps folder), shared by several
    tests."""
    maps = tmp_path_factory.mktemp("maps")
    return run_eval([ckpts["a"]], cache_dir, synth_root, maps_dir=maps), maps


def run_eval(paths, cache_dir, synth_root, tests=("MES",), **kw):
    kw.setdefault("verbose", False)
    return evaluate.evaluate([str(p) for p in paths], list(tests), (synth_root, cache_dir, {}),
                             device="cpu", **kw)


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------------
def test_cli_json_equals_brute_force(ckpts, model_from, cache_dir, synth_root, tmp_path):
    out = tmp_path / "res.json"
    r = cli("--ckpt", ckpts["a"], "--test", "MES,IDR", "--data-root", synth_root,
            "--cache", cache_dir, "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "AUPR" in r.stdout and "MES" in r.stdout
    res = json.loads(out.read_text())  # strict JSON: NaN written as null
    assert res["version"] == 1 and res["checkpoints"] == [str(ckpts["a"])]
    assert res["train"] == ["MES"] and res["seed"] == 0 and res["method"] == "baseline"
    assert res["n_train_images"] == 8
    assert res["protocol"] == {"thresholds": 11, "ap_bins": 1024, "roi": "fov", "resolution": R,
                               "tta": False, "tile": None, "overlap": None, "dtype": "float32",
                               "split_protocol": "paper", "split_seed": 0, "lesions": list(LESIONS)}
    assert list(res["results"]) == ["IDR", "MES"]  # canonical order
    # where read
    assert (res["data_root"], res["cache"], res["root"]) == (str(synth_root), str(cache_dir), [])
    model = model_from(ckpts["a"])
    for test_id, block in res["results"].items():
        ds = PreparedDataset(cache_dir, test_id, R, "test")
        masks, fov = dataset_truth(ds)
        tp, fp, pos = brute_counts(dataset_probs([model], ds), masks, fov)
        assert tp[:, 0].sum() > tp[:, 10].sum() and (fp[:, 1:10] > 0).any()  # non-trivial maps
        assert_block_matches(block, tp, fp, pos, len(ds))
        present = [ref_metrics(tp[c], fp[c], pos[c]) for c in range(4) if pos[c] > 0]
        if present:
            assert block["mean_aupr"] == pytest.approx(np.mean([a for a, _ in present]), abs=1e-12)
            assert block["mean_dice"] == pytest.approx(np.mean([d for _, d in present]), abs=1e-12)


def test_ensembles(ckpts, model_from, cache_dir, synth_root, single):
    single = single[0]["results"]["MES"]
    # an ensemble file of one member, and the same checkpoint
    # twice (mean of p and p is p), equal the model
    assert run_eval([ckpts["ens1"]], cache_dir, synth_root)["results"]["MES"] == single
    twice = run_eval([ckpts["a"], ckpts["a"]], cache_dir, synth_root)
    assert twice["results"]["MES"] == single and twice["method"] == "ensemble"
    # two different models: counts of the mean of the two probability maps
    pair = run_eval([ckpts["a"], ckpts["b"]], cache_dir, synth_root)["results"]["MES"]
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    masks, fov = dataset_truth(ds)
    probs = dataset_probs([model_from(ckpts["a"]), model_from(ckpts["b"])], ds)
    assert_block_matches(pair, *brute_counts(probs, masks, fov), len(ds))
    assert pair != single


def test_no_roi_counts_every_pixel(ckpts, model_from, cache_dir, synth_root):
    res = run_eval([ckpts["a"]], cache_dir, synth_root, roi=False)
    assert res["protocol"]["roi"] == "all"
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    masks, fov = dataset_truth(ds)
    probs = dataset_probs([model_from(ckpts["a"])], ds)
    # the authors' way: p = 0 outside the FOV
    probs[~np.broadcast_to(fov[:, None], probs.shape)] = 0.0
    tp, fp, pos = brute_counts(probs, masks, np.ones_like(fov))
    assert (tp[:, 0] + fp[:, 0] == len(ds) * R * R).all()
    assert_block_matches(res["results"]["MES"], tp, fp, pos, len(ds))


def test_tiled_counts(ckpts, model_from, cache_dir, synth_root, single):
    base = single[0]["results"]["MES"]
    same = run_eval([ckpts["a"]], cache_dir, synth_root, tile=R)
    assert same["results"]["MES"] == base and same["protocol"]["tile"] == R
    tiled = run_eval([ckpts["a"]], cache_dir, synth_root, tile=96)["results"]["MES"]
    for lesion in LESIONS:
        b, t = base["lesions"][lesion], tiled["lesions"][lesion]
        assert t["pos"] == b["pos"]
        n = b["tp"][0] + b["fp"][0]
        assert t["tp"][0] + t["fp"][0] == n  # every ROI pixel counted at t = 0
        # NOTE: a 96 px window of a 128 px image sees less context near its border: close, not equal
        moved = sum(abs(t["tp"][k] + t["fp"][k] - b["tp"][k] - b["fp"][k]) for k in range(11))
        assert moved < 0.05 * 11 * n, lesion
    # the same on one map: the blended tiles differ from
    # the whole-image map far less than the map varies
    m = model_from(ckpts["a"])
    x = torch.from_numpy(
        PreparedDataset(cache_dir, "MES", R, "test")[0]["image"]).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        whole = torch.sigmoid(m(x.float()))
        tiled = predict_tiled([m], x.float(), 96)
    assert ((tiled - whole).abs().mean((2, 3)) < 0.25 * whole.std((2, 3))).all()


def test_save_maps(ckpts, model_from, cache_dir, single):
    from PIL import Image

    tmp_path = single[1]
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    probs = dataset_probs([model_from(ckpts["a"])], ds)
    for i, image_id in enumerate(ds.ids):
        # the maps on the photograph's geometry: the prepared
        # maps enlarged into the crop box (PIL, bilinear)
        geo = ds.geometry(i)
        (w, h), (left, top), (x0, y0, x1, y1) = geo["size"], geo["pad"], geo["box"]
        fov = Image.fromarray(ds[i]["fov"][top:top + h, left:left + w]).resize((x1 - x0, y1 - y0),
                                                                               Image.NEAREST)
        inside = np.zeros((geo["height"], geo["width"]), bool)  # FOV pixels clear of its rim
        inside[y0:y1, x0:x1] = ndimage.binary_erosion(np.asarray(fov), iterations=3)
        for c, lesion in enumerate(LESIONS):
            crop = Image.fromarray(probs[i, c, top:top + h, left:left + w]).resize(
                (x1 - x0, y1 - y0), Image.BILINEAR)
            ref = np.zeros(inside.shape, np.float32)
            ref[y0:y1, x0:x1] = np.asarray(crop)
            with Image.open(tmp_path / "MES" / f"{image_id}_{lesion}.png") as im:
                assert im.mode == "L" and im.size == (geo["width"], geo["height"])
                diff = np.abs(np.asarray(im).astype(int) - np.round(ref * 255).astype(int))
                assert diff[inside].max() <= 1  # 8-bit quantisation of the same map
        # the panel: image | ground truth | prediction
        for picture, tiles in (("overlay", 1), ("panel", 3)):
            with Image.open(tmp_path / "MES" / f"{image_id}_{picture}.jpg") as im:
                assert (im.mode == "RGB" and im.width == tiles * geo["width"]
                        and im.height > geo["height"])


def test_unwritable_maps_folder_is_one_line_before_any_work(ckpts, cache_dir, synth_root, tmp_path):
    """--save-maps on a file, or under one (an OSError even for root), stops in one line naming the
    flag, before a test set is scored; the file is untouched."""
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(ValueError) as e:
            run_eval([ckpts["a"]], cache_dir, synth_root, maps_dir=out, out=tmp_path / "r.json")
        assert f"--save-maps {out}" in one_line(e)
        assert not (tmp_path / "r.json").exists()
    assert blocker.read_text() == "keep me"


def test_errors(ckpts, edit_ckpt, cache_dir, synth_root, tmp_path):
    common = ["--data-root", str(synth_root), "--cache", str(cache_dir), "--device", "cpu",
              "--out", str(tmp_path / "r.json")]
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    other = tmp_path / "other.pt"
    torch.save({"state": torch.zeros(2)}, other)
    a = str(ckpts["a"])
    no_test = tmp_path / "no_test.json"  # every MES image in train: an empty test set
    no_test.write_text(json.dumps({"train": PreparedDataset(cache_dir, "MES", R, "all").ids}))
    # MES's split is free to change
    idr = str(edit_ckpt(ckpts["a"], tmp_path / "idr.pt", args={"train": ["IDR"]}))
    cases = [
        (["--ckpt", idr, "--test", "MES", "--splits", f"MES={no_test}",
          "--cache", str(tmp_path / "cache2")],
         "no images"),
        (["--ckpt", a, "--test", "XYZ"], "XYZ"),
        (["--ckpt", str(not_ckpt), "--test", "MES"], "notes.pt"),
        (["--ckpt", str(other), "--test", "MES"], "other.pt"),
        (["--ckpt", str(tmp_path / "missing.pt"), "--test", "MES"], "missing.pt"),
    ]
    # in-process: the exception main() lets through is one line naming the input
    for args, needle in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            # later flags win: the empty-split case has its own --cache
            evaluate.main(common + args)
        assert needle in one_line(e)
    for args, needle in cases[2:3]:  # through the command line: one stderr line, no traceback
        r = cli(*args, *common)
        assert r.returncode != 0, args
        assert (r.stderr.strip().startswith("error:")
                and len(r.stderr.strip().splitlines()) == 1), r.stderr
        assert needle in r.stderr


# --------------------------------------------------------------------------------------------------
# Faults: one line naming the flag or file, nothing lost
# --------------------------------------------------------------------------------------------------
def test_out_directory_refused_before_any_work(ckpts, cache_dir, synth_root, tmp_path, monkeypatch):
    counted = []
    monkeypatch.setattr(evaluate, "count_dataset", lambda *a, **k: counted.append(1))
    with pytest.raises(ValueError) as e:
        run_eval([ckpts["a"]], cache_dir, synth_root, out=tmp_path)
    assert "--out" in str(e.value) and str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    # checked first: no work, no orphan .tmp
    assert counted == [] and list(tmp_path.iterdir()) == []


def test_results_merge_by_test_set_and_refuse_other_protocol(ckpts, cache_dir, synth_root,
                                                             tmp_path):
    out = tmp_path / "results.json"
    mes = run_eval([ckpts["a"]], cache_dir, synth_root, tests=("MES",), out=out)["results"]["MES"]
    run_eval([ckpts["a"]], cache_dir, synth_root, tests=("IDR",), out=out)
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == ["IDR", "MES"]  # the earlier test set is kept, canonical order
    assert saved["results"]["MES"]["lesions"]["EX"]["tp"] == mes["lesions"]["EX"]["tp"]
    before = out.read_text()
    # another protocol (TTA) into the same file: refused, file untouched
    with pytest.raises(ValueError) as e:
        run_eval([ckpts["a"]], cache_dir, synth_root, tests=("IDR",), out=out, tta=True)
    assert "--out" in one_line(e) and str(out) in str(e.value)
    with pytest.raises(ValueError):  # other checkpoints likewise
        run_eval([ckpts["b"]], cache_dir, synth_root, tests=("IDR",), out=out)
    assert out.read_text() == before
    out.write_text("{not json")
    with pytest.raises(ValueError) as e:
        run_eval([ckpts["a"]], cache_dir, synth_root, tests=("IDR",), out=out)
    assert str(out) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_without_gpu_is_one_line(ckpts):
    for device, needle in (("cuda", "no CUDA GPU"), ("cuda:3", "no CUDA GPU"),
                           ("gpu0", "not a torch device")):
        with pytest.raises(ValueError) as e:
            evaluate.main(["--ckpt", str(ckpts["a"]), "--test", "MES", "--device", device])
        assert needle in str(e.value) and "--device" in str(e.value) and "\n" not in str(e.value)


def test_ctrl_c_is_one_line(ckpts, cache_dir, synth_root, tmp_path):
    # KeyboardInterrupt raised where the work starts, through the script's own __main__ block
    code = ("import runpy, sys, data\n"
            "def stop(*a, **k): raise KeyboardInterrupt\n"
            "data.prepare_cache = stop\n"
            f"sys.argv = ['evaluate.py', '--ckpt', {str(ckpts['a'])!r}, '--test', 'MES',"
            f" '--device', 'cpu',"
            f" '--data-root', {str(synth_root)!r}, '--cache', {str(cache_dir)!r},"
            f" '--out', {str(tmp_path / 'r.json')!r}]\n"
            "runpy.run_path('evaluate.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and r.stderr.strip().startswith("interrupted"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_results_ap_against_sklearn(ckpts, model_from, cache_dir, single):
    """results.json's floor-free ap: scikit-learn's average precision of the pooled FOV pixels,
    within 1e-3."""
    from sklearn.metrics import average_precision_score

    block = single[0]["results"]["MES"]
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    probs = dataset_probs([model_from(ckpts["a"])], ds)  # (N, 4, R, R)
    masks, fov = dataset_truth(ds)
    checked = 0
    for c, lesion in enumerate(LESIONS):
        y, p = masks[:, c][fov], probs[:, c][fov]
        got = block["lesions"][lesion]["ap"]
        if not y.any():
            assert got is None or math.isnan(got)
            continue
        assert got == pytest.approx(average_precision_score(y, p), abs=1e-3), lesion
        # a weak random model: far below the protocol's floor
        assert got < block["lesions"][lesion]["aupr_floor"]
        checked += 1
    assert checked >= 2 and block["mean_ap"] == pytest.approx(
        np.mean([block["lesions"][k]["ap"] for k in LESIONS if block["lesions"][k]["pos"]]))


def test_non_finite_weights_refused(ckpts, cache_dir, synth_root, tmp_path):
    ck = torch.load(ckpts["a"], weights_only=True)
    key = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][key] = ck["model"][key].clone().fill_(float("nan"))
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, ck)
    with pytest.raises(ValueError) as e:
        evaluate.main(["--ckpt", str(bad), "--test", "MES", "--data-root", str(synth_root),
                       "--cache", str(cache_dir), "--device", "cpu",
                       "--out", str(tmp_path / "r.json")])
    assert "nan.pt" in str(e.value) and "NaN" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r.json").exists()


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: where tqdm draws its bars."""

    def isatty(self):
        return True


def test_progress_bar_per_test_set_only_on_a_terminal(ckpts, cache_dir, synth_root, monkeypatch,
                                                      capsys):
    n = {t: len(PreparedDataset(cache_dir, t, R, "test")) for t in ("IDR", "MES")}
    run_eval([ckpts["a"]], cache_dir, synth_root, tests=("MES", "IDR"), batch=3)
    # captured stderr is no terminal: no bar (logs and tests stay clean)
    assert capsys.readouterr().err == ""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    # as the CLI
    run_eval([ckpts["a"]], cache_dir, synth_root, tests=("MES", "IDR"), batch=3, verbose=True)
    bars = term.getvalue()
    for t in ("IDR", "MES"):  # images of each test set counted to the end, batches of 3 included
        assert f"{t} test: 100%" in bars and f"{n[t]}/{n[t]}" in bars and "image/s" in bars


def test_test_sets_same_list_syntax(monkeypatch, tmp_path):
    """--test IDR,DDR MES, IDR+DDR, 'all', the last one given: the syntax of every dataset-list
    flag (data.flags)."""
    seen = []
    monkeypatch.setattr(evaluate, "read_checkpoint", lambda path: {"args": {}})
    monkeypatch.setattr(evaluate, "evaluate", lambda ckpts, tests, *a, **kw: seen.append(tests))
    for argv, ids in ((["--test", "IDR,DDR", "MES"], ["IDR", "DDR", "MES"]),
                      (["--test", "mes+idr"], ["IDR", "MES"]),
                      (["--test", "MES", "--test", "IDR"], ["IDR"]),
                      ([], ["IDR", "DDR", "FGA", "RET", "MES"]),
                      (["--test", "all"], ["IDR", "DDR", "FGA", "RET", "MES"])):
        evaluate.main(["--ckpt", str(tmp_path / "a.pt"), *argv, "--device", "cpu"])
        assert seen.pop() == ids, argv
    with pytest.raises(ValueError) as e:
        evaluate.main(["--ckpt", str(tmp_path / "a.pt"), "--test", "IDR", "XYZ", "--device", "cpu"])
    assert "--test" in one_line(e) and "'XYZ'" in str(e.value)


# --------------------------------------------------------------------------------------------------
# The results file: written per test set, under a lock, keyed on the weights (issue 23)
# --------------------------------------------------------------------------------------------------
def test_concurrent_evaluations_into_one_out_keep_both_test_sets(ckpts, cache_dir, synth_root,
                                                                 tmp_path, monkeypatch):
    """A second evaluate.py of the same checkpoint writes DDR into --out while the first scores
    IDR: both stay (the merge reads the file when it writes, not when it starts)."""
    out = tmp_path / "results.json"
    real, nested = evaluate.count_dataset, []

    def count_and_meanwhile(*a, **kw):
        # during the first run's first test set, a whole second run on another test set
        if not nested:
            nested.append(1)
            run_eval([ckpts["a"]], cache_dir, synth_root, tests=("DDR",), out=out)
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "count_dataset", count_and_meanwhile)
    run_eval([ckpts["a"]], cache_dir, synth_root, tests=("IDR",), out=out)
    assert list(json.loads(out.read_text())["results"]) == ["IDR", "DDR"]


def test_results_merge_waits_for_the_lock(ckpts, cache_dir, synth_root, tmp_path):
    """merge_results reads, merges and writes under the lock beside --out: a writer that holds
    the lock (another evaluate.py) is waited for, and its test set kept."""
    import threading

    out = tmp_path / "results.json"
    report = run_eval([ckpts["a"]], cache_dir, synth_root, tests=("MES",), out=out)
    header = {k: v for k, v in report.items() if k != "results"}
    held, release = threading.Event(), threading.Event()

    def other_writer():
        with utils.locked(out.with_name(f".{out.name}.lock")):
            held.set()
            release.wait(5)
            saved = json.loads(out.read_text())
            saved["results"]["IDR"] = saved["results"]["MES"]  # another process's test set
            out.write_text(json.dumps(saved))

    t = threading.Thread(target=other_writer)
    t.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()  # the merge below must wait for this
    evaluate.merge_results(out, header, "DDR", report["results"]["MES"])
    t.join()
    assert sorted(json.loads(out.read_text())["results"]) == ["DDR", "IDR", "MES"]


def test_out_that_cannot_be_written_is_one_line_before_any_work(ckpts, cache_dir, synth_root,
                                                                tmp_path, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    counted = []
    monkeypatch.setattr(evaluate, "count_dataset", lambda *a, **k: counted.append(1))
    with pytest.raises(ValueError) as e:
        run_eval([ckpts["a"]], cache_dir, synth_root, out=blocker / "results.json")
    assert str(e.value).startswith(f"--out {blocker}") and "\n" not in str(e.value)
    assert counted == [] and blocker.read_text() == "keep me"


def test_out_on_a_full_disk_is_one_line_before_any_work(ckpts, cache_dir, synth_root, tmp_path,
                                                        monkeypatch):
    # a full disk: every write of more than a few bytes fails with ENOSPC, as on a full device
    real_write = Path.write_bytes

    def full(self, data):
        if len(data) > 64:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    counted = []
    monkeypatch.setattr(evaluate, "count_dataset", lambda *a, **k: counted.append(1))
    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "full" / "results.json"
    with pytest.raises(ValueError) as e:
        run_eval([ckpts["a"]], cache_dir, synth_root, out=out)
    msg = str(e.value)
    assert msg.startswith(f"--out {out.parent}") and "No space left" in msg and "\n" not in msg, msg
    assert counted == [] and not out.exists() and list(out.parent.iterdir()) == []


def test_ctrl_c_keeps_the_finished_test_sets_and_says_so(ckpts, cache_dir, synth_root, tmp_path):
    # Ctrl-C while the second of two test sets is prepared, through the script's own __main__ block
    out = tmp_path / "r.json"
    code = ("import runpy, sys, data\n"
            "real, calls = data.prepare_cache, []\n"
            "def stop(*a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2: raise KeyboardInterrupt\n"
            "    return real(*a, **k)\n"
            "data.prepare_cache = stop\n"
            f"sys.argv = ['evaluate.py', '--ckpt', {str(ckpts['a'])!r}, '--test', 'IDR,MES',"
            f" '--device', 'cpu', '--data-root', {str(synth_root)!r},"
            f" '--cache', {str(cache_dir)!r}, '--out', {str(out)!r}]\n"
            "runpy.run_path('evaluate.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 130 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # what was lost, what was kept
    assert "test set MES" in r.stderr and f"IDR written to {out}" in r.stderr
    assert list(json.loads(out.read_text())["results"]) == ["IDR"]


def test_results_are_keyed_on_the_weights_not_the_path(ckpts, cache_dir, synth_root, tmp_path,
                                                       monkeypatch):
    import shutil

    ckpt = tmp_path / "best.pt"
    shutil.copy(ckpts["a"], ckpt)
    out = tmp_path / "results.json"
    run_eval([ckpt], cache_dir, synth_root, tests=("MES",), out=out)
    monkeypatch.chdir(tmp_path)  # the same file by a relative path: the same weights, merged
    run_eval(["best.pt"], cache_dir, synth_root, tests=("IDR",), out=out)
    assert list(json.loads(out.read_text())["results"]) == ["IDR", "MES"]
    before = out.read_text()
    shutil.copy(ckpts["b"], ckpt)  # best.pt replaced (a run extended with a larger --iters)
    with pytest.raises(ValueError) as e:
        run_eval([ckpt], cache_dir, synth_root, tests=("DDR",), out=out)
    assert "other weights" in str(e.value) and str(out) in str(e.value) and "\n" not in str(e.value)
    assert out.read_text() == before
    legacy = json.loads(before)
    # written by an older evaluate.py: can't be told to be of these weights
    del legacy["fingerprint"]
    out.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="fingerprint"):
        run_eval([ckpt], cache_dir, synth_root, tests=("DDR",), out=out)


# --------------------------------------------------------------------------------------------------
# Silently wrong results, refused (issue 23)
# --------------------------------------------------------------------------------------------------
def test_ensemble_of_members_at_other_resolutions_is_refused(ckpts, edit_ckpt, cache_dir,
                                                             synth_root, tmp_path):
    low = edit_ckpt(ckpts["b"], tmp_path / "low.pt", args={"resolution": 64},
                    cfg={"resolution": 64})
    for order in ([ckpts["a"], low], [low, ckpts["a"]]):
        with pytest.raises(ValueError) as e:
            run_eval(order, cache_dir, synth_root)
        assert "different resolutions" in str(e.value) and "low.pt at 64 px" in str(e.value)
        assert "--resolution" in str(e.value) and "\n" not in str(e.value)
    # an explicit resolution runs every member at it: the member order no longer matters
    a = run_eval([ckpts["a"], low], cache_dir, synth_root, resolution=R)["results"]["MES"]
    b = run_eval([low, ckpts["a"]], cache_dir, synth_root, resolution=R)["results"]["MES"]
    assert a["lesions"]["EX"]["pos"] == b["lesions"]["EX"]["pos"]
    for lesion in LESIONS:
        ta, tb = np.array(a["lesions"][lesion]["tp"]), np.array(b["lesions"][lesion]["tp"])
        # the mean in another order: the same counts
        assert np.abs(ta - tb).max() <= 0.001 * max(ta.max(), 1)


def test_checkpoint_resolution_that_is_no_number_is_one_line(ckpts, edit_ckpt, cache_dir,
                                                             synth_root, tmp_path):
    bad = edit_ckpt(ckpts["a"], tmp_path / "abc.pt", args={"resolution": "abc"},
                    cfg={"resolution": "abc"})
    with pytest.raises(ValueError) as e:
        run_eval([bad], cache_dir, synth_root)
    assert ("abc.pt" in str(e.value) and "resolution 'abc'" in str(e.value)
            and "\n" not in str(e.value))


def test_split_flags_other_than_the_runs_are_refused_for_its_training_sets(ckpts, cache_dir,
                                                                           synth_root, tmp_path,
                                                                           monkeypatch):
    """ckpts were trained on MES (paper split, seed 0): another --split-seed re-draws MES's test
    split and would score training images; a test set the run did not train on is scored, its
    split seed recorded."""
    common = ["--ckpt", str(ckpts["a"]), "--data-root", str(synth_root), "--cache", str(cache_dir),
              "--device", "cpu"]
    for extra, flag in ((["--split-seed", "1"], "--split-seed 1"),
                        (["--split-protocol", "authors"], "--split-protocol authors"),
                        (["--splits", "MES=official"], "--splits MES=official")):
        with pytest.raises(ValueError) as e:
            evaluate.main(common + ["--test", "MES", "--out", str(tmp_path / "r.json")] + extra)
        assert (str(e.value).startswith(flag) and "training images" in str(e.value)
                and "\n" not in str(e.value))
    assert not (tmp_path / "r.json").exists()
    seen = []
    # where: its options
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: seen.append(a[2][2]))
    evaluate.main(common + ["--test", "IDR", "--split-seed", "1",
                            "--out", str(tmp_path / "r.json")])
    assert seen[0]["split_seed"] == 1
    protocol = evaluate.make_protocol(R, LESIONS, seen[0])
    assert protocol["split_seed"] == 1 and protocol["split_protocol"] == "paper"


def test_recorded_cache_of_another_machine_is_not_written(ckpts, edit_ckpt, cache_dir, synth_root,
                                                          tmp_path, monkeypatch):
    """A checkpoint records the --cache of the machine it was trained on; evaluate.py without
    --cache uses it only where a prepared cache already is, never creating the folder a received
    file names."""
    elsewhere = tmp_path / "their" / "cache"
    foreign = edit_ckpt(ckpts["a"], tmp_path / "foreign.pt", args={"cache": str(elsewhere),
                                                                    "data_root": "/nonexistent"})
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--ckpt", str(foreign), "--test", "MES", "--data-root", str(synth_root),
                   "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "their").exists() and (tmp_path / "cache" / "MES").is_dir()
    # this machine's: used
    own = edit_ckpt(ckpts["a"], tmp_path / "own.pt", args={"cache": str(cache_dir)})
    _, cache, _ = evaluate.data.data_settings(*_parsed(["--ckpt", str(own)]),
                                              torch.load(own)["args"])
    assert cache == str(cache_dir)


def _parsed(argv):
    import argparse

    p = argparse.ArgumentParser()
    evaluate.data.add_data_args(p)
    args, _ = p.parse_known_args(argv)
    return args, p


def test_images_are_predict_pys_in_one_line(ckpts, fundus_jpeg, tmp_path):
    """evaluate.py --images (the flag before predict.py had it) ends in one line naming
    predict.py and the folder, before any work."""
    photos = tmp_path / "photos"
    photos.mkdir()
    fundus_jpeg(photos / "eye.jpg", 160, 120)
    for extra in ([], ["--out", str(tmp_path / "x.json")], ["--save-maps", str(tmp_path / "m")]):
        with pytest.raises(ValueError) as e:
            evaluate.main(["--ckpt", str(ckpts["a"]), "--images", str(photos), "--device", "cpu",
                           *extra])
        assert "predict.py" in one_line(e) and str(photos) in str(e.value)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "m").exists()


def test_bad_checkpoint_contents_are_one_line(ckpts, tmp_path):
    ck = torch.load(ckpts["a"], weights_only=True)
    cases = {"tensor.pt": {**ck, "model": torch.zeros(3)},
             "int.pt": {**ck, "model": {**ck["model"], "head.weight": 3}}}
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        r = cli("--ckpt", tmp_path / name, "--test", "MES", "--device", "cpu")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().startswith("error:") and name in r.stderr and "'model'" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    run = tmp_path / "runs" / "IDR" / "s0"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes((ckpts["a"]).read_bytes())
    with pytest.raises(ValueError) as e:
        evaluate.main(["--ckpt", str(run), "--test", "MES", "--device", "cpu"])
    assert str(run / "best.pt") in one_line(e)  # the file to pass instead


# --------------------------------------------------------------------------------------------------
# --lesions: the lesions a checkpoint was trained on are scored, the others counted only
# --------------------------------------------------------------------------------------------------
def test_evaluate_scores_the_checkpoint_lesions(he_run, synth_root, cache_dir, tmp_path):
    out, _ = he_run
    where = (synth_root, cache_dir, None)
    report = evaluate.evaluate([out / "best.pt"], "IDR", where, device="cpu",
                               out=tmp_path / "r.json", verbose=False)
    assert report["protocol"]["lesions"] == ["HE"]
    block = report["results"]["IDR"]
    assert block["mean_dice"] == block["lesions"]["HE"]["dice"]
    assert block["mean_ap"] == block["lesions"]["HE"]["ap"]
    # counted, not scored
    assert math.isnan(block["lesions"]["EX"]["dice"]) and block["lesions"]["EX"]["pos"] > 0
    # a lesion the checkpoint was not trained on: its channel is an untrained head, refused
    with pytest.raises(ValueError) as err:
        evaluate.evaluate([out / "best.pt"], "IDR", where, device="cpu", verbose=False,
                          lesions=LESIONS)
    assert one_line(err) == f"--lesions EX,MA,CWS: {out / 'best.pt'} was trained on HE only"
    same = evaluate.evaluate([out / "best.pt"], "IDR", where, device="cpu", verbose=False,
                             lesions="he")
    assert same["results"]["IDR"]["lesions"]["HE"]["tp"] == block["lesions"]["HE"]["tp"]


# --------------------------------------------------------------------------------------------------
# --style: style-conditioned models
# --------------------------------------------------------------------------------------------------
def test_evaluate_style_refusals_are_one_line_before_any_work(style_net, style_checkpoint,
                                                              tmp_path):
    plain = style_checkpoint(tmp_path / "plain.pt", style_net())
    cond = style_checkpoint(tmp_path / "cond.pt", style_net(style_tokens=("fine", "coarse")))
    nowhere = ["--test", "IDR", "--data-root", str(tmp_path / "no-data"),
               "--cache", str(tmp_path / "no-cache"), "--device", "cpu"]
    with pytest.raises(ValueError) as err:
        evaluate.main(["--ckpt", str(plain), "--style", "fine", *nowhere])
    assert one_line(err).startswith("--style fine") and "not style-conditioned" in str(err.value)
    with pytest.raises(ValueError) as err:
        evaluate.main(["--ckpt", str(cond), "--style", "mixed", *nowhere])
    # the model's styles
    assert one_line(err).startswith("--style mixed") and "fine, coarse" in str(err.value)
    with pytest.raises(ValueError) as err:  # an ensemble with an unconditioned member
        evaluate.main(["--ckpt", str(cond), str(plain), "--style", "coarse", *nowhere])
    assert "not style-conditioned" in one_line(err)
    assert not (tmp_path / "no-cache").exists()


def test_evaluate_counts_at_the_requested_style(style_net, randomize_films, style_checkpoint,
                                                synth_root, tmp_path):
    from data import prepare_cache

    net = randomize_films(style_net(5, style_tokens=("fine", "coarse")), 5).eval()
    path = style_checkpoint(tmp_path / "cond.pt", net)
    prepare_cache("IDR", synth_root, tmp_path / "cache", 64, verbose=False)
    ds = PreparedDataset(tmp_path / "cache", "IDR", 64, "test")
    where = (synth_root, tmp_path / "cache", None)
    counted = {}
    for s in ("fine", "coarse"):
        report = evaluate.evaluate(path, "IDR", where, device="cpu", style=s, verbose=False)
        assert report["protocol"]["style"] == s
        # brute force: the model at that style, thresholded
        # at 0.5 inside the FOV, pooled over the test images
        tp = np.zeros(4, np.int64)
        for i in range(len(ds)):
            item = ds[i]
            # contiguous NCHW, as evaluate feeds it: the same
            # float32 sums (channels_last kernels round otherwise)
            x = torch.from_numpy(item["image"]).permute(2, 0, 1)[None].contiguous().float() / 255
            with torch.no_grad():
                p = torch.sigmoid(net(x, style=s))[0].numpy()  # (4, R, R)
            tp += ((p >= 0.5) & item["masks"] & item["fov"][None]).sum((1, 2))
        counted[s] = [b["tp"][5] for b in report["results"]["IDR"]["lesions"].values()]
        assert counted[s] == tp.tolist(), s
    assert counted["fine"] != counted["coarse"]
    plain = evaluate.evaluate(style_checkpoint(tmp_path / "plain.pt", style_net()), "IDR", where,
                              device="cpu", verbose=False)
    # unconditioned: the protocol block of older results files
    assert "style" not in plain["protocol"]


def test_lesions_a_test_set_does_not_annotate_are_not_scored(ckpts, model_from, generic_dataset,
                                                              tmp_path, capsys, edit_ckpt):
    """A dataset of one's own annotating EX and HE only (issue 25): MA and CWS are not scored (NaN,
    out of the means, said so under the table), not scored as lesions absent from every image; EX
    and HE are counted as by brute force."""
    root = generic_dataset(("EX", "HE"))
    stems = sorted(p.stem for p in (root / "images").iterdir())
    (root / "splits.json").write_text(json.dumps({"train": stems[:2], "test": stems[2:]}))
    cache = tmp_path / "cache"
    res = evaluate.evaluate([str(ckpts["a"])], ["ABC"], (tmp_path, cache, {"roots": {"ABC": root}}),
                            device="cpu", verbose=True)
    block = res["results"]["ABC"]
    assert block["n_images"] == 4 and block["not_annotated"] == {"MA": 4, "CWS": 4}
    ds = PreparedDataset(cache, "ABC", R, "test")
    probs = dataset_probs([model_from(ckpts["a"])], ds)
    masks, roi = dataset_truth(ds)
    tp, fp, pos = brute_counts(probs, masks, roi)
    for c, lesion in enumerate(LESIONS):
        got = block["lesions"][lesion]
        if lesion in ("EX", "HE"):
            aupr, dice = ref_metrics(tp[c], fp[c], pos[c])
            assert pos[c] > 0 and got["tp"] == tp[c].tolist() and got["pos"] == int(pos[c])
            assert (got["aupr"] == pytest.approx(aupr, rel=1e-12)
                    and got["dice"] == pytest.approx(dice))
        else:
            assert got["pos"] == 0 and math.isnan(got["aupr"]) and math.isnan(got["dice"])
    assert block["mean_aupr"] == pytest.approx((block["lesions"]["EX"]["aupr"]
                                                + block["lesions"]["HE"]["aupr"]) / 2)
    out = capsys.readouterr().out
    assert "not annotated in this test set (MA, CWS)" in out and "absent from" not in out
    # evaluate.py of a run that recorded --root ABC=DIR: the run's folder, without --root again
    ran = edit_ckpt(ckpts["a"], tmp_path / "abc.pt", args={"root": [f"ABC={root}"]})
    common = ["--ckpt", str(ran), "--data-root", str(tmp_path), "--cache", str(cache),
              "--device", "cpu", "--out", str(tmp_path / "abc.json")]
    evaluate.main([*common, "--test", "ABC"])
    again = json.loads((tmp_path / "abc.json").read_text())["results"]["ABC"]
    assert again["lesions"]["EX"]["tp"] == block["lesions"]["EX"]["tp"]
    with pytest.raises(ValueError) as err:  # an ID with no folder anywhere: most likely a typo
        evaluate.main([*common, "--test", "ABX"])
    assert one_line(err).startswith("--test: unknown dataset ID 'ABX'")
    # scored again from another folder under the same ID: replaced, with a note naming both;
    # the header's --root pairs keep the other test sets' folders
    other = generic_dataset(("EX", "HE"), folder="ABC2")
    (other / "splits.json").write_text((root / "splits.json").read_text())
    header = json.loads((tmp_path / "abc.json").read_text())
    (tmp_path / "abc.json").write_text(json.dumps({**header, "root": [f"ABC={root}", "IDR=/x"]}))
    capsys.readouterr()
    evaluate.main([*common, "--test", "ABC", "--root", f"ABC={other}"])
    assert f"note: ABC in {tmp_path / 'abc.json'} was scored on {root}; its scores are replaced " \
           f"by those on {other}" in capsys.readouterr().out
    assert json.loads((tmp_path / "abc.json").read_text())["root"] == ["IDR=/x", f"ABC={other}"]


# --------------------------------------------------------------------------------------------------
# Per image scores (issue 26): the failure cases
# --------------------------------------------------------------------------------------------------
def numpy_dice(hit, y):
    """Dice at p >= 0.5 of one image's FOV pixels, None for 0 / 0."""
    denom = 2 * (hit & y).sum() + (hit & ~y).sum() + (~hit & y).sum()
    return None if denom == 0 else 2 * (hit & y).sum() / denom


def test_per_image_scores_against_numpy_and_sklearn(ckpts, model_from, cache_dir, single):
    """results' "images": per test image and lesion, the lesion's pixels, Dice at p >= 0.5 against
    the numpy formula, and AP against sklearn's average_precision_score of the probabilities binned
    as the protocol's AP curve is (thresholds j / 1024: a pixel's score is floor(1024 p), at most
    1023), on the image's FOV pixels. The pooled block is the per-image counts summed."""
    from sklearn.metrics import average_precision_score

    block = single[0]["results"]["MES"]
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    probs = dataset_probs([model_from(ckpts["a"])], ds)  # (N, 4, R, R)
    masks, fov = dataset_truth(ds)
    assert list(block["images"]) == ds.ids
    checked = {"ap": 0, "dice": 0, "no ap": 0, "no dice": 0}
    for i, image_id in enumerate(ds.ids):
        for c, lesion in enumerate(LESIONS):
            got = block["images"][image_id][lesion]
            y, p = masks[i, c][fov[i]], probs[i, c][fov[i]]
            hit = p >= 0.5
            assert (got["pos"], got["predicted"]) == (y.sum(), hit.sum()), (image_id, lesion)
            want = numpy_dice(hit, y)
            if want is None:
                assert got["dice"] is None
                checked["no dice"] += 1
            else:
                assert got["dice"] == pytest.approx(want, abs=1e-12), (image_id, lesion)
                checked["dice"] += 1
            if not y.any():
                assert got["ap"] is None
                checked["no ap"] += 1
                continue
            score = np.minimum(np.floor(p.astype(np.float64) * 1024), 1023)
            assert got["ap"] == pytest.approx(average_precision_score(y, score), abs=1e-9)
            checked["ap"] += 1
    assert min(checked.values()) >= 1, checked  # every case met
    for lesion in LESIONS:
        assert sum(s[lesion]["pos"] for s in block["images"].values()) == \
            block["lesions"][lesion]["pos"]


def test_worst_images_listed_and_maps_limited_to_them(ckpts, model_from, cache_dir, synth_root,
                                                     tmp_path, capsys):
    """The summary names the lowest-Dice images per lesion (numpy's Dice), and --maps-worst 1
    writes the maps of the worst image only."""
    res = run_eval([ckpts["a"]], cache_dir, synth_root, maps_dir=tmp_path, maps_worst=1,
                   lesions=["HE"])
    block = res["results"]["MES"]
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    probs = dataset_probs([model_from(ckpts["a"])], ds)
    masks, fov = dataset_truth(ds)
    c = LESIONS.index("HE")
    dice = {x: numpy_dice(probs[i, c][fov[i]] >= 0.5, masks[i, c][fov[i]])
            for i, x in enumerate(ds.ids)}
    worst = evaluate.worst_images(block["images"], "HE", 2)
    assert [dice[x] for x, _ in worst] == sorted(v for v in dice.values() if v is not None)[:2]
    assert {p.name.split("_HE")[0] for p in (tmp_path / "MES").glob("*_HE.png")} == {worst[0][0]}
    assert all(set(s) == {"HE"} for s in block["images"].values())  # only the lesions scored
    evaluate.print_worst(block, ["HE"], 2)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.split()[:2] == ["HE", worst[0][0]] and worst[1][0] in line


def test_maps_worst_without_save_maps_is_one_line(ckpts):
    r = cli("--ckpt", ckpts["a"], "--test", "MES", "--maps-worst", "2", "--device", "cpu")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --maps-worst 2 chooses which maps --save-maps writes: pass --save-maps DIR too"]
