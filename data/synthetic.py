"""Synthetic fundus photographs written in the five datasets' distributed layouts (the embedded
default).

    python -m data.synthetic --out demo/data                      # 40 images per dataset, 512 px
    python -m data.synthetic --out /tmp/synth --images 6 --size 192 --datasets IDR,RET
    python -m data.prepare --dataset RET --data-root demo/data --cache cache --resolution 512

Every image comes from a numpy Generator seeded by (seed, dataset, image): a circular field of view
(FOV) on black, an orange-red fundus with illumination falloff, a darker macula, a bright optic
disc, a vessel tree grown from the disc, and the four lesions (EX, HE, MA, CWS). Masks come from the
same drawing, then pass through the dataset's labelling style, the paper's finding: "fine" (IDR,
DDR, MES) keeps the drawn outlines, tiny MAs included; "coarse" (RET) merges lesions into dilated
blobs, leaves most small MAs unlabelled and degrades the photograph (blur, noise, uneven light);
"mixed" (FGA) is fine for about half of the images and coarse for the rest. Files use the real
encodings (docs/PROTOCOL.md, "Datasets"; docs/DATA.md, "The synthetic datasets").
"""
import argparse
import csv
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import utils
from data.ids import DATASET_IDS, FOLDERS, LESIONS, parse_dataset_ids


