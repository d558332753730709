"""Training curves from a run's log.jsonl: OUT/curves.png (loss and validation scores against step).

    python curves.py runs/IDR+MES/s0                   # -> runs/IDR+MES/s0/curves.png
    python curves.py runs/*/s0                         # one curves.png per run folder
    python -c "import curves; curves.plot_sweep('runs', 'report/sweep_curves.png')"  # as report.py

train.py refreshes curves.png at every validation, like nnU-Net's progress.png: the training loss
(every --log-every steps) and the validation loss top left, the validation Dice per lesion, their
mean and the mean AP (floor-free, docs/PROTOCOL.md) top right, the learning rate and the seconds
per training step below, the step of best.pt on every panel, and one legend under them all.
report.py draws the sweep's validation curves, one panel per combination, with plot_sweep. Plain
matplotlib Figures (no pyplot): importing this module never changes the backend of a notebook that
imports train.py.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import utils


def build_parser():
    p = utils.Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run folders holding log.jsonl (train.py --out)")
    return p


utils.start(__name__, build_parser)  # --help before matplotlib loads; a Ctrl-C meanwhile: one line

from matplotlib import patheffects  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from data.ids import LESION_COLOURS, LESIONS, all_combos  # noqa: E402

# One colour per lesion, the overlays' (data.ids.LESION_COLOURS): EX yellow, HE red, MA green, CWS
# cyan.
HEX_COLOURS = {lesion: "#{:02x}{:02x}{:02x}".format(*LESION_COLOURS[lesion]) for lesion in LESIONS}
# NOTE: yellow and cyan vanish on white: a dark edge keeps the fixed colours readable.
EDGE = [patheffects.withStroke(linewidth=3.2, foreground="0.2")]
SIZE, DPI = (11, 8.5), 100  # curves.png is 1100 x 850 px
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 0.6, not 6 x 10^-1, on the log axis


# ---- reading -------------------------------------------------------------------------------------
def _num(x):
    """JSON number or null (NaN is written as null) -> float."""
    return float("nan") if x is None else float(x)


def read_log(path):
    """log.jsonl -> (training records, validation records), each sorted by step, one per step (the
    last written).

    Lines that do not parse are skipped: the last line of a run killed mid-write is cut short.
    """
    by_split = {"train": {}, "val": {}}
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            step, split = int(rec["step"]), rec["split"]
        except (ValueError, KeyError, TypeError):
            continue
        if split in by_split:  # one record per step: the last one written wins
            by_split[split][step] = rec
    return tuple([by_split[k][s] for s in sorted(by_split[k])] for k in ("train", "val"))


def best_step(val):
    """The step of best.pt: the last validation that was a new best (train.py writes "best": true
    then)."""
    steps = [r["step"] for r in val if r.get("best")]
    return steps[-1] if steps else None


def _run_args(run_dir):
    """The run's args.json (--loss, --val-metric, --lesions), or {} when it is missing or
    unreadable."""
    try:
        args = json.loads((Path(run_dir) / "args.json").read_text())
    except (OSError, ValueError):
        return {}
    return args if isinstance(args, dict) else {}


# ---- one run -------------------------------------------------------------------------------------
def _loss_panel(ax, train, val, kind):
    """Left panel: the training loss (a line) and the validation loss (dots) against step."""
    # markers only while the training curve is sparse; past 50 points they hide the line
    ax.plot([r["step"] for r in train], [_num(r.get("loss")) for r in train], color="C0", lw=1,
            alpha=0.8, marker="." if len(train) < 50 else None,
            label="training loss (mean over the last steps)")
    ax.plot([r["step"] for r in val], [_num(r.get("loss")) for r in val], "o-", color="C1", ms=4,
            lw=1.5, label="validation loss (pooled)")
    losses = [_num(r.get("loss")) for r in train + val]
    finite = [v for v in losses if math.isfinite(v)]  # a diverged step's NaN is no axis limit
    if finite and min(finite) > 0:  # a log axis needs positive values
        ax.set_yscale("log")  # the loss falls over decades; a linear axis flattens the late steps
        ax.yaxis.set_major_formatter(PLAIN)
        # minor ticks (2, 3, ... x 10^k) labelled only when the axis spans less than two decades
        ax.yaxis.set_minor_formatter(PLAIN if max(finite) < 100 * min(finite) else NullFormatter())
    ax.set(xlabel="step (optimizer updates)", ylabel=f"loss ({kind}, FOV pixels)", title="loss")


def _score_panel(ax, val, lesions):
    """Right panel: validation Dice per lesion in its fixed colour, their mean and the mean AP."""
    if not val:  # before the first validation: an empty panel that says so
        ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes,
                color="0.4")
        ax.set(xlabel="step (optimizer updates)", ylabel="validation score",
               title="validation scores")
        return
    steps = [r["step"] for r in val]
    for lesion in lesions:  # the trained ones (train.py --lesions): the others score NaN
        dice = [_num((r.get("dice") or {}).get(lesion)) for r in val]
        absent = " (absent from validation)" if all(math.isnan(v) for v in dice) else ""
        only = " (the one lesion trained)" if len(lesions) == 1 else ""
        ax.plot(steps, dice, "o-", ms=3, lw=1.5, color=HEX_COLOURS[lesion], path_effects=EDGE,
                label=f"Dice {lesion}{absent}{only}")
    if len(lesions) > 1:  # NOTE: one lesion's mean is that lesion's Dice: drawn over it, it hid it
        ax.plot(steps, [_num(r.get("mean_dice")) for r in val], "-", color="k", lw=2.2,
                label="Dice, mean over lesions")
    ax.plot(steps, [_num(r.get("mean_ap")) for r in val], "--", color="0.35", lw=1.5,
            label=f"AP {lesions[0]} (floor-free)" if len(lesions) == 1
            else "AP, mean over lesions (floor-free)")
    ax.set_ylim(bottom=0)  # scores from 0: a flat curve near 0 is not magnified
    ax.set(xlabel="step (optimizer updates)", ylabel="validation score (pooled over images)",
           title="validation scores")


def _lr_panel(ax, train):
    """Bottom left: the learning rate of each logged step's update (warmup, then cosine)."""
    ax.plot([r["step"] for r in train], [_num(r.get("lr")) for r in train], "-", color="C2",
            lw=1.5, marker="." if len(train) < 50 else None, label="learning rate")
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))  # 3e-4 as 3 x 1e-4
    ax.set(xlabel="step (optimizer updates)", ylabel="learning rate", title="learning rate")


