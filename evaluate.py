r"""Score checkpoints on test sets with the IDRiD challenge protocol (11-threshold AUPR and Dice).

    python evaluate.py --ckpt runs/IDR+DDR/s0/best.pt --test MES --data-root data_raw
    python evaluate.py --ckpt runs/IDR/s0/best.pt runs/IDR/s1/best.pt --test IDR,DDR --tta \
        --tile 768
    python evaluate.py --ckpt runs/IDR/ensemble.json --save-maps maps/   # average.py's manifest
    python evaluate.py --ckpt hub:IDR+DDR --test MES --dice-argmax       # the authors' model

Several checkpoints form an ensemble that averages sigmoid probabilities (so does an average.py
manifest). Counts are pooled over all FOV pixels of a test set on the device where the predictions
are (protocol.py; the protocol is written down in docs/PROTOCOL.md). Results go to results.json next
to the checkpoint: one test set after the other, merged under a lock with the test sets already
there when they are of the same weights and protocol (docs/EVALUATION.md); beside the pooled
numbers, each test image's Dice and AP per lesion ("images"), the worst of them listed in the
summary. Your own photographs: predict.py.
"""
import argparse
import os
from pathlib import Path

import utils
from data.flags import add_data_args, add_dataset_list, check_own_folders
from data.ids import DATASET_IDS


def build_parser():
    p = utils.Parser(description=__doc__)
    p.add_argument("--ckpt", nargs="+", action="extend", required=True,
                   help="checkpoint(s), average.py manifest(s) or the authors' models "
                        "(hub:IDR+DDR; hub: = all five); several = an ensemble averaging "
                        "probabilities (required)")
    # folders=False: a dataset of one's own may take the run's recorded --root (main checks it)
    add_dataset_list(p, "--test", "test sets, e.g. MES or IDR,DDR", default=list(DATASET_IDS),
                     folders=False)
    p.add_argument("--out", default=None,
                   help="results JSON (default: results.json beside the first checkpoint; "
                        "authors/COMBO/ for hub:)")
    # every flag of this group changes the numbers: results.json records it (make_protocol)
    g = p.add_argument_group("protocol")
    g.add_argument("--resolution", type=utils.check_range(int, 1), default=None,
                   help="square image size (default: the checkpoint's training resolution)")
    g.add_argument("--tile", type=utils.check_range(int, 1), default=None,
                   help="predict in overlapping tiles of this size (default: whole image)")
    g.add_argument("--tile-overlap", type=utils.check_range(float, 0, 0.999999), default=0.5,
                   help="fraction of a tile shared with its neighbour, in [0, 1) "
                        "(default: %(default)s)")
    g.add_argument("--tta", action="store_true", help="average over the 4 flips (default: off)")
    g.add_argument("--lesions", default=None, metavar="LIST",
                   help="lesions to score, e.g. HE (default: those the checkpoint was trained on)")
    g.add_argument("--no-roi", action="store_true",
                   help="the authors' way: count pixels outside the FOV and padding with p = 0 "
                        "(default: only FOV pixels counted)")
    g.add_argument("--dice-argmax", action="store_true",
                   help="softmax models (the authors'): also their Dice, a pixel being its "
                        "argmax's class (default: off)")
    g.add_argument("--style", default=None, metavar="NAME",
                   help="style of a style-conditioned model: fine, mixed, coarse or a training "
                        "set's ID (default: fine)")
    # --device stays None here (no torch before --help): main() resolves it; --dtype is recorded
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default="float32", choices=utils.DTYPES,
                   help="autocast precision of the forward pass (default: %(default)s)")
    g.add_argument("--batch", type=utils.check_range(int, 1), default=1,
                   help="images per forward pass (default: %(default)s)")
    p.add_argument("--save-maps", default=None, metavar="DIR",
                   help="per test image: probability PNGs, an overlay and an image | truth | "
                        "prediction panel (default: none)")
    p.add_argument("--maps-worst", type=utils.check_range(int, 1), default=None, metavar="K",
                   help="with --save-maps: maps of the K worst images per lesion only (lowest "
                        "Dice), not of every image (default: every image)")
    p.add_argument("--worst", type=utils.check_range(int, 0), default=3, metavar="K",
                   help="the summary lists the K worst images per lesion (default: %(default)s)")
    # NOTE: --images moved to predict.py; kept hidden: the old command gets one line saying so
    p.add_argument("--images", default=None, help=argparse.SUPPRESS)
    # --data-root, --cache, the split flags: those not given come from the run's checkpoint (main)
    add_data_args(p)
    return p


