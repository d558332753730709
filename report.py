r"""Rebuild the paper's Tables 2-3 and Figures 3-4 from a sweep's results files, as report.md + PNG.

The JSON of every table and figure is written beside them, and the sweep's validation curves (every
run's log.jsonl). What each part holds: docs/STUDY.md, "The report".

    python report.py runs -o report/
    python report.py demo/runs -o demo/report --real demo/real/real.json  # make demo
    python report.py runs -o report/ --reference none    # leave out the authors' published AUPR
    python report.py runs -o report/ --authors authors   # + their released models' results
"""
import argparse
import csv
import json
import math
import re
import sys
import textwrap
from pathlib import Path

import utils

DEFAULT_REFERENCE = "reference/lesions_database_cross_study.csv"
# `make authors-models`: authors/<COMBO>/results.json of evaluate.py --ckpt hub:COMBO
DEFAULT_AUTHORS = "authors"
DEFAULT_CHARACTERIZE = "OUT/characterize/characterize.json"


def build_parser():
    """The command line: the sweep folder, the output folder and the optional inputs."""
    # the description: the whole docstring, its examples as written
    p = utils.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir",
                   help="The sweep's folder, which holds <COMBO>/s<SEED>/results.json "
                        "(evaluate.py) and <COMBO>/fig4.json (fig4.py).")
    p.add_argument("-o", "--out", default="report",
                   help="The folder that receives report.md, the figures and their JSON "
                        "(default: %(default)s).")
    p.add_argument("--characterize", default=DEFAULT_CHARACTERIZE,
                   help="The characterize.json that gives each dataset's labelling style, used "
                        "when the file exists (default: %(default)s).")
    p.add_argument("--reference", default=DEFAULT_REFERENCE,
                   help="The authors' published CSV, relative to the current folder or to this "
                        "script, or 'none' to leave it out (default: %(default)s).")
    p.add_argument("--authors", default=DEFAULT_AUTHORS,
                   help="The folder of the authors' released models' results, "
                        "<COMBO>/results.json as `make authors-models` writes them, used when it "
                        "exists (default: %(default)s).")
    p.add_argument("--real-styles", default=None, metavar="JSON",
                   help="The table3.json of bench/real_styles.py: Table 3 on real photographs "
                        "(default: none).")
    p.add_argument("--real", default=None, metavar="JSON",
                   help="The real.json of bench/real.py (`make real`), shown with its figure "
                        "(default: none).")
    return p


utils.start(__name__, build_parser)  # --help before numpy and matplotlib load

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")  # files only, never a window (works on headless machines)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from curves import HEX_COLOURS, plot_sweep  # noqa: E402
from data import DATASET_IDS, FOLDERS, LESIONS, combo_name  # noqa: E402
from data.ids import OWN_ID, dataset_order  # noqa: E402
from data.synthetic import MARKER  # noqa: E402
from utils import null_nan, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
TEST_NAMES = {"IDR": "IDRiD", "DDR": "DDR", "FGA": "FGADR", "RET": "Retinal-Lesions",
              "MES": "Messidor"}
STYLE_COLORS = {"fine": "#b7e4c7", "mixed": "#ffe8a3", "coarse": "#f4b6b6"}
# Figure 4, both forms: one colour per family of methods
METHOD_COLORS = {"baseline": "0.6", "ensemble": "C1", "swa": "C2", "soup": "C3"}
ORDER_NAMES = {"n_train_images": "number of training images",
               "n_datasets": "number of training sets"}
METHOD_ORDER = ("baseline", "ensemble", "swa-encoder", "swa-decoder", "swa-full",
                "soup-encoder", "soup-decoder", "soup-full")

# Published numbers, transcribed from the paper (Playout & Cheriet, arXiv:2405.08329): its Table 2
# (AUPR, trained and tested on the same dataset; EX, HE, MA, CWS, mean) and Table 3 (Dice averaged
# over lesions, per test set and training combination, canonical run names); AUPR as
# docs/PROTOCOL.md ("Evaluation protocol") defines it.
# NOTE: Table 2's row labels are uncertain in our transcription; every cell, means included, is
# the paper's.
PAPER = {
    "table2": {
        "IDR": {"L-Seg": (.795, .637, .463, .711, .652),
                "other method": (.842, .593, .484, .641, .640),
                "Playout & Cheriet": (.825, .620, .451, .713, .652)},
        "DDR": {"L-Seg": (.555, .359, .105, .265, .321),
                "Playout & Cheriet": (.592, .408, .281, .434, .429)},
        "RET": {"Lesion-Net": (.740, .617, .377, .575, .577),
                "Playout & Cheriet": (.724, .589, .451, .540, .571)},
    },
    "table3": {
        "IDR": {"DDR+MES": .634, "RET": .222, "DDR+FGA+MES": .661},
        "MES": {"IDR+DDR": .422, "RET": .192, "IDR+DDR+FGA": .439},
        "DDR": {"IDR+MES": .426, "RET": .186, "IDR+FGA+MES": .409},
    },
}


# ---------------------------------------------------------------- reading the sweep
def _num(x):
    """JSON number or null -> float (null means NaN: the contract writes NaN as null)."""
    return float("nan") if x is None else float(x)


def _read_json(path):
    """A JSON file's content, None when it is missing or unreadable (such files are skipped)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _combo(train, fallback):
    """Canonical combination name from a JSON 'train' field (list or 'A+B'), else from the folder
    name."""
    ids = train if isinstance(train, list) else str(train or fallback).split("+")
    return combo_name(ids)


def is_test_id(key):
    """Does a results file's key name a test set: one of the five, or a dataset of one's own?"""
    return key in DATASET_IDS or bool(OWN_ID.fullmatch(str(key)))


def dataset_names(runs):
    """{dataset ID: the name shown}: the five's (TEST_NAMES); a dataset of one's own by its
    dataset.json "name" and its ID ("My clinic (ABC)"), read in the folder a run recorded for it
    (--root ID=DIR), else by its ID."""
    names = dict(TEST_NAMES)
    for run in runs:
        settings = {**(run.get("args") or {}), **(run.get("record") or {})}
        for item in settings.get("root") or []:  # ["ABC=DIR", ...]
            ds, _, folder = str(item).partition("=")
            ds = ds.strip().upper()
            path = _found(Path(folder) / "dataset.json") if folder and ds not in names else None
            info = _read_json(path) if path is not None else None
            name = info.get("name") if isinstance(info, dict) else None
            if isinstance(name, str) and name.strip():
                names[ds] = f"{name.strip()} ({ds})"
    return names


def _combo_key(combo):
    """Sort key of a combination: its datasets' positions in the canonical order (the five, then
    one's own by name)."""
    return [dataset_order(d) for d in combo.split("+")]


# What a run may change when it resumes (runfolder.RESUMABLE): where it is stored and read from,
# how long and how it runs. The rest of args.json (combination, seed, model, optimisation, ...) is
# what the run is. NOTE: a copy, so that this file stands alone; tests/test_report.py checks it.
NOT_IDENTITY = ("iters", "stop_at", "val_every", "snapshot_every", "log_every", "workers", "device",
                "dtype", "compile", "channels_last", "sync_bn", "data_root", "cache", "root", "out",
                "test")


def _read_run(path):
    """RUNS_DIR/<folder>/s<SEED>/results.json -> (a run, None): combination and seed from its
    args.json, else from the results file, else from the folders' names; (None, why) when it is no
    baseline results file of a run."""
    rec = _read_json(path)
    if rec is None:
        return None, "not readable as JSON"
    if not isinstance(rec, dict) or not isinstance(rec.get("results"), dict):
        return None, "no \"results\" of test sets in it"
    # NOTE: only baseline evaluations of single runs fill the tables; averages live in fig4.json.
    if rec.get("method", "baseline") != "baseline":
        return None, f"the evaluation of an average ({rec.get('method')}), not of the run"
    damaged = [t for t, block in rec["results"].items()
               if not isinstance(block, dict) or not isinstance(block.get("lesions"), dict)]
    if damaged:
        return None, f"results.{damaged[0]} is not a test set's scores (a damaged file)"
    args = _read_json(path.parent / "args.json")
    args = args if isinstance(args, dict) else {}
    # the seed: args.json, else the results file, else the folder's name (s<SEED>)
    seeds = (args.get("seed"), rec.get("seed"), path.parent.name[1:])
    seed = next(s for s in seeds if s is not None)
    try:
        combo = _combo(args.get("train") or rec.get("train"), path.parent.parent.name)
        seed = int(seed)
    except (TypeError, ValueError):  # a damaged args.json: not a run of the sweep layout
        return None, "its args.json gives no combination and seed (a damaged file)"
    return {"combo": combo, "seed": seed, "results": rec["results"], "args": args,
            "record": rec, "protocol": rec.get("protocol"), "path": path,
            "n_train_images": rec.get("n_train_images", args.get("n_train_images"))}, None


