r"""Train the U-Net of Playout & Cheriet on any combination of the five lesion datasets.

    python train.py --train IDR,MES --data-root data_raw --out runs/IDR+MES/s0 --seed 0
    python train.py --train IDR --data-root demo/data --encoder test_resnet --no-pretrained \
        --resolution 128 --patch 64 --batch 4 --iters 200 --warmup 20 --val-every 50 --device cpu   # toy scale, CPU
    torchrun --standalone --nproc-per-node 4 train.py --train IDR,DDR,MES --data-root data_raw --sync-bn
    python train.py --train IDR,MES --data-root data_raw --seed 0     # rerun: resumes from runs/IDR+MES/s0/last.pt

Rerunning the same command resumes from OUT/last.pt (model, optimizer, scheduler, scaler, step, RNG); a
finished run prints one line and exits; Ctrl-C stops with one line (exit code 130), last.pt intact. One
train.py at a time per run folder (OUT/.lock). A resume refuses settings other than the run's own, except
these, which may change: --iters (not below the step of last.pt; the cosine then stretches to the new end),
--stop-at, --val-every, --snapshot-every, --log-every, --workers, --device, --dtype, --compile,
--channels-last, --sync-bn and the data locations --data-root, --cache, --root. The protocol and the
datasets are described in docs/PROTOCOL.md. tune.py calls build_parser() / parse_args() / run() in-process.
"""
import cli  # first: a Ctrl-C during the slow imports below (torch: seconds) ends in one line

cli.early_ctrl_c(__name__ == "__main__")

import argparse
import datetime
import fcntl
import json
import math
import os
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from data import (LESIONS, PatchDataset, PreparedDataset, add_data_args, combo_name, data_options, parse_dataset_ids,
                  parse_lesions, prepare_cache)
from curves import refresh as refresh_curves
from data.flags import add_dataset_list
from jsonio import null_nan
from kernels import AP_BINS, pr_metrics
from model import ModelConfig, architecture, build_model, ctrl_c_deferred, load_checkpoint, save_checkpoint
from protocol import DTYPES, check_device, nanmean, pooled_counts
from style import MODES, style_tokens

HIGHER_IS_BETTER = {"loss": False, "dice": True, "ap": True, "aupr": True}
# The flags that may differ between a run and its resume (the docstring, hence --help, lists them).
RESUMABLE = ("iters", "stop_at", "val_every", "snapshot_every", "log_every", "workers", "device", "dtype", "compile",
             "channels_last", "sync_bn", "data_root", "cache", "root", "out")

# ----------------------------------------------------------------------------- command line
def _channels(text):
    """'256,128,64,32,16' -> (256, 128, 64, 32, 16)."""
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    add_dataset_list(g, "--train", "datasets to train on", required=True)
    g.add_argument("--out", default=None,
                   help="run directory; rerunning on it resumes (see above) (default: runs/<COMBO>/s<SEED>)")
    g.add_argument("--seed", type=int, default=0, help="seed of the patch stream and dropout (default: %(default)s)")
    g.add_argument("--init-seed", type=int, default=0,
                   help="seed of the decoder's random init, shared across --seed values so that runs of one "
                        "combination can be souped (average.py soup) (default: %(default)s)")
    add_data_args(p)  # --data-root, --cache, --root, --mask-threshold, --splits, --ret-he, --split-seed

    add_model_args(p)
    add_optimisation_args(p)
    add_validation_args(p)
    add_system_args(p, cuda)
    return p


def add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default="legacy_seresnet101.in1k",
                   help="timm encoder with features_only support (default: %(default)s)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the encoder's ImageNet weights, downloaded once from the "
                        "Hugging Face hub or GitHub, as timm keeps them (default: %(default)s)")
    g.add_argument("--encoder-weights", default=None,
                   help="local encoder weights file, used instead of the hub (default: %(default)s)")
    g.add_argument("--decoder-channels", type=_channels, default=(256, 128, 64, 32, 16),
                   help="decoder block widths, deepest first (default: 256,128,64,32,16)")
    g.add_argument("--decoder-attention", action="store_true",
                   help="scSE attention in the decoder blocks (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.0, help="channel dropout before the head (default: %(default)s)")
    g.add_argument("--local-contrast", type=float, default=0.0, metavar="SIGMA",
                   help="subtract the input's local mean (Gaussian of SIGMA pixels at --resolution, fundus only) "
                        "inside the model, Graham's fundus normalisation; 0 = off, the paper (default: %(default)s)")
    g.add_argument("--style-condition", choices=MODES, default="off",
                   help="condition the decoder on each patch's labelling style (FiLM after every decoder block, "
                        "style.py): style = one token per style (fine, mixed, coarse) of the training sets, dataset "
                        "= one token per training set; validation and evaluate.py use the fine style unless told "
                        "otherwise (evaluate.py --style); off = the paper's model (default: %(default)s)")
    g.add_argument("--characterize", default=None, metavar="PATH",
                   help="characterize.json (characterize.py) giving each training set's labelling style for "
                        "--style-condition (default: %(default)s = the README's table: IDR, DDR, MES fine; FGA "
                        "mixed; RET coarse)")



def add_optimisation_args(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--resolution", type=int, default=1536,
                   help="side of the prepared square images (default: %(default)s)")
    g.add_argument("--patch", type=int, default=512, help="side of the random training patches (default: %(default)s)")
    g.add_argument("--batch", type=int, default=8, help="patches per step per process (default: %(default)s)")
    g.add_argument("--lesion-patches", type=float, default=0.0, metavar="Q",
                   help="fraction of patches centred on a lesion pixel (a lesion of the image drawn uniformly, "
                        "then one of its pixels) instead of a random FOV pixel; 0 = the paper's random patches "
                        "(default: %(default)s)")
    g.add_argument("--augment-p", type=float, default=1.0, metavar="P",
                   help="fraction of training patches augmented (warp + colour, data/patches.py AUGMENT), the "
                        "others plain crops; the authors' code: 0.5 (default: %(default)s)")
    g.add_argument("--rotate", type=float, default=180.0, metavar="DEG",
                   help="random rotation of an augmented patch, uniform in +-DEG; the authors' code: 10 "
                        "(default: %(default)s)")
    g.add_argument("--iters", type=int, default=20000, help="optimizer steps in total (default: %(default)s)")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adamw",
                   help="adam, adamw (decoupled weight decay) or sgd (momentum 0.9, Nesterov) (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=1e-2,
                   help="on conv/linear weights only (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=500,
                   help="linear warmup steps before the cosine decay to 0; one >= --iters is scaled down to "
                        "iters // 10 with a warning (default: %(default)s)")
    g.add_argument("--loss", choices=("bce", "dice", "bce+dice"), default="bce+dice",
                   help="per-pixel BCE, soft Dice, or their sum, inside the FOV only (default: %(default)s)")
    g.add_argument("--lesions", default=",".join(LESIONS), metavar="LIST",
                   help="lesions to train, validate and score, e.g. HE: the others are left out of the loss, "
                        "not trained as negatives (for data where only some lesions are annotated); the model "
                        "keeps its 4 output channels (default: EX,HE,MA,CWS)")



