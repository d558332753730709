"""The data flags of data.prepare, train.py, evaluate.py, average.py, tune.py, characterize.py.

    python -m data.prepare --help            # the "data" group is these flags
    python train.py --train IDR --split-protocol authors --splits MES=official

add_data_args adds them to a parser, data_options turns the parsed values into prepare_cache's
keyword arguments, data_settings merges them with the values a training run recorded in its
checkpoint. add_dataset_list is the one syntax of every dataset-list flag (--train, --test,
--datasets, --dataset). Each flag in full: docs/DATA.md, "The data flags".
"""
import argparse
import os
from pathlib import Path

from data.ids import DATASET_IDS, is_own, parse_dataset_ids

SPLIT_PROTOCOLS = ("paper", "authors")  # docs/PROTOCOL.md, "splits"


def add_data_args(parser):
    """The data flags shared by data.prepare, train.py, evaluate.py and characterize.py."""
    g = parser.add_argument_group("data")
    # The help texts are short; docs/DATA.md, "The data flags", has each flag in full
    g.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data_raw"),
                   help="folder holding the datasets under their distributed names, also one level "
                        "down (docs/DATA.md) (default: env DATA_ROOT or %(default)s)")
    g.add_argument("--cache", default="cache",
                   help="prepared-data cache folder (default: %(default)s)")
    g.add_argument("--root", action="append", default=[], metavar="ID=DIR",
                   help="folder of one dataset, overrides --data-root and env <ID>_ROOT; "
                        "repeatable (default: none)")
    g.add_argument("--mask-threshold", action="append", default=[], metavar="ID=T",
                   help="lesion where mask value > T for that dataset (FGA=127, RET=127: "
                        "docs/DATA.md); repeatable (default: 0 for all)")
    g.add_argument("--splits", action="append", default=[], metavar="ID=FILE",
                   help="split of one dataset: a JSON file {train,val,test: [ids]}, 'official' or "
                        "'seeded'; repeatable (default: the --split-protocol's)")
    g.add_argument("--split-protocol", choices=SPLIT_PROTOCOLS, default="paper",
                   help="paper: section 2.4; authors: the authors' public code (docs/PROTOCOL.md, "
                        "\"Splits\") (default: %(default)s)")
    g.add_argument("--ret-he", choices=("retinal", "all"), default="retinal",
                   help="Retinal-Lesions HE: retinal_hemorrhage only, or also preretinal + "
                        "vitreous (default: %(default)s)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the paper protocol's seeded splits; the authors protocol always "
                        "uses 42 (default: %(default)s)")
    return parser


