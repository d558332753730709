"""data/datasets.py: one adapter per dataset (the distributed files -> samples, decoding), and the
files that read wrong silently (missing, renamed, doubled, JPEG-damaged, turned by EXIF, one folder
too deep).

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_datasets.py
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_datasets.py -k real   # real IDRiD

References are independent of the code under test: file paths spelled out per layout, masks decoded
with plain PIL.
"""
import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import data.datasets
from data.cache import PreparedDataset
from data.datasets import annotated, dataset_root, list_samples, load_masks, load_sample
from data.ids import DATASET_IDS, LESIONS
from data.prepare import prepare_cache

IMAGES = {"IDR": "A. Segmentation/1. Original Images/*/*.jpg",
          "DDR": "lesion_segmentation/*/image/*.jpg", "FGA": "Original_Images/*.png",
          "RET": "images_896x896/*.jpg", "MES": "*/fundus/*.jpg"}
GT_TRAIN = "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set"


def expected_mask_files(ds, root, image):
    """The mask files of one image, spelled out from docs/PROTOCOL.md (absent files included)."""
    sid = image.stem
    if ds == "IDR":
        gt = root / "A. Segmentation" / "2. All Segmentation Groundtruths" / image.parent.name
        return {"EX": [gt / "3. Hard Exudates" / f"{sid}_EX.tif"],
                "HE": [gt / "2. Haemorrhages" / f"{sid}_HE.tif"],
                "MA": [gt / "1. Microaneurysms" / f"{sid}_MA.tif"],
                "CWS": [gt / "4. Soft Exudates" / f"{sid}_SE.tif"]}
    if ds == "DDR":
        split = image.parents[1]
        lab = split / ("segmentation label" if split.name == "valid" else "label")
        return {les: [lab / code / f"{sid}.tif"]
                for les, code in zip(LESIONS, ("EX", "HE", "MA", "SE"))}
    if ds == "FGA":
        folders = ("HardExudate_Masks", "Hemohedge_Masks", "Microaneurysms_Masks",
                   "SoftExudate_Masks")
        return {les: [root / d / f"{sid}.png"] for les, d in zip(LESIONS, folders)}
    if ds == "RET":
        d = root / "lesion_segs_896x896" / sid
        return {les: [d / f"{n}.png"] for les, n in zip(
            LESIONS, ("hard_exudate", "retinal_hemorrhage", "microaneurysm", "cotton_wool_spots"))}
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


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def warnings_of(capsys):
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]


# ----------------------------------------------------------------------- adapters on synthetic data

@pytest.mark.parametrize("ds", DATASET_IDS)
def test_adapter_ids_images_and_masks(synth_root, dataset_folders, ds):
    root = synth_root / dataset_folders[ds]
    images = sorted(root.glob(IMAGES[ds]), key=lambda p: p.stem)
    samples = list_samples(ds, dataset_root(ds, synth_root))
    assert [s.id for s in samples] == [p.stem for p in images] and len(samples) == 12
    for s, path in zip(samples[:6], images[:6]):
        image, masks = load_sample(s)
        ref = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(image, ref)
        assert masks.dtype == bool and masks.shape == (4,) + ref.shape[:2]
        want = reference_masks(expected_mask_files(ds, root, path), ref.shape[:2])
        assert np.array_equal(masks, want)


def test_idr_absent_mask_files_are_zeros(synth_root):
    root = synth_root / "IDRiD"
    absent = [(s, les) for s in list_samples("IDR", root)
              for les, files in s.masks.items() if not files]
    assert absent, "the synthetic IDRiD should lack some mask files"
    s, les = absent[0]
    assert not any(f.exists() for f in expected_mask_files("IDR", root, s.image)[les])
    assert not load_sample(s)[1][LESIONS.index(les)].any()


def test_ddr_valid_split_reads_segmentation_label(synth_root):
    samples = list_samples("DDR", synth_root / "DDR-dataset")
    val = [s for s in samples if s.split == "val"]
    valid_images = synth_root / "DDR-dataset/lesion_segmentation/valid/image"
    assert len(val) == len(list(valid_images.glob("*.jpg"))) > 0
    assert all("segmentation label" in str(f)
               for s in val for files in s.masks.values() for f in files)
    # DDR ships all four files
    assert all(len(files) == 1 for s in samples for files in s.masks.values())


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
        pytest.fail("no retinal_hemorrhage.png with both 127 and 255 in the synthetic "
                    "Retinal-Lesions")
    he, size = LESIONS.index("HE"), Image.open(s.image).size
    assert load_masks(s, size)[he].sum() == (grey > 0).sum()
    # --mask-threshold RET=127
    assert load_masks(s, size, threshold=127)[he].sum() == (grey == 255).sum()
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
    merged = load_sample(list_samples("RET", root, ret_he="all")[0])[1][he]
    assert np.array_equal(merged, base | (extra > 0))
    # An image without a mask folder: all-zero masks, no error.
    shutil.rmtree(folder)
    s = list_samples("RET", root)[0]
    assert all(files == () for files in s.masks.values()) and not load_sample(s)[1].any()