def build_parser():
    """The command line: where, how many images, their size, the seed, the datasets."""
    p = utils.Parser(prog="python -m data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True,
                   help="folder that receives IDRiD/, DDR-dataset/, Seg-set/, "
                        "retinal-lesions-v20191227/ and MAPLES-DR/ (usable as --data-root) "
                        "(required)")
    p.add_argument("--images", type=int, default=40,
                   help="images per dataset (default: %(default)s)")
    p.add_argument("--size", type=int, default=512,
                   help="image height in pixels; IDR is 3:2 wide, DDR varies around it "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: same seed, same bytes (default: %(default)s)")
    p.add_argument("--datasets", default=",".join(DATASET_IDS),
                   help="comma-separated dataset IDs to write, or all (default: %(default)s)")
    return p


utils.start(__name__, build_parser)  # --help before numpy loads; a Ctrl-C while it loads: one line

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from scipy import ndimage  # noqa: E402

ROOT_NAMES = FOLDERS  # each dataset under its distributed folder name
# written inside each generated root: only such a folder may be replaced on a re-run
MARKER = ".synthetic"

# Per dataset: labelling style, lesion prevalence (EX, HE, MA, CWS), fundus colour, JPEG quality,
# optional extra lesions {name: probability}. NOTE: IDRiD has MA and EX masks for all 81 images and
# SE for 40 (docs/PROTOCOL.md, "Datasets"); RET's extras are the haemorrhages the paper leaves out
# of HE.
SPECS = {
    "IDR": dict(style="fine", prevalence=(1.0, 0.97, 1.0, 0.5), tint=(0.84, 0.42, 0.13),
                quality=92, extras={}),
    "DDR": dict(style="fine", prevalence=(0.8, 0.85, 0.9, 0.45), tint=(0.80, 0.38, 0.15),
                quality=90, extras={}),
    "FGA": dict(style="mixed", prevalence=(0.85, 0.9, 0.9, 0.5), tint=(0.82, 0.40, 0.17),
                quality=None, extras={"IRMA": 0.1, "NV": 0.06}),
    "RET": dict(style="coarse", prevalence=(0.7, 0.85, 0.85, 0.4), tint=(0.76, 0.36, 0.15),
                quality=75, extras={"preretinal_hemorrhage": 0.08, "vitreous_hemorrhage": 0.06}),
    "MES": dict(style="fine", prevalence=(0.75, 0.85, 0.9, 0.4), tint=(0.80, 0.34, 0.11),
                quality=92, extras={}),
}


# ----------------------------------------------------------------------------- scene geometry
@dataclass
class Scene:
    """Where things are in one image: frame, FOV circle, optic disc, macula (pixels)."""
    h: int
    w: int
    cx: float
    cy: float
    R: float  # FOV radius in pixels
    cut: float | None  # half-height of the FOV's flat top/bottom cut; None: only the frame cuts
    disc: tuple
    r_disc: float
    macula: tuple

    @property
    def u(self):
        """Length unit: 1 px for a FOV of radius 256 px (a 512 px square image); lesion sizes scale
        with it."""
        return self.R / 256


def _scene(dataset, rng, size, eye=None):
    """Frame size, FOV circle, optic disc and macula of one image of `dataset`."""
    # NOTE: IDR: a 4288x2848 frame; the FOV circle is taller than the frame: cut flat top and bottom
    if dataset == "IDR":
        h, w = size, round(size * 4288 / 2848)
        cx, cy, R, cut = 0.465 * w, h / 2, 0.6 * h * rng.uniform(0.98, 1.02), None
    elif dataset == "DDR":  # several cameras: frame sizes and aspect ratios vary a little
        h = int(size * rng.uniform(0.9, 1.0))
        w = int(h * rng.choice([1.0, 1.25, 1.5]))
        cx, cy, R, cut = w / 2, h / 2, 0.5 * h * rng.uniform(0.95, 1.03), None
    elif dataset == "FGA":  # square, FOV inscribed
        h = w = size
        cx, cy, R, cut = size / 2, size / 2, 0.48 * size * rng.uniform(0.98, 1.0), None
    elif dataset == "RET":  # cropped to the FOV by the providers: the circle touches the frame
        h = w = size
        cx, cy, R, cut = size / 2, size / 2, 0.5 * size * rng.uniform(1.0, 1.04), None
    else:  # MES: square crop of a MESSIDOR frame, whose FOV is cut flat at top and bottom
        h = w = size
        cx, cy, R, cut = size / 2, size / 2, 0.5 * size * rng.uniform(0.97, 0.99), 0.46 * size
    # which side of the centre the disc is on: random, or the eye's own (RET names the eye)
    side = (1 if rng.random() < 0.5 else -1) if eye is None else (1 if eye == "right" else -1)
    disc = (cx + side * 0.64 * R * rng.uniform(0.92, 1.04), cy + R * rng.normal(0, 0.04))
    macula = (cx - side * 0.08 * R * rng.uniform(0.5, 1.5), cy + R * rng.normal(0, 0.03))
    return Scene(h, w, cx, cy, R, cut, disc, 0.14 * R * rng.uniform(0.9, 1.1), macula)


def _inside(sc, p, margin=3.0):
    """Keep the points (N, 2) well inside the FOV and the frame and off the optic disc."""
    x, y = p[:, 0], p[:, 1]
    ok = np.hypot(x - sc.cx, y - sc.cy) < 0.88 * sc.R  # away from the dark FOV rim
    ok &= (y > margin) & (y < sc.h - 1 - margin) & (x > margin) & (x < sc.w - 1 - margin)
    if sc.cut is not None:
        ok &= np.abs(y - sc.cy) < sc.cut - margin
    ok &= np.hypot(x - sc.disc[0], y - sc.disc[1]) > 1.4 * sc.r_disc
    return p[ok]


def _spots(rng, sc, n, centre, spread):
    """Up to n points scattered (Gaussian) around centre, inside the FOV and off the disc."""
    if n <= 0:
        return np.zeros((0, 2))
    # draw more than n: some fall outside the FOV or on the disc
    return _inside(sc, np.asarray(centre) + rng.normal(0, spread, (6 * n + 8, 2)))[:n]


def _blob(rng, x, y, r, rough=0.25, aspect=1.0, k=12):
    """Irregular closed outline (list of (x, y)) of mean radius r around (x, y)."""
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    noise = rng.standard_normal(k)
    noise = (noise + np.roll(noise, 1) + np.roll(noise, -1)) / 3  # smooth along the outline
    rad = r * np.clip(1 + 1.7 * rough * noise, 0.4, 1.8)
    px, py = rad * np.cos(t) * aspect, rad * np.sin(t) / aspect  # an ellipse of that aspect
    # NOTE: cos and sin of two separate draws: a random turn with some skew and scale, not a pure
    # rotation (kept: the demo's images depend on it)
    c, s = np.cos(rng.uniform(0, np.pi)), np.sin(rng.uniform(0, np.pi))
    return list(zip((x + c * px - s * py).tolist(), (y + s * px + c * py).tolist()))


def _walk(rng, x, y, angle, steps, step, turn):
    """Tortuous polyline (list of (x, y)), used for IRMA and new vessels."""
    pts = [(x, y)]
    for _ in range(steps):
        angle += rng.normal(0, turn)
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        pts.append((x, y))
    return pts


# ----------------------------------------------------------------------------- vessels
def _grow(rng, out, sc, x, y, angle, curv, width, ink, depth):
    """Append one vessel (points (N, 2), widths (N,), ink) to out and, recursively, its branches."""
    n, step = 80, 0.03 * sc.R
    angles = angle + np.cumsum(curv + rng.normal(0, 0.05, n))  # a smooth random walk
    pts = np.stack([x + np.cumsum(step * np.cos(angles)), y + np.cumsum(step * np.sin(angles))], 1)
    pts = np.concatenate([[[x, y]], pts])  # (n + 1, 2)
    widths = width * 0.985 ** np.arange(n + 1)  # vessels thin out along their length
    # a vessel ends past the FOV or where it gets thinner than half a pixel
    stop = (np.hypot(pts[:, 0] - sc.cx, pts[:, 1] - sc.cy) > 1.05 * sc.R) | (widths < 0.45)
    end = int(np.argmax(stop)) if stop.any() else n
    out.append((pts[:end + 1], widths[:end + 1], ink))
    if depth < 2:  # branches of branches, no deeper
        for k in 1 + np.flatnonzero(rng.random(n) < 0.07):  # about 7 % of the steps branch
            if k < end:
                side = 1 if rng.random() < 0.5 else -1
                _grow(rng, out, sc, *pts[k], angles[k - 1] + side * rng.uniform(0.5, 1.0),
                      rng.normal(0, 0.02), widths[k] * rng.uniform(0.5, 0.7), ink, depth + 1)


def _vessel_map(rng, sc):
    """Vessel darkness (H, W) in [0, 1]: four arcades (arteries lighter and thinner than veins)
    and small macular twigs grown from the disc, drawn at 2x and box-downsampled for sub-pixel
    widths."""
    base = np.arctan2(sc.macula[1] - sc.disc[1], sc.macula[0] - sc.disc[0])  # disc -> macula
    trunks = []
    for side in (-1, 1):
        # temporal arcades leave the disc steeply and bend around the macula; nasal ones run
        # straighter
        trunks.append((base + side * rng.uniform(1.1, 1.4), -side * rng.uniform(0.03, 0.042)))
        trunks.append((base + np.pi - side * rng.uniform(0.5, 0.9), side * rng.uniform(0.0, 0.015)))
    vessels = []
    for angle, curv in trunks:
        for ink, width, da in ((150, 3.4, -0.12), (255, 4.8, 0.12)):  # artery, vein
            _grow(rng, vessels, sc, *sc.disc, angle + da, curv, width * sc.u, ink, 0)
    for _ in range(rng.integers(3, 6)):  # the macular twigs
        _grow(rng, vessels, sc, *sc.disc, base + rng.normal(0, 0.3), rng.normal(0, 0.02),
              1.5 * sc.u, 170, 1)
    s = 2  # supersampling factor
    canvas = Image.new("L", (sc.w * s, sc.h * s))
    draw = ImageDraw.Draw(canvas)
    for pts, widths, ink in sorted(vessels, key=lambda v: v[1][0]):  # wide vessels over thin ones
        for a in range(0, len(pts) - 1, 8):  # polylines of 8 steps at the width of their first step
            wd = widths[a]
            # thin vessels show less contrast than the trunks
            fade = min(1.0, 0.3 + 0.7 * wd / (3 * sc.u))
            draw.line([(px * s, py * s) for px, py in pts[a:a + 9]], fill=round(ink * fade),
                      width=max(1, round(wd * s)), joint="curve")
    return np.asarray(canvas.reduce(s), np.float32) / 255  # (H, W)


# ----------------------------------------------------------------------------- lesions
def _plan(rng, spec, lesion_free):
    """Number of lesions of each kind (EX counts clusters) and the extra lesions present."""
    sev = rng.uniform(0.2, 1.0)  # severity: scales every lesion count
    present = rng.random(4) < np.asarray(spec["prevalence"])  # (4,) in LESIONS order
    n = {"EX": 1 + rng.poisson(4 * sev), "HE": 1 + rng.poisson(10 * sev),
         "MA": 4 + rng.poisson(26 * sev), "CWS": 1 + rng.poisson(2 * sev)}
    extras = [name for name, p in spec["extras"].items() if rng.random() < p]
    if lesion_free:  # NOTE: after the draws above, which every image makes alike
        return dict.fromkeys(LESIONS, 0), []
    return {L: int(n[L]) if on else 0 for L, on in zip(LESIONS, present)}, extras


def _lesion_shapes(rng, sc, counts, extras):
    """Shapes per lesion: ("dot", (x, y, r)), ("poly", outline) or ("line", (points, width));
    MA radii."""
    u, R = sc.u, sc.R
    # lesions crowd the posterior pole
    pole = np.add(sc.macula, 0.35 * np.subtract(sc.disc, sc.macula))
    shapes = {name: [] for name in (*LESIONS, *extras)}
    ma_r = []
    for x, y in _spots(rng, sc, counts["MA"], pole, 0.35 * R):  # MA: tiny round dark-red dots
        r = max(0.6, u * rng.uniform(0.8, 2.2))
        shapes["MA"].append(("dot", (x, y, r)))
        ma_r.append(r)
    for x, y in _spots(rng, sc, counts["HE"], pole, 0.4 * R):  # HE: dot-blot, some flame-shaped
        aspect = 1.0 if rng.random() < 0.7 else rng.uniform(1.6, 2.6)
        shapes["HE"].append(("poly", _blob(rng, x, y, max(1.5, u * rng.uniform(3, 11)), 0.22,
                                           aspect)))
    # EX: clusters of waxy yellow specks, often in a ring around the macula (circinate)
    a, d = rng.uniform(0, 2 * np.pi, counts["EX"]), R * rng.uniform(0.12, 0.45, counts["EX"])
    centres = _inside(sc, np.stack([sc.macula[0] + d * np.cos(a),
                                    sc.macula[1] + d * np.sin(a)], 1))  # (clusters, 2)
    for cx, cy in centres:
        for x, y in _spots(rng, sc, rng.integers(3, 25), (cx, cy), u * rng.uniform(6, 20)):
            r = float(np.clip(u * rng.lognormal(np.log(1.8), 0.5), 0.6, 8 * u + 0.6))
            # a blob outline (more draws) only for the larger specks
            shapes["EX"].append(("dot", (x, y, r)) if r < 1.5
                                else ("poly", _blob(rng, x, y, r, 0.3, k=8)))
    for x, y in _spots(rng, sc, counts["CWS"], pole, 0.45 * R):  # CWS: pale fluffy patches
        shapes["CWS"].append(("poly", _blob(rng, x, y, u * rng.uniform(8, 16), 0.35,
                                            rng.uniform(1, 1.6), 14)))
    for name in extras:
        spot = _spots(rng, sc, 1, pole, 0.45 * R)
        x, y = spot[0] if len(spot) else sc.macula
        if name == "preretinal_hemorrhage":  # large boat-shaped dark pool
            shapes[name].append(("poly", _blob(rng, x, y, u * rng.uniform(18, 30), 0.15, 1.5, 16)))
        elif name == "vitreous_hemorrhage":  # wide diffuse haze
            shapes[name].append(("poly", _blob(rng, x, y, u * rng.uniform(45, 80), 0.3, 1.2, 16)))
        else:  # IRMA / NV: tortuous thin vessels (NV grows from the disc)
            if name == "NV":
                x, y = sc.disc
            pts = _walk(rng, x, y, rng.uniform(0, 2 * np.pi), int(rng.integers(12, 24)),
                        2.5 * u + 0.5, 0.7)
            shapes[name].append(("line", (pts, max(1, round(1.2 * u)))))
    return shapes, np.asarray(ma_r)


def _rasterise(sc, shapes):
    """Instance map (H, W) int32: pixel = 1-based index of the last shape covering it, 0 = none."""
    canvas = Image.new("I", (sc.w, sc.h))
    draw = ImageDraw.Draw(canvas)
    for i, (kind, g) in enumerate(shapes, 1):
        if kind == "dot":
            x, y, r = g
            draw.ellipse([x - r, y - r, x + r, y + r], fill=i)
        elif kind == "poly":
            draw.polygon(g, fill=i)
        else:
            draw.line(g[0], fill=i, width=g[1], joint="curve")
    return np.asarray(canvas)


def _box(mask, pad):
    """Bounding box (slice, slice) of a mask grown by pad pixels, or None when the mask is empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return None
    return (slice(max(rows[0] - pad, 0), rows[-1] + pad + 1),
            slice(max(cols[0] - pad, 0), cols[-1] + pad + 1))


def dilate(mask, radius):
    """Pixels within `radius` of the mask, holes filled: how a coarse annotator circles a lesion
    group (data/coarsen.py coarsens real masks with it too)."""
    box = _box(mask, int(np.ceil(radius)) + 2)
    if box is None:
        return mask
    out = np.zeros_like(mask)
    out[box] = ndimage.binary_fill_holes(ndimage.distance_transform_edt(~mask[box]) <= radius)
    return out


def _labels(rng, sc, drawn, ma_r, style, fov):
    """Masks as the dataset's annotators draw them. fine: the drawn outlines. coarse: every lesion
    inflated into a blob that swallows its neighbours, and most MAs (the smallest first) left
    out."""
    if style == "fine":
        return {name: (m > 0) & fov for name, m in drawn.items()}
    u = sc.u
    kept = 1 + np.flatnonzero(rng.random(len(ma_r)) < ma_keep_probability(ma_r, u))  # 1-based,
    # as in the instance map
    radius = coarse_radius(u)
    out = {}
    for name, m in drawn.items():
        if name == "MA":
            m = np.isin(m, kept)
        out[name] = dilate(m > 0, radius.get(name, max(1.5, 4 * u))) & fov
    return out


def coarse_radius(u):
    """How far the coarse annotator inflates each lesion, in pixels, for the length unit u (1 px
    for a FOV of radius 256 px; Scene.u)."""
    return {"MA": max(2.0, 4 * u), "HE": max(1.5, 4 * u), "EX": max(2.0, 7 * u),
            "CWS": max(1.5, 5 * u)}


def ma_keep_probability(ma_r, u):
    """The chance a coarse annotator labels an MA of radius ma_r px: 0.12 (the smallest) to 0.62
    (the largest)."""
    return 0.12 + 0.5 * np.clip((ma_r / max(u, 0.3) - 0.8) / 1.4, 0, 1)


# ----------------------------------------------------------------------------- photograph
def _smooth_noise(rng, h, w, cells):
    """Low-frequency noise (H, W) of unit-ish amplitude: a cells x cells grid upsampled
    bicubically."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))


def _smoothstep(t):
    """0 below 0, 1 above 1, a smooth cubic between: soft edges for the disc."""
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def _around(x, y, r):
    """Box (slice, slice) of half-size r around the point (x, y)."""
    r = int(r)
    return slice(max(int(y) - r, 0), int(y) + r + 1), slice(max(int(x) - r, 0), int(x) + r + 1)


def _soft(mask, sigma):
    """(Gaussian-blurred float32 crop of a bool mask, its box), on the bounding box only (fast)."""
    box = _box(mask, int(4 * sigma) + 2)
    if box is None:
        return np.zeros((0, 0), np.float32), (slice(0, 0), slice(0, 0))
    return ndimage.gaussian_filter(mask[box].astype(np.float32), sigma), box


def _blend(img, alpha, box, dark=None, colour=None):
    """In place inside box: darken by alpha * dark (per channel) or paint colour with opacity
    alpha."""
    view, a = img[box], alpha[..., None]
    if dark is not None:
        view *= 1 - a * np.float32(dark)
    else:
        view *= 1 - a
        view += a * np.float32(colour)


def _render(rng, sc, tint, vessels, drawn, degrade):
    """The photograph (H, W, 3) uint8 and the FOV (H, W) bool."""
    h, w, R, u = sc.h, sc.w, sc.R, sc.u
    yy, xx = np.ogrid[:h, :w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    # the dataset's fundus colour, varied per image (brightness, then per channel)
    tint = np.asarray(tint, np.float32) * np.float32(rng.uniform(0.92, 1.08)
                                                     * rng.uniform(0.96, 1.04, 3))
    texture = 1 + 0.05 * _smooth_noise(rng, h, w, 6) + 0.035 * _smooth_noise(rng, h, w, 24)
    img = texture[..., None] * tint  # (H, W, 3), 1.0 = full exposure
    # macula: darker and browner, with a small fovea
    box = _around(*sc.macula, 0.5 * R)
    d2 = (xx[:, box[1]] - sc.macula[0]) ** 2 + (yy[box[0]] - sc.macula[1]) ** 2
    macula = np.exp(-d2 / (2 * (0.15 * R) ** 2)) + 0.4 * np.exp(-d2 / (2 * (0.035 * R) ** 2))
    _blend(img, macula, box, dark=[0.16, 0.3, 0.3])
    # optic disc: yellow-orange with a soft rim and a paler cup
    box = _around(*sc.disc, 1.5 * sc.r_disc + 2)
    dn = np.hypot((xx[:, box[1]] - sc.disc[0]) / sc.r_disc,
                  (yy[box[0]] - sc.disc[1]) / (sc.r_disc * rng.uniform(1.0, 1.15)))  # 1 = rim
    _blend(img, 0.8 * _smoothstep((1.1 - dn) / 0.25), box, colour=[1.0, 0.74, 0.46])
    _blend(img, 0.55 * _smoothstep((0.55 - dn) / 0.35), box, colour=[1.0, 0.9, 0.72])
    _blend(img, vessels, (slice(None), slice(None)), dark=[0.28, 0.6, 0.58])  # vessels stay red
    # lesions: soft alpha from the drawn shapes, so the masks are tight outlines of what is visible
    a, box = _soft(drawn["MA"] > 0, 0.5)
    _blend(img, np.clip(1.6 * a, 0, 1), box, dark=[0.45, 0.72, 0.66])
    a, box = _soft(drawn["HE"] > 0, 0.6)
    _blend(img, a * (0.85 + 0.1 * texture[box]), box, dark=[0.42, 0.72, 0.68])
    for name, m in drawn.items():
        if name == "preretinal_hemorrhage":
            _blend(img, *_soft(m > 0, 1.0), dark=[0.55, 0.88, 0.82])
        elif name == "vitreous_hemorrhage":
            a, box = _soft(m > 0, 8 * u)
            _blend(img, 0.6 * a, box, dark=[0.45, 0.6, 0.6])
        elif name in ("IRMA", "NV"):
            a, box = _soft(m > 0, 0.5)
            _blend(img, 0.8 * a, box, dark=[0.4, 0.65, 0.6])
    a, box = _soft(drawn["EX"] > 0, 0.5)
    _blend(img, a * rng.uniform(0.85, 1.0), box,
           colour=np.float32([1.0, 0.9, 0.36]) * rng.uniform(0.9, 1.05))
    a, box = _soft(drawn["CWS"] > 0, max(0.8, 3 * u))
    _blend(img, 0.65 * a * (0.9 + 0.1 * texture[box]), box, colour=[0.93, 0.8, 0.62])
    # illumination: radial falloff, a tilt across the frame, low-frequency unevenness
    phi = rng.uniform(0, 2 * np.pi)
    tilt = ((xx - sc.cx) * np.cos(phi) + (yy - sc.cy) * np.sin(phi)) / R
    rn = np.hypot(xx - sc.cx, yy - sc.cy) / R  # radius, 1 at the FOV's rim
    light = (1 - rng.uniform(0.35, 0.55) * rn ** 2.5 + rng.uniform(0.0, 0.08) * tilt
             + 0.04 * _smooth_noise(rng, h, w, 3))
    noise_sd = 0.01
    if degrade:  # RET (Kaggle EyePACS): blurrier, noisier, unevenly lit, variably exposed
        light = ((light + rng.uniform(0.15, 0.35) * tilt + 0.1 * _smooth_noise(rng, h, w, 3))
                 * rng.uniform(0.75, 1.15))
        # blur in space only, not across the colour channels
        img = ndimage.gaussian_filter(img, (rng.uniform(0.8, 1.6) * max(u, 0.5),) * 2 + (0,))
        noise_sd = rng.uniform(0.02, 0.035)
    # FOV: soft-edged circle, flat-cut where the camera frame cuts it
    fov_a = np.clip((R - rn * R) / 1.2, 0, 1)  # (H, W): 1 inside, a 1.2 px ramp at the rim
    if sc.cut is not None:
        fov_a = fov_a * np.clip(sc.cut - np.abs(yy - sc.cy), 0, 1)
    img *= (np.clip(light, 0.15, 1.3) * fov_a * 255)[..., None]
    # sensor noise: uniform with the given standard deviation (much cheaper to draw than Gaussian)
    # (the + 0.5 rounds in the uint8 cast below)
    img += ((rng.random((h, w, 3), dtype=np.float32) - 0.5) * np.float32(noise_sd * 255 * 12 ** 0.5)
            + 0.5)
    return np.clip(img, 0, 255, out=img).astype(np.uint8), fov_a > 0.5


@dataclass
class Sample:
    """One synthetic image and its masks, before the dataset's file encoding."""
    image: np.ndarray  # (H, W, 3) uint8
    labels: dict  # lesion or extra name -> (H, W) bool, in the dataset's labelling style
    disc: np.ndarray  # (H, W) bool
    vessels: np.ndarray  # (H, W) bool
    counts: dict  # lesions drawn per kind
    style: str


def make_sample(dataset, rng, size, lesion_free=False, eye=None, style=None):
    """One synthetic image of `dataset` with its masks (not yet encoded); `style` overrides a mixed
    one."""
    spec = SPECS[dataset]
    sc = _scene(dataset, rng, size, eye)
    counts, extras = _plan(rng, spec, lesion_free)
    style = style or spec["style"]
    # NOTE: FGADR mixes annotation granularity; about half of the images are coarse
    if style == "mixed":
        style = "fine" if rng.random() < 0.5 else "coarse"
    vessels = _vessel_map(rng, sc)
    shapes, ma_r = _lesion_shapes(rng, sc, counts, extras)
    drawn = {name: _rasterise(sc, s) for name, s in shapes.items()}  # (H, W) int32 each
    image, fov = _render(rng, sc, spec["tint"], vessels, drawn, degrade=dataset == "RET")
    labels = _labels(rng, sc, drawn, ma_r, style, fov)
    yy, xx = np.ogrid[:sc.h, :sc.w]
    disc = np.hypot(xx - sc.disc[0], yy - sc.disc[1]) <= sc.r_disc
    return Sample(image, labels, disc & fov, (vessels > 0.5) & fov, counts, style)


def _grade(s):
    """A plausible DR grade (0-4) for the grading tables."""
    c = s.counts
    if any(k in s.labels for k in ("NV", "preretinal_hemorrhage", "vitreous_hemorrhage")):
        return 4
    if c["HE"] > 12:
        return 3
    if c["HE"] or c["EX"] or c["CWS"]:
        return 2
    return 1 if c["MA"] else 0


# ----------------------------------------------------------------------------- file encodings
def _save(im, path, **kw):
    """Save a PIL image, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)


def _save_idrid_tiff(mask, path):
    """IDRiD encoding: uncompressed 1-bit palette TIFF, index 0 black, index 1 red."""
    # NOTE: Pillow writes mode "1" as bilevel; PhotometricInterpretation=3 plus a 2-entry colormap
    # makes it the palette image IDRiD ships (read back as mode "P", palette [0,0,0, 255,0,0],
    # values {0, 1}).
    # TIFF tags: bits per sample, photometric, samples per pixel, colormap
    tags = {258: (1,), 262: 3, 277: 1, 320: (0, 65535, 0, 0, 0, 0)}
    _save(Image.fromarray(mask), path, format="TIFF", tiffinfo=tags)


def _antialiased(mask):
    """FGADR encoding: 255 inside, anti-aliased values 1..254 on the lesion's own boundary pixels.

    NOTE: the fringe stays on the drawn pixels, so `> 0` gives back the drawn outline and a stricter
    --mask-threshold shrinks it; a fringe outside would make every fine FGA lesion look coarse.
    """
    out = mask.astype(np.uint8) * 255
    soft, box = _soft(mask, 0.7)
    # the lesion's boundary pixels: the mask minus its erosion
    fringe = mask[box] & ~ndimage.binary_erosion(mask[box], np.ones((3, 3), bool))
    out[box][fringe] = np.clip(np.rint(soft[fringe] * 255), 1, 254)
    return out


def _write_idr(root, name, split, s, rng, i):
    """One image as IDRiD ships it: JPEG photograph, a palette TIFF per lesion present, optic
    disc."""
    seg = root / "A. Segmentation"
    part = {"train": "a. Training Set", "test": "b. Testing Set"}[split]
    _save(Image.fromarray(s.image), seg / "1. Original Images" / part / f"{name}.jpg",
          quality=SPECS["IDR"]["quality"])
    gt = seg / "2. All Segmentation Groundtruths" / part
    folders = {"MA": ("1. Microaneurysms", "MA"), "HE": ("2. Haemorrhages", "HE"),
               "EX": ("3. Hard Exudates", "EX"), "CWS": ("4. Soft Exudates", "SE")}
    for lesion, (folder, code) in folders.items():
        (gt / folder).mkdir(parents=True, exist_ok=True)
        if s.labels[lesion].any():  # NOTE: IDRiD ships no file for a lesion the image lacks
            _save_idrid_tiff(s.labels[lesion], gt / folder / f"{name}_{code}.tif")
    _save_idrid_tiff(s.disc, gt / "5. Optic Disc" / f"{name}_OD.tif")


def _write_ddr(root, name, split, s, rng, i):
    """One image as OIA-DDR ships it: JPEG photograph, an LZW TIFF per lesion (all four)."""
    base = root / "lesion_segmentation" / split
    _save(Image.fromarray(s.image), base / "image" / f"{name}.jpg",
          quality=SPECS["DDR"]["quality"])
    # NOTE: DDR's valid folder name
    labels = base / ("segmentation label" if split == "valid" else "label")
    value = 1 if i % 3 == 0 else 255  # NOTE: DDR mask values are 1 or 255 depending on the image
    for lesion in LESIONS:  # all four files exist, all-zero when the lesion is absent
        code = "SE" if lesion == "CWS" else lesion
        _save(Image.fromarray(s.labels[lesion].astype(np.uint8) * value),
              labels / code / f"{name}.tif", compression="tiff_lzw")


def _write_fga(root, name, split, s, rng, i):
    """One image as FGADR ships it: PNG photograph, an anti-aliased PNG per lesion."""
    _save(Image.fromarray(s.image), root / "Original_Images" / f"{name}.png", compress_level=1)
    # NOTE: "Hemohedge" (sic)
    folders = {"EX": "HardExudate_Masks", "CWS": "SoftExudate_Masks", "HE": "Hemohedge_Masks",
               "MA": "Microaneurysms_Masks", "IRMA": "IRMA_Masks", "NV": "Neovascularization_Masks"}
    for lesion, folder in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        if lesion not in s.labels:  # IRMA / NV files exist only for the images that have them
            continue
        mask = _antialiased(s.labels[lesion])
        if rng.random() < 0.35:  # NOTE: some FGADR masks are RGB with three equal channels
            mask = np.repeat(mask[..., None], 3, axis=2)
        _save(Image.fromarray(mask), root / folder / f"{name}.png")


RET_FILES = {"MA": "microaneurysm", "HE": "retinal_hemorrhage", "EX": "hard_exudate",
             "CWS": "cotton_wool_spots"}


def _write_ret(root, name, split, s, rng, i):
    """One image as Retinal-Lesions ships it: JPEG photograph, a folder of PNGs of the lesions
    present."""
    # NOTE: the release's folder names say 896x896; here the images are --size pixels square
    _save(Image.fromarray(s.image), root / "images_896x896" / f"{name}.jpg",
          quality=SPECS["RET"]["quality"])
    for key, stem in {**RET_FILES, "preretinal_hemorrhage": "preretinal_hemorrhage",
                      "vitreous_hemorrhage": "vitreous_hemorrhage"}.items():
        mask = s.labels.get(key)
        # NOTE: only present lesions have a file (and maybe no folder)
        if mask is None or not mask.any():
            continue
        out = mask.astype(np.uint8) * 255
        # NOTE: 127 = flagged as not following the AAO guideline (never EX/SE): here 20 % of the
        # connected lesions
        if key not in ("EX", "CWS"):
            cc, n = ndimage.label(mask, structure=np.ones((3, 3)))
            out[np.isin(cc, 1 + np.flatnonzero(rng.random(n) < 0.2))] = 127
        _save(Image.fromarray(out), root / "lesion_segs_896x896" / name / f"{stem}.png")


def _write_mes(root, name, split, s, rng, i):
    """One image as the maples-dr export writes it: JPEG photograph, a 1-bit PNG per mask."""
    base = root / split
    _save(Image.fromarray(s.image), base / "fundus" / f"{name}.jpg",
          quality=SPECS["MES"]["quality"])
    folders = {"EX": "exudates", "CWS": "cottonWoolSpots", "HE": "hemorrhages",
               "MA": "microaneurysms"}  # camelCase, as exported
    masks = ({folders[k]: s.labels[k] for k in LESIONS}
             | {"vessels": s.vessels, "opticDisc": s.disc})
    for folder, mask in masks.items():  # 1-bit PNG
        _save(Image.fromarray(mask), base / folder / f"{name}.png")


WRITERS = {"IDR": _write_idr, "DDR": _write_ddr, "FGA": _write_fga, "RET": _write_ret,
           "MES": _write_mes}


# ----------------------------------------------------------------------------- names and splits
def _names(dataset, rng, n):
    """Sorted image names in the dataset's own style, with the official split of each (None: no
    split)."""
    if dataset == "IDR":  # official split: the first 2/3 (54 of 81) train, the rest test
        width = max(2, len(str(n)))
        n_train = max(1, round(n * 54 / 81))
        return [(f"IDRiD_{i:0{width}d}", "train" if i <= n_train else "test")
                for i in range(1, n + 1)]
    if dataset == "DDR":  # e.g. 007-3036-100; official train / valid / test about 50 / 20 / 30 %
        nums, sites = rng.choice(10000, n, replace=False), rng.choice([7, 7, 7, 8, 13], n)
        names = sorted(f"{s:03d}-{k:04d}-{x:03d}"
                       for s, k, x in zip(sites, nums, rng.choice([0, 100, 200], n)))
        n_valid, n_test = round(0.2 * n), round(0.3 * n)
        order = rng.permutation(n)
        split = {int(j): "valid" if r < n_valid else "test" if r < n_valid + n_test else "train"
                 for r, j in enumerate(order)}
        return [(name, split[j]) for j, name in enumerate(names)]
    # FGA, e.g. 0123_1: suffix _1, _2, _3 are source batches (1000 / 254 / 588 images)
    if dataset == "FGA":
        nums = rng.choice(np.arange(1, 2000), n, replace=False)
        sfx = rng.choice([1, 2, 3], n, p=np.array([1000, 254, 588]) / 1842)
        return sorted((f"{k:04d}_{x}", None) for k, x in zip(nums, sfx))
    if dataset == "RET":  # Kaggle <patient>_<eye>; some patients contribute both eyes
        patients = iter(rng.choice(np.arange(10, 44350), n, replace=False))
        names = []
        while len(names) < n:
            p = next(patients)
            eyes = (["left", "right"] if rng.random() < 0.12 and len(names) + 2 <= n
                    else [rng.choice(["left", "right"])])
            names += [f"{p}_{e}" for e in eyes]
        return sorted((name, None) for name in names)
    # MES: MESSIDOR names, e.g. 20051019_38557_0100_PP; official split 138 train / 60 test
    days = np.datetime64("2005-01-10") + rng.choice(600, n, replace=False)
    nums = rng.choice(np.arange(10000, 60000), n, replace=False)
    names = sorted(f"{str(d).replace('-', '')}_{k}_0100_PP" for d, k in zip(days, nums))
    test = set(rng.choice(n, round(n * 60 / 198), replace=False).tolist())
    return [(name, "test" if j in test else "train") for j, name in enumerate(names)]


def _write_dataset(dataset, root, images, size, seed):
    """All images, masks and tables of one dataset under root."""
    k = DATASET_IDS.index(dataset)
    names = _names(dataset, np.random.default_rng([seed, k, 0]), images)
    # NOTE: Retinal-Lesions has 17 images without any mask folder; keep a couple lesion-free
    free = (set(range(1, images, max(2, images // 2))[:2]) if dataset == "RET" and images >= 4
            else set())
    grades = []
    for i, (name, split) in enumerate(names):
        rng = np.random.default_rng([seed, k, 1, i])  # one stream per image
        eye = name.rsplit("_", 1)[1] if dataset == "RET" else None
        # NOTE: a mixed dataset alternates fine and coarse images, so even 12 images split evenly
        style = ("fine", "coarse")[i % 2] if SPECS[dataset]["style"] == "mixed" else None
        s = make_sample(dataset, rng, size, lesion_free=i in free, eye=eye, style=style)
        WRITERS[dataset](root, name, split, s, rng, i)
        grades.append((name, _grade(s)))
    if dataset == "FGA":  # no header: <image>.png,<grade>
        with open(root / "DR_Seg_Grading_Label.csv", "w", newline="") as f:
            csv.writer(f).writerows((f"{name}.png", g) for name, g in grades)
    if dataset == "RET":
        with open(root / "dr_grades.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image id", "kaggle label", "our label"])
            w.writerows((name, g, g) for name, g in grades)


def generate(out_dir, images=40, size=512, seed=0, datasets=DATASET_IDS):
    """Write the chosen synthetic datasets under out_dir in their distributed layouts ->
    {id: root}.

    Each dataset is written to a hidden temporary folder, then renamed into place, replacing a
    previous synthetic copy; a folder of the same name that this module did not write is never
    touched."""
    text = datasets if isinstance(datasets, str) else ",".join(datasets)
    ids = parse_dataset_ids(text, own=False)  # the five only: synthetic copies of their layouts
    if int(images) < 1:
        raise ValueError(f"--images must be at least 1, got {images}")
    if int(size) < 64:
        raise ValueError(f"--size must be at least 64, got {size}")
    if int(seed) < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roots = {}
    for dataset in ids:
        final = out / ROOT_NAMES[dataset]
        if final.exists() and not (final / MARKER).is_file():
            raise ValueError(f"{final} exists and was not written by data.synthetic; refusing to "
                             f"overwrite it")
        tmp = out / f".{ROOT_NAMES[dataset]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_dataset(dataset, tmp, int(images), int(size), int(seed))
        settings = {"images": int(images), "size": int(size), "seed": int(seed)}
        (tmp / MARKER).write_text(json.dumps(settings) + "\n")  # marks the folder as ours
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        roots[dataset] = final
    return roots


def main():
    args = build_parser().parse_args()
    t0 = time.perf_counter()
    roots = generate(args.out, args.images, args.size, args.seed, args.datasets)
    for dataset, root in roots.items():
        print(f"{dataset}: {args.images} images -> {root}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: rerun the same command")
