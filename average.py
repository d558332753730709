"""Weight averaging (SWA, model soups) and ensembles over saved checkpoints, per part (paper 2.5).

    python average.py swa runs/IDR+MES/s0 -o runs/IDR+MES/s0/swa.pt --last 5
    python average.py soup runs/IDR+MES/s*/best.pt -o runs/IDR+MES/soup.pt --greedy --part decoder
    python average.py ensemble runs/IDR+MES/s[0-3]/best.pt -o runs/IDR+MES/ensemble.json
    python average.py soup --help           # each subcommand's own examples and flags

swa and soup (eq. 2, 3) write a training-format checkpoint whose "provenance" records how it was
made; ensemble (eq. 1) writes a small manifest of member paths, no weights, whose members'
probabilities evaluate.py averages. Validation scores (greedy soups, --reference best) and BatchNorm
recomputation read the training combination's own validation / training splits, never test.
fig4.py builds every method of the paper's Figure 4 on these functions. The first half of this file
needs only torch and model.py: copy both into another project. Details: docs/AVERAGING.md.
"""
import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PARTS = ("encoder", "decoder", "full")
# Validation scores a soup may follow: keys of kernels.pr_metrics. dice and ap are floor-free; the
# protocol's aupr gives a map that predicts nothing about 0.5 (docs/PROTOCOL.md), so a soup on it
# can prefer a blank model.
METRICS = ("dice", "ap", "aupr")


# ---- the command line first: `python average.py --help` answers before torch loads ---------------
SWA_HELP = """Average one run's snapshots (eq. 2) into a training-format checkpoint.

    python average.py swa runs/IDR+MES/s0 -o runs/IDR+MES/s0/swa.pt --last 5 --bn recompute
    python average.py swa runs/IDR+MES/s0 -o runs/IDR+MES/s0/swa-enc.pt --steps 2000: --part encoder
"""
SOUP_HELP = """Average runs of one combination (eq. 3): uniform, or greedy on validation.

    python average.py soup runs/IDR+MES/s*/best.pt -o runs/IDR+MES/soup.pt
    python average.py soup runs/IDR+MES/s*/best.pt -o runs/IDR+MES/greedy.pt --greedy --metric ap
    python average.py soup runs/IDR+MES/s*/best.pt -o runs/IDR+MES/dec.pt --greedy --part decoder
"""
ENSEMBLE_HELP = """Ensemble manifest (eq. 1): member paths, no weights; evaluate.py averages them.

    python average.py ensemble runs/IDR+MES/s[0-3]/best.pt -o runs/IDR+MES/ensemble.json
    python evaluate.py --ckpt runs/IDR+MES/ensemble.json --test MES
"""