class DatasetList(argparse.Action):
    """Dataset IDs as one list, however they are typed: `--test IDR,DDR MES`, `--test IDR+DDR+mes`
    and `--test all` parse to the canonical list (data.ids.parse_dataset_ids: canonical order, no
    duplicates). Given twice, the last one wins, as for any flag: `make ... EVAL_FLAGS="--test MES"`
    overrides the default.

    NOTE: an unknown ID raises ValueError naming the flag (not argparse's usage + exit 2), so every
    script's `except ValueError` prints it as one line, like its other user errors.
    """

    def __init__(self, *args, folders=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.folders = folders  # the IDs are read from disk: one's own needs its folder

    def after_parse(self, namespace):
        """An ID of one's own (data/generic.py) read from disk needs its folder: --root ID=DIR or
        env ID_ROOT. Without one it is most likely a typo: the usual unknown-ID line, here."""
        if self.folders:
            roots = parse_pairs(getattr(namespace, "root", None) or [], "--root")
            check_own_folders(self.option_strings[0], getattr(namespace, self.dest, None), roots)

    def __call__(self, parser, namespace, values, option_string=None):
        words = [values] if isinstance(values, str) else list(values)  # nargs="+": a list
        for word in words:
            # `fig4.py --test IDR runs/X`: the list took the positional argument
            if "/" in word or os.sep in word:
                raise ValueError(f"{option_string}: {word!r} is not a dataset ID; a folder or "
                                 f"file goes before {option_string}, whose list takes every word "
                                 f"after it")
        text = ",".join(words)
        try:
            ids = parse_dataset_ids(text)
        except ValueError as e:
            raise ValueError(f"{option_string}: {e}") from None
        setattr(namespace, self.dest, ids)


def check_own_folders(flag, ids, roots):
    """Each ID of one's own among `ids` has its folder in `roots` ({ID: DIR}) or env ID_ROOT; else
    the usual unknown-ID line (most likely a typo)."""
    for d in ids or []:
        if is_own(d) and d not in roots and not os.environ.get(f"{d}_ROOT"):
            raise ValueError(f"{flag}: unknown dataset ID {d!r} (choose from "
                             f"{', '.join(DATASET_IDS)}, or give the folder of your own "
                             f"dataset with --root {d}=DIR or {d}_ROOT=DIR: docs/DATA.md)")


def add_dataset_list(parser, flag, what, default=None, required=False, folders=True):
    """Add a dataset-list flag (see DatasetList) whose help names its syntax; the parsed value is a
    list of IDs. folders=False: the IDs name results, not data to read (no --root needed)."""
    shown = "required" if required else f"default: {','.join(default) if default else 'none'}"
    parser.add_argument(flag, nargs="+", action=DatasetList, default=default, required=required,
                        metavar="IDS", folders=folders,
                        help=f"{what}: IDs of {', '.join(DATASET_IDS)} or of your own datasets "
                             f"(--root ID=DIR) in any order or case, separated by commas, + or "
                             f"spaces (IDR,DDR MES = IDR+DDR+MES), or 'all' ({shown})")


def parse_pairs(values, flag):
    """['idr=/x', 'FGA=3'] -> {'IDR': '/x', 'FGA': '3'}; ValueError naming the flag."""
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not val or not key.strip():
            raise ValueError(f"{flag} expects ID=VALUE, got {v!r}")
        if key.strip().lower() == "all":  # the five, in a dataset list: not one dataset's ID
            raise ValueError(f"{flag} {v}: 'all' stands for the five datasets; give one ID (yours: "
                             f"2-8 capital letters or digits other than ALL)")
        try:
            (key,) = parse_dataset_ids(key)
        except ValueError as e:
            raise ValueError(f"{flag} {v}: {e}") from None
        if out.get(key, val) != val:  # which one was meant?
            raise ValueError(f"{flag} {key}: given twice, {out[key]} and {val}: keep one")
        out[key] = val
    return out


def data_options(args):
    """Keyword arguments of prepare_cache from the add_data_args flags."""
    thresholds = {}
    for k, v in parse_pairs(args.mask_threshold, "--mask-threshold").items():
        if not v.isdigit() or int(v) > 254:  # > 255 would drop every lesion
            raise ValueError(f"--mask-threshold {k}={v}: the threshold must be an integer "
                             "in 0..254")
        thresholds[k] = int(v)
    # NOTE: namespaces rebuilt from runs recorded before --split-protocol existed lack the attribute
    protocol = getattr(args, "split_protocol", None) or "paper"
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"--split-protocol {protocol}: choose from {', '.join(SPLIT_PROTOCOLS)}")
    return {"roots": parse_pairs(args.root, "--root"), "thresholds": thresholds,
            "split_files": parse_pairs(args.splits, "--splits"), "ret_he": args.ret_he,
            "split_seed": args.split_seed, "split_protocol": protocol}


# The flags above that decide which images are read and how they are split.
DATA_FLAGS = ("data_root", "cache", "root", "mask_threshold", "splits", "split_protocol", "ret_he",
              "split_seed")


def data_settings(args, parser, recorded):
    """(data_root, cache, prepare_cache options): a data flag given on this command line wins, else
    the training run's recorded value (its checkpoint's "args"), else the default.

    NOTE: split flags decide which images are validation and test; reading a run's data with other
    split options would re-split the cache and could score on images the run trained on.
    """
    merged = argparse.Namespace(**vars(args))
    for key in DATA_FLAGS:
        # a flag left at its default counts as not given (argparse cannot tell them apart)
        if getattr(args, key) == parser.get_default(key) and recorded.get(key) is not None:
            # NOTE: a checkpoint received from elsewhere must not choose where this program writes:
            # its recorded --cache is used only where a prepared cache already is (this machine's
            # own run)
            if key == "cache" and not is_prepared_cache(recorded[key]):
                continue
            setattr(merged, key, recorded[key])
    return merged.data_root, merged.cache, data_options(merged)


def is_prepared_cache(folder):
    """Does `folder` hold a prepared cache (CACHE/<ID>/<resolution>/meta.json, data.prepare)?"""
    folder = Path(str(folder))
    return folder.is_dir() and any(folder.glob("*/*/meta.json"))
