"""The five public fundus datasets, read as distributed, prepared once into a fast patch cache.

    python -m data.synthetic --out demo/data                  # the embedded default (all five layouts)
    python -m data.prepare --dataset IDR --data-root demo/data --cache cache --resolution 1536

ids.py      dataset IDs, lesion names, distributed folder names
datasets.py one adapter per dataset: the distributed files -> samples; decoding
splits.py   train / val / test under the paper's protocol or the authors' code
preprocess.py  FOV crop, resize, pad (paper section 2.2)
prepare.py  the prepared cache, written once (python -m data.prepare)
cache.py    the prepared cache, read back (PreparedDataset)
patches.py  random augmented training patches from prepared caches
flags.py    the command-line data flags shared by every script
synthetic.py   synthetic datasets in the five layouts (the demo)
"""
import sys

import cli

# `python -m data.prepare` / `python -m data.synthetic` import this package (numpy, torch: seconds)
# before the module runs; Python sets sys.argv[0] to "-m" meanwhile. A Ctrl-C during these imports
# ends in one line.
cli.early_ctrl_c(sys.argv[:1] == ["-m"])

import warnings

from data.ids import DATASET_IDS, FOLDERS, LESIONS, combo_name, parse_dataset_ids, parse_lesions
from data.cache import PreparedDataset
from data.flags import DATA_FLAGS, add_data_args, data_options, data_settings
from data.patches import PatchDataset
from data.preprocess import preprocess_image, restore_crop, restore_geometry

# NOTE: `python -m data.prepare` imports this package, hence data.prepare, before running prepare.py as
# __main__; runpy then warns that the module is already loaded. Running it twice is harmless here (it holds
# no state), so the warning would only be noise on the command line.
warnings.filterwarnings("ignore", message="'data.prepare' found in sys.modules", category=RuntimeWarning)
from data.prepare import prepare_cache  # noqa: E402

__all__ = ["LESIONS", "DATASET_IDS", "FOLDERS", "parse_dataset_ids", "parse_lesions", "combo_name", "PreparedDataset",
           "DATA_FLAGS", "add_data_args", "data_options", "data_settings", "PatchDataset", "preprocess_image",
           "restore_geometry", "restore_crop", "prepare_cache"]
