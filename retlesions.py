"""This project's Python API under a name no other package uses: segment photographs from any
folder or notebook.

    import sys; sys.path.append("/path/to/retlesions")  # the repository's folder: the one step
    import retlesions
    models = retlesions.load_ensemble(["runs/IDR+MES/s0/best.pt"])        # once: (models, headers)
    probs = retlesions.segment(retlesions.read_photo("eye.jpg"), models)  # (4, H, W): EX HE MA CWS

segment, load_ensemble, read_photo and predict_images are predict.py's, loaded on first use:
`import retlesions` alone imports no torch. The modules behind them keep the project's flat names
(utils, data, model, ...), so they are imported with the repository put first on sys.path for that
moment only: an installed package of such a name (Hugging Face's `evaluate`, PyPI's `utils`) or a
file beside your script is not taken for ours, and your own `import evaluate` afterwards still
gets yours. A module of another origin already imported under one of these names stops it with one
ImportError line (import retlesions first, or rename yours); after it, those names are ours in this
process. docs/EVALUATION.md, "segment() from anywhere".
"""
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The project modules that segment() and predict_images() import (a test keeps the list complete)
API_MODULES = ("authors", "average", "characterize", "data", "kernels", "maps", "model", "predict",
               "protocol", "utils", "weights")
PREDICT_NAMES = ("segment", "load_ensemble", "read_photo", "predict_images")


def check_modules(names=API_MODULES):
    """One ImportError line when a module of one of these names is already imported from
    elsewhere: our code would get it instead of its own."""
    for name in names:
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None)
        if module is not None and (where is None or HERE not in Path(where).resolve().parents):
            raise ImportError(f"retlesions: a module named {name!r} is already imported from "
                              f"{where or 'elsewhere'}, and this project's {name} can't be "
                              f"imported beside it; import retlesions before it (first in the "
                              f"notebook), or rename yours")


def import_own(*names):
    """This project's modules `names`, imported with the repository first on sys.path for the
    moment (sys.path is then as it was) -> the last one."""
    check_modules()
    saved = list(sys.path)
    sys.path.insert(0, str(HERE))
    try:
        return [importlib.import_module(name) for name in names][-1]
    finally:
        sys.path[:] = saved


check_modules()


def __getattr__(name):
    """retlesions.segment and the others of PREDICT_NAMES: predict.py's, imported on first use
    (PEP 562)."""
    if name in PREDICT_NAMES:
        # NOTE: predict_images imports characterize inside (its quality flags): imported here too
        value = getattr(import_own(*(("characterize",) if name == "predict_images" else ()),
                                   "predict"), name)
        globals()[name] = value  # found as an attribute from now on
        return value
    raise AttributeError(f"module 'retlesions' has no attribute {name!r}")
