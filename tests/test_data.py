"""data/: adapters, splits, preprocessing, prepared cache, patches, bad inputs.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_data.py
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_data.py -k real   # the real IDRiD sample only

References are independent of the code under test: file paths spelled out per layout, masks decoded with
plain PIL, FOV boxes estimated from red-channel profiles, patch regions found by brute-force search.
"""
import argparse
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import (DATASET_IDS, LESIONS, PatchDataset, PreparedDataset, add_data_args, combo_name, data_options,
                  parse_dataset_ids, prepare_cache, preprocess_image, restore_crop, restore_geometry)
from data.datasets import Sample, dataset_root, list_samples, load_masks, load_sample
from data.flags import add_dataset_list
from data.splits import make_splits

ROOT = Path(__file__).resolve().parents[1]
FOLDER = {"IDR": "IDRiD", "DDR": "DDR-dataset", "FGA": "Seg-set", "RET": "retinal-lesions-v20191227",
          "MES": "MAPLES-DR"}
IMAGES = {"IDR": "A. Segmentation/1. Original Images/*/*.jpg", "DDR": "lesion_segmentation/*/image/*.jpg",
          "FGA": "Original_Images/*.png", "RET": "images_896x896/*.jpg", "MES": "*/fundus/*.jpg"}


def expected_mask_files(ds, root, image):
    """The mask files of one image, spelled out from REFERENCE.md (absent files included)."""
    sid = image.stem
    if ds == "IDR":
        gt = root / "A. Segmentation" / "2. All Segmentation Groundtruths" / image.parent.name
        return {"EX": [gt / "3. Hard Exudates" / f"{sid}_EX.tif"], "HE": [gt / "2. Haemorrhages" / f"{sid}_HE.tif"],
                "MA": [gt / "1. Microaneurysms" / f"{sid}_MA.tif"], "CWS": [gt / "4. Soft Exudates" / f"{sid}_SE.tif"]}
    if ds == "DDR":
        split = image.parents[1]
        lab = split / ("segmentation label" if split.name == "valid" else "label")
        return {les: [lab / code / f"{sid}.tif"] for les, code in zip(LESIONS, ("EX", "HE", "MA", "SE"))}
    if ds == "FGA":
        return {les: [root / d / f"{sid}.png"] for les, d in
                zip(LESIONS, ("HardExudate_Masks", "Hemohedge_Masks", "Microaneurysms_Masks", "SoftExudate_Masks"))}
    if ds == "RET":
        d = root / "lesion_segs_896x896" / sid
        return {les: [d / f"{n}.png"] for les, n in
                zip(LESIONS, ("hard_exudate", "retinal_hemorrhage", "microaneurysm", "cotton_wool_spots"))}
    base = image.parents[1]  # MES
    return {les: [base / d / f"{sid}.png"] for les, d in
            zip(LESIONS, ("exudates", "hemorrhages", "microaneurysms", "cottonWoolSpots"))}


def reference_masks(files, shape, threshold=0):
    """bool (4, H, W): plain PIL grey decoding, union of the files, absent file = zeros."""
    out = np.zeros((len(LESIONS),) + shape, bool)
    for c, les in enumerate(LESIONS):
        for f in files[les]:
            if f.exists():
                out[c] |= np.asarray(Image.open(f).convert("L")) > threshold
    return out


def assert_no_cache_left(cache):
    leftovers = [p for p in cache.rglob("*")] if cache.exists() else []
    assert leftovers == [], f"left behind: {leftovers}"


# ----------------------------------------------------------------------------- ids and flags

def test_dataset_ids_and_combo_names():
    assert parse_dataset_ids("MES,idr") == ["IDR", "MES"]
    assert combo_name(["MES", "IDR", "MES"]) == "IDR+MES"
    with pytest.raises(ValueError, match=r"unknown dataset ID 'XYZ' \(choose from IDR, DDR, FGA, RET, MES\)"):
        parse_dataset_ids("IDR,XYZ")


def test_data_flags(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/somewhere")
    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--root", "idr=/x/IDRiD", "--mask-threshold", "FGA=127", "--splits", "MES=official",
                              "--ret-he", "all", "--split-seed", "3"])
    assert args.data_root == "/somewhere" and args.cache == "cache"
    assert data_options(args) == {"roots": {"IDR": "/x/IDRiD"}, "thresholds": {"FGA": 127},
                                  "split_files": {"MES": "official"}, "ret_he": "all", "split_seed": 3,
                                  "split_protocol": "paper"}
    for argv, msg in ((["--root", "IDRiD"], "--root expects ID=VALUE"),
                      (["--root", "XYZ=/x"], "unknown dataset ID 'XYZ'"),
                      (["--mask-threshold", "FGA=high"], "--mask-threshold FGA=high")):
        with pytest.raises(ValueError, match=msg):
            data_options(parser.parse_args(argv))


# The same dataset list, however it is typed (`--test` of evaluate.py and fig4.py, `--train` of tune.py,
# `--datasets` of characterize.py, `--dataset` of data.prepare): what each spelling must give.
DATASET_LISTS = [
    (["IDR,DDR", "MES"], ["IDR", "DDR", "MES"]),  # commas and spaces
    (["IDR+DDR"], ["IDR", "DDR"]),  # a run name
    (["mes", "idr+Ddr,MES"], ["IDR", "DDR", "MES"]),  # any case, duplicates dropped, canonical order
    (["all"], list(DATASET_IDS)),
]


def parse_list(flag, argv, **kw):
    parser = argparse.ArgumentParser()
    add_dataset_list(parser, flag, "sets", **kw)
    return getattr(parser.parse_args(argv), flag[2:])


