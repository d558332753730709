r"""Train the U-Net of Playout & Cheriet on any combination of the five lesion datasets.

    python train.py --train IDR,MES --data-root data_raw --seed 0       # -> runs/IDR+MES/s0/
    python train.py --train IDR --data-root demo/data --encoder test_resnet --no-pretrained \
        --resolution 128 --patch 64 --batch 4 --iters 200 --warmup 20 --val-every 50 \
        --device cpu  # toy, CPU
    torchrun --standalone --nproc-per-node 4 train.py --train IDR,DDR,MES --data-root data_raw \
        --sync-bn

Rerunning the same command resumes from OUT/last.pt (bit-identical on CPU); a finished run prints
one line. Ctrl-C stops in one line (exit 130); SIGUSR1 or SIGTERM (a time limit's warning, a
preemption) at the end of the step, last.pt written (exit 75). One train.py at a time per run folder
(OUT/.lock). The schedule, resuming, snapshots, stop signals: docs/TRAINING.md. tune.py calls
build_parser() / parse_args() / run() in-process.
"""
import argparse
import math
import os
import sys
import textwrap

import runfolder
import utils
from data.flags import add_data_args, add_dataset_list
from data.ids import LESIONS, combo_name, parse_lesions, style_tokens

HIGHER_IS_BETTER = {"loss": False, "dice": True, "ap": True, "aupr": True}  # --val-metric choices


# ---------------------------------------------------------------------------- the command line
def _channels(text):
    """'256,128,64,32,16' -> (256, 128, 64, 32, 16), positive widths."""
    try:
        widths = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text}")
    return widths


def _lesion_weights(text):
    """'MA=4' or 'EX=1,HE=1,MA=4,CWS=1' -> (1.0, 1.0, 4.0, 1.0): LESIONS order, 1 unless given."""
    weights = dict.fromkeys(LESIONS, 1.0)
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            (name,) = parse_lesions(name) if sep else (None,)
            weights[name] = float(value)
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(
                f"expected LESION=WEIGHT pairs such as MA=4 or EX=1,MA=4, got {text!r}") from None
        if not weights[name] >= 0 or weights[name] == float("inf"):
            raise argparse.ArgumentTypeError(f"a weight is a number >= 0, got {part!r}")
    if not any(weights.values()):
        raise argparse.ArgumentTypeError(f"at least one weight must be > 0, got {text!r}")
    return tuple(weights.values())


# argparse types: a whole number >= 1, a count >= 0, a fraction in [0, 1]
WHOLE, COUNT, FRACTION = (utils.check_range(int, 1), utils.check_range(int, 0),
                          utils.check_range(float, 0, 1))


def build_parser():
    resumable = ", ".join(f"--{k.replace('_', '-')}" for k in runfolder.RESUMABLE if k != "out")
    p = utils.Parser(description=__doc__, epilog=textwrap.fill(
        f"A resume refuses other settings than the run's own, except {resumable} (--iters not "
        f"below the step of last.pt: the cosine then stretches to the new end); docs/TRAINING.md"))
    g = p.add_argument_group("run")
    add_dataset_list(g, "--train", "datasets to train on", required=True)
    g.add_argument("--out", default=None,
                   help="run folder; rerunning resumes it (default: runs/COMBO/sSEED)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the patch stream and dropout (default: %(default)s)")
    g.add_argument("--init-seed", type=int, default=0,
                   help="seed of the decoder's init, shared by the seeds of a combination: soups "
                        "need one start (default: %(default)s)")
    add_dataset_list(g, "--test", "test sets on which best.pt is scored when training ends, as "
                     "evaluate.py scores it, into OUT/results.json", default=None)
    add_data_args(p)
    add_model_args(p.add_argument_group("model"))
    add_optimisation_args(p.add_argument_group("optimisation"))
    add_checkpoint_args(p.add_argument_group("validation and checkpoints"))
    add_system_args(p.add_argument_group("system"))
    return p


def add_model_args(g):
    g.add_argument("--encoder", default="legacy_seresnet101.in1k",
                   help="timm encoder with features_only support (default: %(default)s)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the encoder's ImageNet weights (weights.py) "
                        "(default: %(default)s)")
    g.add_argument("--encoder-weights", default=None, metavar="FILE",
                   help="start the encoder from this local weights file instead (default: none)")
    g.add_argument("--decoder-channels", type=_channels, default=(256, 128, 64, 32, 16),
                   help="decoder block widths, deepest first (default: 256,128,64,32,16)")
    g.add_argument("--decoder-attention", action="store_true",
                   help="scSE in the decoder blocks (default: off)")
    g.add_argument("--dropout", type=utils.check_range(float, 0, 0.999999), default=0.0,
                   help="channel dropout before the head, in [0, 1) (default: %(default)s)")
    g.add_argument("--local-contrast", type=utils.check_range(float, 0), default=0.0,
                   metavar="SIGMA",
                   help="subtract the local mean (Gaussian of SIGMA px at --resolution) inside the "
                        "model; 0 = off, the paper (default: %(default)s)")
    g.add_argument("--style-condition", choices=("off", "style", "dataset"), default="off",
                   help="FiLM-condition the decoder on each patch's labelling style or dataset "
                        "(docs/STYLE.md) (default: %(default)s, the paper's model)")
    g.add_argument("--characterize", default=None, metavar="PATH",
                   help="characterize.json giving each training set's style "
                        "(default: data.ids.STYLE_TABLE)")


