"""data/cache.py: the prepared cache read back (PreparedDataset): what preprocessing gives, a cache
re-prepared under a running job, damaged arrays and JSON files (one line, then prepared again).

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_cache.py

References are independent of the code under test: images preprocessed again from the source files,
masks resized by a nearest-neighbour written out in numpy (the nearest_reference fixture).
"""
import json
import pickle

import numpy as np
import pytest

from data.cache import PreparedDataset
from data.datasets import list_samples, load_sample
from data.ids import DATASET_IDS
from data.prepare import prepare_cache
from data.preprocess import preprocess_image


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("ds_id", DATASET_IDS)
def test_prepared_dataset_matches_preprocessing(cache_dir, synth_root, dataset_folders,
                                                nearest_reference, ds_id):
    splits = json.loads((cache_dir / ds_id / "128" / "splits.json").read_text())
    samples = {s.id: s for s in list_samples(ds_id, synth_root / dataset_folders[ds_id])}
    for split in ("train", "val", "test"):
        ds = PreparedDataset(cache_dir, ds_id, 128, split)
        assert ds.ids == splits[split] == sorted(splits[split]) and len(ds) == len(splits[split])
    assert splits["test"] and not set(splits["train"]) & set(splits["test"])
    item = ds[0]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (128, 128, 3)
    assert item["masks"].dtype == bool and item["masks"].shape == (4, 128, 128)
    assert item["fov"].dtype == bool
    image, masks = load_sample(samples[item["id"]])
    ref_image, ref_fov, geo = preprocess_image(image, 128)
    assert np.array_equal(item["image"], ref_image) and np.array_equal(item["fov"], ref_fov)
    assert (nearest_reference(masks, geo) == item["masks"]).mean() > 0.999


def test_dataset_in_use_refuses_a_cache_re_prepared_with_other_options(synth_root, tmp_path):
    cache = tmp_path / "cache"
    prepare_cache("FGA", synth_root, cache, 64, verbose=False)
    ds = PreparedDataset(cache, "FGA", 64, "train")
    first = ds[0]
    worker = pickle.loads(pickle.dumps(ds))  # a DataLoader worker: re-opens the arrays lazily
    fresh = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(fresh[0]["image"], first["image"])  # same fingerprint: fine
    # another job
    prepare_cache("FGA", synth_root, cache, 64, thresholds={"FGA": 127}, verbose=False)
    with pytest.raises(ValueError) as err:
        worker[0]
    msg = one_line(err)
    # the cache folder, the option that changed (old -> new), what to do
    assert str(cache / "FGA" / "64") in msg and "mask_threshold 0 -> 127" in msg, msg
    assert "rerun" in msg, msg
    # maps opened before the swap keep the old rows
    assert np.array_equal(ds[0]["image"], first["image"])
    PreparedDataset(cache, "FGA", 64, "train")[0]  # a new dataset reads the new cache


# ----------------------------------------------------------------------------- damaged caches

def _command(folder):
    return f"python -m data.prepare --dataset DDR --cache {folder.parent.parent} --resolution 32"


def test_truncated_array_is_one_line_then_prepared_again(synth_root, small_cache, capsys):
    cache, out = small_cache
    images = out / "images.npy"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    ds = PreparedDataset(cache, "DDR", 32, "test")
    with pytest.raises(ValueError) as err:
        ds[0]
    msg = one_line(err)
    # the damaged file, and the command that prepares it again
    assert str(images) in msg and "damaged" in msg and _command(out) in msg, msg
    prepare_cache("DDR", synth_root, cache, 32)
    printed = capsys.readouterr().out
    assert f"note: {out} is damaged (images.npy" in printed and "prepared 12 images" in printed
    assert PreparedDataset(cache, "DDR", 32, "test")[0]["image"].shape == (32, 32, 3)


@pytest.mark.parametrize("name", ["meta.json", "splits.json"])
@pytest.mark.parametrize("garbage", [b"{\"ids\": [1, 2", b"\xff\xfe\x00garbage", b"[1, 2, 3]"])
def test_garbled_json_is_one_line_then_prepared_again(synth_root, small_cache, capsys, name,
                                                      garbage):
    cache, out = small_cache
    (out / name).write_bytes(garbage)
    with pytest.raises(ValueError) as err:
        PreparedDataset(cache, "DDR", 32, "train")
    msg = one_line(err)
    assert str(out / name) in msg and _command(out) in msg, msg
    prepare_cache("DDR", synth_root, cache, 32)
    assert f"note: {out} is damaged" in capsys.readouterr().out
    assert len(PreparedDataset(cache, "DDR", 32, "train")) > 0