@pytest.mark.parametrize("words, ids", DATASET_LISTS)
def test_dataset_list_syntax(words, ids):
    assert parse_list("--test", ["--test", *words]) == ids
    assert parse_list("--test", ["--test", "RET", "--test", *words]) == ids  # the last one wins, as for any flag


def test_dataset_list_default_and_errors():
    assert parse_list("--test", ["--test", "MES"], default=list(DATASET_IDS)) == ["MES"]  # replaces the default
    assert parse_list("--test", [], default=list(DATASET_IDS)) == list(DATASET_IDS)
    for argv, msg in ((["--test", "IDR,XYZ"], "--test: unknown dataset ID 'XYZ' (choose from IDR, DDR, FGA, RET, MES)"),
                      (["--test", ","], "--test: empty dataset list"),
                      (["--test", "IDR", "runs/X"], "--test: 'runs/X' is not a dataset ID; a folder or file goes before")):
        with pytest.raises(ValueError, match=re.escape(msg)) as e:
            parse_list("--test", argv)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit):  # required and absent: argparse's own message
        parse_list("--train", [], required=True)


# ----------------------------------------------------------------------------- adapters on synthetic data

@pytest.mark.parametrize("ds", DATASET_IDS)
def test_adapter_ids_images_and_masks(synth_root, ds):
    root = synth_root / FOLDER[ds]
    images = sorted(root.glob(IMAGES[ds]), key=lambda p: p.stem)
    samples = list_samples(ds, dataset_root(ds, synth_root))
    assert [s.id for s in samples] == [p.stem for p in images] and len(samples) == 12
    for s, path in zip(samples[:6], images[:6]):
        image, masks = load_sample(s)
        ref = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(image, ref)
        assert masks.dtype == bool and masks.shape == (4,) + ref.shape[:2]
        assert np.array_equal(masks, reference_masks(expected_mask_files(ds, root, path), ref.shape[:2]))


def test_idr_absent_mask_files_are_zeros(synth_root):
    root = synth_root / "IDRiD"
    absent = [(s, les) for s in list_samples("IDR", root) for les, files in s.masks.items() if not files]
    assert absent, "the synthetic IDRiD should lack some mask files"
    s, les = absent[0]
    assert not any(f.exists() for f in expected_mask_files("IDR", root, s.image)[les])
    assert not load_sample(s)[1][LESIONS.index(les)].any()


def test_ddr_valid_split_reads_segmentation_label(synth_root):
    samples = list_samples("DDR", synth_root / "DDR-dataset")
    val = [s for s in samples if s.split == "val"]
    assert len(val) == len(list((synth_root / "DDR-dataset/lesion_segmentation/valid/image").glob("*.jpg"))) > 0
    assert all("segmentation label" in str(f) for s in val for files in s.masks.values() for f in files)
    assert all(len(files) == 1 for s in samples for files in s.masks.values())  # DDR ships all four files


def test_fga_antialiased_edges_and_threshold(synth_root):
    root = synth_root / "Seg-set"
    for s in list_samples("FGA", root):
        f = s.masks["HE"][0] if s.masks["HE"] else None
        grey = np.asarray(Image.open(f).convert("L")) if f else np.zeros(1)
        if ((grey > 0) & (grey < 255)).any():
            break
    else:
        pytest.fail("no anti-aliased Hemohedge_Masks file in the synthetic FGADR")
    size = Image.open(s.image).size
    for t in (0, 127):
        assert load_masks(s, size, threshold=t)[1].sum() == (grey > t).sum()
    assert (grey > 0).sum() > (grey > 127).sum()


def test_ret_127_255_he_merge_and_missing_folder(synth_root, tmp_path):
    root = tmp_path / "retinal-lesions-v20191227"
    shutil.copytree(synth_root / "retinal-lesions-v20191227", root)
    samples = list_samples("RET", root)
    # 127 (not following the guideline) and 255 labels: > 0 keeps both, RET=127 keeps only 255.
    for s in samples:
        grey = np.asarray(Image.open(s.masks["HE"][0])) if s.masks["HE"] else np.zeros(1)
        if (grey == 127).any() and (grey == 255).any():
            break
    else:
        pytest.fail("no retinal_hemorrhage.png with both 127 and 255 in the synthetic Retinal-Lesions")
    he, size = LESIONS.index("HE"), Image.open(s.image).size
    assert load_masks(s, size)[he].sum() == (grey > 0).sum()
    assert load_masks(s, size, threshold=127)[he].sum() == (grey == 255).sum()  # --mask-threshold RET=127
    # --ret-he all merges preretinal + vitreous haemorrhage into HE; the default ignores them.
    target = samples[0]
    folder = root / "lesion_segs_896x896" / target.id
    folder.mkdir(exist_ok=True)
    w, h = Image.open(target.image).size
    extra = np.zeros((h, w), np.uint8)
    extra[2:9, 3:12] = 255
    Image.fromarray(extra).save(folder / "preretinal_hemorrhage.png")
    base = reference_masks(expected_mask_files("RET", root, target.image), (h, w))[he]
    assert np.array_equal(load_sample(list_samples("RET", root)[0])[1][he], base)
    assert np.array_equal(load_sample(list_samples("RET", root, ret_he="all")[0])[1][he], base | (extra > 0))
    # An image without a mask folder: all-zero masks, no error.
    shutil.rmtree(folder)
    s = list_samples("RET", root)[0]
    assert all(files == () for files in s.masks.values()) and not load_sample(s)[1].any()


