"""Scoring a model on prepared data: the one home of the evaluation protocol that every script uses.

    from protocol import predict, count_dataset, summarize
    probs = predict(models, x)                          # (B, 3, H, W) in [0, 1] -> (B, 4, H, W)
    tp, fp, pos = count_dataset(models, data.PreparedDataset("cache", "IDR", 1536, "test"), "cuda")
    block = summarize(tp, fp, pos, n_images=27)         # AUPR and Dice per lesion, pooled

evaluate.py (test sets), train.py (validation), average.py (soup scores) and tune.py (through
train.py) all count with these functions, so a number means the same wherever it is printed. The
protocol (float32 thresholds, pooling, the trapezoid, Dice, ROI) is defined in docs/PROTOCOL.md
("Evaluation protocol") and computed by kernels/.
"""
import math
import numbers
import sys

import numpy as np
import torch

from data.ids import LESIONS
from kernels import binned_counts, pr_metrics
from utils import torch_dtype

THRESHOLDS = 11  # the IDRiD challenge's float32 linspace(0, 1, 11)
FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, horizontal, vertical, both: a square's flip group


# ---- prediction: ensemble mean of sigmoid probabilities, flip TTA, overlapping tiles -------------
def predict(models, x, dtype=torch.float32, tta=False, style=None):
    """Mean sigmoid probability over models (and flips): x float (B, 3, H, W) in [0, 1] -> float32
    (B, 4, H, W). style: the labelling style asked of every style-conditioned model (fine, coarse, a
    dataset ID: model.SegModel.style_mix); None = each model's default (fine)."""
    dtype = torch_dtype(dtype)
    flips = FLIPS if tta else FLIPS[:1]
    total = None
    for m in models:
        for dims in flips:
            xi = x.flip(dims) if dims else x
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = m(xi) if style is None else m(xi, style=style)  # (B, 4, H, W)
            # NOTE: an ensemble averages probabilities, not logits (the paper's, section 3.3)
            p = torch.sigmoid(logits.float())
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
    return total / (len(models) * len(flips))


def _window_starts(size, tile, stride):
    """Evenly spread window origins covering [0, size): first at 0, last flush with the end."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / stride) + 1  # windows needed at this stride
    return sorted({round(i * (size - tile) / (n - 1)) for i in range(n)})


def _ramp(n, overlap, device):
    """1-D blending weight: linear ramps of `overlap` pixels at both ends, 1 inside, never 0."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    edge = torch.minimum(i, n - 1 - i) + 0.5  # distance to the nearer end, > 0
    return (edge / max(overlap, 1)).clamp(max=1.0)


