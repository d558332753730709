"""Evaluate checkpoints on test sets with the IDRiD challenge protocol (11-threshold AUPR and Dice, pooled).

    python evaluate.py --ckpt runs/IDR+DDR/s0/best.pt --test MES --data-root data_raw
    python evaluate.py --ckpt runs/IDR/s0/best.pt runs/IDR/s1/best.pt --test IDR,DDR --tta --tile 768
    python evaluate.py --ckpt runs/IDR/ensemble.pt --save-maps maps/          # an average.py file, maps as PNG
    python evaluate.py --ckpt runs/IDR/s0/best.pt --images my_photos/ --save-maps my_maps/   # your own images

Several checkpoints form an ensemble that averages sigmoid probabilities (so does an ensemble file written by
average.py). Counts are pooled over all pixels of a test set and accumulated on the device where the
predictions are; the protocol is in ../shared/REFERENCE.md ("Evaluation protocol").
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

import data
from data import DATASET_IDS, LESIONS
from kernels import binned_counts, pr_metrics
from model import load_checkpoint, load_models

THRESHOLDS = 11  # the IDRiD challenge's float32 linspace(0, 1, 11)
FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, horizontal, vertical, both: the flip group of a square image
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Overlay colours (RGB) in LESIONS order: EX yellow, HE red, MA green, CWS cyan.
COLOURS = np.array([[255, 230, 0], [230, 20, 20], [40, 230, 40], [0, 200, 255]], dtype=np.float32)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


# ---------------------------------------------------------------------------------------------------------
# Prediction: ensemble mean of sigmoid probabilities, flip TTA, overlapping tiles
# ---------------------------------------------------------------------------------------------------------
def _as_dtype(dtype):
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def predict(models, x, dtype=torch.float32, tta=False):
    """Mean sigmoid probability over models (and flips): x float (B, 3, H, W) in [0, 1] -> float32 (B, 4, H, W)."""
    dtype = _as_dtype(dtype)
    flips = FLIPS if tta else FLIPS[:1]
    total = None
    for m in models:
        for dims in flips:
            xi = x.flip(dims) if dims else x
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = m(xi)  # (B, 4, H, W)
            # NOTE: an ensemble averages probabilities, not logits (the paper's ensembles, section 3.3).
            p = torch.sigmoid(logits.float())
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
    return total / (len(models) * len(flips))


def _window_starts(size, tile, stride):
    """Evenly spread window origins covering [0, size): first at 0, last flush with the end."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / stride) + 1
    return sorted({round(i * (size - tile) / (n - 1)) for i in range(n)})


