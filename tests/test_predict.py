"""predict.py: segment() on a real photograph against plain torch + PIL, a folder of photographs
(--images, --out), any checkpoint source (read_checkpoint, load_ensemble), --style, and one-line
errors.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_predict.py
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import maps
import predict
from data import LESIONS, preprocess_image
from data.datasets import list_samples, load_image
from model import load_models
from protocol import predict as protocol_predict

ROOT = Path(__file__).resolve().parents[1]
PHOTO = "IDRiD_01"  # a real IDRiD photograph, 1072x712 (tests/fixtures/idrid-4l14)


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "predict.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tiny_runs_dir):
    runs, _ = tiny_runs_dir
    return runs / "IDR+MES" / "s0" / "best.pt"  # trained at 64 px


@pytest.fixture(scope="module")
def photo(fixture_idrid):
    return next(s.image for s in list_samples("IDR", fixture_idrid) if s.id == PHOTO)


# --------------------------------------------------------------------------------------------------
# segment(): a photograph in three lines
# --------------------------------------------------------------------------------------------------
def test_segment_a_photograph_in_three_lines(ckpt, photo):
    from predict import segment

    image = np.asarray(Image.open(photo).convert("RGB"))
    probs = segment(image, str(ckpt))
    assert probs.shape == (4, 712, 1072) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1 and probs.max() > 0
    # the black surround, 20 px clear of the fundus
    dark = ndimage.maximum_filter(image.max(-1), 41) < 12
    assert dark.mean() > 0.1 and not probs[:, dark].any()


def test_segment_maps_the_network_output_back_onto_the_photograph(ckpt, photo):
    image = np.asarray(load_image(photo))
    probs = predict.segment(image, str(ckpt))
    # Reference: the network on the preprocessed square, plain torch, enlarged into the crop box by
    # PIL
    square, fov, geo = preprocess_image(image, 64)
    model = load_models(str(ckpt))[0]
    with torch.no_grad():
        ref = torch.sigmoid(model(
            torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255))[0].numpy()
    (w, h), (left, top), (x0, y0, x1, y1) = geo["size"], geo["pad"], geo["box"]
    inside = np.zeros(image.shape[:2], bool)
    crop_fov = Image.fromarray(fov[top:top + h, left:left + w]).resize((x1 - x0, y1 - y0),
                                                                       Image.NEAREST)
    # clear of the FOV edge
    inside[y0:y1, x0:x1] = ndimage.binary_erosion(np.asarray(crop_fov), iterations=40)
    for c in range(4):
        crop = Image.fromarray(ref[c, top:top + h, left:left + w]).resize((x1 - x0, y1 - y0),
                                                                          Image.BILINEAR)
        full = np.zeros(image.shape[:2], np.float32)
        full[y0:y1, x0:x1] = np.asarray(crop)
        assert np.abs(probs[c] - full)[inside].max() < 1e-3, LESIONS[c]


def test_images_are_read_as_viewers_show_them_exif_orientation(ckpt, photo, tmp_path):
    """A photograph stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to show it,
    as a phone held upright writes it): --images maps it as shown, the very maps of the upright
    pixels."""
    upright = np.asarray(Image.open(photo).convert("RGB"))  # (712, 1072, 3), no tag
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "in").mkdir()
    stored = np.rot90(upright, 1).copy()  # (1072, 712, 3)
    Image.fromarray(stored).save(tmp_path / "in" / "eye.png", exif=exif)
    predict.predict_images([ckpt], tmp_path / "in", tmp_path / "out", device="cpu")
    want = predict.segment(upright, str(ckpt), uint8=True)  # (4, 712, 1072)
    for c, lesion in enumerate(LESIONS):
        with Image.open(tmp_path / "out" / f"eye_{lesion}.png") as im:
            assert np.array_equal(np.asarray(im), want[c]), lesion


def test_segment_takes_loaded_models_and_equals_predict_images(ckpt, photo, tmp_path):
    image = np.asarray(load_image(photo))
    probs = predict.segment(image, str(ckpt))
    assert np.array_equal(predict.segment(image, load_models(str(ckpt)), resolution=64), probs)
    assert np.array_equal(predict.segment(image, predict.load_ensemble([ckpt], "cpu")), probs)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "eye.jpg").write_bytes(photo.read_bytes())
    predict.predict_images([ckpt], tmp_path / "in", tmp_path / "out", device="cpu")
    for c, lesion in enumerate(LESIONS):
        with Image.open(tmp_path / "out" / f"eye_{lesion}.png") as im:
            assert (np.abs(np.asarray(im, np.float32) / 255 - probs[c]).max()
                    <= 0.5 / 255 + 1e-6), lesion


def test_8_bit_maps_give_the_same_files_as_float_ones(ckpt, photo, tmp_path):
    """segment(uint8=True), what --images writes from, is round(255 p) of the float maps, and
    save_maps draws the same regions (p >= 0.5 is >= 128) from either, including maps that sit on
    the threshold."""
    image = np.asarray(load_image(photo))
    probs = predict.segment(image, str(ckpt))
    p8 = predict.segment(image, str(ckpt), uint8=True)
    assert (p8.dtype == np.uint8
            and np.array_equal(p8, np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8)))
    edge = np.float32([0.5, np.nextafter(np.float32(0.5), np.float32(0)), 127.5 / 255, 128 / 255,
                       0.0, 1.0])
    probs[:, :8, :6] = edge  # on both sides of the threshold
    p8 = maps.to_8bit(probs)
    assert np.array_equal(maps.regions_of(p8), probs >= 0.5)
    maps.save_maps(tmp_path / "f", "a", image, probs)
    maps.save_maps(tmp_path / "u", "a", image, p8)
    for name in [f"a_{lesion}.png" for lesion in LESIONS] + ["a_overlay.jpg"]:
        assert (tmp_path / "f" / name).read_bytes() == (tmp_path / "u" / name).read_bytes(), name


@pytest.mark.parametrize("options, name", [
    ({"tile": 0}, "tile"), ({"tile": -5}, "tile"), ({"tile": 64.5}, "tile"),
    ({"tile": 32, "overlap": 1.0}, "overlap"), ({"dtype": "int8"}, "dtype"),
    ({"resolution": -3}, "resolution")])
def test_segment_refuses_bad_options_in_one_line(ckpt, photo, options, name):
    image = np.asarray(load_image(photo))
    with pytest.raises(ValueError) as e:
        predict.segment(image, str(ckpt), **options)
    assert name in one_line(e) and repr(options[name]) in str(e.value)  # the option and its value


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                                 np.zeros((8, 8, 4), np.uint8), [[0, 0, 0]]])
def test_segment_rejects_what_is_not_an_rgb_photograph_in_one_line(ckpt, bad):
    with pytest.raises(ValueError, match=r"uint8 numpy array \(H, W, 3\)") as e:
        predict.segment(bad, str(ckpt))
    assert "\n" not in str(e.value)


def test_segment_refuses_an_empty_photograph(ckpt):
    with pytest.raises(ValueError, match="H and W >= 1") as e:
        predict.segment(np.zeros((0, 0, 3), np.uint8), str(ckpt))
    assert "\n" not in str(e.value)


def test_segment_refuses_an_ensemble_of_members_at_other_resolutions(eval_ckpts, edit_ckpt,
                                                                     tmp_path):
    low = edit_ckpt(eval_ckpts["b"], tmp_path / "low.pt", args={"resolution": 64},
                    cfg={"resolution": 64})
    image = np.zeros((80, 90, 3), np.uint8)
    with pytest.raises(ValueError) as e:
        predict.segment(image, [str(eval_ckpts["a"]), str(low)])
    assert "low.pt at 64 px" in one_line(e) and "--resolution" in str(e.value)


# --------------------------------------------------------------------------------------------------
# predict.py --images: a folder of photographs
# --------------------------------------------------------------------------------------------------
def test_images_folder(eval_ckpts, fundus_jpeg, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = {"left": (200, 150), "right": (150, 180)}
    for name, (w, h) in sizes.items():
        fundus_jpeg(photos / f"{name}.jpg", w, h)
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "maps"
    predict.main(["--ckpt", str(eval_ckpts["a"]), "--images", str(photos), "--out", str(out),
                  "--device", "cpu"])
    for name, size in sizes.items():
        for lesion in LESIONS:
            with Image.open(out / f"{name}_{lesion}.png") as im:
                assert im.size == size, (name, lesion)
        # the photograph, the legend band below it
        with Image.open(out / f"{name}_overlay.jpg") as im:
            assert im.width == size[0] and im.height > size[1], name


def test_maps_show_only_the_trained_lesions(eval_ckpts, edit_ckpt, fundus_jpeg, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    fundus_jpeg(photos / "eye.jpg", 160, 120)
    he_only = edit_ckpt(eval_ckpts["a"], tmp_path / "he.pt", args={"lesions": ["HE"]},
                        cfg={"lesions": ["HE"]})  # train.py --lesions HE
    predict.main(["--ckpt", str(he_only), "--images", str(photos), "--out", str(tmp_path / "m"),
                  "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "m").glob("*.png")) == ["eye_HE.png"]
    rows = list(csv.DictReader(open(tmp_path / "m" / "lesions.csv")))
    assert rows and {r["lesion"] for r in rows} == {"HE"}, rows
    # the overlay (outlines and legend) draws HE's red and none of the other lesions' colours; the
    # model of all four draws them all (legend swatches at least)
    predict.main(["--ckpt", str(eval_ckpts["a"]), "--images", str(photos), "--out",
                  str(tmp_path / "all"), "--device", "cpu"])
    colours = {"EX": (255, 230, 0), "HE": (230, 20, 20), "MA": (40, 230, 40), "CWS": (0, 200, 255)}
    for folder, drawn in (("m", {"HE"}), ("all", set(colours))):
        rgb = np.asarray(Image.open(tmp_path / folder / "eye_overlay.jpg").convert("RGB"), float)
        seen = {les for les, c in colours.items()
                if (np.abs(rgb - c).max(-1) < 30).sum() >= 4}  # JPEG: near the colour
        assert seen == drawn, (folder, seen)
    # a lesion it was not trained on (an untrained head): refused, nothing written
    with pytest.raises(ValueError) as e:
        predict.main(["--ckpt", str(he_only), "--images", str(photos), "--out",
                      str(tmp_path / "ex"), "--device", "cpu", "--lesions", "EX,HE"])
    assert str(e.value) == f"--lesions EX: {he_only} was trained on HE only"
    assert not (tmp_path / "ex").exists() or not list((tmp_path / "ex").iterdir())


def test_unwritable_out_is_one_line_before_any_work(eval_ckpts, fundus_jpeg, tmp_path):
    """--out on a file, or under one (an OSError even for root), stops in one line naming the flag,
    before a photograph is segmented; the file is untouched."""
    photos = tmp_path / "photos"
    photos.mkdir()
    fundus_jpeg(photos / "eye.jpg", 120, 100)
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        r = cli("--ckpt", eval_ckpts["a"], "--images", photos, "--out", out, "--device", "cpu")
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and f"--out {out}" in last
        assert "eye.jpg: maps" not in r.stdout
    assert blocker.read_text() == "keep me"
    # --out the --images folder itself: the next run would read the maps as photographs
    with pytest.raises(ValueError) as e:
        predict.main(["--ckpt", str(eval_ckpts["a"]), "--images", str(photos), "--out",
                      str(photos), "--device", "cpu"])
    assert str(e.value) == (f"--out {photos} is the --images folder: its maps would be read as "
                            f"photographs next time; pass another --out")
    assert sorted(p.name for p in photos.iterdir()) == ["eye.jpg"]
    # a folder that is no checkpoint, a tile size below 1: one line naming them
    with pytest.raises(ValueError) as e:
        predict.main(["--ckpt", str(tmp_path), "--images", str(photos), "--out",
                      str(tmp_path / "m"), "--device", "cpu"])
    assert str(e.value) == f"{tmp_path} is a folder, not a checkpoint file"
    r = cli("--ckpt", eval_ckpts["a"], "--images", photos, "--tile", "-1", "--device", "cpu")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: argument --tile: must be >= 1, got -1"], r.stderr


def test_bad_images_folder_is_one_line_naming_it(eval_ckpts, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    empty = tmp_path / "empty"
    empty.mkdir()
    # no image file (found before --out is made: no empty folder left); no readable photograph;
    # no folder at all
    for folder in (empty, broken, tmp_path / "nowhere"):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            predict.main(["--ckpt", str(eval_ckpts["a"]), "--images", str(folder),
                          "--out", str(tmp_path / "m"), "--device", "cpu"])
        assert folder.name in one_line(e)
        if folder == empty:
            assert not (tmp_path / "m").exists()


def test_images_oversized_photo_is_skipped_with_a_warning(eval_ckpts, fundus_jpeg, tmp_path,
                                                          monkeypatch, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    # 48,000 px: over twice the limit below, a decompression bomb
    fundus_jpeg(photos / "a_huge.jpg", 240, 200)
    fundus_jpeg(photos / "b_small.jpg", 100, 90)
    # a macOS AppleDouble file: hidden, skipped silently
    (photos / "._b_small.jpg").write_bytes(b"\x00\x05\x16\x07")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    out = tmp_path / "maps"
    predict.main(["--ckpt", str(eval_ckpts["a"]), "--images", str(photos), "--out", str(out),
                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert "warning" in err and "a_huge.jpg" in err and "._b_small" not in err
    assert not list(out.glob("._*"))
    assert (out / "b_small_overlay.jpg").is_file() and not (out / "a_huge_overlay.jpg").exists()


def test_sixteen_bit_photo_scaled_by_its_range(eval_ckpts, tmp_path):
    from PIL import ImageDraw

    photos = tmp_path / "photos"
    photos.mkdir()
    disc = Image.new("L", (120, 100))
    ImageDraw.Draw(disc).ellipse([12, 2, 108, 98], fill=255)
    # a 12-bit camera's range in a 16-bit file
    wide = (np.asarray(disc, np.uint16) * 12).astype(np.uint16)
    Image.fromarray(wide).save(photos / "deep.png")
    with Image.open(photos / "deep.png") as im:
        # PIL reads it as 16-bit grey; convert("RGB") would clip it to white
        assert im.mode.startswith("I")
    rgb = predict.read_photo(photos / "deep.png")
    expected = np.floor(wide.astype(np.float64) / wide.max() * 255 + 0.5).astype(np.uint8)
    assert (rgb.dtype == np.uint8 and np.array_equal(rgb[..., 0], expected)
            and np.array_equal(rgb[..., 2], expected))
    assert rgb.min() == 0 and (rgb == 0).mean() > 0.1  # the black surround stays black, not white
    out = tmp_path / "maps"
    predict.main(["--ckpt", str(eval_ckpts["a"]), "--images", str(photos), "--out", str(out),
                  "--device", "cpu"])
    with Image.open(out / "deep_overlay.jpg") as im:
        assert im.width == 120 and im.height > 100


# --------------------------------------------------------------------------------------------------
# Style-conditioned models: --style reaches every member
# --------------------------------------------------------------------------------------------------
def fundus(h=90, w=120):
    """A red disc on black: enough of a fundus for the FOV crop."""
    yy, xx = np.mgrid[:h, :w]
    image = np.zeros((h, w, 3), np.uint8)
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * h) ** 2
    image[disc] = (170, 80, 40)
    image[disc & (xx % 9 == 0)] = (120, 40, 30)  # some texture
    return image


def test_segment_and_ensembles_pass_the_style_to_every_member(style_net, randomize_films):
    a, b = (randomize_films(style_net(seed, style_tokens=("fine", "coarse")), seed).eval()
            for seed in (1, 2))
    image = fundus()
    maps_ = {s: predict.segment(image, [a], resolution=64, style=s)
             for s in (None, "fine", "coarse")}
    assert maps_["fine"].shape == (4, 90, 120) and np.array_equal(maps_[None], maps_["fine"])
    assert np.abs(maps_["fine"] - maps_["coarse"]).max() > 1e-3
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = protocol_predict([a, b], x, style="coarse")
        want = (torch.sigmoid(a(x, style="coarse")) + torch.sigmoid(b(x, style="coarse"))) / 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert predict.check_style([a, b]) == "fine" and predict.check_style([style_net()]) is None


def test_style_for_an_unconditioned_model_is_one_line_before_any_work(style_net, style_checkpoint,
                                                                      fundus_jpeg, tmp_path):
    plain = style_checkpoint(tmp_path / "plain.pt", style_net())
    photos = tmp_path / "photos"
    photos.mkdir()
    fundus_jpeg(photos / "eye.jpg", 120, 100)
    with pytest.raises(ValueError) as err:
        predict.main(["--ckpt", str(plain), "--images", str(photos), "--out", str(tmp_path / "m"),
                      "--style", "coarse", "--device", "cpu"])
    assert one_line(err).startswith("--style coarse") and "not style-conditioned" in str(err.value)
    assert not list((tmp_path / "m").glob("*"))  # no map written


# --------------------------------------------------------------------------------------------------
# predict.py --images as a job (issue 26): lesions.csv, --masks, quality flags, the summary
# --------------------------------------------------------------------------------------------------
def read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def known_maps(h, w, seed=0):
    """uint8 (4, h, w) maps = round(255 p): EX two blocks touching only at a corner (one lesion
    8-connected, two 4-connected) and a lone one, values on both sides of 128 (p = 0.5); HE below
    0.5 everywhere; MA scattered pixels; CWS random (many components)."""
    rng = np.random.default_rng(seed)
    p8 = np.zeros((4, h, w), np.uint8)
    p8[0, 10:20, 10:20] = 200
    p8[0, 20:25, 20:30] = 128  # touches the first block at one corner pixel
    p8[0, 40:44, 50:53] = 255
    p8[0, 30:35, 5:9] = 127  # just below p = 0.5: no lesion
    p8[1] = rng.integers(0, 128, (h, w))
    p8[2, rng.integers(0, h, 30), rng.integers(0, w, 30)] = 180
    p8[3] = rng.integers(0, 256, (h, w))
    return p8


def test_lesions_csv_and_masks_against_scipy_and_numpy(eval_ckpts, fundus_jpeg, tmp_path,
                                                       monkeypatch, capsys):
    """With the maps known (the prediction replaced), lesions.csv's components are
    scipy.ndimage.label's with 8-connectivity, its areas numpy's, its % of the fundus the area over
    the fundus pixels, its maximum the map's; each mask PNG is 255 where the 8-bit map >= 128
    (p >= 0.5), or >= round(255 t) for --threshold t."""
    photos = tmp_path / "photos"
    photos.mkdir()
    fundus_jpeg(photos / "eye.jpg", 90, 70)
    p8, fundus = known_maps(70, 90), 4321
    monkeypatch.setattr(predict, "_segment", lambda *a, **k: (p8.copy(), fundus))
    for threshold, level in ((None, 128), ("0.25", 64)):
        out = tmp_path / f"maps{threshold}"
        predict.main(["--ckpt", str(eval_ckpts["a"]), "--images", str(photos), "--out", str(out),
                      "--device", "cpu", "--masks"]
                     + (["--threshold", threshold] if threshold else []))
        rows = {r["lesion"]: r for r in read_csv(out / "lesions.csv")}
        assert list(rows) == list(LESIONS)
        for c, lesion in enumerate(LESIONS):
            region = p8[c] >= level
            _, n = ndimage.label(region, structure=np.ones((3, 3)))
            r = rows[lesion]
            assert (r["photograph"], r["name"]) == ("eye.jpg", "eye")
            assert int(r["components"]) == n and int(r["area_px"]) == region.sum(), lesion
            assert float(r["area_percent_of_fundus"]) == pytest.approx(
                100 * region.sum() / fundus, abs=1e-4)
            assert float(r["max_probability"]) == pytest.approx(p8[c].max() / 255, abs=1e-4)
            with Image.open(out / f"eye_{lesion}_mask.png") as im:
                assert np.array_equal(np.asarray(im), np.where(region, 255, 0)), lesion
        assert rows["EX"]["components"] == ("2" if level == 128 else "3")  # the corner joins two
    printed = capsys.readouterr().out
    assert "lesions.csv" in printed and "_mask.png" in printed and str(out) in printed


def test_white_black_and_noise_frames_are_flagged(eval_ckpts, photo, tmp_path, capsys):
    """A real photograph: fundus found, quality ok; a white, a black and a pure-noise frame: no
    fundus, and flat, no field of view, noisy; the summary lists the three."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "real.jpg").write_bytes(photo.read_bytes())
    rng = np.random.default_rng(0)
    frames = {"white": np.full((300, 400, 3), 255, np.uint8),
              "black": np.zeros((300, 400, 3), np.uint8),
              "noise": rng.integers(0, 256, (300, 400, 3), dtype=np.uint8),
              "tiny": rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)}
    for name, a in frames.items():
        Image.fromarray(a).save(photos / f"{name}.png")
    Image.open(photo).convert("L").convert("RGB").save(photos / "grey.png")  # the real one, grey
    predict.main(["--ckpt", str(eval_ckpts["a"]), "--images", str(photos), "--out",
                  str(tmp_path / "m"), "--device", "cpu"])
    rows = {r["photograph"]: r for r in read_csv(tmp_path / "m" / "lesions.csv")}
    assert (rows["real.jpg"]["fundus_found"], rows["real.jpg"]["quality"]) == ("True", "ok")
    for name, why in (("white", "flat"), ("black", "no bright field"), ("noise", "noisy")):
        r = rows[f"{name}.png"]
        assert r["fundus_found"] == "False" and why in r["quality"], r
    assert "tiny: 5x5 px" in rows["tiny.png"]["quality"], rows["tiny.png"]
    assert rows["grey.png"]["quality"].startswith("grey-scale: no colour"), rows["grey.png"]
    printed = capsys.readouterr().out
    assert "5 flagged" in printed and "real.jpg" not in printed.split("flagged")[1]


def test_segment_with_loaded_models_loads_nothing(ckpt, monkeypatch):
    """A loop over photographs with load_ensemble's models reads no checkpoint; with a path, each
    call reads it."""
    models = predict.load_ensemble([ckpt], "cpu")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    image = fundus()
    for _ in range(3):
        predict.segment(image, models)
    assert loads == []
    for _ in range(2):
        predict.segment(image, str(ckpt))
    assert len(loads) == 2
