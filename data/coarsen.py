"""A copy of a dataset in the generic layout (data/generic.py), its labels coarsened as a coarse
annotator draws them: the paper's fine-versus-coarse question on real photographs.

    python -m data.coarsen --dataset IDR --root IDR=tests/fixtures/idrid-4l14 --out CRS \\
        --train IDRiD_05,IDRiD_06 --val IDRiD_10               # coarse labels, two splits
    python -m data.coarsen --dataset IDR --root IDR=... --out FIN --fine --train ... --test ...
    python train.py --train FIN,CRS --root FIN=FIN --root CRS=CRS ...

The coarsening is the synthetic Retinal-Lesions style's (data.synthetic): every lesion region is
dilated (holes filled) so that neighbours merge, by a radius that grows with the fundus (MA 4, HE 4,
EX 7, CWS 5 px for a FOV of radius 256 px), and most microaneurysms are left unlabelled, the
smallest most often (a component of radius r px is kept with probability 0.12 to 0.62). --fine
copies the labels unchanged: the same photographs in the generic layout. The photographs are copied
byte for byte; each annotated lesion gets one PNG mask (0/255) per image; dataset.json names the
source; --train/--val/--test write splits.json (the stems copied are their union; none: every
image, no splits.json).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


def build_parser():
    from data.flags import add_data_args, add_dataset_list

    p = utils.Parser(description=__doc__)
    add_dataset_list(p, "--dataset", "the dataset to copy (one)", required=True)
    p.add_argument("--out", required=True, help="the copy's folder (must not exist)")
    p.add_argument("--fine", action="store_true", help="copy the labels unchanged")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", default="", metavar="STEMS",
                       help=f"comma-separated image stems of the copy's {split} split")
    p.add_argument("--seed", type=utils.check_range(int, 0), default=0,
                   help="seed of the MAs left unlabelled (default: %(default)s)")
    add_data_args(p)
    return p


utils.start(__name__, build_parser)  # --help before numpy loads

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from data.datasets import (annotated, dataset_root, list_samples, load_image,  # noqa: E402
                           load_masks)
from data.flags import data_options  # noqa: E402
from data.ids import LESIONS  # noqa: E402
from data.preprocess import fov_box  # noqa: E402
from data.splits import in_two_splits  # noqa: E402
from data.synthetic import coarse_radius, dilate, ma_keep_probability  # noqa: E402

EIGHT = np.ones((3, 3), bool)  # 8-connected components, as characterize.py counts lesions


def coarsen(masks, lesions, fov_radius, rng):
    """bool (4, H, W) masks -> the coarse annotator's (4, H, W): the `lesions` dilated (MAs first
    thinned), the others untouched. fov_radius: the fundus radius in pixels (the length unit)."""
    u = fov_radius / 256
    radius = coarse_radius(u)
    out = masks.copy()
    for c, name in enumerate(LESIONS):
        if name not in lesions or not masks[c].any():
            continue
        m = masks[c]
        if name == "MA":
            labels, n = ndimage.label(m, structure=EIGHT)
            sizes = ndimage.sum_labels(m, labels, index=np.arange(1, n + 1))
            r = np.sqrt(sizes / np.pi)  # each MA's radius, as the synthetic ones are drawn
            kept = 1 + np.flatnonzero(rng.random(n) < ma_keep_probability(r, u))
            m = np.isin(labels, kept)
        out[c] = dilate(m, radius[name])
    return out


def splits_of(args):
    """{split: [stems]} of --train/--val/--test (empty splits left out); a stem in two splits is
    a one-line error (the copy's data.check would refuse it)."""
    splits = {s: [x.strip() for x in getattr(args, s).split(",") if x.strip()]
              for s in ("train", "val", "test")}
    # a stem twice in one flag is copied once: only two flags naming it are an error
    twice = in_two_splits({k: list(dict.fromkeys(v)) for k, v in splits.items()})
    if twice:
        stem, first, other = twice
        raise ValueError(f"--{first} and --{other}: {stem!r} is in both; an image belongs to one "
                         f"split")
    return {s: v for s, v in splits.items() if v}


def write_copy(samples, out, lesions, fine, threshold, rng):
    """Every sample's photograph (its bytes) and masks of `lesions` into out (generic layout)."""
    (out / "images").mkdir(parents=True)
    for les in lesions:
        (out / "masks" / les).mkdir(parents=True)
    for s in samples:
        shutil.copyfile(s.image, out / "images" / f"{s.id}{Path(s.image).suffix.lower()}")
        image = load_image(s.image)
        masks = load_masks(s, image.size, threshold)
        if not fine:
            x0, _, x1, _ = fov_box(image)[0]
            masks = coarsen(masks, lesions, (x1 - x0) / 2, rng)
        for les in lesions:
            mask = masks[LESIONS.index(les)].astype(np.uint8) * 255
            Image.fromarray(mask).save(out / "masks" / les / f"{s.id}.png")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if len(args.dataset) != 1:
        raise ValueError(f"--dataset: one dataset to copy, got {','.join(args.dataset)}")
    (dataset,) = args.dataset
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out}: already exists; the copy is written to a new folder")
    options = data_options(args)
    root = dataset_root(dataset, args.data_root, options["roots"])
    samples = list_samples(dataset, root, options["ret_he"])
    splits = splits_of(args)
    wanted = [x for v in splits.values() for x in v]
    by_id = {s.id: s for s in samples}
    unknown = [x for x in wanted if x not in by_id]
    if unknown:
        raise ValueError(f"{dataset}: no image {unknown[0]!r} in {root} (--train/--val/--test)")
    chosen = [by_id[x] for x in dict.fromkeys(wanted)] if wanted else samples
    lesions = [les for les in LESIONS if all(les in annotated(s) for s in chosen)]
    tmp = out.with_name(f".{out.name}.partial")  # whole or not at all
    shutil.rmtree(tmp, ignore_errors=True)
    write_copy(chosen, tmp, lesions, args.fine, options["thresholds"].get(dataset, 0),
               np.random.default_rng(args.seed))
    info = {"name": f"{dataset} ({'fine' if args.fine else 'coarsened'} copy, data.coarsen)",
            "lesions": {les: f"masks/{les}" for les in lesions}}
    (tmp / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    if splits:
        (tmp / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"{dataset}: {len(chosen)} images, {'fine' if args.fine else 'coarsened'} "
          f"{', '.join(lesions)} -> {out}")


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: nothing written; rerun the same command")