def _ramp(n, overlap, device):
    """1-D blending weight: linear ramps of `overlap` pixels at both ends, 1 inside, never 0."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    edge = torch.minimum(i, n - 1 - i) + 0.5
    return (edge / max(overlap, 1)).clamp(max=1.0)


def predict_tiled(models, x, tile, dtype=torch.float32, tta=False, overlap=0.5):
    """predict() over overlapping tile x tile windows, blended with linear ramps: (B, 3, H, W) -> (B, 4, H, W).

    `overlap` is the fraction of the tile shared by neighbouring windows. The weights are divided out, so
    a pixel seen by one window keeps that window's probability and a pixel seen by several gets their
    weighted mean (borders of a window, where the receptive field is cut, weigh least).
    """
    B, _, H, W = x.shape
    if tile is None or (tile >= H and tile >= W):
        return predict(models, x, dtype, tta)  # one window: exactly the untiled prediction
    th, tw = min(tile, H), min(tile, W)
    ov = int(round(overlap * tile))
    stride = max(tile - ov, 1)
    weight = _ramp(th, ov, x.device)[:, None] * _ramp(tw, ov, x.device)[None, :]  # (th, tw)
    out = torch.zeros(B, len(LESIONS), H, W, device=x.device)
    norm = torch.zeros(H, W, device=x.device)
    for y0 in _window_starts(H, th, stride):
        for x0 in _window_starts(W, tw, stride):
            p = predict(models, x[..., y0:y0 + th, x0:x0 + tw], dtype, tta)  # (B, 4, th, tw)
            out[..., y0:y0 + th, x0:x0 + tw] += p * weight
            norm[y0:y0 + th, x0:x0 + tw] += weight
    return out / norm


def _predict_fitting(models, x, tile, dtype, tta, overlap):
    """predict_tiled(), halving the tile while the device runs out of memory -> (probs, tile that fitted)."""
    while True:
        try:
            return predict_tiled(models, x, tile, dtype, tta, overlap), tile
        except torch.OutOfMemoryError:
            size = tile or max(x.shape[-2:])
            if x.device.type != "cuda" or size <= 128:
                raise
            torch.cuda.empty_cache()
            tile = size // 2
            print(f"warning: out of device memory; predicting in {tile} px tiles from now on", file=sys.stderr)


def _to_input(images_uint8, device):
    """uint8 (B, H, W, 3) numpy -> float (B, 3, H, W) in [0, 1] on the device (the cast happens there)."""
    t = torch.from_numpy(np.ascontiguousarray(images_uint8))
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    # NOTE: contiguous NCHW: a permuted (channels_last) input makes conv outputs channels_last as well
    return t.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float().div_(255)


# ---------------------------------------------------------------------------------------------------------
# Counting a prepared test set
# ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def count_dataset(models, dataset, device, dtype=torch.float32, tta=False, tile=None, roi=True,
                  batch=1, overlap=0.5, thresholds=THRESHOLDS, on_batch=None):
    """Pooled binned counts of a model ensemble over every full image of a data.PreparedDataset.

    Returns int64 CPU tensors tp (4, T), fp (4, T), pos (4,). The counts stay on the device until the end:
    no host round trip per image. roi=True counts only pixels inside the FOV; roi=False is the authors'
    way: every pixel counted, probabilities outside the FOV and the padding set to 0.
    on_batch(ids, probs (B, 4, H, W), items) is called per batch (used to write maps).
    """
    if len(dataset) == 0:
        raise ValueError(f"test set {getattr(dataset, 'dataset_id', '')} has no images")
    device = torch.device(device)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()  # NOTE: train.py validates mid-training; BatchNorm must use running stats here
    tp = fp = pos = None
    try:
        for start in range(0, len(dataset), batch):
            items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
            x = _to_input(np.stack([it["image"] for it in items]), device)  # (B, 3, H, W)
            masks = torch.from_numpy(np.stack([it["masks"] for it in items])).to(device)  # (B, 4, H, W) bool
            fov = torch.from_numpy(np.stack([it["fov"] for it in items])).to(device)  # (B, H, W) bool
            probs, tile = _predict_fitting(models, x, tile, dtype, tta, overlap)  # (B, 4, H, W) float32
            probs = probs.contiguous()  # no-op unless a model returns channels_last
            if roi:
                counts = binned_counts(probs, masks, fov, thresholds)
            else:
                probs = probs.masked_fill(~fov[:, None], 0.0)
                counts = binned_counts(probs, masks, None, thresholds)
            if tp is None:
                tp, fp, pos = (c.to(device=device, dtype=torch.int64) for c in counts)
            else:
                tp, fp, pos = (a + c.to(device=device, dtype=torch.int64) for a, c in zip((tp, fp, pos), counts))
            if on_batch is not None:
                on_batch([it["id"] for it in items], probs, items)
    finally:
        for m, w in zip(models, was_training):
            m.train(w)
    return tp.cpu(), fp.cpu(), pos.cpu()  # the one host transfer


def summarize(tp, fp, pos, n_images):
    """Counts -> the per-test-set block of the Results JSON (NaN where a lesion is absent)."""
    m = pr_metrics(tp, fp, pos)
    lesions = {}
    for c, name in enumerate(LESIONS):
        lesions[name] = {"aupr": float(m["aupr"][c]), "dice": float(m["dice"][c]),
                         "tp": [int(v) for v in tp[c]], "fp": [int(v) for v in fp[c]], "pos": int(pos[c])}
    return {"n_images": int(n_images),
            "mean_aupr": nanmean([v["aupr"] for v in lesions.values()]),
            "mean_dice": nanmean([v["dice"] for v in lesions.values()]),
            "lesions": lesions}


def nanmean(values):
    """Mean over the lesions present in the test set (NaN only when none is)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Maps as PNG