utils.start(__name__, build_parser)  # --help before torch loads; a Ctrl-C while it loads: one line
# the heavy imports (torch, the data and scoring modules: seconds) after --help was answered

import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from dataclasses import asdict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

import authors  # noqa: E402
import data  # noqa: E402
from data.flags import parse_pairs  # noqa: E402
from data.ids import LESIONS, dataset_order  # noqa: E402
from data.splits import OFFICIAL  # noqa: E402
from kernels import AP_BINS, binned_counts, pr_metrics  # noqa: E402
from maps import save_test_maps  # noqa: E402
from predict import (check_style, ensemble_lesions, ensemble_resolution,  # noqa: E402
                     load_ensemble, read_checkpoint)
from protocol import THRESHOLDS, count_dataset, summarize  # noqa: E402


# ---- the results file: one set-up (weights + protocol), its test sets accumulating ---------------
def weights_fingerprint(models):
    """sha256 of what the models compute: each one's config (less `pretrained`, which only says
    where its first weights came from) and state dict (names, dtypes, shapes, bytes). The same
    weights give the same digest whatever the file's path or name; a retrained best.pt gives
    another."""
    h = hashlib.sha256()
    for m in models:  # an ensemble's digest depends on its members' order, as its header does
        cfg = {k: v for k, v in asdict(m.cfg).items() if k != "pretrained"}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for k, v in sorted(m.state_dict().items()):  # sorted: the digest ignores the dict's order
            v = v.detach().cpu().contiguous()
            h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
            # the bytes, whatever the dtype
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_results(out):
    """The results file at `out` as a dict, None when there is none; one-line errors for what is not
    one."""
    out = Path(out)
    if out.is_dir():  # a user's `--out runs/x/`: refused, not written inside
        raise ValueError(f"--out {out} is a directory: name a results file, e.g. "
                         f"{out / 'results.json'}")
    if not out.exists():
        return None
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError) as e:  # cut short, not JSON, unreadable: never overwritten
        raise ValueError(f"--out {out} exists but is not a results file ({e}); remove it or pass "
                         f"another --out")
    # another program's JSON: refused rather than overwritten
    if not isinstance(old, dict) or not isinstance(old.get("results"), dict):
        raise ValueError(f"--out {out} exists but is not a results file of evaluate.py; pass "
                         f"another --out")
    return old


def _check_mergeable(old, header, out):
    """A one-line ValueError unless the results `old` (read from `out`) are of the same weights and
    protocol.

    NOTE: the model is told by the fingerprint of its weights, not by the checkpoint's path: a
    best.pt that changed (a run extended with a larger --iters) must not add its scores beside those
    of the old one, and the same file named by a relative and an absolute path is the same model."""
    if old.get("protocol") != header["protocol"]:
        raise ValueError(f"--out {out} holds results of other protocol settings "
                         f"({old.get('protocol')}); pass another --out to keep both")
    if old.get("fingerprint") == header["fingerprint"]:  # the same weights: merge
        return
    if "fingerprint" not in old:  # written before fingerprints existed: nothing to compare with
        raise ValueError(f"--out {out} holds results without the fingerprint of their model's "
                         f"weights (an older evaluate.py), so they can't be told to be of "
                         f"{', '.join(header['checkpoints'])}; pass another --out, or delete it "
                         f"to score again")
    # other weights: the steps say which one changed (a longer run's new best.pt, another model)
    raise ValueError(f"--out {out} holds results of other weights "
                     f"({', '.join(map(str, old.get('checkpoints', [])))}"
                     f" at step {old.get('steps')}; now {', '.join(header['checkpoints'])} at step "
                     f"{header['steps']}: changed since, or another model); pass another --out, or "
                     f"delete it to score again")


