r"""Characterise the datasets (paper section 2.1): Table 1, labelling style (Figure 2), image
quality (Figure 1).

    python characterize.py --datasets IDR,DDR,FGA,RET,MES --data-root data_raw \
        --out report/characterize
    python -m data.synthetic --out demo/data && python characterize.py --data-root demo/data \
        --cache demo/cache --resolution 256
    python characterize.py --data-root data_raw --out report/characterize \
        --quality-weights DenseNet121_v3_v1.tar

Writes OUT/characterize.json, OUT/characterize.md (Table 1 and the measures), OUT/per_image.csv (per
image: lesion counts and mean areas, quality measures), OUT/fig2_labelling_style.png,
OUT/quality_measures.png and, with the MCF-Net weights of Fu et al. (github.com/HzFu/EyeQ),
OUT/fig1_quality_grades.png. The rule and the measures: docs/STUDY.md, "Characterization".
"""
import argparse
import csv
import json
import math
import textwrap
from pathlib import Path

import utils
from data.flags import add_data_args, add_dataset_list
from data.ids import DATASET_IDS


def build_parser():
    """The command line: datasets, output, resolution, the style rule's ratio, MCF-Net, data."""
    p = utils.Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_list(p, "--datasets", "datasets to characterize", default=list(DATASET_IDS))
    p.add_argument("--out", default="report/characterize",
                   help="output folder (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=1536,
                   help="common prepared resolution at which lesions are counted and measured; the "
                        "training resolution reuses its prepared cache and keeps MAs at their size "
                        "(default: %(default)s)")
    p.add_argument("--coarse-ratio", type=float, default=3.0,
                   help="an image is coarse when its EX/MA components are this many times larger "
                        "than in the finest-labelled dataset (default: %(default)s)")
    q = p.add_argument_group("image quality network (MCF-Net)")
    q.add_argument("--quality-weights", default=None,
                   help="MCF-Net checkpoint of Fu et al. (DenseNet121_v3_v1.tar, "
                        "github.com/HzFu/EyeQ); without it only the simple measures are reported "
                        "(default: %(default)s)")
    # None: resolved after parsing (torch is not loaded for --help)
    q.add_argument("--device", default=None,
                   help="device for MCF-Net (default: cuda if available, else cpu)")
    q.add_argument("--batch-size", type=int, default=16,
                   help="MCF-Net batch size (default: %(default)s)")
    add_data_args(p)
    return p


utils.start(__name__, build_parser)  # --help before torch loads; a Ctrl-C while it loads: one line

import matplotlib  # noqa: E402

if __name__ == "__main__":
    # files only, no display; imported (predict.py's quality flags), the caller's backend stays
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage, stats  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from data import LESIONS  # noqa: E402

SPLITS = ("train", "val", "test")
# the lesions whose outlines differ most between labelling styles (paper, Fig. 2)
STYLE_LESIONS = ("EX", "MA")
MIN_IMAGES = 3  # fewer scored images than this: no median is trusted, the style is "undetermined"
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # diagonal neighbours belong to the same lesion
COLOURS = {"IDR": "tab:blue", "DDR": "tab:green", "FGA": "tab:purple", "RET": "tab:red",
           "MES": "tab:orange"}
OWN_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")  # one's own datasets
QUALITY_MEASURES = {  # name -> what it is (shown in the markdown and on the figure)
    "sharpness": "variance of the Laplacian of the luminance (after a 1 px Gaussian) over the "
                 "luminance variance, inside the FOV",
    "noise": "Immerkaer's noise sigma of the luminance inside the FOV (grey levels)",
    "contrast": "standard deviation of the luminance inside the FOV (grey levels)",
    "uniformity": "1 - coefficient of variation of the heavily blurred luminance inside the FOV",
    "fov_coverage": "share of the square image inside the FOV",
}