def add_validation_args(p):
    g = p.add_argument_group("validation and checkpoints")
    g.add_argument("--val-every", type=int, default=1000,
                   help="validate and save last.pt every N steps, and at the end (default: %(default)s)")
    g.add_argument("--val-metric", choices=("loss", "dice", "ap", "aupr"), default="loss",
                   help="what best.pt follows: the validation loss (the paper's rule, section 2.5) or a mean over "
                        "lesions of Dice, AP or the protocol AUPR. NOTE: the protocol AUPR has a floor of "
                        "(1 + prevalence) / 2 that a blank map reaches, so it can pick a model that finds nothing "
                        "(default: %(default)s)")
    g.add_argument("--snapshot-every", type=int, default=0,
                   help="also keep snapshots/step_N.pt every N steps; 0: only at validation-loss minima "
                        "and the last validations (default: %(default)s)")
    g.add_argument("--keep-last", type=int, default=2, metavar="K",
                   help="also keep the weights of the last K validations as snapshots/step_N.pt, so that SWA "
                        "has snapshots in every run (a steadily falling validation loss has no local "
                        "minimum) (default: %(default)s)")
    g.add_argument("--stop-at", type=int, default=None,
                   help="save last.pt and exit at this step (time-limited jobs); rerun without it to resume "
                        "(default: %(default)s)")
    g.add_argument("--log-every", type=int, default=10,
                   help="training-loss lines in log.jsonl every N steps (default: %(default)s)")



def add_system_args(p, cuda):
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if cuda else "cpu",
                   help="torch device; under torchrun CUDA uses cuda:LOCAL_RANK (default: %(default)s)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16" if cuda and torch.cuda.is_bf16_supported()
                   else "float32", help="autocast dtype; float16 adds a GradScaler (default: %(default)s)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes; 0 loads in the main process (default: %(default)s)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (default: %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (default: %(default)s)")
    g.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm across DDP processes, CUDA only (default: %(default)s)")
    return p