MISSING = {  # dataset -> what is removed (relative to its root) and whether that is an error
    "DDR folder": ("DDR", "lesion_segmentation/valid/segmentation label", "lesion_segmentation/valid/segmentation label/EX"),
    "DDR lesion folder": ("DDR", "lesion_segmentation/train/label/HE", "lesion_segmentation/train/label/HE"),
    "DDR file": ("DDR", "lesion_segmentation/test/label/MA/*.tif", None),
    "FGA folder": ("FGA", "Hemohedge_Masks", "Hemohedge_Masks"),
    "FGA file": ("FGA", "Microaneurysms_Masks/*.png", None),
    "MES folder": ("MES", "test/cottonWoolSpots", "test/cottonWoolSpots"),
    "MES file": ("MES", "train/exudates/*.png", None),
    "RET folder": ("RET", "lesion_segs_896x896", "lesion_segs_896x896"),
    "IDR groundtruths": ("IDR", "A. Segmentation/2. All Segmentation Groundtruths/b. Testing Set",
                         "A. Segmentation/2. All Segmentation Groundtruths/b. Testing Set"),
}


@pytest.mark.parametrize("case", MISSING)
def test_missing_mask_folder_or_file_is_an_error(synth_root, tmp_path, case):
    """A renamed or deleted mask folder (or a missing file where the dataset ships all four) must not read
    as lesion-free images: one-line FileNotFoundError naming what is missing."""
    ds, remove, named = MISSING[case]
    root = tmp_path / FOLDER[ds]
    shutil.copytree(synth_root / FOLDER[ds], root)
    if "*" in remove:  # one file: the error names exactly that file
        target = sorted(root.glob(remove))[1]
        target.unlink()
        named = target.relative_to(root)
    else:
        shutil.rmtree(root / remove)
    with pytest.raises(FileNotFoundError) as err:
        list_samples(ds, root)
    assert str(root / named) in str(err.value) and "\n" not in str(err.value), err.value
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / named))):
        prepare_cache(ds, tmp_path, tmp_path / "cache", 64)
    assert_no_cache_left(tmp_path / "cache")


def test_idr_missing_lesion_folder_and_ret_missing_image_folder_are_lesion_free(synth_root, tmp_path):
    """IDRiD ships no file for an absent lesion (the real sample has only "2. Haemorrhages") and
    Retinal-Lesions no folder for a lesion-free image: both read as all-zero, no error."""
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    shutil.rmtree(root / "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set/4. Soft Exudates")
    train = [s for s in list_samples("IDR", root) if s.split == "train"]
    assert train and all(s.masks["CWS"] == () for s in train) and any(s.masks["HE"] for s in train)
    ret = tmp_path / "retinal-lesions-v20191227"
    shutil.copytree(synth_root / "retinal-lesions-v20191227", ret)
    victim = min((ret / "lesion_segs_896x896").iterdir())
    shutil.rmtree(victim)
    s = {s.id: s for s in list_samples("RET", ret)}[victim.name]
    assert all(files == () for files in s.masks.values())


# ----------------------------------------------------------------------------- splits

def test_official_splits(synth_root):
    idr = synth_root / "IDRiD" / "A. Segmentation" / "1. Original Images"
    splits = make_splits(list_samples("IDR", synth_root / "IDRiD"), "IDR")
    assert splits["test"] == sorted(p.stem for p in (idr / "b. Testing Set").glob("*.jpg"))
    train = sorted(p.stem for p in (idr / "a. Training Set").glob("*.jpg"))
    assert sorted(splits["train"] + splits["val"]) == train and len(splits["val"]) == max(1, round(0.15 * len(train)))
    ddr = synth_root / "DDR-dataset" / "lesion_segmentation"
    splits = make_splits(list_samples("DDR", synth_root / "DDR-dataset"), "DDR")
    for name, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert splits[name] == sorted(p.stem for p in (ddr / folder / "image").glob("*.jpg"))


@pytest.mark.parametrize("n", [12, 100])
def test_seeded_splits_deterministic_disjoint_covering(n):
    samples = [Sample(f"img{k:03d}", Path(f"img{k:03d}.jpg")) for k in np.random.default_rng(5).permutation(n)]
    a, b = make_splits(samples, "FGA", seed=0), make_splits(samples[::-1], "FGA", seed=0)
    assert a == b  # deterministic, independent of the listing order
    ids = sorted(s.id for s in samples)
    assert sorted(a["train"] + a["val"] + a["test"]) == ids  # covering and disjoint
    assert all(a[k] == sorted(a[k]) for k in a)
    assert len(a["test"]) == round(0.3 * n) and abs(len(a["val"]) - 0.15 * (n - len(a["test"]))) <= 1
    assert make_splits(samples, "FGA", seed=1) != a


def test_user_split_files(synth_root, tmp_path):
    samples = list_samples("MES", synth_root / "MAPLES-DR")
    ids = [s.id for s in samples]
    official = make_splits(samples, "MES", split_file="official")
    assert official["test"] == sorted(p.stem for p in (synth_root / "MAPLES-DR/test/fundus").glob("*.jpg"))
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ids[:6], "val": ids[6:8], "test": ids[8:]}))
    assert make_splits(samples, "MES", split_file=str(f)) == {"train": ids[:6], "val": ids[6:8], "test": ids[8:]}
    f.write_text(json.dumps({"train": ids[:8], "test": ids[8:]}))  # no val: 15% of train
    s = make_splits(samples, "MES", split_file=str(f))
    assert sorted(s["train"] + s["val"]) == ids[:8] and len(s["val"]) == 1 and s["test"] == ids[8:]
    f.write_text(json.dumps({"train": ids[:8], "test": ["nope"]}))
    with pytest.raises(ValueError, match=re.escape(f"split file {f}: unknown MES image id 'nope'")):
        make_splits(samples, "MES", split_file=str(f))
    f.write_text(json.dumps({"train": ids[:8], "test": ids[7:]}))
    with pytest.raises(ValueError, match="more than one split"):
        make_splits(samples, "MES", split_file=str(f))


