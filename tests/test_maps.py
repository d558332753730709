"""maps.py (overlays, panels, legend, files) against hand-built expectations; test-set maps
(evaluate.py --save-maps) on a real photograph's geometry."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import evaluate
import maps
from data import LESIONS, PreparedDataset
from data.datasets import list_samples

PHOTO = "IDRiD_01"  # a real IDRiD photograph, 1072x712 (tests/fixtures/idrid-4l14)


def fundus(H, W):
    """A textured disc on black: (image uint8 (H, W, 3), fov bool (H, W))."""
    yy, xx = np.mgrid[:H, :W]
    fov = (yy - H / 2) ** 2 + (xx - W / 2) ** 2 < (0.45 * min(H, W)) ** 2
    rng = np.random.default_rng(0)
    image = np.zeros((H, W, 3), np.uint8)
    image[fov] = rng.integers(60, 200, (fov.sum(), 3))
    return image, fov


def blend(pixels, colour):
    """The light fill as a float reference: 70 % photograph, 30 % lesion colour, rounded."""
    return np.floor(0.7 * pixels.astype(np.float64) + 0.3 * np.asarray(colour, np.float64)
                    + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Outlines and files, against scipy and PIL
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, r",
                         [((37, 53), 1), ((64, 90), 6), ((5, 200), 3), ((13, 13), 6), ((3, 40), 4)])
def test_erode_and_border_equal_scipy(shape, r):
    rng = np.random.default_rng(r)
    m = ndimage.uniform_filter(rng.random(shape), 5) > 0.5  # blobs, some touching the edges
    for beyond in (False, True):
        want = ndimage.minimum_filter(m, 2 * r + 1, mode="constant", cval=beyond)
        assert np.array_equal(maps.erode(m, r, beyond), want), beyond
    box = np.zeros((shape[0] + 40, shape[1] + 40), bool)
    # clear of the edges, where the border does not depend on what lies past them
    box[20:-20, 20:-20] = m
    inner = box & ~ndimage.minimum_filter(box, 2 * r + 1)
    outer = ndimage.maximum_filter(box, 2 * r + 1) & ~box
    assert (np.array_equal(maps.border(box, r), inner)
            and np.array_equal(maps.border(box, r, outside=True), outer))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (33, 17)])
def test_grey_png_reads_back_exactly(shape, tmp_path):
    a = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    maps.save_grey_png(tmp_path / "a.png", a)
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), a)


# --------------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.3, 0.49])
def test_blank_or_weak_map_leaves_the_photograph_unchanged(p):
    image, fov = fundus(120, 160)
    out = maps.overlay(image, np.full((4, 120, 160), p, np.float32), fov=fov)
    # the probability is not an opacity: below 0.5 nothing is drawn, fundus and black surround alike
    assert out.shape[1:] == (160, 3) and out.shape[0] > 120  # the legend band below the photograph
    assert np.array_equal(out[:120], image)


@pytest.mark.parametrize("H, W", [(150, 200), (1000, 1400)])
def test_region_gets_an_outline_in_its_colour_and_a_light_fill(H, W):
    image, fov = fundus(H, W)
    width = maps.line_width(H, W)
    assert width == max(1, round(max(H, W) / 700))  # 1 px on small images, 2 px at 1400
    probs = np.zeros((4, H, W), np.float32)
    y0, x0, s = H // 2 - 20, W // 2 - 30, 40  # a 40 px square well inside the FOV
    probs[1, y0:y0 + s, x0:x0 + s] = 0.8
    out = maps.overlay(image, probs, fov=fov)[:H]
    square = np.zeros((H, W), bool)
    square[y0:y0 + s, x0:x0 + s] = True
    inner = np.zeros((H, W), bool)
    inner[y0 + width:y0 + s - width, x0 + width:x0 + s - width] = True
    ring = square & ~inner  # the square's edge, `width` pixels wide
    assert (out[ring] == maps.COLOURS[1]).all()
    # rounding at .5
    assert np.abs(out[inner].astype(int) - blend(image[inner], maps.COLOURS[1])).max() <= 1
    # the dark edge: the band of max(1, width // 2) pixels just outside the square (a square grown
    # by it: scipy's dilation), then the photograph as it was
    h = max(1, width // 2)
    edge = ndimage.binary_dilation(square, np.ones((2 * h + 1, 2 * h + 1), bool)) & ~square
    assert (out[edge] == maps.HALO_COLOUR).all()
    assert np.array_equal(out[~square & ~edge], image[~square & ~edge])


def test_nothing_is_drawn_outside_the_fov():
    image, fov = fundus(100, 140)
    truth = np.zeros((4, 100, 140), bool)
    truth[0, 40:60, 40:60] = True
    truth[3, :, :70] = True  # crosses the FOV's edge
    out = maps.overlay(image, np.full((4, 100, 140), 0.9, np.float32), truth, fov)[:100]
    assert np.array_equal(out[~fov], image[~fov])
    assert (out[fov] != image[fov]).any(axis=-1).all()  # every fundus pixel is in a region: filled


def test_ground_truth_is_a_white_outline_just_outside_its_region():
    image, fov = fundus(150, 200)
    truth = np.zeros((4, 150, 200), bool)
    truth[2, 60:80, 90:110] = True
    out = maps.overlay(image, np.zeros((4, 150, 200), np.float32), truth, fov)[:150]
    ring = ndimage.binary_dilation(truth[2], np.ones((3, 3), bool)) & ~truth[2]  # 1 px, 8-connected
    assert (out[ring] == maps.TRUTH_COLOUR).all()
    assert np.array_equal(out[~ring], image[~ring])  # the lesion itself and the rest are untouched


def test_legend_names_every_lesion_in_its_colour():
    def colours(band):
        return {tuple(int(v) for v in c) for c in band.reshape(-1, 3)}

    band = maps.legend(600, truth=True, prefix="p >= 0.5:")
    for c in maps.COLOURS:  # each swatch's outline, exactly in the lesion colour
        assert tuple(int(v) for v in c) in colours(band)
    assert maps.TRUTH_COLOUR in colours(band)  # the ground truth's swatch
    plain = maps.legend(600)
    assert maps.TRUTH_COLOUR not in colours(plain)
    # light grey text on the dark band
    grey = (plain.max(-1) == plain.min(-1)) & (plain.min(-1) > 150)
    assert grey.sum() > 100
    # readable at every size: the text grows with the picture (about 48 px on a 4288 px photograph,
    # one row), never below 10 px, and a narrow picture wraps its five entries onto more rows
    assert 4288 / 60 <= maps.legend(4288, truth=True).shape[0] < 4288 / 30
    assert maps.legend(150, truth=True).shape[0] >= 4 * 16


def test_panel_is_image_truth_prediction_side_by_side():
    image, fov = fundus(90, 120)
    truth = np.zeros((4, 90, 120), bool)
    truth[1, 30:50, 30:50] = True
    probs = np.zeros((4, 90, 120), np.float32)
    probs[0, 40:60, 60:80] = 0.9
    out = maps.panel(image, probs, truth, fov)
    assert out.shape[1:] == (3 * 120, 3)
    # titles above the tiles, the legend below
    top = out.shape[0] - 90 - maps.legend(3 * 120).shape[0]
    # the titles: light text on the dark band
    assert top > 0 and (out[:top].min(-1) > 150).sum() > 50
    tiles = [out[top:top + 90, k * 120:(k + 1) * 120] for k in range(3)]
    # untouched beyond each region and its 1 px dark edge (the outline is 1 px at this size)
    grown = lambda m: ndimage.binary_dilation(m, np.ones((3, 3), bool))  # noqa: E731
    assert (tiles[1][30, 30:50] == maps.COLOURS[1]).all()
    assert np.array_equal(tiles[1][~grown(truth[1])], image[~grown(truth[1])])
    assert (tiles[2][40, 60:80] == maps.COLOURS[0]).all()
    assert np.array_equal(tiles[2][~grown(probs[0] > 0)], image[~grown(probs[0] > 0)])
    big = maps.panel(np.zeros((1536, 2048, 3), np.uint8), np.zeros((4, 1536, 2048)),
                     np.zeros((4, 1536, 2048), bool))
    # a large photograph's tiles are shrunk to PANEL_TILE
    assert big.shape[1] == 3 * maps.PANEL_TILE


def test_save_maps_writes_8_bit_maps_and_pictures(tmp_path):
    image, fov = fundus(64, 96)
    probs = np.random.default_rng(1).random((4, 64, 96)).astype(np.float32)
    maps.save_maps(tmp_path, "a", image, probs)
    for c, lesion in enumerate(LESIONS):
        with Image.open(tmp_path / f"a_{lesion}.png") as im:
            assert im.mode == "L" and np.array_equal(
                np.asarray(im), np.floor(probs[c] * 255 + 0.5).astype(np.uint8))
    with Image.open(tmp_path / "a_overlay.jpg") as im:
        assert im.width == 96 and im.height > 64
    assert not (tmp_path / "a_panel.jpg").exists()  # a panel needs the ground truth
    maps.save_maps(tmp_path, "b", image, probs, np.zeros((4, 64, 96), bool), fov)
    with Image.open(tmp_path / "b_panel.jpg") as im:
        assert im.width == 3 * 96


def test_overlay_and_legend_draw_only_the_given_lesions():
    """lesions=("HE",) (a model trained with --lesions HE): a certain exudate everywhere, not a
    trained output, leaves no yellow; with all four the exudate's outline is there."""
    image = np.full((120, 160, 3), 90, np.uint8)
    probs = np.zeros((4, 120, 160), np.float32)
    probs[0] = 0.9
    probs[1, 40:80, 50:100] = 0.9
    drawn = maps.overlay(image, probs, lesions=("HE",))[:120]
    assert not (drawn == maps.COLOURS[0]).all(-1).any() and (drawn == maps.COLOURS[1]).all(-1).any()
    # all four: yellow outline
    assert (maps.overlay(image, probs)[:120] == maps.COLOURS[0]).all(-1).any()
    legend = maps.legend(600, lesions=("HE",))
    assert (not (legend == maps.COLOURS[0]).all(-1).any()
            and (legend == maps.COLOURS[1]).all(-1).any())