def add_optimisation_args(g):
    g.add_argument("--resolution", type=WHOLE, default=1536,
                   help="side of the prepared images (default: %(default)s)")
    g.add_argument("--patch", type=WHOLE, default=512,
                   help="side of the training patches (default: %(default)s)")
    g.add_argument("--batch", type=WHOLE, default=8,
                   help="patches per step per process (default: %(default)s)")
    g.add_argument("--lesion-patches", type=FRACTION, default=0.0, metavar="Q",
                   help="fraction of patches centred on a lesion pixel; 0 = random FOV pixels, "
                        "the paper (default: %(default)s)")
    g.add_argument("--lesion-weights", type=_lesion_weights, default=None, metavar="L=W,...",
                   help="how often each lesion is drawn for --lesion-patches' centres, e.g. MA=4: "
                        "four times as often as the others (default: uniform)")
    g.add_argument("--augment-p", type=FRACTION, default=1.0, metavar="P",
                   help="fraction of patches augmented, the others plain crops; the authors' code: "
                        "0.5 (default: %(default)s)")
    g.add_argument("--rotate", type=utils.check_range(float, 0, 180), default=180.0, metavar="DEG",
                   help="rotation of an augmented patch, uniform in +-DEG; the authors' code: 10 "
                        "(default: %(default)s)")
    g.add_argument("--iters", type=WHOLE, default=20000,
                   help="optimizer steps in total (default: %(default)s)")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adamw",
                   help="sgd: momentum 0.9, Nesterov (default: %(default)s)")
    g.add_argument("--lr", type=utils.check_range(float, 0, low_open=True), default=3e-4,
                   help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=utils.check_range(float, 0), default=1e-2,
                   help="on conv and linear weights only (default: %(default)s)")
    g.add_argument("--warmup", type=COUNT, default=500,
                   help="linear warmup steps, then cosine to 0; >= --iters: iters // 10 "
                        "(default: %(default)s)")
    g.add_argument("--loss", choices=("bce", "dice", "bce+dice"), default="bce+dice",
                   help="inside the FOV only (default: %(default)s)")
    g.add_argument("--lesions", default=",".join(LESIONS), metavar="LIST",
                   help="lesions trained and scored, the others out of the loss (not negatives) "
                        "(default: all)")


def add_checkpoint_args(g):
    g.add_argument("--val-every", type=WHOLE, default=1000,
                   help="validate and save last.pt every N steps, and at the end "
                        "(default: %(default)s)")
    g.add_argument("--val-metric", choices=tuple(HIGHER_IS_BETTER), default="loss",
                   help="what best.pt follows: the validation loss (paper section 2.5) or a mean "
                        "over lesions (default: %(default)s)")
    g.add_argument("--snapshot-every", type=COUNT, default=0,
                   help="also keep snapshots/step_N.pt every N steps (default: %(default)s = off)")
    g.add_argument("--keep-last", type=COUNT, default=2, metavar="K",
                   help="keep the last K validations' weights as snapshots, besides the minima "
                        "(SWA) (default: %(default)s)")
    g.add_argument("--stop-at", type=WHOLE, default=None,
                   help="save last.pt and exit at this step (time-limited jobs) (default: none)")
    g.add_argument("--log-every", type=WHOLE, default=10,
                   help="training-loss lines in log.jsonl (default: %(default)s)")


def add_system_args(g):
    g.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=utils.DTYPES, default=None,
                   help="autocast dtype; float16 adds a GradScaler (default: bfloat16 on a GPU "
                        "that has it, else float32)")
    # the cores this process may use (a Slurm allocation, taskset), not the whole node's
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    g.add_argument("--workers", type=COUNT, default=min(8, cores or 1),
                   help="DataLoader processes; 0 loads in the main process (default: %(default)s)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (default: off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    g.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm across DDP processes, CUDA (default: off)")


utils.start(__name__, build_parser)  # --help before torch loads; a Ctrl-C while it loads: one line

import datetime  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader, Sampler, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

import stops  # noqa: E402
import weights  # noqa: E402
from curves import refresh as refresh_curves  # noqa: E402
from data import PatchDataset, PreparedDataset, data_options, prepare_cache  # noqa: E402
from data.datasets import own_styles  # noqa: E402
from data.flags import parse_pairs  # noqa: E402
from kernels import AP_BINS, pr_metrics  # noqa: E402
from model import (ModelConfig, architecture, build_model, ctrl_c_deferred,  # noqa: E402
                   load_checkpoint, save_checkpoint)
from protocol import nanmean, pooled_counts  # noqa: E402


def parse_args(argv=None):
    """The command line, checked across flags: a user error is one ValueError naming the flag."""
    args = build_parser().parse_args(argv)
    try:
        args.lesions = parse_lesions(args.lesions)
    except ValueError as e:
        raise ValueError(f"--lesions: {e}") from None
    if args.patch > args.resolution:
        raise ValueError(f"--patch {args.patch} is larger than --resolution {args.resolution}")
    if args.local_contrast >= args.resolution:
        raise ValueError(f"--local-contrast must be in [0, --resolution), "
                         f"got {args.local_contrast}")
    if args.characterize and args.style_condition == "off":
        raise ValueError("--characterize gives the styles of --style-condition style or dataset; "
                         "pass one of them")
    # a --characterize file without a style for a training set: one line
    run_styles(args)
    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.dtype = args.dtype or ("bfloat16" if cuda and torch.cuda.is_bf16_supported()
                                else "float32")
    utils.check_device(args.device)  # e.g. --device cuda on a machine without a GPU
    if args.warmup >= args.iters:  # NOTE: a warmup as long as the run would never reach --lr
        print(f"warning: --warmup {args.warmup} >= --iters {args.iters} would never reach --lr; "
              f"using --warmup {args.iters // 10} (iters // 10)", file=sys.stderr)
        args.warmup = args.iters // 10
    args.out = args.out or os.path.join("runs", combo_name(args.train), f"s{args.seed}")
    return args


