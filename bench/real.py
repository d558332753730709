"""Does the recipe learn real lesions? The four lesions of 14 real IDRiD photographs, trained from
scratch on CPU (issue 25; `make real`).

    python bench/real.py --out /tmp/real                       # the recipe (BENCHMARKS.md, "Real")
    python bench/real.py --out /tmp/real_plain -- --lesion-weights MA=1   # a variant

The 14 real photographs of tests/fixtures/idrid-4l14 (downscaled 4x, EX, HE, MA and SE masks: the
project's CWS), split by the fixture's split.json (8 train, 2 validation, 4 held out), prepared at
--resolution (the recipe's --local-contrast scaled with it). One train.py run with the recipe's
flags plus any given after `--` (train.py flags), then per lesion the floor-free AP
(docs/PROTOCOL.md) of best.pt on its own training images and on the held-out ones, beside the
prevalence and a baseline without learning: the green channel's darkness relative to its median
inside the FOV for HE and MA, its brightness for EX and CWS.
Prints one table with the targets (held-out AP above the baseline and >= 5x the prevalence for
every lesion, EX >= 0.6) and writes OUT/real.json and OUT/heldout.png (per held-out photograph:
image | ground truth | prediction, the lesion colours of every other figure).
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root is importable

import utils  # noqa: E402


def build_parser():
    """The work folder, the resolution, the threads; train.py's flags after `--`."""
    p = utils.Parser(description=__doc__)
    p.add_argument("--out", required=True, help="work folder: cache, run, real.json, heldout.png")
    p.add_argument("--resolution", type=int, default=1024,
                   help="prepared size: an MA is 1-3 pixels at 512, twice that here "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("extra", nargs="*",
                   help="train.py flags after `--`, added to (and overriding) the recipe")
    return p


utils.start(__name__, build_parser)  # --help before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import maps  # noqa: E402
import train  # noqa: E402
from kernels import AP_BINS, binned_counts, pr_metrics  # noqa: E402
from model import load_models  # noqa: E402
from protocol import predict, to_input  # noqa: E402
from utils import write_json  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "idrid-4l14"
LESIONS = data.LESIONS
# The recipe (BENCHMARKS.md, "Real lesions"): each flag is one measured variant's change there.
RECIPE = ["--encoder", "resnet18", "--no-pretrained", "--patch", "128", "--batch", "8",
          "--iters", "800", "--lr", "1e-3", "--warmup", "20", "--val-every", "100",
          "--lesion-patches", "0.8", "--lesion-weights", "MA=4", "--local-contrast", "16"]
# The targets of issue 25: held-out AP > the baseline's and >= FOLD x the prevalence, EX >= EX_AP
FOLD, EX_AP = 5.0, 0.6
# The baseline's cue per lesion: dark (HE, MA) or bright (EX, CWS) against the fundus
DARK = {"EX": False, "HE": True, "MA": True, "CWS": False}


def recipe(resolution, extra=()):
    """RECIPE at `resolution` (its --local-contrast sigma, 16 px at 1024, scaled with it), then the
    flags after `--` (merged_flags)."""
    scaled = ["--local-contrast", f"{16 * resolution / 1024:g}"]
    return merged_flags(merged_flags(RECIPE, scaled), list(extra))


def merged_flags(base, extra):
    """The flags train.py ends up with: base + extra, where a flag of extra replaces base's
    flag of the same destination (`--iters=150` replaces `--iters 800`, `--pretrained` replaces
    `--no-pretrained`) in its place; flags train.py collects (`append`) are all kept, and new flags
    come last.

    >>> merged_flags(["--iters", "800", "--no-pretrained"], ["--iters", "150"])
    ['--iters', '150', '--no-pretrained']
    """
    actions = train.build_parser()._option_string_actions  # option string -> argparse action

    def groups(tokens):  # [flag, its values...] in order
        out = []
        for t in tokens:
            if t.startswith("--") or not out:
                out.append([t])
            else:
                out[-1].append(t)
        return out

    def action_of(flag):  # exact, else a unique prefix, as argparse resolves `--iter 2`
        name = flag.split("=")[0]
        found = ({actions[name]} if name in actions
                 else {actions[o] for o in actions if o.startswith(name)})
        return found.pop() if len(found) == 1 else None

    merged = {}
    for g in groups(base) + groups(extra):
        action = action_of(g[0])
        key = g[0] if action is None else action.dest
        if isinstance(action, argparse._AppendAction):
            key = (key, len(merged))  # every occurrence counts
        merged[key] = g  # a dict keeps the first one's place
    return [t for g in merged.values() for t in g]


def baseline(image, fov):
    """The no-learning baseline, float32 (4, H, W) in [0, 1]: how much darker (HE, MA) or brighter
    (EX, CWS) than the fundus median the green channel is, 0 outside the FOV."""
    g = image[..., 1].astype(np.float32)
    med = float(np.median(g[fov])) if fov.any() else 1.0
    dark = np.clip((med - g) / max(med, 1.0), 0.0, 1.0) * fov
    bright = np.clip((g - med) / max(255.0 - med, 1.0), 0.0, 1.0) * fov
    return np.stack([dark if DARK[les] else bright for les in LESIONS]).astype(np.float32)


def lesion_aps(dataset, score):
    """Per lesion (LESIONS order): AP and prevalence pooled over a prepared split; score(item) ->
    float (4, H, W) in [0, 1]."""
    total, pixels = None, 0
    for i in range(len(dataset)):
        item = dataset[i]
        pixels += int(item["fov"].sum())
        probs = torch.from_numpy(np.asarray(score(item), dtype=np.float32))[None]  # (1, 4, H, W)
        counts = binned_counts(probs, torch.from_numpy(item["masks"][None]),
                               torch.from_numpy(item["fov"][None]), ap_bins=AP_BINS)
        # counts pooled over the split, then one AP per lesion
        total = counts if total is None else [a + c for a, c in zip(total, counts)]
    m = pr_metrics(*total)
    return [float(v) for v in m["ap"]], [int(p) / max(pixels, 1) for p in total[2]]


def model_score(models):
    """score(item) -> the models' probabilities (4, H, W) for a prepared item."""
    @torch.inference_mode()
    def score(item):
        return predict(models, to_input(item["image"][None], "cpu"))[0].numpy()
    return score


def heldout_figure(path, dataset, models):
    """One maps.panel per held-out photograph (image | ground truth | prediction at p >= 0.5, the
    lesion colours and legend of every map), stacked; the padding cropped away."""
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        ys, xs = np.nonzero(item["fov"])
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        probs = model_score(models)(item) * item["fov"]
        rows.append(maps.panel(item["image"][box], probs[(slice(None),) + box],
                               item["masks"][(slice(None),) + box], item["fov"][box]))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    utils.write_atomic(path, lambda f: Image.fromarray(np.concatenate(rows)).save(f, "PNG"))


def targets(test):
    """{lesion: met?} of the held-out row: AP above the baseline, >= FOLD x prevalence (and
    EX >= EX_AP)."""
    return {les: bool(test["ap"][k] > test["baseline_ap"][k]
                      and test["ap"][k] >= FOLD * test["prevalence"][k]
                      and (les != "EX" or test["ap"][k] >= EX_AP))
            for k, les in enumerate(LESIONS)}


def print_table(rows, seconds, used, met):
    print(f"\nreal lesions, {seconds:.0f} s of training; flags: {' '.join(used)}")
    print(f"{'':10s}{'lesion':>7s}{'AP':>8s}{'prev.':>9s}{'AP/prev':>8s}{'baseline':>9s}"
          f"{'target':>8s}")
    for split, r in rows.items():
        name = "train" if split == "train" else "held-out"
        for k, les in enumerate(LESIONS):
            ok = ("met" if met[les] else "MISSED") if split == "test" else ""
            print(f"{name:10s}{les:>7s}{r['ap'][k]:8.3f}{r['prevalence'][k]:9.5f}"
                  f"{r['ap'][k] / max(r['prevalence'][k], 1e-12):8.1f}{r['baseline_ap'][k]:9.3f}"
                  f"{ok:>8s}")
    print(f"  target (held-out): AP above the baseline and >= {FOLD:g}x the prevalence; "
          f"EX >= {EX_AP}")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    # what this script sets and reads back: not for `--`
    own = {"train": ["IDR"], "root": [f"IDR={FIXTURE}"], "data_root": str(FIXTURE),
           "splits": [f"IDR={FIXTURE / 'split.json'}"], "cache": str(out / "cache"),
           "resolution": args.resolution, "out": str(out / "run")}
    # the recipe, this script's own flags, then the user's (the last of a flag wins in argparse)
    flags = recipe(args.resolution) + [
        "--train", "IDR", "--root", own["root"][0], "--data-root", own["data_root"],
        "--splits", own["splits"][0], "--cache", own["cache"], "--resolution", str(args.resolution),
        "--out", own["out"], "--device", "cpu", "--workers", "0"] + args.extra
    parsed = train.parse_args(flags)
    # NOTE: compared after parsing, so abbreviations (--ou x) are caught too
    for dest, value in own.items():
        if getattr(parsed, dest) != value:
            p.error(f"--{dest.replace('_', '-')} after `--`: real.py sets it itself "
                    "(its own --resolution and --out choose them)")
    start = time.perf_counter()
    train.run(parsed)
    seconds = time.perf_counter() - start
    models = load_models(str(out / "run" / "best.pt"), "cpu")
    rows = {}  # per split and lesion: the model's AP, the prevalence, the baseline's AP
    for split in ("train", "test"):
        ds = data.PreparedDataset(out / "cache", "IDR", args.resolution, split)
        ap, prevalence = lesion_aps(ds, model_score(models))
        base, _ = lesion_aps(ds, lambda it: baseline(it["image"], it["fov"]))
        rows[split] = {"n_images": len(ds), "ap": ap, "prevalence": prevalence,
                       "baseline_ap": base}
    heldout_figure(out / "heldout.png",
                   data.PreparedDataset(out / "cache", "IDR", args.resolution, "test"), models)
    used, met = recipe(args.resolution, args.extra), targets(rows["test"])
    report = {"flags": used, "resolution": args.resolution, "train_seconds": round(seconds, 1),
              "threads": args.threads, "lesions": list(LESIONS), **rows, "targets_met": met}
    write_json(out / "real.json", report)
    print_table(rows, seconds, used, met)
    print(f"figure: {out / 'heldout.png'}; numbers: {out / 'real.json'}")
    return report


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: rerun the same command (the prepared cache is kept)")
