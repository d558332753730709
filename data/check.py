r"""Check a dataset before preparing it: every problem at once, and a short report per lesion.

    python -m data.check --root ABC=path/to/clinic              # your own dataset (docs/DATA.md)
    python -m data.check --dataset IDR --data-root data_raw     # one of the five, as distributed
    python -m data.check --dataset IDR,ABC --root ABC=path/to/clinic --mask-threshold ABC=127

Errors (exit status 1): a wrong dataset.json, a mask folder missing, a mask without an image, two
files of one stem, a JPEG mask, a mask of another size than its image, an image or mask that
cannot be decoded (corrupt, truncated), a split file naming an image that is not there. Warnings
(exit status 0 when there is no error): a PNG / TIFF mask whose grey levels look like JPEG noise, a
lesion annotated in the dataset that no mask marks in any image. Per lesion: the images annotating
it, those containing it, its share of their pixels and the values its masks hold (0/255 or 0/1 for
clean masks). Each image and mask is decoded once, without preprocessing. data.prepare checks the
listing and the split the same way before it prepares, and stops at the first error.
"""
import argparse
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python data/check.py` as well as `python -m data.check`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils
from data.flags import add_data_args, add_dataset_list, data_options
from data.ids import LESIONS, dataset_order, is_own


def build_parser():
    """The command line: the datasets, the decoding threads and the data flags."""
    parser = utils.Parser(prog="python -m data.check", description=__doc__)
    add_dataset_list(parser, "--dataset", "datasets to check (default: the IDs --root names)")
    parser.add_argument("--workers", type=utils.check_range(int, 1), default=None,
                        help="decoding threads (default: min(8, CPU count))")
    add_data_args(parser)
    for action in parser._actions:  # NOTE: nothing is prepared here: --cache has no use
        if "--cache" in action.option_strings:
            action.help = argparse.SUPPRESS
    return parser


utils.start(__name__, build_parser)  # --help before numpy and PIL load

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import generic  # noqa: E402
from data.datasets import (_decode_mask, _unreadable, _upright_mask, _value_histogram,  # noqa: E402
                           annotated, dataset_root, list_samples, load_image, noise_finding)
from data.splits import make_splits  # noqa: E402


@dataclass
class Check:
    """What data.check found in one dataset."""
    dataset: str
    root: Path | None = None
    name: str = ""  # dataset.json's "name" (one's own datasets)
    threshold: int = 0
    split_file: str | None = None  # None: the split protocol's
    protocol: str = "paper"
    samples: list = field(default_factory=list)
    splits: dict | None = None
    errors: list = field(default_factory=list)  # one-line messages
    warnings: list = field(default_factory=list)
    lesions: dict = field(default_factory=dict)  # lesion -> {annotated, present, pixels, ...}
    read: bool = True  # False: the folder or its dataset.json could not be read, nothing checked


# ----------------------------------------------------------------------------- the listing

def structure(dataset_id, root, ret_he="retinal", split_file=None, split_seed=0,
              split_protocol="paper"):
    """(samples, splits, errors) of a dataset, without decoding a file: its images and mask files as
    listed, its split (None where it failed) and every problem found on the way (exceptions, one
    line each). A dataset of one's own reports them all (a mask folder missing, masks without an
    image, two files of one stem, JPEG masks, split stems); one of the five, the first."""
    errors = []
    try:
        samples = list_samples(dataset_id, root, ret_he, errors=errors)
    except (ValueError, OSError) as e:  # dataset.json unreadable, a distributed layout broken
        return [], None, [e]
    splits = None
    if samples:
        try:
            splits = make_splits(samples, dataset_id, split_seed, split_file, split_protocol)
        except (ValueError, OSError) as e:
            errors.append(e)
    return samples, splits, errors


def check_command(dataset_id, root):
    """The data.check command line of one dataset, for the messages of data.prepare."""
    where = f"--root {dataset_id}={shlex.quote(str(root))}"
    return f"python -m data.check {where}" if is_own(dataset_id) else \
        f"python -m data.check --dataset {dataset_id} {where}"


def first_error(errors, dataset_id, root):
    """The first of a dataset's problems, as the exception data.prepare stops with: its message, how
    many more there are and the command that lists them all."""
    e, more = errors[0], len(errors) - 1
    also = f"{more} more problem(s): " if more else ""
    return type(e)(f"{utils.message(e)} ({also}{check_command(dataset_id, root)} lists them all)")


# ----------------------------------------------------------------------------- the files

def read_mask(path, sample, image_size, threshold):
    """One mask file decoded once -> (lesion bool (H, W) as load_masks reads it, its values, a noise
    finding or None). ValueError naming the file: another size than its image, undecodable."""
    try:
        with Image.open(path) as im:
            hist = _value_histogram(im)  # palette and RGB masks by their brightest channel
            found = noise_finding(im, path, sample.dataset, threshold, hist)
            if hist is None:  # 1-bit (MES: 0/255 as PIL reads it), 16-bit or float masks
                hist = np.asarray(im.histogram()) if im.mode == "1" else None
            values = (np.flatnonzero(hist) if hist is not None
                      else np.unique(np.asarray(im)))
            im = _upright_mask(im, path, sample, image_size)
            im.load()
            return _decode_mask(im, threshold), set(values.tolist()), found
    except ValueError:  # ours, already one line naming the file
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from None


def sample_facts(sample, threshold):
    """One image and its masks, each decoded once -> {"pixels": image pixels, "lesions": {lesion:
    (lesion pixels, mask values)}, "errors": [...], "warnings": [...]}."""
    facts = {"pixels": 0, "lesions": {}, "errors": [], "warnings": []}
    try:
        size = load_image(sample.image).size  # (W, H) as shown (EXIF orientation)
    except ValueError as e:
        facts["errors"].append(str(e))
        return facts
    facts["pixels"] = size[0] * size[1]
    for lesion in annotated(sample):
        union, values = np.zeros(size[::-1], bool), set()  # (H, W)
        for path in sample.masks[lesion]:  # several files (RET --ret-he all): OR-ed
            try:
                mask, found_values, found = read_mask(path, sample, size, threshold)
            except ValueError as e:
                facts["errors"].append(str(e))
                continue
            union |= mask
            values |= found_values
            if found:
                facts[found[0] + "s"].append(found[1])
        facts["lesions"][lesion] = (int(union.sum()), values)
    return facts


def read_files(check, workers=None):
    """Decode every image and mask of check.samples (threads: PIL decodes without the GIL): the
    errors and warnings of each file and each lesion's counts, into check."""
    stats = {les: {"annotated": 0, "present": 0, "pixels": 0, "lesion": 0, "values": set(),
                   "files": 0} for les in LESIONS}
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        # NOTE: disable=None: a bar with an ETA on a terminal only (not in logs or tests)
        facts = list(tqdm(pool.map(lambda s: sample_facts(s, check.threshold), check.samples),
                          total=len(check.samples), desc=f"{check.dataset} check", unit="image",
                          disable=None))
    for sample, f in zip(check.samples, facts):
        check.errors += f["errors"]
        check.warnings += f["warnings"]
        for lesion, (pixels, values) in f["lesions"].items():
            s = stats[lesion]
            s["annotated"] += 1
            s["present"] += pixels > 0
            s["pixels"] += f["pixels"]
            s["lesion"] += pixels
            s["values"] |= values
            s["files"] += len(sample.masks[lesion])
    check.lesions = {les: s for les, s in stats.items() if s["annotated"]}
    check.warnings += empty_lesions(check)


def empty_lesions(check):
    """A warning per lesion annotated in the dataset that no mask marks in any image: an empty mask
    folder, masks of 0/1 under a threshold of 127, a folder given for the wrong lesion?"""
    return [empty_lesion(check.dataset, lesion, s["annotated"], check.threshold,
                         max(s["values"], default=0))
            for lesion, s in check.lesions.items() if not s["lesion"]]


def empty_lesion(dataset_id, lesion, images, threshold, top=0):
    """The warning of a lesion annotated in `images` images that no mask marks in any; top: the
    highest mask value seen (0: unknown). data.prepare prints it too."""
    why = (f"its masks' values reach {top}: is the mask threshold {threshold} too high?"
           if 0 < top <= threshold else f"no mask value above the threshold {threshold}")
    fix = (" If it is not annotated, leave it out of dataset.json's \"lesions\"."
           if is_own(dataset_id) else "")
    return (f"{dataset_id}: {lesion} is annotated in {images} image(s) but no pixel of any is "
            f"lesion ({why}).{fix}")


# ----------------------------------------------------------------------------- the report

def check_dataset(dataset_id, data_root, roots=None, thresholds=None, split_files=None,
                  ret_he="retinal", split_seed=0, split_protocol="paper", workers=None):
    """Every check of one dataset -> Check (its errors, warnings, per-lesion counts, split)."""
    check = Check(dataset_id)
    threshold, split_file = (thresholds or {}).get(dataset_id), (split_files or {}).get(dataset_id)
    try:
        check.root = dataset_root(dataset_id, data_root, roots)
        if is_own(dataset_id):  # its dataset.json's threshold and splits.json, unless flags say
            threshold, split_file = generic.own_options(check.root, threshold, split_file)
            check.name = str(generic.read_dataset_json(check.root).get("name") or "")
    except (ValueError, OSError) as e:  # not found, dataset.json wrong: nothing else to check
        check.errors.append(utils.message(e))
        check.read = False
        return check
    check.threshold, check.split_file = int(threshold or 0), split_file and str(split_file)
    check.protocol = split_protocol
    check.samples, check.splits, errors = structure(dataset_id, check.root, ret_he, split_file,
                                                    split_seed, split_protocol)
    check.errors += [utils.message(e) for e in errors]
    read_files(check, workers)
    return check


def _values(values):
    """A lesion's mask values in a few characters: '0/255', or '143 values 0..255'."""
    values = sorted(values)
    if len(values) <= 3:
        return "/".join(map(str, values)) or "-"
    return f"{len(values)} values {values[0]}..{values[-1]}"


def report(check):
    """The lines data.check prints for one dataset: a table of the lesions and the split (none for
    a folder or dataset.json that could not be read), the findings."""
    lines = _table(check) if check.read else [f"{check.dataset}: not read"]
    lines += [f"error: {e}" for e in check.errors] + [f"warning: {w}" for w in check.warnings]
    lines.append(f"{check.dataset}: {len(check.errors)} error(s), {len(check.warnings)} "
                 f"warning(s)")
    return "\n".join(lines)


def _table(check):
    """report's lines before the findings: the dataset, its lesions, its split."""
    name = f" ({check.name})" if check.name else ""
    lines = [f"{check.dataset}{name}: {check.root or 'not found'}: {len(check.samples)} images",
             f"  {'lesion':<7}{'annotated':>10}{'with it':>9}{'pixels':>9}  mask values"]
    for lesion in LESIONS:
        s = check.lesions.get(lesion)
        if s is None:
            lines.append(f"  {lesion:<7}{'-':>10}{'':>9}{'':>9}  not annotated")
            continue
        share = f"{100 * s['lesion'] / s['pixels']:.2f}%" if s["pixels"] else "-"
        lines.append(f"  {lesion:<7}{s['annotated']:>10}{s['present']:>9}{share:>9}  "
                     f"{_values(s['values'])}")
    lines.append("  (images annotating the lesion, images containing it, its share of their "
                 "pixels, mask values)")
    if check.splits:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in check.splits.items())
        lines.append(f"  splits: {sizes} ({check.split_file or check.protocol + ' protocol'})")
    return lines


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    args = build_parser().parse_args(argv)
    options = data_options(args)
    ids = args.dataset or sorted(options["roots"], key=dataset_order)
    if not ids:
        raise ValueError("nothing to check: give --root ID=DIR (your own dataset) or --dataset IDS")
    failed = []
    for dataset_id in ids:
        check = check_dataset(dataset_id, args.data_root, workers=args.workers, **options)
        print(report(check), flush=True)
        if check.errors:
            failed.append(f"{len(check.errors)} in {dataset_id}")
    if failed:
        raise ValueError(f"data.check found errors ({', '.join(failed)}): see above")


if __name__ == "__main__":
    utils.run(main)