def check_results_file(out, header):
    """Before any work: `out` can be written, and the results already there are of these weights and
    protocol (merged into, never lost), or one line saying why not."""
    out = Path(out)
    old = _read_results(out)
    # 256 KiB of room: a full disk stops now, not after the first test set was scored
    utils.writable_folder(out.parent, "--out", f"write {out.name} there", room=1 << 18)
    if old is not None:
        _check_mergeable(old, header, out)
        # NOTE: write_json renames a new file over it, which a read-only file does not stop
        if not os.access(out, os.W_OK):
            raise ValueError(f"--out {out}: the file is not writable")


def _test_order(test_id):
    """Sort key of the results' test sets: the five in their order, then one's own by name."""
    return dataset_order(test_id)


def merged_roots(old, header, test_id, out):
    """The results file's --root pairs after `test_id` is written: the other test sets keep the
    folders they were read from; test_id's is this evaluation's. A test set scored again from
    another folder replaces its scores with a note naming both."""
    before = parse_pairs(old.get("root") or [], "root")
    now = parse_pairs(header.get("root") or [], "--root")
    if test_id in old["results"] and before.get(test_id) != now.get(test_id):
        print(f"note: {test_id} in {out} was scored on {before.get(test_id) or 'its --data-root'}; "
              f"its scores are replaced by those on {now.get(test_id) or 'its --data-root'}")
    kept = {k: v for k, v in before.items() if k != test_id}
    return [f"{k}={v}" for k, v in {**kept, **now}.items()]


def merge_results(out, header, test_id, block):
    """Add one test set's block to the results file `out` -> the whole file's dict, as written.

    Read, merge and write happen under a lock on a file beside `out`: two evaluate.py of one
    checkpoint on other test sets, into one --out, both keep their test sets."""
    out = Path(out)
    # NOTE: the lock is a separate file: the results file itself is replaced, not rewritten
    with utils.locked(out.with_name(f".{out.name}.lock")):
        old = _read_results(out)
        results = {}
        if old is not None:
            # again: another process may have written it meanwhile
            _check_mergeable(old, header, out)
            results = old["results"]
            header = {**header, "root": merged_roots(old, header, test_id, out)}
        results[test_id] = block  # a test set scored again replaces its old block
        report = {**header, "results": {t: results[t] for t in sorted(results, key=_test_order)}}
        utils.write_json(out, report)
    return report


def make_protocol(resolution, lesions, options=None, tta=False, tile=None, overlap=0.5, roi=True,
                  dtype="float32", dice_argmax=False, style=None):
    """The results' "protocol": every setting that changes the numbers, the split included."""
    options = options or {}
    # NOTE: a results file merges only with the same protocol dict: a key added here would make
    # every older results file unmergeable, hence the keys added below only when set
    protocol = {"thresholds": THRESHOLDS, "ap_bins": AP_BINS, "roi": "fov" if roi else "all",
                "resolution": resolution, "tta": bool(tta), "tile": tile,
                "overlap": overlap if tile else None,  # the overlap means nothing without tiles
                "dtype": str(dtype), "split_protocol": options.get("split_protocol", "paper"),
                "lesions": list(lesions)}
    if protocol["split_protocol"] == "paper":  # the authors' draw always uses seed 42
        protocol["split_seed"] = int(options.get("split_seed", 0))
    if options.get("split_files"):  # --splits ID=FILE: the split is the file's
        protocol["splits"] = dict(options["split_files"])
    if dice_argmax:
        protocol["dice_argmax"] = True
    if style is not None:  # only for conditioned models: older results files keep their protocol
        protocol["style"] = style
    return protocol


def results_header(ckpt_paths, models, headers, protocol):
    """What a results file says besides the scores: the checkpoints, their weights' fingerprint and
    steps, the training run they come from, the protocol."""
    # the training args: the checkpoint's own, or (a manifest) its first member's that has any
    args = headers[0].get("args") or next((m["args"] for m in headers[0]["members"]
                                           if m.get("args")), {})
    # "ensemble" for several checkpoints or a manifest; else a soup's or SWA's method, or "baseline"
    method = "ensemble" if len(headers) > 1 or headers[0].get("kind") == "ensemble" else \
        headers[0].get("method") or (headers[0].get("provenance") or {}).get("method") or "baseline"
    header = {"version": 1, "checkpoints": ckpt_paths, "fingerprint": weights_fingerprint(models),
              "steps": [h.get("step") for h in headers], "train": args.get("train"),
              "seed": args.get("seed"), "method": str(method)}
    if "n_train_images" in args:  # runs on a subset of the training images (the learning curve)
        header["n_train_images"] = args["n_train_images"]
    header["protocol"] = protocol
    return header


