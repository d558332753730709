r"""Train the U-Net of Playout & Cheriet on any combination of the five lesion datasets.

    python train.py --train IDR,MES --data-root data_raw --out runs/IDR+MES/s0 --seed 0
    python train.py --train IDR --data-root demo/data --encoder test_resnet --no-pretrained \
        --resolution 128 --patch 64 --batch 4 --iters 200 --val-every 50 --device cpu       # toy scale, CPU
    torchrun --standalone --nproc-per-node 4 train.py --train IDR,DDR,MES --data-root data_raw --sync-bn
    python train.py --train IDR,MES --data-root data_raw --seed 0     # rerun: resumes from runs/IDR+MES/s0/last.pt

Rerunning the same command resumes from OUT/last.pt (model, optimizer, scheduler, scaler, step, RNG);
a finished run prints one line and exits. tune.py calls build_parser() / parse_args() / run() in-process.
"""
import argparse
import datetime
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from data import (LESIONS, PatchDataset, PreparedDataset, add_data_args, combo_name, data_options, parse_dataset_ids,
                  prepare_cache)
from jsonio import null_nan
from kernels import pr_metrics
from model import ModelConfig, architecture, build_model, load_checkpoint, save_checkpoint
from protocol import DTYPES, nanmean, pooled_counts

HIGHER_IS_BETTER = {"aupr": True, "dice": True, "loss": False}


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
    g.add_argument("--train", required=True,
                   help="datasets to train on, comma-separated, any order: IDR,DDR,FGA,RET,MES (required)")
    g.add_argument("--out", default=None, help="run directory (default: runs/<COMBO>/s<SEED>)")
    g.add_argument("--seed", type=int, default=0, help="seed of the patch stream and dropout (default: %(default)s)")
    g.add_argument("--init-seed", type=int, default=0,
                   help="seed of the decoder's random init, shared across --seed values so that runs of one "
                        "combination can be souped (average.py soup) (default: %(default)s)")
    add_data_args(p)  # --data-root, --cache, --root, --mask-threshold, --splits, --ret-he, --split-seed

    g = p.add_argument_group("model")
    g.add_argument("--encoder", default="legacy_seresnet101.in1k",
                   help="timm encoder with features_only support (default: %(default)s)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the encoder's ImageNet weights, downloaded from the hub (default: %(default)s)")
    g.add_argument("--encoder-weights", default=None,
                   help="local encoder weights file, used instead of the hub (default: %(default)s)")
    g.add_argument("--decoder-channels", type=_channels, default=(256, 128, 64, 32, 16),
                   help="decoder block widths, deepest first (default: 256,128,64,32,16)")
    g.add_argument("--decoder-attention", action="store_true",
                   help="scSE attention in the decoder blocks (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.0, help="channel dropout before the head (default: %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--resolution", type=int, default=1536,
                   help="side of the prepared square images (default: %(default)s)")
    g.add_argument("--patch", type=int, default=512, help="side of the random training patches (default: %(default)s)")
    g.add_argument("--batch", type=int, default=8, help="patches per step per process (default: %(default)s)")
    g.add_argument("--iters", type=int, default=20000, help="optimizer steps in total (default: %(default)s)")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adamw",
                   help="adam, adamw (decoupled weight decay) or sgd (momentum 0.9, Nesterov) (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=1e-2,
                   help="on conv/linear weights only (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=500,
                   help="linear warmup steps before the cosine decay to 0 (default: %(default)s)")
    g.add_argument("--loss", choices=("bce", "dice", "bce+dice"), default="bce+dice",
                   help="per-pixel BCE, soft Dice, or their sum, inside the FOV only (default: %(default)s)")

    g = p.add_argument_group("validation and checkpoints")
    g.add_argument("--val-every", type=int, default=1000,
                   help="validate and save last.pt every N steps, and at the end (default: %(default)s)")
    g.add_argument("--val-metric", choices=("aupr", "dice", "loss"), default="aupr",
                   help="validation metric (mean over lesions) that best.pt follows (default: %(default)s)")
    g.add_argument("--snapshot-every", type=int, default=0,
                   help="also keep snapshots/step_N.pt every N steps; 0: only at validation-loss minima "
                        "(default: %(default)s)")
    g.add_argument("--stop-at", type=int, default=None,
                   help="save last.pt and exit at this step (time-limited jobs); rerun without it to resume "
                        "(default: %(default)s)")
    g.add_argument("--log-every", type=int, default=10,
                   help="training-loss lines in log.jsonl every N steps (default: %(default)s)")

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
    """Parse and check the command line; user errors raise a one-line ValueError."""
    args = build_parser().parse_args(argv)
    args.train = parse_dataset_ids(args.train)
    for flag in ("resolution", "patch", "batch", "iters", "val_every", "log_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.patch > args.resolution:
        raise ValueError(f"--patch {args.patch} is larger than --resolution {args.resolution}")
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


def validate(model, val_sets, device, dtype, loss_kind):
    """Validation loss, per-lesion AUPR and Dice on full images at the training resolution.

    One pass of protocol.count_dataset: AUPR / Dice pool the counts of all images of all validation
    sets (the evaluation protocol); the loss, from the same probabilities, is the mean over images.
    """
    losses = []

    def image_loss(ids, probs, items):  # probs (1, 4, R, R) float32
        masks = torch.from_numpy(np.stack([it["masks"] for it in items])).to(probs.device).float()  # (1, 4, R, R)
        fov = torch.from_numpy(np.stack([it["fov"] for it in items])).to(probs.device)  # (1, R, R)
        losses.append(compute_loss(probs, masks, fov, loss_kind, probs=True))  # stays on the device

    tp, fp, pos = pooled_counts([model], val_sets, device, dtype=dtype, on_batch=image_loss)
    m = pr_metrics(tp, fp, pos)
    aupr, dice = [float(v) for v in m["aupr"]], [float(v) for v in m["dice"]]
    return {"loss": torch.stack(losses).mean().item(), "mean_aupr": nanmean(aupr), "mean_dice": nanmean(dice),
            "aupr": aupr, "dice": dice}


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(null_nan(record)) + "\n")


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
    path.write_text("".join(line + "\n" for line in keep))


