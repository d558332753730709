r"""What every file names: dataset IDs, lesion names and colours, folder names, labelling styles.

    python -c "from data.ids import parse_dataset_ids, combo_name; \
        print(combo_name(parse_dataset_ids('mes,idr')))"
    python3 data/ids.py combos              # the 31 training combinations (the Makefile's list)
    python3 data/ids.py combos IDR,ABC      # IDR, ABC, IDR+ABC: with a dataset of one's own
    python3 data/ids.py canonical MES+idr   # -> IDR+MES

Standard library only, and runnable as a plain script, so the Makefile can ask it before .venv
exists.
"""
import itertools
import json
import re
import sys
from pathlib import Path

LESIONS = ("EX", "HE", "MA", "CWS")  # channel order everywhere: files, tensors, tables
LESION_NAMES = {"EX": "hard exudates", "HE": "haemorrhages", "MA": "microaneurysms",
                "CWS": "cotton-wool spots"}
# One fixed colour per lesion in every picture (overlays, curves, figures):
# EX yellow, HE red, MA green, CWS cyan
LESION_COLOURS = {"EX": (255, 230, 0), "HE": (230, 20, 20), "MA": (40, 230, 40),
                  "CWS": (0, 200, 255)}
DATASET_IDS = ("IDR", "DDR", "FGA", "RET", "MES")  # canonical order: run names follow it
# Folder name of each dataset under --data-root, as distributed (docs/PROTOCOL.md, "datasets").
FOLDERS = {"IDR": "IDRiD", "DDR": "DDR-dataset", "FGA": "Seg-set",
           "RET": "retinal-lesions-v20191227", "MES": "MAPLES-DR"}


# The datasets' labelling styles as the paper found them (section 2.1, Figure 2): IDRiD, DDR and
# MAPLES-DR outline lesions finely, Retinal-Lesions coarsely (merged, dilated blobs), FGADR mixes
# both. A characterize.json (characterize.py) replaces this table with measured styles.
STYLES = ("fine", "mixed", "coarse")  # token order of train.py --style-condition style
STYLE_TABLE = {"IDR": "fine", "DDR": "fine", "FGA": "mixed", "RET": "coarse", "MES": "fine"}


def _parse_names(text, known, what, item):
    """'b,a' -> the names of `known` it lists, in `known`'s order, no duplicates.
    ValueError naming `what` (an empty list) or `item` (an unknown name)."""
    # "+" is accepted as a separator so that run names (IDR+MES) parse back
    names = [t.strip().upper() for t in str(text).replace("+", ",").split(",") if t.strip()]
    if not names:
        raise ValueError(f"empty {what} list {text!r} (choose from {', '.join(known)})")
    for n in names:
        if n not in known:
            raise ValueError(f"unknown {item} {n!r} (choose from {', '.join(known)})")
    return [n for n in known if n in names]


# The ID of a dataset of one's own (data/generic.py): 2-8 capital letters or digits, given a folder
# with --root ID=DIR or the env var ID_ROOT.
OWN_ID = re.compile(r"[A-Z0-9]{2,8}")


def is_own(dataset_id):
    """Is dataset_id one of the user's own datasets (the generic layout), not one of the five?"""
    return dataset_id not in DATASET_IDS


def dataset_order(dataset_id):
    """Sort key of dataset IDs: the five in their canonical order, then one's own, by name."""
    if dataset_id in DATASET_IDS:
        return (0, DATASET_IDS.index(dataset_id), "")
    return (1, 0, dataset_id)


def parse_dataset_ids(text, own=True):
    """'MES,idr' -> ['IDR', 'MES'] (canonical order, no duplicates); 'all' -> the five. own: IDs of
    one's own datasets (ABC, CLINIC2: data/generic.py) are taken too, after the five."""
    if str(text).strip().lower() == "all":
        return list(DATASET_IDS)
    names = [t.strip().upper() for t in str(text).replace("+", ",").split(",") if t.strip()]
    if not names:
        raise ValueError(f"empty dataset list {text!r} (choose from {', '.join(DATASET_IDS)})")
    for n in names:
        if n not in DATASET_IDS and not (own and OWN_ID.fullmatch(n)):
            yours = ", or an ID of your own dataset (2-8 capital letters or digits, its folder " \
                "given with --root ID=DIR)" if own else ""
            raise ValueError(f"unknown dataset ID {n!r} (choose from "
                             f"{', '.join(DATASET_IDS)}{yours})")
    return sorted(set(names), key=dataset_order)