# ---- scoring -------------------------------------------------------------------------------------
def image_scores(probs, items, roi, lesions):
    """Per image of a batch and lesion: its pixel count `pos`, the pixels predicted at p >= 0.5,
    Dice at p >= 0.5 and AP, from that image's own counts (the protocol's kernels: the pooled
    numbers' definitions on one image) -> {image id: {lesion: scores}}.

    probs (B, 4, R, R) as counted (0 outside the FOV with roi=False); roi: count FOV pixels only.
    A lesion not scored (`lesions`) or not annotated in the image is left out. Dice is 0 when the
    image has no lesion pixel but predicts some, null when it has neither (0 / 0); AP is null
    without a lesion pixel."""
    device = probs.device
    masks = torch.from_numpy(np.stack([it["masks"] for it in items])).to(device)  # (B, 4, R, R)
    fov = torch.from_numpy(np.stack([it["fov"] for it in items])).to(device)  # (B, R, R)
    half = THRESHOLDS // 2  # t = 0.5 among the 11 float32 thresholds: the Dice threshold
    out = {}
    for k, item in enumerate(items):
        counts = binned_counts(probs[k:k + 1], masks[k:k + 1], fov[k:k + 1] if roi else None,
                               THRESHOLDS, ap_bins=AP_BINS)
        m = pr_metrics(*counts)  # (4,) float64 each
        tp, fp, pos = (c.cpu() for c in counts[:3])
        annotated = item.get("annotated")
        scores = {}
        for c, lesion in enumerate(LESIONS):
            if lesion not in lesions or (annotated is not None and not annotated[c]):
                continue
            n, predicted = int(pos[c]), int(tp[c, half] + fp[c, half])
            scores[lesion] = {"pos": n, "predicted": predicted,
                              "dice": float(m["dice"][c]) if n else 0.0 if predicted else None,
                              "ap": float(m["ap"][c]) if n else None}
        out[item["id"]] = scores
    return out


def worst_images(images, lesion, k):
    """The k images of {id: {lesion: scores}} with the lowest Dice for `lesion` (ties: lowest AP,
    then the larger lesion first) among those where Dice is defined -> [(id, scores)]."""
    scored = [(i, s[lesion]) for i, s in images.items()
              if lesion in s and s[lesion]["dice"] is not None]
    scored.sort(key=lambda x: (x[1]["dice"], -1.0 if x[1]["ap"] is None else x[1]["ap"],
                               -x[1]["pos"], x[0]))
    return scored[:k]


