"""Segment your own fundus photographs with a trained model (or an ensemble): command line, Python.

    python predict.py --ckpt runs/IDR+MES/s0/best.pt --images photos/ --out photos_maps/
    python predict.py --ckpt runs/IDR/s0/best.pt runs/IDR/s1/best.pt --images photos/ --tta
    python predict.py --ckpt hub:IDR+DDR --images photos/          # the authors' released model

    import sys; sys.path.append("/path/to/retlesions"); import retlesions  # from any folder
    models = retlesions.load_ensemble(["runs/IDR+MES/s0/best.pt"])        # once
    probs = retlesions.segment(retlesions.read_photo("eye.jpg"), models)  # (4, H, W): EX HE MA CWS

Each photograph gets the training data's preprocessing (FOV crop, resize, pad: paper section 2.2)
at the model's resolution; the maps come back on its own geometry, 0 outside the fundus. Per
photograph: <name>_<LESION>.png (probability x 255, 8-bit) for each lesion the model was trained
on, <name>_overlay.jpg (maps.py) and, with --masks, <name>_<LESION>_mask.png (0 or 255: p >=
--threshold). OUT/lesions.csv: per photograph and lesion, the lesion's area (pixels, % of the
fundus), its number of lesions (8-connected components, as characterize.py counts them) and its
maximum probability; per photograph whether a fundus was found and a quality flag (photo_quality).
Several --ckpt form an ensemble; hub:COMBO is the authors' model (authors.py). More in
docs/EVALUATION.md.
"""
import sys
from pathlib import Path

import utils


def build_parser():
    p = utils.Parser(description=__doc__)
    p.add_argument("--ckpt", nargs="+", action="extend", required=True,
                   help="checkpoint(s), average.py ensemble manifest(s), or the authors' models "
                        "(hub:IDR+DDR); several: an ensemble (required)")
    p.add_argument("--images", required=True, metavar="DIR",
                   help="folder of fundus photographs (required)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the maps go (default: IMAGES_maps)")
    p.add_argument("--resolution", type=int, default=None,
                   help="square size (default: the models' own)")
    p.add_argument("--lesions", default=None, metavar="LIST",
                   help="lesions drawn (default: those trained)")
    p.add_argument("--masks", action="store_true",
                   help="also write <name>_<LESION>_mask.png, 0 or 255 (default: off)")
    p.add_argument("--threshold", type=utils.check_range(float, 0, 1, low_open=True), default=0.5,
                   help="a lesion's region for --masks and lesions.csv: the 8-bit map >= "
                        "round(255 THRESHOLD), exactly p >= 0.5 at 0.5; the overlay keeps 0.5 "
                        "(default: %(default)s)")
    p.add_argument("--tta", action="store_true", help="average over the 4 flips (default: off)")
    p.add_argument("--tile", type=utils.check_range(int, 1), default=None,
                   help="predict in tiles of this size (default: whole image)")
    p.add_argument("--tile-overlap", type=utils.check_range(float, 0, 0.999999), default=0.5,
                   help="fraction of a tile shared with its neighbour, in [0, 1) (default: 0.5)")
    p.add_argument("--style", default=None,
                   help="style of a style-conditioned model (default: fine)")
    # --device stays None here (no torch before --help): main() resolves it
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=utils.DTYPES,
                   help="autocast precision (default: float32)")
    return p


utils.start(__name__, build_parser)  # --help before torch loads; a Ctrl-C while it loads: one line
# the heavy imports (torch, numpy, the data modules: seconds) after --help was answered

import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import authors  # noqa: E402
import average  # noqa: E402
import data  # noqa: E402
from data.datasets import IMAGE_SUFFIXES, load_image  # noqa: E402
from data.ids import LESIONS  # noqa: E402
from maps import save_grey_png, save_maps  # noqa: E402
from model import load_checkpoint, load_models  # noqa: E402
from protocol import predict_fitting, to_input  # noqa: E402


# ---- models from any source ----------------------------------------------------------------------
def read_checkpoint(path, seen=frozenset()):
    """A checkpoint dict from: a training checkpoint (.pt), an average.py ensemble manifest (.json:
    its members loaded, {"kind": "ensemble", "members": [checkpoints]}), or the authors' models
    (hub:COMBO, their folder or .safetensors). One-line errors naming the path."""
    if authors.is_spec(path) or authors.is_layout(path):
        return authors.load(path)
    if Path(path).suffix != ".json":
        return load_checkpoint(path)
    # a manifest: `seen` holds the manifests above this one, so a cycle is one line, not a recursion
    key = str(Path(path).resolve())
    if key in seen:
        raise ValueError(f"ensemble manifest {path} lists itself (through its members)")
    manifest, paths = average.read_manifest(path)  # member paths resolved against its folder
    members = []
    for name, member in zip(manifest["members"], paths):
        if not authors.is_spec(member) and not Path(member).exists():
            raise FileNotFoundError(f"ensemble manifest {path}: member {name} not found ({member})")
        ckpt = read_checkpoint(member, seen | {key})
        # a manifest inside a manifest: its members join this one's list (flat, equally weighted)
        members += ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
    return {"kind": "ensemble", "members": members, "args": members[0].get("args") or {},
            "provenance": manifest.get("provenance") or {}, "version": manifest.get("version", 1)}