# ---------------------------------------------------------------------------- the pure pieces
def compute_loss(scores, masks, fov, kind, probs=False, annotated=None):
    """Multi-label loss over the lesion channels, counting only pixels inside the FOV.

    scores (B, C, H, W) float32 logits (or probabilities with probs=True), masks (B, C, H, W) float
    0/1, fov (B, H, W) bool. NOTE: as the evaluation protocol's ROI, padding and the black border
    outside the FOV are ignored: the model is neither rewarded nor punished there.
    annotated (B, C) bool: the lesions annotated in each patch's image; a lesion its dataset does
    not annotate is no negative: its pixels leave the loss, and a channel no patch of the batch
    annotates leaves the Dice mean (a batch that annotates none: a zero loss, with its graph).
    None (or all True): every channel of every patch counts.
    """
    roi = fov[:, None].to(scores.dtype)  # (B, 1, H, W)
    scored = None
    if annotated is not None and not bool(annotated.all()):
        roi = roi * annotated[:, :, None, None].to(scores.dtype)  # (B, C, H, W)
        scored = annotated.any(0)  # (C,) the channels some patch annotates
    # NOTE: a fully annotated batch keeps its arithmetic (FOV pixels x channels)
    pixels = roi.sum() if scored is not None else roi.sum() * scores.shape[1]
    p = scores if probs else torch.sigmoid(scores)
    loss = scores.new_zeros(())
    if "bce" in kind:
        bce = (F.binary_cross_entropy(p, masks, reduction="none") if probs
               else F.binary_cross_entropy_with_logits(scores, masks, reduction="none"))
        loss = loss + (bce * roi).sum() / pixels.clamp(min=1)
    if "dice" in kind:
        # Soft Dice per lesion pooled over the batch ("batch Dice": a patch without the lesion does
        # not give 0/0); +1 smoothing keeps an all-empty channel finite and pushes it towards 0.
        p, y = p * roi, masks * roi
        inter = (p * y).sum((0, 2, 3))  # (C,)
        dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1)
        if scored is None or bool(scored.any()):
            loss = loss + (1 - (dice if scored is None else dice[scored])).mean()
        else:  # NOTE: no channel scored: 0, not the NaN of an empty mean, with a graph to backward
            loss = loss + (p * 0).sum()
    return loss


def lesion_channels(lesions):
    """Channel indices of the trained lesions (--lesions), in LESIONS order."""
    return [LESIONS.index(name) for name in lesions]


def lr_factor(step, warmup, iters):
    """Linear warmup then cosine decay to 0 (nanoGPT's shape); `step` counts finished updates."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, iters - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, args):
    """AdamW (or Adam, SGD); weight decay on conv / linear weights only, not BatchNorm or biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    adam = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return adam(groups, lr=args.lr)


class StepSampler(Sampler):
    """Indices of PatchDataset for steps [start, iters) of one rank.

    The patch stream is global: step s uses items s*B*W .. (s+1)*B*W - 1, rank r the slice
    r*B .. r*B+B-1 of it. Starting at `start`, a resumed run sees an uninterrupted run's patches.
    """

    def __init__(self, start, iters, batch, rank=0, world=1):
        self.start, self.iters, self.batch, self.rank, self.world = start, iters, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.iters):
            first = (s * self.world + self.rank) * self.batch  # this rank's slice of step s
            yield from range(first, first + self.batch)

    def __len__(self):
        return max(0, self.iters - self.start) * self.batch


def validation_loss(sums, kind):
    """The training loss over a whole validation set, from pooled sums (see validate).

    NOTE: pooled over every FOV pixel of every validation image, not averaged per image: a per-image
    soft Dice with +1 smoothing scores a blank map 0 on each lesion an image lacks, so a blank model
    would win the selection. Lesions absent from the whole set leave the Dice mean (as in protocol).
    """
    bce, pixels, inter, p_sum, y_sum = sums
    loss = 0.0
    if "bce" in kind:  # pixels: the FOV pixels where each lesion is annotated, per lesion
        loss += float(bce.sum() / pixels.sum().clamp(min=1))
    if "dice" in kind:
        present = y_sum > 0
        dice = (2 * inter + 1) / (p_sum + y_sum + 1)  # (C,), the training loss's smoothing
        loss += float((1 - dice[present]).mean()) if present.any() else 0.0
    return loss


def validate(model, val_sets, device, dtype, loss_kind, lesions=LESIONS):
    """Validation loss, per-lesion AUPR, AP and Dice on full images at the training resolution, in
    one pass of protocol.pooled_counts over all validation sets. Only the trained `lesions` enter
    the loss and the means; the others score NaN. NOTE: --val-metric X reads "mean_X" of this."""
    # sums over FOV pixels, per lesion: BCE, pixels, p * y, p, y (what validation_loss pools)
    sums = [torch.zeros(len(LESIONS), dtype=torch.float64, device=device) for _ in range(5)]
    bad = []

    def add_sums(ids, probs, items):  # probs (B, 4, R, R) float32
        # NOTE: binary_cross_entropy raises on a NaN probability (a device-side assert on CUDA):
        # count the non-finite ones, score a stand-in; they make the loss NaN (one host sync).
        bad.append((~torch.isfinite(probs)).sum())
        probs = probs.nan_to_num(nan=0.5, posinf=1.0, neginf=0.0)
        masks = torch.from_numpy(np.stack([it["masks"] for it in items])).to(probs.device).float()
        roi = torch.from_numpy(np.stack([it["fov"] for it in items])).to(probs.device)
        roi = roi[:, None].float()  # (B, 1, R, R)
        if not all(it.get("annotated", np.ones(1, bool)).all() for it in items):
            # a lesion not annotated in an image is no negative there (train.compute_loss)
            annotated = np.stack([it.get("annotated", np.ones(len(LESIONS), bool)) for it in items])
            roi = roi * torch.from_numpy(annotated).to(probs.device)[:, :, None, None].float()
        bce = F.binary_cross_entropy(probs, masks, reduction="none") * roi  # (B, 4, R, R)
        for k, v in enumerate((bce.sum((0, 2, 3)), roi.sum((0, 2, 3)).expand(len(LESIONS)),
                               (probs * masks * roi).sum((0, 2, 3)), (probs * roi).sum((0, 2, 3)),
                               (masks * roi).sum((0, 2, 3)))):
            sums[k] += v.double()  # stays on the device

    # ap_bins: the finely binned curve behind the floor-free AP, counted in the same pass
    tp, fp, pos, tp_fine, fp_fine = pooled_counts([model], val_sets, device, dtype=dtype,
                                                  on_batch=add_sums, ap_bins=AP_BINS)
    m = pr_metrics(tp, fp, pos, tp_fine, fp_fine)
    aupr, ap, dice = ([float(v) if n in lesions else float("nan") for n, v in zip(LESIONS, m[k])]
                      for k in ("aupr", "ap", "dice"))
    trained = lesion_channels(lesions)  # the loss of the trained lesions only, as in training
    loss = (float("nan") if torch.stack(bad).sum().item()
            else validation_loss([t.cpu()[trained] for t in sums], loss_kind))
    return {"loss": loss, "mean_aupr": nanmean(aupr), "mean_ap": nanmean(ap),
            "mean_dice": nanmean(dice), "aupr": aupr, "ap": ap, "dice": dice}


