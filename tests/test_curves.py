"""curves.py: curves.png from hand-written log.jsonl files (what is drawn, killed runs, errors),
train.py's curves.png at every validation, and the sweep figure."""
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

import curves

ROOT = Path(__file__).resolve().parents[1]

# curves.SIZE x DPI, written out: a change of size is a change the reader should see
SIZE = (1100, 850)


def write_log(run_dir, records, tail="", args=None):
    """log.jsonl as train.py writes it (NaN as null), plus `tail` (a line cut short), and
    args.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if args is not None:
        (run_dir / "args.json").write_text(json.dumps(args))
    return run_dir


def train_rec(step, loss, lr=1e-3, step_s=None):
    rec = {"step": step, "split": "train", "loss": loss, "lr": lr, "patches_per_s": 5.0}
    return rec if step_s is None else {**rec, "step_s": step_s}


def val_rec(step, loss, dice, best):
    """dice: per lesion EX, HE, MA, CWS (None = absent, as train.py writes NaN)."""
    present = [d for d in dice if d is not None]
    return {"step": step, "split": "val", "loss": loss, "mean_aupr": 0.6, "mean_ap": 0.25,
            "mean_dice": sum(present) / len(present), "aupr": {}, "ap": {},
            "dice": dict(zip(("EX", "HE", "MA", "CWS"), dice)), "best": best, "minimum_at": None}


RECORDS = [train_rec(10, 1.5), train_rec(20, 0.9), val_rec(20, 1.2, (0.1, 0.2, 0.05, None), True),
           train_rec(30, 0.6), train_rec(40, 0.4), val_rec(40, 0.8, (0.3, 0.4, 0.1, None), True),
           train_rec(50, 0.3), val_rec(50, 0.9, (0.35, 0.45, 0.12, None), False)]


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_from_hand_written_log(tmp_path):
    run = write_log(tmp_path / "IDR+MES" / "s0", RECORDS,
                    args={"loss": "bce+dice", "val_metric": "loss"})
    path = curves.plot_run(run)
    assert path == run / "curves.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == SIZE
    # no temporary file
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "curves.png", "log.jsonl"]

    fig = curves.curves_figure(run)
    loss_ax, score_ax, lr_ax, time_ax = fig.axes
    lines = lines_by_label(loss_ax)
    train, val = (lines["training loss (mean over the last steps)"],
                  lines["validation loss (pooled)"])
    assert (list(train.get_xdata()) == [10, 20, 30, 40, 50]
            and list(train.get_ydata()) == [1.5, 0.9, 0.6, 0.4, 0.3])
    assert list(val.get_xdata()) == [20, 40, 50] and list(val.get_ydata()) == [1.2, 0.8, 0.9]
    assert (loss_ax.get_yscale() == "log" and "bce+dice" in loss_ax.get_ylabel()
            and "step" in loss_ax.get_xlabel())
    scores = lines_by_label(score_ax)
    assert list(scores["Dice HE"].get_ydata()) == [0.2, 0.4, 0.45]
    assert scores["Dice, mean over lesions"].get_ydata()[1] == pytest.approx((0.3 + 0.4 + 0.1) / 3)
    assert "Dice CWS (absent from validation)" in scores  # all null in the log
    # best.pt: the last validation written with "best": true (step 40, not the last one)
    best = [ln for ln in score_ax.get_lines() if ln.get_label().startswith("best.pt")]
    assert (len(best) == 1 and list(best[0].get_xdata()) == [40, 40]
            and "val loss" in best[0].get_label())
    for ax in fig.axes:
        assert ax.get_legend() is None and ax.get_xlabel() and ax.get_ylabel()  # one for all
    (legend,) = fig.legends
    assert "Dice HE" in [t.get_text() for t in legend.get_texts()]
    assert "IDR+MES/s0" in fig.get_suptitle()


def test_lesions_not_trained_are_not_drawn(tmp_path):
    """train.py --lesions HE: the other lesions score NaN in validation and have no curve."""
    recs = [train_rec(10, 1.0), {**val_rec(10, 1.0, (None, 0.3, None, None), True)}]
    fig = curves.curves_figure(write_log(tmp_path / "r", recs,
                                         args={"lesions": ["HE"], "loss": "bce"}))
    labels = lines_by_label(fig.axes[1])
    assert "Dice HE (the one lesion trained)" in labels
    assert not any(k.startswith(("Dice EX", "Dice MA", "Dice CWS")) for k in labels)
    assert "Dice, mean over lesions" not in labels  # one lesion: its mean would hide its curve
    assert "bce" in fig.axes[0].get_ylabel()


def test_log_without_validation_still_plots_the_loss(tmp_path):
    run = write_log(tmp_path / "r", [train_rec(10, 1.0), train_rec(20, 0.7)])
    with Image.open(curves.plot_run(run)) as im:
        assert im.size == SIZE
    fig = curves.curves_figure(run)
    assert list(lines_by_label(fig.axes[0])["training loss (mean over the last steps)"]
                .get_ydata()) == [1.0, 0.7]
    assert [t.get_text() for t in fig.axes[1].texts] == ["no validation yet"]


def test_killed_run_log_does_not_crash(tmp_path):
    """A run killed mid-write leaves a last line cut short; a resumed run rewrites steps (the
    last one counts)."""
    recs = RECORDS[:3] + ["not json", {"no": "step"}] + [train_rec(20, 0.8)]
    run = tmp_path / "r"
    run.mkdir()
    (run / "log.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                           for r in recs)
                                   + '{"step": 30, "split": "tra')
    train, val = curves.read_log(run / "log.jsonl")
    assert ([(r["step"], r["loss"]) for r in train] == [(10, 1.5), (20, 0.8)]
            and [r["step"] for r in val] == [20])
    with Image.open(curves.plot_run(run)) as im:
        assert im.size == SIZE


def test_nan_loss_is_a_gap_and_linear_axis(tmp_path):
    """A NaN validation loss (null in the log, a diverged run) is no point; the loss axis stays
    usable."""
    recs = [train_rec(10, 1.0), val_rec(10, None, (0.1, 0.1, 0.1, 0.1), True), train_rec(20, 0.0)]
    fig = curves.curves_figure(write_log(tmp_path / "r", recs))
    val = lines_by_label(fig.axes[0])["validation loss (pooled)"]
    assert math.isnan(val.get_ydata()[0])
    assert fig.axes[0].get_yscale() == "linear"  # a loss of 0 has no place on a log axis


def test_errors_and_refresh_never_raises(tmp_path, capsys, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no log.jsonl in .*nowhere"):
        curves.plot_run(tmp_path / "nowhere")
    empty = write_log(tmp_path / "empty", [], tail="garbage")
    with pytest.raises(ValueError, match="holds no training or validation record"):
        curves.plot_run(empty)
    assert curves.refresh(empty) is None  # train.py's hook: a warning, the run goes on
    err = capsys.readouterr().err
    assert (err.startswith("warning:") and "curves.png not written" in err
            and len(err.strip().splitlines()) == 1)
    monkeypatch.setattr(sys, "argv", ["curves.py", str(tmp_path / "nowhere")])
    # the command line: one line
    with pytest.raises(SystemExit, match="^error: no log.jsonl in .*nowhere"):
        runpy.run_path(curves.__file__, run_name="__main__")


def test_plot_sweep(tmp_path):
    runs = tmp_path / "runs"
    for combo, seed in (("IDR+MES", 0), ("IDR+MES", 1), ("IDR", 0)):
        write_log(runs / combo / f"s{seed}", RECORDS)
    write_log(runs / "IDR" / "s1", RECORDS[:2])  # no validation yet: no line
    write_log(runs / "tune" / "trial_0", RECORDS)  # not a run of the sweep layout
    assert list(curves.sweep_logs(runs)) == ["IDR", "IDR+MES"]  # all_combos order: by size
    path = curves.plot_sweep(runs, tmp_path / "out" / "sweep.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 0
    assert curves.plot_sweep(tmp_path / "empty", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_train_run_writes_curves(tiny_runs, tmp_path, capsys):
    runs, _ = tiny_runs(tmp_path)
    out = capsys.readouterr().out
    for seed in (0, 1):
        run = runs / "IDR+MES" / f"s{seed}"
        with Image.open(run / "curves.png") as im:
            assert im.size == SIZE
        assert f"curves in {run / 'curves.png'}" in out  # the run's summary names it
        fig = curves.curves_figure(run)
        val = lines_by_label(fig.axes[0])["validation loss (pooled)"]
        # --iters 4 --val-every 2: refreshed at each validation
        assert list(val.get_xdata()) == [2, 4]
        logged = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                  if r["split"] == "train"]
        assert all(r["step_s"] > 0 for r in logged)  # train.py logs the seconds per step
        (sec,) = [ln for ln in fig.axes[3].get_lines() if ln.get_label().startswith("seconds")]
        assert list(sec.get_ydata()) == [r["step_s"] for r in logged]


# ---- the learning rate, the time per step, the legend (issue 26) ----
def overlaps(a, b):
    """Do two display-space bounding boxes share an area (touching edges do not count)?"""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("lesions", [["HE"], ["EX", "HE", "MA", "CWS"]])
def test_legend_never_overlaps_a_panel(tmp_path, lesions):
    """Every legend lies inside the figure and off every panel (its axes, ticks, labels), for a
    one-lesion run (nothing to make it wide) and a four-lesion one (the most entries)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    dice = [0.2 if x in lesions else None for x in ("EX", "HE", "MA", "CWS")]
    recs = [train_rec(10, 1.0), val_rec(10, 1.0, dice, True), train_rec(20, 0.8),
            val_rec(20, 0.9, dice, True)]
    fig = curves.curves_figure(write_log(tmp_path / "r", recs,
                                         args={"lesions": lesions, "val_metric": "loss"}))
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    page = fig.bbox
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
        for ax in fig.axes:
            assert not overlaps(box, ax.get_tightbbox(renderer, bbox_extra_artists=[])), ax.title
    for a, b in zip(legends, legends[1:]):
        assert not overlaps(a.get_window_extent(renderer), b.get_window_extent(renderer))


def test_learning_rate_and_time_per_step_panels(tmp_path):
    """The learning rate as logged; the seconds per step as logged (step_s), or --batch over
    patches/s for a log without it."""
    recs = [train_rec(10, 1.0, lr=1e-4, step_s=0.5), train_rec(20, 0.8, lr=3e-4, step_s=0.25),
            train_rec(30, 0.7, lr=2e-4)]  # an older log's record: no step_s
    fig = curves.curves_figure(write_log(tmp_path / "r", recs, args={"batch": 4}))
    _, _, lr_ax, time_ax = fig.axes
    (lr,) = [ln for ln in lr_ax.get_lines() if ln.get_label() == "learning rate"]
    assert list(lr.get_xdata()) == [10, 20, 30] and list(lr.get_ydata()) == [1e-4, 3e-4, 2e-4]
    (sec,) = [ln for ln in time_ax.get_lines() if ln.get_label().startswith("seconds per")]
    assert list(sec.get_ydata()) == [0.5, 0.25, 4 / 5.0]  # batch / patches per second
    assert "learning rate" in lr_ax.get_ylabel() and "seconds" in time_ax.get_ylabel()
