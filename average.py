"""Weight averaging (SWA, model soups) and ensembles over saved checkpoints, per part (paper section 2.5, eq. 1-3).

    python average.py swa runs/IDR+MES/s0 -o runs/IDR+MES/s0/swa.pt --last 5
    python average.py soup runs/IDR+MES/s*/best.pt -o runs/IDR+MES/soup.pt --greedy --part decoder
    python average.py ensemble runs/IDR+MES/s[0-3]/best.pt -o runs/IDR+MES/ensemble.pt
    python average.py fig4 runs/IDR+MES --test IDR,DDR,FGA,RET,MES -o runs/IDR+MES/fig4.json --data-root data_raw

swa and soup write a training-format checkpoint (evaluate.py and average.py take it unchanged) whose
"provenance" records the method, ingredients, weights, part, BatchNorm mode and reference; ensemble writes
{"kind": "ensemble", "members": [...]} that evaluate.py / model.load_models read as k models whose sigmoid
probabilities are averaged. Checkpoints are streamed one at a time and summed in float64 on the CPU.
Validation scores (greedy soups, --reference best) and BatchNorm recomputation read the training
combination's own validation / training splits (never test), with the data options recorded in the
checkpoint's args unless given here.
"""
import argparse
import itertools
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

import data
from data import DATASET_IDS, combo_name
from evaluate import evaluate_checkpoints
from jsonio import write_json
from kernels import pr_metrics
from model import ARCH_FIELDS, load_checkpoint, load_models, save_checkpoint
from protocol import default_device, pooled_counts

PARTS = ("encoder", "decoder", "full")


def in_part(key, part):
    """Is state-dict key averaged under --part? encoder = "encoder.*", decoder = every other key (decoder + head)."""
    if part == "full":
        return True
    return key.startswith("encoder.") == (part == "encoder")


def _float_key(value):
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def check_same_architecture(first_path, first, path, ckpt):
    """ValueError naming `path` and the first key where its architecture or state dict differs from `first`."""
    if ckpt.get("kind") == "ensemble":
        raise ValueError(f"{path} is an ensemble file: average training checkpoints (or their snapshots) instead")
    where = f"{path} does not match {first_path}"
    for field in ARCH_FIELDS:
        a, b = first["model_cfg"].get(field), ckpt["model_cfg"].get(field)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise ValueError(f"{where}: model_cfg key {field!r} is {b!r}, not {a!r}")
    # NOTE: a soup averages runs of one training combination (issue / paper eq. 3); its validation splits
    # and BatchNorm patches come from the first ingredient's combination.
    for field in ("train", "resolution"):
        a, b = ((c.get("args") or {}).get(field) for c in (first, ckpt))
        if a is not None and b is not None and a != b:
            raise ValueError(f"{where}: trained with {field} {b!r}, not {a!r} (average runs of one combination)")
    ref, sd = first["model"], ckpt["model"]
    for k, v in ref.items():
        if k not in sd:
            raise ValueError(f"{where}: state dict lacks key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: key {k!r} has shape {tuple(sd[k].shape)}, not {tuple(v.shape)}")
        if sd[k].is_floating_point() != v.is_floating_point():
            raise ValueError(f"{where}: key {k!r} has dtype {sd[k].dtype}, not {v.dtype}")
    extra = [k for k in sd if k not in ref]
    if extra:
        raise ValueError(f"{where}: unexpected state dict key {extra[0]!r}")