def is_better(name, value, best):
    """Does `value` of --val-metric `name` beat `best` (None before any validation; NaN loses)?"""
    if best is None or (math.isnan(best) and not math.isnan(value)):
        return True
    return value > best if HIGHER_IS_BETTER[name] else value < best


# ---------------------------------------------------------------------------- setup
def refuse_restart(out, args):
    """A folder holding a run but no last.pt (deleted: it is 3x best.pt) is never retrained from
    step 0 over that run's files. Only a run that got no further than its first validation may
    start again (redone the same way, nothing is lost)."""
    best, kept = out / "best.pt", sorted((out / "snapshots").glob("step_*.pt"))
    if not best.exists():
        if kept:
            raise ValueError(f"{out} holds snapshots ({kept[-1].name}) but no last.pt to resume "
                             f"from; pass another --out, or move {out} away to train again from "
                             f"step 0")
        return
    ckpt = load_checkpoint(best)
    step = int(ckpt.get("step") or 0)
    # another --train etc.: refused
    runfolder.check_resume_args(ckpt.get("args") or {}, args, best, step)
    if step > min(args.val_every, args.iters) or kept:
        raise ValueError(f"{out} holds a run (best.pt at step {step}) but no last.pt to resume it "
                         f"from: training again would start at step 0 and replace its files; "
                         f"restore last.pt, pass another --out, or move {out} away to train again")


def load_resume(out, args, world):
    """OUT/last.pt checked against this command line, or None for a fresh run. Hold OUT/.lock."""
    last = out / "last.pt"
    ckpt = load_checkpoint(last) if last.exists() else None
    if world > 1:  # every rank must resume from the same step, or the ranks drift and DDP hangs
        steps = [None] * world
        dist.all_gather_object(steps, ckpt["step"] if ckpt is not None else None)
        if len(set(steps)) > 1:
            raise ValueError(f"the ranks see different {last} (steps {steps}): --out must be on a "
                             f"filesystem shared by every node")
    if ckpt is not None:
        runfolder.check_resume_args(ckpt.get("args") or {}, args, last, ckpt["step"])
    else:
        refuse_restart(out, args)
    return ckpt


def setup_process(args):
    """Device and DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is
    rank 0 of 1. Returns (device, rank, world, own_group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = utils.check_device(args.device)
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        # NOTE: long timeout: rank 0 may spend many minutes preparing the cache while others wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return device, rank, world, own_group


# cuDNN autotuning (one patch size: it picks its kernels once), TF32 matmuls and convs, as nanoGPT
CUDA_SPEED_FLAGS = ((torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32"),
                    (torch.backends.cudnn, "allow_tf32"))


def fast_cuda_kernels(device):
    """CUDA_SPEED_FLAGS on while training on a GPU -> the values they replaced, for restore_flags.
    NOTE: run() puts them back, so that best.pt scored in the same process (--test, tune.py) runs
    with the process's own settings, as evaluate.py scores it."""
    if device.type != "cuda":
        return {}
    previous = {(module, name): getattr(module, name) for module, name in CUDA_SPEED_FLAGS}
    for module, name in CUDA_SPEED_FLAGS:
        setattr(module, name, True)
    return previous


def restore_flags(previous):
    for (module, name), value in previous.items():
        setattr(module, name, value)


def on_rank0(master, world, work):
    """work() on rank 0 only; a one-line error it raises stops every rank (not left waiting)."""
    result, failure = None, None
    if master:
        try:
            result = work()
        except (ValueError, FileNotFoundError) as e:
            if world == 1:
                raise
            failure = e
    if world > 1:
        box = [str(failure) if failure else None]  # rank 0's error line, raised on every rank
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise failure if master else ValueError(box[0])
    return result


def load_data(args, master, world):
    """Prepared caches (rank 0 prepares, the others wait) -> (training sets, non-empty val sets)."""
    on_rank0(master, world, lambda: [prepare_cache(d, args.data_root, args.cache, args.resolution,
                                                   **data_options(args)) for d in args.train])
    train_sets = [PreparedDataset(args.cache, d, args.resolution, "train") for d in args.train]
    val_sets = [ds for ds in (PreparedDataset(args.cache, d, args.resolution, "val")
                              for d in args.train) if len(ds)]
    if not val_sets:
        raise ValueError(f"no validation images in the splits of {','.join(args.train)} "
                         f"(see --splits)")
    if sum(len(ds) for ds in train_sets) == 0:
        raise ValueError(f"no training images in the splits of {','.join(args.train)} "
                         f"(see --splits)")
    return train_sets, val_sets


