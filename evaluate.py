"""Evaluate checkpoints on test sets with the IDRiD challenge protocol (11-threshold AUPR and Dice, pooled).

    python evaluate.py --ckpt runs/IDR+DDR/s0/best.pt --test MES --data-root data_raw
    python evaluate.py --ckpt runs/IDR/s0/best.pt runs/IDR/s1/best.pt --test IDR,DDR --tta --tile 768
    python evaluate.py --ckpt runs/IDR/ensemble.json --save-maps maps/        # an average.py ensemble manifest
    python evaluate.py --ckpt runs/IDR/s0/best.pt --images my_photos/ --save-maps my_maps/   # your own images
    python evaluate.py --ckpt hub:IDR+DDR --test MES --dice-argmax   # the authors' released model, IDR+DDR
    python -c "import numpy as np; from data.datasets import load_image; from evaluate import segment; print(segment(np.asarray(load_image('eye.jpg')), 'runs/IDR/s0/best.pt').shape)"

Several checkpoints form an ensemble that averages sigmoid probabilities (so does an ensemble file written by
average.py). Counts are pooled over all pixels of a test set and accumulated on the device where the
predictions are (protocol.py); the protocol is defined in docs/PROTOCOL.md ("Evaluation protocol").
"""
import cli  # first: a Ctrl-C during the slow imports below (torch: seconds) ends in one line

cli.early_ctrl_c(__name__ == "__main__")

import argparse
import hashlib
import json
import math
import numbers
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import hub
from data import DATASET_IDS, LESIONS
from data.datasets import IMAGE_SUFFIXES, load_image
from data.flags import add_dataset_list, parse_pairs
from data.splits import OFFICIAL
from jsonio import write_json
from kernels import AP_BINS
from maps import save_maps, save_test_maps
from model import argmax_lesions, is_hub_spec, load_checkpoint, load_models
from protocol import (DTYPES, THRESHOLDS, check_device, count_dataset, default_device, nanmean,  # noqa: F401
                      predict, predict_fitting, predict_tiled, summarize, to_input)

# ---------------------------------------------------------------------------------------------------------
# Maps of test images (the pictures themselves: maps.py)
# ---------------------------------------------------------------------------------------------------------
def maps_writer(out_dir, ds, lesions=LESIONS):
    """count_dataset's on_batch writing each test image's maps, overlay and panel at its photograph's geometry
    (the `lesions` scored only)."""
    geometry = {x: ds.geometry(i) for i, x in enumerate(ds.ids)}  # from the cache's meta.json

    def on_batch(ids, probs, items):
        for k, item in enumerate(items):
            save_test_maps(out_dir, item, probs[k].float().cpu().numpy(), geometry[ids[k]], lesions)
    return on_batch


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


def weights_fingerprint(ckpt):
    """sha256 of what a checkpoint computes: each member's model_cfg (less the fields that only say where
    its first weights came from) and its state dict (names, dtypes, shapes, bytes). The same weights give
    the same hex digest whatever the file's path or name; a retrained best.pt gives another."""
    h = hashlib.sha256()
    for m in ckpt.get("members") or [ckpt]:
        cfg = {k: v for k, v in m["model_cfg"].items() if k not in ("pretrained", "encoder_weights")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for k in sorted(m["model"]):
            v = m["model"][k].detach().cpu().contiguous()
            h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())  # the bytes, whatever the dtype
    return h.hexdigest()


def load_ensemble(ckpt_paths, device):
    """Load every checkpoint (training or ensemble file) -> (list of models, list of checkpoint headers).

    A header keeps the small fields of its checkpoint (args, kind, method, provenance, step, each member's
    args) and the fingerprint of its weights (weights_fingerprint)."""
    models, headers = [], []
    for p in ckpt_paths:
        ckpt = load_checkpoint(p)  # a file, a manifest, the authors' hub folder or spec; FileNotFoundError naming p
        if not isinstance(ckpt, dict):
            raise ValueError(f"{p} is not a checkpoint of this project")
        models += load_models(ckpt, device, where=str(p))
        # keep only the small fields; the weights now live in the models
        headers.append({k: v for k, v in ckpt.items() if k in ("args", "kind", "method", "provenance", "step")}
                       | {"members": [{"args": m.get("args")} for m in ckpt.get("members") or []
                                      if isinstance(m, dict)],
                          "fingerprint": weights_fingerprint(ckpt)})
    return models, headers