# ---------------------------------------------------------------------------------------------------------
# Averages (eq. 2 and 3) and ensembles (eq. 1)
# ---------------------------------------------------------------------------------------------------------
def average_checkpoints(paths, part="full", reference=None, method="average"):
    """Uniform average of the checkpoints' `part` tensors; everything else from `reference` -> checkpoint dict.

    Streams: holds the reference, the float64 sums and one loaded checkpoint at a time. Float tensors
    (weights and BatchNorm running statistics) are summed in float64 and divided once at the end, so the
    average of n copies of A is exactly A. Integer buffers (num_batches_tracked) are copied from the
    reference: a step counter has no meaningful average.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no checkpoint to average")
    if part not in PARTS:
        raise ValueError(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
    reference = str(reference or paths[0])
    first = load_checkpoint(paths[0])
    check_same_architecture(paths[0], first, paths[0], first)  # refuses an ensemble file
    # What every ingredient is checked against: the first one's model_cfg and tensor shapes (meta: no memory)
    spec = {"model_cfg": first["model_cfg"], "args": first.get("args"),
            "model": {k: v.to("meta") for k, v in first["model"].items()}}
    ref = first if reference == paths[0] else load_checkpoint(reference)
    check_same_architecture(paths[0], spec, reference, ref)
    total, step, epoch = {}, 0, 0
    for i, path in enumerate(paths):
        ckpt = first if i == 0 else ref if path == reference else load_checkpoint(path)
        first = None
        check_same_architecture(paths[0], spec, path, ckpt)
        for k, v in ckpt["model"].items():
            if _float_key(v) and in_part(k, part):
                v64 = v.to("cpu", torch.float64, copy=True)
                total[k] = v64 if k not in total else total[k].add_(v64)  # float64 sums on the CPU
        step, epoch = max(step, int(ckpt.get("step") or 0)), max(epoch, int(ckpt.get("epoch") or 0))
        del ckpt  # NOTE: one checkpoint at a time: 8 seeds of a ~200 MB SE-ResNet101 U-Net never sit in memory at once
    n = len(paths)
    state = {k: (total[k] / n).to(v.dtype) if k in total else v.clone() for k, v in ref["model"].items()}
    return {"model": state, "model_cfg": ref["model_cfg"], "args": ref.get("args") or {}, "step": step,
            "epoch": epoch, "optimizer": None, "scheduler": None, "scaler": None, "metric": float("nan"),
            "version": 1, "provenance": {"method": method, "ingredients": paths, "weights": [1.0 / n] * n,
                                         "part": part, "bn": "keep", "reference": reference}}


def ingredient_scores(paths, score, memo=None):
    """{path: validation score} of each ingredient, loading one checkpoint at a time; memo reuses earlier ones."""
    memo = {} if memo is None else memo
    for p in map(str, paths):
        if p not in memo:
            memo[p] = score(load_checkpoint(p))
            print(f"  validation score of {p}: {memo[p]:.4f}")
    return {p: memo[p] for p in map(str, paths)}


def _rank(value):
    return -math.inf if math.isnan(value) else value  # NaN (no lesion in validation) ranks last


def pick_reference(paths, rule, score=None, memo=None):
    """The ingredient that supplies what is not averaged: the first given, or the best by validation score."""
    if rule == "first":
        return str(paths[0])
    if rule != "best":
        raise ValueError(f"--reference must be first or best, got {rule!r}")
    scores = ingredient_scores(paths, score, memo)
    return max(scores, key=lambda p: _rank(scores[p]))  # ties: the earliest given


def greedy_soup(paths, score, part="full", reference="first", memo=None):
    """Greedy soup (Wortsman et al. 2022, recipe 2): ingredients by decreasing validation score, each kept
    only if the uniform soup of those kept so far plus it scores at least as well on validation.

    score(ckpt dict) -> float, higher is better (the validation split of the combination, never test). Each
    candidate soup is recomputed from its ingredients in float64 (n loads per candidate) so the final soup
    is an exact uniform average, not a chain of running means.
    """
    scores = ingredient_scores(paths, score, memo)
    order = sorted(scores, key=lambda p: -_rank(scores[p]))  # stable: ties keep the command-line order
    ref = order[0] if reference == "best" else pick_reference(paths, reference)
    kept = [order[0]]
    soup = average_checkpoints(kept, part, ref)
    # NOTE: with part != full, a soup of one is the best ingredient's part on the reference's other part.
    best = scores[order[0]] if part == "full" or ref == order[0] else score(soup)
    for p in order[1:]:
        candidate = average_checkpoints(kept + [p], part, ref)
        s = score(candidate)
        accept = _rank(s) >= _rank(best) and not math.isnan(s)
        print(f"  {'kept' if accept else 'left out'} {p}: soup validation score {s:.4f} (was {best:.4f})")
        if accept:
            kept, soup, best = kept + [p], candidate, s
        del candidate
    soup["provenance"].update(candidates=list(order), scores=scores, soup_score=best)
    return soup


def make_ensemble(paths):
    """Ensemble file (eq. 1): every member's weights and model_cfg; evaluate.py averages their probabilities."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no checkpoint for the ensemble")
    members, args, counts = [], None, []
    for p in paths:
        ckpt = load_checkpoint(p)
        # An ensemble file given as a member contributes its members (a flat list, equally weighted).
        inner = ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
        members += [{"model": m["model"], "model_cfg": m["model_cfg"], "args": m.get("args") or {}} for m in inner]
        counts.append(len(inner))
        if args is None:  # the first member's training args (resolution, combination) describe the file
            args = ckpt.get("args") or members[0]["args"]
        del ckpt, inner
    n = len(members)
    return {"kind": "ensemble", "members": members, "args": args, "version": 1,
            "provenance": {"method": "ensemble", "ingredients": paths, "weights": [c / n for c in counts],
                           "part": "full", "bn": "keep", "reference": paths[0]}}