def score_test_set(models, test_id, where, protocol, device, batch=1, maps_dir=None, verbose=True,
                   maps_worst=None):
    """One test set's results block (protocol.summarize, and per image: image_scores), preparing its
    cache on first use (where: data_root, cache, prepare_cache options) and writing its maps to
    maps_dir/TEST_ID/ when given: of every image, or of the maps_worst worst per lesion."""
    data_root, cache, options = where
    resolution, lesions = protocol["resolution"], protocol["lesions"]
    # prepared on first use; a no-op when its sources and options are unchanged (data/prepare.py)
    data.prepare_cache(test_id, data_root, cache, resolution,
                       **{"verbose": verbose, **(options or {})})
    ds = data.PreparedDataset(cache, test_id, resolution, "test")
    if len(ds) == 0:
        raise ValueError(f"test set {test_id} has no images (test split of "
                         f"{Path(cache) / test_id})")
    # the authors' Dice's TP, FP per lesion (--dice-argmax)
    argmax = torch.zeros(2, len(LESIONS), dtype=torch.int64, device=device)
    roi = protocol["roi"] == "fov"  # False (--no-roi): every pixel of the square counted
    # each image's crop box and original size (the cache's meta.json): maps go back on the photo
    geometry = {x: ds.geometry(i) for i, x in enumerate(ds.ids)} if maps_dir else {}
    images = {}  # per image scores, in the test split's order
    run = dict(dtype=protocol["dtype"], tta=protocol["tta"], tile=protocol["tile"], roi=roi,
               batch=batch, overlap=protocol["overlap"] or 0.5, style=protocol.get("style"))

    def save_maps(ids, probs, items):  # probs (B, 4, R, R) of these prepared test images
        for k, item in enumerate(items):
            save_test_maps(Path(maps_dir) / test_id, item, probs[k].float().cpu().numpy(),
                           geometry[ids[k]], lesions)

    # Images of this test set, with an ETA, on stderr; disable=None: silent where stderr is no
    # terminal (logs)
    with tqdm(total=len(ds), desc=f"{test_id} test", unit="image", leave=verbose,
              disable=None) as bar:
        def each_batch(ids, probs, items):
            if maps_dir is not None and not maps_worst:
                save_maps(ids, probs, items)
            if protocol.get("dice_argmax"):  # counted in the same pass as the protocol's counts
                argmax.add_(authors.argmax_counts(probs, items, roi))
            images.update(image_scores(probs, items, roi, lesions))
            bar.update(len(ids))

        # int64 tp (4, T), fp (4, T), pos (4,) over the set's pixels (T = 11 thresholds), and the
        # fine curve's tp, fp (4, AP_BINS) behind the floor-free AP; `overlap or 0.5`: the
        # protocol records None without tiles
        counts = count_dataset(models, ds, device, on_batch=each_batch, ap_bins=AP_BINS, **run)
    # a lesion annotated in no image of the set is not scored (NaN, out of the means); one
    # annotated in some images only is scored on those (protocol.annotated_counts)
    unannotated = {les: sum(not ds.annotated(i)[LESIONS.index(les)] for i in range(len(ds)))
                   for les in LESIONS}
    scored = [les for les in lesions if unannotated[les] < len(ds)]
    # per lesion: AUPR, its floor, AP, Dice and the raw counts; the means over `scored`
    block = summarize(*counts, n_images=len(ds), lesions=scored)
    if any(unannotated.values()):  # images that do not annotate a lesion, per lesion
        block["not_annotated"] = {les: n for les, n in unannotated.items() if n}
    if protocol.get("dice_argmax"):
        authors.add_dice_argmax(block, *argmax.cpu().tolist())
    block["images"] = images
    if maps_dir is not None and maps_worst:
        # NOTE: the worst are known only once every image is scored: they are predicted again
        # (the same protocol path), rather than every map held in memory
        worst = {i for lesion in lesions for i, _ in worst_images(images, lesion, maps_worst)}
        keep = [k for k, x in enumerate(ds.ids) if x in worst]
        if keep:
            count_dataset(models, Subset(ds, keep), device, on_batch=save_maps, **run)
    return block