def settings_differ(a, b):
    """The settings defining a run (args.json less NOT_IDENTITY) both record, with other values."""
    # NOTE: a key only one run records (an older args.json) is no difference
    keys = (set(a["args"]) & set(b["args"])) - set(NOT_IDENTITY)
    return sorted(k for k in keys if a["args"][k] != b["args"][k])


def _canonical(run):
    """Is the run in the folder the sweep gives it, RUNS/<COMBO>/s<SEED>?"""
    folder = run["path"].parent
    return folder.parent.name == run["combo"] and folder.name == f"s{run['seed']}"


def drop_duplicates(runs):
    """Runs of one combination and seed whose recorded settings agree are one run in two folders
    (a backup, a copy): counted once, from its sweep folder <COMBO>/s<SEED> if one is.
    -> (runs, notes)."""
    kept, notes = [], []
    # runs in their sweep folder first: a twin found later is the copy
    for run in sorted(runs, key=lambda r: (not _canonical(r), str(r["path"]))):
        same = [k for k in kept if (k["combo"], k["seed"]) == (run["combo"], run["seed"])]
        twin = next((k for k in same if not settings_differ(k, run)), None)
        if twin is None:
            kept.append(run)
            continue
        notes.append(f"{run['path'].parent} holds the same run as {twin['path'].parent} "
                     f"({run['combo']}, seed {run['seed']}, same settings): counted once, "
                     f"from {twin['path'].parent}")
    groups = {}  # (combination, seed) -> the runs kept
    for r in kept:
        groups.setdefault((r["combo"], r["seed"]), []).append(r)
    for (combo, seed), group in groups.items():
        # NOTE: one seed under other settings (e.g. lr) is another run: counted
        if len(group) > 1:
            keys = sorted({k for a in group for b in group for k in settings_differ(a, b)})
            notes.append(f"{combo} seed {seed} is {len(group)} runs with other settings "
                         f"({', '.join(keys)}): {', '.join(str(r['path'].parent) for r in group)}, "
                         "each counted")
    return sorted(kept, key=lambda r: str(r["path"])), notes


