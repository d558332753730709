"""data/preprocess.py: FOV crop, resize, pad (paper section 2.2), and the way back onto the
photograph.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_preprocess.py
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_preprocess.py -k real   # real IDRiD

References are independent of the code under test: a drawn disc of known centre and radius, FOV
boxes estimated from red-channel profiles.
"""
import json

import numpy as np
import torch
from PIL import Image

from data.datasets import list_samples
from data.preprocess import preprocess_image, restore_crop, restore_geometry


def _disc_photo(h=300, w=400, cx=210, cy=150, r=120):
    """A fundus-like test photograph: smooth orange disc on black, noise outside; and a lesion
    mask."""
    yy, xx = np.mgrid[:h, :w]
    disc = np.hypot(xx - cx, yy - cy) <= r
    img = np.zeros((h, w, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 8, (h, w))
    img[..., 0] = np.where(disc, 150 + 40 * np.sin(xx / 30.0), noise)
    img[..., 1] = np.where(disc, 60 + 20 * np.cos(yy / 25.0), 0)
    img[..., 2] = np.where(disc, 20, 0)
    lesion = disc & (np.abs(xx - 180) < 15) & (np.abs(yy - 120) < 10)
    return img, disc, lesion


def test_preprocess_crop_and_restore_geometry():
    img, disc, lesion = _disc_photo()
    out, fov, geo = preprocess_image(img, 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    assert fov.shape == (128, 128) and fov.dtype == bool
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
    # numpy in: the box alone, as torch
    crop, box = restore_crop(out[..., 0].astype(np.float32), geo)
    assert box == (x0, y0, x1, y1) and torch.equal(crop, torch.from_numpy(red[y0:y1, x0:x1]))


def _profile_box(red):
    """Independent FOV box estimate: where the row / column mean of the red channel (central band)
    is bright."""
    H, W = red.shape
    cols = red[H // 2 - H // 10:H // 2 + H // 10].mean(0)
    rows = red[:, W // 2 - W // 10:W // 2 + W // 10].mean(1)
    # NOTE: relative to the median, not the max: in IDRiD_12 a saturated optic disc sets the band's
    # max (254) and the dim temporal rim (red ~70) falls under 0.3 x max, 20 px inside the FOV edge
    xs = np.flatnonzero(cols > 0.3 * np.median(cols))
    ys = np.flatnonzero(rows > 0.3 * np.median(rows))
    return xs[0], ys[0], xs[-1] + 1, ys[-1] + 1


def test_real_idrid_fov_crop_hugs_the_fov(fixture_idrid):
    for s in list_samples("IDR", fixture_idrid):
        image = np.asarray(Image.open(s.image).convert("RGB"))
        H, W = image.shape[:2]
        _, fov, geo = preprocess_image(image, 256)
        est = _profile_box(image[..., 0].astype(np.float32))
        assert np.allclose(geo["box"], est, atol=0.01 * W), (s.id, geo["box"], est)
        # IDRiD's FOV is cut flat at top and bottom
        assert geo["box"][1] == 0 and geo["box"][3] == H
        w, h = geo["size"]
        content = fov[geo["pad"][1]:geo["pad"][1] + h, geo["pad"][0]:geo["pad"][0] + w]
        assert content.mean() > 0.85 and not fov[:geo["pad"][1]].any()  # hugging: FOV fills its box
