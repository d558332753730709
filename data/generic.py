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


def own_options(root, threshold=None, split_file=None):
    """(mask threshold, split file) of a dataset of one's own: the flags' (--mask-threshold ID=T,
    --splits ID=FILE) where given, else its dataset.json's "mask_threshold" (0 when absent) and its
    splits.json (None when absent: the protocol's split)."""
    if threshold is None:
        threshold = read_dataset_json(root).get("mask_threshold", 0)
    return threshold, split_file or read_splits_json(root)


def scan(root, dataset_id):
    """(samples, errors) of a dataset in the generic layout: one sample per image of DIR/images with
    the masks of its annotated lesions (a missing mask file: the lesion is absent there; a lesion
    not annotated: no key at all), and every problem of the layout found on the way, each an
    exception with a one-line message: two files of one stem, a mask folder missing, a mask
    without an image, a JPEG mask. A wrong dataset.json is raised at once (nothing else can be
    read). data.check reports every error; generic_samples raises the first."""
    from data.datasets import Sample, _index  # NOTE: here: data.datasets imports this module

    root = Path(root)
    info = read_dataset_json(root)
    errors = []
    images = _index(root / "images", clashes=errors)
    if not images:
        errors.append(ValueError(f"{dataset_id}: no images in {root / 'images'} (jpg jpeg png tif "
                                 f"tiff bmp; docs/DATA.md, 'Your own dataset')"))
    masks = {}
    for lesion in LESIONS:
        if lesion not in info["lesions"]:
            continue  # not annotated in this dataset: left out of the loss and the scores
        folder = root / info["lesions"][lesion]
        if not folder.is_dir():
            errors.append(FileNotFoundError(f"{root / 'dataset.json'}: the mask folder of "
                                            f"{lesion}, {folder}, is missing"))
            continue
        masks[lesion] = _index(folder, MASK_SUFFIXES, clashes=errors)
        errors += _jpeg_masks(folder)
        errors += [_orphan(masks[lesion][stem], stem, root, images)
                   for stem in sorted(set(masks[lesion]) - set(images))]
    samples = [Sample(stem, path, {les: ((m[stem],) if stem in m else ())
                                   for les, m in masks.items()})
               for stem, path in images.items()]
    return samples, errors


def _jpeg_masks(folder):
    """[ValueError] when a mask folder holds JPEG files: they would not be read (a mask is png tif
    tiff or bmp), and JPEG compression noise turns masks into grey fringes anyway."""
    jpegs = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")
                   and not p.name.startswith("."))
    if not jpegs:
        return []
    return [ValueError(f"{folder}: {len(jpegs)} JPEG mask(s), e.g. {jpegs[0]}: not read (a mask "
                       f"is png tif tiff or bmp, and JPEG noise counts as lesion); re-export them "
                       f"as PNG from the originals")]


def _orphan(path, stem, root, images):
    """The error of a mask whose stem is no image's: named as its image, or a suffix too many?"""
    base = stem.rsplit("_", 1)[0]  # IDRiD_01_EX.tif: IDRiD's naming
    hint = (f" (a mask is named as its image: {path.with_name(base + path.suffix)} for "
            f"{images[base]})" if base in images else "")
    return ValueError(f"mask {path} has no image {root / 'images' / stem}.*{hint}")


def generic_samples(root, dataset_id):
    """The samples of a dataset in the generic layout (scan); its first problem, if any, raised."""
    samples, errors = scan(root, dataset_id)
    if errors:
        raise errors[0]
    return samples
