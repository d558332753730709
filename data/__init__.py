"""The five public fundus datasets, read as distributed, prepared once into a fast patch cache.

    python -m data.synthetic --out demo/data        # the embedded default (all five layouts)
    python -m data.prepare --dataset IDR --data-root demo/data --cache cache --resolution 1536

ids.py         dataset IDs, lesion names and colours, folder names, labelling styles (stdlib only)
datasets.py    one adapter per dataset: the distributed files -> samples; decoding
generic.py     your own annotated photographs: the generic layout (dataset.json, images/, masks/)
check.py       every problem of a dataset at once, a report per lesion (python -m data.check)
splits.py      train / val / test under the paper's protocol or the authors' code
preprocess.py  FOV crop, resize, pad (paper section 2.2)
prepare.py     the prepared cache, written once (python -m data.prepare)
cache.py       the prepared cache, read back (PreparedDataset)
patches.py     random augmented training patches from prepared caches
flags.py       the command-line data flags shared by every script
synthetic.py   synthetic datasets in the five layouts (the demo)

`data.PreparedDataset`, `from data import prepare_cache` and the other names below load their
module on first use (PEP 562): `from data.ids import LESIONS` or `data.flags` cost no numpy or torch
import.
"""
import importlib

# NOTE: lazy (PEP 562): importing `data` must not load numpy or torch, since data.ids and data.flags
# are imported before a script's --help is answered
_HOME = {  # name -> the module of this package that defines it
    **dict.fromkeys(("LESIONS", "DATASET_IDS", "FOLDERS", "parse_dataset_ids", "parse_lesions",
                     "combo_name"), "ids"),
    "PreparedDataset": "cache",
    **dict.fromkeys(("DATA_FLAGS", "add_data_args", "data_options", "data_settings"), "flags"),
    "PatchDataset": "patches",
    **dict.fromkeys(("preprocess_image", "restore_crop", "restore_geometry"), "preprocess"),
    "prepare_cache": "prepare",
}
__all__ = list(_HOME)


def __getattr__(name):
    """`data.X` for a name of _HOME: imports its module on first use (module-level __getattr__)."""
    if name in _HOME:
        return getattr(importlib.import_module(f"data.{_HOME[name]}"), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