def recorded_resolution(args, where):
    """The training resolution a checkpoint's args record, as a whole number of pixels, or None."""
    value = args.get("resolution") if isinstance(args, dict) else None
    if value is None:
        return None
    try:
        number = int(value)
        if number != value and str(number) != str(value).strip() or number < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{where}: its args record resolution {value!r}, not a whole number of pixels >= 1; "
                         f"pass --resolution") from None
    return number


def ensemble_resolution(ckpt_paths, headers, resolution=None):
    """The square size every model runs at: `resolution` when given, else the one all members were trained
    at. NOTE: members trained at different sizes are refused, not run at the first one's: an ensemble's score
    would then depend on the order of its members."""
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 1:
            raise ValueError(f"resolution must be >= 1 pixel (a whole number), got {resolution!r}")
        return int(resolution)
    found = {}  # resolution -> the first member trained at it
    for path, h in zip(ckpt_paths, headers):
        members = h.get("members") or [h]
        for i, m in enumerate(members):
            where = path if len(members) == 1 else f"{path} (member {i})"
            r = recorded_resolution(m.get("args") or h.get("args") or {}, where)
            if r is not None:
                found.setdefault(r, where)
    if len(found) > 1:
        sizes = ", ".join(f"{where} at {r} px" for r, where in found.items())
        raise ValueError(f"--ckpt: the ensemble's members were trained at different resolutions ({sizes}); "
                         f"pass --resolution R to run every member at R")
    if not found:
        raise ValueError(f"{ckpt_paths[0]} records no resolution in its args: pass --resolution")
    return next(iter(found))


def check_style(models, style=None):
    """--style for these models -> the style they run at (None when none is style-conditioned: train.py
    --style-condition); a one-line ValueError for a style given to an unconditioned model or one it lacks."""
    for m in models:
        try:
            m.style_mix(style, 1)
        except ValueError as e:
            raise ValueError(f"--style {style}: {e}") from None
    defaults = [m.default_style for m in models if m.style_tokens]  # fine, for a model trained on a fine set
    return style if style is not None else defaults[0] if defaults else None


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


def _check_mergeable(old, header, out):
    """A one-line ValueError unless the results `old` (read from `out`) are of the same model and protocol as
    `header`: a results file holds one evaluation set-up, whose test sets accumulate across runs.

    NOTE: the model is told by the fingerprint of its weights, not by the checkpoint's path: a best.pt that
    changed (a run extended with a larger --iters) must not add its scores beside those of the old one, and
    the same file named by a relative and an absolute path is the same model."""
    if old.get("protocol") != header["protocol"]:
        raise ValueError(f"--out {out} holds results of other protocol settings ({old.get('protocol')}); "
                         f"pass another --out to keep both")
    if old.get("fingerprint") == header["fingerprint"]:
        return
    if "fingerprint" not in old:
        raise ValueError(f"--out {out} holds results without the fingerprint of their model's weights (an older "
                         f"evaluate.py), so they can't be told to be of {', '.join(header['checkpoints'])}; "
                         f"pass another --out, or delete it to score again")
    raise ValueError(f"--out {out} holds results of other weights ({', '.join(map(str, old.get('checkpoints', [])))}"
                     f" at step {old.get('steps')}; now {', '.join(header['checkpoints'])} at step "
                     f"{header['steps']}: changed since, or another model); pass another --out, or delete it "
                     f"to score again")


def check_results_file(out, header):
    """Before any work: `out` can be written, and the results already there are of this model and protocol
    (merged into, never lost), or one line saying why not."""
    out = Path(out)
    old = _read_results(out)
    cli.writable_folder(out.parent, "--out", f"write {out.name} there")
    if old is not None:
        _check_mergeable(old, header, out)
        if not os.access(out, os.W_OK):
            raise ValueError(f"--out {out}: the file is not writable")


def merge_results(out, header, test_id, block):
    """Add one test set's block to the results file `out` -> the whole file's dict, as written.

    Read, merge and write happen under a lock on a file beside `out`: two evaluate.py of one checkpoint on
    other test sets, into one --out, both keep their test sets."""
    out = Path(out)
    with cli.locked(out.with_name(f".{out.name}.lock")):
        old = _read_results(out)
        results = {}
        if old is not None:
            _check_mergeable(old, header, out)  # again: another process may have written it meanwhile
            results = old["results"]
        results[test_id] = block
        report = {**header, "results": {t: results[t] for t in sorted(results, key=_test_order)}}
        write_json(out, report)
    return report