# ---------------------------------------------------------------------------------------------------------
# The training combination's data: validation scores and BatchNorm statistics
# ---------------------------------------------------------------------------------------------------------
def combination_sets(train_ids, resolution, split, data_root, cache_dir, options=None):
    """The non-empty `split` PreparedDatasets of every training set (prepared on first use, quietly)."""
    for d in train_ids:
        data.prepare_cache(d, data_root, cache_dir, resolution, **{**(options or {}), "verbose": False})
    sets = [data.PreparedDataset(cache_dir, d, resolution, split) for d in train_ids]
    sets = [s for s in sets if len(s)]
    if not sets:
        raise ValueError(f"no {split} images in the splits of {combo_name(train_ids)} under {cache_dir}")
    return sets


def make_scorer(val_sets, metric="aupr", device="cpu"):
    """score(ckpt) -> mean over lesions of the pooled validation AUPR or Dice (NaN lesions left out)."""
    if metric not in ("aupr", "dice"):
        raise ValueError(f"--metric must be aupr or dice, got {metric!r}")

    def score(ckpt):
        models = load_models(ckpt, device)
        tp, fp, pos = pooled_counts(models, val_sets, device)  # the union of the validation splits, as train.py
        values = [float(v) for v in pr_metrics(tp, fp, pos)[metric] if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    return score


def training_batches(train_sets, patch, batch, n_batches, seed=0):
    """n_batches float (B, 3, P, P) batches in [0, 1] of augmented training patches (the training distribution)."""
    patches = data.PatchDataset(train_sets, patch=patch, length=n_batches * batch, seed=seed, augment=True)
    for b in range(n_batches):
        items = [patches[i] for i in range(b * batch, (b + 1) * batch)]
        yield torch.stack([it["image"] for it in items]).float().div_(255)  # (B, 3, P, P)


@torch.no_grad()
def recompute_bn(model, batches):
    """Replace every BatchNorm's running mean / variance by their average over `batches` (fresh start).

    momentum=None makes BatchNorm keep a cumulative (equal-weight) average of the batch statistics. Only
    the BatchNorm layers are in train mode: dropout stays off. Returns the number of batches seen.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = next(model.parameters()).device
    n = 0
    try:
        for x in batches:
            model(x.to(device))
            n += 1
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)  # NOTE: integer buffers stay the reference's, as when averaging
        model.train(was_training)
    return n


def recompute_bn_checkpoint(ckpt, batches, device="cpu"):
    """ckpt with only its BatchNorm running_mean / running_var replaced by recompute_bn's (in place)."""
    (model,) = load_models(ckpt, device)
    n = recompute_bn(model, batches)
    if n == 0:
        raise ValueError("--bn-batches must be >= 1 to recompute BatchNorm statistics")
    new = model.state_dict()
    ckpt["model"] = {k: new[k].detach().to("cpu", v.dtype) if k.endswith(("running_mean", "running_var")) else v
                     for k, v in ckpt["model"].items()}
    ckpt["provenance"].update(bn="recompute", bn_batches=n)
    return ckpt


# ---------------------------------------------------------------------------------------------------------
# Command-line plumbing shared by the subcommands
# ---------------------------------------------------------------------------------------------------------
class Combination:
    """The training combination in a checkpoint's args: validation scores and training batches, built on first use."""

    def __init__(self, ckpt_args, args, parser):
        self.ckpt_args, self.args, self.parser = ckpt_args, args, parser
        self._score, self.memo = None, {}  # memo: {ingredient path: validation score}

    @property
    def train(self):
        if not self.ckpt_args.get("train") or not self.ckpt_args.get("resolution"):
            raise ValueError("the checkpoint's args record no training combination ('train', 'resolution'): "
                             "validation scores and --bn recompute need them")
        return data.parse_dataset_ids(",".join(self.ckpt_args["train"]))

    def sets(self, split):
        data_root, cache, options = data.data_settings(self.args, self.parser, self.ckpt_args)
        return combination_sets(self.train, int(self.ckpt_args["resolution"]), split, data_root, cache, options)

    def score(self, ckpt):
        if self._score is None:
            self._score = make_scorer(self.sets("val"), self.args.metric, self.args.device)
        return self._score(ckpt)

    def recompute_bn(self, ckpt):
        sets = self.sets("train")
        patch = int(self.ckpt_args.get("patch") or self.ckpt_args["resolution"])
        batch = int(self.ckpt_args.get("batch") or 8)
        print(f"recomputing BatchNorm statistics over {self.args.bn_batches} batches of {batch} training patches")
        return recompute_bn_checkpoint(ckpt, training_batches(sets, patch, batch, self.args.bn_batches),
                                       self.args.device)


def _check_out(out, force):
    if Path(out).exists() and not force:
        raise ValueError(f"{out} exists (pass --force to overwrite)")


def build_average(paths, kind, part, combo, args, bn=None):
    """A soup / SWA checkpoint dict for the CLI: reference, optional greedy selection, optional BN recompute
    (`bn` overrides args.bn)."""
    method = f"{kind}-{part}"  # e.g. "swa-encoder": evaluate.py writes it as the results' "method"
    if getattr(args, "greedy", False):
        ckpt = greedy_soup(paths, combo.score, part, args.reference, combo.memo)
        ckpt["provenance"].update(method=f"greedy-{method}", metric=args.metric)
    else:
        ref = pick_reference(paths, args.reference, combo.score, combo.memo)
        ckpt = average_checkpoints(paths, part, ref, method)
    ckpt["provenance"]["reference_rule"] = args.reference
    # NOTE: BatchNorm statistics are recomputed once, after the greedy choice: candidates are scored with
    # their averaged statistics (a recompute per candidate would multiply the cost by the ingredients).
    if (bn or args.bn) == "recompute":
        ckpt = combo.recompute_bn(ckpt)
    return ckpt


def select_snapshots(run_dir, last=None, steps=None):
    """RUN/snapshots/step_N.pt sorted by step: all, the last k, or those with A <= N <= B (steps 'A:B')."""
    folder = Path(run_dir) / "snapshots"
    found = sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt")
                   if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))
    if not found:
        raise FileNotFoundError(f"no snapshots in {folder} (train.py keeps them at validation-loss minima, "
                                f"or every N steps with --snapshot-every N)")
    if steps is not None:
        a, sep, b = str(steps).partition(":")
        try:
            lo, hi = int(a) if a else 0, int(b) if b else math.inf
        except ValueError:
            raise ValueError(f"--steps expects A:B (integers, either may be empty), got {steps!r}") from None
        if not sep:
            raise ValueError(f"--steps expects A:B (integers, either may be empty), got {steps!r}")
        found = [(s, p) for s, p in found if lo <= s <= hi]
    if last is not None:
        if last < 1:
            raise ValueError(f"--last must be >= 1, got {last}")
        found = found[-last:]
    if not found:
        raise ValueError(f"--steps {steps} selects none of the snapshots in {folder}")
    return [str(p) for _, p in found]