@pytest.fixture(scope="module")
def ckpt(tiny_runs_dir):
    runs, _ = tiny_runs_dir
    return runs / "IDR+MES" / "s0" / "best.pt"  # trained at 64 px


# --------------------------------------------------------------------------------------------------
# Test-set maps: on the photograph's geometry, with the ground truth and a panel
# --------------------------------------------------------------------------------------------------
def test_test_set_maps_are_on_the_photographs_geometry(ckpt, fixture_idrid, tmp_path):
    ids = [s.id for s in list_samples("IDR", fixture_idrid)]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids[1:], "test": [PHOTO]}))
    options = {"roots": {"IDR": str(fixture_idrid)}, "split_files": {"IDR": str(split)},
               "verbose": False}
    evaluate.evaluate([str(ckpt)], ["IDR"], (tmp_path, tmp_path / "cache", options), device="cpu",
                      maps_dir=tmp_path / "maps", verbose=False)
    out = tmp_path / "maps" / "IDR"
    for lesion in LESIONS:
        with Image.open(out / f"{PHOTO}_{lesion}.png") as im:
            assert im.size == (1072, 712)  # the photograph's own size, not the prepared 64 px
    with Image.open(out / f"{PHOTO}_panel.jpg") as im:
        assert im.width == 3 * maps.PANEL_TILE  # 1072 px wide: shrunk to 1024 px tiles
    # the ground-truth haemorrhages (the fixture's HE mask
    # through the cache) as white rings in the overlay
    ds = PreparedDataset(tmp_path / "cache", "IDR", 64, "test")
    geo, he = ds.geometry(0), ds[0]["masks"][1]
    (w, h), (left, top), (x0, y0, x1, y1) = geo["size"], geo["pad"], geo["box"]
    truth = np.zeros((712, 1072), bool)
    truth[y0:y1, x0:x1] = np.asarray(Image.fromarray(he[top:top + h, left:left + w]).resize(
        (x1 - x0, y1 - y0), Image.NEAREST))
    ring = ndimage.binary_dilation(truth, np.ones((3, 3), bool)) & ~truth
    with Image.open(out / f"{PHOTO}_overlay.jpg") as im:
        assert im.size[0] == 1072 and im.size[1] > 712
        rgb = np.asarray(im)[:712].astype(int)
    # white (JPEG-softened) on a red fundus
    assert ring.sum() > 100 and rgb[ring].min(axis=1).mean() > 170


