r"""Lesion maps as files: 8-bit probability PNGs, overlays a clinician can read, image | truth |
prediction panels.

    python predict.py --ckpt runs/IDR/s0/best.pt --images photos/ --out photos_maps/  # photographs
    python evaluate.py --ckpt runs/IDR/s0/best.pt --test IDR --save-maps maps/  # test sets, panels
    python -c "import numpy as np, maps; im = np.full((300, 400, 3), 90, np.uint8); \
p = np.zeros((4, 300, 400)); p[1, 100:200, 150:250] = 0.9; maps.save_maps('out', 'demo', im, p)"

One fixed colour per lesion (COLOURS): EX yellow, HE red, MA green, CWS cyan. An overlay draws, per
lesion, the region at p >= 0.5 (the protocol's Dice threshold, docs/PROTOCOL.md) as an outline in
the lesion's colour over a light fill, edged outside by a thin dark line (so that red stays visible
on a red fundus), and the ground truth, where known, as a white outline just outside its region;
nothing is drawn outside the fundus. The probability is never used as opacity: a weak model's
p = 0.3 everywhere leaves the photograph as it is. The photograph keeps its own
pixel geometry (rows 0..H-1 of the overlay are the photograph's rows); a legend band is added below
it. The files written: docs/EVALUATION.md, "Maps, overlays, panels".
"""
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils import write_atomic
from data.ids import LESION_COLOURS, LESION_NAMES, LESIONS
from data.preprocess import restore_geometry

COLOURS = np.array([LESION_COLOURS[x] for x in LESIONS], dtype=np.uint8)  # (4, 3), LESIONS order
NAMES = LESION_NAMES
THRESHOLD = 0.5  # a lesion's region: p >= 0.5, as the protocol's Dice
FILL_ALPHA = 0.3  # light fill: the photograph stays readable under the region
TRUTH_COLOUR = (255, 255, 255)
# a dark edge just outside every outline: HE's red outline on a red fundus has no contrast of its
# own (both about 80-100 grey levels of luminance), the edge gives it one
HALO_COLOUR = (16, 16, 16)
BAND, INK = (24, 24, 24), (235, 235, 235)  # legend and title background, text
PANEL_TILE = 1024  # longest side of a panel tile: a 4288 px photograph gives a 3072 px wide panel
# zlib level of the probability PNGs: level 6 makes them 23 % smaller and takes 3x longer
PNG_LEVEL = 1
# overlays and panels are photographs: JPEG (4:4:4, so thin coloured outlines stay sharp)
JPEG_QUALITY = 92


# ---- drawing on the photograph -------------------------------------------------------------------
def regions_of(p):
    """A lesion's region, p >= 0.5, of a numpy map: float in [0, 1], or uint8 round(255 p) -> bool
    (H, W).

    NOTE: round(255 p) >= 128 exactly when p >= 0.5 (255 * 0.5 = 127.5 rounds to 128, anything below
    to 127).
    """
    p = np.asarray(p)
    return p >= 128 if p.dtype == np.uint8 else p >= THRESHOLD


def line_width(height, width):
    """Outline width in pixels: about 1/700 of the longest side (6 px on a 4288x2848 photograph), at
    least 1."""
    return max(1, round(max(height, width) / 700))