def parse_args(argv=None):
    """Parse and check the command line: a user error raises a one-line ValueError naming the flag, before
    any data or model setup."""
    args = build_parser().parse_args(argv)
    for flag in ("resolution", "patch", "batch", "iters", "val_every", "log_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("warmup", "snapshot_every", "workers", "weight_decay", "keep_last"):
        if not getattr(args, flag) >= 0:  # `not >=`: NaN fails too
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    try:
        args.lesions = parse_lesions(args.lesions)
    except ValueError as e:
        raise ValueError(f"--lesions: {e}") from None
    if not (0 <= args.local_contrast < args.resolution):  # `not`: NaN fails too
        raise ValueError(f"--local-contrast must be in [0, --resolution), got {args.local_contrast}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.characterize and args.style_condition == "off":
        raise ValueError("--characterize gives the styles of --style-condition style or dataset; pass one of them")
    style_tokens(args.style_condition, args.train, args.characterize)  # a file without a style for a training set
    if not 0 <= args.lesion_patches <= 1:
        raise ValueError(f"--lesion-patches must be in [0, 1], got {args.lesion_patches}")
    if not 0 <= args.augment_p <= 1:
        raise ValueError(f"--augment-p must be in [0, 1], got {args.augment_p}")
    if not 0 <= args.rotate <= 180:
        raise ValueError(f"--rotate must be in [0, 180] degrees, got {args.rotate}")
    if args.stop_at is not None and args.stop_at < 1:
        raise ValueError(f"--stop-at must be >= 1, got {args.stop_at}")
    if min(args.decoder_channels) < 1:
        raise ValueError(f"--decoder-channels must be positive widths, got {','.join(map(str, args.decoder_channels))}")
    if args.patch > args.resolution:
        raise ValueError(f"--patch {args.patch} is larger than --resolution {args.resolution}")
    check_device(args.device)  # e.g. --device cuda on a machine without a GPU
    if args.warmup >= args.iters:
        # NOTE: a warmup as long as the run never reaches --lr (the cosine starts after the warmup)
        scaled = args.iters // 10
        print(f"warning: --warmup {args.warmup} >= --iters {args.iters} would never reach --lr; "
              f"using --warmup {scaled} (iters // 10)", file=sys.stderr)
        args.warmup = scaled
    if args.out is None:
        args.out = os.path.join("runs", combo_name(args.train), f"s{args.seed}")
    return args


# ----------------------------------------------------------------------------- pieces
def compute_loss(scores, masks, fov, kind, probs=False):
    """Multi-label loss over the 4 lesion channels, counting only pixels inside the FOV.

    scores (B, 4, H, W) float32 logits (or sigmoid probabilities with probs=True: validation gets those
    from protocol.count_dataset), masks (B, 4, H, W) float 0/1, fov (B, H, W) bool.
    NOTE: padding and the black border outside the FOV are ignored (project decision, as the evaluation
    protocol's ROI): the model is neither rewarded nor punished there.
    """
    roi = fov[:, None].to(scores.dtype)  # (B, 1, H, W)
    p = scores if probs else torch.sigmoid(scores)
    loss = scores.new_zeros(())
    if "bce" in kind:
        bce = F.binary_cross_entropy(p, masks, reduction="none") if probs else \
            F.binary_cross_entropy_with_logits(scores, masks, reduction="none")
        loss = loss + (bce * roi).sum() / (roi.sum() * scores.shape[1]).clamp(min=1)
    if "dice" in kind:
        # Soft Dice per lesion pooled over the batch ("batch Dice": a patch without the lesion does not
        # give 0/0); +1 smoothing keeps an all-empty channel finite and pushes it towards 0.
        p, y = p * roi, masks * roi
        inter = (p * y).sum((0, 2, 3))  # (4,)
        dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1)
        loss = loss + (1 - dice).mean()
    return loss


def lesion_channels(lesions):
    """Channel indices of the trained lesions (train.py --lesions), in LESIONS order."""
    return [LESIONS.index(name) for name in lesions]


def lr_factor(step, warmup, iters):
    """Linear warmup then cosine decay to 0 (nanoGPT's shape); `step` counts finished updates."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, iters - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, args):
    # Weight decay on conv/linear weights only; BatchNorm and biases are left alone.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    return (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam)(groups, lr=args.lr)


class StepSampler(Sampler):
    """Indices of PatchDataset for steps [start, iters) of one rank.

    The patch stream is global: step s uses items s*B*W .. (s+1)*B*W - 1, rank r the slice r*B .. r*B+B-1
    of it. Starting at `start` is what makes a resumed run see the same patches as an uninterrupted one.
    """

    def __init__(self, start, iters, batch, rank=0, world=1):
        self.start, self.iters, self.batch, self.rank, self.world = start, iters, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.iters):
            first = (s * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)

    def __len__(self):
        return max(0, self.iters - self.start) * self.batch


def validation_loss(sums, kind):
    """The training loss over a whole validation set, from pooled sums (see validate): BCE + soft Dice.

    NOTE: pooled over every FOV pixel of every validation image, not averaged per image: a per-image soft Dice
    with +1 smoothing scores a blank map 0 on each lesion an image lacks, so a blank model would win the
    selection. Lesions absent from the whole set leave the Dice mean (as they leave the protocol's).
    """
    bce, pixels, inter, p_sum, y_sum = sums
    loss = 0.0
    if "bce" in kind:
        loss += float(bce.sum() / (pixels[0] * len(bce)).clamp(min=1))  # pixels: the FOV count, per lesion
    if "dice" in kind:
        present = y_sum > 0
        dice = (2 * inter + 1) / (p_sum + y_sum + 1)  # (4,), the training loss's smoothing
        loss += float((1 - dice[present]).mean()) if present.any() else 0.0
    return loss


def validate(model, val_sets, device, dtype, loss_kind, lesions=LESIONS):
    """Validation loss, per-lesion AUPR, AP and Dice on full images at the training resolution.

    Only the trained `lesions` (--lesions) enter the loss and the means; the others score NaN.

    One pass of protocol.pooled_counts: AUPR / AP / Dice pool the counts of all images of all validation
    sets (the evaluation protocol); the loss, from the same probabilities, pools its sums the same way
    (validation_loss), NaN when a probability is not finite.
    NOTE: the dict returned here is the one place where validation scores are named: --val-metric X reads
    "mean_X" from it.
    """
    sums, bad = [torch.zeros(len(LESIONS), dtype=torch.float64, device=device) for _ in range(5)], []

    def add_sums(ids, probs, items):  # probs (B, 4, R, R) float32
        # NOTE: binary_cross_entropy raises on a NaN probability (a device-side assert on CUDA): count the
        # non-finite ones and score a stand-in; they make the loss NaN below (one host sync per validation).
        bad.append((~torch.isfinite(probs)).sum())
        probs = probs.nan_to_num(nan=0.5, posinf=1.0, neginf=0.0)
        masks = torch.from_numpy(np.stack([it["masks"] for it in items])).to(probs.device).float()  # (B, 4, R, R)
        roi = torch.from_numpy(np.stack([it["fov"] for it in items])).to(probs.device)[:, None].float()
        bce = F.binary_cross_entropy(probs, masks, reduction="none") * roi
        for k, v in enumerate((bce.sum((0, 2, 3)), roi.sum().expand(len(LESIONS)), (probs * masks * roi).sum((0, 2, 3)),
                               (probs * roi).sum((0, 2, 3)), (masks * roi).sum((0, 2, 3)))):
            sums[k] += v.double()  # stays on the device

    tp, fp, pos, tp_fine, fp_fine = pooled_counts([model], val_sets, device, dtype=dtype, on_batch=add_sums,
                                                  ap_bins=AP_BINS)
    m = pr_metrics(tp, fp, pos, tp_fine, fp_fine)
    aupr, ap, dice = ([float(v) if n in lesions else float("nan") for n, v in zip(LESIONS, m[k])]
                      for k in ("aupr", "ap", "dice"))
    trained = lesion_channels(lesions)
    loss = float("nan") if torch.stack(bad).sum().item() else \
        validation_loss([t.cpu()[trained] for t in sums], loss_kind)
    return {"loss": loss, "mean_aupr": nanmean(aupr), "mean_ap": nanmean(ap), "mean_dice": nanmean(dice),
            "aupr": aupr, "ap": ap, "dice": dice}


def selection_value(metrics, name):
    """The number best.pt follows for --val-metric `name`: the validation loss, or a mean over lesions."""
    key = "loss" if name == "loss" else f"mean_{name}"
    if key not in metrics:
        raise ValueError(f"--val-metric {name}: the validation gives no {key!r} yet (not computed by "
                         f"train.validate); use --val-metric loss, dice or aupr")
    return metrics[key]


def is_better(name, value, best):
    """Does `value` of --val-metric `name` beat `best` (None before the first validation; NaN always loses)?"""
    if best is None or (math.isnan(best) and not math.isnan(value)):
        return True
    return value > best if HIGHER_IS_BETTER[name] else value < best


def append_log(path, record):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(null_nan(record)) + "\n")
    except OSError as e:  # a full disk: the error names the log
        raise OSError(e.errno, e.strerror, str(path)) from None


def trim_log(path, step):
    """On resume, drop the log lines written after the checkpoint we resume from (they will be redone),
    and a last line cut short by a crash."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    cli.write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))  # never half a log

def _plain(args_dict):
    """argparse namespace -> JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(args_dict))


def _shown(value):
    """A recorded flag value as it is typed: ['IDR', 'MES'] -> IDR,MES."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _is_finite(model):
    return all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


# ----------------------------------------------------------------------------- the run folder
def lock_run(out):
    """Hold OUT/.lock (fcntl.flock) for the run's life: a second train.py on the same --out refuses at once.

    NOTE: the kernel drops a flock when its process ends, killed or not: a dead run never leaves a stale lock.
    Returns the file descriptor; closing it releases the lock.
    """
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process not yet named"
        os.close(fd)
        raise ValueError(f"{out} is in use by another train.py ({holder}); wait for it to end or pass "
                         f"another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def check_resume_args(recorded, args, last_path, step):
    """Refuse to resume last.pt under settings other than its own: its args.json would describe a run that
    never happened. Only the RESUMABLE flags may change."""
    now = _plain(vars(args))
    differ = [k for k in now if k not in RESUMABLE and k in recorded and recorded[k] != now[k]]
    if differ:
        changes = ", ".join(f"--{k.replace('_', '-')} {_shown(recorded[k])} -> {_shown(now[k])}" for k in differ)
        raise ValueError(f"{last_path} was trained with other settings ({changes}); rerun with the run's own flags "
                         f"to resume it, or pass another --out (train.py --help lists the flags that may change)")
    if args.iters < step:
        raise ValueError(f"--iters {args.iters} is below step {step} of {last_path}; resume with --iters >= {step} "
                         f"or pass another --out")


def load_resume(out, args, world):
    """OUT/last.pt checked against this command line, or None for a fresh run."""
    last_path = out / "last.pt"
    ckpt = load_checkpoint(last_path) if last_path.exists() else None
    if world > 1:  # every rank must resume from the same step, or the ranks drift apart and DDP hangs
        steps = [None] * world
        dist.all_gather_object(steps, ckpt["step"] if ckpt is not None else None)
        if len(set(steps)) > 1:
            raise ValueError(f"the ranks see different {last_path} (steps {steps}): --out must be on a "
                             f"filesystem shared by every node")
    if ckpt is not None:
        check_resume_args(ckpt.get("args") or {}, args, last_path, ckpt["step"])
    else:
        refuse_restart(out, args)
    return ckpt


def refuse_restart(out, args):
    """A folder holding a run but no last.pt (deleted: it is 3x best.pt) is never retrained from step 0
    over that run's files: one line saying what to do. Only a run that got no further than its first
    validation may start again (redone the same way, nothing is lost)."""
    best = out / "best.pt"
    kept = sorted((out / "snapshots").glob("step_*.pt"))
    if not best.exists():
        if kept:
            raise ValueError(f"{out} holds snapshots ({kept[-1].name}) but no last.pt to resume from; pass "
                             f"another --out, or move {out} away to train again from step 0")
        return
    ckpt = load_checkpoint(best)
    step = int(ckpt.get("step") or 0)
    check_resume_args(ckpt.get("args") or {}, args, best, step)  # another --train etc.: refused
    if step > min(args.val_every, args.iters) or kept:
        raise ValueError(f"{out} holds a run (best.pt at step {step}) but no last.pt to resume it from: "
                         f"training again would start at step 0 and replace its files; restore last.pt, pass "
                         f"another --out, or move {out} away to train again")


# Files only train.py writes in a run folder (the snapshots too): a temporary copy of one is a killed write.
RUN_FILES = ("last.pt", "best.pt", "args.json", "log.jsonl", "curves.png")


def remove_partial_writes(out):
    """Remove the temporary files of writes that a killed run left (cli.write_atomic's .NAME.XXXXXXXX.tmp;
    a checkpoint's is as large as the checkpoint). Call with OUT/.lock held."""
    for path in [*out.glob(".*.tmp"), *(out / "snapshots").glob(".*.tmp")]:
        if path.parent.name == "snapshots" or path.name[1:].rsplit(".", 2)[0] in RUN_FILES:
            path.unlink(missing_ok=True)


def finished_result(ckpt, args, out, master):
    """run()'s result for a run already finished at --iters (one line printed, nothing written), else None."""
    val = (ckpt or {}).get("val") or {}
    if ckpt is None or ckpt["step"] < args.iters or val.get("step") != ckpt["step"]:
        return None
    best = ckpt.get("best") or {}
    if master:
        print(f"{out} already finished at step {ckpt['step']} (best val {args.val_metric} "
              f"{best.get('value', float('nan')):.4f} at step {best.get('step')}); nothing to do")
    return {**val, "best": best.get("value"), "best_step": best.get("step"), "out": str(out), "finished": True}


def snapshot_path(out, step, pending=False):
    """OUT/snapshots/step_N.pt, or pending_step_N.pt for the weights of a validation not yet judged."""
    return out / "snapshots" / f"{'pending_' if pending else ''}step_{step:06d}.pt"


def val_loss_minima(history):
    """Steps of the validations whose loss is lower than both neighbours' (paper section 2.5)."""
    return {b["step"] for a, b, c in zip(history, history[1:], history[2:]) if b["loss"] < min(a["loss"], c["loss"])}


def settle_pending(out, history, keep_last, finished=False):
    """Judge the pending snapshots on disk against the validation history (its last keep_last + 2 records).

    The files of the last keep_last validations (at least the latest, whose neighbour is not known yet) wait;
    any other becomes step_N.pt if its validation was a local minimum of the loss, else it is removed (also
    the files of steps after last.pt that a killed run left behind: they are redone). finished: the waiting
    files are kept too, as step_N.pt: the last validations' weights, what SWA averages when the loss fell
    steadily. Idempotent: a run killed at any point settles the same way on resume.
    """
    waiting = {r["step"] for r in history[-max(1, keep_last):]}
    minima = val_loss_minima(history)
    for path in sorted((out / "snapshots").glob("pending_step_*.pt")):
        at = int(path.stem.rsplit("_", 1)[1])
        if at in waiting and not finished:
            continue
        if at in minima or (at in waiting and keep_last > 0):
            os.replace(path, snapshot_path(out, at))
        else:
            path.unlink()


# ----------------------------------------------------------------------------- setup
@dataclass
class RunState:
    """What a training run holds; the functions below read and update it (nanoGPT keeps these as globals)."""
    args: argparse.Namespace
    out: Path
    device: torch.device
    rank: int
    world: int
    val_sets: list = None
    n_train: int = 0  # training images of all training sets (args.json's n_train_images)
    cfg: ModelConfig = None
    raw_model: torch.nn.Module = None  # what checkpoints hold
    model: torch.nn.Module = None  # raw_model wrapped for training (SyncBN, compile, DDP)
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    scaler: object = None
    step: int = 0  # finished updates
    best: dict = field(default_factory=lambda: {"value": None, "step": None})
    history: list = field(default_factory=list)  # the last three validation records
    saved_step: int = None  # the step of OUT/last.pt on disk

    @property
    def master(self):
        return self.rank == 0

    @property
    def dtype(self):
        return DTYPES[self.args.dtype]


def setup_process(args):
    """Device and DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is rank 0 of 1.
    Returns (device, rank, world, own_group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = check_device(args.device)
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        # NOTE: long timeout: rank 0 may spend many minutes preparing the cache while the others wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return device, rank, world, own_group


def on_rank0(master, world, work):
    """work() on rank 0 only; a one-line error it raises stops every rank (the others would wait forever)."""
    result, failure = None, None
    if master:
        try:
            result = work()
        except (ValueError, FileNotFoundError) as e:
            if world == 1:
                raise
            failure = e
    if world > 1:
        box = [str(failure) if failure else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise failure if master else ValueError(box[0])
    return result


def load_data(s, train_ids):
    """Prepared caches (rank 0 prepares while the others wait) -> the training sets; sets s.val_sets, s.n_train."""
    args = s.args
    on_rank0(s.master, s.world, lambda: [prepare_cache(d, args.data_root, args.cache, args.resolution,
                                                       **data_options(args)) for d in train_ids])
    train_sets = [PreparedDataset(args.cache, d, args.resolution, "train") for d in train_ids]
    s.val_sets = [ds for ds in (PreparedDataset(args.cache, d, args.resolution, "val") for d in train_ids) if len(ds)]
    if not s.val_sets:
        raise ValueError(f"no validation images in the splits of {','.join(train_ids)} (see --splits)")
    s.n_train = sum(len(ds) for ds in train_sets)
    if s.n_train == 0:
        raise ValueError(f"no training images in the splits of {','.join(train_ids)} (see --splits)")
    return train_sets


def make_model(s, ckpt):
    """s.cfg, s.raw_model (last.pt's weights on resume: no pretrained download needed) and s.model."""
    args = s.args
    s.cfg = ModelConfig(encoder=args.encoder, pretrained=args.pretrained, decoder_channels=tuple(args.decoder_channels),
                        attention=args.decoder_attention, dropout=args.dropout, classes=len(LESIONS),
                        encoder_weights=args.encoder_weights, local_contrast=args.local_contrast)
    if args.style_condition != "off":
        s.cfg.style_tokens, s.cfg.token_styles, _ = style_tokens(args.style_condition, args.train, args.characterize)
    # NOTE: one decoder init for every seed (like the shared pretrained encoder): model soups average runs
    # that start from the same weights (Wortsman et al. 2022); seeds differ in patches and dropout.
    torch.manual_seed(args.init_seed)
    s.raw_model = build_model(s.cfg if ckpt is None else replace(s.cfg, pretrained=False, encoder_weights=None))
    if ckpt is not None:
        if architecture(ckpt["model_cfg"]) != architecture(asdict(s.cfg)):
            raise ValueError(f"{s.out / 'last.pt'} holds another architecture ({ckpt['model_cfg']['encoder']}, "
                             f"decoder {ckpt['model_cfg']['decoder_channels']}); use another --out")
        s.raw_model.load_state_dict(ckpt["model"])
    s.raw_model.to(s.device)
    if args.channels_last:
        s.raw_model.to(memory_format=torch.channels_last)
    s.model = s.raw_model
    if args.sync_bn and s.world > 1:
        s.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(s.model)  # shares raw_model's parameters
    if args.compile:
        s.model = torch.compile(s.model)  # before DDP, as nanoGPT
    if s.world > 1:
        s.model = DDP(s.model, device_ids=[s.device.index] if s.device.type == "cuda" else None)


def make_optimization(s):
    """s.optimizer, s.scheduler and s.scaler (float16 only), then the per-rank seeds of dropout."""
    args = s.args
    s.optimizer = make_optimizer(s.raw_model, args)
    s.scheduler = torch.optim.lr_scheduler.LambdaLR(s.optimizer, lambda step: lr_factor(step, args.warmup, args.iters))
    s.scaler = torch.amp.GradScaler(s.device.type, enabled=s.dtype == torch.float16)
    # Per-rank seeding for what draws from torch's RNG during training (dropout).
    torch.manual_seed(args.seed + s.rank)
    np.random.seed(args.seed + s.rank)
    random.seed(args.seed + s.rank)


def restore(s, ckpt):
    """Continue from last.pt: optimizer, scheduler, scaler, step, best, history, RNG, pending snapshot."""
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] and s.scaler.is_enabled():  # --dtype may change on resume
        s.scaler.load_state_dict(ckpt["scaler"])
    s.step, s.best, s.history = ckpt["step"], ckpt["best"], ckpt["history"]
    s.saved_step = ckpt["step"]
    rng = ckpt["rng"]
    if len(rng["torch"]) == s.world:
        torch.set_rng_state(rng["torch"][s.rank])
        if rng["cuda"] and s.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][s.rank], s.device)
    elif s.master:
        print(f"note: {s.out / 'last.pt'} was saved by {len(rng['torch'])} processes, now {s.world}: RNG "
              f"streams reseeded")
    if s.master and s.history:
        settle_pending(s.out, s.history, s.args.keep_last)
        latest = s.history[-1]
        if not snapshot_path(s.out, latest["step"], pending=True).exists():
            # last.pt of a validation step holds the pending weights itself; a last.pt of the older format
            # saved by --stop-at carries them as "candidate".
            if ckpt["step"] == latest["step"]:
                save_pending(s, latest)
            elif ckpt.get("candidate") is not None:
                save_pending(s, latest, state=ckpt["candidate"])
    if s.master:
        print(f"resuming {s.out} from step {s.step}")


# ----------------------------------------------------------------------------- checkpoints
def run_args(s):
    """The run's settings as saved in args.json and in every checkpoint's "args"."""
    return {**_plain(vars(s.args)), "n_train_images": s.n_train}


def validated_now(s):
    """The record of a validation at the current step, else None."""
    return s.history[-1] if s.history and s.history[-1]["step"] == s.step else None


def make_checkpoint(s, kind, record, extra=None, state=None):
    """The house checkpoint dict for the weights of validation `record` (None: this step, unvalidated).

    Optimizer, scheduler and scaler state only in last.pt, the one a run resumes from.
    """
    at = record["step"] if record else s.step
    last = kind == "last"
    return {"model": state if state is not None else s.raw_model.state_dict(), "model_cfg": asdict(s.cfg),
            "args": run_args(s), "step": at, "epoch": at * s.args.batch * s.world // s.n_train,
            "optimizer": s.optimizer.state_dict() if last else None,
            "scheduler": s.scheduler.state_dict() if last else None,
            "scaler": s.scaler.state_dict() if last and s.scaler.is_enabled() else None,
            "metric": record["metric"] if record else float("nan"), "version": 1, "val": record, **(extra or {})}


def save_last(s):
    """OUT/last.pt: everything a resume needs. Every rank takes part in gathering the RNG states; rank 0 writes."""
    cuda = s.device.type == "cuda"
    states = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(s.device) if cuda else None}
    gathered = [states]
    if s.world > 1:
        gathered = [None] * s.world
        dist.all_gather_object(gathered, states)
    with ctrl_c_deferred():  # a Ctrl-C here finds last.pt and saved_step (which the resume line names) agreeing
        if s.master:
            rng = {"torch": [g["torch"] for g in gathered], "cuda": [g["cuda"] for g in gathered] if cuda else None}
            save_checkpoint(s.out / "last.pt", make_checkpoint(s, "last", validated_now(s),
                                                               {"best": s.best, "history": s.history, "rng": rng}))
        s.saved_step = s.step


