"""The paper's question on real photographs: do coarse labels of other photographs help fine ones?
(issue 25; the demo's "real Table 3").

    python bench/real_styles.py --out /tmp/real_styles                 # the recipe, 512 px
    python bench/real_styles.py --out /tmp/rs -- --iters 100           # shorter (the demo)

The 8 training photographs of tests/fixtures/idrid-4l14 (its split.json) are halved: FIN keeps the
first half's labels as they are, CRS is the other half coarsened as the synthetic Retinal-Lesions
style is (data/coarsen.py: merged, dilated regions, most microaneurysms unlabelled); both share
the 2 validation photographs (FIN fine, CRS coarsened) and the 4 held-out ones. Three runs of
bench/real.py's recipe (plus any train.py flags after `--`): fine only (FIN), fine + coarse
(FIN+CRS) and coarse only (CRS), each scored on FIN's 4 held-out photographs with their fine labels
(Dice at p >= 0.5 and floor-free AP per lesion, evaluate.py's protocol). characterize.py measures
the two copies' labelling styles (FIN must come out fine, CRS coarse). Prints the table and writes
OUT/table3.json.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # the repo root and bench/real.py are importable

import utils  # noqa: E402


def build_parser():
    p = utils.Parser(description=__doc__)
    p.add_argument("--out", required=True,
                   help="work folder: FIN/, CRS/, cache, runs/, characterize/, table3.json")
    p.add_argument("--resolution", type=int, default=512,
                   help="prepared size (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("extra", nargs="*", help="train.py flags after `--`, added to the recipe")
    return p


utils.start(__name__, build_parser)  # --help before torch loads

import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import characterize  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from data import coarsen  # noqa: E402
from data.ids import LESIONS  # noqa: E402
from real import FIXTURE, recipe  # noqa: E402
from utils import write_json  # noqa: E402

RUNS = ("FIN", "FIN+CRS", "CRS")  # fine only, fine + coarse, coarse only


def make_copies(out, resolution):
    """FIN (fine) and CRS (coarsened) in the generic layout from the fixture's split -> roots."""
    split = json.loads((FIXTURE / "split.json").read_text())
    halves = {"FIN": split["train"][0::2], "CRS": split["train"][1::2]}
    roots = {}
    for name, stems in halves.items():
        roots[name] = Path(out) / name
        if not (roots[name] / "dataset.json").is_file():  # a rerun keeps the copies
            coarsen.main(["--dataset", "IDR", "--root", f"IDR={FIXTURE}", "--out",
                          str(roots[name]), "--train", ",".join(stems), "--val",
                          ",".join(split["val"]), "--test", ",".join(split["test"])]
                         + (["--fine"] if name == "FIN" else []))
    return roots


def train_run(combo, roots, out, resolution, extra):
    """One training run of the recipe on `combo` (FIN, FIN+CRS or CRS) -> (best.pt, seconds)."""
    run = Path(out) / "runs" / combo / "s0"
    flags = recipe(resolution, extra) + [
        "--train", combo.replace("+", ","), "--data-root", str(out), "--cache",
        str(Path(out) / "cache"), "--resolution", str(resolution), "--out", str(run),
        "--device", "cpu", "--workers", "0"]
    for name, root in roots.items():
        flags += ["--root", f"{name}={root}"]
    start = time.perf_counter()
    train.run(train.parse_args(flags))
    return run / "best.pt", time.perf_counter() - start


def score(ckpt, roots, out):
    """{lesion: {dice, ap}} of best.pt on FIN's held-out photographs (fine labels)."""
    where = (str(out), str(Path(out) / "cache"), {"roots": {k: str(v) for k, v in roots.items()}})
    block = evaluate.evaluate([str(ckpt)], ["FIN"], where, device="cpu",
                              verbose=False)["results"]["FIN"]
    return {les: {k: block["lesions"][les][k] for k in ("dice", "ap")} for les in LESIONS}


def styles_of(roots, out, resolution):
    """characterize.py's verdict on the two copies: {FIN: style, CRS: style}."""
    folder = Path(out) / "characterize"
    argv = ["--datasets", "FIN,CRS", "--data-root", str(out), "--cache",
            str(Path(out) / "cache"), "--resolution", str(resolution), "--out", str(folder)]
    for name, root in roots.items():
        argv += ["--root", f"{name}={root}"]
    characterize.main(argv)
    found = json.loads((folder / "characterize.json").read_text())["datasets"]
    return {name: found[name]["style"] for name in roots}


def print_table(report):
    print(f"\nreal Table 3: Dice (AP) on {report['n_test']} held-out photographs, fine labels; "
          f"styles measured: {report['styles']}")
    print(f"{'trained on':12s}" + "".join(f"{les:>16s}" for les in LESIONS) + f"{'seconds':>9s}")
    for combo in RUNS:
        r = report["runs"][combo]
        cells = "".join(f"{r['scores'][les]['dice']:8.3f} ({r['scores'][les]['ap']:.3f})"
                        for les in LESIONS)
        print(f"{combo:12s}{cells}{r['train_seconds']:9.0f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    roots = make_copies(out, args.resolution)
    runs = {}
    for combo in RUNS:
        ckpt, seconds = train_run(combo, roots, out, args.resolution, args.extra)
        runs[combo] = {"scores": score(ckpt, roots, out), "train_seconds": round(seconds, 1)}
    split = json.loads((FIXTURE / "split.json").read_text())
    report = {"flags": recipe(args.resolution, args.extra), "resolution": args.resolution,
              "n_test": len(split["test"]), "styles": styles_of(roots, out, args.resolution),
              "runs": runs}
    write_json(out / "table3.json", report)
    print_table(report)
    print(f"numbers: {out / 'table3.json'}")
    return report


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: rerun the same command (finished runs are kept)")