# ---------------------------------------------------------------------------------------------------------
# Figure 4: baseline, ensemble, SWA and soups on encoder / decoder / full for one training combination
# ---------------------------------------------------------------------------------------------------------
def _reusable(path, provenance):
    """Is avg/X.pt already the average we would build (same method, ingredients, part, bn, reference rule)?"""
    if not Path(path).is_file():
        return False
    old = load_checkpoint(path).get("provenance") or {}
    keys = ("method", "ingredients", "part", "bn", "reference_rule")
    return all(old.get(k) == provenance.get(k) for k in keys)


def figure4(args, parser):
    """The paper's Figure 4 for RUNS/COMBO (section 3.3): every method evaluated on the test sets -> fig4.json.

    baseline = the first seed's best.pt; ensemble and soups = the first --members seeds' best.pt; SWA = the
    first seed's snapshots. Averages are written to RUNS/COMBO/avg/ and reused while their provenance
    matches; --bn applies to the averages only (the baseline and the ensemble members are trained models).
    """
    combo_dir = Path(args.combo_dir)
    seeds = sorted((int(m.group(1)), d) for d in combo_dir.glob("s*")
                   if (m := re.fullmatch(r"s(\d+)", d.name)) and (d / "best.pt").is_file())
    if len(seeds) < 2:
        found = ", ".join(d.name for _, d in seeds) or "none"
        raise FileNotFoundError(f"fig4 needs best.pt of at least 2 seeds under {combo_dir}/s*/ (found: {found})")
    if args.members < 1:
        raise ValueError(f"--members must be >= 1, got {args.members}")
    run0 = seeds[0][1]
    members = [str(d / "best.pt") for _, d in seeds[:args.members]]
    if len(members) < args.members:
        print(f"note: {len(members)} seeds found: the ensemble and the soups use {len(members)}, not {args.members}")
    baseline = str(run0 / "best.pt")
    combo = Combination(load_checkpoint(baseline).get("args") or {}, args, parser)
    data_root, cache, options = data.data_settings(args, parser, combo.ckpt_args)
    tests = data.parse_dataset_ids(args.test)
    for d in sorted(set(combo.train) | set(tests), key=DATASET_IDS.index):  # one summary each, then quiet
        data.prepare_cache(d, data_root, cache, int(combo.ckpt_args["resolution"]), **options)
    options = {**options, "verbose": False}
    avg = combo_dir / "avg"
    # --bn both: each average twice, e.g. "swa-full" (averaged statistics) and "swa-full+bn" (recomputed)
    modes = ("keep", "recompute") if args.bn == "both" else (args.bn,)

    plan = {"baseline": baseline, "ensemble": str(avg / "ensemble.pt")}
    ens_prov = {"method": "ensemble", "ingredients": members, "part": "full", "bn": "keep", "reference_rule": None}
    if not _reusable(plan["ensemble"], ens_prov):
        ens = make_ensemble(members)
        ens["provenance"]["reference_rule"] = None
        save_checkpoint(plan["ensemble"], ens)
        del ens
    try:
        snapshots = select_snapshots(run0)
    except FileNotFoundError as e:
        snapshots = []
        print(f"note: SWA entries skipped: {e}")
    for bn, (kind, paths), part in itertools.product(modes, (("swa", snapshots), ("soup", members)), PARTS):
        if not paths:
            continue
        name = f"{kind}-{part}"
        key = name + ("+bn" if bn == "recompute" and len(modes) == 2 else "")
        plan[key] = str(avg / f"{name}{'-bn' if bn == 'recompute' else ''}.pt")
        want = {"method": name, "ingredients": paths, "part": part, "bn": bn, "reference_rule": args.reference}
        if _reusable(plan[key], want):
            print(f"reusing {plan[key]}")
            continue
        print(f"building {plan[key]} from {len(paths)} checkpoint(s)")
        save_checkpoint(plan[key], build_average(paths, kind, part, combo, args, bn=bn))

    methods = {}
    for name, path in plan.items():
        print(f"evaluating {name}: {path}")
        stem = name if name == "baseline" else Path(path).stem  # e.g. avg/swa-full-bn.results.json
        res = evaluate_checkpoints(path, tests, data_root, cache, options, device=args.device,
                                   out=avg / f"{stem}.results.json", verbose=False)
        methods[name] = {t: {"mean_dice": r["mean_dice"], "mean_aupr": r["mean_aupr"]}
                         for t, r in res["results"].items()}
    report = {"version": 1, "combo": combo_name(combo.train), "train": combo.train, "tests": tests, "bn": args.bn,
              "reference": args.reference, "members": members, "snapshots": snapshots, "checkpoints": plan,
              "methods": methods}
    write_json(args.out, report)  # NaN (a lesion absent from a test set) is written as null
    print(f"\n{'method':16s}" + "".join(f"{t:>8s}" for t in tests) + "   (mean Dice)")
    for name, block in methods.items():
        print(f"{name:16s}" + "".join(f"{block[t]['mean_dice']:8.3f}" for t in tests))
    return report