# ----------------------------------------------------------------------------- preprocessing

def _disc_photo(h=300, w=400, cx=210, cy=150, r=120):
    """A fundus-like test photograph: smooth orange disc on black, noise outside; and a lesion mask."""
    yy, xx = np.mgrid[:h, :w]
    disc = np.hypot(xx - cx, yy - cy) <= r
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.where(disc, 150 + 40 * np.sin(xx / 30.0), np.random.default_rng(0).integers(0, 8, (h, w)))
    img[..., 1] = np.where(disc, 60 + 20 * np.cos(yy / 25.0), 0)
    img[..., 2] = np.where(disc, 20, 0)
    lesion = disc & (np.abs(xx - 180) < 15) & (np.abs(yy - 120) < 10)
    return img, disc, lesion


def test_preprocess_crop_and_restore_geometry():
    img, disc, lesion = _disc_photo()
    out, fov, geo = preprocess_image(img, 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8 and fov.shape == (128, 128) and fov.dtype == bool
    json.dumps(geo)  # plain numbers
    x0, y0, x1, y1 = geo["box"]
    assert abs(x0 - 90) <= 4 and abs(x1 - 331) <= 4 and abs(y0 - 30) <= 4 and abs(y1 - 271) <= 4
    restored = restore_geometry(fov, geo)  # bool map back on the photograph
    assert restored.shape == disc.shape and restored.dtype == bool
    assert (restored & disc).sum() / (restored | disc).sum() > 0.97
    red = restore_geometry(out[..., 0].astype(np.float32), geo)  # float map: bilinear
    inner = np.zeros_like(disc)
    inner[40:260, 100:320] = True
    inner &= np.hypot(*np.mgrid[-150:150, -210:190]) < 110  # away from the rim
    assert np.abs(red[inner] - img[..., 0][inner]).mean() < 3
    assert (red[:, :x0 - 1] == 0).all() and (red[:, x1 + 1:] == 0).all()
    stacked = restore_geometry(torch.from_numpy(np.stack([out[..., 0], out[..., 1]])).float(), geo)
    assert torch.is_tensor(stacked) and stacked.shape == (2, 300, 400)
    crop, box = restore_crop(out[..., 0].astype(np.float32), geo)  # numpy in: the box alone, as torch
    assert box == (x0, y0, x1, y1) and torch.equal(crop, torch.from_numpy(red[y0:y1, x0:x1]))


def test_real_idrid_adapter(fixture_idrid):
    samples = list_samples("IDR", fixture_idrid)
    # tests/fixtures/idrid-he14: IDRiD_01-08, 10, 12, 14-17, downscaled 4x from 4288x2848
    numbers = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15, 16, 17]
    assert [s.id for s in samples] == [f"IDRiD_{n:02d}" for n in numbers]
    assert all(s.split == "train" and len(s.masks["HE"]) == 1 for s in samples)
    assert all(s.masks[les] == () for s in samples for les in ("EX", "MA", "CWS"))  # absent in the sample
    image, masks = load_sample(samples[0])
    assert image.shape == (712, 1072, 3) and masks.shape == (4, 712, 1072)
    he = np.asarray(Image.open(samples[0].masks["HE"][0]))  # palette indices {0, 1}
    assert masks[1].sum() == (he > 0).sum() > 0 and not masks[[0, 2, 3]].any()