def trained_lesions(args, train_sets, master):
    """The lesions of --lesions that some training image annotates: the model's (ModelConfig), so
    that evaluate.py and predict.py never use a head nothing trained. A --lesions given explicitly
    that no image annotates is a one-line error; the default (all four) is narrowed, with a note."""
    found = {les for ds in train_sets for i in range(len(ds))
             for les, on in zip(LESIONS, ds.annotated(i)) if on}
    missing = [les for les in args.lesions if les not in found]
    kept = tuple(les for les in args.lesions if les in found)
    combo = combo_name(args.train)
    if missing and (tuple(args.lesions) != LESIONS or not kept):
        raise ValueError(f"--lesions {','.join(args.lesions)}: no training image of {combo} "
                         f"annotates {','.join(missing)} (a dataset of one's own annotates the "
                         f"lesions of its dataset.json)")
    if missing and master:
        print(f"note: no training image of {combo} annotates {','.join(missing)}: the model is "
              f"trained on {','.join(kept)} and records them as its lesions")
    return kept


def run_styles(args):
    """data.ids.style_tokens of this run: its datasets' styles from --characterize, else from the
    style table and, for one's own datasets, their dataset.json "style"."""
    own = {}
    if args.style_condition != "off" and not args.characterize:
        own = own_styles(args.train, parse_pairs(args.root, "--root"))
    return style_tokens(args.style_condition, args.train, args.characterize, own)


def make_model(args, ckpt, device, lesions):
    """The run's ModelConfig (trained on `lesions`: trained_lesions) and model: last.pt's weights on
    resume (no download), else a new model whose encoder starts from ImageNet (or
    --encoder-weights), its decoder init --init-seed's."""
    tokens, token_styles, _ = run_styles(args)
    cfg = ModelConfig(encoder=args.encoder, pretrained=args.pretrained,
                      decoder_channels=tuple(args.decoder_channels),
                      attention=args.decoder_attention, dropout=args.dropout,
                      local_contrast=args.local_contrast, style_tokens=tokens,
                      token_styles=token_styles, resolution=args.resolution,
                      lesions=tuple(lesions))
    # NOTE: one decoder init for every seed (like the shared pretrained encoder): model soups
    # average runs that start from the same weights (Wortsman et al. 2022); seeds differ in
    # patches and dropout.
    torch.manual_seed(args.init_seed)
    encoder = weights.create_encoder(cfg.encoder, cfg.pretrained and ckpt is None,
                                     args.encoder_weights if ckpt is None else None)
    model = build_model(cfg, encoder)
    if ckpt is not None:
        if architecture(ckpt["model_cfg"]) != architecture(asdict(cfg)):
            raise ValueError(f"{args.out}/last.pt holds another architecture "
                             f"({ckpt['model_cfg']['encoder']}, decoder "
                             f"{ckpt['model_cfg']['decoder_channels']}); use another --out")
        model.load_state_dict(ckpt["model"])
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return cfg, model


def wrap(model, args, device, world):
    """The model as trained: SyncBatchNorm, torch.compile (before DDP, as nanoGPT), DDP; it shares
    `model`'s parameters, which the checkpoints hold."""
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def patch_loader(args, train_sets, start, rank, world):
    """Batches of augmented patches for steps [start, --iters): each rank reads its own slice of one
    global, seeded patch stream (StepSampler)."""
    # {dataset: token} of a style-conditioned run, {} when off
    token_of = run_styles(args)[2]
    patches = PatchDataset(train_sets, patch=args.patch, length=args.iters * args.batch * world,
                           seed=args.seed, lesion_patches=args.lesion_patches,
                           lesions=args.lesions, augment_p=args.augment_p, rotate=args.rotate,
                           lesion_weights=getattr(args, "lesion_weights", None),
                           styles=[token_of[d] for d in args.train] if token_of else None)
    sampler = StepSampler(start, args.iters, args.batch, rank, world)
    return DataLoader(patches, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                      pin_memory=torch.device(args.device).type == "cuda",
                      worker_init_fn=stops.ignore_stop_signals,
                      generator=torch.Generator())  # NOTE: own generator: the global RNG untouched


