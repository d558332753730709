"""bench/real_he.py: the real-HE check (issue 18), its darkness baseline, its recipe's flags
(model.local_contrast itself: tests/test_model.py)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import data

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real_he", ROOT / "bench" / "real_he.py")
real_he = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_he)
HE = data.LESIONS.index("HE")


@pytest.fixture(scope="module")
def fixture_cache(fixture_idrid, tmp_path_factory):
    cache = tmp_path_factory.mktemp("he14") / "cache"
    data.prepare_cache("IDR", fixture_idrid, cache, 128, roots={"IDR": fixture_idrid},
                       split_files={"IDR": str(fixture_idrid / "split.json")}, verbose=False)
    return cache


def test_split_file_covers_the_fixture_once(fixture_idrid):
    split = json.loads((fixture_idrid / "split.json").read_text())
    ids = [s.id for s in data.datasets.list_samples("IDR", fixture_idrid)]
    members = [x for v in split.values() for x in v]
    assert sorted(members) == sorted(ids) and len(set(members)) == 14
    assert {k: len(v) for k, v in split.items()} == {"train": 8, "val": 2, "test": 4}


def test_darkness_baseline_ap_equals_sklearn(fixture_cache):
    # sklearn's exact AP on the scores quantized to the 1024 bins equals the binned AP (thresholds j/1024)
    ds = data.PreparedDataset(fixture_cache, "IDR", 128, "test")
    ap, prevalence = real_he.he_ap(ds, lambda it: real_he.darkness(it["image"], it["fov"]))
    scores, labels = [], []
    for i in range(len(ds)):
        it = ds[i]
        s = real_he.darkness(it["image"], it["fov"]).astype(np.float32)
        scores.append(np.floor(s[it["fov"]].astype(np.float64) * 1024)), labels.append(it["masks"][HE][it["fov"]])
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    assert prevalence == pytest.approx(labels.mean())
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert ap > 2 * prevalence  # haemorrhages are darker than the fundus: the baseline is a real one


def test_real_he_end_to_end(fixture_idrid, tmp_path):
    tiny = ["--encoder", "test_resnet", "--decoder-channels", "16,8,8,8,8", "--patch", "64", "--batch", "2",
            "--iters", "2", "--val-every", "1", "--local-contrast", "2"]
    report = real_he.main(["--out", str(tmp_path), "--resolution", "128", "--", *tiny])
    saved = json.loads((tmp_path / "real_he.json").read_text())
    assert saved["flags"] == real_he.merged_flags(real_he.RECIPE, tiny)
    assert saved["train"]["n_images"] == 8 and saved["test"]["n_images"] == 4
    for split in ("train", "test"):
        assert 0 <= report[split]["ap"] <= 1 and report[split]["baseline_ap"] == saved[split]["baseline_ap"]
    assert (tmp_path / "heldout.png").stat().st_size > 10_000
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["lesions"] == ["HE"] and args["local_contrast"] == 2


# ----------------------------------------------------------------------------- the recipe's flags
@pytest.mark.parametrize("flags, names", [
    (["--local-contrast", "-1"], ("--local-contrast", "-1")),
    (["--local-contrast", "nan"], ("--local-contrast", "nan")),
    (["--lesions", "HE,SE"], ("--lesions", "'SE'"))])
def test_bad_recipe_flags_are_one_line_errors(flags, names):
    import train

    with pytest.raises(ValueError) as e:
        train.parse_args(["--train", "IDR", "--device", "cpu", *flags])
    msg = str(e.value)  # the flag and the value refused
    assert all(n in msg for n in names) and "\n" not in msg, msg


def test_recorded_flags_are_the_ones_train_py_used():
    """The demo's `-- --iters 150` replaces the recipe's --iters 400 in real_he.json, and train.py agrees."""
    import train

    extra = ["--iters", "150", "--val-every=25", "--channels-last"]
    used = real_he.merged_flags(real_he.RECIPE, extra)
    assert used.count("--iters") == 1 and used[used.index("--iters") + 1] == "150"
    assert "--val-every" not in used and "--val-every=25" in used and used[-1] == "--channels-last"  # new flags last
    assert used[:2] == ["--encoder", "resnet18"]  # the recipe's order kept
    a, b = (train.parse_args(f + ["--train", "IDR"]) for f in (real_he.RECIPE + extra, used))
    assert vars(a) == vars(b)
    # one destination, two spellings: the last one given wins, in the recipe's place
    switch = real_he.merged_flags(real_he.RECIPE, ["--pretrained", "--no-pretrained"])
    assert switch.count("--no-pretrained") == 1 and "--pretrained" not in switch
    # abbreviated as argparse allows: still one --iters
    short = real_he.merged_flags(real_he.RECIPE, ["--iter", "2"])
    assert "--iters" not in short and short[short.index("--iter") + 1] == "2"
    # flags train.py collects are all kept
    thresholds = ["--mask-threshold", "IDR=0.5", "--mask-threshold", "DDR=0.3"]
    assert real_he.merged_flags(real_he.RECIPE, thresholds)[-4:] == thresholds


@pytest.mark.parametrize("extra, flag", [(["--resolution=256"], "--resolution"), (["--ou", "x"], "--out"),
                                         (["--cach=y"], "--cache"), (["--train", "DDR"], "--train")])
def test_flags_real_he_sets_itself_are_refused_after_the_separator(extra, flag, tmp_path, capsys):
    """Spelled out, with =, or abbreviated as argparse allows: refused before any work is done."""
    with pytest.raises(ValueError) as err:  # utils.run prints it as one error: line
        real_he.main(["--out", str(tmp_path / "rh"), "--", *extra])
    assert f"{flag} after `--`: real_he.py sets it itself" in str(err.value)
    assert not any(tmp_path.iterdir())