MISSING = {  # dataset -> what is removed (relative to its root) and whether that is an error
    "DDR folder": ("DDR", "lesion_segmentation/valid/segmentation label",
                   "lesion_segmentation/valid/segmentation label/EX"),
    "DDR lesion folder": ("DDR", "lesion_segmentation/train/label/HE",
                          "lesion_segmentation/train/label/HE"),
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
def test_missing_mask_folder_or_file_is_an_error(synth_root, tmp_path, dataset_folders,
                                                 no_cache_left, case):
    """A renamed or deleted mask folder (or a missing file where the dataset ships all four) must
    not read as lesion-free images: one-line FileNotFoundError naming what is missing."""
    ds, remove, named = MISSING[case]
    root = tmp_path / dataset_folders[ds]
    shutil.copytree(synth_root / dataset_folders[ds], root)
    if "*" in remove:  # one file: the error names exactly that file
        target = sorted(root.glob(remove))[1]
        target.unlink()
        named = target.relative_to(root)
    else:
        shutil.rmtree(root / remove)
    with pytest.raises(FileNotFoundError) as err:
        list_samples(ds, root)
    assert str(root / named) in one_line(err)
    with pytest.raises(FileNotFoundError) as err:
        prepare_cache(ds, tmp_path, tmp_path / "cache", 64)
    assert str(root / named) in str(err.value)
    no_cache_left(tmp_path / "cache")


def test_idr_missing_lesion_folder_is_not_annotated_and_ret_missing_image_folder_lesion_free(
        synth_root, tmp_path):
    """An IDRiD copy without a lesion's folder does not annotate that lesion (no key: left out of
    the loss and the scores, not a negative); Retinal-Lesions has no folder for a lesion-free image:
    all-zero, no error."""
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    shutil.rmtree(root / GT_TRAIN / "4. Soft Exudates")
    train = [s for s in list_samples("IDR", root) if s.split == "train"]
    assert train and all("CWS" not in s.masks for s in train) and any(s.masks["HE"] for s in train)
    assert all(annotated(s) == ("EX", "HE", "MA") for s in train)
    ret = tmp_path / "retinal-lesions-v20191227"
    shutil.copytree(synth_root / "retinal-lesions-v20191227", ret)
    victim = min((ret / "lesion_segs_896x896").iterdir())
    shutil.rmtree(victim)
    s = {s.id: s for s in list_samples("RET", ret)}[victim.name]
    assert all(files == () for files in s.masks.values())


def test_mask_size_mismatch_names_the_mask(synth_root, tmp_path, no_cache_left):
    root = tmp_path / "raw"
    shutil.copytree(synth_root / "MAPLES-DR", root / "MAPLES-DR")
    bad = sorted((root / "MAPLES-DR" / "train" / "hemorrhages").glob("*.png"))[1]
    Image.new("1", (50, 40)).save(bad)
    with pytest.raises(ValueError) as err:
        prepare_cache("MES", root, tmp_path / "cache", 64)
    msg = one_line(err)
    assert str(bad) in msg and "50x40" in msg, msg
    no_cache_left(tmp_path / "cache")


# ---------------------------------------------------------------------------- the real IDRiD sample

def test_real_idrid_adapter(fixture_idrid):
    samples = list_samples("IDR", fixture_idrid)
    # tests/fixtures/idrid-4l14: IDRiD_01-08, 10, 12, 14-17, downscaled 4x from 4288x2848
    numbers = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15, 16, 17]
    assert [s.id for s in samples] == [f"IDRiD_{n:02d}" for n in numbers]
    # every image has EX, HE and MA files; SE (CWS) only 03, 08, 14 and 17 (the fixture's README)
    assert all(s.split == "train" and all(len(s.masks[les]) == 1 for les in ("EX", "HE", "MA"))
               for s in samples)
    assert [s.id for s in samples if s.masks["CWS"]] == [f"IDRiD_{n:02d}" for n in (3, 8, 14, 17)]
    assert all(annotated(s) == tuple(LESIONS) for s in samples)
    image, masks = load_sample(samples[2])  # IDRiD_03: all four
    assert image.shape == (712, 1072, 3) and masks.shape == (4, 712, 1072)
    for c, les in enumerate(LESIONS):  # palette indices {0, 1}
        mask = np.asarray(Image.open(samples[2].masks[les][0]))
        assert set(np.unique(mask)) == {0, 1} and masks[c].sum() == (mask > 0).sum() > 0, les


# ---------------------------------------------------------------------- dataset one folder too deep

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
    msg = one_line(err)
    assert msg.startswith("FGA"), msg
    # the folder expected, and the two places one level down where it also looked; each as itself,
    # not only as the start of a longer path
    for where in ("DATA/Seg-set", "DATA/Seg-set/Seg-set", "DATA/*/Seg-set"):
        assert re.search(re.escape(str(tmp_path / where)) + r"(?![/\w])", msg), (where, msg)


