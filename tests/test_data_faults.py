"""data/: the split protocols, and faults while preparing or reading a cache (full disk, damaged files,
black images, datasets one folder too deep).

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_data_faults.py

References are independent of the code under test: the authors' draw is re-written here from nntools'
random_split (randperm, then consecutive slices), sizes are the ones their code gives on the real datasets.
"""
import errno
import io
import json
import re
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import data.datasets
import data.prepare
from data import LESIONS, PreparedDataset, prepare_cache
from data.datasets import Sample, dataset_root, list_samples, load_sample
from data.splits import make_splits

FOLDER = {"IDR": "IDRiD", "DDR": "DDR-dataset", "FGA": "Seg-set", "RET": "retinal-lesions-v20191227",
          "MES": "MAPLES-DR"}


def _samples(ids, split=None):
    return [Sample(x, Path(f"{x}.jpg"), {}, split(x) if split else None) for x in ids]


def _nntools_split(items, lengths):
    """nntools.dataset.utils.ops.random_split, written out: randperm with a fresh seed-42 generator, then
    consecutive slices of the permutation, each part in permuted order."""
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(42)).tolist()
    parts, offset = [], 0
    for n in lengths:
        parts.append([items[k] for k in perm[offset:offset + n]])
        offset += n
    return parts


# ----------------------------------------------------------------------------- split protocols

@pytest.mark.parametrize("ds, N, sizes", [("FGA", 1842, (1253, 220, 369)), ("RET", 1593, (1083, 191, 319))])
def test_authors_protocol_sizes_on_real_sized_id_lists(ds, N, sizes):
    ids = [f"{k:05d}_{'left' if k % 3 else 'right'}" for k in np.random.default_rng(1).permutation(N)]
    s = make_splits(_samples(ids), ds, protocol="authors")
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == sizes
    assert len(s["train"]) + len(s["val"]) == {"FGA": 1473, "RET": 1274}[ds]
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(ids)


@pytest.mark.parametrize("ds, n_train, n_test, sizes", [("IDR", 54, 27, (46, 8)), ("MES", 138, 60, (118, 20))])
def test_authors_protocol_official_train_gives_validation(ds, n_train, n_test, sizes):
    ids = [f"img_{k:03d}" for k in range(n_train + n_test)]
    s = make_splits(_samples(ids, lambda x: "train" if int(x[4:]) < n_train else "test"), ds, protocol="authors")
    assert (len(s["train"]), len(s["val"])) == sizes and s["test"] == ids[n_train:]
    # MES under the paper protocol stays a seeded 30 % test draw
    assert len(make_splits(_samples(ids, lambda x: "train"), "MES")["test"]) == round(0.3 * len(ids))