def parse_lesions(text):
    """'he,ex' -> ('EX', 'HE') (LESIONS order, no duplicates): the lesions a run is trained and
    scored on."""
    return tuple(_parse_names(text, LESIONS, "lesion", "lesion"))


def combo_name(ids):
    """Canonical run name of a training combination: ['MES', 'IDR'] -> 'IDR+MES'."""
    return "+".join(parse_dataset_ids(",".join(ids)))


def all_combos(ids=DATASET_IDS):
    """The 2^D - 1 non-empty training combinations of the datasets `ids` (the five: 31), by size
    then canonical order: IDR, DDR, ..., IDR+DDR, ..."""
    ids = parse_dataset_ids(",".join(ids) if not isinstance(ids, str) else ids)
    return ["+".join(c) for r in range(1, len(ids) + 1) for c in itertools.combinations(ids, r)]


def read_styles(path):
    """characterize.json (characterize.py) ->
    {dataset ID: 'fine' | 'mixed' | 'coarse' | 'undetermined'}."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--characterize file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--characterize {path} is not readable JSON "
                         f"({type(e).__name__})") from None
    datasets = report.get("datasets") if isinstance(report, dict) else None
    if not isinstance(datasets, dict):
        raise ValueError(f"--characterize {path} is not a characterize.json (no 'datasets' object)")
    return {ds: v.get("style") for ds, v in datasets.items() if isinstance(v, dict)}


def dataset_styles(train_ids, characterize=None, own=None):
    """{dataset ID: style} of the training sets, from characterize.json, else STYLE_TABLE and `own`
    ({ID: the "style" of one's own dataset.json}, data.datasets.own_styles); one error line when a
    training set has no usable style there."""
    styles = read_styles(characterize) if characterize else {**STYLE_TABLE, **(own or {})}
    where = f"--characterize {characterize}" if characterize else "data.ids.STYLE_TABLE"
    for ds in train_ids:
        if not characterize and is_own(ds) and ds not in styles:
            raise ValueError(f"training set {ds} has no labelling style: give its dataset.json a "
                             f"\"style\" (fine, mixed or coarse) or pass --characterize FILE "
                             f"(characterize.py)")
        if styles.get(ds) not in STYLES:
            raise ValueError(f"{where} gives training set {ds} the style {styles.get(ds)!r}, "
                             f"not one of {', '.join(STYLES)} (characterize.py needs two or more "
                             f"datasets, one of them fine)")
    return {ds: styles[ds] for ds in train_ids}


def style_tokens(mode, train_ids, characterize=None, own=None):
    """A run's style conditioning (train.py --style-condition) ->
    (tokens, token_styles, {dataset: token}).

    style: one token per labelling style present in training (STYLES order); dataset: one per
    training set. token_styles[i] is token i's labelling style (the token itself under `style`).
    off: empty.
    """
    if mode not in ("off", "style", "dataset"):
        raise ValueError(f"--style-condition must be off, style or dataset, got {mode!r}")
    if mode == "off":
        return (), (), {}
    styles = dataset_styles(train_ids, characterize, own)
    if mode == "style":
        tokens = tuple(s for s in STYLES if s in styles.values())
        return tokens, tokens, {ds: tokens.index(styles[ds]) for ds in train_ids}
    tokens = tuple(train_ids)
    return tokens, tuple(styles[ds] for ds in tokens), {ds: i for i, ds in enumerate(tokens)}


if __name__ == "__main__":
    # The Makefile's two questions, answered without .venv (see the docstring)
    try:
        if sys.argv[1:2] == ["combos"] and len(sys.argv) in (2, 3):  # combos [IDR,DDR,ABC]
            print(" ".join(all_combos(sys.argv[2] if len(sys.argv) == 3 else DATASET_IDS)))
        elif sys.argv[1:2] == ["canonical"] and len(sys.argv) == 3:
            print(combo_name([sys.argv[2]]))
        else:
            sys.exit("usage: python3 data/ids.py combos [IDS] | canonical IDS")
    except ValueError as e:
        sys.exit(f"error: {e}")
