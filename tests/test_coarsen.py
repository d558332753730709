"""data/coarsen.py: a dataset copied into the generic layout, its labels coarsened as the synthetic
coarse style's (issue 25); the copies read back through data/generic.py.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_coarsen.py
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from data import coarsen
from data.datasets import list_samples, load_image, load_masks
from data.ids import LESIONS

ROOT = Path(__file__).resolve().parents[1]

EX, MA = LESIONS.index("EX"), LESIONS.index("MA")


def disc(shape, y, x, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - y) ** 2 + (xx - x) ** 2 <= r * r


def test_regions_grow_by_the_radius_and_neighbours_merge():
    masks = np.zeros((4, 120, 160), bool)
    masks[EX] = (disc((120, 160), 40, 40, 3) | disc((120, 160), 40, 52, 3)
                 | disc((120, 160), 90, 120, 2))
    # u = 1: EX radius 7
    out = coarsen.coarsen(masks, ("EX",), fov_radius=256, rng=np.random.default_rng(0))
    # every pixel within 7 px of a lesion pixel, and nothing else (the blobs have no holes to fill)
    near = ndimage.distance_transform_edt(~masks[EX]) <= 7
    assert np.array_equal(out[EX], near)
    # two neighbours merged
    assert ndimage.label(masks[EX])[1] == 3 and ndimage.label(out[EX])[1] == 2
    assert np.array_equal(out[[1, 2, 3]], masks[[1, 2, 3]])  # lesions not asked for: untouched
    # a larger fundus, a larger radius: u = fov_radius / 256
    big = coarsen.coarsen(masks, ("EX",), fov_radius=512, rng=np.random.default_rng(0))
    assert np.array_equal(big[EX], ndimage.distance_transform_edt(~masks[EX]) <= 14)


def test_most_microaneurysms_are_left_out_the_smallest_most_often():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 400, 400), bool)
    centres = [(y, x) for y in range(20, 400, 40) for x in range(20, 400, 40)]  # 100 MAs, far apart
    sizes = {}
    for k, (y, x) in enumerate(centres):
        r = 1 if k % 2 else 3  # half tiny, half larger
        masks[MA] |= disc((400, 400), y, x, r)
        sizes[(y, x)] = r
    out = coarsen.coarsen(masks, ("MA",), fov_radius=256, rng=rng)
    kept = {c: bool(out[MA][c]) for c in centres}
    # each kept MA is the original dilated by 4 px (u = 1), each dropped one leaves nothing behind
    original = ndimage.label(masks[MA], structure=np.ones((3, 3)))[0]
    expected = np.zeros_like(masks[MA])
    for c, k in kept.items():
        if k:
            expected |= original == original[c]
    assert np.array_equal(out[MA], ndimage.distance_transform_edt(~expected) <= 4)
    small = np.mean([kept[c] for c in centres if sizes[c] == 1])
    large = np.mean([kept[c] for c in centres if sizes[c] == 3])
    assert small < large < 0.75 and small < 0.4, (small, large)  # kept with p 0.12 .. 0.62


def test_fine_copy_is_the_same_photographs_and_labels(fixture_idrid, tmp_path):
    stems = ["IDRiD_03", "IDRiD_04"]
    out = tmp_path / "FIN"
    coarsen.main(["--dataset", "IDR", "--root", f"IDR={fixture_idrid}", "--out", str(out), "--fine",
                  "--train", stems[0], "--test", stems[1]])
    assert json.loads((out / "splits.json").read_text()) == {"train": [stems[0]],
                                                             "test": [stems[1]]}
    info = json.loads((out / "dataset.json").read_text())
    assert info["lesions"] == {les: f"masks/{les}" for les in LESIONS}
    source = {s.id: s for s in list_samples("IDR", fixture_idrid)}
    copy = {s.id: s for s in list_samples("ABC", out)}  # read back as a dataset of one's own
    assert sorted(copy) == stems
    for stem in stems:
        assert copy[stem].image.read_bytes() == source[stem].image.read_bytes()
        size = load_image(source[stem].image).size
        assert np.array_equal(load_masks(copy[stem], size), load_masks(source[stem], size))


def test_coarse_copy_and_errors(fixture_idrid, tmp_path):
    out = tmp_path / "CRS"
    coarsen.main(["--dataset", "IDR", "--root", f"IDR={fixture_idrid}", "--out", str(out),
                  "--train", "IDRiD_05"])
    (s,) = list_samples("CRS", out)
    image = load_image(s.image)
    fine = load_masks(list_samples("IDR", fixture_idrid)[4], image.size)
    coarse = load_masks(s, image.size)
    assert (coarse[EX] >= fine[EX]).all() and coarse[EX].sum() > 3 * fine[EX].sum()
    with pytest.raises(ValueError, match="already exists"):
        coarsen.main(["--dataset", "IDR", "--root", f"IDR={fixture_idrid}", "--out", str(out)])
    with pytest.raises(ValueError, match="IDRiD_99"):
        coarsen.main(["--dataset", "IDR", "--root", f"IDR={fixture_idrid}", "--out",
                      str(tmp_path / "x"), "--train", "IDRiD_99"])
    assert not (tmp_path / "x").exists()
    # a stem in two splits (data.check would refuse the copy), a negative seed: one line each
    with pytest.raises(ValueError) as err:
        coarsen.main(["--dataset", "IDR", "--root", f"IDR={fixture_idrid}", "--out",
                      str(tmp_path / "x"), "--train", "IDRiD_05", "--test", "IDRiD_06,IDRiD_05"])
    assert str(err.value) == ("--train and --test: 'IDRiD_05' is in both; an image belongs to "
                              "one split")
    assert not (tmp_path / "x").exists()
    r = subprocess.run([sys.executable, "-m", "data.coarsen", "--dataset", "IDR", "--root",
                        f"IDR={fixture_idrid}", "--out", str(tmp_path / "x"), "--seed", "-1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: argument --seed: must be >= 0, got -1"], r.stderr
    assert not (tmp_path / "x").exists()