def save_pending(s, record, state=None):
    """The weights of validation `record` as snapshots/pending_step_N.pt, until the next validation judges
    them (settle_pending). The file is already the snapshot that a local minimum or the end keeps."""
    periodic = s.args.snapshot_every and record["step"] % s.args.snapshot_every == 0  # also kept as step_N.pt
    why = "every+validation" if periodic else "validation"
    save_checkpoint(snapshot_path(s.out, record["step"], pending=True),
                    make_checkpoint(s, "snapshot", record, {"snapshot": why}, state=state))


def save_snapshot(s):
    """The periodic snapshots/step_N.pt of --snapshot-every."""
    check_finite(s)
    if s.master:
        save_checkpoint(snapshot_path(s.out, s.step), make_checkpoint(s, "snapshot", validated_now(s),
                                                                      {"snapshot": "every"}))


def diverged(s, what, value, at):
    last = s.out / "last.pt"
    good = f"{last} is the last good checkpoint" if last.exists() else "no checkpoint was written"
    return ValueError(f"{what} is {value} at step {at}: training diverged; lower --lr (now {s.args.lr:g}, in "
                      f"another --out) or resume with --dtype float32; {good}")


def check_finite(s):
    # Called on every rank before weights are saved: a blown-up model is never written.
    if not _is_finite(s.raw_model):
        raise diverged(s, "a weight", "not finite", s.step)