# ---------------------------------------------------------------------------------------------------------
def _save_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def overlay(image, probs):
    """Colour the four lesions onto an image: uint8 (H, W, 3), float (4, H, W) in [0, 1] -> uint8 (H, W, 3)."""
    out = image.astype(np.float32)
    for c in range(len(LESIONS)):
        a = probs[c][..., None]  # (H, W, 1): the probability is the opacity
        out = out * (1 - a) + COLOURS[c] * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_maps(out_dir, name, image, probs):
    """Write <name>_<LESION>.png (probability x 255, 8 bit) and <name>_overlay.png."""
    out_dir = Path(out_dir)
    probs = np.clip(np.asarray(probs, dtype=np.float32), 0.0, 1.0)  # (4, H, W)
    for c, lesion in enumerate(LESIONS):
        _save_png(out_dir / f"{name}_{lesion}.png", np.round(probs[c] * 255).astype(np.uint8))
    _save_png(out_dir / f"{name}_overlay.png", overlay(image, probs))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints -> results
# ---------------------------------------------------------------------------------------------------------
def _ckpt_args(ckpt):
    """Training args of a checkpoint, or of an ensemble file's first member, or {}."""
    if isinstance(ckpt.get("args"), dict):
        return ckpt["args"]
    for member in ckpt.get("members") or []:
        if isinstance(member.get("args"), dict):
            return member["args"]
    return {}


def _ckpt_method(ckpts):
    if len(ckpts) > 1:
        return "ensemble"
    ckpt = ckpts[0]
    provenance = ckpt.get("provenance") if isinstance(ckpt.get("provenance"), dict) else {}
    method = ckpt.get("method") or provenance.get("method")
    if method:
        return str(method)
    return "ensemble" if ckpt.get("kind") == "ensemble" else "baseline"


def load_ensemble(ckpt_paths, device):
    """Load every checkpoint (training or ensemble file) -> (list of models, list of checkpoint headers)."""
    models, headers = [], []
    for p in ckpt_paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        ckpt = load_checkpoint(p)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{p} is not a checkpoint of this project")
        models += load_models(ckpt, device)
        # keep only the small fields; the weights now live in the models
        headers.append({k: v for k, v in ckpt.items() if k in ("args", "kind", "method", "provenance")}
                       | {"members": [{"args": m.get("args")} for m in ckpt.get("members") or []
                                      if isinstance(m, dict)]})
    return models, headers


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_checkpoints(ckpt_paths, test_ids=DATASET_IDS, data_root="data_raw", cache_dir="cache",
                         options=None, resolution=None, device=None, dtype="float32", tta=False, tile=None,
                         overlap=0.5, roi=True, batch=1, maps_dir=None, out=None, verbose=True):
    """Evaluate one checkpoint or an ensemble on test sets -> the Results JSON dict (written to `out` if given).

    options: keyword args for data.prepare_cache (data.data_options(args)); resolution: None = the
    checkpoint's args["resolution"]; maps_dir: write per-image probability maps and overlays there.
    """
    ckpt_paths = [str(p) for p in ([ckpt_paths] if isinstance(ckpt_paths, (str, Path)) else ckpt_paths)]
    if not ckpt_paths:
        raise ValueError("no checkpoint given (--ckpt)")
    test_ids = data.parse_dataset_ids(",".join(test_ids) if not isinstance(test_ids, str) else test_ids)
    device = torch.device(device or default_device())
    models, headers = load_ensemble(ckpt_paths, device)
    args = _ckpt_args(headers[0])
    if resolution is None:
        resolution = args.get("resolution")
        if resolution is None:
            raise ValueError(f"{ckpt_paths[0]} records no resolution in its args: pass --resolution")
    resolution = int(resolution)

    protocol = {"thresholds": THRESHOLDS, "roi": "fov" if roi else "all", "resolution": resolution,
                "tta": bool(tta), "tile": tile, "overlap": overlap if tile else None, "dtype": str(dtype)}
    if verbose:
        print(f"{len(models)} model(s) from {len(ckpt_paths)} checkpoint(s) on {device}; "
              + ", ".join(f"{k} {v}" for k, v in protocol.items()))
    results = {}
    for test_id in test_ids:
        data.prepare_cache(test_id, data_root, cache_dir, resolution, **{"verbose": verbose, **(options or {})})
        ds = data.PreparedDataset(cache_dir, test_id, resolution, "test")
        if len(ds) == 0:
            raise ValueError(f"test set {test_id} has no images (test split of {Path(cache_dir) / test_id})")
        on_batch = None
        if maps_dir is not None:
            def on_batch(ids, probs, items, _dir=Path(maps_dir) / test_id):
                for k, item in enumerate(items):
                    save_maps(_dir, ids[k], item["image"], probs[k].float().cpu().numpy())
        counts = count_dataset(models, ds, device, dtype, tta, tile, roi, batch, overlap, on_batch=on_batch)
        results[test_id] = summarize(*counts, n_images=len(ds))
        if verbose:
            print_table(test_id, results[test_id])

    report = {"version": 1, "checkpoints": ckpt_paths, "train": args.get("train"), "seed": args.get("seed"),
              "method": _ckpt_method(headers)}
    if "n_train_images" in args:
        report["n_train_images"] = args["n_train_images"]
    report["protocol"] = protocol
    report["results"] = results
    if out is not None:
        write_json(out, report)
    return report


