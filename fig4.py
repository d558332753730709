r"""The paper's Figure 4 for one training combination (section 3.3): every averaging method by part.

    python fig4.py runs/IDR+DDR+MES --test IDR,DDR,MES --data-root data_raw
    python fig4.py runs/IDR+DDR+MES --test IDR,DDR,FGA,RET,MES --members 4 --bn both \
        -o runs/IDR+DDR+MES/fig4.json
    make fig4 COMBO=IDR+DDR+MES FIG4_FLAGS="--bn both"
    make fig4-sweep FIG4_FLAGS="--bn both"    # every combination under RUNS with 2 seeds' best.pt

COMBO_DIR holds the seeds' runs s0/, s1/, ... (train.py). baseline = the first seed's best.pt;
ensemble and soups (encoder, decoder, full) = the first --members seeds' best.pt; SWA = the first
seed's snapshots. The averages (average.py) go to COMBO_DIR/avg/ (the ensemble as a manifest,
avg/ensemble.json) and are reused while their provenance matches; each is evaluated on the test
sets with evaluate.py's protocol (docs/PROTOCOL.md) and the mean scores per method and test set go
to fig4.json, which report.py reads. A first seed without snapshots has no SWA: fig4.json lists its
entries under "missing", with why; report.py shows n/a. More in docs/AVERAGING.md.
"""
import argparse
import itertools
import re
from pathlib import Path

import utils
from data.flags import add_data_args, add_dataset_list
from data.ids import DATASET_IDS, combo_name

# What fig4.json keeps of each test set's results block: the means over lesions that evaluate.py
# writes
SCORES = ("mean_dice", "mean_aupr", "mean_ap", "mean_aupr_floor")


def build_parser():
    p = utils.Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("combo_dir", help="RUNS/COMBO holding the seeds' runs s0/, s1/, ...")
    # the paper's Figure 4 scores every method on every test set: all five by default
    add_dataset_list(p, "--test", "test sets, e.g. IDR,DDR,MES", default=list(DATASET_IDS))
    # the paper's ensembles and soups are of 4 seeds; fewer found: all of them (figure4 says so)
    p.add_argument("--members", type=int, default=4,
                   help="first N seeds' best.pt form the ensemble and the soups "
                        "(default: %(default)s)")
    p.add_argument("-o", "--out", default=None,
                   help="fig4.json to write (default: COMBO_DIR/fig4.json)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out (default: %(default)s)")
    add_averaging_args(p)
    return p


def add_averaging_args(p):
    """average.add_averaging_args(p, reference="best", bn=(keep, recompute, both)), written out
    here: importing average.py loads torch, and --help answers before torch loads
    (tests/test_fig4.py checks that the two agree)."""
    g = p.add_argument_group("averaging")
    g.add_argument("--reference", choices=("first", "best"), default="best",
                   help="ingredient supplying what is not averaged (other part, integer buffers): "
                        "the first given or the best by validation score (default: %(default)s)")
    g.add_argument("--bn", choices=("keep", "recompute", "both"), default="keep",
                   help="keep the averaged BatchNorm statistics, or recompute them over training "
                        "patches, or both (each average twice, '+bn' names the recomputed) "
                        "(default: %(default)s)")
    g.add_argument("--bn-batches", type=int, default=100,
                   help="training batches (the run's --batch x --patch) for --bn recompute "
                        "(default: %(default)s)")
    g.add_argument("--metric", choices=("dice", "ap", "aupr"), default="dice",  # average.METRICS
                   help="validation score of --greedy and --reference best, mean over lesions: "
                        "pooled Dice, AP or AUPR (docs/AVERAGING.md) (default: %(default)s)")
    g.add_argument("--device", default=None,
                   help="device of the validation and BatchNorm passes; averaging runs on the CPU "
                        "(default: cuda if available, else cpu)")
    # the data flags: where a flag is not given, the checkpoint's recorded value (data_settings)
    add_data_args(p)


utils.start(__name__, build_parser)  # --help before torch loads; a Ctrl-C while it loads: one line
# the heavy imports (torch, the data, averaging and scoring modules: seconds) after --help

import data  # noqa: E402
from average import (PARTS, build_average, check_out, combination, read_manifest,  # noqa: E402
                     select_snapshots, write_ensemble)