def luminance(rgb):
    """ITU-R BT.601 luminance in grey levels."""
    return np.asarray(rgb, np.float64) @ [0.299, 0.587, 0.114]


def test_red_outline_stands_out_on_a_red_fundus():
    """HE's red outline on an orange-red fundus (about the same luminance): the pixels just outside
    it differ from it by at least 50 grey levels of luminance, on every side."""
    H, W = 150, 200
    image = np.zeros((H, W, 3), np.uint8)
    image[:] = (170, 80, 40)  # a fundus's red-orange
    assert abs(luminance(maps.COLOURS[1]) - luminance(image[0, 0])) < 30  # red on red: no contrast
    square = np.zeros((H, W), bool)
    square[50:90, 70:120] = True
    out = maps.overlay(image, square[None].repeat(4, 0) * np.float32([0, 0.9, 0, 0])[:, None, None])
    outline = maps.border(square, maps.line_width(H, W))
    for axis, step in ((0, 1), (0, -1), (1, 1), (1, -1)):  # each outline pixel's outer neighbour
        outer = np.roll(outline, step, axis) & ~square
        inner = np.roll(outer, -step, axis)
        assert outer.any()
        contrast = np.abs(luminance(out[:H][outer]) - luminance(out[:H][inner]))
        assert contrast.min() >= 50, (axis, step, contrast.min())


@pytest.mark.parametrize("width", [128, 200, 640])
def test_legend_words_are_apart_on_small_pictures(width):
    """"CWS cotton-wool spots" at the smallest text size: the two spaces are blank runs of at
    least 3 pixel columns (1-2 before: "CWScotton-wool spots"), wider than any gap between
    letters."""
    band = maps.legend(width, lesions=("CWS",))
    s = maps._font(width).size
    ink = (np.abs(band.astype(int) - np.array(maps.BAND)).sum(-1) > 60).any(0)  # (width,)
    columns = ink[round(1.4 * s) + s // 2:]  # right of the swatch: the text
    first, last = np.flatnonzero(columns)[[0, -1]]
    runs, run = [], 0
    for c in columns[first:last + 1]:
        if c and run:
            runs.append(run)
        run = 0 if c else run + 1
    runs.sort()
    assert len(runs) >= 3 and runs[-2] >= 3 and runs[-2] > runs[-3], runs
