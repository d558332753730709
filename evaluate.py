"""Evaluate checkpoints on test sets with the IDRiD challenge protocol (11-threshold AUPR and Dice, pooled).

    python evaluate.py --ckpt runs/IDR+DDR/s0/best.pt --test MES --data-root data_raw
    python evaluate.py --ckpt runs/IDR/s0/best.pt runs/IDR/s1/best.pt --test IDR,DDR --tta --tile 768
    python evaluate.py --ckpt runs/IDR/ensemble.json --save-maps maps/        # an average.py ensemble manifest
    python evaluate.py --ckpt runs/IDR/s0/best.pt --images my_photos/ --save-maps my_maps/   # your own images

Several checkpoints form an ensemble that averages sigmoid probabilities (so does an ensemble file written by
average.py). Counts are pooled over all pixels of a test set and accumulated on the device where the
predictions are (protocol.py); the protocol is defined in docs/PROTOCOL.md ("Evaluation protocol").
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

import data
from data import DATASET_IDS, LESIONS
from data.datasets import IMAGE_SUFFIXES, load_image
from jsonio import write_json
from kernels import AP_BINS
from model import load_checkpoint, load_models
from protocol import (DTYPES, THRESHOLDS, check_device, count_dataset, default_device,  # noqa: F401
                      predict, predict_fitting, predict_tiled, summarize, to_input)

# Overlay colours (RGB) in LESIONS order: EX yellow, HE red, MA green, CWS cyan.
COLOURS = np.array([[255, 230, 0], [230, 20, 20], [40, 230, 40], [0, 200, 255]], dtype=np.float32)


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
        models += load_models(ckpt, device, where=str(p))
        # keep only the small fields; the weights now live in the models
        headers.append({k: v for k, v in ckpt.items() if k in ("args", "kind", "method", "provenance")}
                       | {"members": [{"args": m.get("args")} for m in ckpt.get("members") or []
                                      if isinstance(m, dict)]})
    return models, headers


def _read_results(out):
    """The results file at `out` as a dict, None when there is none; one-line errors for what is not one."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: name a results file, e.g. {out / 'results.json'}")
    if not out.exists():
        return None
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--out {out} exists but is not a results file ({e}); remove it or pass another --out")
    if not isinstance(old, dict) or not isinstance(old.get("results"), dict):
        raise ValueError(f"--out {out} exists but is not a results file of evaluate.py; pass another --out")
    return old


def check_results_file(out, ckpt_paths, protocol):
    """Before any work: the results already in `out` (merged into, never lost), or an error if they can't be.

    A results file holds one evaluation set-up (checkpoints + protocol); its test sets accumulate across runs.
    """
    old = _read_results(out)
    if old is None:
        return {}
    if old.get("checkpoints") != ckpt_paths or old.get("protocol") != protocol:
        what = "checkpoints" if old.get("checkpoints") != ckpt_paths else "protocol settings"
        raise ValueError(f"--out {out} holds results of other {what} ({old.get('checkpoints')}, "
                         f"{old.get('protocol')}); pass another --out to keep both")
    return old["results"]


def evaluate_checkpoints(ckpt_paths, test_ids=DATASET_IDS, data_root="data_raw", cache_dir="cache",
                         options=None, resolution=None, device=None, dtype="float32", tta=False, tile=None,
                         overlap=0.5, roi=True, batch=1, maps_dir=None, out=None, verbose=True):
    """Evaluate one checkpoint or an ensemble on test sets -> the Results JSON dict (written to `out` if given).

    options: keyword args for data.prepare_cache (data.data_options(args)); resolution: None = the
    checkpoint's args["resolution"]; maps_dir: write per-image probability maps and overlays there.
    An existing `out` of the same checkpoints and protocol keeps its other test sets (results are merged).
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

    protocol = {"thresholds": THRESHOLDS, "ap_bins": AP_BINS, "roi": "fov" if roi else "all", "resolution": resolution,
                "tta": bool(tta), "tile": tile, "overlap": overlap if tile else None, "dtype": str(dtype),
                "split_protocol": (options or {}).get("split_protocol", "paper")}
    results = check_results_file(out, ckpt_paths, protocol) if out is not None else {}
    if verbose:
        print(f"{len(models)} model(s) from {len(ckpt_paths)} checkpoint(s) on {device}; "
              + ", ".join(f"{k} {v}" for k, v in protocol.items()))
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
        counts = count_dataset(models, ds, device, dtype, tta, tile, roi, batch, overlap, on_batch=on_batch,
                               ap_bins=AP_BINS)
        results[test_id] = summarize(*counts, n_images=len(ds))
        if verbose:
            print_table(test_id, results[test_id])

    report = {"version": 1, "checkpoints": ckpt_paths, "train": args.get("train"), "seed": args.get("seed"),
              "method": _ckpt_method(headers)}
    if "n_train_images" in args:
        report["n_train_images"] = args["n_train_images"]
    report["protocol"] = protocol
    report["results"] = {t: results[t] for t in sorted(results, key=_test_order)}
    if out is not None:
        write_json(out, report)
    return report


def _test_order(test_id):
    return DATASET_IDS.index(test_id) if test_id in DATASET_IDS else len(DATASET_IDS)


def print_table(test_id, block):
    """Per lesion and their mean for one test set: the protocol's AUPR beside its floor, AP and Dice."""
    fmt = lambda v: "   nan" if v is None or math.isnan(v) else f"{v:6.3f}"  # noqa: E731
    columns = (("AUPR", "aupr"), ("floor", "aupr_floor"), ("AP", "ap"), ("Dice", "dice"))
    print(f"\n{test_id} test ({block['n_images']} images)")
    print(f"{'':8s}" + "".join(f"{title:>7s}" for title, _ in columns))
    absent = []
    for name, v in block["lesions"].items():
        print(f"{name:8s}" + "".join(f"{fmt(v.get(key)):>7s}" for _, key in columns))
        if v["pos"] == 0:
            absent.append(name)
    print(f"{'mean':8s}" + "".join(f"{fmt(block.get('mean_' + key)):>7s}" for _, key in columns))
    print("  floor: the AUPR of a blank map on these pixels, (1 + prevalence) / 2 (docs/PROTOCOL.md); "
          "AP: floor-free, a blank map scores the prevalence")
    if absent:
        print(f"  nan: lesion absent from this test set ({', '.join(absent)}); the mean is over the others")


# ---------------------------------------------------------------------------------------------------------
# The user's own photographs
# ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_images(ckpt_paths, image_dir, out_dir, resolution=None, device=None, dtype="float32", tta=False,
                   tile=None, overlap=0.5):
    """Maps for every image of a folder, restored to each original image's geometry -> list of written names."""
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
            original = np.asarray(load_image(path))  # (H0, W0, 3) uint8; 16-bit files scaled by their range
            # NOTE: the same FOV crop + resize + pad as the training data (paper section 2.2).
            image, fov, geometry = data.preprocess_image(original, resolution)
        except (OSError, ValueError) as e:
            # one bad photograph (unreadable, or over PIL's decompression-bomb limit) never stops the folder
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            continue
        x = to_input(image[None], device)  # (1, 3, R, R)
        probs, tile = predict_fitting(models, x, tile, dtype, tta, overlap)
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
    check_device(args.device)
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
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written for the test set in progress; rerun the same command")
