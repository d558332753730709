"""data/splits.py: train / val / test under the paper's protocol, the authors' code, official and
user split files.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_splits.py

References are independent of the code under test: the official splits are read off the folders,
the authors' draw is re-written from nntools' random_split (the nntools_split fixture), sizes are
the ones their code gives on the real datasets.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from data.datasets import Sample, list_samples
from data.splits import make_splits


def _samples(ids, split=None):
    return [Sample(x, Path(f"{x}.jpg"), {}, split(x) if split else None) for x in ids]


# ----------------------------------------------------------------------------- the paper's protocol

def test_official_splits(synth_root):
    idr = synth_root / "IDRiD" / "A. Segmentation" / "1. Original Images"
    splits = make_splits(list_samples("IDR", synth_root / "IDRiD"), "IDR")
    assert splits["test"] == sorted(p.stem for p in (idr / "b. Testing Set").glob("*.jpg"))
    train = sorted(p.stem for p in (idr / "a. Training Set").glob("*.jpg"))
    assert sorted(splits["train"] + splits["val"]) == train
    assert len(splits["val"]) == max(1, round(0.15 * len(train)))
    ddr = synth_root / "DDR-dataset" / "lesion_segmentation"
    splits = make_splits(list_samples("DDR", synth_root / "DDR-dataset"), "DDR")
    for name, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert splits[name] == sorted(p.stem for p in (ddr / folder / "image").glob("*.jpg"))


@pytest.mark.parametrize("n", [12, 100])
def test_seeded_splits_deterministic_disjoint_covering(n):
    samples = [Sample(f"img{k:03d}", Path(f"img{k:03d}.jpg"))
               for k in np.random.default_rng(5).permutation(n)]
    a, b = make_splits(samples, "FGA", seed=0), make_splits(samples[::-1], "FGA", seed=0)
    assert a == b  # deterministic, independent of the listing order
    ids = sorted(s.id for s in samples)
    assert sorted(a["train"] + a["val"] + a["test"]) == ids  # covering and disjoint
    assert all(a[k] == sorted(a[k]) for k in a)
    assert len(a["test"]) == round(0.3 * n)
    assert abs(len(a["val"]) - 0.15 * (n - len(a["test"]))) <= 1
    assert make_splits(samples, "FGA", seed=1) != a


def test_paper_protocol_keeps_both_eyes_of_a_patient_together():
    rng = np.random.default_rng(0)
    ids = []
    for k in range(400):
        eyes = ["left", "right"] if rng.random() < 0.2 else [str(rng.choice(["left", "right"]))]
        ids += [f"{1000 + k}_{e}" for e in eyes]
    s = make_splits(_samples(ids), "RET", seed=0)
    side = {}
    for name, members in s.items():
        for x in members:
            side.setdefault(x.rsplit("_", 1)[0], set()).add(name)
    assert all(len(v) == 1 for v in side.values()), [p for p, v in side.items() if len(v) > 1][:5]
    assert sorted(sum(s.values(), [])) == sorted(ids)
    assert abs(len(s["test"]) - 0.3 * len(ids)) <= 1
    assert abs(len(s["val"]) - 0.15 * (len(ids) - len(s["test"]))) <= 1
    assert make_splits(_samples(ids[::-1]), "RET", seed=0) == s  # deterministic, order-free
    fga = make_splits(_samples(ids), "FGA", seed=0)  # other datasets: per image, as before
    where = {x: name for name, members in fga.items() for x in members}
    pairs = [x[:-5] for x in ids if x.endswith("_left") and x[:-5] + "_right" in where]
    assert any(where[p + "_left"] != where[p + "_right"] for p in pairs)


# ----------------------------------------------------------------------------- user split files

def test_user_split_files(synth_root, tmp_path):
    samples = list_samples("MES", synth_root / "MAPLES-DR")
    ids = [s.id for s in samples]
    official = make_splits(samples, "MES", split_file="official")
    test_folder = synth_root / "MAPLES-DR/test/fundus"
    assert official["test"] == sorted(p.stem for p in test_folder.glob("*.jpg"))
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ids[:6], "val": ids[6:8], "test": ids[8:]}))
    assert make_splits(samples, "MES", split_file=str(f)) == {"train": ids[:6], "val": ids[6:8],
                                                             "test": ids[8:]}
    f.write_text(json.dumps({"train": ids[:8], "test": ids[8:]}))  # no val: 15% of train
    s = make_splits(samples, "MES", split_file=str(f))
    assert sorted(s["train"] + s["val"]) == ids[:8] and len(s["val"]) == 1 and s["test"] == ids[8:]
    f.write_text(json.dumps({"train": ids[:8], "test": ["nope"]}))
    with pytest.raises(ValueError) as err:
        make_splits(samples, "MES", split_file=str(f))
    msg = str(err.value)
    assert str(f) in msg and "MES" in msg and "'nope'" in msg and "\n" not in msg, msg
    f.write_text(json.dumps({"train": ids[:8], "test": ids[7:]}))
    with pytest.raises(ValueError) as err:
        make_splits(samples, "MES", split_file=str(f))
    msg = str(err.value)
    assert str(f) in msg and repr(ids[7]) in msg and "more than one split" in msg, msg


# ---------------------------------------------------------------------------- the authors' protocol

@pytest.mark.parametrize("ds, N, sizes", [("FGA", 1842, (1253, 220, 369)),
                                          ("RET", 1593, (1083, 191, 319))])
def test_authors_protocol_sizes_on_real_sized_id_lists(ds, N, sizes):
    ids = [f"{k:05d}_{'left' if k % 3 else 'right'}"
           for k in np.random.default_rng(1).permutation(N)]
    s = make_splits(_samples(ids), ds, protocol="authors")
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == sizes
    assert len(s["train"]) + len(s["val"]) == {"FGA": 1473, "RET": 1274}[ds]
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(ids)


@pytest.mark.parametrize("ds, n_train, n_test, sizes", [("IDR", 54, 27, (46, 8)),
                                                        ("MES", 138, 60, (118, 20))])
def test_authors_protocol_official_train_gives_validation(ds, n_train, n_test, sizes):
    ids = [f"img_{k:03d}" for k in range(n_train + n_test)]
    s = make_splits(_samples(ids, lambda x: "train" if int(x[4:]) < n_train else "test"), ds,
                    protocol="authors")
    assert (len(s["train"]), len(s["val"])) == sizes and s["test"] == ids[n_train:]
    # MES under the paper protocol stays a seeded 30 % test draw
    paper = make_splits(_samples(ids, lambda x: "train"), "MES")
    assert len(paper["test"]) == round(0.3 * len(ids))


def test_authors_protocol_membership_matches_an_independent_randperm_draw(nntools_split):
    ids = [f"im{k:02d}" for k in range(23)]
    trainval, test = nntools_split(sorted(ids), [int(0.8 * 23), 23 - int(0.8 * 23)])  # 18 / 5
    n = len(trainval)
    train, val = nntools_split(trainval, [n - int(0.15 * n), int(0.15 * n)])  # 16 / 2
    s = make_splits(_samples(ids[::-1]), "FGA", protocol="authors")
    assert s == {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    # The validation draw is over the train part in its permuted order (nntools' subset keeps it): a
    # draw over the sorted train part would pick other images.
    _, other = nntools_split(sorted(trainval), [n - int(0.15 * n), int(0.15 * n)])
    assert sorted(other) != s["val"]
    ddr = make_splits(_samples(ids, lambda x: ("train", "val", "test")[int(x[2:]) % 3]), "DDR",
                      protocol="authors")
    assert ddr["val"] == [x for x in ids if int(x[2:]) % 3 == 1]  # DDR: the official valid folder