def evaluate(ckpt_paths, test_ids, where=("data_raw", "cache", None), out=None, maps_dir=None,
             device=None, batch=1, verbose=True, maps_worst=None, worst=3, **settings):
    """Score one checkpoint or an ensemble on test sets -> the results dict (with `out`: the whole
    file).

    where: (data_root, cache, prepare_cache options: data.data_options(args)); settings:
    make_protocol's (resolution and lesions default to the models' own; style to fine for a
    style-conditioned model). Each test set is written to `out` as soon as it is scored, merged with
    the test sets already there. maps_worst=K: maps of the K worst images per lesion only; worst:
    how many worst images per lesion the summary lists."""
    ckpt_paths = [str(p) for p in ([ckpt_paths] if isinstance(ckpt_paths, (str, Path))
                                   else ckpt_paths)]
    if not ckpt_paths:
        raise ValueError("no checkpoint given (--ckpt)")
    # a list or one string ("IDR,DDR") -> canonical IDs in DATASET_IDS' order (the scoring order)
    test_ids = data.parse_dataset_ids(",".join(test_ids) if not isinstance(test_ids, str)
                                      else test_ids)
    if maps_dir is not None:  # before any scoring, not after test set 1
        utils.writable_folder(maps_dir, "--save-maps", "write maps there")
    device = torch.device(device or utils.default_device())
    # every model of every checkpoint (a manifest: its members), on the device, in eval mode
    models, headers = load_ensemble(ckpt_paths, device)
    # None settings become the models' own (refused where the members disagree)
    settings.update(style=check_style(models, settings.get("style")),
                    resolution=ensemble_resolution(models, settings.get("resolution")),
                    lesions=ensemble_lesions(models, settings.get("lesions")))
    # NOTE: our models have no argmax over classes: refused, not silently scored like a softmax
    if settings.get("dice_argmax") and not all(m.softmax for m in models):
        raise ValueError(f"--dice-argmax is the argmax of a softmax over background and lesions; "
                         f"{ckpt_paths[0]} has one sigmoid per lesion (its Dice is at p >= 0.5)")
    protocol = make_protocol(options=where[2], **settings)
    header = results_header(ckpt_paths, models, headers, protocol)
    # where the test sets were read (report.py tells synthetic from real data by it)
    header.update(data_root=str(where[0]), cache=str(where[1]),
                  root=[f"{k}={v}" for k, v in ((where[2] or {}).get("roots") or {}).items()])
    if out is not None:  # a file we could not merge into stops here, before an hour of scoring
        check_results_file(out, header)
    if verbose:
        print(f"{len(models)} model(s) from {len(ckpt_paths)} checkpoint(s) on {device}; "
              + ", ".join(f"{k} {v}" for k, v in protocol.items()))
    report, done = {**header, "results": {}}, []  # done: the test sets written, for a Ctrl-C's line
    for test_id in test_ids:
        try:
            block = score_test_set(models, test_id, where, protocol, device, batch, maps_dir,
                                   verbose, maps_worst)
        except KeyboardInterrupt:  # one line naming what was kept (utils.run prints it)
            kept = (f"{', '.join(done)} written to {out}" if done and out is not None
                    else "nothing written")
            raise KeyboardInterrupt(f"interrupted during test set {test_id} ({kept}); rerun the "
                                    f"same command to score every test set") from None
        # written at once: an interrupted or failed later test set loses only itself
        if out is not None:
            report = merge_results(out, header, test_id, block)
        else:
            report["results"][test_id] = block
        done.append(test_id)
        if verbose:
            print_table(test_id, block)
            print_worst(block, protocol["lesions"], worst)
    return report


def print_table(test_id, block):
    """Per lesion and their mean for one test set: the protocol's AUPR beside its floor, AP and
    Dice."""
    # NaN (an absent lesion) and None (null in JSON) print as "nan" in the 6-character columns
    fmt = lambda v: "   nan" if v is None or math.isnan(v) else f"{v:6.3f}"  # noqa: E731
    columns = (("AUPR", "aupr"), ("floor", "aupr_floor"), ("AP", "ap"), ("Dice", "dice"))
    columns += (("argmax", "dice_argmax"),) if "mean_dice_argmax" in block else ()  # --dice-argmax
    # one row per lesion, then the means: the columns' keys in the block are KEY and mean_KEY
    print(f"\n{test_id} test ({block['n_images']} images)")
    print(f"{'':8s}" + "".join(f"{title:>7s}" for title, _ in columns))
    # a NaN row is explained below the table: a lesion absent from the test set, or not scored
    absent, untrained, unannotated = [], [], []
    missing = block.get("not_annotated", {})  # images per lesion that do not annotate it
    for name, v in block["lesions"].items():
        print(f"{name:8s}" + "".join(f"{fmt(v.get(key)):>7s}" for _, key in columns))
        if missing.get(name, 0) >= block["n_images"]:
            unannotated.append(name)
        elif v["pos"] == 0:
            absent.append(name)
        elif v.get("dice") is None or math.isnan(v["dice"]):
            untrained.append(name)
    print(f"{'mean':8s}" + "".join(f"{fmt(block.get('mean_' + key)):>7s}" for _, key in columns))
    print("  floor: the AUPR of a blank map on these pixels, (1 + prevalence) / 2 "
          "(docs/PROTOCOL.md); AP: floor-free, a blank map scores the prevalence")
    if absent:
        print(f"  nan: lesion absent from this test set ({', '.join(absent)}); the mean is over "
              f"the others")
    if untrained:
        print(f"  nan: lesion not scored (not in --lesions: {', '.join(untrained)}); the mean is "
              f"over the others")
    if unannotated:
        print(f"  nan: lesion not annotated in this test set ({', '.join(unannotated)}); the mean "
              f"is over the others")