def build_parser():
    # the command line only: the averaging itself needs torch and model.py alone
    import utils  # noqa: PLC0415

    p = utils.Parser(description=__doc__)  # a bad flag: one `error:` line, as every user error
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, text):
        # `average.py NAME --help`: what NAME does on top, its own examples below the flags
        summary, _, examples = text.partition("\n")
        return sub.add_parser(name, help=summary, description=summary,
                              epilog="examples:\n" + examples.strip("\n"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def outputs(q, what):
        q.add_argument("-o", "--out", required=True, help=f"{what} to write (required)")
        q.add_argument("--force", action="store_true",
                       help="overwrite an existing output (default: %(default)s)")

    def part(q):
        q.add_argument("--part", choices=PARTS, default="full",
                       help="average only the encoder, only the decoder (+ head), or everything "
                            "(default: %(default)s)")

    p.commands = sub.choices  # {name: subparser}: main reads the data flags' defaults there
    q = command("swa", SWA_HELP)
    q.add_argument("run_dir", help="run directory holding snapshots/step_N.pt")
    sel = q.add_mutually_exclusive_group()  # which snapshots: the last K, or a step range
    sel.add_argument("--last", type=int, default=None,
                     help="only the last K snapshots (default: %(default)s = all)")
    sel.add_argument("--steps", default=None, metavar="A:B",
                     help="only snapshots with A <= step <= B; either side may be empty "
                          "(default: %(default)s = all)")
    outputs(q, "averaged checkpoint")
    part(q)
    add_averaging_args(q)

    q = command("soup", SOUP_HELP)
    q.add_argument("ckpts", nargs="+",
                   help="checkpoints of runs of the same architecture (e.g. s*/best.pt)")
    q.add_argument("--greedy", action="store_true",
                   help="greedy soup: add ingredients by validation score, keep each only if the "
                        "soup's validation score strictly improves "
                        "(default: %(default)s = uniform soup)")
    outputs(q, "soup checkpoint")
    part(q)
    add_averaging_args(q)

    # no weights are read but the members' headers: no averaging flags, any architectures
    q = command("ensemble", ENSEMBLE_HELP)
    q.add_argument("ckpts", nargs="+", help="member checkpoints or manifests (any architectures)")
    outputs(q, "ensemble manifest (.json)")
    return p


def add_averaging_args(q, reference="first", bn=("keep", "recompute"), bn_help=""):
    """The flags of averaging with validation scores and BatchNorm recomputation (swa, soup,
    fig4.py)."""
    from data.flags import add_data_args  # noqa: PLC0415

    g = q.add_argument_group("averaging")
    g.add_argument("--reference", choices=("first", "best"), default=reference,
                   help="ingredient supplying what is not averaged (other part, integer buffers): "
                        "the first given or the best by validation score (default: %(default)s)")
    g.add_argument("--bn", choices=bn, default="keep",
                   help="keep the averaged BatchNorm statistics, or recompute them over training "
                        f"patches{bn_help} (default: %(default)s)")
    g.add_argument("--bn-batches", type=int, default=100,
                   help="training batches (the run's --batch x --patch) for --bn recompute "
                        "(default: %(default)s)")
    g.add_argument("--metric", choices=METRICS, default="dice",
                   help="validation score of --greedy and --reference best, mean over lesions: "
                        "pooled Dice, AP or AUPR (docs/AVERAGING.md) (default: %(default)s)")
    g.add_argument("--device", default=None,
                   help="device of the validation and BatchNorm passes; averaging runs on the CPU "
                        "(default: cuda if available, else cpu)")
    # the data flags: where a flag is not given, the checkpoint's recorded value (data_settings)
    add_data_args(q)


if __name__ == "__main__":
    import utils

    # --help before torch loads; a Ctrl-C while it loads: one line
    utils.start(__name__, build_parser)

# ---- the averaging itself: torch and model.py only -----------------------------------------------
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from model import (ARCH_FIELDS, LESIONS, architecture, load_checkpoint, load_models,  # noqa: E402
                   save_checkpoint)


def in_part(key, part):
    """Is state-dict key averaged under --part? encoder = "encoder.*", decoder = every other key
    (decoder + head)."""
    if part == "full":
        return True
    # model.SegModel's keys: encoder.*, decoder.*, head.*
    return key.startswith("encoder.") == (part == "encoder")


def _float_key(value):
    """A floating tensor (weights, BatchNorm statistics): averaged; integer buffers are copied."""
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def check_same_architecture(first_path, first, path, ckpt):
    """ValueError naming `path` and the first key where its architecture or state dict differs from
    `first`."""
    if ckpt.get("kind") == "ensemble":
        raise ValueError(f"{path} is an ensemble: average training checkpoints (or their "
                         f"snapshots) instead")
    where = f"{path} does not match {first_path}"
    # NOTE: architecture() fills a field an older checkpoint lacks with its default (e.g.
    # style_tokens = ()), so a style-conditioned model is averaged only with models of the same
    # tokens
    for key, a, b in zip(ARCH_FIELDS, architecture(first["model_cfg"]),
                           architecture(ckpt["model_cfg"])):
        if a != b:
            raise ValueError(f"{where}: model_cfg key {key!r} is {b!r}, not {a!r}")
    # NOTE: one architecture either way, but a head trained on a lesion averaged with an untrained
    # one (train.py --lesions) gives a model that is neither; older checkpoints: all four
    la, lb = (",".join(c["model_cfg"].get("lesions") or LESIONS) for c in (first, ckpt))
    if la != lb:
        raise ValueError(f"{where}: trained on lesions {lb}, not {la} (average runs of the same "
                         f"--lesions)")
    # NOTE: a soup averages runs of one training combination (issue / paper eq. 3); its validation
    # splits and BatchNorm patches come from the first ingredient's combination. The authors
    # released one model per combination: a soup of theirs mixes combinations.
    authors = first.get("method") == ckpt.get("method") == "authors"
    for key in ("resolution",) if authors else ("train", "resolution"):
        a, b = ((c.get("args") or {}).get(key) for c in (first, ckpt))
        if a is not None and b is not None and a != b:  # None: not recorded, nothing to compare
            raise ValueError(f"{where}: trained with {key} {b!r}, not {a!r} (average runs of one "
                             f"combination)")
    # the same keys both ways, the same shapes, float where the first is float
    ref, sd = first["model"], ckpt["model"]
    for k, v in ref.items():
        if k not in sd:
            raise ValueError(f"{where}: state dict lacks key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: key {k!r} has shape {tuple(sd[k].shape)}, not "
                             f"{tuple(v.shape)}")
        if sd[k].is_floating_point() != v.is_floating_point():
            raise ValueError(f"{where}: key {k!r} has dtype {sd[k].dtype}, not {v.dtype}")
    extra = [k for k in sd if k not in ref]
    if extra:
        raise ValueError(f"{where}: unexpected state dict key {extra[0]!r}")


# ---- averages (eq. 2 and 3) ----------------------------------------------------------------------
def average_checkpoints(paths, part="full", reference=None, method="average", load=load_checkpoint):
    """Uniform average of the checkpoints' `part` tensors; everything else from `reference` ->
    checkpoint dict.

    Streams: holds the reference, the float64 sums and one loaded checkpoint at a time. Float
    tensors (weights and BatchNorm running statistics) are summed in float64 and divided once at the
    end, so the average of n copies of A is exactly A. Integer buffers (num_batches_tracked) are
    copied from the reference: a step counter has no meaningful average. load(path) -> checkpoint
    dict.
    """
    paths = [str(p) for p in paths]  # the provenance records them as given
    if not paths:
        raise ValueError("no checkpoint to average")
    if part not in PARTS:
        raise ValueError(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
    reference = str(reference or paths[0])
    first = load(paths[0])
    check_same_architecture(paths[0], first, paths[0], first)  # refuses an ensemble file
    # What every ingredient is checked against: the first one's model_cfg and tensor shapes (meta:
    # no memory)
    spec = {"model_cfg": first["model_cfg"], "args": first.get("args"),
            "method": first.get("method"),
            "model": {k: v.to("meta") for k, v in first["model"].items()}}
    ref = first if reference == paths[0] else load(reference)
    check_same_architecture(paths[0], spec, reference, ref)
    total, step, epoch = {}, 0, 0  # total: {key: float64 sum on the CPU} of the averaged tensors
    for i, path in enumerate(paths):
        # the first and the reference are loaded already: never twice
        ckpt = first if i == 0 else ref if path == reference else load(path)
        first = None  # dropped once used: only the reference stays (when it is another file)
        check_same_architecture(paths[0], spec, path, ckpt)
        for k, v in ckpt["model"].items():
            if _float_key(v) and in_part(k, part):
                v64 = v.to("cpu", torch.float64, copy=True)
                total[k] = v64 if k not in total else total[k].add_(v64)  # float64 sums on the CPU
        # the average's step and epoch: the latest of its ingredients'
        step, epoch = max(step, int(ckpt.get("step") or 0)), max(epoch, int(ckpt.get("epoch") or 0))
        # NOTE: one checkpoint at a time: 8 seeds of a ~200 MB SE-ResNet101 U-Net never sit in
        # memory at once
        del ckpt
    n = len(paths)
    # divided once, then back to each tensor's own dtype; the rest is the reference's, copied
    state = {k: (total[k] / n).to(v.dtype) if k in total else v.clone()
             for k, v in ref["model"].items()}
    # the training format (optimizer state none: an average is not resumed)
    return {"model": state, "model_cfg": ref["model_cfg"], "args": ref.get("args") or {},
            "step": step, "epoch": epoch, "optimizer": None, "scheduler": None, "scaler": None,
            "metric": float("nan"), "version": 1,
            "provenance": {"method": method, "ingredients": paths, "weights": [1.0 / n] * n,
                           "part": part, "bn": "keep", "reference": reference}}


def ingredient_scores(paths, score, memo=None, load=load_checkpoint):
    """{path: validation score} of each ingredient, loading one checkpoint at a time; memo reuses
    earlier ones."""
    memo = {} if memo is None else memo  # the caller's dict is filled in place
    for p in map(str, paths):
        if p not in memo:  # fig4.py's several soups of one combination score each ingredient once
            memo[p] = score(load(p))
            print(f"  validation score of {p}: {memo[p]:.4f}")
    return {p: memo[p] for p in map(str, paths)}


def _rank(value):
    """Sort key of a validation score: NaN (no lesion in validation) ranks last."""
    return -math.inf if math.isnan(value) else value


def pick_reference(paths, rule, score=None, memo=None, load=load_checkpoint):
    """The ingredient that supplies what is not averaged: the first given, or the best by validation
    score."""
    if rule == "first":
        return str(paths[0])
    if rule != "best":
        raise ValueError(f"--reference must be first or best, got {rule!r}")
    scores = ingredient_scores(paths, score, memo, load)
    return max(scores, key=lambda p: _rank(scores[p]))  # ties: the earliest given


def greedy_soup(paths, score, part="full", reference="first", memo=None, load=load_checkpoint):
    """Greedy soup (Wortsman et al. 2022, recipe 2): ingredients by decreasing validation score,
    each kept only if the uniform soup of those kept so far plus it scores strictly better on
    validation.

    score(ckpt dict) -> float, higher is better (the validation split of the combination, never
    test). Each candidate soup is recomputed from its ingredients in float64 (n loads per candidate)
    so the final soup is an exact uniform average, not a chain of running means.
    """
    scores = ingredient_scores(paths, score, memo, load)  # one pass per ingredient, memoised
    # stable: ties keep the command-line order
    order = sorted(scores, key=lambda p: -_rank(scores[p]))
    # "best" is the first of `order`: no second scoring pass
    ref = order[0] if reference == "best" else pick_reference(paths, reference)
    kept = [order[0]]  # the soup starts as the best ingredient alone
    soup = average_checkpoints(kept, part, ref, load=load)
    # NOTE: with part != full, a soup of one is the best ingredient's part on the reference's other
    # part: scored again, unless the two are one checkpoint
    best = scores[order[0]] if part == "full" or ref == order[0] else score(soup)
    for p in order[1:]:
        candidate = average_checkpoints(kept + [p], part, ref, load=load)
        s = score(candidate)
        # NOTE: strictly better, as model-soups' `if held_out_val_accuracy > best_val_acc_so_far`: a
        # tie adds an ingredient the validation set can't tell apart, so it is left out; NaN ranks
        # -inf, never kept.
        accept = _rank(s) > _rank(best)
        print(f"  {'kept' if accept else 'left out'} {p}: soup validation score {s:.4f} "
              f"(was {best:.4f})")
        if accept:
            kept, soup, best = kept + [p], candidate, s
        del candidate  # a refused candidate's weights go before the next one is built
    soup["provenance"].update(candidates=list(order), scores=scores, soup_score=best)
    return soup


def select_snapshots(run_dir, last=None, steps=None):
    """RUN/snapshots/step_N.pt sorted by step: all, the last k, or those with A <= N <= B (steps
    'A:B')."""
    folder = Path(run_dir) / "snapshots"
    # sorted by N as a number: step_1000 after step_200
    found = sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt")
                   if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))
    if not found:
        raise FileNotFoundError(f"no snapshots in {folder} (train.py keeps them at validation-loss "
                                f"minima, or every N steps with --snapshot-every N)")
    if steps is not None:
        a, sep, b = str(steps).partition(":")
        try:
            lo, hi = int(a) if a else 0, int(b) if b else math.inf  # "2000:" = from step 2000 on
        except ValueError:
            raise ValueError(f"--steps expects A:B (integers, either may be empty), got "
                             f"{steps!r}") from None
        if not sep:  # "2000" alone: a range was meant, not one step
            raise ValueError(f"--steps expects A:B (integers, either may be empty), got {steps!r}")
        found = [(s, p) for s, p in found if lo <= s <= hi]
    if last is not None:
        if last < 1:
            raise ValueError(f"--last must be >= 1, got {last}")
        found = found[-last:]
    if not found:
        raise ValueError(f"--steps {steps} selects none of the snapshots in {folder}")
    return [str(p) for _, p in found]


# ---- BatchNorm statistics of an average ----------------------------------------------------------
@torch.no_grad()
def recompute_bn(model, batches):
    """Replace every BatchNorm's running mean / variance by their average over `batches` (fresh
    start).

    momentum=None makes BatchNorm keep a cumulative (equal-weight) average of the batch statistics.
    Only the BatchNorm layers are in train mode: dropout stays off. Returns the number of batches
    seen.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]  # restored below
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()  # mean 0, var 1, count 0: the first batch's statistics replace them
        m.momentum = None
        m.train()
    device = next(model.parameters()).device
    n = 0
    try:
        for x in batches:  # (B, 3, P, P) in [0, 1]; the outputs are not needed, only the statistics
            model(x.to(device))
            n += 1
    finally:  # an interrupted pass still leaves the model as it was given, less its statistics
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            # NOTE: integer buffers stay the reference's, as when averaging
            m.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return n


def recompute_bn_checkpoint(ckpt, batches, device="cpu"):
    """ckpt with only its BatchNorm running_mean / running_var replaced by recompute_bn's (in
    place)."""
    (model,) = load_models(ckpt, device)
    n = recompute_bn(model, batches)
    if n == 0:
        raise ValueError("--bn-batches must be >= 1 to recompute BatchNorm statistics")
    new = model.state_dict()
    # the statistics back on the CPU in the checkpoint's dtype; every other tensor as it was
    ckpt["model"] = {k: new[k].detach().to("cpu", v.dtype)
                     if k.endswith(("running_mean", "running_var")) else v
                     for k, v in ckpt["model"].items()}
    ckpt["provenance"].update(bn="recompute", bn_batches=n)  # fig4.py compares "bn" to reuse it
    return ckpt


# ---- ensembles (eq. 1): a manifest of member paths, no weights -----------------------------------
def is_hub_spec(path):
    # the authors' released models (authors.py): kept as they are
    return str(path).startswith("hub:")


def read_manifest(path):
    """An ensemble manifest {"kind": "ensemble", "members": [paths relative to the manifest's
    folder], ...} -> (the manifest dict, the member paths resolved). Writes nothing, loads no
    weights."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"ensemble manifest {path} is not readable JSON "
                         f"({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "ensemble":
        raise ValueError(f"ensemble manifest {path} lacks \"kind\": \"ensemble\"")
    members = manifest.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise ValueError(f"ensemble manifest {path} needs a non-empty \"members\" list of "
                         f"checkpoint paths")
    # relative to the manifest's folder: the runs folder can move as a whole
    return manifest, [m if is_hub_spec(m) else path.parent / m for m in members]