# ---------------------------------------------------------------------------- checkpoints
class State:
    """What last.pt holds and the loop changes: the model (unwrapped), its optimisation, the step,
    the best validation, the last validations (history) and where the run's files go."""

    def __init__(self, args, cfg, model, n_train, world):
        self.args, self.cfg, self.model, self.n_train, self.world = args, cfg, model, n_train, world
        self.out = Path(args.out)
        self.optimizer = make_optimizer(model, args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, args.warmup, args.iters))
        self.scaler = torch.amp.GradScaler(torch.device(args.device).type,
                                           enabled=args.dtype == "float16")
        self.step, self.best, self.history = 0, {"value": None, "step": None}, []
        self.saved_step = None  # the step of last.pt, which the Ctrl-C line names

    def checkpoint(self, record=None, last=False, **extra):
        """The house checkpoint of the weights now (validated by `record`, or not); optimizer,
        scheduler and scaler only in last.pt, the one a run resumes from."""
        at = record["step"] if record else self.step
        return {"model": self.model.state_dict(), "model_cfg": asdict(self.cfg),
                "args": self.run_args(), "step": at,
                "epoch": at * self.args.batch * self.world // self.n_train,  # passes over images
                "optimizer": self.optimizer.state_dict() if last else None,
                "scheduler": self.scheduler.state_dict() if last else None,
                "scaler": self.scaler.state_dict() if last and self.scaler.is_enabled() else None,
                "metric": record["metric"] if record else float("nan"), "version": 1, "val": record,
                **extra}

    def run_args(self):
        """The run's settings as args.json and every checkpoint's "args" hold them."""
        return {**runfolder.plain(vars(self.args)), "n_train_images": self.n_train}

    def validated_now(self):
        """The record of a validation at the current step, else None."""
        return self.history[-1] if self.history and self.history[-1]["step"] == self.step else None

    def restore(self, ckpt, rank):
        """Continue from last.pt: optimizer, scheduler, scaler, step, best, history, rank's RNG."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] and self.scaler.is_enabled():  # --dtype may change on resume
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = self.saved_step = ckpt["step"]
        self.best, self.history = ckpt["best"], ckpt["history"]
        rng = ckpt["rng"]
        if len(rng["torch"]) == self.world:  # one stream per rank: another world cannot reuse
            torch.set_rng_state(rng["torch"][rank])
            if rng["cuda"] and torch.device(self.args.device).type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"][rank], torch.cuda.current_device())
        elif rank == 0:
            print(f"note: {self.out / 'last.pt'} was saved by {len(rng['torch'])} processes, now "
                  f"{self.world}: RNG streams reseeded")


def save_last(state, master):
    """OUT/last.pt: everything a resume needs. Every rank gathers its RNG states; rank 0 writes."""
    cuda = torch.device(state.args.device).type == "cuda"
    states = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}
    gathered = [states]
    if state.world > 1:
        gathered = [None] * state.world
        dist.all_gather_object(gathered, states)
    with ctrl_c_deferred():  # a Ctrl-C finds last.pt and saved_step (the resume line's) agreeing
        if master:
            rng = {"torch": [g["torch"] for g in gathered],
                   "cuda": [g["cuda"] for g in gathered] if cuda else None}
            save_checkpoint(state.out / "last.pt",
                            state.checkpoint(state.validated_now(), last=True, best=state.best,
                                             history=state.history, rng=rng))
        state.saved_step = state.step


def save_last_unless_validated(state, master):
    """last.pt of this step, unless this step's validation wrote it (--stop-at, a stop signal).
    Under DDP every rank waits for rank 0's write: a rank that exits first would have torchrun stop
    the others mid-write."""
    if state.validated_now() is None:
        check_finite(state)
        save_last(state, master)
    if state.world > 1:
        dist.barrier()


def check_finite(state):
    """Called on every rank before weights are saved: a blown-up model is never written."""
    if not all(torch.isfinite(v).all() for v in state.model.state_dict().values()
               if v.is_floating_point()):
        raise diverged(state, "a weight", "not finite", state.step)


def diverged(state, what, value, at):
    last = state.out / "last.pt"
    good = f"{last} is the last good checkpoint" if last.exists() else "no checkpoint was written"
    return ValueError(f"{what} is {value} at step {at}: training diverged; lower --lr (now "
                      f"{state.args.lr:g}, in another --out) or resume with --dtype float32; "
                      f"{good}")


# ---------------------------------------------------------------------------- validation
def validate_and_save(state, val_sets, master, on_validate=None):
    """Validate; write the validated weights as a snapshot (prune_snapshots keeps what it should),
    best.pt when better, the log line and last.pt; then call on_validate(step, record)."""
    args = state.args
    check_finite(state)
    metrics = validate(state.model, val_sets, torch.device(args.device),
                       utils.torch_dtype(args.dtype), args.loss, args.lesions)
    if not math.isfinite(metrics["loss"]):
        raise diverged(state, "the validation loss", metrics["loss"], state.step)
    metric = metrics["loss"] if args.val_metric == "loss" else metrics[f"mean_{args.val_metric}"]
    record = {"step": state.step, "metric": metric, **metrics}
    better = is_better(args.val_metric, metric, state.best["value"])
    if better:
        state.best.update(value=metric, step=state.step)
    # what last.pt remembers
    state.history = (state.history + [record])[-runfolder.history_length(args):]
    # the step of the previous validation, if its loss is a local minimum (log.jsonl "minimum_at")
    minimum = next(iter(runfolder.val_loss_minima(state.history[-3:])), None)
    if master:
        periodic = args.snapshot_every and state.step % args.snapshot_every == 0
        save_checkpoint(runfolder.snapshot_path(state.out, state.step), state.checkpoint(
            record, snapshot="every+validation" if periodic else "validation"))
        runfolder.prune_snapshots(state.out, state.history, args)
        if better:
            save_checkpoint(state.out / "best.pt", state.checkpoint(record))
        runfolder.append_log(state.out / "log.jsonl", {
            "step": state.step, "split": "val",
            **{k: metrics[k] for k in ("loss", "mean_aupr", "mean_ap", "mean_dice")},
            **{k: dict(zip(LESIONS, metrics[k])) for k in ("aupr", "ap", "dice")},
            "best": better, "minimum_at": minimum})
        dice = " ".join(f"{name} {v:.3f}" for name, v in zip(LESIONS, metrics["dice"]))
        best = ("new best" if better
                else f"best {state.best['value']:.4f} at step {state.best['step']}")
        tqdm.write(f"step {state.step}: val loss {metrics['loss']:.4f}, Dice {dice}; "
                   f"{args.val_metric} {metric:.4f} ({best})")
        refresh_curves(state.out)  # OUT/curves.png from log.jsonl (failing to draw: a warning)
    save_last(state, master)
    if on_validate is not None:
        on_validate(state.step, dict(record))


# ---------------------------------------------------------------------------- the step loop
def train_step(state, model, batch, device):
    """One optimizer update on one batch -> (mean loss over ranks, learning rate used)."""
    args, dtype = state.args, utils.torch_dtype(state.args.dtype)
    images = batch["image"].to(device, non_blocking=True).float().div_(255)  # (B, 3, P, P), [0, 1]
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = batch["masks"].to(device, non_blocking=True).float()  # (B, 4, P, P) 0/1
    fov = batch["fov"].to(device, non_blocking=True)  # (B, P, P) bool
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        # a style-conditioned model gets each patch's token (its dataset's style), (B,) int64
        style = batch["style"].to(device, non_blocking=True) if "style" in batch else None
        logits = model(images) if style is None else model(images, style=style)  # (B, 4, P, P)
    trained = lesion_channels(args.lesions)
    annotated = batch["annotated"][:, trained].to(device) if "annotated" in batch else None
    loss = compute_loss(logits.float()[:, trained], masks[:, trained], fov, args.loss,
                        annotated=annotated)
    # The mean loss over ranks: logged, and checked on every rank before the update, so that all
    # stop together and a NaN never reaches the weights.
    loss_value = loss.detach().clone()
    if state.world > 1:
        dist.all_reduce(loss_value)
        loss_value /= state.world
    loss_value = loss_value.item()
    if not math.isfinite(loss_value):
        raise diverged(state, "the training loss", loss_value, state.step + 1)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    lr = state.optimizer.param_groups[0]["lr"]  # this update's; the scheduler moves on below
    state.scheduler.step()
    state.step += 1
    return loss_value, lr


def train_loop(state, model, loader, val_sets, device, master, on_validate):
    """Steps from state.step to --iters, validating and saving on the way; False when --stop-at
    ended them. A stop signal (stops.catch_stop_signals) raises Stopped at the end of its step."""
    args = state.args
    bar = tqdm(total=args.iters, initial=state.step, disable=not master, dynamic_ncols=True,
               desc=combo_name(args.train))
    tic, seen, running = time.perf_counter(), 0, []
    model.train()
    try:
        for batch in loader:
            loss_value, lr = train_step(state, model, batch, device)
            running.append(loss_value)
            seen += args.batch * state.world
            rate = seen / max(time.perf_counter() - tic, 1e-9)  # patches/s, all ranks
            bar.update(1)
            val = f"{state.history[-1]['loss']:.4f}" if state.history else "-"
            bar.set_postfix({"loss": f"{loss_value:.4f}", "val": val, "lr": f"{lr:.2e}",
                             "patches/s": f"{rate:.1f}"}, refresh=False)
            if master and (state.step % args.log_every == 0 or state.step == args.iters):
                # step_s: seconds per optimizer step since the last validation (training only)
                runfolder.append_log(state.out / "log.jsonl", {
                    "step": state.step, "split": "train", "loss": sum(running) / len(running),
                    "lr": lr, "patches_per_s": rate, "step_s": args.batch * state.world / rate})
                running = []
            if state.step % args.val_every == 0 or state.step == args.iters:
                validate_and_save(state, val_sets, master, on_validate)
                tic, seen = time.perf_counter(), 0  # patches/s measures training only
            if (args.snapshot_every and state.step % args.snapshot_every == 0
                    and state.validated_now() is None):
                check_finite(state)
                if master:
                    save_checkpoint(runfolder.snapshot_path(state.out, state.step),
                                    state.checkpoint(snapshot="every"))
                tic, seen = time.perf_counter(), 0
            if args.stop_at is not None and args.stop_at <= state.step < args.iters:
                save_last_unless_validated(state, master)
                return False
            if state.step < args.iters and stops.any_rank_received(state.world, device):
                save_last_unless_validated(state, master)
                raise stops.stopped(f"at step {state.step}: {state.out / 'last.pt'} written; "
                                    f"rerun the same command to resume")
        if state.validated_now() is None:  # e.g. --iters raised on a finished run: validate now
            validate_and_save(state, val_sets, master, on_validate)
        return True
    except KeyboardInterrupt as e:
        if isinstance(e, stops.Interrupted):
            raise
        if state.saved_step is None:
            raise stops.Interrupted(f"interrupted at step {state.step}, before the first "
                                    f"checkpoint; rerun the same command to start again") from None
        raise stops.Interrupted(f"interrupted at step {state.step}; rerun the same command to "
                                f"resume from {state.out / 'last.pt'} (saved at step "
                                f"{state.saved_step})") from None
    finally:
        bar.close()


# ---------------------------------------------------------------------------- the run
def finished_result(ckpt, args, master):
    """run()'s result for a run finished at --iters (one line printed, nothing written), or None."""
    val = (ckpt or {}).get("val") or {}
    if ckpt is None or ckpt["step"] < args.iters or val.get("step") != ckpt["step"]:
        return None
    best = ckpt.get("best") or {}
    if master:
        print(f"{args.out} already finished at step {ckpt['step']} (best val {args.val_metric} "
              f"{best.get('value', float('nan')):.4f} at step {best.get('step')}); nothing to do")
    return {**val, "best": best.get("value"), "best_step": best.get("step"), "out": str(args.out),
            "finished": True}