def _profile_box(red):
    """Independent FOV box estimate: where the row / column mean of the red channel (central band) is bright."""
    H, W = red.shape
    cols = red[H // 2 - H // 10:H // 2 + H // 10].mean(0)
    rows = red[:, W // 2 - W // 10:W // 2 + W // 10].mean(1)
    # NOTE: relative to the median, not the max: in IDRiD_12 a saturated optic disc sets the band's max (254)
    # and the dim temporal rim (red ~70) falls under 0.3 x max, 20 px inside the FOV edge
    xs, ys = np.flatnonzero(cols > 0.3 * np.median(cols)), np.flatnonzero(rows > 0.3 * np.median(rows))
    return xs[0], ys[0], xs[-1] + 1, ys[-1] + 1


def test_real_idrid_fov_crop_hugs_the_fov(fixture_idrid):
    for s in list_samples("IDR", fixture_idrid):
        image = np.asarray(Image.open(s.image).convert("RGB"))
        H, W = image.shape[:2]
        _, fov, geo = preprocess_image(image, 256)
        est = _profile_box(image[..., 0].astype(np.float32))
        assert np.allclose(geo["box"], est, atol=0.01 * W), (s.id, geo["box"], est)
        assert geo["box"][1] == 0 and geo["box"][3] == H  # IDRiD's FOV is cut flat at top and bottom
        w, h = geo["size"]
        content = fov[geo["pad"][1]:geo["pad"][1] + h, geo["pad"][0]:geo["pad"][0] + w]
        assert content.mean() > 0.85 and not fov[:geo["pad"][1]].any()  # hugging: FOV fills its box


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


# ----------------------------------------------------------------------------- prepared cache and patches

def _nearest_reference(mask, geo):
    """Nearest-neighbour resize of a native mask onto the padded square, written out in numpy."""
    x0, y0, x1, y1 = geo["box"]
    (w, h), (left, top), R = geo["size"], geo["pad"], geo["resolution"]
    ys = y0 + np.floor((np.arange(h) + 0.5) * (y1 - y0) / h).astype(int)
    xs = x0 + np.floor((np.arange(w) + 0.5) * (x1 - x0) / w).astype(int)
    out = np.zeros(mask.shape[:-2] + (R, R), bool)
    out[..., top:top + h, left:left + w] = mask[..., ys[:, None], xs[None, :]]
    return out


@pytest.mark.parametrize("ds_id", DATASET_IDS)
def test_prepared_dataset_matches_preprocessing(cache_dir, synth_root, ds_id):
    splits = json.loads((cache_dir / ds_id / "128" / "splits.json").read_text())
    samples = {s.id: s for s in list_samples(ds_id, synth_root / FOLDER[ds_id])}
    for split in ("train", "val", "test"):
        ds = PreparedDataset(cache_dir, ds_id, 128, split)
        assert ds.ids == splits[split] == sorted(splits[split]) and len(ds) == len(splits[split])
    assert splits["test"] and not set(splits["train"]) & set(splits["test"])
    item = ds[0]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (128, 128, 3)
    assert item["masks"].dtype == bool and item["masks"].shape == (4, 128, 128) and item["fov"].dtype == bool
    image, masks = load_sample(samples[item["id"]])
    ref_image, ref_fov, geo = preprocess_image(image, 128)
    assert np.array_equal(item["image"], ref_image) and np.array_equal(item["fov"], ref_fov)
    assert (_nearest_reference(masks, geo) == item["masks"]).mean() > 0.999


def test_patch_without_augmentation_is_the_same_region(cache_dir, synth_root):
    ds = PreparedDataset(cache_dir, "MES", 128, "train")
    samples = {s.id: s for s in list_samples("MES", synth_root / "MAPLES-DR")}
    refs = []
    for sid in ds.ids:  # the preprocessed images, recomputed from the source files
        image, masks = load_sample(samples[sid])
        out, fov, geo = preprocess_image(image, 128)
        refs.append((np.pad(out, ((32, 32), (32, 32), (0, 0))), np.pad(_nearest_reference(masks, geo),
                                                                       ((0, 0), (32, 32), (32, 32))),
                     np.pad(fov, 32)))
    patches = PatchDataset([ds], patch=64, length=10, seed=3, augment=False)
    for i in range(len(patches)):
        p = patches[i]
        img = p["image"].permute(1, 2, 0).numpy()
        assert p["fov"][32, 32]  # centred in the FOV
        found = []
        for k, (ref, ref_masks, ref_fov) in enumerate(refs):  # brute force: every position of every image
            cand = np.argwhere((ref[32:-32, 32:-32] == img[32, 32]).all(-1))  # patch centre at (y, x)
            for y, x in cand:
                if np.array_equal(ref[y:y + 64, x:x + 64], img):
                    found.append((k, y, x))
        assert len(found) == 1, found
        k, y, x = found[0]
        assert np.array_equal(refs[k][2][y:y + 64, x:x + 64], p["fov"].numpy())
        assert (refs[k][1][:, y:y + 64, x:x + 64] == p["masks"].numpy().astype(bool)).mean() > 0.999


def test_patches_deterministic_and_typed(cache_dir):
    dss = [PreparedDataset(cache_dir, d, 128, "train") for d in ("IDR", "RET")]
    a, b = PatchDataset(dss, patch=48, length=6, seed=1), PatchDataset(dss, patch=48, length=6, seed=1)
    later = [b[i] for i in (5, 2, 0)]  # access order does not matter
    for i, q in zip((5, 2, 0), later):
        p = a[i]
        assert all(torch.equal(p[k], q[k]) for k in p)
        assert p["image"].dtype == torch.uint8 and p["image"].shape == (3, 48, 48)
        assert p["masks"].dtype == torch.uint8 and p["masks"].shape == (4, 48, 48) and p["masks"].max() <= 1
        assert p["fov"].dtype == torch.bool and p["fov"].shape == (48, 48)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], PatchDataset(dss, patch=48, length=6, seed=2)[0]["image"])
    loader = torch.utils.data.DataLoader(a, batch_size=3, num_workers=2)
    batch = next(iter(loader))
    assert torch.equal(batch["image"][2], a[2]["image"]) and torch.equal(batch["masks"][1], a[1]["masks"])


def test_augmented_patches_keep_image_and_masks_aligned(cache_dir):
    ds = PreparedDataset(cache_dir, "FGA", 128, "train")
    patches = PatchDataset([ds], patch=64, length=12, seed=0)
    for k in ("hue", "saturation", "value", "brightness", "contrast"):
        patches.aug[k] = 0.0  # geometry only, so the image can encode the masks

    def coded(d, j):  # image = 200 where HE, +50 where FOV: the warp of the image must match the masks'
        bits = np.asarray(ds.read(j)[1])
        code = ((bits >> 1 & 1) * 200 + (bits >> 4 & 1) * 50).astype(np.uint8)
        return np.repeat(code[..., None], 3, axis=2), bits

    for i in range(len(patches)):
        p = patches.sample(i, read=coded)
        expected = p["masks"][1].int() * 200 + p["fov"].int() * 50
        assert ((p["image"][0].int() - expected).abs() <= 30).float().mean() > 0.97
    patches.aug.update({"hue": 0.5, "brightness": 0.5})  # colour jitter leaves the padding black
    p = patches[0]
    assert (~p["fov"]).any() and (p["image"][:, ~p["fov"]] <= 40).float().mean() > 0.95


