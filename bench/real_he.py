"""Does the recipe learn real lesions? Real IDRiD haemorrhages (HE), trained from scratch on CPU
(issue 18).

    python bench/real_he.py --out /tmp/real_he           # the recipe of BENCHMARKS.md ("Real HE")
    python bench/real_he.py --out /tmp/real_he_paper -- --lesion-patches 0 --lr 1e-3   # a variant

The 14 real photographs of tests/fixtures/idrid-he14 (downscaled 4x, HE masks only), split by the
fixture's split.json (8 train, 2 validation, 4 held out), prepared at --resolution. One train.py
run with the recipe's flags plus any given after `--` (train.py flags), then the floor-free AP
(docs/PROTOCOL.md) of best.pt on its own training images and on the held-out ones, beside the
prevalence and a baseline without learning: the darkness of the green channel relative to its
median inside the FOV. Prints one table and writes OUT/real_he.json and OUT/heldout.png (image |
ground truth | prediction per held-out photograph).
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
    p = utils.Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True,
                   help="work folder: cache, run, real_he.json, heldout.png")
    p.add_argument("--resolution", type=int, default=512,
                   help="prepared size (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("extra", nargs="*",
                   help="train.py flags after `--`, added to (and overriding) the recipe")
    return p


utils.start(__name__, build_parser)  # --help before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from utils import write_json  # noqa: E402
from kernels import AP_BINS, binned_counts, pr_metrics  # noqa: E402
from model import load_models  # noqa: E402
from protocol import predict, to_input  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "idrid-he14"
HE = data.LESIONS.index("HE")
# The recipe (BENCHMARKS.md, "Real HE"): what the run used, plus the measured changes.
RECIPE = ["--encoder", "resnet18", "--no-pretrained", "--patch", "128", "--batch", "8",
          "--iters", "400", "--lr", "1e-3", "--warmup", "20", "--val-every", "50",
          "--lesions", "HE", "--lesion-patches", "0.5", "--local-contrast", "8"]


def merged_flags(recipe, extra):
    """The flags train.py ends up with: recipe + extra, where a flag of extra replaces the recipe's
    flag of the same destination (`--iters=150` replaces `--iters 400`, `--pretrained` replaces
    `--no-pretrained`) in its place; flags train.py collects (`append`) are all kept, and new flags
    come last.

    >>> merged_flags(["--iters", "400", "--no-pretrained"], ["--iters", "150"])
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
    for g in groups(recipe) + groups(extra):
        action = action_of(g[0])
        key = g[0] if action is None else action.dest
        if isinstance(action, argparse._AppendAction):
            key = (key, len(merged))  # every occurrence counts
        merged[key] = g  # a dict keeps the first one's place
    return [t for g in merged.values() for t in g]


def darkness(image, fov):
    """The baseline: how much darker than the fundus median the green channel is, in [0, 1] (no
    learning)."""
    g = image[..., 1].astype(np.float32)
    med = float(np.median(g[fov])) if fov.any() else 1.0
    return np.clip((med - g) / max(med, 1.0), 0.0, 1.0) * fov


def he_ap(dataset, score):
    """(AP, prevalence) of HE pooled over a prepared split; score(item) -> float (H, W) in
    [0, 1]."""
    total, pixels = None, 0
    for i in range(len(dataset)):
        item = dataset[i]
        pixels += int(item["fov"].sum())
        # (1, 4, H, W): HE's channel filled, the others 0 (only HE is read back)
        probs = torch.zeros((1, len(data.LESIONS)) + item["fov"].shape)
        probs[0, HE] = torch.from_numpy(np.asarray(score(item), dtype=np.float32))
        counts = binned_counts(probs, torch.from_numpy(item["masks"][None]),
                               torch.from_numpy(item["fov"][None]), ap_bins=AP_BINS)
        # counts pooled over the split, then one AP
        total = counts if total is None else [a + c for a, c in zip(total, counts)]
    m = pr_metrics(*total)
    return float(m["ap"][HE]), int(total[2][HE]) / max(pixels, 1)


def model_score(models):
    """score(item) -> the models' HE probability (H, W) for a prepared item."""
    @torch.inference_mode()
    def score(item):
        return predict(models, to_input(item["image"][None], "cpu"))[0, HE].numpy()
    return score


def heldout_figure(path, dataset, models):
    """One row per held-out photograph: image | ground truth | HE probability (0 outside the
    FOV)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    n = len(dataset)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for r in range(n):
        item = dataset[r]
        # the padding is never scored: not drawn either
        probs = model_score(models)(item) * item["fov"]
        for c, (title, img) in enumerate((("image", item["image"]),
                                          ("ground truth HE", item["masks"][HE]),
                                          ("prediction (HE probability)", probs))):
            ax = axes[r, c]
            shown = ax.imshow(img, cmap=None if c == 0 else "magma", vmin=0, vmax=1 if c else None)
            ax.set_title(f"{item['id']}: {title}", fontsize=9)
            ax.axis("off")
            if c == 2:  # the probability's scale, 0 (black) to 1
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    fig.suptitle("held-out real IDRiD photographs (HE): image | ground truth | prediction",
                 fontsize=10)
    fig.tight_layout()
    utils.save_figure(fig, path, dpi=80)
    plt.close(fig)


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
    flags = RECIPE + ["--train", "IDR", "--root", own["root"][0], "--data-root", own["data_root"],
                      "--splits", own["splits"][0], "--cache", own["cache"],
                      "--resolution", str(args.resolution), "--out", own["out"], "--device", "cpu",
                      "--workers", "0"] + args.extra
    parsed = train.parse_args(flags)
    # NOTE: compared after parsing, so abbreviations (--ou x) are caught too
    for dest, value in own.items():
        if getattr(parsed, dest) != value:
            p.error(f"--{dest.replace('_', '-')} after `--`: real_he.py sets it itself "
                    "(its own --resolution and --out choose them)")
    start = time.perf_counter()
    train.run(parsed)
    seconds = time.perf_counter() - start
    models = load_models(str(out / "run" / "best.pt"), "cpu")
    rows = {}  # per split: the model's AP, the prevalence, the darkness baseline's AP
    for split in ("train", "test"):
        ds = data.PreparedDataset(out / "cache", "IDR", args.resolution, split)
        ap, prevalence = he_ap(ds, model_score(models))
        base, _ = he_ap(ds, lambda it: darkness(it["image"], it["fov"]))
        rows[split] = {"n_images": len(ds), "ap": ap, "prevalence": prevalence, "baseline_ap": base}
    heldout_figure(out / "heldout.png",
                   data.PreparedDataset(out / "cache", "IDR", args.resolution, "test"), models)
    used = merged_flags(RECIPE, args.extra)
    report = {"flags": used, "resolution": args.resolution, "train_seconds": round(seconds, 1),
              "threads": args.threads, **rows}
    write_json(out / "real_he.json", report)
    print(f"\nreal HE, {seconds:.0f} s of training; flags: {' '.join(used)}")
    print(f"{'':10s}{'images':>7s}{'AP':>8s}{'prev.':>8s}{'AP/prev':>8s}{'dark':>8s}")
    for split, r in rows.items():
        name = "train" if split == "train" else "held-out"
        print(f"{name:10s}{r['n_images']:7d}{r['ap']:8.3f}{r['prevalence']:8.4f}"
              f"{r['ap'] / r['prevalence']:8.1f}{r['baseline_ap']:8.3f}")
    print(f"figure: {out / 'heldout.png'}; numbers: {out / 'real_he.json'}")
    return report


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: rerun the same command (the prepared cache is kept)")