from evaluate import evaluate  # noqa: E402
from model import save_checkpoint  # noqa: E402
from predict import read_checkpoint  # noqa: E402
from utils import write_json  # noqa: E402


def find_seeds(combo_dir):
    """COMBO_DIR/s<N>/ folders holding best.pt, sorted by N; at least two (a soup needs two
    runs)."""
    combo_dir = Path(combo_dir)
    # sorted by N as a number: s10 after s2; a seed still training (no best.pt yet) is left out
    seeds = sorted((int(m.group(1)), d) for d in combo_dir.glob("s*")
                   if (m := re.fullmatch(r"s(\d+)", d.name)) and (d / "best.pt").is_file())
    if len(seeds) < 2:
        found = ", ".join(d.name for _, d in seeds) or "none"
        raise FileNotFoundError(f"fig4 needs best.pt of at least 2 seeds under {combo_dir}/s*/ "
                                f"(found: {found})")
    return [d for _, d in seeds]


# ---- the averages, built once --------------------------------------------------------------------
def _reusable(path, provenance):
    """Is avg/X already the average we would build (same method, ingredients, part, bn, reference
    rule)?"""
    path = Path(path)
    if not path.is_file():
        return False
    # a manifest is read without loading its members' weights
    old = (read_manifest(path)[0] if path.suffix == ".json"
           else read_checkpoint(path)).get("provenance") or {}
    # NOTE: the metric and --bn-batches are not compared: an average built with other values is
    # reused (delete avg/ to rebuild)
    keys = ("method", "ingredients", "part", "bn", "reference_rule")
    return all(old.get(k) == provenance.get(k) for k in keys)


def _stale_results(path):
    """The results file evaluate() writes for avg/X; a rebuilt average must not inherit it."""
    # evaluate.merge_results would refuse it anyway (other weights): removed, not an error
    return Path(path).with_name(Path(path).stem + ".results.json")


def build_plan(combo, args, avg, baseline, members, snapshots):
    """{method name: checkpoint path}, building the averages (and the ensemble manifest) not already
    there."""
    plan = {"baseline": baseline, "ensemble": str(avg / "ensemble.json")}
    # the ensemble: a manifest of the members (no weights, nothing to recompute)
    want = {"method": "ensemble", "ingredients": members, "part": "full", "bn": "keep",
            "reference_rule": None}
    if not _reusable(plan["ensemble"], want):
        write_ensemble(plan["ensemble"], members, read_checkpoint)
        _stale_results(plan["ensemble"]).unlink(missing_ok=True)
    # --bn both: each average twice, e.g. "swa-full" (averaged statistics) and "swa-full+bn"
    # (recomputed)
    modes = ("keep", "recompute") if args.bn == "both" else (args.bn,)
    # every BatchNorm mode x (SWA of the snapshots, soup of the members) x part; SWA without
    # snapshots is skipped (swa_snapshots lists it as missing)
    for bn, (kind, paths), part in itertools.product(modes, (("swa", snapshots), ("soup", members)),
                                                     PARTS):
        if not paths:
            continue
        name = f"{kind}-{part}"
        key = name + ("+bn" if bn == "recompute" and len(modes) == 2 else "")  # the method's name
        plan[key] = str(avg / f"{name}{'-bn' if bn == 'recompute' else ''}.pt")  # its file
        want = {"method": name, "ingredients": paths, "part": part, "bn": bn,
                "reference_rule": args.reference}
        if _reusable(plan[key], want):  # a rerun after an interruption: built ones are kept
            print(f"reusing {plan[key]}")
            continue
        print(f"building {plan[key]} from {len(paths)} checkpoint(s)")
        save_checkpoint(plan[key], build_average(paths, kind, part, combo, args, bn=bn,
                                                 load=read_checkpoint))
        _stale_results(plan[key]).unlink(missing_ok=True)
    return plan


# ---- scoring and the table -----------------------------------------------------------------------
def evaluate_plan(plan, tests, where, device, avg):
    """{method: {test set: {mean_dice, mean_aupr, ...}}}: each checkpoint of the plan on every test
    set."""
    methods = {}
    for name, path in plan.items():
        print(f"evaluating {name}: {path}")
        stem = name if name == "baseline" else Path(path).stem  # e.g. avg/swa-full-bn.results.json
        # each method's results file in avg/: a rerun merges into it (evaluate.merge_results)
        res = evaluate(path, tests, where, out=avg / f"{stem}.results.json", device=device,
                       verbose=False)["results"]
        # NOTE: only this call's test sets: the results file may keep others from an earlier run
        methods[name] = {t: {k: res[t][k] for k in SCORES if k in res[t]} for t in tests}
    return methods