def predict_tiled(models, x, tile, dtype=torch.float32, tta=False, overlap=0.5, style=None):
    """predict() over overlapping tile x tile windows blended with linear ramps: (B, 3, H, W) ->
    (B, 4, H, W). `overlap`: the fraction of the tile neighbouring windows share. The weights are
    divided out: a pixel seen by one window keeps its probability, one seen by several gets their
    weighted mean (a window's borders, where the receptive field is cut, weigh least)."""
    if tile is not None and not (isinstance(tile, numbers.Integral) and tile >= 1):
        raise ValueError(f"tile must be a whole number of pixels >= 1 (or None: whole image), "
                         f"got {tile!r}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    B, _, H, W = x.shape
    if tile is None or (tile >= H and tile >= W):
        return predict(models, x, dtype, tta, style)  # one window: exactly the untiled prediction
    th, tw = min(tile, H), min(tile, W)
    ov = int(round(overlap * tile))  # pixels shared by neighbouring windows
    stride = max(tile - ov, 1)
    weight = _ramp(th, ov, x.device)[:, None] * _ramp(tw, ov, x.device)[None, :]  # (th, tw)
    out = torch.zeros(B, len(LESIONS), H, W, device=x.device)
    norm = torch.zeros(H, W, device=x.device)
    for y0 in _window_starts(H, th, stride):
        for x0 in _window_starts(W, tw, stride):
            p = predict(models, x[..., y0:y0 + th, x0:x0 + tw], dtype, tta, style)  # (B, 4, th, tw)
            out[..., y0:y0 + th, x0:x0 + tw] += p * weight
            norm[y0:y0 + th, x0:x0 + tw] += weight
    return out / norm  # every pixel is covered: norm > 0


def predict_fitting(models, x, tile, dtype, tta, overlap, style=None):
    """predict_tiled(), halving the tile while the device is out of memory -> (probs, tile used)."""
    while True:
        try:
            return predict_tiled(models, x, tile, dtype, tta, overlap, style), tile
        except torch.OutOfMemoryError:
            size = tile or max(x.shape[-2:])
            if x.device.type != "cuda" or size <= 128:
                raise
            torch.cuda.empty_cache()
            tile = size // 2
            print(f"warning: out of device memory; predicting in {tile} px tiles from now on",
                  file=sys.stderr)


def to_input(images_uint8, device):
    """uint8 (B, H, W, 3) numpy -> float (B, 3, H, W) in [0, 1] on the device (cast there)."""
    t = torch.from_numpy(np.ascontiguousarray(images_uint8))
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    # NOTE: contiguous NCHW: a permuted (channels_last) input makes conv outputs channels_last too
    return t.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float().div_(255)


# ---- counting a prepared test set ---------------------------------------------------------------
@torch.inference_mode()
def count_dataset(models, dataset, device, dtype=torch.float32, tta=False, tile=None, roi=True,
                  batch=1, overlap=0.5, thresholds=THRESHOLDS, on_batch=None, ap_bins=0,
                  style=None):
    """Pooled binned counts of a model ensemble over every full image of a data.PreparedDataset.

    Returns int64 CPU tensors tp (4, T), fp (4, T), pos (4,), and with ap_bins=B > 0 also tp_fine
    (4, B), fp_fine (4, B): the finely binned curve behind the floor-free `ap`, counted in the same
    pass (kernels.binned_counts). The counts stay on the device until the end (no host round trip
    per image). roi=True counts only pixels inside the FOV; roi=False is the authors' way: every
    pixel counted, probabilities outside the FOV and the padding set to 0. on_batch(ids, probs
    (B, 4, H, W), items) is called per batch (maps, validation losses). style: as predict's.
    """
    if len(dataset) == 0:
        raise ValueError(f"test set {getattr(dataset, 'dataset_id', '')} has no images")
    device = torch.device(device)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()  # NOTE: train.py validates mid-training; BatchNorm must use running stats here
    total = None
    try:
        for start in range(0, len(dataset), batch):
            items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
            x = to_input(np.stack([it["image"] for it in items]), device)  # (B, 3, H, W)
            # masks (B, 4, H, W) and fov (B, H, W) bool
            masks = torch.from_numpy(np.stack([it["masks"] for it in items])).to(device)
            fov = torch.from_numpy(np.stack([it["fov"] for it in items])).to(device)
            # (B, 4, H, W) float32; a tile that ran out of memory stays halved for the next images
            probs, tile = predict_fitting(models, x, tile, dtype, tta, overlap, style)
            probs = probs.contiguous()  # no-op unless a model returns channels_last
            if not roi:
                probs = probs.masked_fill(~fov[:, None], 0.0)
            fine = {"ap_bins": ap_bins} if ap_bins else {}
            counts = annotated_counts(probs, masks, fov if roi else None, items, thresholds, fine)
            counts = [c.to(device=device, dtype=torch.int64) for c in counts]
            total = counts if total is None else [a + c for a, c in zip(total, counts)]
            if on_batch is not None:
                on_batch([it["id"] for it in items], probs, items)
    finally:
        for m, w in zip(models, was_training):
            m.train(w)
    return tuple(c.cpu() for c in total)  # the one host transfer


def annotated_counts(probs, masks, roi, items, thresholds, fine):
    """kernels.binned_counts of a batch, where an image counts only for the lesions annotated in it
    (item["annotated"], all four when absent): a lesion not annotated is no negative either.
    NOTE: one call for a fully annotated batch (the common case, the counts as they always were);
    else one per image, its other lesions' counts zeroed."""
    ann = [it.get("annotated") for it in items]
    if all(a is None or np.all(a) for a in ann):
        return binned_counts(probs, masks, roi, thresholds, **fine)
    total = None
    for k, a in enumerate(ann):
        one = None if roi is None else roi[k:k + 1]
        counts = binned_counts(probs[k:k + 1], masks[k:k + 1], one, thresholds, **fine)
        keep = torch.from_numpy(np.asarray(a if a is not None else [True] * len(LESIONS)))
        counts = [c * keep.to(c.device, c.dtype).view(-1, *[1] * (c.dim() - 1)) for c in counts]
        total = counts if total is None else [t + c for t, c in zip(total, counts)]
    return total


def pooled_counts(models, datasets, device, dtype=torch.float32, on_batch=None, ap_bins=0):
    """count_dataset over several datasets, counts pooled (a combination's validation splits)."""
    total = None
    for ds in datasets:
        counts = count_dataset(models, ds, device, dtype=dtype, on_batch=on_batch, ap_bins=ap_bins)
        total = counts if total is None else tuple(a + c for a, c in zip(total, counts))
    return total


def summarize(tp, fp, pos, tp_fine=None, fp_fine=None, *, n_images, lesions=LESIONS):
    """Counts -> the per-test-set block of the Results JSON (NaN where a lesion is absent).

    Per lesion: the protocol's aupr beside its blank-map floor aupr_floor, the floor-free ap (given
    the fine counts), dice, and the raw 11-threshold counts tp, fp, pos. `lesions`: the ones the
    model was trained on (train.py --lesions); the others keep their counts, score NaN and leave
    the means.
    """
    m = pr_metrics(tp, fp, pos, tp_fine, fp_fine)
    keys = [k for k in ("aupr", "aupr_floor", "ap", "dice") if k in m]
    nan = float("nan")
    blocks = {name: {**{k: float(m[k][c]) if name in lesions else nan for k in keys},
                     "tp": [int(v) for v in tp[c]], "fp": [int(v) for v in fp[c]],
                     "pos": int(pos[c])}
              for c, name in enumerate(LESIONS)}
    means = {f"mean_{k}": nanmean([blocks[n][k] for n in lesions]) for k in keys}
    return {"n_images": int(n_images), **means, "lesions": blocks}


def nanmean(values):
    """Mean over the lesions present in the test set (NaN only when none is)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")