def _time_panel(ax, train, batch):
    """Bottom right: seconds per training step (validation excluded), as train.py logs them;
    older logs: from patches/s and --batch (one process assumed)."""
    seconds = [_num(r["step_s"]) if "step_s" in r else batch / _num(r.get("patches_per_s"))
               if batch and r.get("patches_per_s") else math.nan for r in train]
    ax.plot([r["step"] for r in train], seconds, "-", color="C4", lw=1.2,
            marker="." if len(train) < 50 else None,
            label="seconds per training step (mean since the last validation)")
    ax.set_ylim(bottom=0)
    ax.set(xlabel="step (optimizer updates)", ylabel="seconds per step", title="time per step")


def _legend(fig, axes):
    """One legend under all the panels: never over a curve, whatever the number of entries."""
    entries = {}  # label -> handle; best.pt's line is on every panel, listed once
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside lower center",
               ncol=min(3, len(entries)), fontsize=8, frameon=False)


def curves_figure(run_dir):
    """The Figure of curves.png for one run folder (see the module docstring)."""
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"no log.jsonl in {run_dir} (train.py writes it)")
    train, val = read_log(log)
    if not train and not val:
        raise ValueError(f"{log} holds no training or validation record yet")
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    # one step axis: the panels read side by side and one above the other
    (loss_ax, score_ax), (lr_ax, time_ax) = axes = fig.subplots(2, 2, sharex=True)
    axes = list(axes.ravel())
    best, args = best_step(val), _run_args(run_dir)
    # the loss's name, the trained lesions and --batch from args.json; without it, the defaults
    _loss_panel(loss_ax, train, val, args.get("loss", "bce+dice"))
    _score_panel(score_ax, val, [c for c in LESIONS if c in (args.get("lesions") or LESIONS)])
    _lr_panel(lr_ax, train)
    _time_panel(time_ax, train, args.get("batch"))
    if best is not None:  # a dotted line on every panel at best.pt's step
        metric = args.get("val_metric")
        for ax in axes:
            ax.axvline(best, color="0.5", ls=":", lw=1.2,
                       label=f"best.pt: step {best}" + (f" (best val {metric})" if metric else ""))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.xaxis.set_tick_params(labelbottom=True)  # sharex hides the top row's step labels
    # below the panels: a legend inside would hide the curves it names
    _legend(fig, axes)
    last = max([r["step"] for r in train + val])
    name = "/".join(run_dir.resolve().parts[-2:])  # COMBO/sSEED: which run, in the title
    fig.suptitle(f"Training curves of {name}: {len(val)} validation(s), last logged step {last} "
                 f"(from {log.name})", fontsize=10)
    return fig