def figure4(args, parser):
    """Build, evaluate and tabulate every method of Figure 4 for args.combo_dir -> the fig4.json
    dict (written)."""
    combo_dir = Path(args.combo_dir)
    if args.members < 1:
        raise ValueError(f"--members must be >= 1, got {args.members}")
    seeds = find_seeds(combo_dir)
    # the ensemble's and the soups' ingredients: the first --members seeds, in seed order
    members = [str(d / "best.pt") for d in seeds[:args.members]]
    if len(members) < args.members:
        print(f"note: {len(members)} seeds found: the ensemble and the soups use {len(members)}, "
              f"not {args.members}")
    baseline = str(seeds[0] / "best.pt")
    # the training combination and its data flags, from the first seed's recorded args
    combo = combination(read_checkpoint(baseline).get("args") or {}, args, parser)
    data_root, cache, options = combo.where
    tests = list(args.test)  # canonical IDs already (data.flags.DatasetList)
    # one summary each, then quiet
    for d in sorted(set(combo.train) | set(tests), key=DATASET_IDS.index):
        data.prepare_cache(d, data_root, cache, combo.resolution, **options)
    snapshots, missing = swa_snapshots(seeds[0], args.bn)
    avg = combo_dir / "avg"  # the averages and every method's results file
    plan = build_plan(combo, args, avg, baseline, members, snapshots)
    methods = evaluate_plan(plan, tests, (data_root, cache, {**options, "verbose": False}),
                            combo.device, avg)
    report = {"version": 1, "combo": combo_name(combo.train), "train": combo.train, "tests": tests,
              "bn": args.bn, "reference": args.reference, "metric": args.metric,
              "members": members, "snapshots": snapshots,
              "checkpoints": plan, "methods": methods, "missing": missing}
    write_json(args.out, report)  # NaN (a lesion absent from a test set) is written as null
    print_table(methods, missing, tests)
    return report


def swa_snapshots(run_dir, bn):
    """The first seed's snapshots for SWA, and {method: why} for SWA entries that cannot be built.

    NOTE: a run without snapshots has no SWA: its entries stay in fig4.json's "missing" (report.py
    shows them as n/a cells), never dropped without a trace.
    """
    try:
        return select_snapshots(run_dir), {}  # all of them: SWA over the whole run
    except FileNotFoundError as e:
        suffixes = ("", "+bn") if bn == "both" else ("",)
        why = f"no snapshots in {Path(run_dir).name}/snapshots"  # relative to COMBO_DIR
        print(f"note: SWA not evaluated: {e}; fig4.json lists its entries under 'missing' (n/a in "
              "report.py)")
        return [], {f"swa-{part}{s}": why for s in suffixes for part in PARTS}


def print_table(methods, missing, tests):
    """Mean Dice per method and test set; a method that could not be built is a row of n/a."""
    print(f"\n{'method':16s}" + "".join(f"{t:>8s}" for t in tests) + "   (mean Dice)")
    for name, block in methods.items():
        print(f"{name:16s}" + "".join(f"{block[t]['mean_dice']:8.3f}" for t in tests))
    for name, why in missing.items():
        print(f"{name:16s}" + "".join(f"{'n/a':>8s}" for _ in tests) + f"   ({why})")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out = args.out or str(Path(args.combo_dir) / "fig4.json")
    check_out(args.out, args.force)  # before any average is built: a folder, an existing file
    if args.bn_batches < 1:
        raise ValueError(f"--bn-batches must be >= 1, got {args.bn_batches}")
    # a device this machine lacks ("cuda" without a GPU) is one line now, not after an hour
    args.device = str(utils.check_device(args.device or utils.default_device()))
    report = figure4(args, parser)
    na = f" ({len(report['missing'])} n/a: no snapshots)" if report["missing"] else ""
    print(f"\nwrote {args.out}: {len(report['methods'])} methods{na} of {report['combo']} on "
          f"{', '.join(report['tests'])}; the averages and each method's results.json are in "
          f"{Path(args.combo_dir) / 'avg'}/")
    return report


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: rerun the same command; the averages already built "
                                "are reused")