def results_header(ckpt_paths, headers, protocol):
    """What a results file says besides the scores: the checkpoints, their weights' fingerprint and steps,
    the training run they come from, the protocol."""
    args = _ckpt_args(headers[0])
    fingerprint = headers[0]["fingerprint"] if len(headers) == 1 else \
        hashlib.sha256(" ".join(h["fingerprint"] for h in headers).encode()).hexdigest()
    header = {"version": 1, "checkpoints": ckpt_paths, "fingerprint": fingerprint,
              "steps": [h.get("step") for h in headers], "train": args.get("train"), "seed": args.get("seed"),
              "method": _ckpt_method(headers)}
    if "n_train_images" in args:
        header["n_train_images"] = args["n_train_images"]
    header["protocol"] = protocol
    return header


def make_protocol(resolution, lesions, options, tta=False, tile=None, overlap=0.5, roi=True, dtype="float32",
                  dice_argmax=False, style=None):
    """The results' "protocol": every setting that changes the numbers, the split included."""
    options = options or {}
    protocol = {"thresholds": THRESHOLDS, "ap_bins": AP_BINS, "roi": "fov" if roi else "all", "resolution": resolution,
                "tta": bool(tta), "tile": tile, "overlap": overlap if tile else None, "dtype": str(dtype),
                "split_protocol": options.get("split_protocol", "paper"), "lesions": list(lesions)}
    if protocol["split_protocol"] == "paper":  # the authors' draw always uses seed 42
        protocol["split_seed"] = int(options.get("split_seed", 0))
    if options.get("split_files"):
        protocol["splits"] = dict(options["split_files"])
    if dice_argmax:
        protocol["dice_argmax"] = True
    if style is not None:  # NOTE: only for conditioned models: older results files keep their protocol
        protocol["style"] = style
    return protocol


def score_test_set(models, test_id, data_root, cache_dir, resolution, options, lesions, verbose, maps_dir,
                   dice_argmax, device, **predict):
    """One test set's results block (summarize), preparing its cache on first use and writing its maps."""
    data.prepare_cache(test_id, data_root, cache_dir, resolution, **{"verbose": verbose, **(options or {})})
    ds = data.PreparedDataset(cache_dir, test_id, resolution, "test")
    if len(ds) == 0:
        raise ValueError(f"test set {test_id} has no images (test split of {Path(cache_dir) / test_id})")
    on_batch = None if maps_dir is None else maps_writer(Path(maps_dir) / test_id, ds, lesions)
    # Images of this test set, with an ETA, on stderr; disable=None: silent where stderr is no terminal (logs)
    argmax = torch.zeros(2, len(LESIONS), dtype=torch.int64, device=device)  # the argmax Dice's TP, FP
    with tqdm(total=len(ds), desc=f"{test_id} test", unit="image", leave=verbose, disable=None) as bar:
        def progress(ids, probs, items):
            if on_batch is not None:
                on_batch(ids, probs, items)
            if dice_argmax:
                argmax.add_(argmax_counts(probs, items, predict["roi"]))
            bar.update(len(ids))

        counts = count_dataset(models, ds, device, on_batch=progress, ap_bins=AP_BINS, **predict)
    block = summarize(*counts, n_images=len(ds), lesions=lesions)
    if dice_argmax:
        add_dice_argmax(block, *argmax.cpu().tolist())
    return block