def resume(state, ckpt, rank, master):
    """Continue from last.pt; rank 0 also puts the snapshot files right (prune_snapshots)."""
    state.restore(ckpt, rank)
    if master:
        # NOTE: a killed run's later validation may have pruned this one's snapshot; last.pt of a
        # validation step holds the same weights
        record = state.validated_now()
        if record is not None and not runfolder.snapshot_path(state.out, state.step).exists():
            save_checkpoint(runfolder.snapshot_path(state.out, state.step),
                            state.checkpoint(record, snapshot="validation"))
        # the step may be a --stop-at's, not a validation's
        runfolder.prune_snapshots(state.out, state.history, state.args, step=state.step)
        print(f"resuming {state.out} from step {state.step}")


def train(args, device, rank, world, ckpt, on_validate):
    """The accepted run, as nanoGPT: data, model, optimisation, resume, args.json, loop, summary."""
    master = rank == 0
    train_sets, val_sets = load_data(args, master, world)
    cfg, raw_model = make_model(args, ckpt, device, trained_lesions(args, train_sets, master))
    model = wrap(raw_model, args, device, world)
    state = State(args, cfg, raw_model, sum(len(ds) for ds in train_sets), world)
    torch.manual_seed(args.seed + rank)  # what draws from torch's RNG in training (dropout)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    if ckpt is not None:
        resume(state, ckpt, rank, master)
    del ckpt
    if args.val_metric != "loss":  # --val-metric must name a score validate() gives: one image
        metrics = validate(raw_model, [Subset(val_sets[0], [0])], device,
                           utils.torch_dtype(args.dtype), args.loss, args.lesions)
        if f"mean_{args.val_metric}" not in metrics:
            raise ValueError(f"--val-metric {args.val_metric}: the validation gives no "
                             f"mean_{args.val_metric}")
    if master:
        text = json.dumps(state.run_args(), indent=2) + "\n"
        utils.write_atomic(state.out / "args.json", lambda tmp: tmp.write_text(text))
        runfolder.trim_log(state.out / "log.jsonl", state.step)
    loader = patch_loader(args, train_sets, state.step, rank, world)
    finished = train_loop(state, model, loader, val_sets, device, master, on_validate)
    out = state.out
    if master and finished:
        # the last --keep-last stay
        runfolder.prune_snapshots(out, state.history, args, finished=True)
        kept = len(list((out / "snapshots").glob("step_*.pt")))
        print(f"done: {state.step} steps; best val {args.val_metric} {state.best['value']:.4f} at "
              f"step {state.best['step']} in {out / 'best.pt'}; {kept} snapshots in "
              f"{out / 'snapshots'}; curves in {out / 'curves.png'}")
    elif master:
        print(f"stopped at step {state.step} (--stop-at); rerun without it to continue from "
              f"{out / 'last.pt'}")
    return {**(state.history[-1] if state.history else {}), "best": state.best["value"],
            "best_step": state.best["step"], "out": str(out), "finished": finished}