# ---------------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def outputs(q, what):
        q.add_argument("-o", "--out", required=True, help=f"{what} to write (required)")
        q.add_argument("--force", action="store_true", help="overwrite an existing output (default: %(default)s)")

    def averaging(q, reference="first", bn=("keep", "recompute")):
        g = q.add_argument_group("averaging")
        g.add_argument("--reference", choices=("first", "best"), default=reference,
                       help="ingredient supplying what is not averaged (other part, integer buffers): the first "
                            "given or the best by validation score (default: %(default)s)")
        g.add_argument("--bn", choices=bn, default="keep",
                       help="keep the averaged BatchNorm statistics, or recompute them over training patches"
                            + (", or both (fig4: each average twice, '+bn' names the recomputed)" if "both" in bn
                               else "") + " (default: %(default)s)")
        g.add_argument("--bn-batches", type=int, default=100,
                       help="training batches (the run's --batch x --patch) for --bn recompute (default: %(default)s)")
        g.add_argument("--metric", choices=("aupr", "dice"), default="aupr",
                       help="validation score: mean over lesions of pooled AUPR or Dice (default: %(default)s)")
        g.add_argument("--device", default=default_device(),
                       help="device of the validation and BatchNorm passes (averaging: CPU) (default: %(default)s)")
        data.add_data_args(q)

    def part(q):
        q.add_argument("--part", choices=PARTS, default="full",
                       help="average only the encoder, only the decoder (+ head), or everything (default: %(default)s)")

    p.commands = sub.choices  # {name: subparser}: main reads the data flags' defaults there
    q = sub.add_parser("swa", help="average a run's snapshots (eq. 2)")
    q.add_argument("run_dir", help="run directory holding snapshots/step_N.pt")
    sel = q.add_mutually_exclusive_group()
    sel.add_argument("--last", type=int, default=None, help="only the last K snapshots (default: %(default)s = all)")
    sel.add_argument("--steps", default=None, metavar="A:B",
                     help="only snapshots with A <= step <= B; either side may be empty (default: %(default)s = all)")
    outputs(q, "averaged checkpoint")
    part(q)
    averaging(q)

    q = sub.add_parser("soup", help="average the final weights of several runs (eq. 3)")
    q.add_argument("ckpts", nargs="+", help="checkpoints of runs of the same architecture (e.g. s*/best.pt)")
    q.add_argument("--greedy", action="store_true",
                   help="greedy soup: add ingredients by validation score, keep each only if the soup's "
                        "validation score does not drop (default: %(default)s = uniform soup)")
    outputs(q, "soup checkpoint")
    part(q)
    averaging(q)

    q = sub.add_parser("ensemble", help="an ensemble file averaging the members' probabilities (eq. 1)")
    q.add_argument("ckpts", nargs="+", help="member checkpoints (any architectures)")
    outputs(q, "ensemble file")

    q = sub.add_parser("fig4", help="the paper's Figure 4 comparison for one training combination")
    q.add_argument("combo_dir", help="RUNS/COMBO holding the seeds' runs s0/, s1/, ...")
    q.add_argument("--test", default=",".join(DATASET_IDS), help="test sets (default: %(default)s)")
    q.add_argument("--members", type=int, default=4,
                   help="first N seeds' best.pt form the ensemble and the soups (default: %(default)s)")
    outputs(q, "fig4.json")
    averaging(q, reference="best", bn=("keep", "recompute", "both"))
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_out(args.out, args.force)
    if args.command == "ensemble":
        save_checkpoint(args.out, make_ensemble(args.ckpts))
        print(f"wrote {args.out}: ensemble of {len(args.ckpts)} checkpoint(s)")
        return
    if args.bn_batches < 1:
        raise ValueError(f"--bn-batches must be >= 1, got {args.bn_batches}")
    sub = parser.commands[args.command]
    if args.command == "fig4":
        figure4(args, sub)
        print(f"\nwrote {args.out}")
        return
    paths = select_snapshots(args.run_dir, args.last, args.steps) if args.command == "swa" else args.ckpts
    combo = Combination(load_checkpoint(paths[0]).get("args") or {}, args, sub)
    ckpt = build_average(paths, args.command, args.part, combo, args)
    save_checkpoint(args.out, ckpt)
    prov = ckpt["provenance"]
    print(f"wrote {args.out}: {prov['method']} of {len(prov['ingredients'])} checkpoint(s), "
          f"reference {prov['reference']}, bn {prov['bn']}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