def _resolution(ckpt):
    """The training resolution: model_cfg's, or the args' of a checkpoint older than that field."""
    return ckpt["model_cfg"].get("resolution") or (ckpt.get("args") or {}).get("resolution")


def check_ensemble_members(members):
    """members: [(name, checkpoint dict)]. One line naming the first member that does not run as the
    first: another training resolution (evaluate.py would run it at the first one's, and the member
    order would change the score), or style conditioning where the first has none (or the
    reverse)."""
    (name0, first), res0 = members[0], _resolution(members[0][1])
    cond0 = bool(first["model_cfg"].get("style_tokens"))
    for name, m in members[1:]:
        res = _resolution(m)
        # compared as text: an old checkpoint's args may hold "512" where another holds 512
        if res is not None and res0 is not None and str(res) != str(res0):
            raise ValueError(f"ensemble member {name} was trained at {res} px, {name0} at {res0} "
                             f"px: an ensemble runs every member at one resolution: list members "
                             f"trained at the same --resolution")
        if bool(m["model_cfg"].get("style_tokens")) != cond0:
            which = (name, name0) if cond0 else (name0, name)  # (unconditioned, conditioned)
            raise ValueError(f"ensemble member {name}: {which[1]} is style-conditioned (train.py "
                             f"--style-condition) and {which[0]} is not; an ensemble mixes no such "
                             f"members")


