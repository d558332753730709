"""bench/real.py: the real-lesions check (issues 18, 25), its no-learning baseline, its recipe's
flags (model.local_contrast itself: tests/test_model.py)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from PIL import Image

import data

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real", ROOT / "bench" / "real.py")
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)


@pytest.fixture(scope="module")
def fixture_cache(fixture_idrid, tmp_path_factory):
    cache = tmp_path_factory.mktemp("4l14") / "cache"
    data.prepare_cache("IDR", fixture_idrid, cache, 128, roots={"IDR": fixture_idrid},
                       split_files={"IDR": str(fixture_idrid / "split.json")}, verbose=False)
    return cache


def test_split_file_covers_the_fixture_once(fixture_idrid):
    split = json.loads((fixture_idrid / "split.json").read_text())
    ids = [s.id for s in data.datasets.list_samples("IDR", fixture_idrid)]
    members = [x for v in split.values() for x in v]
    assert sorted(members) == sorted(ids) and len(set(members)) == 14
    assert {k: len(v) for k, v in split.items()} == {"train": 8, "val": 2, "test": 4}


def test_fixture_has_all_four_lesions(fixture_cache):
    """Every lesion has pixels in the training and the held-out photographs (SE only in 03, 08, 14,
    17: README.md), so every one of them is trained and scored."""
    for split in ("train", "test"):
        ds = data.PreparedDataset(fixture_cache, "IDR", 128, split)
        masks = np.stack([ds[i]["masks"] for i in range(len(ds))])  # (N, 4, R, R)
        assert masks.any(axis=(0, 2, 3)).all(), split
        assert all(ds.annotated(i).all() for i in range(len(ds)))


def test_baseline_ap_equals_sklearn(fixture_cache):
    # sklearn's exact AP on the scores quantized to the
    # 1024 bins equals the binned AP (thresholds j/1024)
    ds = data.PreparedDataset(fixture_cache, "IDR", 128, "test")
    ap, prevalence = real.lesion_aps(ds, lambda it: real.baseline(it["image"], it["fov"]))
    for c, lesion in enumerate(data.LESIONS):
        scores, labels = [], []
        for i in range(len(ds)):
            it = ds[i]
            g = it["image"][..., 1].astype(np.float64)
            med = np.median(g[it["fov"]])
            # the cue written out: darker (HE, MA) or brighter (EX, CWS) than the fundus median
            cue = (med - g) / med if lesion in ("HE", "MA") else (g - med) / (255 - med)
            s = np.clip(cue, 0, 1).astype(np.float32)
            scores.append(np.floor(s[it["fov"]].astype(np.float64) * 1024))
            labels.append(it["masks"][c][it["fov"]])
        scores, labels = np.concatenate(scores), np.concatenate(labels)
        assert prevalence[c] == pytest.approx(labels.mean()), lesion
        assert ap[c] == pytest.approx(average_precision_score(labels, scores), abs=1e-9), lesion
    # haemorrhages are darker, exudates brighter than the fundus: real baselines
    assert ap[1] > 2 * prevalence[1] and ap[0] > 2 * prevalence[0]


def test_real_end_to_end(fixture_idrid, tmp_path, capsys):
    tiny = ["--encoder", "test_resnet", "--decoder-channels", "16,8,8,8,8", "--patch", "64",
            "--batch", "2", "--iters", "2", "--val-every", "1", "--local-contrast", "2"]
    report = real.main(["--out", str(tmp_path), "--resolution", "128", "--", *tiny])
    saved = json.loads((tmp_path / "real.json").read_text())
    assert saved["flags"] == real.merged_flags(real.RECIPE, tiny)
    assert saved["train"]["n_images"] == 8 and saved["test"]["n_images"] == 4
    for split in ("train", "test"):
        assert all(0 <= a <= 1 for a in report[split]["ap"])
        assert report[split]["baseline_ap"] == saved[split]["baseline_ap"]
    # the targets, recomputed from the numbers
    t = saved["test"]
    for k, lesion in enumerate(data.LESIONS):
        want = t["ap"][k] > t["baseline_ap"][k] and t["ap"][k] >= 5 * t["prevalence"][k] and (
            lesion != "EX" or t["ap"][k] >= 0.6)
        assert saved["targets_met"][lesion] == want
    figure = np.asarray(Image.open(tmp_path / "heldout.png"))
    assert figure.ndim == 3 and figure.shape[0] > 4 * 100  # four held-out panels, stacked
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["lesions"] == list(data.LESIONS) and args["local_contrast"] == 2
    assert args["lesion_weights"] == [1.0, 1.0, 4.0, 1.0]
    out = capsys.readouterr().out
    assert out.count("held-out") >= 4 and "target (held-out)" in out


# ----------------------------------------------------------------------------- the recipe's flags
@pytest.mark.parametrize("flags, names", [
    (["--local-contrast", "-1"], ("--local-contrast", "-1")),
    (["--local-contrast", "nan"], ("--local-contrast", "nan")),
    (["--lesions", "HE,SE"], ("--lesions", "'SE'")),
    (["--lesion-weights", "SE=4"], ("--lesion-weights", "SE=4"))])
def test_bad_recipe_flags_are_one_line_errors(flags, names):
    import train

    with pytest.raises(ValueError) as e:
        train.parse_args(["--train", "IDR", "--device", "cpu", *flags])
    msg = str(e.value)  # the flag and the value refused
    assert all(n in msg for n in names) and "\n" not in msg, msg


def test_recorded_flags_are_the_ones_train_py_used():
    """The demo's `-- --iters 150` replaces the recipe's --iters 400 in real.json, and train.py
    agrees."""
    import train

    extra = ["--iters", "150", "--val-every=25", "--channels-last"]
    used = real.merged_flags(real.RECIPE, extra)
    assert used.count("--iters") == 1 and used[used.index("--iters") + 1] == "150"
    # new flags last
    assert "--val-every" not in used and "--val-every=25" in used and used[-1] == "--channels-last"
    assert used[:2] == ["--encoder", "resnet18"]  # the recipe's order kept
    a, b = (train.parse_args(f + ["--train", "IDR"]) for f in (real.RECIPE + extra, used))
    assert vars(a) == vars(b)
    # one destination, two spellings: the last one given wins, in the recipe's place
    switch = real.merged_flags(real.RECIPE, ["--pretrained", "--no-pretrained"])
    assert switch.count("--no-pretrained") == 1 and "--pretrained" not in switch
    # abbreviated as argparse allows: still one --iters
    short = real.merged_flags(real.RECIPE, ["--iter", "2"])
    assert "--iters" not in short and short[short.index("--iter") + 1] == "2"
    # flags train.py collects are all kept
    thresholds = ["--mask-threshold", "IDR=0.5", "--mask-threshold", "DDR=0.3"]
    assert real.merged_flags(real.RECIPE, thresholds)[-4:] == thresholds
    # the recipe at another resolution: its --local-contrast sigma (16 px at 1024) scales with it
    assert real.recipe(1024) == real.RECIPE
    at512 = real.recipe(512, ["--iters", "100"])
    assert (at512[at512.index("--local-contrast") + 1] == "8"
            and at512.count("--local-contrast") == 1)
    assert at512 == real.merged_flags(real.RECIPE, ["--local-contrast", "8", "--iters", "100"])


@pytest.mark.parametrize("extra, flag", [(["--resolution=256"], "--resolution"),
                                         (["--ou", "x"], "--out"), (["--cach=y"], "--cache"),
                                         (["--train", "DDR"], "--train")])
def test_flags_real_sets_itself_are_refused_after_the_separator(extra, flag, tmp_path, capsys):
    """Spelled out, with =, or abbreviated as argparse allows: refused before any work is done."""
    with pytest.raises(ValueError) as err:  # utils.run prints it as one error: line
        real.main(["--out", str(tmp_path / "r"), "--", *extra])
    assert f"{flag} after `--`: real.py sets it itself" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_real_styles_end_to_end(tmp_path):
    """bench/real_styles.py: FIN (fine) and CRS (coarsened) copies, three runs scored on FIN's
    held-out photographs, and characterize.py telling the copies' styles apart."""
    sys.path.insert(0, str(ROOT / "bench"))  # real_styles imports bench/real.py, as when run
    spec = importlib.util.spec_from_file_location("real_styles", ROOT / "bench" / "real_styles.py")
    real_styles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_styles)
    tiny = ["--encoder", "test_resnet", "--decoder-channels", "16,8,8,8,8", "--patch", "64",
            "--batch", "2", "--iters", "2", "--val-every", "1"]
    report = real_styles.main(["--out", str(tmp_path), "--resolution", "128", "--", *tiny])
    assert report["styles"] == {"FIN": "fine", "CRS": "coarse"}
    assert set(report["runs"]) == {"FIN", "FIN+CRS", "CRS"} and report["n_test"] == 4
    split = json.loads((ROOT / "tests" / "fixtures" / "idrid-4l14" / "split.json").read_text())
    fin = json.loads((tmp_path / "FIN" / "splits.json").read_text())
    crs = json.loads((tmp_path / "CRS" / "splits.json").read_text())
    assert sorted(fin["train"] + crs["train"]) == sorted(split["train"])  # the halves
    assert fin["test"] == crs["test"] == split["test"] and fin["val"] == split["val"]
    args = json.loads((tmp_path / "runs" / "FIN+CRS" / "s0" / "args.json").read_text())
    assert args["train"] == ["CRS", "FIN"] and args["local_contrast"] == 2  # 16 px at 1024 -> 128
    for combo, run in report["runs"].items():
        res = json.loads((tmp_path / "runs" / combo / "s0" / "best.pt").with_name("args.json")
                         .read_text())
        assert res["resolution"] == 128
        assert all(0 <= run["scores"][les]["ap"] <= 1 for les in data.LESIONS)
    assert json.loads((tmp_path / "table3.json").read_text())["runs"] == report["runs"]