def evaluate_checkpoints(ckpt_paths, test_ids=DATASET_IDS, data_root="data_raw", cache_dir="cache",
                         options=None, resolution=None, device=None, dtype="float32", tta=False, tile=None,
                         overlap=0.5, roi=True, batch=1, maps_dir=None, out=None, verbose=True, lesions=None,
                         style=None, dice_argmax=False):
    """Evaluate one checkpoint or an ensemble on test sets -> the Results JSON dict (written to `out` if given).

    options: keyword args for data.prepare_cache (data.data_options(args)); resolution: None = the
    checkpoint's args["resolution"]; lesions: the lesions scored (None = those the checkpoint was trained
    on, train.py --lesions; the others score NaN); maps_dir: write per-image probability maps and overlays there.
    dice_argmax: also the authors' Dice of softmax models ("dice_argmax": a pixel is the lesion its 5-way argmax names).
    style: the labelling style asked of style-conditioned models (check_style; default fine).
    An existing `out` of the same weights and protocol keeps its other test sets (results are merged), each
    test set being written as soon as it is scored; the returned dict is the file's whole content.
    """
    ckpt_paths = [str(p) for p in ([ckpt_paths] if isinstance(ckpt_paths, (str, Path)) else ckpt_paths)]
    if not ckpt_paths:
        raise ValueError("no checkpoint given (--ckpt)")
    test_ids = data.parse_dataset_ids(",".join(test_ids) if not isinstance(test_ids, str) else test_ids)
    if maps_dir is not None:
        cli.writable_folder(maps_dir, "--save-maps", "write maps there")  # before any scoring, not after test set 1
    device = torch.device(device or default_device())
    models, headers = load_ensemble(ckpt_paths, device)
    style = check_style(models, style)
    args = _ckpt_args(headers[0])
    resolution = ensemble_resolution(ckpt_paths, headers, resolution)
    lesions = data.parse_lesions(",".join(lesions or args.get("lesions") or LESIONS))
    if dice_argmax and not all(getattr(m, "softmax", False) for m in models):
        raise ValueError(f"--dice-argmax is the argmax of a softmax over background and lesions; {ckpt_paths[0]} "
                         f"has one sigmoid per lesion (its Dice is at p >= 0.5)")
    protocol = make_protocol(resolution, lesions, options, tta, tile, overlap, roi, dtype, dice_argmax, style)
    header = results_header(ckpt_paths, headers, protocol)
    # where the test sets were read (report.py tells synthetic from real data by it)
    header.update(data_root=str(data_root), cache=str(cache_dir),
                  root=[f"{k}={v}" for k, v in ((options or {}).get("roots") or {}).items()])
    if out is not None:
        check_results_file(out, header)
    if verbose:
        print(f"{len(models)} model(s) from {len(ckpt_paths)} checkpoint(s) on {device}; "
              + ", ".join(f"{k} {v}" for k, v in protocol.items()))
    report, done = {**header, "results": {}}, []
    for test_id in test_ids:
        try:
            block = score_test_set(models, test_id, data_root, cache_dir, resolution, options, lesions, verbose,
                                   maps_dir, dice_argmax, device, dtype=dtype, tta=tta, tile=tile, roi=roi,
                                   batch=batch, overlap=overlap, style=style)
        except KeyboardInterrupt:
            kept = f"{', '.join(done)} written to {out}" if done and out is not None else "nothing written"
            raise KeyboardInterrupt(f"interrupted during test set {test_id} ({kept}); rerun the same command "
                                    f"to score every test set") from None
        if out is not None:  # written at once: an interrupted or failed later test set loses only itself
            report = merge_results(out, header, test_id, block)
        else:
            report["results"][test_id] = block
        done.append(test_id)
        if verbose:
            print_table(test_id, block)
    return report


def argmax_counts(probs, items, roi):
    """TP and FP per lesion (2, 4) of the authors' Dice: a pixel is the lesion its 5-way softmax argmax names."""
    pred = argmax_lesions(probs)  # (B, 4, H, W) bool
    masks = torch.from_numpy(np.stack([it["masks"] for it in items])).to(probs.device)  # (B, 4, H, W) bool
    if roi:  # NOTE: without roi, count_dataset set p = 0 outside the FOV already: the background wins there
        pred &= torch.from_numpy(np.stack([it["fov"] for it in items])).to(probs.device)[:, None]
    return torch.stack([(pred & masks).sum((0, 2, 3)), (pred & ~masks).sum((0, 2, 3))])


def add_dice_argmax(block, tp, fp):
    """Per lesion "dice_argmax" = 2 TP / (TP + FP + P) beside the protocol's dice (NaN where dice is), and its mean."""
    for c, v in enumerate(block["lesions"].values()):
        v["dice_argmax"] = float("nan") if math.isnan(v["dice"]) else 2 * tp[c] / (tp[c] + fp[c] + v["pos"])
    block["mean_dice_argmax"] = nanmean([v["dice_argmax"] for v in block["lesions"].values()])


def default_out(ckpt):
    """results.json next to a checkpoint file, inside a hub-layout folder, authors/<COMBO>/ for a hub spec."""
    if is_hub_spec(ckpt):
        return Path("authors") / data.combo_name(hub.parse_spec(ckpt)) / "results.json"
    return Path(ckpt) / "results.json" if Path(ckpt).is_dir() else Path(ckpt).with_name("results.json")