def _box(mask, margin):
    """Slices of the bounding box of a bool (H, W) mask grown by `margin`, or None when it is
    empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def erode(mask, r, beyond=False):
    """Erosion by a (2r + 1)-pixel square, pixels past the edges counted as `beyond`: bool (H, W) ->
    bool (H, W).

    NOTE: per axis, a running AND whose window doubles at each step (log2(2r + 1) steps): the same
    as scipy.ndimage.minimum_filter(mask, 2r + 1, mode="constant", cval=beyond), 4x faster on a
    photograph.
    """
    L = 2 * r + 1
    for _ in range(2):  # rows, then columns (through the transpose)
        n, pad = mask.shape[0], np.full((r,) + mask.shape[1:], beyond)
        # acc[i]: AND of the padded rows i .. i + span - 1
        acc, span = np.concatenate([pad, mask, pad]), 1
        while 2 * span <= L:
            acc, span = acc[:-span] & acc[span:], 2 * span
        # two overlapping windows of `span` cover L rows; transposed, the next pass does columns
        mask = (acc[:n] & acc[L - span:L - span + n]).T
    return mask


def border(mask, width, outside=False):
    """The band of `width` pixels along a region's border, inside it (or just outside it): bool
    (H, W).

    Only the region's bounding box is eroded (lesions are small, photographs large). A region
    thinner than 2 * width (a microaneurysm) is all border, so it stays visible.
    """
    out = np.zeros_like(mask, dtype=bool)
    box = _box(mask, width + 1)
    if box is None:
        return out
    m = mask[box]
    out[box] = (~erode(~m, width, beyond=True) & ~m) if outside else (m & ~erode(m, width))
    return out


def _blend_table(colour):
    """uint8 (256, 3): each channel value blended with the lesion colour at FILL_ALPHA (a lookup,
    no float copy)."""
    v = np.arange(256, dtype=np.float32)[:, None]
    return np.round((1 - FILL_ALPHA) * v + FILL_ALPHA * colour.astype(np.float32)).astype(np.uint8)


def halo_width(width):
    """The dark edge's width outside an outline `width` pixels wide: half of it, at least 1."""
    return max(1, width // 2)


def draw_regions(canvas, regions, width, fov=None):
    """In place: per lesion, a dark edge just outside the region (within `fov`, bool (H, W), when
    given), a light fill and an outline in its colour. canvas uint8 (H, W, 3); regions: one bool
    (H, W) per lesion, in LESIONS order, or None for a lesion not drawn (a generator is fine: one
    lesion's mask at a time)."""
    for c, region in enumerate(regions):
        box = None if region is None else _box(region, width + 1)
        if box is None:
            continue
        view, m = canvas[box], region[box]  # the region's bounding box only
        halo = border(m, halo_width(width), outside=True)
        view[halo if fov is None else halo & fov[box]] = HALO_COLOUR
        table = _blend_table(COLOURS[c])
        # NOTE: a 1-D lookup per channel is ~5x faster than indexing (N, 3) pixels at once
        for k in range(3):
            channel = view[..., k]
            channel[m] = np.take(table[:, k], channel[m])
        view[border(m, width)] = COLOURS[c]
    return canvas


def overlay(image, probs, truth=None, fov=None, lesions=LESIONS):
    """The photograph with the lesions at p >= 0.5 and the ground truth outlined, and a legend band
    below.

    image uint8 (H, W, 3); probs float (4, H, W) in [0, 1] or uint8 (4, H, W) = round(255 p); truth
    bool (4, H, W) or None; fov bool (H, W) or None (None: probs are already 0 outside the fundus,
    as predict.segment returns them); lesions: the ones drawn (a model trained on some only: the
    others are not its output) -> uint8 (H + band, W, 3).
    """
    H, W = image.shape[:2]
    width = line_width(H, W)
    band = legend(W, truth=truth is not None, prefix="p >= 0.5:", lesions=lesions)
    # the photograph on top, untouched in geometry; the legend band below it
    out = np.empty((H + band.shape[0], W, 3), np.uint8)
    out[:H], out[H:] = image, band
    inside = (lambda m: m) if fov is None else (lambda m: m & fov)  # nothing outside the fundus
    drawn = [name in lesions for name in LESIONS]
    # the regions one lesion at a time (a generator): one full-size bool mask in memory
    draw_regions(out[:H], (inside(regions_of(p)) if d else None for p, d in zip(probs, drawn)),
                 width, fov)
    # the truth last, half as thick, just outside its region: where prediction and truth agree,
    # the two outlines lie side by side
    for t, d in zip(() if truth is None else truth, drawn):
        if d:
            out[:H][inside(border(t, max(1, width // 2), outside=True))] = TRUTH_COLOUR
    return out


def panel(image, probs, truth, fov=None, lesions=LESIONS):
    """image | ground truth | prediction (p >= 0.5), titled, with the legend: uint8 (title + h +
    band, 3 w, 3).

    Each tile is drawn at the photograph's geometry, then shrunk to at most PANEL_TILE pixels (w,
    h); only `lesions` are drawn (as overlay).
    """
    H, W = image.shape[:2]
    width = line_width(H, W)
    scale = min(1.0, PANEL_TILE / max(H, W))  # never enlarged
    w, h = max(1, round(W * scale)), max(1, round(H * scale))
    inside = (lambda m: m) if fov is None else (lambda m: m & fov)
    drawn = [name in lesions for name in LESIONS]
    tiles = []
    # three tiles: the photograph alone, the truth's regions, the prediction's (p >= 0.5)
    for regions in ((), (inside(t) if d else None for t, d in zip(truth, drawn)),
                    (inside(regions_of(p)) if d else None for p, d in zip(probs, drawn))):
        # one full-size copy at a time
        tile = draw_regions(np.array(image, np.uint8), regions, width, fov)
        if scale < 1:  # box-filtered shrinking: outlines thin, never vanish
            tile = np.asarray(Image.fromarray(tile).resize((w, h), Image.BOX))
        tiles.append(tile)
    titles = _titles(["image", "ground truth", "prediction, p >= 0.5"], w)
    return np.concatenate([titles, np.concatenate(tiles, axis=1), legend(3 * w, lesions=lesions)])


# ---- text: PIL's default font (scalable with FreeType, Pillow >= 10.1), sized to the picture -----
def _font(width):
    # about 1/75 of the picture's width, at least 10 px: readable on a 4288 px photograph and a
    # 512 px prepared image alike
    return ImageFont.load_default(size=max(10, round(width / 75)))


def _titles(titles, tile_width):
    """A band with one title centred over each tile: uint8 (h, len(titles) * tile_width, 3)."""
    font = _font(len(titles) * tile_width)
    # NOTE: without FreeType, Pillow's default font is a fixed bitmap font with no .size
    size = font.size if hasattr(font, "size") else 11
    band = Image.new("RGB", (len(titles) * tile_width, round(1.6 * size)), BAND)
    draw = ImageDraw.Draw(band)
    for k, text in enumerate(titles):  # centred over its tile, never left of the tile's edge
        x = k * tile_width + (tile_width - draw.textlength(text, font=font)) / 2
        draw.text((max(x, k * tile_width), 0.3 * size), text, fill=INK, font=font)
    return np.asarray(band)


def legend(width, truth=False, prefix=None, lesions=LESIONS):
    """The legend band: a swatch (outline + light fill) and the name of each of `lesions`, and the
    ground truth's white outline when `truth`; entries flow onto more rows when the picture is
    narrow: uint8 (h, width, 3)."""
    font = _font(width)
    s = font.size if hasattr(font, "size") else 11  # swatch side and text height
    # (swatch, words): a lesion's code, then its name
    entries = [(None, prefix.split())] if prefix else []
    entries += [(COLOURS[c], [lesion, *NAMES[lesion].split()]) for c, lesion in enumerate(LESIONS)
                if lesion in lesions]
    if truth:
        entries.append(("truth", ["ground", "truth"]))
    # NOTE: words are drawn apart, word_gap pixels: at 10-12 px the default font's space is a
    # pixel or two wide, and "CWS cotton-wool spots" read "CWScotton-wool spots"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    word_gap = max(3, round(0.35 * s))
    lengths = [[measure.textlength(w, font=font) for w in words] for _, words in entries]
    # a first pass places the entries, flowing onto a new row where one would pass the right
    # edge; the band's height is then known
    gap, row_h = s, round(1.6 * s)
    placed, x, y = [], gap // 2, 0  # (x, y, swatch, words, their lengths) in reading order
    for (kind, words), widths in zip(entries, lengths):
        w = (0 if kind is None else round(1.4 * s)) + sum(widths) + word_gap * (len(words) - 1)
        if x > gap // 2 and x + w > width:
            x, y = gap // 2, y + row_h
        placed.append((x, y, kind, words, widths))
        x += w + gap
    band = Image.new("RGB", (width, y + row_h), BAND)
    draw = ImageDraw.Draw(band)
    line = max(1, s // 6)  # the swatch's outline, as the regions' outline against their fill
    for x, y, kind, words, widths in placed:
        top = y + round(0.3 * s)
        if kind is not None:
            box = [x, top, x + s, top + s]
            if isinstance(kind, str):  # the ground truth: a white outline, no fill
                draw.rectangle(box, outline=TRUTH_COLOUR, width=line)
            else:  # a lesion: its colour at FILL_ALPHA over the band, as the regions' fill
                fill = tuple(int(round(FILL_ALPHA * k + (1 - FILL_ALPHA) * b))
                             for k, b in zip(kind, BAND))
                draw.rectangle(box, fill=fill, outline=tuple(int(k) for k in kind), width=line)
            x += round(1.4 * s)
        for word, w in zip(words, widths):
            draw.text((x, top), word, fill=INK, font=font)
            x += w + word_gap
    return np.asarray(band)


# ---- files ---------------------------------------------------------------------------------------
def _save(path, array, **options):
    # the temporary name has no image suffix: the format from the final one
    fmt = Image.registered_extensions()[Path(path).suffix.lower()]
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt, **options))


def save_grey_png(path, a):
    """An 8-bit greyscale PNG of uint8 (H, W), every row with the PNG "Up" filter, zlib at
    PNG_LEVEL.

    NOTE: PIL tries all five PNG row filters on every row, which costs more than the compression
    itself on a 12-megapixel probability map (0.1 s of 0.14 s at level 0); one fixed filter
    compresses these smooth, mostly-zero maps as well (PNG spec, section 9: filter type 2 =
    difference with the row above).
    """
    H, W = a.shape
    rows = np.empty((H, W + 1), np.uint8)  # each row: its filter type byte, then the filtered bytes
    rows[:, 0] = 2
    rows[0, 1:] = a[0]  # the row above the first is zeros: its bytes as they are
    np.subtract(a[1:], a[:-1], out=rows[1:, 1:])  # modulo 256, as the format wants

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    # 8 bit grey; deflate; a filter type per row; no interlace
    header = struct.pack(">IIBBBBB", W, H, 8, 0, 0, 0, 0)
    png = b"".join((b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", header),
                    chunk(b"IDAT", zlib.compress(rows, PNG_LEVEL)), chunk(b"IEND", b"")))
    write_atomic(path, lambda tmp: tmp.write_bytes(png))


def to_8bit(p):
    """float probabilities in [0, 1] (any shape) -> uint8 round(255 p), through one float copy."""
    p8 = np.clip(p, 0.0, 1.0)
    p8 *= 255
    return np.rint(p8, out=p8).astype(np.uint8)


def save_maps(out_dir, name, image, probs, truth=None, fov=None, lesions=LESIONS):
    """Write <name>_<LESION>.png (probability x 255, 8 bit) for each of `lesions`,
    <name>_overlay.jpg and, when the ground truth is given, <name>_panel.jpg. image uint8 (H, W, 3),
    probs float (4, H, W) in [0, 1] or uint8 (4, H, W) = round(255 p) (to_8bit's), truth bool (4, H,
    W), fov bool (H, W); lesions: the ones written and drawn (default all four; a model trained on
    some only: those)."""
    out_dir = Path(out_dir)
    for c, lesion in enumerate(LESIONS):
        if lesion in lesions:
            save_grey_png(out_dir / f"{name}_{lesion}.png",
                          probs[c] if probs.dtype == np.uint8 else to_8bit(probs[c]))
    jpeg = {"quality": JPEG_QUALITY, "subsampling": 0}  # subsampling 0: 4:4:4
    _save(out_dir / f"{name}_overlay.jpg", overlay(image, probs, truth, fov, lesions), **jpeg)
    if truth is not None:
        _save(out_dir / f"{name}_panel.jpg", panel(image, probs, truth, fov, lesions), **jpeg)


def save_test_maps(out_dir, item, probs, geometry, lesions=LESIONS):
    """save_maps for a prepared test image, mapped back to its photograph's geometry (the cache's
    meta.json).

    item: a data.PreparedDataset item (image, masks, fov at the prepared resolution); probs float
    (4, R, R). NOTE: the cache holds the prepared image only, so the photograph is that image
    enlarged (bilinear) into the original crop box, black around it; the masks are restored with
    nearest neighbour, the FOV as predict.segment restores it (bilinear, cut at 0.5).
    """
    # (3, H0, W0)
    image = restore_geometry(item["image"].transpose(2, 0, 1).astype(np.float32), geometry)
    image = np.clip(image.transpose(1, 2, 0) + 0.5, 0, 255).astype(np.uint8)  # (H0, W0, 3)
    # (H0, W0), a smooth rim
    fov = restore_geometry(item["fov"].astype(np.float32), geometry) >= 0.5
    truth = restore_geometry(item["masks"], geometry)  # (4, H0, W0) bool
    # (4, H0, W0), 0 outside the FOV
    probs = restore_geometry(np.asarray(probs, np.float32), geometry) * fov
    save_maps(out_dir, item["id"], image, probs, truth, fov, lesions)