@pytest.mark.parametrize("P", [32, 33])
def test_identity_warp_is_the_plain_crop_pixel_for_pixel(cache_dir, P):
    """No rotation, scale 1, no shift, no colour jitter: the warped patch is the plain crop (or its mirror),
    exactly. Random per-pixel image and bits make any half- or one-pixel offset (blur, nearest ties) fail."""
    ds = PreparedDataset(cache_dir, "FGA", 128, "train")
    rng = np.random.default_rng(7)
    noise_bits = rng.integers(0, 32, (len(ds), 128, 128), dtype=np.uint8)  # lesion bits 0-3 + FOV bit 4
    noise_image = rng.integers(0, 256, (len(ds), 128, 128, 3), dtype=np.uint8)
    noise_image[..., 0] = noise_bits * 8  # the image also encodes the bits: image and masks must agree

    def coded(d, j):
        return noise_image[j], noise_bits[j]

    plain = PatchDataset([ds], patch=P, length=16, seed=5, augment=False)
    warped = PatchDataset([ds], patch=P, length=16, seed=5, augment=True)
    warped.aug.update({"rotate": 0.0, "scale": (1.0, 1.0), "shift": 0.0, "hue": 0.0, "saturation": 0.0,
                       "value": 0.0, "brightness": 0.0, "contrast": 0.0, "flip": 0.5})
    flips = set()
    for i in range(16):
        a, b = plain.sample(i, read=coded), warped.sample(i, read=coded)
        assert torch.equal(a["image"][0], a["masks"].int().mul(torch.tensor([1, 2, 4, 8]).view(4, 1, 1)).sum(0)
                           .add(a["fov"].int() * 16).mul(8).to(torch.uint8))  # the reference crop itself
        same = all(torch.equal(a[k], b[k]) for k in a)
        mirrored = all(torch.equal(a[k].flip(-1), b[k]) for k in a)
        assert same or mirrored, f"item {i}: the identity warp moved pixels"
        flips.add(mirrored)
    assert flips == {False, True}  # both the plain and the mirrored case were checked


# ----------------------------------------------------------------------------- no-op re-runs and bad inputs