# ----------------------------------------------------------------------------- validation
def check_val_metric(s):
    """--val-metric must name a score that validate() gives: tried on one validation image before training."""
    if s.args.val_metric != "loss":
        one = Subset(s.val_sets[0], [0])
        selection_value(validate(s.raw_model, [one], s.device, s.dtype, s.args.loss, s.args.lesions), s.args.val_metric)


def validate_and_save(s, on_validate=None):
    """Validate, then write the pending snapshot, best.pt, the log line and last.pt; then call on_validate."""
    check_finite(s)
    metrics = validate(s.raw_model, s.val_sets, s.device, s.dtype, s.args.loss, s.args.lesions)
    if not math.isfinite(metrics["loss"]):
        raise diverged(s, "the validation loss", metrics["loss"], s.step)
    metric = selection_value(metrics, s.args.val_metric)
    record = {"step": s.step, "metric": metric, **metrics}
    better = is_better(s.args.val_metric, metric, s.best["value"])
    if better:
        s.best.update(value=metric, step=s.step)
    s.history.append(record)
    waiting = max(1, s.args.keep_last)  # validations whose files wait (settle_pending)
    del s.history[:-(waiting + 2)]  # the waiting validations and the neighbours that judge the one before
    minimum = next(iter(val_loss_minima(s.history[-3:])), None)  # the previous validation, if a minimum
    judged = s.history[-waiting - 1]["step"] if len(s.history) > waiting else None  # its file settles now
    if s.master:
        save_pending(s, record)
        settle_pending(s.out, s.history, s.args.keep_last)
        if judged in val_loss_minima(s.history) and not snapshot_path(s.out, judged).exists():
            print(f"warning: {snapshot_path(s.out, judged, pending=True)} is gone: no snapshot of the "
                  f"validation-loss minimum at step {judged}", file=sys.stderr)
        if better:
            save_checkpoint(s.out / "best.pt", make_checkpoint(s, "best", record))
        append_log(s.out / "log.jsonl", {"step": s.step, "split": "val", "loss": metrics["loss"],
                                         "mean_aupr": metrics["mean_aupr"], "mean_ap": metrics["mean_ap"],
                                         "mean_dice": metrics["mean_dice"], "aupr": dict(zip(LESIONS, metrics["aupr"])),
                                         "ap": dict(zip(LESIONS, metrics["ap"])),
                                         "dice": dict(zip(LESIONS, metrics["dice"])), "best": better,
                                         "minimum_at": minimum})
        tqdm.write(validation_line(s, record, better))
        refresh_curves(s.out)  # OUT/curves.png from log.jsonl (a failure to draw is a warning, not the end)
    save_last(s)
    if on_validate is not None:
        on_validate(s.step, dict(record))