def test_authors_protocol_membership_matches_an_independent_randperm_draw():
    ids = [f"im{k:02d}" for k in range(23)]
    trainval, test = _nntools_split(sorted(ids), [int(0.8 * 23), 23 - int(0.8 * 23)])  # 18 / 5
    n = len(trainval)
    train, val = _nntools_split(trainval, [n - int(0.15 * n), int(0.15 * n)])  # 16 / 2
    s = make_splits(_samples(ids[::-1]), "FGA", protocol="authors")
    assert s == {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    # The validation draw is over the train part in its permuted order (nntools' subset keeps it): a draw
    # over the sorted train part would pick other images.
    assert sorted(_nntools_split(sorted(trainval), [n - int(0.15 * n), int(0.15 * n)])[1]) != s["val"]
    ddr = make_splits(_samples(ids, lambda x: ("train", "val", "test")[int(x[2:]) % 3]), "DDR", protocol="authors")
    assert ddr["val"] == [x for x in ids if int(x[2:]) % 3 == 1]  # DDR: the official valid folder


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


def test_split_protocol_is_recorded_and_re_prepares_the_cache(synth_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepare_cache("FGA", synth_root, cache, 32, verbose=False)
    splits = json.loads((cache / "FGA/32/splits.json").read_text())
    assert splits["protocol"] == "paper"
    prepare_cache("FGA", synth_root, cache, 32, split_protocol="authors", verbose=False)
    splits = json.loads((cache / "FGA/32/splits.json").read_text())
    meta = json.loads((cache / "FGA/32/meta.json").read_text())
    assert splits["protocol"] == meta["options"]["split_protocol"] == "authors"
    ids = sorted(meta["ids"])
    trainval, test = _nntools_split(ids, [int(0.8 * 12), 12 - int(0.8 * 12)])
    assert splits["test"] == sorted(test)
    with pytest.raises(FileNotFoundError, match=re.escape("--split-protocol paper (cache: authors)")):
        prepare_cache("FGA", tmp_path / "gone", cache, 32, verbose=False)
    # splits.json is a valid --splits file (its "protocol" entry is ignored)
    s = make_splits(list_samples("FGA", synth_root / "Seg-set"), "FGA", split_file=str(cache / "FGA/32/splits.json"))
    assert s["test"] == splits["test"]


# ----------------------------------------------------------------------------- full disk

def _usage(free):
    return lambda path: namedtuple("usage", "total used free")(10 ** 12, 0, free)


def test_not_enough_free_space_is_one_line_and_leaves_nothing(synth_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(data.prepare.shutil, "disk_usage", _usage(10 << 20))
    with pytest.raises(ValueError) as err:
        prepare_cache("MES", synth_root, cache, 64, verbose=False)
    msg = str(err.value)
    need = 12 * 64 * 64 * 4 * 1.02 + (64 << 20)
    assert msg.startswith(f"not enough free space in {cache / 'MES'}: the 12 images at 64 px need "
                          f"{need / 1e9:.2f} GB, 0.01 GB are free") and "\n" not in msg, msg
    assert not cache.exists()  # the folders this call created are gone too


def test_enospc_while_writing_removes_the_temporary_folder_and_keeps_the_old_cache(synth_root, tmp_path,
                                                                                    monkeypatch):
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
        prepare_cache("MES", synth_root, cache, 64, thresholds={"MES": 10}, verbose=False, workers=1)
    msg = str(err.value)
    assert msg.startswith(f"no space left in {cache / 'MES'} while preparing {cache / 'MES/64'}") and "\n" not in msg
    assert sorted(p.name for p in (cache / "MES").iterdir()) == ["64"]  # no .tmp-* left
    assert (cache / "MES/64/meta.json").read_text() == before
    monkeypatch.setattr(data.prepare, "preprocess_sample", real)
    monkeypatch.setattr(data.prepare.os, "posix_fallocate",  # the reservation itself finds the disk full
                        lambda fd, off, n: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(ValueError, match="no space left in"):
        prepare_cache("MES", synth_root, cache, 64, thresholds={"MES": 10}, verbose=False)
    assert sorted(p.name for p in (cache / "MES").iterdir()) == ["64"]


# ----------------------------------------------------------------------------- damaged caches

@pytest.fixture()
def small_cache(synth_root, tmp_path):
    cache = tmp_path / "cache"
    prepare_cache("DDR", synth_root, cache, 32, verbose=False)
    return cache, cache / "DDR" / "32"


def _command(folder):
    return f"python -m data.prepare --dataset DDR --cache {folder.parent.parent} --resolution 32"


def test_truncated_array_is_one_line_then_prepared_again(synth_root, small_cache, capsys):
    cache, out = small_cache
    images = out / "images.npy"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    ds = PreparedDataset(cache, "DDR", 32, "test")
    with pytest.raises(ValueError) as err:
        ds[0]
    msg = str(err.value)
    assert msg.startswith(f"{images} is damaged (images.npy is ") and _command(out) in msg and "\n" not in msg, msg
    prepare_cache("DDR", synth_root, cache, 32)
    printed = capsys.readouterr().out
    assert f"note: {out} is damaged (images.npy is" in printed and "prepared 12 images" in printed
    assert PreparedDataset(cache, "DDR", 32, "test")[0]["image"].shape == (32, 32, 3)


@pytest.mark.parametrize("name", ["meta.json", "splits.json"])
@pytest.mark.parametrize("garbage", [b"{\"ids\": [1, 2", b"\xff\xfe\x00garbage", b"[1, 2, 3]"])
def test_garbled_json_is_one_line_then_prepared_again(synth_root, small_cache, capsys, name, garbage):
    cache, out = small_cache
    (out / name).write_bytes(garbage)
    with pytest.raises(ValueError) as err:
        PreparedDataset(cache, "DDR", 32, "train")
    msg = str(err.value)
    assert msg.startswith(f"{out / name} is ") and _command(out) in msg and "\n" not in msg, msg
    prepare_cache("DDR", synth_root, cache, 32)
    assert f"note: {out} is damaged" in capsys.readouterr().out
    assert len(PreparedDataset(cache, "DDR", 32, "train")) > 0


def test_garbled_cache_without_sources_is_one_line(small_cache, tmp_path):
    cache, out = small_cache
    (out / "meta.json").write_text("not json")
    with pytest.raises(ValueError) as err:
        prepare_cache("DDR", tmp_path / "gone", cache, 32, verbose=False)
    msg = str(err.value)
    assert msg.startswith(f"DDR sources not found, and {out / 'meta.json'} is not valid JSON") and "\n" not in msg


# ----------------------------------------------------------------------------- black images

def test_black_image_warns_naming_it_and_the_summary_stays_sane(synth_root, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(synth_root / "Seg-set", raw / "Seg-set")
    black = sorted((raw / "Seg-set/Original_Images").glob("*.png"))[3]
    w, h = Image.open(black).size
    Image.new("RGB", (w, h)).save(black)
    lesion = np.zeros((h, w), np.uint8)
    lesion[: h // 2] = 255  # a lesion mask over half the black image: 0 FOV pixels, many lesion pixels
    Image.fromarray(lesion).save(raw / "Seg-set/Hemohedge_Masks" / black.name)
    out = prepare_cache("FGA", raw, tmp_path / "cache", 64)
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {black}: no field of view found (black or blank image?); it has no pixel to "
                        f"train on or to score"], captured.err
    meta = json.loads((out / "meta.json").read_text())
    row = meta["ids"].index(black.stem)
    assert meta["fov_pixels"][row] == 0 and meta["lesion_pixels"][row][1] > 0
    shares = [float(x) for x in re.findall(r"(\d+\.\d+)%", captured.out)]
    assert len(shares) == 12 and all(0 <= x <= 100 for x in shares), captured.out
    # The reference: lesion pixels inside the FOV over FOV pixels, per split, from the cached bitmasks.
    splits = json.loads((out / "splits.json").read_text())
    ds = PreparedDataset(tmp_path / "cache", "FGA", 64, "all")
    for k, name in enumerate(("train", "val", "test")):
        items = [ds[ds.ids.index(x)] for x in splits[name]]
        fov = sum(int(it["fov"].sum()) for it in items)
        he = sum(int((it["masks"][1] & it["fov"]).sum()) for it in items)
        assert shares[4 * k + 1] == pytest.approx(100 * he / fov, abs=0.006)


# ----------------------------------------------------------------------------- dataset one folder too deep

@pytest.mark.parametrize("wrapper", ["IDRiD", "idrid", "downloads"])
def test_dataset_one_level_deeper_is_found(synth_root, tmp_path, wrapper):
    data_root = tmp_path / "DATA"
    shutil.copytree(synth_root / "IDRiD", data_root / wrapper / "IDRiD")
    root = dataset_root("IDR", data_root)
    assert root == data_root / wrapper / "IDRiD"
    assert len(list_samples("IDR", root)) == 12
    out = prepare_cache("IDR", data_root, tmp_path / "cache", 32, verbose=False)
    assert len(PreparedDataset(tmp_path / "cache", "IDR", 32, "all")) == 12 and out.is_dir()
    # --root naming the wrapper works too
    assert dataset_root("IDR", tmp_path / "nowhere", {"IDR": str(data_root / wrapper)}) == root


def test_dataset_not_found_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("FGA_ROOT", raising=False)
    (tmp_path / "DATA" / "fgadr").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        dataset_root("FGA", tmp_path / "DATA")
    msg = str(err.value)
    assert msg.startswith(f"FGA dataset not found: expected folder {tmp_path / 'DATA/Seg-set'} (") and "\n" not in msg
    assert msg.endswith(f"also looked in {tmp_path / 'DATA/Seg-set/Seg-set'} and {tmp_path / 'DATA/*/Seg-set'})")


def test_two_copies_one_level_down_is_ambiguous(synth_root, tmp_path):
    for wrapper in ("a", "b"):
        shutil.copytree(synth_root / "MAPLES-DR", tmp_path / "DATA" / wrapper / "MAPLES-DR")
    with pytest.raises(ValueError, match=re.escape("MES: several copies found (")):
        dataset_root("MES", tmp_path / "DATA")


# ------------------------------------------------------------------ files that read wrong silently

GT_TRAIN = "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set"


def _one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def _warnings(capsys):
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]


@pytest.mark.parametrize("old, new", [("3. Hard Exudates", "3. Hard Exudate"),  # a close name
                                      ("1. Microaneurysms", "MA masks"),  # its IDRiD_NN_MA.tif
                                      ("4. Soft Exudates", "scans")])  # not told at all
def test_idr_renamed_lesion_folder_is_an_error_naming_it(synth_root, tmp_path, old, new):
    """Read as it is, a renamed lesion folder is "no such lesion in any image": one line naming the
    folder found and the name IDRiD gives it (or the missing one), and no cache written."""
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    (root / GT_TRAIN / old).rename(root / GT_TRAIN / new)
    if new == "scans":  # images not named as IDRiD masks: which lesion it was cannot be told
        for f in (root / GT_TRAIN / new).iterdir():
            f.rename(f.with_name(f"scan_{f.stem[-5:-3]}.tif"))
    with pytest.raises(ValueError) as err:
        list_samples("IDR", root)
    msg = _one_line(err)
    assert str(root / GT_TRAIN / new) in msg and f"'{old}'" in msg, msg
    with pytest.raises(ValueError, match=re.escape(str(root / GT_TRAIN / new))):
        prepare_cache("IDR", tmp_path, tmp_path / "cache", 32, verbose=False)
    assert not (tmp_path / "cache" / "IDR" / "32").exists()


def test_idr_renamed_mask_files_are_an_error(synth_root, tmp_path):
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    folder = root / GT_TRAIN / "2. Haemorrhages"
    for f in folder.iterdir():  # IDRiD_01_HE.tif -> IDRiD_01.tif: no image would find its mask
        f.rename(f.with_name(f.name.replace("_HE", "")))
    with pytest.raises(ValueError) as err:
        list_samples("IDR", root)
    assert str(folder) in _one_line(err) and "_HE.tif" in _one_line(err)


def test_idr_absent_lesion_folder_warns_once_per_preparation(synth_root, fixture_idrid, tmp_path,
                                                             capsys):
    """An absent lesion folder reads as "lesion absent" (the real sample has only 2. Haemorrhages),
    with one warning naming the folder per preparation, not one per image."""
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    shutil.rmtree(root / GT_TRAIN / "1. Microaneurysms")
    (root / GT_TRAIN / "notes").mkdir()  # a folder without images is not taken for a lesion's
    (root / GT_TRAIN / "notes" / "todo.txt").write_text("check IDRiD_03")
    capsys.readouterr()
    prepare_cache("IDR", tmp_path, tmp_path / "cache", 32, verbose=False)
    assert _warnings(capsys) == [f"warning: IDR: no '1. Microaneurysms' in {root / GT_TRAIN}: MA "
                                 f"read as absent from every image there"]
    assert all(s.masks["MA"] == () for s in list_samples("IDR", root) if s.split == "train")
    capsys.readouterr()
    list_samples("IDR", fixture_idrid)
    (line,) = _warnings(capsys)
    assert "no '1. Microaneurysms', '3. Hard Exudates', '4. Soft Exudates' in" in line
    assert line.endswith(": MA, EX, CWS read as absent from every image there")


@pytest.mark.parametrize("ds, folder", [
    ("IDR", "A. Segmentation/1. Original Images/a. Training Set"),
    ("DDR", "lesion_segmentation/train/label/HE"),
    ("MES", "train/fundus")])
def test_two_files_of_one_stem_are_an_error_naming_both(synth_root, tmp_path, ds, folder):
    """IDRiD_01.jpg beside IDRiD_01.png: which photograph (or mask) is the id's is ambiguous."""
    root = tmp_path / FOLDER[ds]
    shutil.copytree(synth_root / FOLDER[ds], root)
    first, second = sorted((root / folder).iterdir())[:2]
    twin = first.with_suffix(".png" if first.suffix != ".png" else ".tif")
    shutil.copy(second, twin)  # another file under the first one's id
    with pytest.raises(ValueError) as err:
        list_samples(ds, root)
    msg = _one_line(err)
    assert str(root / folder) in msg and first.name in msg and twin.name in msg, msg


def _jpeg_round_trip(mask_file, mode):
    """The mask as a JPEG (quality 90) stores it, decoded again: (H, W) or (H, W, 3) uint8."""
    buf = io.BytesIO()
    Image.open(mask_file).convert(mode).save(buf, "JPEG", quality=90)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def test_jpeg_masks_are_an_error_naming_the_file(synth_root, tmp_path):
    """Masks re-saved as JPEG: compression noise at values 1..31 would count as lesion at the
    default threshold (here MA covers many times its pixels). A .jpg mask is one line naming it;
    --mask-threshold ID=127 reads it (lesion = brighter than 127, as plain PIL says)."""
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    s = next(s for s in list_samples("IDR", root) if s.masks["MA"])
    tif, jpg = s.masks["MA"][0], s.masks["MA"][0].with_suffix(".jpg")
    red = _jpeg_round_trip(tif, "RGB")  # IDRiD's red palette mask, saved as an RGB JPEG
    assert (red.max(-1) > 0).sum() > 5 * (np.asarray(Image.open(tif)) > 0).sum()  # noise swamps MA
    tif.unlink()
    Image.fromarray(red).save(jpg, quality=90)
    sample = next(x for x in list_samples("IDR", root) if x.id == s.id)  # now with the .jpg
    with pytest.raises(ValueError) as err:
        load_sample(sample)
    msg = _one_line(err)
    assert msg.startswith(f"mask {jpg} is a JPEG: ") and "--mask-threshold IDR=127" in msg, msg
    with pytest.raises(ValueError, match=re.escape(str(jpg))):
        prepare_cache("IDR", tmp_path, tmp_path / "cache", 32, verbose=False)
    assert not (tmp_path / "cache" / "IDR" / "32").exists()
    want = np.asarray(Image.open(jpg).convert("RGB")).max(-1) > 127
    assert want.any() and np.array_equal(load_sample(sample, 127)[1][LESIONS.index("MA")], want)


@pytest.mark.parametrize("soften", ["jpeg", "bilinear", "blur"])
def test_grey_levels_of_jpeg_noise_in_a_png_warn_once(synth_root, tmp_path, capsys, monkeypatch,
                                                      soften):
    """A JPEG's noise inside a PNG (1-bit MAPLES-DR masks that went through JPEG) is told by its
    grey levels, faint ones and few mid ones: one warning naming the first such file of the
    dataset. Edges resampled (bilinear) or blurred have as many levels, spread evenly: read as
    they are, without a word."""
    monkeypatch.setattr(data.datasets, "_NOISY", set(), raising=False)
    mes = tmp_path / "MAPLES-DR"
    shutil.copytree(synth_root / "MAPLES-DR", mes)
    samples = [s for s in list_samples("MES", mes)
               if (np.asarray(Image.open(s.masks["EX"][0])) > 0).sum() > 200]
    for s in samples:
        im = Image.open(s.masks["EX"][0]).convert("L")  # 0 / 255
        if soften == "jpeg":
            soft = _jpeg_round_trip(s.masks["EX"][0], "L")
        elif soften == "bilinear":
            big = im.resize((3 * im.width, 3 * im.height), Image.BILINEAR)
            soft = np.asarray(big.resize(im.size, Image.BILINEAR))
        else:
            soft = np.rint(ndimage.gaussian_filter(np.asarray(im, float), 1.0)).astype(np.uint8)
        assert len(np.unique(soft)) > 20  # many grey levels
        Image.fromarray(soft).save(s.masks["EX"][0])
    capsys.readouterr()
    for s in samples:
        assert np.array_equal(load_sample(s)[1][0], np.asarray(Image.open(s.masks["EX"][0])) > 0)
    warnings = _warnings(capsys)
    if soften == "jpeg":
        assert len(samples) >= 2 and len(warnings) == 1, warnings
        assert warnings[0].startswith(f"warning: mask {samples[0].masks['EX'][0]}: ")
        assert "--mask-threshold MES=127" in warnings[0]
    else:
        assert warnings == []


def test_dataset_mask_encodings_are_not_compression_noise(synth_root, capsys, monkeypatch):
    """What the datasets ship reads without a word: FGADR's anti-aliased fringe, RET's 127/255,
    IDRiD's palette, DDR's 1 or 255, MAPLES-DR's 1-bit PNG."""
    monkeypatch.setattr(data.datasets, "_NOISY", set(), raising=False)
    capsys.readouterr()
    for ds in FOLDER:
        for s in list_samples(ds, dataset_root(ds, synth_root)):
            load_sample(s)
    assert _warnings(capsys) == []


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_orientation_turns_the_image_and_its_masks_the_same_way(synth_root, tmp_path):
    """A photograph stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to show it)
    is read as viewers show it. Masks drawn on what viewers show are read as they are; masks drawn
    on the stored pixels (their size fits only the stored image) are turned like it; a mask with its
    own tag is turned by it; a mask fitting neither is one line naming both files and the tag."""
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    s = next(s for s in list_samples("IDR", root) if s.masks["HE"] and s.masks["EX"])
    shown = np.asarray(Image.open(s.image).convert("RGB"))  # (H, W, 3), H != W
    want_masks = load_sample(s)[1]  # (4, H, W)
    Image.fromarray(np.rot90(shown, 1).copy()).save(s.image, quality=95, exif=_exif(6))
    stored = np.asarray(Image.open(s.image).convert("RGB"))  # (W, H, 3) as decoded, not turned
    assert stored.shape == (shown.shape[1], shown.shape[0], 3)
    image, masks = load_sample(s)
    assert np.array_equal(image, np.rot90(stored, -1))  # turned clockwise: upright again
    assert np.array_equal(masks, want_masks)  # masks as shown: read as they are
    # HE drawn on the stored pixels: turned like the photograph
    he = np.asarray(Image.open(s.masks["HE"][0]).convert("L"))
    Image.fromarray(np.rot90(he, 1).copy()).save(s.masks["HE"][0])
    # EX stored sideways the other way, as a PNG with its own tag (8: turn counter-clockwise)
    ex = np.asarray(Image.open(s.masks["EX"][0]).convert("L"))
    s.masks["EX"][0].unlink()
    Image.fromarray(np.rot90(ex, -1).copy()).save(s.masks["EX"][0].with_suffix(".png"),
                                                  exif=_exif(8))
    s = next(x for x in list_samples("IDR", root) if x.id == s.id)
    assert np.array_equal(load_sample(s)[1], want_masks)
    Image.fromarray(he[:-2]).save(s.masks["HE"][0])  # fits neither
    with pytest.raises(ValueError) as err:
        load_sample(s)
    msg = _one_line(err)
    assert str(s.masks["HE"][0]) in msg and str(s.image) in msg and "EXIF orientation 6" in msg