class Ensemble(NamedTuple):
    """load_ensemble's result: unpacks as `models, headers = load_ensemble(...)`, and segment()
    takes it whole."""
    models: list
    headers: list


def load_ensemble(paths, device="cpu"):
    """Every model of these checkpoints (read_checkpoint) in eval mode -> Ensemble(models,
    headers). Each model has .cfg (model.ModelConfig: its resolution and lesions) and .source
    (the path, and the member); a header keeps the small fields of its checkpoint (args, kind,
    method, provenance, step, each member's args)."""
    models, headers = [], []
    for p in map(str, paths):
        ckpt = read_checkpoint(p)
        loaded = load_models(ckpt, device, where=p)  # a manifest: one model per member
        for i, m in enumerate(loaded):
            m.source = p if len(loaded) == 1 else f"{p} (member {i})"  # named in one-line errors
        models += loaded
        # no weights in the header: the models hold them, and the checkpoint dict is let go
        headers.append({k: v for k, v in ckpt.items()
                        if k in ("args", "kind", "method", "provenance", "step")}
                       | {"members": [{"args": m.get("args")} for m in ckpt.get("members") or []]})
    return Ensemble(models, headers)


def ensemble_resolution(models, resolution=None):
    """The square size every model runs at: `resolution` when given, else the one they were all
    trained at. NOTE: members trained at different sizes are refused, not run at the first one's:
    the ensemble's score would then depend on the order of its members."""
    if resolution is not None:
        # a bool is an int to Python: refused, as is a float
        if (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
                or resolution < 1):
            raise ValueError(f"resolution must be >= 1 pixel (a whole number), got {resolution!r}")
        return int(resolution)
    found = {}  # resolution -> the first model trained at it
    for m in models:
        if m.cfg.resolution is not None:  # None: an old checkpoint that recorded none
            found.setdefault(m.cfg.resolution, getattr(m, "source", "a model"))
    if len(found) > 1:
        sizes = ", ".join(f"{where} at {r} px" for r, where in found.items())
        raise ValueError(f"--ckpt: the ensemble's members were trained at different resolutions "
                         f"({sizes}); pass --resolution R to run every member at R")
    if not found:
        raise ValueError(f"{getattr(models[0], 'source', 'the model')} records no resolution: "
                         f"pass --resolution")
    return next(iter(found))


def ensemble_lesions(models, lesions=None):
    """The lesions scored and drawn: `lesions` when given, else those every model was trained on.
    NOTE: a lesion a model was not trained on is refused: its channel is an untrained head, and its
    maps and scores would mean nothing."""
    if not lesions:
        return tuple(x for x in LESIONS if all(x in m.cfg.lesions for m in models))
    # "HE,EX" or a list -> LESIONS order, one line for an unknown name
    asked = data.parse_lesions(",".join(lesions) if not isinstance(lesions, str) else lesions)
    for m in models:
        untrained = [x for x in asked if x not in m.cfg.lesions]
        if untrained:
            where = getattr(m, "source", "the model")
            raise ValueError(f"--lesions {','.join(untrained)}: {where} was trained on "
                             f"{','.join(m.cfg.lesions)} only")
    return asked


def check_style(models, style=None):
    """--style for these models -> the style they run at (None when none is style-conditioned:
    train.py --style-condition); a one-line ValueError for a style given to an unconditioned model
    or one it lacks."""
    for m in models:
        try:
            m.style_mix(style, 1)  # what the forward pass does with it: raises for a bad style
        except ValueError as e:
            raise ValueError(f"--style {style}: {e}") from None
    # fine, for a model trained on a fine set
    defaults = [m.default_style for m in models if m.style_tokens]
    return style if style is not None else defaults[0] if defaults else None


# ---- one photograph ------------------------------------------------------------------------------
def read_photo(path):
    """A photograph as viewers show it (turned by its EXIF orientation tag) -> uint8 (H, W, 3)
    RGB."""
    return np.asarray(load_image(path))