def validation_line(s, record, better):
    """One line per validation, printed above the progress bar."""
    dice = " ".join(f"{name} {v:.3f}" for name, v in zip(LESIONS, record["dice"]))
    best = "new best" if better else f"best {s.best['value']:.4f} at step {s.best['step']}"
    return (f"step {record['step']}: val loss {record['loss']:.4f}, Dice {dice}; {s.args.val_metric} "
            f"{record['metric']:.4f} ({best})")


def summary_line(s):
    """The run's last line: where its results are."""
    kept = len(list((s.out / "snapshots").glob("step_*.pt")))
    return (f"done: {s.step} steps; best val {s.args.val_metric} {s.best['value']:.4f} at step {s.best['step']} in "
            f"{s.out / 'best.pt'}; {kept} snapshots in {s.out / 'snapshots'}; curves in {s.out / 'curves.png'}")


# ----------------------------------------------------------------------------- the step loop
class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, carrying the line that says how to resume (still a KeyboardInterrupt: tune.py
    catches those)."""


def train_step(s, batch):
    """One optimizer update on one batch -> (mean loss over ranks, learning rate used)."""
    args, device = s.args, s.device
    images = batch["image"].to(device, non_blocking=True).float().div_(255)  # (B, 3, P, P) in [0, 1]
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = batch["masks"].to(device, non_blocking=True).float()  # (B, 4, P, P) 0/1
    fov = batch["fov"].to(device, non_blocking=True)  # (B, P, P) bool
    with torch.autocast(device.type, dtype=s.dtype, enabled=s.dtype != torch.float32):
        # a style-conditioned model gets each patch's token (its dataset's style), (B,) int64
        style = batch["style"].to(device, non_blocking=True) if "style" in batch else None
        logits = s.model(images) if style is None else s.model(images, style=style)  # (B, 4, P, P)
    trained = lesion_channels(args.lesions)
    loss = compute_loss(logits.float()[:, trained], masks[:, trained], fov, args.loss)
    # The mean loss over ranks: logged, and checked on every rank so that all stop together,
    # before the update, so a NaN never reaches the weights.
    loss_value = loss.detach().clone()
    if s.world > 1:
        dist.all_reduce(loss_value)
        loss_value /= s.world
    loss_value = loss_value.item()
    if not math.isfinite(loss_value):
        raise diverged(s, "the training loss", loss_value, s.step + 1)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    lr = s.optimizer.param_groups[0]["lr"]
    s.scheduler.step()
    s.step += 1
    return loss_value, lr


def train_steps(s, loader, bar, on_validate):
    """Steps from s.step to --iters, validating and saving on the way; False when --stop-at ended them early."""
    args = s.args
    tic, seen, running = time.perf_counter(), 0, []
    s.model.train()
    for batch in loader:
        loss_value, lr = train_step(s, batch)
        running.append(loss_value)
        seen += args.batch * s.world
        rate = seen / max(time.perf_counter() - tic, 1e-9)
        bar.update(1)
        val = f"{s.history[-1]['loss']:.4f}" if s.history else "-"
        bar.set_postfix({"loss": f"{loss_value:.4f}", "val": val, "lr": f"{lr:.2e}", "patches/s": f"{rate:.1f}"},
                        refresh=False)
        if s.master and (s.step % args.log_every == 0 or s.step == args.iters):
            append_log(s.out / "log.jsonl", {"step": s.step, "split": "train", "loss": sum(running) / len(running),
                                             "lr": lr, "patches_per_s": rate})
            running = []
        if s.step % args.val_every == 0 or s.step == args.iters:
            validate_and_save(s, on_validate)
            tic, seen = time.perf_counter(), 0  # patches/s measures training only
        if args.snapshot_every and s.step % args.snapshot_every == 0:
            save_snapshot(s)
            tic, seen = time.perf_counter(), 0
        if args.stop_at is not None and args.stop_at <= s.step < args.iters:
            if validated_now(s) is None:
                check_finite(s)
                save_last(s)
            return False
    return True


def interrupted_line(s):
    if s.saved_step is None:
        return f"interrupted at step {s.step}, before the first checkpoint; rerun the same command to start again"
    return (f"interrupted at step {s.step}; rerun the same command to resume from {s.out / 'last.pt'} "
            f"(saved at step {s.saved_step})")


# ----------------------------------------------------------------------------- the run
def start(s, train_ids, ckpt):
    """Data, model, optimisation and resume state of an accepted run; writes args.json. Returns the loader."""
    train_sets = load_data(s, train_ids)
    make_model(s, ckpt)
    make_optimization(s)
    if ckpt is not None:
        restore(s, ckpt)
    check_val_metric(s)
    if s.master:
        text = json.dumps(run_args(s), indent=2) + "\n"
        cli.write_atomic(s.out / "args.json", lambda tmp: tmp.write_text(text))
        trim_log(s.out / "log.jsonl", s.step)
    # Batches: each rank reads its own slice of the global patch stream, from the current step on.
    args = s.args
    token_of = style_tokens(args.style_condition, train_ids, args.characterize)[2]  # {dataset: token}, {} when off
    patches = PatchDataset(train_sets, patch=args.patch, length=args.iters * args.batch * s.world, seed=args.seed,
                           lesion_patches=args.lesion_patches, lesions=args.lesions,
                           augment_p=args.augment_p, rotate=args.rotate,
                           styles=[token_of[d] for d in train_ids] if token_of else None)
    sampler = StepSampler(s.step, args.iters, args.batch, s.rank, s.world)
    return DataLoader(patches, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                      pin_memory=s.device.type == "cuda",
                      generator=torch.Generator())  # NOTE: own generator: leaves the global RNG stream alone


def result(s, finished):
    return {**(s.history[-1] if s.history else {}), "best": s.best["value"], "best_step": s.best["step"],
            "out": str(s.out), "finished": finished}


def train_run(s, train_ids, ckpt, on_validate):
    """Set up the accepted run, train to --iters (or --stop-at), and say where the results are."""
    loader = start(s, train_ids, ckpt)
    del ckpt
    bar = tqdm(total=s.args.iters, initial=s.step, disable=not s.master, dynamic_ncols=True,
               desc=combo_name(train_ids))
    try:
        finished = train_steps(s, loader, bar, on_validate)
        if finished and validated_now(s) is None:  # e.g. --iters raised on a finished run: the final validation
            validate_and_save(s, on_validate)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        raise Interrupted(interrupted_line(s)) from None
    finally:
        bar.close()
    if not finished:
        if s.master:
            print(f"stopped at step {s.step} (--stop-at); rerun without it to continue from {s.out / 'last.pt'}")
        return result(s, finished=False)
    if s.master:
        # The last validations' weights are kept (--keep-last); they stay snapshots if --iters grows later.
        settle_pending(s.out, s.history, s.args.keep_last, finished=True)
        print(summary_line(s))
    return result(s, finished=True)


def run(args, on_validate=None):
    """Train (or resume) the run described by `args` (from parse_args); returns the last validation.

    Returns {"step", "metric" (the --val-metric value), "loss", "mean_aupr", "mean_dice", "aupr": [4],
    "dice": [4], "best", "best_step", "out", "finished"}; AUPR / Dice are NaN for a lesion absent from
    the validation images. on_validate(step, metrics) is called after every validation with the same
    keys, once the checkpoints are written; an exception it raises (e.g. optuna.TrialPruned) propagates.
    Ctrl-C raises Interrupted (a KeyboardInterrupt) whose message says how to resume.
    """
    train_ids = parse_dataset_ids(",".join(args.train) if isinstance(args.train, (list, tuple)) else args.train)
    out = Path(args.out or os.path.join("runs", combo_name(train_ids), f"s{args.seed}"))
    device, rank, world, own_group = setup_process(args)
    master = rank == 0
    lock = None
    try:
        # Read-only checks first: a finished run, or a resume under other settings, leaves its folder untouched.
        ckpt = load_resume(out, args, world)
        done = finished_result(ckpt, args, out, master)
        if done is not None:
            return done
        lock = on_rank0(master, world, lambda: lock_run(out))
        if master:
            remove_partial_writes(out)
        ckpt = load_resume(out, args, world)  # NOTE: again, now that it is ours: a run may have ended meanwhile
        done = finished_result(ckpt, args, out, master)
        if done is not None:
            return done
        return train_run(RunState(args, out, device, rank, world), train_ids, ckpt, on_validate)
    finally:
        if lock is not None:
            os.close(lock)
        if own_group:
            dist.destroy_process_group()


def main():
    run(parse_args())


if __name__ == "__main__":
    cli.run(main)