def test_prepare_rerun_is_a_noop(cache_dir, synth_root, tmp_path, capsys):
    out = cache_dir / "MES" / "128"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
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
    assert meta.stat().st_mtime_ns != first and json.loads(meta.read_text())["options"]["mask_threshold"] == 127
    assert sorted(p.name for p in (tmp_path / "FGA").iterdir()) == ["64"]  # no temporary folders left


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
    """Two processes preparing the same cache at once (make -j, several jobs on first use): both succeed,
    the cache is prepared once, and nothing is left behind."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(ROOT), str(tmp_path / f"ready{k}"), str(go),
                               str(synth_root), str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
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
    assert sorted(p.name for p in (cache / "FGA").iterdir()) == ["64"]  # no lock, tmp or old folders


def test_leftovers_of_interrupted_preparations_are_removed(synth_root, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / "cache" / "FGA"
    stale = [parent / f".tmp-64-{dead.pid}-1234abcd", parent / ".old-64-5678abcd"]
    kept = [parent / f".tmp-64-{os.getpid()}-live0000",  # a preparation still running (this process)
            parent / f".tmp-640-{dead.pid}-other000"]  # another resolution: its own lock, its own clean-up
    for d in stale + kept:
        d.mkdir(parents=True)
        (d / "images.npy").write_bytes(b"x" * 100)
    prepare_cache("FGA", synth_root, tmp_path / "cache", 64, verbose=False)
    assert not any(d.exists() for d in stale) and all(d.exists() for d in kept)


def test_dataset_in_use_refuses_a_cache_re_prepared_with_other_options(synth_root, tmp_path):
    cache = tmp_path / "cache"
    prepare_cache("FGA", synth_root, cache, 64, verbose=False)
    ds = PreparedDataset(cache, "FGA", 64, "train")
    first = ds[0]
    worker = pickle.loads(pickle.dumps(ds))  # a DataLoader worker: re-opens the arrays lazily
    fresh = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(fresh[0]["image"], first["image"])  # same fingerprint: fine
    prepare_cache("FGA", synth_root, cache, 64, thresholds={"FGA": 127}, verbose=False)  # another job
    with pytest.raises(ValueError) as err:
        worker[0]
    msg = str(err.value)
    assert msg == f"{cache / 'FGA' / '64'} was re-prepared with other options while in use " \
                  f"(mask_threshold 0 -> 127); rerun", msg
    assert np.array_equal(ds[0]["image"], first["image"])  # maps opened before the swap keep the old rows
    PreparedDataset(cache, "FGA", 64, "train")[0]  # a new dataset reads the new cache


def test_existing_cache_without_sources_must_match_the_options(synth_root, tmp_path):
    raw, cache, gone = tmp_path / "raw", tmp_path / "cache", tmp_path / "gone"
    for ds in ("FGA", "RET"):
        shutil.copytree(synth_root / FOLDER[ds], raw / FOLDER[ds])
    ids = [s.id for s in list_samples("FGA", raw / "Seg-set")]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids[:8], "test": ids[8:]}))
    prepare_cache("FGA", raw, cache, 64, split_files={"FGA": str(split)}, split_seed=2, verbose=False)
    prepare_cache("RET", raw, cache, 64, ret_he="all", verbose=False)
    same = {"split_files": {"FGA": str(split)}, "split_seed": 2}
    assert prepare_cache("FGA", gone, cache, 64, ret_he="all", verbose=False, **same) == cache / "FGA" / "64"
    assert prepare_cache("RET", gone, cache, 64, ret_he="all", verbose=False) == cache / "RET" / "64"
    for ds, options, words in (
            ("FGA", {**same, "thresholds": {"FGA": 127}}, "--mask-threshold FGA=127 (cache: 0)"),
            ("FGA", {**same, "split_seed": 3}, "--split-seed 3 (cache: 2)"),
            ("FGA", {"split_seed": 2}, f"--splits FGA=default (cache: {split})"),
            ("RET", {}, "--ret-he retinal (cache: all)")):
        with pytest.raises(FileNotFoundError) as err:
            prepare_cache(ds, gone, cache, 64, verbose=False, **options)
        msg = str(err.value)
        assert f"{ds} sources not found and the existing cache {cache / ds / '64'} was prepared with other " \
               f"options ({words})" in msg and "\n" not in msg, msg
    split.write_text(json.dumps({"train": ids[:7], "test": ids[7:]}))  # same file name, other content
    with pytest.raises(FileNotFoundError, match=re.escape(f"--splits FGA={split} (the file's content changed)")):
        prepare_cache("FGA", gone, cache, 64, verbose=False, **same)


def _copy(synth_root, tmp_path, ds):
    root = tmp_path / "raw"
    shutil.copytree(synth_root / FOLDER[ds], root / FOLDER[ds])
    return root


def test_corrupt_image_leaves_no_cache(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path, "FGA")
    bad = sorted((root / "Seg-set" / "Original_Images").glob("*.png"))[4]
    bad.write_bytes(b"this is not a PNG")
    with pytest.raises(ValueError, match=re.escape(f"cannot read {bad}: corrupt or truncated")):
        prepare_cache("FGA", root, tmp_path / "cache", 64)
    assert_no_cache_left(tmp_path / "cache")


def test_truncated_jpeg_leaves_no_cache_and_keeps_the_old_one(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path, "IDR")
    cache = tmp_path / "cache"
    prepare_cache("IDR", root, cache, 64)
    meta = (cache / "IDR" / "64" / "meta.json").read_text()
    bad = sorted((root / "IDRiD").rglob("*.jpg"))[2]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"cannot read {bad}: corrupt or truncated")):
        prepare_cache("IDR", root, cache, 64)
    assert sorted(p.name for p in (cache / "IDR").iterdir()) == ["64"]  # no half-written folder
    assert (cache / "IDR" / "64" / "meta.json").read_text() == meta  # the complete old cache is untouched
    shutil.rmtree(cache)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        prepare_cache("IDR", root, cache, 64)
    assert_no_cache_left(cache)


def test_mask_size_mismatch_names_the_mask(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path, "MES")
    bad = sorted((root / "MAPLES-DR" / "train" / "hemorrhages").glob("*.png"))[1]
    Image.new("1", (50, 40)).save(bad)
    with pytest.raises(ValueError, match=re.escape(f"mask {bad} is 50x40 but its image ")):
        prepare_cache("MES", root, tmp_path / "cache", 64)
    assert_no_cache_left(tmp_path / "cache")


def test_unknown_id_missing_root_and_empty_test_split(synth_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="unknown dataset ID 'XYZ'"):
        prepare_cache("XYZ", synth_root, cache, 64)
    monkeypatch.delenv("RET_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match=r"RET dataset not found: expected folder .*empty/"
                                                r"retinal-lesions-v20191227 \(set --data-root .*--root RET=DIR.*RET_ROOT"):
        prepare_cache("RET", tmp_path / "empty", cache, 64)
    with pytest.raises(FileNotFoundError, match="expected folder /no/such/RET"):
        prepare_cache("RET", synth_root, cache, 64, roots={"RET": "/no/such/RET"})
    monkeypatch.setenv("RET_ROOT", str(synth_root / "retinal-lesions-v20191227"))
    assert dataset_root("RET", tmp_path / "empty") == synth_root / "retinal-lesions-v20191227"
    ids = [s.id for s in list_samples("MES", synth_root / "MAPLES-DR")]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids, "test": []}))
    with pytest.raises(ValueError, match="MES: the test split has no images"):
        prepare_cache("MES", synth_root, cache, 64, split_files={"MES": str(split)})
    assert_no_cache_left(cache)


def test_real_idrid_without_testing_set_is_an_empty_test_split(fixture_idrid, tmp_path):
    with pytest.raises(ValueError, match="IDR: the test split has no images"):
        prepare_cache("IDR", tmp_path, tmp_path / "cache", 64, roots={"IDR": fixture_idrid})
    assert_no_cache_left(tmp_path / "cache")


def test_prepare_command_line(synth_root, tmp_path):
    run = [sys.executable, "-m", "data.prepare", "--data-root", str(synth_root), "--cache", str(tmp_path)]
    ok = subprocess.run(run + ["--dataset", "mes", "ddr", "--resolution", "64"], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""  # stderr is a pipe, no terminal: no progress bar in logs
    assert "MES @ 64 px" in ok.stdout and "DDR @ 64 px" in ok.stdout and "CWS" in ok.stdout and "test" in ok.stdout
    splits = json.loads((tmp_path / "MES" / "64" / "splits.json").read_text())
    assert splits["protocol"] == "paper"
    assert sorted(sum((splits[k] for k in ("train", "val", "test")), [])) == sorted(p.stem for p in (synth_root / "MAPLES-DR").glob(IMAGES["MES"]))
    bad = subprocess.run(run + ["--dataset", "XYZ"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: --dataset: unknown dataset ID 'XYZ' (choose from IDR, DDR, FGA, RET, MES)"]
    usage = subprocess.run([sys.executable, "-m", "data.prepare", "--help"], cwd=ROOT, capture_output=True, text=True)
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
    """--out, this script's old name for --cache (older Makefiles and notes use it), still works, with a note."""
    import data.prepare

    calls = []
    monkeypatch.setattr(data.prepare, "prepare_cache", lambda ds, root, cache, R, **kw: calls.append((ds, cache, R)))
    data.prepare.main(["--dataset", "IDR+MES", "--out", str(tmp_path), "--resolution", "64"])
    assert calls == [("IDR", str(tmp_path), 64), ("MES", str(tmp_path), 64)]
    assert capsys.readouterr().err == f"note: --out is deprecated, use --cache {tmp_path}\n"
    calls.clear()
    data.prepare.main(["--dataset", "all", "--cache", str(tmp_path)])
    assert calls == [(ds, str(tmp_path), 1536) for ds in DATASET_IDS]
    with pytest.raises(ValueError, match="--out a and --cache b name two cache folders"):
        data.prepare.main(["--dataset", "IDR", "--out", "a", "--cache", "b"])