def _save(fig, path):
    """Write the figure to path through a temporary file renamed into place (a reader never sees
    half a PNG)."""
    return utils.save_figure(fig, path)


def plot_run(run_dir, path=None):
    """Write RUN_DIR/curves.png (or `path`) from RUN_DIR/log.jsonl -> the path written."""
    return _save(curves_figure(run_dir), path or Path(run_dir) / "curves.png")


def refresh(run_dir):
    """plot_run for train.py: a figure that fails to draw or write is a warning, never the end of
    a run."""
    try:
        return plot_run(run_dir)
    except (OSError, ValueError) as e:
        print(f"warning: {Path(run_dir) / 'curves.png'} not written: {e}", file=sys.stderr)
        return None


# ---- the sweep -----------------------------------------------------------------------------------
def sweep_logs(runs_dir):
    """{combination: {seed: validation records}} of RUNS/<COMBO>/s<SEED>/log.jsonl, in the order of
    data.ids.all_combos (by size, then canonical); other folders are not runs of the sweep."""
    found = {}
    for log in Path(runs_dir).glob("*/s*/log.jsonl"):
        seed = re.fullmatch(r"s(\d+)", log.parent.name)  # s0, s12; not "sweep" or "s0_old"
        val = read_log(log)[1] if seed else []
        if val:  # a run with no validation yet has no curve
            found.setdefault(log.parent.parent.name, {})[int(seed.group(1))] = val
    return {c: dict(sorted(found[c].items())) for c in all_combos() if c in found}


def plot_sweep(runs_dir, path):
    """Validation mean Dice against step, one panel per combination, one line per seed, a star at
    each run's best.pt (the checkpoint the tables evaluate) -> the path written, or None when no run
    has a validation."""
    logs = sweep_logs(runs_dir)
    if not logs:
        return None
    # at most 5 panels a row: the 31 combinations of the full sweep in 7 rows
    cols = min(5, len(logs))
    rows = math.ceil(len(logs) / cols)
    fig = Figure(figsize=(2.7 * cols + 0.6, 2.1 * rows + 1.0), dpi=DPI, layout="constrained")
    # shared axes: the combinations compare at a glance
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    seeds = sorted({s for runs in logs.values() for s in runs})  # one colour per seed, everywhere
    for ax, (combo, runs) in zip(axes, logs.items()):
        for seed, val in runs.items():
            colour = f"C{seeds.index(seed) % 10}"
            ax.plot([r["step"] for r in val], [_num(r.get("mean_dice")) for r in val], "-", lw=1.2,
                    color=colour, label=f"seed {seed}")
            best = best_step(val)
            at = next((r for r in val if r["step"] == best), None)
            if at is not None:  # the star: best.pt's validation Dice
                ax.plot(best, _num(at.get("mean_dice")), "*", ms=9, color=colour, mec="k", mew=0.6)
        ax.set_title(combo, fontsize=9)
        ax.tick_params(labelsize=7)
    for k, ax in enumerate(axes):
        if k >= len(logs):  # the last row's empty places
            ax.set_visible(False)
        elif k + cols >= len(logs):  # the lowest panel of its column: it carries the step axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("step (optimizer updates)", fontsize=8)
    axes[0].set_ylim(bottom=0)
    # proxy artists: one legend for the whole figure, not one per panel
    handles = [axes[0].plot([], [], "-", color=f"C{k % 10}", label=f"seed {s}")[0]
               for k, s in enumerate(seeds)]
    handles.append(axes[0].plot([], [], "*", ms=9, color="w", mec="k",
                                label="best.pt (evaluated)")[0])
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9), fontsize=8,
               frameon=False)
    fig.supylabel("validation Dice (mean over lesions)", fontsize=9)
    n = sum(len(r) for r in logs.values())
    fig.suptitle(f"Validation curves of the sweep: {n} run(s) of {len(logs)} combination(s) "
                 f"({Path(runs_dir).name}/<COMBO>/s<SEED>/log.jsonl)", fontsize=10)
    return _save(fig, path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    for run_dir in args.run_dirs:
        print(f"wrote {plot_run(run_dir)}")


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: rerun the same command")