def load_runs(runs_dir):
    """Glob RUNS_DIR/*/s<SEED>/results.json and RUNS_DIR/*/fig4.json; anything else is ignored.

    A run is what its args.json says (combination, seed, settings), not its folder's name: two
    folders of one run count once. -> (runs, fig4 records, skipped (path, why), notes on
    duplicates).
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():  # one line naming the folder (utils.run prints it)
        raise FileNotFoundError(f"runs directory {runs_dir} not found")
    runs, fig4, skipped = [], [], []
    for path in sorted(runs_dir.glob("*/s*/results.json")):
        # s<SEED> folders only: <COMBO>/swa/, <COMBO>/soup/ hold averages
        run, why = (_read_run(path) if re.fullmatch(r"s\d+", path.parent.name)
                    else (None, "not in a s<SEED> folder"))
        if run is None:
            skipped.append((path, why))
        else:
            runs.append(run)
    runs, notes = drop_duplicates(runs)
    for path in sorted(runs_dir.glob("*/fig4.json")):  # one per combination (fig4.py)
        rec = _read_json(path)
        try:
            if not isinstance(rec, dict) or not isinstance(rec.get("methods"), dict):
                raise ValueError
            combo = _combo(rec.get("train") or rec.get("combo"), path.parent.name)
            fig4.append({**rec, "combo": combo, "path": path})
        except ValueError:
            skipped.append((path, "not a fig4.py result (no \"methods\")"))
    fig4, fig4_notes = drop_duplicate_fig4(fig4)  # one Figure 4 per combination
    if not runs and not fig4:
        raise FileNotFoundError(f"no results found under {runs_dir} "
                                "(expected <COMBO>/s<SEED>/results.json or <COMBO>/fig4.json)")
    return runs, fig4, skipped, notes + fig4_notes


def drop_duplicate_fig4(fig4):
    """One fig4.json per combination: the one in the folder named after it, else the first."""
    kept, notes = {}, []
    # the file in the folder named after its combination first
    for rec in sorted(fig4, key=lambda r: (r["path"].parent.name != r["combo"], str(r["path"]))):
        if rec["combo"] in kept:
            notes.append(f"{rec['path']} is a second Figure 4 of {rec['combo']}: not counted "
                         f"(counted: {kept[rec['combo']]['path']})")
        else:
            kept[rec["combo"]] = rec
    return sorted(kept.values(), key=lambda r: str(r["path"])), notes


# ---------------------------------------------------------------- where the data came from
def _found(recorded):
    """A path a run recorded, as found from here: as written (relative to the working folder),
    else relative to this script (the Makefile's runs record demo/data); None when neither
    exists."""
    path = Path(str(recorded))
    for candidate in (path,) if path.is_absolute() else (path, HERE / path):
        if candidate.exists():
            return candidate
    return None


def dataset_source(dataset, settings, resolution):
    """'synthetic', 'real' or 'unknown': the data one dataset was read from, by facts, not by names.

    The root a run's prepared cache records (CACHE/<ID>/<R>/meta.json) is the folder it read:
    synthetic when data.synthetic's marker file is in it, else real. Without that cache, the root
    its flags name (--root ID=DIR, else DATA_ROOT/<distributed folder>) counts only when it holds
    the marker: a folder there without it need not be the one read (env <ID>_ROOT, one level down).
    """
    cache, meta = settings.get("cache"), None
    # first choice: the root the prepared cache records (the folder actually read)
    if cache is not None and resolution is not None:
        path = _found(Path(cache) / dataset / str(resolution) / "meta.json")
        meta = _read_json(path) if path is not None else None
    root = _found(meta["root"]) if isinstance(meta, dict) and meta.get("root") else None
    if root is not None:
        return "synthetic" if (root / MARKER).is_file() else "real"
    # else: the root the flags name, --root ID=DIR, else DATA_ROOT/<distributed folder>
    roots = dict(str(v).partition("=")[::2] for v in settings.get("root") or [])  # ["IDR=DIR"]
    named = {k.strip().upper(): v for k, v in roots.items()}.get(dataset)
    if not named and settings.get("data_root") and dataset in FOLDERS:  # one's own: --root only
        named = Path(settings["data_root"]) / FOLDERS[dataset]
    named = _found(named) if named else None
    return "synthetic" if named is not None and (named / MARKER).is_file() else "unknown"


def combine_sources(found):
    """Several datasets' sources -> one: synthetic if any is, real if all are, else unknown."""
    # NOTE: one synthetic dataset makes the run a toy: it says so before anything else
    if "synthetic" in found:
        return "synthetic"
    return "real" if found and all(f == "real" for f in found) else "unknown"


def run_source(run):
    """The data of a run's training and test sets: 'synthetic' if any came from data.synthetic,
    'real' if every one is known to be real, else 'unknown'. A results file's own data settings
    (where it records them) win over the run's args.json for its test sets."""
    args, rec = run.get("args") or {}, run.get("record") or {}
    own = {k: rec[k] for k in ("data_root", "cache", "root") if rec.get(k) is not None}
    tested = {**args, **own}
    res = (rec.get("protocol") or {}).get("resolution") or args.get("resolution")
    # the training sets as trained, the test sets as evaluated
    found = [dataset_source(d, args, args.get("resolution")) for d in run["combo"].split("+")]
    found += [dataset_source(d, tested, res) for d in run["results"] if is_test_id(d)]
    return combine_sources(found)


def tested_source(rec):
    """The source of a results file's test sets, from the data settings it records, else
    unknown."""
    res = (rec.get("protocol") or {}).get("resolution")
    tests = [d for d in rec.get("results") or {} if is_test_id(d)]
    return combine_sources([dataset_source(d, rec, res) for d in tests])


def source_counts(runs):
    """{'synthetic': n, 'real': n, 'unknown': n} over runs (their 'source', set by main)."""
    counts = {"synthetic": 0, "real": 0, "unknown": 0}
    for r in runs:
        counts[r.get("source", "unknown")] += 1
    return counts


def data_lines(runs):
    """The report's first lines: what data its runs were trained and tested on."""
    c, n = source_counts(runs), len(runs)
    # all synthetic, all real, no run, or a mix (each part counted)
    if n and c["synthetic"] == n:
        return ["**Synthetic data, toy models.** Every run here was trained or tested on images "
                f"generated by `data.synthetic` (its `{MARKER}` marker is in the data roots the "
                "runs read): the models are toys and their scores say nothing about real fundus "
                "photographs. The paper's published numbers shown beside them were measured on the "
                "real datasets: the two are not comparable."]
    if n and c["real"] == n:
        return ["Data: the real datasets (no data root these runs read holds `data.synthetic`'s "
                f"`{MARKER}` marker)."]
    if not n:
        return ["Data source unknown (no results file of a single run)."]
    parts = [f"{c['synthetic']} on synthetic data (`data.synthetic`'s `{MARKER}` marker in a "
             "data root they read: toy models, not comparable with published numbers)"
             if c["synthetic"] else "", f"{c['real']} on the real datasets" if c["real"] else "",
             f"{c['unknown']}: data source unknown (no args.json, or its cache and data root are "
             "not found from here)" if c["unknown"] else ""]
    return [f"**Data, of {n} run(s):** " + "; ".join(p for p in parts if p) + "."]


def ours_caption(runs):
    """What every caption beside published numbers says first when ours are not all on real
    data."""
    c, n = source_counts(runs), len(runs)
    if not n or c["real"] == n:  # real data: nothing to warn about
        return ""
    if c["synthetic"] == n:
        return ("**Ours: toy models on synthetic data** (`data.synthetic`), not comparable with "
                "published numbers. ")
    parts = [f"{c['synthetic']} on synthetic data (toy models)" if c["synthetic"] else "",
             f"{c['unknown']} data source unknown" if c["unknown"] else "",
             f"{c['real']} on real data" if c["real"] else ""]
    return f"**Ours, {n} run(s): " + ", ".join(p for p in parts if p) + ".** "


def load_styles(path):
    """characterize.json -> {dataset id: 'fine' | 'mixed' | 'coarse'}."""
    rec = _read_json(path)
    if not isinstance(rec, dict) or not isinstance(rec.get("datasets"), dict):
        raise ValueError(f"{path} is not a characterize.json (no 'datasets' object)")
    styles = {ds: v.get("style") for ds, v in rec["datasets"].items() if isinstance(v, dict)}
    bad = {ds: s for ds, s in styles.items() if s not in STYLE_COLORS}
    if bad:  # NOTE: "undetermined" too: Figure 3 has no colour for it
        raise ValueError(f"{path}: unknown labelling style {bad} (expected fine, mixed or "
                         f"coarse)")
    return styles


def combo_style(combo, styles):
    """A combination is as coarse as its coarsest set: any coarse -> coarse, else any mixed ->
    mixed."""
    members = [styles.get(d) for d in combo.split("+")]
    for style in ("coarse", "mixed"):
        if style in members:
            return style
    return "fine" if all(members) else None  # None: a member was not characterized


def load_reference(path):
    """The authors' CSV export ->
    {(combo, test, lesion): AUPR averaged over their runs of that combination}."""
    # their names -> ours: the "Tags" column lists the training sets, the columns the test sets
    tests = {"DDR": "DDR", "FGADR": "FGA", "IDRID": "IDR", "MESSIDOR": "MES", "RETLES": "RET"}
    # a run of theirs per row; the mean over their runs of a combination is the reference
    lesions = {"EXUDATES": "EX", "HEMORRHAGES": "HE", "MICROANEURYSMS": "MA",
               "COTTON_WOOL_SPOT": "CWS"}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "Tags" not in rows[0]:
        raise ValueError(f"{path} is not the authors' export (no 'Tags' column)")
    acc = {}
    for row in rows:
        tags = [t.strip() for t in row["Tags"].split(",") if t.strip()]
        if not tags or any(t not in tests for t in tags):  # not a training combination
            continue
        combo = combo_name([tests[t] for t in tags])
        for their_test, test in tests.items():
            for their_lesion, lesion in lesions.items():
                column = f"AUC Precision Recall - {their_test} {their_lesion}"
                value = (row.get(column) or "").strip()
                if value:  # NOTE: a few cells (and one whole run) are empty in their export
                    acc.setdefault((combo, test, lesion), []).append(float(value))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def load_authors(folder):
    """FOLDER/<COMBO>/results.json written by evaluate.py --ckpt hub:COMBO (method "authors") ->
    {combo: record}."""
    out = {}
    for path in sorted(Path(folder).glob("*/results.json")):
        rec = _read_json(path)
        if (isinstance(rec, dict) and rec.get("method") == "authors"
                and isinstance(rec.get("results"), dict)):
            try:
                out[_combo(rec.get("train"), path.parent.name)] = rec
            except ValueError:
                continue
    return out


# ---------------------------------------------------------------- numbers
def run_metric(run, test, metric, lesion=None):
    """One run's AUPR or Dice on a test set: a lesion's value, or the mean over lesions. None: not
    evaluated."""
    res = run["results"].get(test)
    if not isinstance(res, dict):  # the run was not evaluated on this test set
        return None
    per_lesion = res.get("lesions") or {}
    if lesion is not None:
        return _num((per_lesion.get(lesion) or {}).get(metric))
    if res.get(f"mean_{metric}") is not None:
        return float(res[f"mean_{metric}"])
    # NOTE: a null mean (a lesion absent from the test set gives NaN) falls back to the mean over
    # defined lesions.
    values = [v for v in (_num((per_lesion.get(c) or {}).get(metric)) for c in LESIONS)
              if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def summarize(values):
    """Mean and sample std (ddof=1) over seeds of the finite values; n = how many were finite."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = len(finite)  # the std of one value is undefined: NaN, printed as no "± std"
    return {"mean": float(finite.mean()) if n else float("nan"),
            "std": float(finite.std(ddof=1)) if n > 1 else float("nan"),
            "min": float(finite.min()) if n else float("nan"),
            "max": float(finite.max()) if n else float("nan"),
            "n": n, "n_runs": len(values), "values": list(values)}


def cell(runs, test, metric, lesion=None):
    """One table cell: summarize() of the runs' values (runs not evaluated on `test` left out)."""
    values = [run_metric(r, test, metric, lesion) for r in runs]
    return summarize([v for v in values if v is not None])


def table2(by_combo, names=TEST_NAMES):
    """Same-dataset AUPR: trained on X alone, tested on X: the paper's datasets, then each of one's
    own trained alone and tested on itself (no published row)."""
    out = {}
    own = sorted((c for c, runs in by_combo.items() if "+" not in c and c not in DATASET_IDS
                  and any(c in r["results"] for r in runs)), key=dataset_order)
    for ds, published in [*PAPER["table2"].items(), *((c, {}) for c in own)]:
        runs = by_combo.get(ds, [])
        # the protocol AUPR beside its blank-map floor and the floor-free AP (docs/PROTOCOL.md,
        # "The floor")
        ours, floor, ap = ({c: cell(runs, ds, metric, c) for c in LESIONS}
                           | {"mean": cell(runs, ds, metric)}
                           for metric in ("aupr", "aupr_floor", "ap"))
        out[ds] = {"name": names.get(ds, ds), "seeds": [r["seed"] for r in runs], "ours": ours,
                   "ours_floor": floor, "ours_ap": ap,
                   "published": {name: dict(zip(LESIONS + ("mean",), row))
                                 for name, row in published.items()}}
    return out


def table3(by_combo):
    """Cross-dataset Dice (mean over lesions) for the paper's combinations."""
    return {test: {combo: {"ours": cell(by_combo.get(combo, []), test, "dice"), "paper": paper}
                   for combo, paper in combos.items()}
            for test, combos in PAPER["table3"].items()}


def figure3_data(by_combo, styles, names=TEST_NAMES):
    """Leave-one-out panels: for each test set, every combination that excludes it, ordered by
    training size."""
    # NOTE: images are counted only when every run states n_train_images; mixing counts with set
    # counts would make the order meaningless, so otherwise the number of training sets orders the
    # combinations.
    by_images = all(any(r.get("n_train_images") for r in runs) for runs in by_combo.values())
    tests = sorted({t for runs in by_combo.values() for r in runs for t in r["results"]
                    if is_test_id(t)}, key=dataset_order)  # the five, then one's own
    panels = {}
    for test in tests:
        rows = []
        for combo, runs in by_combo.items():
            summary = cell(runs, test, "dice")
            # leave-one-out: only combinations that did not train on the test set
            if test in combo.split("+") or summary["n_runs"] == 0:
                continue
            size = (max(r.get("n_train_images") or 0 for r in runs) if by_images
                    else len(combo.split("+")))
            rows.append({"combo": combo, "n_train": size, "style": combo_style(combo, styles),
                         **summary})
        rows.sort(key=lambda row: (row["n_train"], _combo_key(row["combo"])))
        finite = [row for row in rows if math.isfinite(row["mean"])]
        best = max(finite, key=lambda row: row["mean"])["combo"] if finite else None
        for row in rows:
            row["best"] = row["combo"] == best
        panels[test] = rows
    return {"order_by": "n_train_images" if by_images else "n_datasets", "panels": panels,
            "names": {t: names.get(t, t) for t in tests}}


def _fig4_methods(rec):
    """The methods fig4.py evaluates for one combination (--bn both: each average's '+bn' copy too),
    then any other the record holds."""
    order = list(METHOD_ORDER)
    if rec.get("bn") == "both":  # the averages only (not baseline, ensemble) have a +bn copy
        order += [m + "+bn" for m in METHOD_ORDER[2:]]
    held = list(rec["methods"]) + list(rec.get("missing") or {})
    return order + [m for m in held if m not in order]


def figure4_data(fig4):
    """Per method: each combination's Dice averaged over its test sets, then mean +- std over
    combinations; "missing": {combination: why} for each method a combination lacks (n/a cells)."""
    per_method, missing = {}, {}  # method -> {combination: Dice}, method -> {combination: why}
    for rec in fig4:
        why = rec.get("missing") if isinstance(rec.get("missing"), dict) else {}
        for method in _fig4_methods(rec):
            tests = rec["methods"].get(method) or {}
            # the combination's Dice: the mean over its test sets with a defined Dice
            values = [_num(t.get("mean_dice")) for t in tests.values() if isinstance(t, dict)]
            values = [v for v in values if math.isfinite(v)]
            if values:
                per_method.setdefault(method, {})[rec["combo"]] = float(np.mean(values))
            else:  # NOTE: never dropped in silence: a method a combination lacks is an n/a cell
                held = "Dice undefined on every test set" if method in rec["methods"] else None
                missing.setdefault(method, {})[rec["combo"]] = \
                    why.get(method) or held or "not in fig4.json"
    # each average beside its copy with recomputed BatchNorm statistics ("+bn", fig4.py --bn both)
    order = [v for m in METHOD_ORDER for v in (m, m + "+bn")]
    found = set(per_method) | set(missing)
    # the known methods in their order, then any other fig4.json holds, by name
    methods = [m for m in order if m in found] + sorted(found - set(order))
    base = per_method.get("baseline", {})
    out = {}
    for m in methods:
        combos = per_method.get(m, {})
        stats = summarize(list(combos.values()))  # mean and std over combinations
        deltas = [v - base[c] for c, v in combos.items() if c in base]  # paired: same combinations
        out[m] = {"mean_dice": stats["mean"], "std": stats["std"], "n_combos": stats["n"],
                  "per_combo": combos, "missing": missing.get(m, {}),
                  "delta_vs_baseline": float(np.mean(deltas)) if deltas else float("nan")}
    return out


def figure4_sweep(f4, fig4):
    """The paper's Figure 4: per training combination (ordered by number of training sets), each
    method's Dice averaged over the combination's test sets (None: n/a), with each combination's
    provenance (the seeds its ensemble and soups average, its SWA snapshots, its test sets)."""
    # by number of training sets, then canonical order
    combos = sorted({rec["combo"] for rec in fig4}, key=lambda c: (c.count("+"), _combo_key(c)))
    runs = {}
    for rec in fig4:
        folder = lambda p: Path(str(p)).parent.name  # noqa: E731  .../<COMBO>/s0/best.pt -> s0
        # older files record no "tests": the test sets any method was scored on
        held = {t for block in rec["methods"].values() for t in (block or {})}
        baseline = (rec.get("checkpoints") or {}).get("baseline", "")
        runs[rec["combo"]] = {"members": [folder(m) for m in rec.get("members") or []],
                              "baseline": folder(baseline),
                              "snapshots": len(rec.get("snapshots") or []),
                              "tests": rec.get("tests") or sorted(held, key=dataset_order)}
    return {"combos": combos, "runs": runs,
            "series": {m: [d["per_combo"].get(c) for c in combos] for m, d in f4.items()},
            "missing": {m: d["missing"] for m, d in f4.items() if d["missing"]}}


def reference_pairs(by_combo, reference):
    """Our AUPR (mean over seeds) beside the authors' for every (combination, test set, lesion)
    both have."""
    pairs = []
    for combo, runs in by_combo.items():
        for test in DATASET_IDS:
            for lesion in LESIONS:
                ours = cell(runs, test, "aupr", lesion)
                theirs = reference.get((combo, test, lesion))
                if theirs is not None and ours["n"]:
                    pairs.append({"combo": combo, "test": test, "lesion": lesion,
                                  "ours": ours["mean"], "n_ours": ours["n"], "authors": theirs})
    return pairs


def authors_rows(by_combo, authors, reference):
    """Per (combination, test set), means over lesions: our AUPR and Dice (over seeds), the
    authors' released model under our protocol (AUPR, Dice at p >= 0.5, argmax Dice) and the AUPR
    of their own export (reference/)."""
    rows = []
    for combo in sorted(set(by_combo) | set(authors), key=_combo_key):
        for test in DATASET_IDS:
            # their released model scored here (res), their own evaluation (export)
            res = ((authors.get(combo) or {}).get("results") or {}).get(test) or {}
            export = [reference[k] for k in ((combo, test, lesion) for lesion in LESIONS)
                      if k in reference]
            if not res and not export:
                continue
            runs = by_combo.get(combo, [])
            rows.append({"combo": combo, "test": test, "ours_aupr": cell(runs, test, "aupr"),
                         "ours_dice": cell(runs, test, "dice"),
                         "model_aupr": _num(res.get("mean_aupr")),
                         "model_dice": _num(res.get("mean_dice")),
                         "model_dice_argmax": _num(res.get("mean_dice_argmax")),
                         "export_aupr": float(np.mean(export)) if export else float("nan"),
                         "tested": tested_source(authors[combo]) if res else None})
    return rows


# ---------------------------------------------------------------- figures
def fmt(summary):
    """'—' no run, 'NaN' runs whose metric is undefined, else 'mean ± std (n=k)'."""
    if summary["n_runs"] == 0:  # no run at all
        return "—"
    if summary["n"] == 0:
        return f"NaN (n=0 of {summary['n_runs']})"
    std = f" ± {summary['std']:.3f}" if summary["n"] > 1 else ""
    return f"{summary['mean']:.3f}{std} (n={summary['n']})"


def fmt_paper(value):
    """A published number: three decimals, '—' where the paper has none."""
    return "—" if value is None else f"{value:.3f}"


def _save(fig, path):
    """Write a figure as a 120 dpi PNG (atomically) and free it."""
    utils.save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_figure3(data, path):
    """Figure 3: one panel per held-out test set, Dice of each combination that excludes it, on
    the labelling style's colour."""
    panels = data["panels"]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 4.6),
                             squeeze=False, sharey=True)
    for ax, (test, rows) in zip(axes[0], panels.items()):
        ax.set_title(f"held-out test: {data.get('names', TEST_NAMES).get(test, test)}",
                     fontsize=10)
        if not rows:  # every run with this test set was trained on it
            ax.text(0.5, 0.5, "no combination excludes it", ha="center", transform=ax.transAxes,
                    fontsize=8)
            continue
        x = np.arange(len(rows))
        for i, row in enumerate(rows):  # the background: the combination's labelling style
            if row["style"]:
                ax.axvspan(i - 0.5, i + 0.5, color=STYLE_COLORS[row["style"]], alpha=0.6, lw=0)
        ax.fill_between(x, [r["min"] for r in rows], [r["max"] for r in rows], color="C0",
                        alpha=0.3, lw=0)  # the spread over seeds
        ax.plot(x, [r["mean"] for r in rows], "o-", color="C0", ms=4)
        for i, row in enumerate(rows):
            if row["best"]:
                ax.plot(i, row["mean"], marker="*", ms=16, color="gold", mec="k", zorder=5)
        images = data["order_by"] == "n_train_images"
        ax.set_xticks(x, [f"{r['combo']} ({r['n_train']})" if images else r["combo"]
                          for r in rows], rotation=90, fontsize=7)
        ax.set_xlabel("training sets (training images)" if images else "training sets", fontsize=8)
        ax.set_xlim(-0.5, len(rows) - 0.5)
    axes[0][0].set_ylabel("Dice (mean over lesions)")
    handles = ([Patch(color=c, label=s) for s, c in STYLE_COLORS.items()]
               + [Patch(color="C0", alpha=0.3, label="min-max over seeds")])
    # NOTE: the legend on a line of its own under the title: beside it, it overlaps the title
    # when there are few panels (a dataset of one's own beside IDRiD: two)
    fig.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(0.01, 0.95),
               ncol=4, frameon=False)
    fig.suptitle(f"Leave-one-out scenarios, training sets ordered by "
                 f"{ORDER_NAMES[data['order_by']]}", x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    _save(fig, path)


def _why(missing):
    """{combination: why} -> 'why (A, B); why2 (C)': each reason once, with its combinations."""
    by_why = {}
    for combo, why in missing.items():
        by_why.setdefault(why, []).append(combo)
    return "; ".join(f"{why} ({', '.join(combos)})" for why, combos in by_why.items())


def figure4_title(data, sweep=None):
    """Figure 4's title: what is compared, on which combination(s) and test sets."""
    # the combinations: those with the method plus those without it
    n = max((d["n_combos"] + len(d["missing"]) for d in data.values()), default=0)
    runs = (sweep or {}).get("runs") or {}
    tests = {c: ", ".join(r.get("tests") or []) or "?" for c, r in runs.items()}
    if not tests:
        on = f"over {n} training combination(s)"
    elif len(tests) == 1:
        ((combo, sets),) = tests.items()
        on = f"trained on {combo}, tested on {sets}"
    elif len(set(tests.values())) == 1:
        on = (f"over {len(tests)} combinations ({', '.join(tests)}), tested on "
              f"{next(iter(tests.values()))}")
    else:  # each its own test sets: too long for a title beyond a few
        on = (f"over {len(tests)} combinations, each on its own test sets" if len(tests) > 3 else
              "over " + "; ".join(f"{c} (tested on {t})" for c, t in tests.items()))
    return f"Baseline vs ensemble, SWA and soups: {on}"


def plot_figure4(data, path, sweep=None):
    """Per method: bars of the mean over combinations, dots of the combinations; a method some
    combination lacks says so (n/a under its name, why in the footnote), never just left out. The
    title names the combination(s) and test sets (sweep: figure4_sweep's provenance)."""
    fig, ax = plt.subplots(figsize=(1.0 * max(len(data), 3) + 1.5, 4.2))
    rng = np.random.default_rng(0)  # fixed jitter: the PNG is reproducible
    names = []
    for i, (method, d) in enumerate(data.items()):
        if d["n_combos"]:  # colour by family: swa-encoder is an swa
            ax.bar(i, d["mean_dice"], yerr=d["std"] if math.isfinite(d["std"]) else None,
                   capsize=3, color=METHOD_COLORS.get(method.split("-")[0], "C4"), alpha=0.8)
        else:  # x in data units, y in axes units: "n/a" at the bottom of the empty slot
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="C3",
                    transform=ax.get_xaxis_transform())
        per_combo = list(d["per_combo"].values())
        # one dot per combination, jittered sideways so that equal values stay visible
        ax.plot(i + rng.uniform(-0.2, 0.2, len(per_combo)), per_combo, "k.", ms=3)
        n_a = f"\n(n/a in {len(d['missing'])})" if d["n_combos"] else "\n(n/a)"
        names.append(method + (n_a if d["missing"] else ""))
    ax.set_xticks(range(len(data)), names, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(data) - 0.4)  # room for an n/a at either end (no bar sets the limits)
    for label, d in zip(ax.get_xticklabels(), data.values()):  # methods with n/a: in red
        label.set_color("C3" if d["missing"] else "k")
    ax.set_ylabel("Dice (mean over test sets)")
    width = int(fig.get_figwidth() * 14)  # characters per line at fontsize 9
    ax.set_title(textwrap.fill(figure4_title(data, sweep), width), fontsize=9)
    _footnote_missing(fig, data)
    _save(fig, path)