def test_lesion_centred_patches(cache_dir):
    """lesion_patches=1: every patch of an image with the chosen lesion is centred on one of its pixels."""
    ds = PreparedDataset(cache_dir, "IDR", 128, "train")
    P = 32
    for lesions in (("MA",), ("EX", "HE")):
        bits = [1 << LESIONS.index(name) for name in lesions]
        patches = PatchDataset([ds], patch=P, length=60, seed=3, augment=False, lesion_patches=1.0, lesions=lesions)
        centred = 0
        for i in range(len(patches)):
            rng = np.random.default_rng([3, i])
            _, j = patches.pick(rng)
            image_bits = np.asarray(ds.read(j)[1])
            has = any((image_bits & b).any() for b in bits)
            centre = patches[i]["masks"][:, P // 2, P // 2]  # plain crop: the centre pixel is the drawn one
            on = any(centre[LESIONS.index(name)] for name in lesions)
            assert on or not has, (lesions, i)
            centred += on
        assert centred > 30  # most synthetic images have these lesions
    with pytest.raises(ValueError, match="--lesion-patches"):
        PatchDataset([ds], lesion_patches=1.5)


def test_augment_p_and_rotate_as_the_authors_code(cache_dir, monkeypatch):
    """--augment-p P: a fraction P of the patches is augmented, the rest plain crops (the authors': 0.5); P = 1
    is the default stream, bit for bit; --rotate DEG: the rotation range an augmented patch is drawn from."""
    import data.patches as patches

    ds = PreparedDataset(cache_dir, "IDR", 128, "train")
    default = PatchDataset([ds], patch=32, length=6, seed=3)
    same = PatchDataset([ds], patch=32, length=6, seed=3, augment_p=1.0, rotate=180)
    for i in range(6):
        assert all(torch.equal(default[i][k], same[i][k]) for k in default[i])
    calls = []
    real = patches.make_patch

    def spy(image, bits, geometry, patch, rng, aug=None, centre=None):
        calls.append(None if aug is None else aug["rotate"])
        return real(image, bits, geometry, patch, rng, aug, centre)

    monkeypatch.setattr(patches, "make_patch", spy)
    half = PatchDataset([ds], patch=32, length=400, seed=0, augment_p=0.5, rotate=10)
    for i in range(len(half)):
        half[i]
    plain = sum(c is None for c in calls)
    assert 150 < plain < 250 and set(calls) == {None, 10.0}  # Binomial(400, 0.5): 200 +- 3 sd
    with pytest.raises(ValueError, match="--augment-p"):
        PatchDataset([ds], patch=32, augment_p=1.5)


# ---------------------------------------------------------------------------------------------------------
# TB: from the old tests/test_lesions.py (data.ids.parse_lesions; it belongs with data/ids.py's tests, which
# helper TA gathers in tests/test_ids.py) and tests/test_style.py (patches carry their dataset's style token)
# ---------------------------------------------------------------------------------------------------------
def test_parse_lesions_canonical_order_and_errors():
    from data import parse_lesions

    assert parse_lesions("he,ex") == ("EX", "HE")
    assert parse_lesions("MA+CWS") == ("MA", "CWS")
    with pytest.raises(ValueError, match="'SE'"):  # the unknown name
        parse_lesions("SE")
    with pytest.raises(ValueError, match="empty"):
        parse_lesions(" , ")


class FlatSet:
    """A prepared-dataset stand-in whose every pixel has one grey value and is inside the FOV."""

    def __init__(self, grey, n=3, size=32):
        self.grey, self.n, self.size = grey, n, size

    def __len__(self):
        return self.n

    def read(self, j):
        from data.cache import FOV_BIT

        return (np.full((self.size, self.size, 3), self.grey, np.uint8),
                np.full((self.size, self.size), 1 << FOV_BIT, np.uint8))

    def geometry(self, j):
        return {"size": (self.size, self.size), "pad": (0, 0)}


def test_patches_carry_their_datasets_token_and_the_plain_stream_is_unchanged():
    sets = [FlatSet(40), FlatSet(200, n=5)]
    plain = PatchDataset(sets, patch=16, length=40, seed=3, augment=False)
    tagged = PatchDataset(sets, patch=16, length=40, seed=3, augment=False, styles=[2, 0])
    seen = set()
    for i in range(len(plain)):
        a, b = plain[i], tagged[i]
        assert "style" not in a and all(torch.equal(a[k], b[k]) for k in a)
        grey = int(b["image"][0, 8, 8])  # which dataset the patch came from, read off its pixels
        assert b["style"].dtype == torch.int64 and int(b["style"]) == {40: 2, 200: 0}[grey]
        seen.add(grey)
    assert seen == {40, 200}
    batch = torch.utils.data.default_collate([tagged[i] for i in range(4)])
    assert batch["style"].shape == (4,)
    with pytest.raises(ValueError) as err:  # the two counts that disagree
        PatchDataset(sets, styles=[0])
    assert "1 style tokens" in str(err.value) and "2 datasets" in str(err.value)