def _test_order(test_id):
    return DATASET_IDS.index(test_id) if test_id in DATASET_IDS else len(DATASET_IDS)


def print_table(test_id, block):
    """Per lesion and their mean for one test set: the protocol's AUPR beside its floor, AP and Dice."""
    fmt = lambda v: "   nan" if v is None or math.isnan(v) else f"{v:6.3f}"  # noqa: E731
    columns = (("AUPR", "aupr"), ("floor", "aupr_floor"), ("AP", "ap"), ("Dice", "dice"))
    columns += (("argmax", "dice_argmax"),) if "mean_dice_argmax" in block else ()
    print(f"\n{test_id} test ({block['n_images']} images)")
    print(f"{'':8s}" + "".join(f"{title:>7s}" for title, _ in columns))
    absent, untrained = [], []
    for name, v in block["lesions"].items():
        print(f"{name:8s}" + "".join(f"{fmt(v.get(key)):>7s}" for _, key in columns))
        if v["pos"] == 0:
            absent.append(name)
        elif v.get("dice") is None or math.isnan(v["dice"]):
            untrained.append(name)
    print(f"{'mean':8s}" + "".join(f"{fmt(block.get('mean_' + key)):>7s}" for _, key in columns))
    print("  floor: the AUPR of a blank map on these pixels, (1 + prevalence) / 2 (docs/PROTOCOL.md); "
          "AP: floor-free, a blank map scores the prevalence")
    if absent:
        print(f"  nan: lesion absent from this test set ({', '.join(absent)}); the mean is over the others")
    if untrained:
        print(f"  nan: lesion not scored (not in --lesions: {', '.join(untrained)}); the mean is over the others")


# ---------------------------------------------------------------------------------------------------------
# The user's own photographs
# ---------------------------------------------------------------------------------------------------------
def _segmenter(ckpt, resolution, device):
    """segment()'s `ckpt` -> (models, resolution, device): path(s), load_ensemble's pair, or load_models' list."""
    if isinstance(ckpt, tuple) and len(ckpt) == 2 and isinstance(ckpt[0], list):  # (models, headers)
        (models, headers), names = ckpt, None
    elif isinstance(ckpt, (list, tuple)) and ckpt and all(isinstance(m, torch.nn.Module) for m in ckpt):
        if resolution is None:
            raise ValueError("segment() was given models, which record no resolution: pass resolution")
        models, headers, names = list(ckpt), [{}], None
    else:
        names = [str(p) for p in ([ckpt] if isinstance(ckpt, (str, Path)) else ckpt)]
        models, headers = load_ensemble(names, torch.device(device or default_device()))
    names = names or [f"model {i}" for i in range(len(headers))]
    resolution = ensemble_resolution(names, headers, resolution)
    return models, resolution, next(models[0].parameters()).device  # loaded models stay where they are