def print_worst(block, lesions, k=3):
    """The k worst images per lesion of one test set (lowest Dice: the failure cases to look at)."""
    if not k:
        return
    lines = []
    for lesion in lesions:
        worst = worst_images(block["images"], lesion, k)
        if worst:
            lines.append(f"  {lesion:4s}" + ", ".join(
                f"{i} {s['dice']:.3f} ({s['pos']} px)" for i, s in worst))
    if lines:
        print("  worst images by Dice at p >= 0.5 (lesion pixels), per lesion; every image's "
              "scores: \"images\" in the results file")
        print("\n".join(lines))


# ---- the command line ----------------------------------------------------------------------------
def default_out(ckpt):
    """results.json next to a checkpoint file, inside a hub-layout folder, authors/<COMBO>/ for a
    hub spec."""
    if authors.is_spec(ckpt):
        return Path("authors") / data.combo_name(authors.parse_spec(ckpt)) / "results.json"
    # a folder: the authors' layout (config.json + model.safetensors)
    return (Path(ckpt) / "results.json" if Path(ckpt).is_dir()
            else Path(ckpt).with_name("results.json"))


def check_split_flags(args, parser, recorded, test_ids, where):
    """Refuse split flags that differ from the run's own for a test set it was trained on: the test
    split would be drawn again, and some of its training images scored as test. (Without these flags
    the run's recorded split settings are used: data.data_settings.)"""
    trained = [t for t in test_ids if t in (recorded.get("train") or [])]
    if not trained:  # a test set the run never saw: any split is a fair test
        return
    # the split flags given on this command line (a flag at its default was not given)
    given = {k: getattr(args, k) for k in ("split_protocol", "split_seed", "splits")
             if getattr(args, k) != parser.get_default(k)}
    protocol = recorded.get("split_protocol") or "paper"
    if "split_protocol" in given and given["split_protocol"] != protocol:
        raise ValueError(f"--split-protocol {given['split_protocol']}: {where} was trained with "
                         f"the {protocol} split of {','.join(trained)}; another split would score "
                         f"training images as test (drop the flag: the run's split is used)")
    # {ID: split file} given now, and as the run recorded them
    files = parse_pairs(args.splits, "--splits")
    old_files = parse_pairs(recorded.get("splits") or [], "--splits")
    for t in trained:
        if "splits" in given and files.get(t) != old_files.get(t):
            raise ValueError(f"--splits {t}={files.get(t)}: {where} was trained on {t} split by "
                             f"{old_files.get(t) or 'its protocol'}; another split would score "
                             f"training images as test (drop the flag: the run's split is used)")
        # the seed draws only the sets without an official split or a split file
        seeded = t not in OFFICIAL[given.get("split_protocol", protocol)] and not files.get(t)
        if ("split_seed" in given and seeded
                and recorded.get("split_seed", 0) != given["split_seed"]):
            raise ValueError(f"--split-seed {given['split_seed']}: {where} was trained on {t} "
                             f"split with seed {recorded.get('split_seed', 0)}; another seed would "
                             f"score training images as test (drop the flag: the run's split is "
                             f"used)")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.images is not None:
        raise ValueError(f"your own photographs: python predict.py --ckpt {' '.join(args.ckpt)} "
                         f"--images {args.images} (evaluate.py scores test sets)")
    if args.maps_worst and not args.save_maps:
        raise ValueError(f"--maps-worst {args.maps_worst} chooses which maps --save-maps writes: "
                         f"pass --save-maps DIR too")
    # a device this machine lacks ("cuda" without a GPU) is one line now, not a traceback later
    device = utils.check_device(args.device or utils.default_device())
    out = args.out or default_out(args.ckpt[0])
    # Test splits as the run was trained: its recorded data flags unless given here (data_settings).
    recorded = read_checkpoint(args.ckpt[0]).get("args") or {}
    check_split_flags(args, p, recorded, args.test, args.ckpt[0])
    where = data.data_settings(args, p, recorded)  # (data_root, cache, prepare_cache options)
    check_own_folders("--test", args.test, where[2]["roots"])
    evaluate(args.ckpt, args.test, where, out, args.save_maps, device, args.batch,
             maps_worst=args.maps_worst, worst=args.worst, resolution=args.resolution,
             lesions=args.lesions, tta=args.tta, tile=args.tile, overlap=args.tile_overlap,
             roi=not args.no_roi, dtype=args.dtype, dice_argmax=args.dice_argmax, style=args.style)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: the test sets scored before are in --out; rerun the "
                                "same command")
