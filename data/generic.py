"""Your own annotated photographs: one generic layout, read by every script under an ID you choose.

    python -m data.check --root ABC=path/to/clinic                 # check the folder first
    python train.py --train IDR,ABC --root ABC=path/to/clinic      # train on it beside IDRiD
    python evaluate.py --ckpt runs/IDR+ABC/s0/best.pt --test ABC --root ABC=path/to/clinic

The layout (docs/DATA.md, "Your own dataset"):

    DIR/
      dataset.json                 {"name": "My clinic",
                                    "lesions": {"EX": "masks/EX", "HE": "masks/HE"}}
      images/<stem>.<ext>          jpg jpeg png tif tiff bmp
      masks/<LESION>/<stem>.<ext>  png tif tiff bmp; a pixel > 0 is lesion
                                   (dataset.json "mask_threshold": T for > T)
      splits.json                  optional: {"train": [stems], "val": [stems], "test": [stems]};
                                   "val" optional

"lesions" maps each ANNOTATED lesion (EX, HE, MA, CWS) to its mask folder, relative to DIR. For an
annotated lesion a missing mask file means the lesion is absent from that image; a lesion not
listed is not annotated: left out of the loss and the scores of this dataset's images, never
trained as a negative. Optional keys: "style" (fine, mixed or coarse: style conditioning's token
when no characterization is given), "mask_threshold" and "licence". Without splits.json, the
paper's protocol splits it (a seeded 30 % test, then 85/15 train/validation); without "val", a
seeded 15 % of train is the validation split.
"""
import json
from pathlib import Path

from data.ids import DATASET_IDS, LESIONS, OWN_ID, STYLES

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
KEYS = ("name", "lesions", "style", "mask_threshold", "licence")


def check_id(dataset_id, where="--root"):
    """ValueError unless dataset_id may name a dataset of one's own (not one of the five)."""
    if not OWN_ID.fullmatch(dataset_id):
        raise ValueError(f"{where} {dataset_id}: a dataset ID is 2-8 capital letters or digits")
    if dataset_id in DATASET_IDS:
        raise ValueError(f"{where} {dataset_id}: the ID of a distributed dataset (IDR, DDR, FGA, "
                         f"RET, MES) names its own layout; choose another ID for a folder in the "
                         f"generic layout")
    return dataset_id


def read_dataset_json(root):
    """DIR/dataset.json as a dict, checked: every error is one line naming the file."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a dataset of one's own needs a dataset.json "
                                f"(docs/DATA.md, 'Your own dataset')")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} must be a JSON object, e.g. "
                         f"{{\"lesions\": {{\"HE\": \"masks/HE\"}}}}")
    unknown = sorted(set(info) - set(KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    lesions = info.get("lesions")
    if (not isinstance(lesions, dict) or not lesions
            or not all(isinstance(v, str) for v in lesions.values())):
        raise ValueError(f"{path}: \"lesions\" must map each annotated lesion to its mask "
                         f"folder, e.g. {{\"HE\": \"masks/HE\"}}")
    bad = [k for k in lesions if k not in LESIONS]
    if bad:
        raise ValueError(f"{path}: lesion {bad[0]!r} is not one of {', '.join(LESIONS)}")
    if "style" in info and info["style"] not in STYLES:
        raise ValueError(f"{path}: \"style\" must be one of {', '.join(STYLES)}, "
                         f"got {info['style']!r}")
    threshold = info.get("mask_threshold", 0)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= 254:
        raise ValueError(f"{path}: \"mask_threshold\" must be an integer in 0..254, "
                         f"got {threshold!r}")
    return info


def read_splits_json(root):
    """DIR/splits.json's path when there is one (data.splits reads and checks it), else None."""
    path = Path(root) / "splits.json"
    return path if path.is_file() else None


def generic_samples(root, dataset_id):
    """The samples of a dataset in the generic layout: one per image of DIR/images, masks of its
    annotated lesions (a missing mask file: the lesion is absent there; a lesion not annotated:
    no key at all). One-line errors: a mask folder missing, a mask without an image."""
    from data.datasets import Sample, _index  # NOTE: here: data.datasets imports this module

    root = Path(root)
    info = read_dataset_json(root)
    images = _index(root / "images")
    if not images:
        raise ValueError(f"{dataset_id}: no images in {root / 'images'} (jpg jpeg png tif tiff "
                         f"bmp; docs/DATA.md, 'Your own dataset')")
    masks = {}
    for lesion in LESIONS:
        if lesion not in info["lesions"]:
            continue  # not annotated in this dataset: left out of the loss and the scores
        folder = root / info["lesions"][lesion]
        if not folder.is_dir():
            raise FileNotFoundError(f"{root / 'dataset.json'}: the mask folder of {lesion}, "
                                    f"{folder}, is missing")
        masks[lesion] = _index(folder, MASK_SUFFIXES)
        orphans = sorted(set(masks[lesion]) - set(images))
        if orphans:
            raise ValueError(f"{dataset_id}: mask {masks[lesion][orphans[0]]} has no image "
                             f"{root / 'images' / orphans[0]}.* ({len(orphans)} such masks)")
    return [Sample(stem, path, {les: ((m[stem],) if stem in m else ()) for les, m in masks.items()})
            for stem, path in images.items()]