def test_two_copies_one_level_down_is_ambiguous(synth_root, tmp_path):
    for wrapper in ("a", "b"):
        shutil.copytree(synth_root / "MAPLES-DR", tmp_path / "DATA" / wrapper / "MAPLES-DR")
    with pytest.raises(ValueError) as err:
        dataset_root("MES", tmp_path / "DATA")
    msg = one_line(err)
    assert msg.startswith("MES") and "several copies" in msg and "--root MES=DIR" in msg, msg
    assert all(str(tmp_path / "DATA" / w / "MAPLES-DR") in msg for w in "ab"), msg


# ------------------------------------------------------------------ files that read wrong silently

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
    msg = one_line(err)
    assert str(root / GT_TRAIN / new) in msg and f"'{old}'" in msg, msg
    with pytest.raises(ValueError) as err:
        prepare_cache("IDR", tmp_path, tmp_path / "cache", 32, verbose=False)
    assert str(root / GT_TRAIN / new) in str(err.value)
    assert not (tmp_path / "cache" / "IDR" / "32").exists()


def test_idr_renamed_mask_files_are_an_error(synth_root, tmp_path):
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    folder = root / GT_TRAIN / "2. Haemorrhages"
    for f in folder.iterdir():  # IDRiD_01_HE.tif -> IDRiD_01.tif: no image would find its mask
        f.rename(f.with_name(f.name.replace("_HE", "")))
    with pytest.raises(ValueError) as err:
        list_samples("IDR", root)
    assert str(folder) in one_line(err) and "_HE.tif" in one_line(err)


def test_idr_absent_lesion_folder_warns_once_per_preparation(synth_root, fixture_idrid, tmp_path,
                                                             capsys):
    """An absent lesion folder: the lesion is not annotated there, with one warning naming the
    folder per preparation, not one per image."""
    root = tmp_path / "IDRiD"
    shutil.copytree(synth_root / "IDRiD", root)
    shutil.rmtree(root / GT_TRAIN / "1. Microaneurysms")
    (root / GT_TRAIN / "notes").mkdir()  # a folder without images is not taken for a lesion's
    (root / GT_TRAIN / "notes" / "todo.txt").write_text("check IDRiD_03")
    capsys.readouterr()
    prepare_cache("IDR", tmp_path, tmp_path / "cache", 32, verbose=False)
    (line,) = warnings_of(capsys)  # one warning for the whole preparation
    assert "'1. Microaneurysms'" in line and str(root / GT_TRAIN) in line and "MA" in line, line
    assert "notes" not in line, line
    assert all("MA" not in s.masks for s in list_samples("IDR", root) if s.split == "train")
    capsys.readouterr()
    list_samples("IDR", fixture_idrid)  # all four folders: no warning
    assert not warnings_of(capsys)


@pytest.mark.parametrize("ds, folder", [
    ("IDR", "A. Segmentation/1. Original Images/a. Training Set"),
    ("DDR", "lesion_segmentation/train/label/HE"),
    ("MES", "train/fundus")])
def test_two_files_of_one_stem_are_an_error_naming_both(synth_root, tmp_path, dataset_folders, ds,
                                                        folder):
    """IDRiD_01.jpg beside IDRiD_01.png: which photograph (or mask) is the id's is ambiguous."""
    root = tmp_path / dataset_folders[ds]
    shutil.copytree(synth_root / dataset_folders[ds], root)
    first, second = sorted((root / folder).iterdir())[:2]
    twin = first.with_suffix(".png" if first.suffix != ".png" else ".tif")
    shutil.copy(second, twin)  # another file under the first one's id
    with pytest.raises(ValueError) as err:
        list_samples(ds, root)
    msg = one_line(err)
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
    msg = one_line(err)
    assert str(jpg) in msg and "JPEG" in msg and "--mask-threshold IDR=127" in msg, msg
    with pytest.raises(ValueError) as err:
        prepare_cache("IDR", tmp_path, tmp_path / "cache", 32, verbose=False)
    assert str(jpg) in str(err.value)
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
    warnings = warnings_of(capsys)
    if soften == "jpeg":
        assert len(samples) >= 2 and len(warnings) == 1, warnings
        assert str(samples[0].masks["EX"][0]) in warnings[0]  # the first such file
        assert "--mask-threshold MES=127" in warnings[0]
    else:
        assert warnings == []


def test_dataset_mask_encodings_are_not_compression_noise(synth_root, capsys, monkeypatch):
    """What the datasets ship reads without a word: FGADR's anti-aliased fringe, RET's 127/255,
    IDRiD's palette, DDR's 1 or 255, MAPLES-DR's 1-bit PNG."""
    monkeypatch.setattr(data.datasets, "_NOISY", set(), raising=False)
    capsys.readouterr()
    for ds in DATASET_IDS:
        for s in list_samples(ds, dataset_root(ds, synth_root)):
            load_sample(s)
    assert warnings_of(capsys) == []


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
    msg = one_line(err)
    assert str(s.masks["HE"][0]) in msg and str(s.image) in msg and "EXIF orientation 6" in msg