def _footnote_missing(fig, data):
    """Lay the figure out, with the reasons of its n/a entries (if any) as a footnote under it."""
    missing = {}  # why -> the combinations
    for d in data.values():
        for combo, why in d["missing"].items():
            missing.setdefault(why, set()).add(combo)
    if not missing:
        fig.tight_layout()
        return
    text = "n/a: " + "; ".join(f"{why} ({', '.join(sorted(c, key=_combo_key))})"
                               for why, c in missing.items())
    width = int(fig.get_figwidth() * 15)  # characters per line at fontsize 7
    lines = textwrap.wrap(text, width)
    # the footnote at the bottom; the plot keeps the space above it (about 0.035 a line)
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, color="C3", va="bottom")
    fig.tight_layout(rect=(0, 0.035 * len(lines) + 0.02, 1, 1))


def _method_style(method):
    """(colour, line style, marker) of a Figure 4 series: colour by family as in figure4.png,
    line and marker by the part averaged (encoder dotted, v; decoder dashed, ^; else solid, o)."""
    family, _, part = method.replace("+bn", "").partition("-")
    ls, marker = {"encoder": (":", "v"), "decoder": ("--", "^")}.get(part, ("-", "o"))
    return METHOD_COLORS.get(family, "C4"), ls, marker


def plot_figure4_sweep(sweep, path):
    """The paper's Figure 4: training sets on the x-axis, one line per method. Values a
    combination lacks are crosses in a strip above the plot, one row per method (never a silent
    gap)."""
    combos, gone = sweep["combos"], [m for m in sweep["series"] if sweep["missing"].get(m)]
    x = np.arange(len(combos))
    strip = 0.2 * len(gone) + 0.3  # inches: one row per method with n/a values
    turn = len(combos) > 3  # names upright beyond 3 combinations: about 0.06 in per character
    height = 3.8 + (0.06 * max(map(len, combos)) if turn else 0.2) + strip * bool(gone)
    fig, axes = plt.subplots(2 if gone else 1, 1, sharex=True, squeeze=False,
                             figsize=(max(6.5, 0.32 * len(combos) + 4.5), height),
                             gridspec_kw={"height_ratios": [strip, 3.8]} if gone else {})
    ax = axes[-1][0]  # the plot itself, below the strip when there is one
    dodge = 0.6 / len(sweep["series"])  # methods side by side within a training set, not on top
    for k, (method, values) in enumerate(sweep["series"].items()):
        color, ls, marker = _method_style(method)
        y = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        bn = method.endswith("+bn")  # hollow markers: BatchNorm statistics recomputed
        # series k shifted by its dodge, the methods centred on the training set's tick
        ax.plot(x + (k - (len(sweep["series"]) - 1) / 2) * dodge, y, ls=ls, marker=marker, ms=5,
                color=color, label=method, lw=2.4 if method == "baseline" else 1.3,
                mfc="white" if bn else color)
    if gone:  # the strip above: a cross where a method is n/a
        top = axes[0][0]
        for row, method in enumerate(gone):
            at = [i for i, c in enumerate(combos) if c in sweep["missing"][method]]
            top.plot(x[at], [row] * len(at), ls="none", marker="x", ms=6, mew=1.5,
                     color=_method_style(method)[0])
        top.set_yticks(range(len(gone)), gone, fontsize=7)
        top.set_ylim(len(gone) - 0.3, -0.7)  # inverted: the first method on top
        top.tick_params(axis="x", length=0)
        top.set_title("n/a (why: report.md)", fontsize=7, loc="left")
    ax.set_xticks(x, combos, rotation=90 if turn else 0, fontsize=8)
    ax.set_xlim(-0.5, len(combos) - 0.5)
    ax.set_xlabel("training sets (ordered by number of datasets)")
    ax.set_ylabel("Dice (mean over lesions, then test sets)")
    fig.suptitle(f"Ensemble, SWA and model soups vs baseline, per training set "
                 f"({len(combos)} combination(s))", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save(fig, path)


def plot_reference(pairs, path, runs):
    """Our AUPR against the authors' export; the title says when ours are not all on real data."""
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    for lesion in LESIONS:  # each lesion in its fixed colour (curves.HEX_COLOURS, as every figure)
        sel = [p for p in pairs if p["lesion"] == lesion]
        # a dark rim: yellow and cyan vanish on white without one
        ax.scatter([p["ours"] for p in sel], [p["authors"] for p in sel], s=18,
                   color=HEX_COLOURS[lesion], edgecolors="0.2", linewidths=0.6, label=lesion)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)  # the diagonal: equal AUPR
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="our AUPR (mean over seeds)",
           ylabel="authors' published AUPR")
    # the caveat in the title: synthetic first, else unknown, with the counts when mixed
    c = source_counts(runs)
    ours = {"synthetic": "ours: toy models on SYNTHETIC data",
            "unknown": "ours: data source unknown"}
    caveat = next((ours[k] for k in ("synthetic", "unknown") if c[k]), "")
    if caveat and c[max(c, key=c.get)] != len(runs):
        caveat += f" ({c['synthetic']} synthetic, {c['unknown']} unknown of {len(runs)} runs)"
    title = ("Our AUPR vs the authors' published AUPR\nper (combination, test set, lesion); "
             "setups differ" + (f"\n{caveat}" if caveat else ""))
    ax.set_title(title, fontsize=9, color="C3" if caveat else "k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------- report.md, section by section
def protocol_lines(runs):
    """The distinct evaluation protocols of the runs, with how many runs used each."""
    seen = {}
    for r in runs:
        key = json.dumps(r["protocol"], sort_keys=True)
        seen[key] = seen.get(key, 0) + 1
    lines = [f"- `{k}` ({n} run(s))" for k, n in seen.items()]
    if len(seen) > 1:
        lines.insert(0, "- NOTE: the runs were evaluated under different protocols; cells may mix "
                        "them.")
    return lines or ["- (no results.json found: Figure 4 only)"]


def real_lines(path, out):
    """The real-data check (bench/real.py's real.json, its heldout.png copied beside report.md) ->
    md lines: per lesion, AP on the training and the held-out photographs beside the prevalence and
    the no-learning baseline."""
    import shutil

    rec = json.loads(Path(path).read_text())
    figure = Path(path).with_name("heldout.png")  # bench/real.py writes it beside the JSON
    if figure.is_file():
        shutil.copyfile(figure, out / "real_heldout.png")
    train, test = rec["train"], rec["test"]
    md = ["", "## The real-data check: four lesions on IDRiD photographs", "",
          f"`bench/real.py`: {train['n_images']} real IDRiD photographs "
          f"(tests/fixtures/idrid-4l14, downscaled 4x) trained from scratch on CPU, "
          f"{test['n_images']} held out, at "
          f"{rec['resolution']} px; train.py flags `{' '.join(rec['flags'])}`. AP is floor-free "
          "(a blank map scores the prevalence); *baseline*: the green channel's darkness (HE, MA) "
          "or brightness (EX, CWS) relative to its median in the FOV, no learning. Target: a "
          "held-out AP above the baseline's and at least 5x the prevalence (EX: 0.6).", "",
          "| lesion | AP, training images | AP, held out | prevalence | AP / prevalence "
          "| baseline AP | target |", "|---|---|---|---|---|---|---|"]
    for k, lesion in enumerate(rec["lesions"]):
        met = rec.get("targets_met", {}).get(lesion)
        md.append(f"| {lesion} | {train['ap'][k]:.3f} | {test['ap'][k]:.3f} | "
                  f"{test['prevalence'][k]:.2g} | "
                  f"{test['ap'][k] / max(test['prevalence'][k], 1e-12):.1f} | "
                  f"{test['baseline_ap'][k]:.3f} | "
                  f"{'' if met is None else 'met' if met else 'missed'} |")
    if figure.is_file():
        md += ["", "![held-out photographs: image | ground truth | prediction]"
                   "(real_heldout.png)"]
    return md


def real_styles_lines(path):
    """The paper's question on real photographs (bench/real_styles.py's table3.json) -> md lines:
    Dice (AP) per lesion of fine only, fine + coarse and coarse only on fine held-out labels."""
    rec = json.loads(Path(path).read_text())
    lesions = list(next(iter(rec["runs"].values()))["scores"])
    names = {"FIN": "fine only (FIN)", "FIN+CRS": "fine + coarse (FIN+CRS)",
             "CRS": "coarse only (CRS)"}
    styles = ", ".join(f"{k} {v}" for k, v in rec["styles"].items())
    md = ["", "## Table 3 on real photographs: fine versus coarse labels", "",
          f"`bench/real_styles.py`: the 8 training photographs of tests/fixtures/idrid-4l14 "
          f"halved, one half with its labels (FIN), the other coarsened as the synthetic "
          f"Retinal-Lesions style (CRS, data/coarsen.py); each run scored on the same "
          f"{rec['n_test']} held-out "
          f"photographs with their fine labels, at {rec['resolution']} px; train.py flags "
          f"`{' '.join(rec['flags'])}`. characterize.py measured: {styles}. Cells: Dice at "
          "p >= 0.5 (floor-free AP). Four held-out photographs and one seed: a direction, not a "
          "result.", "", "| trained on | " + " | ".join(lesions) + " |",
          "|---|" + "---|" * len(lesions)]
    for combo, run in rec["runs"].items():
        cells = [f"{run['scores'][les]['dice']:.3f} ({run['scores'][les]['ap']:.3f})"
                 for les in lesions]
        md.append(f"| {names.get(combo, combo)} | " + " | ".join(cells) + " |")
    return md


def style_data(runs_dir, by_combo, styles):
    """Style conditioning (beyond the paper): per combination with style-conditioned runs
    (COMBO/cond-s<SEED>), Dice (mean over lesions) on its fine sets' test sets, for the fine sets
    alone, the combination and the combination conditioned (evaluated at the style its results
    record, fine by default) -> {combo: {"tests", "rows"}}."""
    from data.ids import STYLE_TABLE

    # characterize.json where measured, else data.ids.STYLE_TABLE
    styles = {**STYLE_TABLE, **styles}
    conditioned = {}  # combination -> its conditioned runs
    for path in sorted(Path(runs_dir).glob("*/cond-s*/results.json")):
        rec = _read_json(path)
        if isinstance(rec, dict) and isinstance(rec.get("results"), dict):
            combo = _combo(rec.get("train"), path.parent.parent.name)
            conditioned.setdefault(combo, []).append(
                {"results": rec["results"], "path": path,
                 "style": (rec.get("protocol") or {}).get("style")})
    out = {}
    for combo, cond in sorted(conditioned.items(), key=lambda kv: _combo_key(kv[0])):
        fine = [d for d in combo.split("+") if styles.get(d) == "fine"]
        chosen = sorted({str(r["style"]) for r in cond})
        # three rows: the fine sets alone, the combination, the combination conditioned
        rows = [(f"{'+'.join(fine)} (fine sets only)", by_combo.get("+".join(fine), [])),
                (combo, by_combo.get(combo, [])),
                (f"{combo}, conditioned, style {'/'.join(chosen)}", cond)]
        # the mean column: per run, the mean over the fine test sets (runs lacking one left out)
        out[combo] = {"tests": fine, "rows": [
            {"name": name, **{t: cell(runs, t, "dice") for t in fine},
             "mean": summarize([float(np.mean([run_metric(r, t, "dice") for t in fine]))
                                for r in runs
                                if all(run_metric(r, t, "dice") is not None for t in fine)])}
            for name, runs in rows]}
    return out


def style_lines(data, out):
    """The style-conditioning section of report.md (style_data), with the maps of both styles when
    the demo wrote them (OUT/style_maps/<style>/*_overlay.*)."""
    md = ["", "## Style conditioning (beyond the paper)", ""]
    if not data:
        return md + ["No style-conditioned runs (`train.py --style-condition style`, run folders "
                     "COMBO/cond-sSEED)."]
    for combo, d in data.items():
        md += [f"Dice (mean over lesions) on the fine test sets of {combo}; cells: mean ± std "
               "over seeds (n).", "",
               "| Trained on | " + " | ".join(f"{t}-test" for t in d["tests"]) + " | mean |",
               "|---" * (len(d["tests"]) + 2) + "|"]
        md += [f"| {r['name']} | " + " | ".join(fmt(r[t]) for t in d["tests"] + ["mean"]) + " |"
               for r in d["rows"]]
        md.append("")
    md.append("The claim under test: conditioning the decoder on each training set's labelling "
              "style (FiLM, `train.py --style-condition style`) recovers at the fine style what "
              "adding the coarse set cost.")
    # NOTE: a dot name is a temporary file a killed writer left
    maps = {s: sorted(p for p in (out / "style_maps" / s).glob("*_overlay.jpg")
                      if not p.name.startswith("."))
            for s in ("fine", "coarse")}
    if maps["fine"] and maps["coarse"]:  # one photograph under both styles, side by side
        md += ["", "One test photograph, the first conditioned model, `predict.py --images --style "
               "fine` and `--style coarse`:", "", "| style fine | style coarse |", "|---|---|",
               "| " + " | ".join(f"![{s}]({maps[s][0].relative_to(out).as_posix()})"
                                 for s in ("fine", "coarse")) + " |"]
    return md


def figure4_lines(f4, sweep=None):
    """The Figure 4 section of report.md: the per-method summary, n/a cells with why, then the
    paper's form over the training sets (figure4_sweep)."""
    md = ["## Figure 4: weight averaging and ensembles", ""]
    if not f4:
        return md + ["No fig4.json found."]
    md += ["![Figure 4](figure4.png)", "", "Each combination's Dice is averaged over the test sets "
           "in its fig4.json, then over combinations (bars: mean ± std; dots: combinations). "
           "*n/a*: combinations without that method, and why (e.g. SWA of a run without "
           "snapshots).", "",
           "| Method | mean Dice | std | combinations | Δ vs baseline (paired) | n/a |",
           "|---|---|---|---|---|---|"]
    for m, d in f4.items():  # NaN (a single combination's std) prints as "—"
        mean = f"{d['mean_dice']:.3f}" if d["n_combos"] else "n/a"
        std, delta = (fmt_paper(null_nan(d[k])) for k in ("std", "delta_vs_baseline"))
        n_a = _why(d["missing"]) or "—"
        md.append(f"| {m} | {mean} | {std} | {d['n_combos']} | {delta} | {n_a} |")
    return md + ([""] + figure4_sweep_lines(sweep) if sweep else [])


def _one_or_each(values, fmt, each):
    """The value all combinations share, formatted, else `each` (the table gives them)."""
    distinct = {tuple(v) if isinstance(v, list) else v for v in values}  # lists as tuples
    if len(distinct) != 1:
        return each
    (value,) = distinct
    return fmt(list(value) if isinstance(value, tuple) else value)


def figure4_sweep_lines(sweep):
    """The paper's Figure 4 over the training sets: figure, provenance, one row per combination."""
    runs, methods = sweep["runs"], list(sweep["series"])
    each = list(runs.values())
    # the provenance in the caption when every combination shares it, else in the table
    seeds = _one_or_each([r["members"] for r in each],
                         lambda m: f"seeds {', '.join(m)}" if m else "seeds not recorded",
                         "each combination's seeds (table below)")
    tests = _one_or_each([r["tests"] for r in each], lambda t: ", ".join(t) or "not recorded",
                         "of each combination (table below)")
    snaps = _one_or_each([r["snapshots"] for r in each], lambda n: f"{n} snapshot(s)",
                         "table below")
    md = ["### Over the training sets, as the paper draws it", "",
          "![Figure 4 over the training sets](figure4_sweep.png)", "",
          f"{len(sweep['combos'])} training combination(s), each from its `<COMBO>/fig4.json` "
          "(`fig4.py`; `make fig4-sweep` runs it for every combination with two seeds): "
          f"baseline = the first seed's best.pt; ensemble and soups = the best.pt of {seeds}; "
          f"SWA = the first seed's snapshots ({snaps}). Each point: Dice "
          f"(mean over lesions) averaged over the test sets {tests}; a training set's methods "
          "side by side. Colour by method as above; dotted line and ▼ = encoder averaged, dashed "
          "and ▲ = decoder; hollow markers: BatchNorm statistics recomputed (+bn); the crosses "
          "above: n/a (why: the table above).", "",
          "| Trained on | seeds | SWA snapshots | test sets | " + " | ".join(methods) + " |",
          "|---" * (len(methods) + 4) + "|"]
    for i, combo in enumerate(sweep["combos"]):  # i: the combination's index in every series
        r = runs[combo]
        cells = ["n/a" if sweep["series"][m][i] is None else f"{sweep['series'][m][i]:.3f}"
                 for m in methods]
        md.append(f"| {combo} | {', '.join(r['members']) or '—'} | {r['snapshots']} | "
                  f"{', '.join(r['tests']) or '—'} | " + " | ".join(cells) + " |")
    return md


def authors_caption(authors):
    """What data the authors' released models were scored on, as the caption of their table says."""
    tested = {r["tested"] for r in authors if r["tested"]}  # rows with a model scored here
    if tested == {"synthetic"}:
        return "on synthetic data (`data.synthetic`: not comparable with *export*)"
    if "synthetic" in tested:
        return "on test data partly synthetic (`data.synthetic`), partly of other sources"
    if tested == {"real"}:
        return "on the real test sets"
    return "on test data of unknown source (data source unknown)"


def _cells(values, format_one):
    """One table row's cells: the four lesions, then the mean."""
    return " | ".join(format_one(values[k]) for k in LESIONS + ("mean",))


def _shown(runs, combos):
    """The runs a table shows: those of the given combinations."""
    return [r for r in runs if r["combo"] in combos]


def intro_lines(runs, notes):
    """The top of report.md: the data, what the cells mean, the notes, the protocols."""
    seeds = sorted({r["seed"] for r in runs})
    combos = sorted({r["combo"] for r in runs}, key=_combo_key)
    return ["# Cross-dataset lesion segmentation: report", "", *data_lines(runs), "",
            f"Built by `report.py` from {len(runs)} results file(s): {len(combos)} training "
            f"combination(s), seeds {seeds}. Cells: mean ± sample std (ddof=1) over seeds, "
            "n = runs with a defined value; `—` = no run; `NaN` = runs whose metric is undefined "
            "(no positive pixel).", "",
            *(f"- NOTE: {n}" for n in notes), *([""] if notes else []),
            "## Protocol (the results files' `protocol` field)", "", *protocol_lines(runs), ""]


def table2_lines(t2, runs):
    """Table 2: per dataset, our AUPR, its blank-map floor and the floor-free AP, then the
    published rows."""
    md = ["## Table 2: AUPR, trained and tested on the same dataset", "",
          "| Dataset | Model | " + " | ".join(LESIONS) + " | mean |",
          "|---" * (len(LESIONS) + 3) + "|"]
    ours = {"ours": "ours", "ours_floor": "ours: floor (blank map)",
            "ours_ap": "ours: AP (floor-free)"}
    for ds, row in t2.items():
        for key, name in ours.items():  # the dataset's name on its first row only
            head = f"| {row.get('name', ds)} |" if key == "ours" else "| |"
            md.append(f"{head} {name} | " + _cells(row[key], fmt) + " |")
        for name, pub in row["published"].items():
            md.append(f"| | {name} (published) | " + _cells(pub, fmt_paper) + " |")
    return md + ["", ours_caption(_shown(runs, t2)) + "Published rows: the paper's Table 2 "
                 "(Playout & Cheriet, arXiv:2405.08329), row labels uncertain; AUPR, floor and AP "
                 "as defined in docs/PROTOCOL.md (\"Evaluation protocol\").", ""]


def table3_lines(t3, runs):
    """Table 3: our Dice on other datasets' test sets beside the paper's."""
    md = ["## Table 3: Dice (mean over lesions) on other datasets' test sets", "",
          "| Test set | Trained on | ours | paper |", "|---|---|---|---|"]
    for test, row in t3.items():
        md += [f"| {TEST_NAMES[test]}-test | {c} | {fmt(v['ours'])} | {fmt_paper(v['paper'])} |"
               for c, v in row.items()]
    t3_runs = _shown(runs, {c for row in t3.values() for c in row})
    return md + ["", ours_caption(t3_runs) + "*paper*: the paper's Table 3."]


def figure3_lines(f3):
    """Figure 3 and its caption."""
    return ["", "## Figure 3: leave-one-out scenarios", "", "![Figure 3](figure3.png)", "",
            f"Combinations ordered by {ORDER_NAMES[f3['order_by']]}; background = labelling style "
            "of the training sets (a combination with a coarse set is coarse, else with a mixed "
            "set mixed, else fine; white = not characterized); shade = min-max over seeds; star = "
            "best mean.", ""]


def curves_lines(curves):
    """The sweep's validation curves, when a run logged a validation."""
    md = ["", "## Training curves of the sweep", ""]
    if not curves:
        return md + ["No run's log.jsonl holds a validation yet."]
    return md + [f"![Validation curves]({curves.name})", "",
                 "Validation Dice (mean over lesions) against step, from each run's `log.jsonl`: "
                 "one panel per combination, one line per seed; a star marks the step of the "
                 "run's `best.pt`, the checkpoint the tables evaluate. Each run folder also holds "
                 "its own `curves.png` (losses and per-lesion Dice)."]


def reference_lines(pairs, ref_note, runs):
    """The authors' published AUPR (their CSV export) beside ours."""
    md = ["", "## The authors' published AUPR beside ours", ""]
    if not pairs:
        return md + ["Not plotted (no reference file or no matching combination)."]
    return md + ["![Reference AUPR](reference_aupr.png)", "",
                 ours_caption(_shown(runs, {p["combo"] for p in pairs}))
                 + f"{len(pairs)} (combination, test set, lesion) pairs. {ref_note}"]


def authors_lines(authors, runs):
    """The authors' released models, scored under our protocol, beside ours and their export."""
    md = ["", "## The authors' released models beside ours", ""]
    if not authors:
        return md + ["No results of the authors' released models (run `make authors-models`)."]
    num = lambda v: "—" if not math.isfinite(v) else f"{v:.3f}"  # noqa: E731
    md += [ours_caption(_shown(runs, {r["combo"] for r in authors})) + "Means over lesions. "
           "*model*: the authors' released model of that combination (`make authors-models`: "
           f"`evaluate.py --ckpt hub:COMBO`), scored here under our protocol, "
           f"{authors_caption(authors)}; *export*: the AUPR of their own evaluation "
           "(`reference/`).", "",
           "| Trained on | Test set | AUPR ours | AUPR model | AUPR export | Dice ours | "
           "Dice model | Dice model (argmax) |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['combo']} | {TEST_NAMES[r['test']]} | {fmt(r['ours_aupr'])} | "
           f"{num(r['model_aupr'])} | {num(r['export_aupr'])} | {fmt(r['ours_dice'])} | "
           f"{num(r['model_dice'])} | {num(r['model_dice_argmax'])} |" for r in authors]
    return md + ["", "Where our protocol and their export differ: (1) ROI: we count the FOV's "
                 "pixels only, their export counted every pixel with p = 0 outside it (only the "
                 "lowest threshold's point moves; `evaluate.py --no-roi` is their way); (2) "
                 "resolution: their models run at 1024 px, as trained (their model card), ours at "
                 "their training resolution; (3) softmax vs sigmoid: a lesion's softmax "
                 "probability shares its mass with the background and the other lesions, so Dice "
                 "at p >= 0.5 is stricter for their models than for our independent sigmoids, and "
                 "their own Dice takes the argmax (last column); (4) splits: they held out their "
                 "own test images (`--split-protocol authors`, used by `make authors-models`), and "
                 "their export averages lesions absent from a test set that our means leave out."]


def write_report(out, runs, t2, t3, f3, f4, pairs, ref_note, curves=None, authors=None,
                 extra=(), notes=(), sweep=None):
    """OUT/report.md: every section in order, then the extra ones (real data, style)."""
    md = [*intro_lines(runs, notes), *table2_lines(t2, runs), *table3_lines(t3, runs),
          *figure3_lines(f3), *figure4_lines(f4, sweep), *curves_lines(curves),
          *reference_lines(pairs, ref_note, runs), *authors_lines(authors, runs), *extra]
    utils.write_atomic(out / "report.md", lambda tmp: tmp.write_text("\n".join(md) + "\n"))


# ---------------------------------------------------------------- main
def read_styles_flag(characterize, out):
    """--characterize: the labelling styles, {} when the default file is absent."""
    # the default is looked for beside the report (OUT/characterize/characterize.json)
    char = (out / "characterize" / "characterize.json" if characterize == DEFAULT_CHARACTERIZE
            else Path(characterize))
    if char.is_file():
        return load_styles(char)
    if characterize != DEFAULT_CHARACTERIZE:  # a file named on the command line must exist
        raise FileNotFoundError(f"--characterize {char} not found")
    return {}


def read_reference_flag(reference):
    """--reference: (the authors' AUPR by (combination, test set, lesion), the caption's note)."""
    if reference.lower() == "none":
        return {}, ""
    ref = Path(reference)
    # relative to the working folder, else to this script
    ref = (HERE / ref if not ref.exists() and not ref.is_absolute() and (HERE / ref).exists()
           else ref)
    if ref.is_file():
        note = (f"Source: `{ref.name}` (the authors' export, CC0-1.0). Their setup differs "
                "(SE-ResNeXt50 encoder, 1024 px, softmax over background + 4 lesions): a "
                "reference, not a target.")
        return load_reference(ref), note
    if reference != DEFAULT_REFERENCE:
        raise FileNotFoundError(f"--reference {ref} not found")
    return {}, ""


# Files written only when their input exists: removed first, so that a rerun without them leaves
# no stale one beside report.md
OPTIONAL_OUTPUTS = ("figure4.json", "figure4.png", "figure4_sweep.json", "figure4_sweep.png",
                    "reference_aupr.json", "reference_aupr.png", "sweep_curves.png",
                    "authors.json", "real_heldout.png", "real_he_heldout.png")


def write_tables_and_figures(out, runs, t2, t3, f3, f4, fig4, pairs):
    """The JSON and PNG of Tables 2-3 and Figures 3-4 and of the reference AUPR -> Figure 4's
    sweep form (None without fig4.json)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "table2.json", t2)
    write_json(out / "table3.json", t3)
    write_json(out / "figure3.json", f3)
    plot_figure3(f3, out / "figure3.png")
    for name in OPTIONAL_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    sweep = figure4_sweep(f4, fig4) if f4 else None
    if f4:
        write_json(out / "figure4.json", f4)
        plot_figure4(f4, out / "figure4.png", sweep)
        write_json(out / "figure4_sweep.json", sweep)
        plot_figure4_sweep(sweep, out / "figure4_sweep.png")
    if pairs:
        write_json(out / "reference_aupr.json", pairs)
        paired = {p["combo"] for p in pairs}
        plot_reference(pairs, out / "reference_aupr.png", [r for r in runs if r["combo"] in paired])
    return sweep


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    for flag in ("real", "real_styles"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path} not found")

    runs, fig4, skipped, notes = load_runs(args.runs_dir)
    for path, why in skipped:
        print(f"skipped {path}: {why}; left out of the tables", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    styles = read_styles_flag(args.characterize, out)
    reference, ref_note = read_reference_flag(args.reference)

    for r in runs:
        r["source"] = run_source(r)
    by_combo = {}  # combination -> its runs, by seed
    for r in sorted(runs, key=lambda r: (_combo_key(r["combo"]), r["seed"])):
        by_combo.setdefault(r["combo"], []).append(r)
    names = dataset_names(runs)  # one's own datasets by their dataset.json "name"
    t2, t3 = table2(by_combo, names), table3(by_combo)
    f3, f4 = figure3_data(by_combo, styles, names), figure4_data(fig4)
    pairs = reference_pairs(by_combo, reference)
    if not Path(args.authors).is_dir() and args.authors != DEFAULT_AUTHORS:
        raise FileNotFoundError(f"--authors {args.authors} not found")
    authors = (authors_rows(by_combo, load_authors(args.authors), reference)
               if Path(args.authors).is_dir() else [])

    sweep = write_tables_and_figures(out, runs, t2, t3, f3, f4, fig4, pairs)
    curves = plot_sweep(args.runs_dir, out / "sweep_curves.png")
    if authors:
        write_json(out / "authors.json", authors)
    extra = real_lines(args.real, out) if args.real else []
    extra += real_styles_lines(args.real_styles) if args.real_styles else []
    styled = style_data(args.runs_dir, by_combo, styles)
    write_json(out / "style.json", styled)
    extra = extra + style_lines(styled, out)
    write_report(out, runs, t2, t3, f3, f4, pairs, ref_note, curves, authors, extra, notes, sweep)
    print(f"report: {len(runs)} run(s), {len(fig4)} fig4 file(s) -> {out / 'report.md'}")


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: rerun the same command")