def make_ensemble(paths, out, load=load_checkpoint):
    """Ensemble manifest (eq. 1) to be written at `out`: the members' paths relative to out's
    folder, no weights.

    evaluate.py averages the members' probabilities. A manifest given as a member contributes its
    members (a flat list, equally weighted); every member is loaded once (memory-mapped) to check it
    is a checkpoint.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no checkpoint for the ensemble")
    out_dir = Path(os.path.abspath(out)).parent
    members, counts, seen = [], [], []  # counts: models per path given (a manifest: several)
    for p in paths:
        ckpt = load(p)  # FileNotFoundError / ValueError naming p, or a member of its manifest
        inner = ckpt["members"] if ckpt.get("kind") == "ensemble" else [ckpt]
        counts.append(len(inner))
        seen += [(p if len(inner) == 1 else f"{p} (member {i})", m) for i, m in enumerate(inner)]
        del ckpt, inner
        listed = read_manifest(p)[1] if Path(p).suffix == ".json" else [p]
        # each member's path as seen from the manifest's folder (hub: specs as they are)
        members += [str(m) if is_hub_spec(m)
                    else Path(os.path.relpath(os.path.abspath(m), out_dir)).as_posix()
                    for m in listed]
    check_ensemble_members(seen)
    n = sum(counts)
    # the provenance's weights: each path given by its share of the models
    return {"kind": "ensemble", "version": 1, "members": members,
            "provenance": {"method": "ensemble", "ingredients": paths,
                           "weights": [c / n for c in counts],
                           "part": "full", "bn": "keep", "reference": paths[0]}}


def write_ensemble(out, paths, load=load_checkpoint):
    """make_ensemble(paths, out) written to `out` (.json, whole or not at all) -> the manifest
    dict."""
    out = Path(out)
    if out.suffix != ".json":  # predict.read_checkpoint tells a manifest by its suffix
        raise ValueError(f"-o {out}: an ensemble is a JSON manifest listing its members; name it "
                         f".json (e.g. {out.with_suffix('.json')})")
    manifest = make_ensemble(paths, out, load)
    # NOTE: a temporary file renamed into place (no utils: this half needs torch and model.py only)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


# ---- the command line (and fig4.py): the training combination's data, for validation scores and
# BatchNorm batches. NOTE: the functions below import the project's data and scoring modules when
# they run; the ones above need only torch and model.py.
@dataclass
class Combination:
    """The training combination of the ingredients (their first one's args): where its data are, and
    how its validation scores and BatchNorm batches are made (built on first use, each validation
    score once)."""
    train: list
    resolution: int
    where: tuple  # (data_root, cache, prepare_cache options): data.data_settings
    metric: str = "dice"
    device: str = "cpu"
    bn_batches: int = 100
    patch: int = 512
    batch: int = 8
    memo: dict = field(default_factory=dict)  # {ingredient path: validation score}
    val_sets: list = None  # built on the first score

    def __post_init__(self):  # a bad metric now, not after the first ingredient's scoring pass
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")

    def sets(self, split):
        """The non-empty `split` PreparedDatasets of every training set (prepared on first use,
        quietly)."""
        import data  # noqa: PLC0415

        data_root, cache, options = self.where
        for d in self.train:
            data.prepare_cache(d, data_root, cache, self.resolution,
                               **{**(options or {}), "verbose": False})
        # a training set may have no validation images (its split): left out, not an error
        sets = [s for s in (data.PreparedDataset(cache, d, self.resolution, split)
                            for d in self.train) if len(s)]
        if not sets:
            raise ValueError(f"no {split} images in the splits of {'+'.join(self.train)} under "
                             f"{cache}")
        return sets

    def score(self, ckpt):
        """Mean over lesions of a pooled validation score of ckpt (NaN lesions left out), higher is
        better: "dice" at p >= 0.5, "ap" (finely binned, floor-free) or the protocol's "aupr"
        (kernels.pr_metrics)."""
        from kernels import AP_BINS, pr_metrics  # noqa: PLC0415
        from protocol import pooled_counts  # noqa: PLC0415

        if self.val_sets is None:
            self.val_sets = self.sets("val")
        # ap's fine curve, counted in the same pass
        fine = {"ap_bins": AP_BINS} if self.metric == "ap" else {}
        models = load_models(ckpt, self.device)
        # counts pooled over the union of the training sets' validation splits, as train.py does
        scores = pr_metrics(*pooled_counts(models, self.val_sets, self.device, **fine))
        if self.metric not in scores:
            raise ValueError(f"--metric {self.metric}: kernels.pr_metrics returns no "
                             f"{self.metric!r} score (only {', '.join(scores)})")
        values = [float(v) for v in scores[self.metric] if not math.isnan(v)]  # (4,) -> finite ones
        return sum(values) / len(values) if values else float("nan")

    def recompute_bn(self, ckpt):
        """ckpt with BatchNorm statistics recomputed over bn_batches batches of augmented training
        patches."""
        import data  # noqa: PLC0415

        # seed 0: the same patches for every average, so two recomputes of one soup agree
        patches = data.PatchDataset(self.sets("train"), patch=self.patch,
                                    length=self.bn_batches * self.batch, seed=0, augment=True)
        # a generator: one batch in memory at a time
        batches = (torch.stack([patches[i]["image"]
                                for i in range(b * self.batch, (b + 1) * self.batch)])
                   .float().div_(255) for b in range(self.bn_batches))  # (B, 3, P, P) in [0, 1]
        print(f"recomputing BatchNorm statistics over {self.bn_batches} batches of {self.batch} "
              f"training patches")
        return recompute_bn_checkpoint(ckpt, batches, self.device)


def combination(ckpt_args, args, parser):
    """The Combination of a checkpoint's training args, with this command line's data flags
    (data_settings)."""
    import data  # noqa: PLC0415

    if not ckpt_args.get("train") or not ckpt_args.get("resolution"):
        raise ValueError("the checkpoint's args record no training combination ('train', "
                         "'resolution'): validation scores and --bn recompute need them")
    # BatchNorm batches as the run trained: its --patch (default: the whole image) and --batch
    return Combination(data.parse_dataset_ids(",".join(ckpt_args["train"])),
                       int(ckpt_args["resolution"]), data.data_settings(args, parser, ckpt_args),
                       args.metric, args.device or "cpu", args.bn_batches,
                       int(ckpt_args.get("patch") or ckpt_args["resolution"]),
                       int(ckpt_args.get("batch") or 8))


def check_out(out, force):
    """Before any work: -o is not an existing file (unless --force) nor a folder, and its folder can
    be written."""
    import utils  # noqa: PLC0415

    if Path(out).is_dir():
        raise ValueError(f"-o {out} is a folder: name the file to write")
    if Path(out).exists() and not force:
        raise ValueError(f"{out} exists (pass --force to overwrite)")
    utils.writable_folder(Path(out).parent, "-o", f"write {Path(out).name} there")


def build_average(paths, kind, part, combo, args, bn=None, load=load_checkpoint):
    """A soup / SWA checkpoint dict for the CLI: reference, optional greedy selection, optional BN
    recompute (`bn` overrides args.bn)."""
    method = f"{kind}-{part}"  # e.g. "swa-encoder": evaluate.py writes it as the results' "method"
    if getattr(args, "greedy", False):  # swa and fig4.py have no --greedy
        ckpt = greedy_soup(paths, combo.score, part, args.reference, combo.memo, load)
        ckpt["provenance"].update(method=f"greedy-{method}", metric=args.metric)
    else:
        ref = pick_reference(paths, args.reference, combo.score, combo.memo, load)
        ckpt = average_checkpoints(paths, part, ref, method, load)
    ckpt["provenance"]["reference_rule"] = args.reference
    # NOTE: BatchNorm statistics are recomputed once, after the greedy choice: candidates are scored
    # with their averaged statistics (a recompute per candidate would multiply the cost by the
    # ingredients).
    if (bn or args.bn) == "recompute":
        ckpt = combo.recompute_bn(ckpt)
    return ckpt


def main(argv=None):
    import predict  # noqa: PLC0415 (reads any checkpoint: ours, a manifest, the authors')
    import utils  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    check_out(args.out, args.force)  # before any checkpoint is read
    load = predict.read_checkpoint  # .pt, manifests, hub:COMBO and the authors' folders
    if args.command == "ensemble":  # paths only: no data, no device
        manifest = write_ensemble(args.out, args.ckpts, load)
        print(f"wrote {args.out}: ensemble manifest of {len(manifest['members'])} member(s)")
        return
    if args.bn_batches < 1:
        raise ValueError(f"--bn-batches must be >= 1, got {args.bn_batches}")
    args.device = str(utils.check_device(args.device or utils.default_device()))
    paths = (select_snapshots(args.run_dir, args.last, args.steps) if args.command == "swa"
             else args.ckpts)
    # the first ingredient's training args say where the validation and training data are
    combo = combination(load(paths[0]).get("args") or {}, args, parser.commands[args.command])
    ckpt = build_average(paths, args.command, args.part, combo, args, load=load)
    save_checkpoint(args.out, ckpt)  # whole or not at all
    prov = ckpt["provenance"]
    print(f"wrote {args.out}: {prov['method']} of {len(prov['ingredients'])} checkpoint(s), "
          f"reference {prov['reference']}, bn {prov['bn']}")


if __name__ == "__main__":
    import utils

    utils.run(main, interrupted="interrupted: nothing was written (the output is written whole, at "
                                "the end); rerun the same command")
