"""Dataset IDs, lesion names and the datasets' distributed folder names: the names every other file uses.

    python -c "from data.ids import parse_dataset_ids, combo_name; print(combo_name(parse_dataset_ids('mes,idr')))"
    python3 data/ids.py combos              # the 31 training combinations, canonical names (the Makefile's list)
    python3 data/ids.py canonical MES+idr   # -> IDR+MES

Standard library only, and runnable as a plain script, so the Makefile can ask it before .venv exists.
"""
import itertools
import sys

LESIONS = ("EX", "HE", "MA", "CWS")  # channel order everywhere: files, tensors, tables
DATASET_IDS = ("IDR", "DDR", "FGA", "RET", "MES")  # canonical order: run names follow it
# Folder name of each dataset under --data-root, as distributed (docs/PROTOCOL.md, "datasets").
FOLDERS = {"IDR": "IDRiD", "DDR": "DDR-dataset", "FGA": "Seg-set", "RET": "retinal-lesions-v20191227",
           "MES": "MAPLES-DR"}


def _parse_names(text, known, what, item):
    """'b,a' -> the names of `known` it lists, in `known`'s order, no duplicates; ValueError naming what / item."""
    names = [t.strip().upper() for t in str(text).replace("+", ",").split(",") if t.strip()]
    if not names:
        raise ValueError(f"empty {what} list {text!r} (choose from {', '.join(known)})")
    for n in names:
        if n not in known:
            raise ValueError(f"unknown {item} {n!r} (choose from {', '.join(known)})")
    return [n for n in known if n in names]


def parse_dataset_ids(text):
    """'MES,idr' -> ['IDR', 'MES'] (canonical order, no duplicates)."""
    return _parse_names(text, DATASET_IDS, "dataset", "dataset ID")


def parse_lesions(text):
    """'he,ex' -> ('EX', 'HE') (LESIONS order, no duplicates): the lesions a run is trained and scored on."""
    return tuple(_parse_names(text, LESIONS, "lesion", "lesion"))


def combo_name(ids):
    """Canonical run name of a training combination: ['MES', 'IDR'] -> 'IDR+MES'."""
    return "+".join(parse_dataset_ids(",".join(ids)))


def all_combos():
    """The 31 non-empty training combinations, by size then canonical order: IDR, DDR, ..., IDR+DDR, ..."""
    return ["+".join(c) for r in range(1, len(DATASET_IDS) + 1) for c in itertools.combinations(DATASET_IDS, r)]


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["combos"] and len(sys.argv) == 2:
            print(" ".join(all_combos()))
        elif sys.argv[1:2] == ["canonical"] and len(sys.argv) == 3:
            print(combo_name([sys.argv[2]]))
        else:
            sys.exit("usage: python3 data/ids.py combos | canonical IDS")
    except ValueError as e:
        sys.exit(f"error: {e}")