def null_nan(obj):
    """JSON has no NaN or inf: write null (a lesion absent from a test set, a diverged loss), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: null_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [null_nan(v) for v in obj]
    return obj


def write_json(path, report):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(null_nan(report), indent=1, allow_nan=False)
    # one line per list of numbers ("tp": [11 ints]); "[" + newline never occurs inside a JSON string
    flat = lambda m: "[" + ", ".join(v.strip() for v in m.group()[1:-1].split(",")) + "]"  # noqa: E731
    text = re.sub(r"\[\n[-+0-9.eE,\s]+\]", flat, text)
    tmp.write_text(text + "\n")
    tmp.replace(path)  # atomic: a sweep interrupted here leaves no half-written results.json


def print_table(test_id, block):
    """AUPR and Dice per lesion and their mean for one test set."""
    fmt = lambda v: "   nan" if math.isnan(v) else f"{v:6.3f}"  # noqa: E731
    print(f"\n{test_id} test ({block['n_images']} images)")
    print(f"{'':8s}{'AUPR':>7s}{'Dice':>7s}")
    absent = []
    for name, v in block["lesions"].items():
        print(f"{name:8s}{fmt(v['aupr']):>7s}{fmt(v['dice']):>7s}")
        if v["pos"] == 0:
            absent.append(name)
    print(f"{'mean':8s}{fmt(block['mean_aupr']):>7s}{fmt(block['mean_dice']):>7s}")
    if absent:
        print(f"  nan: lesion absent from this test set ({', '.join(absent)}); the mean is over the others")


# ---------------------------------------------------------------------------------------------------------
# The user's own photographs
# ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_images(ckpt_paths, image_dir, out_dir, resolution=None, device=None, dtype="float32", tta=False,
                   tile=None, overlap=0.5):
    """Maps for every image of a folder, restored to each original image's geometry -> list of written names."""
    from PIL import Image

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"--images folder not found: {image_dir}")
    device = torch.device(device or default_device())
    models, headers = load_ensemble([str(p) for p in ckpt_paths], device)
    resolution = int(resolution or _ckpt_args(headers[0]).get("resolution") or 0)
    if resolution <= 0:
        raise ValueError(f"{ckpt_paths[0]} records no resolution in its args: pass --resolution")
    written = []
    for path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                original = np.asarray(im.convert("RGB"))  # (H0, W0, 3) uint8
            # NOTE: the same FOV crop + resize + pad as the training data (paper section 2.2).
            image, fov, geometry = data.preprocess_image(original, resolution)
        except (OSError, ValueError) as e:
            print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
            continue
        x = _to_input(image[None], device)  # (1, 3, R, R)
        probs, tile = _predict_fitting(models, x, tile, dtype, tta, overlap)
        probs = probs[0]  # (4, R, R)
        probs = probs.masked_fill(~torch.from_numpy(fov).to(device), 0.0).cpu().numpy()
        probs = np.asarray(data.restore_geometry(probs, geometry), dtype=np.float32)  # (4, H0, W0)
        name = path.stem if path.stem not in written else f"{path.stem}_{path.suffix[1:]}"  # a.jpg and a.png
        save_maps(out_dir, name, original, probs)
        written.append(name)
        print(f"{path.name}: maps in {Path(out_dir) / name}_*.png")
    if not written:
        raise ValueError(f"no readable image in --images {image_dir}")
    return written


# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", action="extend", required=True,
                   help="checkpoint(s) or average.py ensemble file(s); several = an ensemble averaging "
                        "probabilities (required)")
    p.add_argument("--test", nargs="+", action="extend", default=None,
                   help="test set IDs, e.g. MES or IDR,DDR (default: all of " + ",".join(DATASET_IDS) + ")")
    p.add_argument("--out", default=None,
                   help="results JSON (default: %(default)s = results.json next to the first checkpoint)")
    g = p.add_argument_group("protocol")
    g.add_argument("--resolution", type=int, default=None,
                   help="square image size (default: %(default)s = the checkpoint's training resolution)")
    g.add_argument("--tile", type=int, default=None,
                   help="predict in overlapping tiles of this size (default: %(default)s = whole image)")
    g.add_argument("--tile-overlap", type=float, default=0.5,
                   help="fraction of a tile shared with its neighbour (default: %(default)s)")
    g.add_argument("--tta", action="store_true", help="average over the 4 flips (default: %(default)s)")
    g.add_argument("--no-roi", action="store_true",
                   help="the authors' way: count pixels outside the FOV and padding with p = 0 "
                        "(default: %(default)s = only FOV pixels counted)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=default_device(), help="torch device (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="autocast precision of the forward pass (default: %(default)s)")
    g.add_argument("--batch", type=int, default=1, help="images per forward pass (default: %(default)s)")
    g = p.add_argument_group("maps")
    g.add_argument("--save-maps", default=None, metavar="DIR",
                   help="write per-image probability maps (8-bit PNG) and overlays here (default: %(default)s)")
    g.add_argument("--images", default=None, metavar="DIR",
                   help="predict on your own fundus photographs in DIR instead of test sets; maps go to "
                        "--save-maps or DIR_maps (default: %(default)s)")
    data.add_data_args(p)
    args = p.parse_args(argv)

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be >= 1, got {args.tile}")
    if not 0 <= args.tile_overlap < 1:
        raise ValueError(f"--tile-overlap must be in [0, 1), got {args.tile_overlap}")
    common = dict(resolution=args.resolution, device=args.device, dtype=args.dtype, tta=args.tta,
                  tile=args.tile, overlap=args.tile_overlap)
    if args.images is not None:
        out_dir = args.save_maps or f"{Path(args.images).resolve()}_maps"
        predict_images(args.ckpt, args.images, out_dir, **common)
        return
    tests = ",".join(args.test) if args.test else ",".join(DATASET_IDS)
    out = args.out or Path(args.ckpt[0]).with_name("results.json")
    # Test splits as the run was trained: its recorded data flags unless given here (see data_settings).
    data_root, cache, options = data.data_settings(args, p, load_checkpoint(args.ckpt[0]).get("args", {}))
    evaluate_checkpoints(args.ckpt, tests, data_root, cache, options, roi=not args.no_roi,
                         batch=args.batch, maps_dir=args.save_maps, out=out, **common)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