def run(args, on_validate=None):
    """Train (or resume) the run of `args` (parse_args) -> its last validation record and
    {"best", "best_step", "out", "finished"}. on_validate(step, record) is called after every
    validation, checkpoints written; what it raises (optuna.TrialPruned) propagates. Ctrl-C raises
    stops.Interrupted (a KeyboardInterrupt) saying how to resume; SIGUSR1 or SIGTERM raises
    stops.Stopped (an Interrupted) at the end of the step, last.pt written."""
    device, rank, world, own_group = setup_process(args)
    out, lock = Path(args.out), None
    created = not out.exists()  # a run that fails before writing anything leaves no folder
    previous, flags = stops.catch_stop_signals(), fast_cuda_kernels(device)
    try:
        # the lock before the one read of last.pt
        lock = on_rank0(rank == 0, world, lambda: runfolder.lock_run(out))
        if rank == 0:
            runfolder.remove_partial_writes(out)
        ckpt = load_resume(out, args, world)
        done = finished_result(ckpt, args, rank == 0)
        result = done if done is not None else train(args, device, rank, world, ckpt, on_validate)
        # NOTE: a stop signal during the last step or the final validation (or while a finished
        # run says so) must not be lost: the scoring that follows (--test, evaluate.py) would start
        # with too little time left; stopped, the job requeues and the next attempt goes on.
        if stops.any_rank_received(world, device):
            raise stops.stopped(f"after the run finished at step {result.get('step', args.iters)}"
                                f": rerun the same command to go on")
        return result
    except BaseException:
        if lock is not None and created and os.listdir(out) == [".lock"]:
            os.unlink(out / ".lock")  # still held: no other train.py has taken it
            out.rmdir()
        raise
    finally:
        stops.restore_signals(previous)
        restore_flags(flags)
        if lock is not None:
            os.close(lock)
        if own_group:
            dist.destroy_process_group()


def test_best(args):
    """--test: best.pt scored on the test sets by evaluate.py's evaluate() (its protocol, its
    results file beside best.pt, merged with the test sets already there) -> that file's path."""
    from evaluate import default_out, evaluate  # NOTE: here: training never needs it

    best = Path(args.out) / "best.pt"
    out = default_out(best)
    evaluate([str(best)], args.test, (args.data_root, args.cache, data_options(args)), out=out,
             device=args.device)
    print(f"\nwrote {out}")
    return out


def next_command(args, result, argv):
    """The command to type after this run: resume it (--stop-at), score it (no --test), or
    segment photographs with it. argv: the run's own command line."""
    out = Path(args.out)
    if not result.get("finished"):  # --stop-at: the same command without it
        rest, skip = [], False
        for a in argv:  # drop --stop-at N and --stop-at=N
            if skip or a.startswith("--stop-at="):
                skip = False
                continue
            skip = a == "--stop-at"
            if not skip:
                rest.append(a)
        return f"next: python train.py {shlex.join(rest)}   # goes on to --iters {args.iters}"
    if not args.test:
        data = f" --data-root {shlex.quote(args.data_root)}" + \
            (f" --cache {shlex.quote(args.cache)}" if args.cache != "cache" else "")
        return (f"next: python evaluate.py --ckpt {shlex.quote(str(out / 'best.pt'))} --test "
                f"all{data}   # or train.py --test IDS does it when training ends")
    return (f"next: python predict.py --ckpt {shlex.quote(str(out / 'best.pt'))} --images "
            f"PHOTOS/   # your photographs; scores in {out / 'results.json'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        result = run(args)
    except stops.Stopped as e:  # its own exit status: a job script tells "resume me" from a failure
        print(e, file=sys.stderr)
        sys.exit(stops.EXIT_STOPPED)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 alone scores and tells
        return
    if args.test and result.get("finished"):
        test_best(args)
    print(next_command(args, result, argv))


if __name__ == "__main__":
    utils.run(main)