def _plain(args_dict):
    """argparse namespace -> JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(args_dict))


def _cpu_state(model):
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _is_finite(model):
    return all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


# ----------------------------------------------------------------------------- the run
def run(args, on_validate=None):
    """Train (or resume) the run described by `args` (from parse_args); returns the last validation.

    Returns {"step", "metric" (the --val-metric value), "loss", "mean_aupr", "mean_dice", "aupr": [4],
    "dice": [4], "best", "best_step", "out", "finished"}; AUPR / Dice are NaN for a lesion absent from
    the validation images. on_validate(step, metrics) is called after every validation with the same
    keys, once the checkpoints are written; an exception it raises (e.g. optuna.TrialPruned) propagates.
    """
    train_ids = parse_dataset_ids(",".join(args.train) if isinstance(args.train, (list, tuple)) else args.train)
    out = Path(args.out or os.path.join("runs", combo_name(train_ids), f"s{args.seed}"))

    # DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is rank 0 of 1.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    ddp = world > 1
    device = torch.device(args.device)
    if ddp and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    own_group = ddp and not dist.is_initialized()
    if own_group:
        # NOTE: long timeout: rank 0 may spend many minutes preparing the cache while the others wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    master = rank == 0
    try:
        return _run(args, train_ids, out, device, rank, world, master, on_validate)
    finally:
        if own_group:
            dist.destroy_process_group()


def _run(args, train_ids, out, device, rank, world, master, on_validate):
    dtype = DTYPES[args.dtype]
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Resume: the same command on a run directory with last.pt continues from it.
    ckpt = None
    last_path = out / "last.pt"
    if last_path.exists():
        ckpt = load_checkpoint(last_path)
    if world > 1:  # every rank must resume from the same step, or the ranks drift apart and DDP hangs
        steps = [None] * world
        dist.all_gather_object(steps, ckpt["step"] if ckpt is not None else None)
        if len(set(steps)) > 1:
            raise ValueError(f"the ranks see different {last_path} (steps {steps}): --out must be on a "
                             f"filesystem shared by every node")
    if ckpt is not None:
        val = ckpt.get("val") or {}
        if ckpt["step"] >= args.iters and val.get("step") == ckpt["step"]:
            best = ckpt.get("best") or {}
            if master:
                print(f"{out} already finished at step {ckpt['step']} (best val {args.val_metric} "
                      f"{best.get('value', float('nan')):.4f} at step {best.get('step')}); nothing to do")
            return {**val, "best": best.get("value"), "best_step": best.get("step"), "out": str(out), "finished": True}

    # Data: prepared caches (rank 0 prepares while the others wait, and tells them if it failed).
    failure = None
    if master:
        try:
            for ds_id in train_ids:
                prepare_cache(ds_id, args.data_root, args.cache, args.resolution, **data_options(args))
        except (ValueError, FileNotFoundError) as e:
            if world == 1:
                raise
            failure = e
    if world > 1:
        box = [str(failure) if failure else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise failure if master else ValueError(box[0])
    train_sets = [PreparedDataset(args.cache, d, args.resolution, "train") for d in train_ids]
    val_sets = [ds for ds in (PreparedDataset(args.cache, d, args.resolution, "val") for d in train_ids) if len(ds)]
    if not val_sets:
        raise ValueError(f"no validation images in the splits of {','.join(train_ids)} (see --splits)")
    n_train = sum(len(ds) for ds in train_sets)
    if n_train == 0:
        raise ValueError(f"no training images in the splits of {','.join(train_ids)} (see --splits)")

    # Model: the same init on every rank; a resumed run needs no pretrained download.
    cfg = ModelConfig(encoder=args.encoder, pretrained=args.pretrained, decoder_channels=tuple(args.decoder_channels),
                      attention=args.decoder_attention, dropout=args.dropout, classes=len(LESIONS),
                      encoder_weights=args.encoder_weights)
    # NOTE: one decoder init for every seed (like the shared pretrained encoder): model soups average runs
    # that start from the same weights (Wortsman et al. 2022); seeds differ in patches and dropout.
    torch.manual_seed(args.init_seed)
    raw_model = build_model(cfg if ckpt is None else replace(cfg, pretrained=False, encoder_weights=None))
    if ckpt is not None:
        if architecture(ckpt["model_cfg"]) != architecture(asdict(cfg)):
            raise ValueError(f"{last_path} holds another architecture ({ckpt['model_cfg']['encoder']}, "
                             f"decoder {ckpt['model_cfg']['decoder_channels']}); use another --out")
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(device)
    if args.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    model = raw_model
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # shares raw_model's parameters
    if args.compile:
        model = torch.compile(model)  # before DDP, as nanoGPT
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = make_optimizer(raw_model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.iters))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # only float16 needs it
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # Per-rank seeding for what draws from torch's RNG during training (dropout).
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    # history: the last three validations (dicts); candidate: the weights of the latest one, kept
    # until the next validation tells whether its loss was a local minimum.
    step, best, history, candidate = 0, {"value": None, "step": None}, [], None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        step, best, history = ckpt["step"], ckpt["best"], ckpt["history"]
        if master and history:
            # last.pt of a validation step holds the candidate itself; one saved by --stop-at carries it.
            candidate = ckpt["candidate"] if ckpt["candidate"] is not None else _cpu_state(raw_model)
        rng = ckpt["rng"]
        if len(rng["torch"]) == world:
            torch.set_rng_state(rng["torch"][rank])
            if rng["cuda"] and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"][rank], device)
        elif master:
            print(f"note: {last_path} was saved by {len(rng['torch'])} processes, now {world}: RNG streams reseeded")
        if master:
            print(f"resuming {out} from step {step}")
    del ckpt

    def validated_now():
        """The record of a validation at the current step, else None."""
        return history[-1] if history and history[-1]["step"] == step else None

    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(_plain(vars(args)), indent=2) + "\n")
        trim_log(out / "log.jsonl", step)

    def checkpoint(kind, record, extra=None, state=None):
        """The contract's checkpoint dict for the weights of validation `record` (None: this step, unvalidated).

        Optimizer, scheduler and scaler state only in last.pt, the one a run resumes from.
        """
        at = record["step"] if record else step
        return {"model": state if state is not None else raw_model.state_dict(), "model_cfg": asdict(cfg),
                "args": _plain(vars(args)), "step": at, "epoch": at * args.batch * world // n_train,
                "optimizer": optimizer.state_dict() if kind == "last" else None,
                "scheduler": scheduler.state_dict() if kind == "last" else None,
                "scaler": scaler.state_dict() if kind == "last" and scaler.is_enabled() else None,
                "metric": record["metric"] if record else float("nan"), "version": 1, "val": record, **(extra or {})}

    def save_last():
        # Every rank takes part in gathering the RNG states; only rank 0 writes.
        cuda = device.type == "cuda"
        states = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}
        gathered = [states]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, states)
        if not master:
            return
        rng = {"torch": [g["torch"] for g in gathered],
               "cuda": [g["cuda"] for g in gathered] if cuda else None}
        # --stop-at between validations: the candidate is older than these weights and travels along.
        keep = candidate if history and history[-1]["step"] != step else None
        save_checkpoint(last_path, checkpoint("last", validated_now(),
                                              {"best": best, "history": history, "rng": rng, "candidate": keep}))

    def diverged(what, value, at):
        good = f"{last_path} is the last good checkpoint" if last_path.exists() else "no checkpoint was written"
        return ValueError(f"{what} is {value} at step {at}: training diverged; lower --lr (now {args.lr:g}) "
                          f"or use --dtype float32; {good}")

    def check_finite():
        # Called on every rank before weights are saved: a blown-up model is never written.
        if not _is_finite(raw_model):
            raise diverged("a weight", "not finite", step)

    def validate_and_save():
        nonlocal candidate
        check_finite()
        metrics = validate(raw_model, val_sets, device, dtype, args.loss)
        if not math.isfinite(metrics["loss"]):
            raise diverged("the validation loss", metrics["loss"], step)
        metric = metrics["loss"] if args.val_metric == "loss" else metrics[f"mean_{args.val_metric}"]
        record = {"step": step, "metric": metric, **metrics}
        better = best["value"] is None or (math.isnan(best["value"]) and not math.isnan(metric)) or \
            (metric > best["value"] if HIGHER_IS_BETTER[args.val_metric] else metric < best["value"])
        if better:
            best.update(value=metric, step=step)
        # Paper section 2.5: keep the weights of a validation whose loss is lower than both neighbours'.
        history.append(record)
        del history[:-3]
        minimum = len(history) == 3 and history[1]["loss"] < min(history[0]["loss"], history[2]["loss"])
        if master:
            if minimum:
                at = history[1]["step"]
                periodic = args.snapshot_every and at % args.snapshot_every == 0  # also kept as step_N.pt
                why = "every+val-loss-minimum" if periodic else "val-loss-minimum"
                save_checkpoint(out / "snapshots" / f"step_{at:06d}.pt",
                                checkpoint("snapshot", history[1], {"snapshot": why}, state=candidate))
            if better:
                save_checkpoint(out / "best.pt", checkpoint("best", record))
            append_log(out / "log.jsonl", {"step": step, "split": "val", "loss": metrics["loss"],
                                           "mean_aupr": metrics["mean_aupr"], "mean_dice": metrics["mean_dice"],
                                           "aupr": dict(zip(LESIONS, metrics["aupr"])),
                                           "dice": dict(zip(LESIONS, metrics["dice"])), "best": better,
                                           "minimum_at": history[1]["step"] if minimum else None})
            candidate = _cpu_state(raw_model)
        save_last()
        if on_validate is not None:
            on_validate(step, dict(record))

    def save_snapshot():
        check_finite()
        if master:
            save_checkpoint(out / "snapshots" / f"step_{step:06d}.pt",
                            checkpoint("snapshot", validated_now(), {"snapshot": "every"}))

    # Batches: each rank reads its own slice of the global patch stream, from the current step on.
    patches = PatchDataset(train_sets, patch=args.patch, length=args.iters * args.batch * world, seed=args.seed)
    loader = DataLoader(patches, batch_size=args.batch, sampler=StepSampler(step, args.iters, args.batch, rank, world),
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # NOTE: own generator: leaves the global RNG stream alone

    def result(finished):
        return {**(history[-1] if history else {}), "best": best["value"], "best_step": best["step"],
                "out": str(out), "finished": finished}

    bar = tqdm(total=args.iters, initial=step, disable=not master, dynamic_ncols=True, desc=combo_name(train_ids))
    model.train()
    tic, seen, running = time.perf_counter(), 0, []
    try:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).float().div_(255)  # (B, 3, P, P) in [0, 1]
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks = batch["masks"].to(device, non_blocking=True).float()  # (B, 4, P, P) 0/1
            fov = batch["fov"].to(device, non_blocking=True)  # (B, P, P) bool
            with autocast:
                logits = model(images)  # (B, 4, P, P)
            loss = compute_loss(logits.float(), masks, fov, args.loss)
            # The mean loss over ranks: logged, and checked on every rank so that all stop together,
            # before the update, so a NaN never reaches the weights.
            loss_value = loss.detach().clone()
            if world > 1:
                dist.all_reduce(loss_value)
                loss_value /= world
            loss_value = loss_value.item()
            if not math.isfinite(loss_value):
                raise diverged("the training loss", loss_value, step + 1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1

            running.append(loss_value)
            seen += args.batch * world
            rate = seen / max(time.perf_counter() - tic, 1e-9)
            bar.update(1)
            bar.set_postfix({"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "patches/s": f"{rate:.1f}"}, refresh=False)
            if master and (step % args.log_every == 0 or step == args.iters):
                append_log(out / "log.jsonl", {"step": step, "split": "train", "loss": sum(running) / len(running),
                                               "lr": lr, "patches_per_s": rate})
                running = []
            if step % args.val_every == 0 or step == args.iters:
                validate_and_save()
                tic, seen = time.perf_counter(), 0  # patches/s measures training only
            if args.snapshot_every and step % args.snapshot_every == 0:
                save_snapshot()
                tic, seen = time.perf_counter(), 0
            if args.stop_at is not None and args.stop_at <= step < args.iters:
                if validated_now() is None:
                    check_finite()
                    save_last()
                if master:
                    bar.close()
                    print(f"stopped at step {step} (--stop-at); rerun without it to continue from {last_path}")
                return result(finished=False)
    finally:
        bar.close()
    if validated_now() is None:  # e.g. --iters raised on a finished run: only the final validation is left
        validate_and_save()
    return result(finished=True)


def main():
    run(parse_args())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        # NOTE: an error raised in a DataLoader worker comes back with the worker's traceback in its message
        sys.exit(f"error: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
