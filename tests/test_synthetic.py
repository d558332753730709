"""data/synthetic.py: the five distributed layouts and encodings, determinism, what the masks mark,
and the labelling-style contrast (fine IDR vs coarse RET) measured with scipy.ndimage.label."""
import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
EIGHT = np.ones((3, 3), bool)  # 8-connectivity
N_IMAGES = 10


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """All five datasets, 10 images each at 128 px."""
    out = tmp_path_factory.mktemp("synthetic")
    roots = generate(out, images=N_IMAGES, size=128, seed=0)
    assert {k: v.name for k, v in roots.items()} == {
        "IDR": "IDRiD", "DDR": "DDR-dataset", "FGA": "Seg-set", "RET": "retinal-lesions-v20191227",
        "MES": "MAPLES-DR"}
    return out


def read(path):
    with Image.open(path) as im:
        return im.format, im.mode, np.asarray(im)


def idr_masks(synth):
    """[(image (H, W, 3), {code: bool mask or None when the file is absent})] for every IDR
    image."""
    seg = synth / "IDRiD" / "A. Segmentation"
    folders = {"MA": "1. Microaneurysms", "HE": "2. Haemorrhages", "EX": "3. Hard Exudates",
               "SE": "4. Soft Exudates", "OD": "5. Optic Disc"}
    out = []
    for part in ("a. Training Set", "b. Testing Set"):
        for img in sorted((seg / "1. Original Images" / part).glob("*.jpg")):
            gt = seg / "2. All Segmentation Groundtruths" / part
            masks = {}
            for code, folder in folders.items():
                p = gt / folder / f"{img.stem}_{code}.tif"
                masks[code] = read(p)[2] > 0 if p.exists() else None
            out.append((read(img)[2], masks))
    return out


def ret_masks(synth, stem):
    """Per RET image: the mask of lesion file `stem` (> 0), all-zero when the file is absent."""
    root = synth / "retinal-lesions-v20191227"
    out = []
    for img in sorted((root / "images_896x896").glob("*.jpg")):
        p = root / "lesion_segs_896x896" / img.stem / f"{stem}.png"
        out.append(read(p)[2] > 0 if p.exists() else np.zeros(read(img)[2].shape[:2], bool))
    return out