def _check_photo(image):
    """A one-line ValueError unless `image` is a uint8 (H, W, 3) numpy array, H and W >= 1."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and min(image.shape[:2]) >= 1):
        what = (f"{image.dtype} {tuple(image.shape)}" if hasattr(image, "shape")
                else type(image).__name__)
        raise ValueError(f"segment expects an RGB photograph as a uint8 numpy array (H, W, 3), H "
                         f"and W >= 1, got {what}")


@torch.inference_mode()
def segment(image, models, resolution=None, device=None, dtype="float32", tta=False, tile=None,
            overlap=0.5, style=None, uint8=False):
    """Segment one photograph: uint8 (H, W, 3) RGB -> float32 (4, H, W) probabilities, EX HE MA CWS.

    models: load_ensemble's Ensemble or a list of its models (loaded once, reused for every
    photograph), or a path (or a list of paths) loaded at each call. resolution: default the
    models' own. dtype, tta, tile, overlap, style: as predict.py's flags. uint8=True: the maps as
    uint8 round(255 p) (the PNGs' values; p >= 0.5 is >= 128), a quarter of the memory.
    """
    return _segment(image, models, resolution, device, dtype, tta, tile, overlap, style, uint8)[0]


@torch.inference_mode()
def _segment(image, models, resolution=None, device=None, dtype="float32", tta=False, tile=None,
             overlap=0.5, style=None, uint8=False):
    """segment() -> (maps (4, H, W), the number of the photograph's pixels inside the fundus)."""
    _check_photo(image)
    if isinstance(models, Ensemble):
        models = models.models
    elif isinstance(models, (str, Path)) or not all(isinstance(m, torch.nn.Module) for m in models):
        paths = [models] if isinstance(models, (str, Path)) else list(models)
        models = load_ensemble(paths, device or utils.default_device())[0]
    resolution = ensemble_resolution(models, resolution)
    device = next(models[0].parameters()).device  # loaded models stay where they are
    # (R, R, 3) uint8, (R, R) bool, plain numbers (crop box, size, padding)
    square, fov, geometry = data.preprocess_image(image, resolution)
    probs, _ = predict_fitting(models, to_input(square[None], device), tile, dtype, tta, overlap,
                               style)  # (1, 4, R, R); the tile halves on a GPU out of memory
    fov = torch.from_numpy(fov).to(device)
    probs = probs[0].masked_fill_(~fov, 0.0)  # (4, R, R), in place
    # NOTE: outside the fundus the bilinear edge would leak: the FOV restored bilinearly, then cut
    # at 0.5, for a smooth rim rather than the prepared pixels' staircase; in the crop box only (the
    # photograph is 0 outside it): no full-size float copy of the FOV or of a lesion
    outside, (x0, y0, x1, y1) = data.restore_crop(fov.float(), geometry)  # (y1 - y0, x1 - x0)
    outside = outside < 0.5
    out = np.zeros((probs.shape[0], geometry["height"], geometry["width"]),
                   np.uint8 if uint8 else np.float32)  # (4, H, W): the photograph's own size
    for c in range(len(out)):  # one lesion at a time
        crop = data.restore_crop(probs[c], geometry)[0].masked_fill_(outside, 0.0)
        if uint8:  # in place, as maps.to_8bit does it: round half to even of 255 p
            crop = crop.clamp_(0.0, 1.0).mul_(255).round_().to(torch.uint8)
        out[c, y0:y1, x0:x1] = crop.cpu().numpy()
    return out, int((~outside).sum())


# ---- a folder of photographs ---------------------------------------------------------------------
def photos_in(folder):
    """The image files of a folder, sorted; hidden files skipped (macOS copies leave "._IMG_1.jpg"
    beside each)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images folder not found: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


# photo_quality: measured on a copy prepared at this size, so the limits do not depend on the
# model's resolution (the IDRiD photographs of tests/fixtures/idrid-4l14 measure contrast 15-36
# and noise 0.5-0.6 grey levels there; a white or grey frame contrast 0, a frame of pure noise
# noise 8-12)
QUALITY_RESOLUTION = 512
MIN_CONTRAST = 3.0  # grey levels of luminance in the FOV: below, a flat frame (white, grey, blank)
MAX_NOISE = 3.0  # Immerkaer's sigma, grey levels: above, noise rather than a photograph
# a fundus photograph's FOV is a disc with dark corners (of its crop box: pi / 4 for a whole disc,
# ~0.9 for IDRiD's cut disc): a "FOV" filling the whole box is a bright frame, not a fundus
MAX_BOX_SHARE = 0.97
# A colour fundus photograph: red and green differ by tens of grey levels inside the fundus; a
# grey-scale copy (or a red-free one saved as RGB) by none. And a side below MIN_SIDE is no
# photograph the model can read (a thumbnail, an icon).
MIN_COLOUR = 2.0  # mean |R - G| + |G - B| in the FOV, grey levels
MIN_SIDE = 64  # px


def photo_quality(image):
    """Whether a fundus was found and a quality flag for a photograph uint8 (H, W, 3) -> (found,
    flag, measures): characterize.py's named measures (characterize.QUALITY_MEASURES) on a copy
    prepared at QUALITY_RESOLUTION. found: a bright field of view with a dark surround (a
    photograph cropped inside the fundus has none, and reads as not found too); flag: "ok", or the
    problems found, "; "-separated (no fundus, tiny, grey-scale, flat, noisy)."""
    # NOTE: imported here, not at the top: characterize loads scipy.stats and matplotlib, which
    # segment() never needs
    import characterize

    square, fov, geometry = data.preprocess_image(image, QUALITY_RESOLUTION)
    w, h = geometry["size"]
    measures = characterize.quality_measures(square, fov)
    box_share = float(fov.sum()) / (w * h)  # the FOV's share of its crop box
    problems = []
    if fov.mean() < 0.01:
        problems.append("no fundus: no bright field of view")
    elif box_share > MAX_BOX_SHARE:
        problems.append(f"no fundus: the bright field fills {100 * box_share:.0f}% of its box, "
                        f"no dark surround")
    if min(image.shape[:2]) < MIN_SIDE:
        problems.append(f"tiny: {image.shape[1]}x{image.shape[0]} px (at least {MIN_SIDE} a side "
                        f"expected)")
    if fov.any():
        rgb = square[fov].astype(np.int16)  # (N, 3)
        colour = float(np.abs(rgb[:, 0] - rgb[:, 1]).mean() + np.abs(rgb[:, 1] - rgb[:, 2]).mean())
        if colour < MIN_COLOUR:
            problems.append("grey-scale: no colour (a colour fundus photograph is expected)")
    contrast, noise = measures["contrast"], measures["noise"]
    if np.isfinite(contrast) and contrast < MIN_CONTRAST:
        problems.append(f"flat: contrast {contrast:.1f} grey levels")
    if np.isfinite(noise) and noise > MAX_NOISE:
        problems.append(f"noisy: noise {noise:.1f} grey levels")
    found = not any(x.startswith("no fundus") for x in problems)
    return found, "; ".join(problems) or "ok", measures


def lesion_rows(photo, name, probs, fov_pixels, lesions, threshold=0.5):
    """lesions.csv's rows of one photograph: per lesion of `lesions`, its region (8-bit map >=
    round(255 threshold): exactly p >= 0.5 at 0.5, as maps.regions_of), the region's pixels and
    share of the fundus, its lesions (8-connected components: characterize.component_stats) and
    the maximum probability. probs uint8 (4, H, W) = round(255 p)."""
    import characterize  # NOTE: here, as in photo_quality

    level = int(np.rint(255 * threshold))  # round half to even, as maps.to_8bit rounds p
    rows = []
    for c, lesion in enumerate(LESIONS):
        if lesion not in lesions:
            continue
        region = probs[c] >= level  # (H, W) bool
        area = int(np.count_nonzero(region))
        count, _ = characterize.component_stats(region)
        rows.append({"photograph": photo, "name": name, "lesion": lesion,
                     "threshold": threshold, "area_px": area,
                     "area_percent_of_fundus": round(100 * area / fov_pixels, 4)
                     if fov_pixels else float("nan"),
                     "components": count, "max_probability": round(int(probs[c].max()) / 255, 4),
                     "fundus_px": fov_pixels})
    return rows


def save_masks(out_dir, name, probs, lesions, threshold=0.5):
    """<name>_<LESION>_mask.png: 0 or 255, 255 where the 8-bit map >= round(255 threshold)."""
    level = int(np.rint(255 * threshold))
    for c, lesion in enumerate(LESIONS):
        if lesion in lesions:
            save_grey_png(Path(out_dir) / f"{name}_{lesion}_mask.png",
                          np.where(probs[c] >= level, np.uint8(255), np.uint8(0)))


def predict_images(ckpt_paths, image_dir, out_dir, resolution=None, device=None, dtype="float32",
                   tta=False, tile=None, overlap=0.5, style=None, lesions=None, masks=False,
                   threshold=0.5):
    """Maps for every photograph of a folder (segment()), on each one's own geometry, the masks
    (masks=True) and OUT/lesions.csv; a progress bar, then a summary of what was written -> list
    of the photographs' map names. lesions: the lesions written and drawn (None = those the models
    were trained on, train.py --lesions)."""
    import characterize  # NOTE: here, as in photo_quality: its CSV writer

    photos = photos_in(image_dir)
    if not photos:  # before --out is made: a failed run leaves no empty folder
        raise ValueError(f"no image in --images {image_dir} (image files: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    if Path(out_dir).resolve() == Path(image_dir).resolve():  # the next run would read the maps
        raise ValueError(f"--out {out_dir} is the --images folder: its maps would be read as "
                         f"photographs next time; pass another --out")
    out_dir = utils.writable_folder(out_dir, "--out", "write maps there")  # before the model loads
    models, _ = load_ensemble([str(p) for p in ckpt_paths],
                              torch.device(device or utils.default_device()))
    # the flags checked against the models once, before the first photograph
    resolution = ensemble_resolution(models, resolution)
    lesions = ensemble_lesions(models, lesions)
    style = check_style(models, style)
    written, rows, flagged, skipped, tic = [], [], [], [], time.time()
    # one photograph after the other, with an ETA, on stderr; disable=None: silent where stderr
    # is no terminal (logs)
    for path in tqdm(photos, desc="photographs", unit="photo", disable=None):
        try:
            original = read_photo(path)  # (H0, W0, 3) uint8; 16-bit files scaled by their range
        except (OSError, ValueError) as e:
            # one bad photograph (unreadable, or over PIL's decompression-bomb limit) never stops
            # the folder
            tqdm.write(f"warning: skipping {path}: {e}", file=sys.stderr)
            skipped.append(path.name)
            continue
        probs, fov_pixels = _segment(original, models, resolution, device, dtype, tta, tile,
                                     overlap, style, uint8=True)  # (4, H0, W0) uint8: the PNGs'
        # a.jpg and a.png: the second one's maps are a_png_*
        name = path.stem if path.stem not in written else f"{path.stem}_{path.suffix[1:]}"
        save_maps(out_dir, name, original, probs, lesions=lesions)
        if masks:
            save_masks(out_dir, name, probs, lesions, threshold)
        found, flag, _ = photo_quality(original)
        rows += [{**r, "fundus_found": found, "quality": flag}
                 for r in lesion_rows(path.name, name, probs, fov_pixels, lesions, threshold)]
        if flag != "ok":
            flagged.append(f"{path.name}: {flag}")
        # NOTE: freed before the next photograph is read: one photograph's arrays at a time
        del original, probs
        written.append(name)
    if not written:
        raise ValueError(f"no readable image in --images {image_dir}")
    characterize.write_per_image_csv(rows, Path(out_dir) / "lesions.csv")
    print_summary(out_dir, written, lesions, masks, threshold, flagged, skipped, time.time() - tic)
    return written


def print_summary(out_dir, written, lesions, masks, threshold, flagged, skipped, seconds):
    """The closing paragraph of predict.py --images: what was written where, what to look at."""
    names = ", ".join(lesions)
    lines = [f"{len(written)} photograph(s) segmented in {seconds:.0f} s into {out_dir}/:",
             f"  <name>_<LESION>.png: probability x 255 (8-bit) of {names}",
             "  <name>_overlay.jpg: the photograph, lesions at p >= 0.5 outlined, a legend below"]
    if masks:
        lines.append(f"  <name>_<LESION>_mask.png: 255 where p >= {threshold:g}, else 0")
    lines.append(f"  lesions.csv: per photograph and lesion, area (px, % of the fundus), lesions "
                 f"(8-connected components) and max probability at p >= {threshold:g}; fundus "
                 f"found, quality")
    if skipped:
        lines.append(f"  skipped (unreadable): {', '.join(skipped)}")
    if flagged:  # quality flags: a white, black or noise frame is "segmented" too
        lines.append(f"  check these {len(flagged)} flagged photograph(s) (lesions.csv, quality):")
        lines += [f"    {x}" for x in flagged]
    print("\n".join(lines))


def main(argv=None):
    args = build_parser().parse_args(argv)
    # a device this machine lacks ("cuda" without a GPU) is one line now, not a traceback later
    device = utils.check_device(args.device or utils.default_device())
    out = args.out or f"{Path(args.images).resolve()}_maps"  # photos/ -> photos_maps/ beside it
    predict_images(args.ckpt, args.images, out, args.resolution, device, args.dtype, args.tta,
                   args.tile, args.tile_overlap, args.style, args.lesions, args.masks,
                   args.threshold)


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: the maps written so far are kept; rerun the same "
                                "command")
