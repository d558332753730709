"""This project's Python API under a name no other package uses: segment photographs from any
folder or notebook, with a checkpoint or with an exported ONNX model.

    import sys; sys.path.append("/path/to/retlesions")  # the repository's folder: the one step
    import retlesions
    models = retlesions.load_ensemble(["runs/IDR+MES/s0/best.pt"])        # once
    probs = retlesions.segment(retlesions.read_photo("eye.jpg"), models)  # (4, H, W): EX HE MA CWS

    import onnxruntime as ort   # interop.py onnx: no torch from here on
    session = ort.InferenceSession("model.onnx")
    x, geometry = retlesions.preprocess(retlesions.read_photo("eye.jpg"), session)
    probs = retlesions.to_photograph(session.run(None, {"image": x})[0], geometry)  # as segment's

segment, load_ensemble and predict_images are predict.py's, loaded on first use: `import
retlesions`, read_photo, read_metadata, preprocess and to_photograph import no torch (numpy, PIL,
scipy). The modules behind them keep the project's flat names
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

import numpy as np

HERE = Path(__file__).resolve().parent
# The project modules that segment() and predict_images() import (a test keeps the list complete)
API_MODULES = ("authors", "average", "characterize", "data", "kernels", "maps", "model", "predict",
               "protocol", "utils", "weights")
PREDICT_NAMES = ("segment", "load_ensemble", "predict_images")


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


# ---- an exported model (interop.py onnx), without torch ------------------------------------------
def read_photo(path):
    """A photograph as viewers show it (turned by its EXIF orientation tag) -> uint8 (H, W, 3) RGB
    (predict.read_photo, without torch)."""
    return np.asarray(import_own("data.datasets").load_image(path))


def read_metadata(source):
    """An ONNX file's metadata (interop.onnx_metadata) -> dict: resolution (int, None when not
    recorded), channel_order, value_range (low, high), mean and std (tuples; None for an ensemble
    of differently normalized members), lesions (the output's channels) and trained_lesions
    (tuples), and every entry as written under "raw". source: an onnxruntime InferenceSession, a
    path to the .onnx file (read with onnx), or the metadata dict itself."""
    if hasattr(source, "get_modelmeta"):  # an onnxruntime session
        raw = dict(source.get_modelmeta().custom_metadata_map)
    elif isinstance(source, dict):
        raw = dict(source.get("raw", source))
    else:
        import onnx  # only for a path: a session needs none

        raw = {p.key: p.value for p in onnx.load(str(source), load_external_data=False)
               .metadata_props}
    if "channel_order" not in raw:
        raise ValueError(f"{source}: no metadata of interop.py (export it again with "
                         f"`python interop.py onnx`)")

    def numbers(key):  # "0.5,0.5,0.5" -> (0.5, 0.5, 0.5); None for several members' (";")
        text = raw.get(key, "")
        return None if not text or ";" in text else tuple(float(v) for v in text.split(","))

    return {"resolution": int(raw["resolution"]) if raw.get("resolution") else None,
            "channel_order": raw["channel_order"], "value_range": numbers("value_range"),
            "mean": numbers("mean"), "std": numbers("std"),
            "lesions": tuple(raw.get("lesions", "").split(",")),
            "trained_lesions": tuple(raw.get("trained_lesions", "").split(",")), "raw": raw}


def preprocess(photo, model):
    """A photograph -> an exported model's input, as training prepared its images (data.preprocess:
    crop to the field of view, resize, pad; paper section 2.2): (x float32 (1, 3, R, R), RGB in
    [0, 1], geometry: the crop box, sizes and the FOV (R, R) bool, for to_photograph).

    photo: uint8 (H, W, 3) RGB (read_photo); model: the square size R, or what read_metadata takes
    (an onnxruntime session, the .onnx path, its metadata). ValueError for metadata asking for
    another channel order or value range than this function gives."""
    if isinstance(model, (int, np.integer)) and not isinstance(model, bool):
        resolution = int(model)
    else:
        meta = read_metadata(model)
        if meta["channel_order"] != "RGB" or meta["value_range"] != (0.0, 1.0):
            raise ValueError(f"the model's metadata asks for {meta['channel_order']} in "
                             f"{meta['value_range']}; preprocess gives RGB in [0, 1]")
        if meta["resolution"] is None:
            raise ValueError("the model's metadata records no resolution: pass preprocess(photo, "
                             "R) with the size it was trained at")
        resolution = meta["resolution"]
    square, fov, geometry = import_own("data.preprocess").preprocess_image(photo, resolution)
    x = square.transpose(2, 0, 1)[None].astype(np.float32) / 255  # (1, 3, R, R) in [0, 1]
    return np.ascontiguousarray(x), {**geometry, "fov": fov}


def _linear(n_in, n_out):
    """Source rows (i0, i1) and weights of a linear resize from n_in to n_out samples, pixel
    centres aligned (torch's interpolate, align_corners=False: what segment() uses)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _resize(a, height, width):
    """Bilinear resize of a float32 (h, w) map to (height, width), as torch's."""
    y0, y1, wy = _linear(a.shape[0], height)
    x0, x1, wx = _linear(a.shape[1], width)
    rows = a[y0] * (1 - wy)[:, None] + a[y1] * wy[:, None]  # (height, w)
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx  # (height, width)


def to_photograph(probs, geometry):
    """The model's output on preprocess's square -> the photograph's geometry, as segment()
    returns it: probs (4, R, R) or (1, 4, R, R) -> float32 (4, H, W), 0 outside the fundus (the
    FOV restored bilinearly and cut at 0.5, a smooth rim)."""
    probs = np.asarray(probs, np.float32)
    probs = probs[0] if probs.ndim == 4 else probs  # (4, R, R)
    fov = geometry["fov"]
    (w, h), (left, top) = geometry["size"], geometry["pad"]
    x0, y0, x1, y1 = geometry["box"]

    def restore(a):  # (R, R) -> the crop box's (y1 - y0, x1 - x0)
        return _resize(a[top:top + h, left:left + w], y1 - y0, x1 - x0)

    inside = restore(fov.astype(np.float32)) >= 0.5
    out = np.zeros((len(probs), geometry["height"], geometry["width"]), np.float32)
    for c, p in enumerate(probs):  # one lesion at a time; 0 outside the FOV before resizing
        out[c, y0:y1, x0:x1] = restore(np.where(fov, p, np.float32(0))) * inside
    return out