def test_idr_layout_and_palette_tiffs(synth):
    seg = synth / "IDRiD" / "A. Segmentation"
    train = sorted((seg / "1. Original Images" / "a. Training Set").glob("*"))
    test = sorted((seg / "1. Original Images" / "b. Testing Set").glob("*"))
    # official-style split: the first 2/3 (54 of 81) train, the rest test
    assert [p.name for p in train] == [f"IDRiD_{i:02d}.jpg" for i in range(1, 8)]
    assert [p.name for p in test] == [f"IDRiD_{i:02d}.jpg" for i in range(8, 11)]
    for part in ("a. Training Set", "b. Testing Set"):
        gt = sorted(p.name for p in (seg / "2. All Segmentation Groundtruths" / part).iterdir())
        assert gt == ["1. Microaneurysms", "2. Haemorrhages", "3. Hard Exudates",
                      "4. Soft Exudates", "5. Optic Disc"]
    fmt, mode, img = read(train[0])
    assert (fmt, mode) == ("JPEG", "RGB")
    h, w = img.shape[:2]
    assert h == 128 and abs(w / h - 4288 / 2848) < 0.01
    # FOV cut flat by the frame: the top row is inside the FOV at the centre, the left edge is black
    assert img[0, w // 2 - 5:w // 2 + 5, 0].mean() > 60 and img[h // 2, :3].max() < 25
    items = idr_masks(synth)
    for image, masks in items:
        for code, m in masks.items():
            if m is not None:
                # a file exists only for a present lesion
                assert m.shape == image.shape[:2] and m.any(), code
    tifs = list((seg / "2. All Segmentation Groundtruths").rglob("*.tif"))
    for p in tifs:
        with Image.open(p) as im:
            encoding = (im.format, im.mode, im.getpalette()[:6])
            assert encoding == ("TIFF", "P", [0, 0, 0, 255, 0, 0]), p
            assert im.tag_v2[258] == (1,), p  # 1 bit per pixel
            assert set(np.unique(np.asarray(im)).tolist()) <= {0, 1}, p
    assert all(m[code] is not None for _, m in items for code in ("OD", "MA", "EX"))
    se = [m["SE"] is not None for _, m in items]
    assert any(se) and not all(se)  # soft exudate files absent for some images (40 of 81 in IDRiD)


# How Pillow reads the distributed IDRiD masks (IDRiD_01..04_HE.tif, 4288x2848, byte-identical to
# the release): mode, palette, compression and the TIFF tags 258 bits, 259 compression,
# 262 photometric, 277 samples, 320 colormap.
IDRID_MASK_ENCODING = {"mode": "P", "palette": [0, 0, 0, 255, 0, 0], "compression": "raw",
                       258: (1,), 259: 1, 262: 3, 277: 1, 320: (0, 65535, 0, 0, 0, 0)}


def test_idr_masks_encoded_like_the_real_files(synth, fixture_idrid):
    ours = next((synth / "IDRiD").rglob("*_HE.tif"))
    with Image.open(ours) as b:
        assert (b.mode, b.getpalette(), b.info.get("compression")) == tuple(
            IDRID_MASK_ENCODING[k] for k in ("mode", "palette", "compression"))
        for tag in (258, 259, 262, 277, 320):
            assert b.tag_v2[tag] == IDRID_MASK_ENCODING[tag], tag
    # NOTE: the in-repo fixture's masks were re-encoded when downscaled (8-bit palette, LZW), so
    # only what the downscaling kept is compared with them: a palette image, index 1 = red,
    # values {0, 1}.
    real = next(fixture_idrid.rglob("*_HE.tif"))
    with Image.open(real) as a, Image.open(ours) as b:
        kept = [(im.mode, im.getpalette()[:6], im.tag_v2[262]) for im in (a, b)]
        assert kept[0] == kept[1], kept
        values = [set(np.unique(np.asarray(im)).tolist()) for im in (a, b)]
        assert values[0] == {0, 1} >= values[1], values


def test_ddr_layout_and_mask_values(synth):
    base = synth / "DDR-dataset" / "lesion_segmentation"
    assert sorted(p.name for p in base.iterdir()) == ["test", "train", "valid"]
    assert sorted(p.name for p in (base / "valid").iterdir()) == ["image", "segmentation label"]
    assert sorted(p.name for p in (base / "train").iterdir()) == ["image", "label"]
    values, sizes, count = set(), set(), 0
    for split in ("train", "valid", "test"):
        labels = base / split / ("segmentation label" if split == "valid" else "label")
        assert sorted(p.name for p in labels.iterdir()) == ["EX", "HE", "MA", "SE"]
        for img in sorted((base / split / "image").glob("*.jpg")):
            count += 1
            assert re.fullmatch(r"\d{3}-\d{4}-\d{3}", img.stem)
            fmt, _, arr = read(img)
            sizes.add(arr.shape)
            image_values = set()
            for code in ("EX", "HE", "MA", "SE"):  # all four files exist for every image
                fmt, mode, m = read(labels / code / f"{img.stem}.tif")
                assert (fmt, mode, m.shape) == ("TIFF", "L", arr.shape[:2])
                image_values |= set(np.unique(m).tolist()) - {0}
            assert len(image_values) == 1  # one value per image: 1 or 255
            values |= image_values
    assert count == N_IMAGES and values == {1, 255} and len(sizes) > 1


def test_fga_layout_antialiased_rgb_masks(synth):
    root = synth / "Seg-set"
    folders = ["HardExudate_Masks", "Hemohedge_Masks",  # NOTE: sic
               "IRMA_Masks", "Microaneurysms_Masks", "Neovascularization_Masks", "Original_Images",
               "SoftExudate_Masks"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == folders
    images = sorted((root / "Original_Images").glob("*.png"))
    assert len(images) == N_IMAGES and all(re.fullmatch(r"\d{4}_[123]", p.stem) for p in images)
    with open(root / "DR_Seg_Grading_Label.csv") as f:
        rows = list(csv.reader(f))
    assert sorted(r[0] for r in rows) == [p.name for p in images]
    assert all(r[1] in "01234" for r in rows)
    modes, fringe, inside = set(), False, False
    for img in images:
        fmt, _, arr = read(img)
        assert fmt == "PNG" and arr.shape == (128, 128, 3)
        for folder in ("HardExudate_Masks", "SoftExudate_Masks", "Hemohedge_Masks",
                       "Microaneurysms_Masks"):
            _, mode, m = read(root / folder / img.name)
            modes.add(mode)
            if mode == "RGB":
                assert (m[..., 0] == m[..., 1]).all() and (m[..., 1] == m[..., 2]).all()
                m = m[..., 0]
            fringe |= bool(((m > 0) & (m < 255)).any())
            inside |= bool((m == 255).any())
    assert modes == {"L", "RGB"} and fringe and inside


def test_ret_layout_gray_levels_and_missing_folders(synth):
    root = synth / "retinal-lesions-v20191227"
    images = sorted((root / "images_896x896").glob("*.jpg"))
    assert len(images) == N_IMAGES
    assert all(re.fullmatch(r"\d+_(left|right)", p.stem) for p in images)
    assert read(images[0])[2].shape == (128, 128, 3)
    folders = {p.name for p in (root / "lesion_segs_896x896").iterdir()}
    assert folders < {p.stem for p in images}  # some images have no mask folder at all
    allowed = {"microaneurysm", "retinal_hemorrhage", "hard_exudate", "cotton_wool_spots",
               "vitreous_hemorrhage", "preretinal_hemorrhage", "neovascularization",
               "fibrous_proliferation"}
    stems, values = set(), {}
    for p in (root / "lesion_segs_896x896").rglob("*.png"):
        fmt, mode, m = read(p)
        # only present lesions get a file
        assert (fmt, mode, m.shape) == ("PNG", "L", (128, 128)) and m.any()
        stems.add(p.stem)
        values.setdefault(p.stem, set()).update(np.unique(m).tolist())
    four = {"microaneurysm", "retinal_hemorrhage", "hard_exudate", "cotton_wool_spots"}
    assert four <= stems <= allowed
    assert set().union(*values.values()) == {0, 127, 255}
    assert 127 not in values["hard_exudate"] | values["cotton_wool_spots"]  # as in the release
    with open(root / "dr_grades.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image id"] for r in rows) == [p.stem for p in images]


def test_mes_layout_one_bit_pngs(synth):
    root = synth / "MAPLES-DR"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["test", "train"]
    folders = ["cottonWoolSpots", "exudates", "fundus", "hemorrhages", "microaneurysms",
               "opticDisc", "vessels"]
    names = {}
    for split in ("train", "test"):
        assert sorted(p.name for p in (root / split).iterdir()) == folders
        names[split] = [p.stem for p in sorted((root / split / "fundus").glob("*.jpg"))]
        assert all(re.fullmatch(r"\d{8}_\d{5}_0100_PP", n) for n in names[split])
        for n in names[split]:
            for folder in folders[:2] + folders[3:]:
                fmt, mode, m = read(root / split / folder / f"{n}.png")
                assert (fmt, mode, m.shape) == ("PNG", "1", (128, 128))
                if folder in ("opticDisc", "vessels"):
                    assert m.any(), (n, folder)
            img = read(root / split / "fundus" / f"{n}.jpg")[2]
            # MESSIDOR FOV cut flat at the top
            assert img[1, 60:68, 0].max() < 25 < img[8, 60:68, 0].mean()
    assert (len(names["train"]), len(names["test"])) == (7, 3)  # official 138 / 60


def test_same_seed_same_bytes_and_rerun_overwrites(tmp_path):
    def snapshot(root):
        return {str(p.relative_to(root)): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}

    generate(tmp_path / "a", images=2, size=96, seed=3)
    generate(tmp_path / "b", images=2, size=96, seed=3)
    a = snapshot(tmp_path / "a")
    assert a == snapshot(tmp_path / "b") and len(a) > 50
    # a re-run replaces the old copy
    generate(tmp_path / "a", images=1, size=96, seed=4, datasets="IDR")
    c = snapshot(tmp_path / "a" / "IDRiD")
    assert len(list((tmp_path / "a" / "IDRiD").rglob("*.jpg"))) == 1
    assert c["A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg"] != \
        a["IDRiD/A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg"]


def test_lesion_pixels_differ_from_their_surroundings(synth):
    """Inside each fine IDR mask vs a thin ring around it: MA/HE darker, EX yellower, CWS paler."""
    inside, ring = {}, {}
    for image, masks in idr_masks(synth):
        img = image.astype(float)
        fov = img[..., 0] > 30
        for code in ("MA", "HE", "EX", "SE"):
            m = masks[code]
            if m is None:
                continue
            ring_out = ndimage.binary_dilation(m, iterations=4)
            near = ring_out & ~ndimage.binary_dilation(m, iterations=1) & fov
            inside.setdefault(code, []).append(img[m].mean(0))
            ring.setdefault(code, []).append(img[near].mean(0))
    mean = {c: (np.mean(inside[c], 0), np.mean(ring[c], 0)) for c in inside}  # RGB each
    for code in ("MA", "HE"):
        (r_in, g_in, _), (r_out, g_out, _) = mean[code]
        assert g_in < 0.85 * g_out and r_in < r_out, code
    (r_in, g_in, b_in), (r_out, g_out, b_out) = mean["EX"]
    assert g_in > 1.2 * g_out and g_in / r_in > g_out / r_out + 0.1
    (_, g_in, b_in), (_, g_out, b_out) = mean["SE"]
    assert b_in > 1.2 * b_out and g_in > g_out


def test_yellow_pixels_are_labelled_exudate(synth):
    """Independent check that what is drawn is labelled: exudate-coloured pixels off the disc lie
    in EX."""
    covered = total = 0
    for image, masks in idr_masks(synth):
        r, g, b = (image[..., c].astype(float) for c in range(3))
        yellow = (r > 100) & (g > 0.8 * r) & (b < 0.6 * g)
        yellow &= ~ndimage.binary_dilation(masks["OD"], iterations=3)
        ex = ndimage.binary_dilation(masks["EX"], iterations=1)
        covered += (yellow & ex).sum()
        total += yellow.sum()
    assert total > 20 and covered / total > 0.9


def per_image_components(masks):
    """(component counts (8-connected), mean component areas) over the images that have the
    lesion."""
    counts, areas = [], []
    for m in masks:
        _, n = ndimage.label(m, structure=EIGHT)
        if n:
            counts.append(n)
            areas.append(m.sum() / n)
    return np.median(counts), np.mean(areas)


def test_coarse_ret_labels_fewer_larger_lesions_than_fine_idr(synth):
    items = idr_masks(synth)
    for code, stem in (("MA", "microaneurysm"), ("EX", "hard_exudate")):
        idr_n, idr_area = per_image_components([m[code] for _, m in items if m[code] is not None])
        ret_n, ret_area = per_image_components(ret_masks(synth, stem))
        assert ret_n < idr_n and ret_area > 2 * idr_area, (code, idr_n, ret_n, idr_area, ret_area)


def test_fga_mixes_fine_and_coarse_images(synth):
    """Per-image mean MA component area (> 0, fringe included) is bimodal: tight dots vs dilated
    blobs."""
    areas = []
    for p in sorted((synth / "Seg-set" / "Microaneurysms_Masks").glob("*.png")):
        m = read(p)[2]
        m = (m[..., 0] if m.ndim == 3 else m) > 0
        _, n = ndimage.label(m, structure=EIGHT)
        if n:
            areas.append(m.sum() / n)
    assert len(areas) >= 4 and max(areas) > 2.5 * min(areas), areas


def test_cli_runs_and_reports_errors_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "data.synthetic", "--out", str(tmp_path), "--images", "1",
           "--size", "64"]
    ok = subprocess.run(cmd + ["--datasets", "mes"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "MES" in ok.stdout and (tmp_path / "MAPLES-DR" / "train" / "fundus").is_dir()
    every = tmp_path / "every"  # `all`, as every other dataset list takes it
    ok = subprocess.run([*cmd[:4], str(every), *cmd[5:], "--datasets", "all"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in every.iterdir() if p.is_dir()) == sorted(
        ["IDRiD", "DDR-dataset", "Seg-set", "retinal-lesions-v20191227", "MAPLES-DR"]), \
        list(every.iterdir())
    bad = subprocess.run(cmd + ["--datasets", "XYZ"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), bad.stderr
    # the ID, and the choices
    assert "'XYZ'" in lines[0] and "IDR, DDR, FGA, RET, MES" in lines[0], lines


def test_bad_arguments_and_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="--images"):
        generate(tmp_path, images=0)
    with pytest.raises(ValueError, match="--size"):
        generate(tmp_path, size=16)
    real = tmp_path / "IDRiD"
    (real / "A. Segmentation").mkdir(parents=True)  # e.g. the user's real copy: never overwritten
    with pytest.raises(ValueError, match="IDRiD exists and was not written by data.synthetic"):
        generate(tmp_path, images=1, size=64, datasets=["IDR"])
    assert (real / "A. Segmentation").is_dir() and not list(real.rglob("*.jpg"))