@torch.inference_mode()
def segment(image, ckpt, resolution=None, device=None, dtype="float32", tta=False, tile=None, overlap=0.5,
            style=None, uint8=False):
    """Segment one photograph: uint8 (H, W, 3) RGB -> float32 (4, H, W) probabilities, EX HE MA CWS.

        from data.datasets import load_image; from evaluate import segment
        image = np.asarray(load_image("photo.jpg"))   # RGB, turned upright by its EXIF orientation tag
        probs = segment(image, "runs/IDR+MES/s0/best.pt")   # probs[1] >= 0.5: haemorrhages

    ckpt: a checkpoint or average.py ensemble path (or a list: an ensemble), load_ensemble's (models, headers),
    or a list of models (model.load_models; pass resolution, they stay on their device). The photograph gets
    the training data's FOV crop, resize and pad (paper section 2.2) at `resolution` (default: the checkpoint's
    training resolution); the maps come back on its own geometry, 0 outside the fundus (FOV). dtype, tta,
    tile, overlap, style: as evaluate.py --dtype, --tta, --tile, --tile-overlap, --style. uint8=True: the maps as
    uint8 round(255 p) (the PNGs' values; p >= 0.5 is >= 128), a quarter of the memory (evaluate.py --images).
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and min(image.shape[:2]) >= 1):
        what = f"{image.dtype} {tuple(image.shape)}" if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"segment expects an RGB photograph as a uint8 numpy array (H, W, 3), H and W >= 1, "
                         f"got {what}")
    models, resolution, device = _segmenter(ckpt, resolution, device)
    square, fov, geometry = data.preprocess_image(image, resolution)  # (R, R, 3), (R, R), plain numbers
    probs, _ = predict_fitting(models, to_input(square[None], device), tile, dtype, tta, overlap, style)  # (1, 4, R, R)
    fov = torch.from_numpy(fov).to(device)
    probs = probs[0].masked_fill_(~fov, 0.0)  # (4, R, R), in place
    # outside the fundus, where the bilinear edge would leak: the FOV restored bilinearly, then cut at 0.5, for a
    # smooth rim rather than the prepared pixels' staircase (17 px steps from a 64 px model); in the crop box only
    # (the photograph is 0 outside it): no full-size float copy of the FOV or of a lesion
    outside, (x0, y0, x1, y1) = data.restore_crop(fov.float(), geometry)
    outside = outside < 0.5
    out = np.zeros((probs.shape[0], geometry["height"], geometry["width"]), np.uint8 if uint8 else np.float32)
    for c in range(len(out)):  # NOTE: one lesion at a time
        crop = data.restore_crop(probs[c], geometry)[0].masked_fill_(outside, 0.0)
        if uint8:  # in place, as maps.to_8bit does it: round half to even of 255 p
            crop = crop.clamp_(0.0, 1.0).mul_(255).round_().to(torch.uint8)
        out[c, y0:y1, x0:x1] = crop.cpu().numpy()
    return out


def predict_images(ckpt_paths, image_dir, out_dir, resolution=None, device=None, dtype="float32", tta=False,
                   tile=None, overlap=0.5, style=None, lesions=None):
    """Maps for every image of a folder (segment()), on each photograph's own geometry -> list of written names.
    lesions: the lesions written and drawn (None = those the checkpoint was trained on, train.py --lesions)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"--images folder not found: {image_dir}")
    # before the model loads and the first photo is segmented
    out_dir = cli.writable_folder(out_dir, "--save-maps", "write maps there")
    device = torch.device(device or default_device())
    ckpt_paths = [str(p) for p in ckpt_paths]
    models = load_ensemble(ckpt_paths, device)  # (models, headers), loaded once
    resolution = ensemble_resolution(ckpt_paths, models[1], resolution)
    lesions = data.parse_lesions(",".join(lesions or _ckpt_args(models[1][0]).get("lesions") or LESIONS))
    check_style(models[0], style)
    written = []
    # NOTE: hidden files are skipped: macOS copies leave "._IMG_1.jpg" (AppleDouble) beside each photograph
    for path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.startswith(".")):
        try:
            original = np.asarray(load_image(path))  # (H0, W0, 3) uint8; 16-bit files scaled by their range
        except (OSError, ValueError) as e:
            # one bad photograph (unreadable, or over PIL's decompression-bomb limit) never stops the folder
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            continue
        probs = segment(original, models, resolution, device, dtype, tta, tile, overlap, style, uint8=True)  # 8 bit
        name = path.stem if path.stem not in written else f"{path.stem}_{path.suffix[1:]}"  # a.jpg and a.png
        save_maps(out_dir, name, original, probs, lesions=lesions)
        del original, probs  # NOTE: freed before the next photograph is read: one photograph's arrays at a time
        written.append(name)
        print(f"{path.name}: maps in {Path(out_dir) / name}_*")
    if not written:
        raise ValueError(f"no readable image in --images {image_dir}")
    return written


def check_split_flags(args, parser, recorded, test_ids, where):
    """Refuse split flags that differ from the run's own for a test set it was trained on: the test split would
    be drawn again, and some of its training images scored as test. (Without these flags the run's recorded
    split settings are used: data.data_settings.)"""
    trained = [t for t in test_ids if t in (recorded.get("train") or [])]
    if not trained:
        return
    given = {k: getattr(args, k) for k in ("split_protocol", "split_seed", "splits")
             if getattr(args, k) != parser.get_default(k)}
    protocol = recorded.get("split_protocol") or "paper"
    if "split_protocol" in given and given["split_protocol"] != protocol:
        raise ValueError(f"--split-protocol {given['split_protocol']}: {where} was trained with the {protocol} "
                         f"split of {','.join(trained)}; another split would score training images as test "
                         f"(drop the flag: the run's split is used)")
    files, old_files = parse_pairs(args.splits, "--splits"), parse_pairs(recorded.get("splits") or [], "--splits")
    for t in trained:
        if "splits" in given and files.get(t) != old_files.get(t):
            raise ValueError(f"--splits {t}={files.get(t)}: {where} was trained on {t} split by "
                             f"{old_files.get(t) or 'its protocol'}; another split would score training images "
                             f"as test (drop the flag: the run's split is used)")
        seeded = t not in OFFICIAL[given.get("split_protocol", protocol)] and not files.get(t)
        if "split_seed" in given and seeded and recorded.get("split_seed", 0) != given["split_seed"]:
            raise ValueError(f"--split-seed {given['split_seed']}: {where} was trained on {t} split with seed "
                             f"{recorded.get('split_seed', 0)}; another seed would score training images as test "
                             f"(drop the flag: the run's split is used)")


# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", action="extend", required=True,
                   help="checkpoint(s) or average.py ensemble file(s), or the authors' released models: "
                        "hub:IDR+DDR (hub: alone = trained on all five) or a folder with their config.json and "
                        "model.safetensors; several = an ensemble averaging probabilities (required)")
    add_dataset_list(p, "--test", "test sets, e.g. MES or IDR,DDR", default=list(DATASET_IDS))
    p.add_argument("--out", default=None,
                   help="results JSON (default: %(default)s = results.json next to the first checkpoint; "
                        "authors/COMBO/results.json for hub:COMBO)")
    g = p.add_argument_group("protocol")
    g.add_argument("--resolution", type=int, default=None,
                   help="square image size (default: %(default)s = the checkpoint's training resolution)")
    g.add_argument("--tile", type=int, default=None,
                   help="predict in overlapping tiles of this size (default: %(default)s = whole image)")
    g.add_argument("--tile-overlap", type=float, default=0.5,
                   help="fraction of a tile shared with its neighbour (default: %(default)s)")
    g.add_argument("--tta", action="store_true", help="average over the 4 flips (default: %(default)s)")
    g.add_argument("--lesions", default=None, metavar="LIST",
                   help="lesions to score, e.g. HE (default: %(default)s = those the checkpoint was trained on, "
                        "train.py --lesions)")
    g.add_argument("--no-roi", action="store_true",
                   help="the authors' way: count pixels outside the FOV and padding with p = 0 "
                        "(default: %(default)s = only FOV pixels counted)")
    g.add_argument("--dice-argmax", action="store_true",
                   help="softmax models (the authors'): also the authors' Dice, a pixel being the class of its "
                        "argmax (default: %(default)s = only Dice at p >= 0.5 of each lesion's probability)")
    g.add_argument("--style", default=None, metavar="NAME",
                   help="labelling style asked of a style-conditioned model (train.py --style-condition): fine, "
                        "mixed, coarse, or a training set's ID for per-dataset tokens; refused for other models "
                        "(default: fine; a model trained on no fine set: its first style)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=default_device(), help="torch device (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="autocast precision of the forward pass (default: %(default)s)")
    g.add_argument("--batch", type=int, default=1, help="images per forward pass (default: %(default)s)")
    g = p.add_argument_group("maps")
    g.add_argument("--save-maps", default=None, metavar="DIR",
                   help="write per-image probability maps (8-bit PNG), overlays (JPEG) and, for test sets, "
                        "image | truth | prediction panels here (default: %(default)s)")
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
                  tile=args.tile, overlap=args.tile_overlap, style=args.style)
    lesions = data.parse_lesions(args.lesions) if args.lesions else None
    if args.images is not None:
        if args.out is not None:
            raise ValueError("--out names the results file of test sets; the maps of --images go to "
                             "--save-maps DIR (default: IMAGES_maps)")
        out_dir = args.save_maps or f"{Path(args.images).resolve()}_maps"
        predict_images(args.ckpt, args.images, out_dir, lesions=lesions, **common)
        return
    out = args.out or default_out(args.ckpt[0])
    # Test splits as the run was trained: its recorded data flags unless given here (see data_settings).
    recorded = load_checkpoint(args.ckpt[0]).get("args") or {}
    check_split_flags(args, p, recorded, args.test, args.ckpt[0])
    data_root, cache, options = data.data_settings(args, p, recorded)
    evaluate_checkpoints(args.ckpt, args.test, data_root, cache, options, roi=not args.no_roi, lesions=lesions,
                         batch=args.batch, maps_dir=args.save_maps, out=out, dice_argmax=args.dice_argmax, **common)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    cli.run(main, interrupted="interrupted: the test sets scored before are in --out; rerun the same command")
