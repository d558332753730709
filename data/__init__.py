"""The five public fundus datasets, read as distributed, prepared once into a fast patch cache.

    python -m data.synthetic --out demo/data                  # the embedded default (all five layouts)
    python -m data.prepare --dataset IDR --data-root demo/data --out cache --resolution 1536
"""
LESIONS = ("EX", "HE", "MA", "CWS")  # channel order everywhere: files, tensors, tables
DATASET_IDS = ("IDR", "DDR", "FGA", "RET", "MES")  # canonical order: run names follow it


def parse_dataset_ids(text):
    """'MES,idr' -> ['IDR', 'MES'] (canonical order, no duplicates)."""
    ids = [t.strip().upper() for t in str(text).replace("+", ",").split(",") if t.strip()]
    if not ids:
        raise ValueError(f"empty dataset list {text!r} (choose from {', '.join(DATASET_IDS)})")
    for i in ids:
        if i not in DATASET_IDS:
            raise ValueError(f"unknown dataset ID {i!r} (choose from {', '.join(DATASET_IDS)})")
    return [i for i in DATASET_IDS if i in ids]


def combo_name(ids):
    """Canonical run name of a training combination: ['MES', 'IDR'] -> 'IDR+MES'."""
    return "+".join(parse_dataset_ids(",".join(ids)))



# The public API, imported on first use (PEP 562): `from data import LESIONS` stays light (no torch), and
# `python -m data.prepare` does not import its own module twice.
_API = {"prepare_cache": "data.prepare", "PreparedDataset": "data.prepare", "add_data_args": "data.prepare",
        "data_options": "data.prepare", "data_settings": "data.prepare", "PatchDataset": "data.patches", "preprocess_image": "data.preprocess",
        "restore_geometry": "data.preprocess"}
__all__ = ["LESIONS", "DATASET_IDS", "parse_dataset_ids", "combo_name", *_API]


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