# --------------------------------------------------------------------------- per image measures
def component_stats(mask):
    """Lesion count and mean lesion area (pixels) of one binary mask (H, W), 8-connectivity.
    An empty mask gives (0, nan): no lesion has no mean size (NaN keeps it out of medians and
    plots)."""
    _, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count == 0:
        return 0, math.nan
    # the components partition the lesion pixels: their mean area is pixels / count
    return int(count), float(np.count_nonzero(mask)) / count


def quality_measures(image, fov):
    """Named, model-free quality measures of one prepared image: uint8 (R, R, 3), fov bool (R, R).
    Luminance in 8-bit grey levels (ITU-R BT.601 weights). Measured on an eroded FOV so the FOV rim
    (a black/bright step) does not count as image detail."""
    res = fov.shape[0]
    lum = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (R, R)
    inner = ndimage.binary_erosion(fov, iterations=max(2, res // 128))  # (R, R), the rim left out
    if inner.sum() < 16:  # degenerate FOV: nothing to measure
        return ({name: math.nan for name in QUALITY_MEASURES}
                | {"fov_coverage": float(fov.mean())})
    # NOTE: a 1 px Gaussian first, else sensor noise reads as sharpness (noisy images look
    # "sharp"); divided by the luminance variance so a dim or flat but sharp photograph does not
    # read as blurry.
    lap = ndimage.laplace(ndimage.gaussian_filter(lum, 1.0))
    contrast = float(lum[fov].std())
    # Immerkaer (1996), "Fast noise variance estimation": sigma = sqrt(pi/2) / 6 * mean |lum * N|.
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    noise = (math.sqrt(math.pi / 2) / 6
             * float(np.abs(ndimage.convolve(lum, kernel))[inner].mean()))
    # Illumination: blur at 1/16 of the image inside the FOV only (normalised convolution), on a
    # block-averaged copy (the wide Gaussian is the slow part; illumination has no fine detail
    # anyway).
    f = max(1, res // 64)  # block side: about 64 x 64 blocks
    n = res // f
    small = lambda a: a[: n * f, : n * f].reshape(n, f, n, f).mean((1, 3))  # noqa: E731  (n, n)
    lum_s, fov_s = small(lum * fov), small(fov.astype(np.float32))
    # blurred luminance over blurred FOV: the mean of the FOV pixels only near the rim
    blur = (ndimage.gaussian_filter(lum_s, n / 16)
            / np.maximum(ndimage.gaussian_filter(fov_s, n / 16), 1e-6))
    inner_s = small(inner.astype(np.float32)) > 0.99
    light = blur[inner_s] if inner_s.any() else blur[fov_s > 0.5]
    return {
        "sharpness": float(lap[inner].var() / max(lum[inner].var(), 1e-6)),
        "noise": noise,
        "contrast": contrast,
        "uniformity": float(1.0 - light.std() / max(light.mean(), 1e-6)),
        "fov_coverage": float(fov.mean()),
    }


# --------------------------------------------------------------------- the labelling-style rule
def style_rule_text(coarse_ratio, why_undetermined=""):
    """The labelling-style rule in words (written into characterize.md and under Figure 2)."""
    text = (f"Per image, lesion component sizes are compared with the finest-labelled dataset: for "
            f"EX and MA, ref = the lowest per-dataset median of log10(mean component area) "
            f"(8-connected, at the common resolution); an image's excess = mean over its present "
            f"EX/MA of log10(mean area) - ref. An image is in the coarse region when excess > "
            f"log10({coarse_ratio:g}) (components {coarse_ratio:g}x larger). A dataset is coarse "
            f"when >= 3/4 of its scored images are coarse, fine when <= 1/4, mixed in between "
            f"(images split between both regions); undetermined with < {MIN_IMAGES} scored images. "
            f"The rule is relative: with fewer than two scored datasets, or when none comes out "
            f"fine, every style is undetermined. Counts are reported, not used: they follow "
            f"disease severity as much as labelling style.")
    return text + (f" Here every style is undetermined: {why_undetermined}."
                   if why_undetermined else "")


def labelling_styles(stats_by_dataset, coarse_ratio=3.0):
    """The rule above, on per image statistics.

    stats_by_dataset: {ID: {"EX": {"count": (N,) ints, "area": (N,) floats (nan when absent)},
    "MA": {...}}} (the N images of a dataset, aligned across lesions).
    Returns ({ID: summary}, reference, rule text).
    """
    # the reference: per lesion, the dataset with the smallest median log10 area
    reference = {}
    for lesion in STYLE_LESIONS:
        medians = {}
        for ds, per in stats_by_dataset.items():
            area = np.asarray(per[lesion]["area"], float)
            area = area[np.asarray(per[lesion]["count"]) > 0]
            if len(area) >= MIN_IMAGES:
                medians[ds] = float(np.median(np.log10(area)))
        if medians:
            finest = min(medians, key=medians.get)
            reference[lesion] = {"dataset": finest, "median_log10_area": medians[finest]}
    summary = {}
    for ds, per in stats_by_dataset.items():
        excess = []  # per lesion: (N,) excess over the reference, nan where the lesion is absent
        out = {"median_log10_count": {}, "median_log10_area": {}, "n_with": {}}
        for lesion in STYLE_LESIONS:
            count = np.asarray(per[lesion]["count"], float)
            area = np.asarray(per[lesion]["area"], float)
            present = count > 0
            out["n_with"][lesion] = int(present.sum())
            out["median_log10_count"][lesion] = _median(np.log10(count[present]))
            out["median_log10_area"][lesion] = _median(np.log10(area[present]))
            if lesion in reference:
                e = np.full(len(count), np.nan)
                e[present] = np.log10(area[present]) - reference[lesion]["median_log10_area"]
                excess.append(e)
        if excess:
            e = np.stack(excess)  # (lesions, N)
            scored = ~np.isnan(e).all(0)  # images with EX or MA: the others say nothing of style
            image_excess = np.nanmean(e[:, scored], 0) if scored.any() else np.zeros(0)
        else:
            image_excess = np.zeros(0)
        n = len(image_excess)
        # the share of scored images in the coarse region decides the dataset's style
        share = float((image_excess > math.log10(coarse_ratio)).mean()) if n else math.nan
        if n < MIN_IMAGES:
            style = "undetermined"
        else:
            style = "coarse" if share >= 3 / 4 else "fine" if share <= 1 / 4 else "mixed"
        summary[ds] = {"style": style, "coarse_share": share, "n_scored": n,
                       "median_excess_log10_area": _median(image_excess), **out}
    # NOTE: styles are relative to the finest dataset given: a lone dataset is its own reference
    # (so "fine" by definition), and a pool without a fine dataset has no fine labelling to compare
    # with.
    scored = [ds for ds, s in summary.items() if s["style"] != "undetermined"]
    why = ""
    if len(scored) < 2:
        why = (f"only {len(scored)} dataset(s) with >= {MIN_IMAGES} scored images "
               f"({', '.join(scored) or 'none'}), and the rule needs another dataset to compare "
               f"with")
    elif not any(summary[ds]["style"] == "fine" for ds in scored):
        why = (f"no dataset among {', '.join(scored)} comes out fine, so none is a trustworthy "
               f"reference")
    if why:
        for s in summary.values():
            s["style"] = "undetermined"
    return summary, reference, style_rule_text(coarse_ratio, why)


def _median(values):
    """Median of the non-NaN values; NaN when there is none."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    return float(np.median(values)) if len(values) else math.nan


# ---------------------------------------------------------------------- one pass over a dataset
def scan_dataset(cache_dir, dataset_id, resolution, quality_model=None, device="cpu",
                 batch_size=16):
    """Read every image of every split once: lesion components, quality measures, optional MCF-Net
    grades. Returns a list of per image dicts: dataset, split, id, <L>_count, <L>_area, measures,
    [grade probs]."""
    if quality_model is not None:
        import mcfnet  # NOTE: imported only when grading: torchvision's import costs seconds

    parts = [data.PreparedDataset(cache_dir, dataset_id, resolution, split) for split in SPLITS]
    rows, pending = [], []  # pending: (row, views) waiting for a full MCF-Net batch

    def grade(pending):  # one MCF-Net batch; writes the probabilities into the rows
        views = torch.stack([v for _, v in pending]).to(device)  # (B, 3 views, 3, 224, 224)
        probs = mcfnet.predict_grades(quality_model, views).cpu().numpy()  # (B, 3)
        for (row, _), p in zip(pending, probs):
            row.update({f"p_{g}": float(x) for g, x in zip(mcfnet.GRADES, p)})
            row["grade"] = mcfnet.GRADES[int(p.argmax())]

    with tqdm(total=sum(len(p) for p in parts), desc=dataset_id, unit="img") as bar:
        for split, part in zip(SPLITS, parts):
            for i in range(len(part)):
                item = part[i]  # image, masks and FOV read once
                row = {"dataset": dataset_id, "split": split, "id": item["id"]}
                for lesion, mask, known in zip(LESIONS, item["masks"], item["annotated"]):
                    # NOTE: a lesion not annotated in this image has no count (NaN), not 0
                    row[f"{lesion}_count"], row[f"{lesion}_area"] = (
                        component_stats(mask) if known else (math.nan, math.nan))
                row.update(quality_measures(item["image"], item["fov"]))
                rows.append(row)
                if quality_model is not None:
                    pending.append((row, mcfnet.colour_views(item["image"], item["fov"])))
                    if len(pending) == batch_size:
                        grade(pending)
                        pending = []
                bar.update()
    if pending:
        grade(pending)
    return rows


def native_sizes(prepared):
    """Native image sizes {"WxH": number of images}, most common first, from the prepared
    meta.json (data/prepare.py keeps each image's original width and height in its per-image
    "geometry")."""
    meta = json.loads((Path(prepared) / "meta.json").read_text())
    sizes = {}
    for g in meta.get("geometry", []):
        key = f"{g['width']}x{g['height']}"
        sizes[key] = sizes.get(key, 0) + 1
    return dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))


# ------------------------------------------------------------------- summaries, tables, figures
def summarise(rows, splits_count, sizes):
    """Per dataset: Table 1 numbers, per lesion medians, quality measure medians, grade shares."""
    n = len(rows)
    out = {"n_images": n, "splits": splits_count, "native_sizes": sizes, "prevalence": {},
           "lesions": {}}
    for lesion in LESIONS:
        count = np.array([r[f"{lesion}_count"] for r in rows], float)
        area = np.array([r[f"{lesion}_area"] for r in rows], float)
        present, known = count > 0, ~np.isnan(count)  # NaN: not annotated in that image
        # NOTE: prevalence at the prepared resolution: a lone tiny MA can vanish when masks are
        # downsized. Over the images annotating the lesion: NaN where none does.
        out["prevalence"][lesion] = float(present.sum() / known.sum()) if known.any() else math.nan
        out["lesions"][lesion] = {"images_with": int(present.sum()),
                                  "images_annotated": int(known.sum()),
                                  "median_count": _median(count[present]),
                                  "median_mean_area": _median(area[present])}
    out["quality"] = {m: _median([r[m] for r in rows]) for m in QUALITY_MEASURES}
    if rows and "grade" in rows[0]:  # MCF-Net ran: the share of each grade
        out["grades"] = {g: float(np.mean([r["grade"] == g for r in rows]))
                         for g in ("Good", "Usable", "Reject")}
    return out


def _fmt(x, digits=2):
    """A number for the tables: `digits` decimals, "-" for None or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _percent(share):
    """A prevalence for Table 1: '12%', or 'not annotated' (None or NaN: no image annotates it)."""
    if share is None or math.isnan(share):
        return "not annotated"
    return f"{100 * share:.0f}%"


def dataset_colours(ids):
    """{dataset ID: colour} in every figure: the five's own, then one's own datasets' in turn."""
    own = [d for d in ids if d not in COLOURS]
    return {d: COLOURS.get(d) or OWN_COLOURS[own.index(d) % len(OWN_COLOURS)] for d in ids}


def markdown_report(report):
    """Table 1 and the other per dataset numbers as markdown."""
    ds = report["datasets"]
    lines = [f"# Dataset characterisation (common resolution {report['resolution']} px)", "",
             "## Table 1: images, splits, lesion prevalence (share of images with the lesion), "
             "native sizes", "",
             "| Dataset | Images | Train | Val | Test | " + " | ".join(LESIONS)
             + " | Native sizes |",
             "|---" * (6 + len(LESIONS)) + "|"]
    for d, s in ds.items():
        # the three most common native sizes, then how many sizes there are
        sizes = ", ".join(f"{k} ({v})" for k, v in list(s["native_sizes"].items())[:3]) or "-"
        if len(s["native_sizes"]) > 3:
            sizes += f", ... ({len(s['native_sizes'])} sizes)"
        lines.append(f"| {d} | {s['n_images']} | "
                     + " | ".join(str(s["splits"].get(k, 0)) for k in SPLITS)
                     + " | " + " | ".join(_percent(s["prevalence"][lesion]) for lesion in LESIONS)
                     + f" | {sizes} |")
    lines += ["", "## Labelling style (Figure 2)", "", report["rule"], "",
              "| Dataset | Style | Coarse share | Scored | "
              + " | ".join(f"{lesion} med. log10 count | {lesion} med. log10 area"
                           for lesion in STYLE_LESIONS) + " |",
              "|---" * (4 + 2 * len(STYLE_LESIONS)) + "|"]
    for d, s in ds.items():
        lines.append(f"| {d} | {s['style']} | {_fmt(s['coarse_share'])} | {s['n_scored']} | "
                     + " | ".join(f"{_fmt(s['median_log10_count'][lesion])} | "
                                  f"{_fmt(s['median_log10_area'][lesion])}"
                                  for lesion in STYLE_LESIONS) + " |")
    lines += ["", "## Image quality: simple measures (medians per dataset)", ""]
    lines += [f"- `{m}`: {text}" for m, text in QUALITY_MEASURES.items()]
    lines += ["", "| Dataset | " + " | ".join(QUALITY_MEASURES) + " |",
              "|---" * (1 + len(QUALITY_MEASURES)) + "|"]
    for d, s in ds.items():
        lines.append(f"| {d} | " + " | ".join(_fmt(s["quality"][m], 3) for m in QUALITY_MEASURES)
                     + " |")
    lines += ["", "## Image quality: MCF-Net grades (Figure 1)", "", report["quality_network"]]
    if any("grades" in s for s in ds.values()):  # only with --quality-weights
        grades = list(next(s for s in ds.values() if "grades" in s)["grades"])
        lines += ["", "| Dataset | " + " | ".join(grades) + " |", "|---" * (1 + len(grades)) + "|"]
        lines += [f"| {d} | " + " | ".join(f"{100 * s['grades'][g]:.0f}%" for g in grades) + " |"
                  for d, s in ds.items() if "grades" in s]
    return "\n".join(lines) + "\n"


def _density_contour(ax, x, y, colour):
    """Contour of a Gaussian KDE in log10 space enclosing about half the points (skipped when
    degenerate)."""
    pts = np.log10(np.stack([x, y]))  # (2, N)
    if pts.shape[1] < 5 or np.any(pts.std(1) < 1e-6):
        return
    try:
        kde = stats.gaussian_kde(pts)
        # density at the median point: the 50% highest-density region
        level = np.quantile(kde(pts), 0.5)
        lo, hi = pts.min(1) - 0.3, pts.max(1) + 0.3
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 80),
                             np.linspace(lo[1], hi[1], 80))  # (80, 80) grid in log10 space
        dens = kde(np.stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
        ax.contour(10 ** gx, 10 ** gy, dens, levels=[level], colors=[colour], linewidths=1.5)
    except (np.linalg.LinAlgError, ValueError):  # singular covariance (e.g. all counts equal)
        return


def plot_labelling_style(rows_by_dataset, styles, reference, rule, coarse_ratio, path, resolution):
    """Figure 2: per lesion, per image (mean component area, component count), log-log, KDE
    contour."""
    fig, axes = plt.subplots(1, len(LESIONS), figsize=(4.2 * len(LESIONS), 5.2))
    colours = dataset_colours(list(rows_by_dataset))
    for ax, lesion in zip(axes, LESIONS):
        for ds, rows in rows_by_dataset.items():
            count = np.array([r[f"{lesion}_count"] for r in rows], float)
            area = np.array([r[f"{lesion}_area"] for r in rows], float)
            keep = count > 0  # log axes: images without the lesion (or not annotating it) left out
            colour = colours[ds]
            ax.scatter(area[keep], count[keep], s=9, alpha=0.45, color=colour, edgecolors="none",
                       label=f"{ds}: {styles[ds]['style']} ({_fmt(styles[ds]['coarse_share'])})")
            _density_contour(ax, area[keep], count[keep], colour)
        if lesion in reference:  # the rule's boundary: reference size and coarse_ratio x it
            ref = 10 ** reference[lesion]["median_log10_area"]
            ax.axvline(ref, color="k", lw=0.8, ls=":")
            ax.axvline(ref * coarse_ratio, color="k", lw=1.0, ls="--")
        top = np.nanmax([r[f"{lesion}_count"] for rows in rows_by_dataset.values()
                         for r in rows] + [1])  # NaN: not annotated
        # ylim: >= 1.5 decades, so the axis shows plain powers of ten
        ax.set(xscale="log", yscale="log", title=lesion,
               xlabel=f"mean lesion area (px at {resolution} px)", ylim=(0.7, max(20, 1.6 * top)))
        lo, hi = np.log10(ax.get_xlim())
        # NOTE: under 2 decades matplotlib labels the minor ticks, which overlap (2x10^0 3x10^0 ...)
        if hi - lo < 2:
            mid = (lo + hi) / 2
            ax.set_xlim(10 ** (mid - 1), 10 ** (mid + 1))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("lesions per image (8-connected components)")
    axes[0].legend(fontsize=8, loc="upper right", title="dataset: style (coarse share)",
                   title_fontsize=8)
    fig.suptitle("Labelling style: fine (upper left) vs coarse (lower right); dotted = reference "
                 f"size, dashed = {coarse_ratio:g}x reference (coarse region to the right)",
                 fontsize=10)
    # the rule's text as the caption, below the panels
    fig.text(0.01, 0.01, textwrap.fill("Rule: " + rule, 230), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    utils.save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_quality_measures(rows_by_dataset, path):
    """Per measure, per dataset: median with the 25-75% range."""
    fig, axes = plt.subplots(1, len(QUALITY_MEASURES), figsize=(3.2 * len(QUALITY_MEASURES), 3.4))
    names = list(rows_by_dataset)
    for ax, measure in zip(axes, QUALITY_MEASURES):
        values = [np.array([r[measure] for r in rows_by_dataset[d]], float) for d in names]
        q = np.array([np.nanpercentile(v, [25, 50, 75]) if np.isfinite(v).any() else [np.nan] * 3
                      for v in values])  # (datasets, 3): quartiles
        # the bar is the median, the error bar the 25-75% range
        ax.bar(names, q[:, 1], yerr=[q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]], capsize=3,
               color=[dataset_colours(names)[d] for d in names])
        ax.set_title(measure, fontsize=10)
    fig.suptitle("Image quality measures per dataset (median, 25-75%)", fontsize=10)
    fig.tight_layout()
    utils.save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_grades(grades_by_dataset, path):
    """Figure 1: normalised MCF-Net grade distribution per dataset (stacked bars)."""
    names = list(grades_by_dataset)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.6))
    bottom = np.zeros(len(names))  # the stack's height so far, per dataset
    for grade, colour in zip(("Good", "Usable", "Reject"), ("tab:green", "tab:olive", "tab:red")):
        share = np.array([grades_by_dataset[d][grade] for d in names])
        ax.bar(names, share, bottom=bottom, color=colour, label=grade)
        bottom += share
    ax.set(ylabel="share of images", ylim=(0, 1), title="Image quality (MCF-Net, Fu et al. 2019)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    utils.save_figure(fig, path, dpi=120)
    plt.close(fig)


def write_per_image_csv(rows, path):
    """OUT/per_image.csv, one row per image (written atomically)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every key, first-seen order

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            for r in rows:  # NaN (no lesion, so no mean area) as an empty cell
                writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v
                                 for k, v in r.items()})
    utils.write_atomic(path, write)


def _jsonable(x):
    """NaN -> null (strict JSON), recursively."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


# ----------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    """The parsed command line, --device resolved (cuda when available)."""
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = utils.default_device()
    return args


def main(argv=None):
    args = parse_args(argv)
    ids = args.datasets  # canonical IDs already (data.flags.DatasetList)
    if args.resolution < 32:
        raise ValueError(f"--resolution {args.resolution} is too small (at least 32)")
    if args.coarse_ratio <= 1:
        raise ValueError(f"--coarse-ratio {args.coarse_ratio} must be above 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
    model = None
    if args.quality_weights:
        import mcfnet  # only here: torchvision's import costs seconds

        model = mcfnet.load_mcfnet(args.quality_weights, args.device)
        network_line = (f"MCF-Net grades from {args.quality_weights} (argmax of the fused "
                        f"prediction).")
    else:
        network_line = ("Quality network skipped: no --quality-weights file given (MCF-Net weights "
                        "are not downloaded); only the simple measures are reported.")
        print(network_line)
    options = data.data_options(args)
    out = utils.writable_folder(args.out, "--out", "write there")  # before the datasets' passes
    rows_by_dataset, summaries = {}, {}
    for ds in ids:  # one pass over each dataset, prepared first if needed
        prepared = data.prepare_cache(ds, args.data_root, args.cache, args.resolution, **options)
        rows = scan_dataset(args.cache, ds, args.resolution, model, args.device, args.batch_size)
        splits_count = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
        rows_by_dataset[ds] = rows
        summaries[ds] = summarise(rows, splits_count, native_sizes(prepared))
    # the style rule's input: per dataset and lesion, the per image counts and mean areas
    per_image = {ds: {lesion: {"count": [r[f"{lesion}_count"] for r in rows],
                               "area": [r[f"{lesion}_area"] for r in rows]}
                      for lesion in STYLE_LESIONS} for ds, rows in rows_by_dataset.items()}
    styles, reference, rule = labelling_styles(per_image, args.coarse_ratio)
    report = {"version": 1, "resolution": args.resolution, "rule": rule, "reference": reference,
              "quality_network": network_line, "quality_measures": QUALITY_MEASURES,
              "datasets": {ds: {**styles[ds], **summaries[ds]} for ds in ids}}
    text = json.dumps(_jsonable(report), indent=1) + "\n"
    # the outputs: JSON (read by train.py --characterize and report.py), markdown, CSV, figures
    utils.write_atomic(out / "characterize.json", lambda tmp: tmp.write_text(text))
    utils.write_atomic(out / "characterize.md", lambda tmp: tmp.write_text(markdown_report(report)))
    write_per_image_csv([r for rows in rows_by_dataset.values() for r in rows],
                        out / "per_image.csv")
    plot_labelling_style(rows_by_dataset, styles, reference, rule, args.coarse_ratio,
                         out / "fig2_labelling_style.png", args.resolution)
    plot_quality_measures(rows_by_dataset, out / "quality_measures.png")
    if model is not None:
        plot_grades({ds: s["grades"] for ds, s in summaries.items()},
                    out / "fig1_quality_grades.png")
    for ds in ids:
        s = styles[ds]
        print(f"{ds}: {s['style']:<12} coarse share {_fmt(s['coarse_share'])}  "
              + "  ".join(f"{lesion} med log10 count {_fmt(s['median_log10_count'][lesion])} "
                          f"area {_fmt(s['median_log10_area'][lesion])}"
                          for lesion in STYLE_LESIONS))
    print(f"wrote {out / 'characterize.json'}, characterize.md, per_image.csv and figures")


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: rerun the same command (prepared caches are kept)")
