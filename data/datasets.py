"""The five lesion datasets read exactly as distributed: one adapter per dataset ID (data/splits.py splits them).

    python -c "from data.datasets import list_samples, dataset_root; print(len(list_samples('IDR', dataset_root('IDR', 'data_raw'))))"
    python -c "from data.datasets import *; r = dataset_root('RET', 'data_raw'); print(len(list_samples('RET', r)))"

An adapter turns a dataset root into a sorted list of `Sample`s (id, image file, mask files per lesion,
distributed split folder). `load_image` / `load_masks` decode them; every quirk of the distributed layouts
(docs/PROTOCOL.md, "Datasets") lives in this file and nowhere else.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.ids import DATASET_IDS, FOLDERS, LESIONS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# A subfolder every copy of the dataset has at its root: tells the dataset's folder from a wrapper around it.
LANDMARKS = {"IDR": ("A. Segmentation",), "DDR": ("lesion_segmentation",), "FGA": ("Original_Images",),
             "RET": ("images_896x896",), "MES": ("train", "test")}


@dataclass
class Sample:
    id: str
    image: Path
    masks: dict = field(default_factory=dict)  # lesion -> tuple of files OR-ed together; () = all-zero
    split: str | None = None  # the distributed split folder ("train"/"val"/"test"), None when there is none


# ----------------------------------------------------------------------------- roots

def _is_dataset(folder, dataset_id):
    return any((folder / name).is_dir() for name in LANDMARKS[dataset_id])


def _one_level_down(base, dataset_id, data_root):
    """Copies of the dataset one level below where it was expected: BASE/<name> (DATA/IDRiD/IDRiD) and, for
    --data-root, DATA/*/<name> (DATA/idrid/IDRiD): (found, where it looked, as text)."""
    name = FOLDERS[dataset_id]
    places, looked = [base / name], [str(base / name)]
    if data_root is not None:
        looked.append(str(Path(data_root) / "*" / name))
        if Path(data_root).is_dir():
            places += sorted(d / name for d in Path(data_root).iterdir() if d.is_dir() and d != base)
    return [p for p in places if p.is_dir() and _is_dataset(p, dataset_id)], " and ".join(looked)


def dataset_root(dataset_id, data_root, roots=None):
    """Folder of one dataset: --root ID=DIR, else env <ID>_ROOT, else DATA_ROOT/<distributed folder name>.

    NOTE: users often unpack an archive into a folder of its own (DATA/IDRiD/IDRiD/A. Segmentation, or
    DATA/idrid/IDRiD/...): when the expected folder is missing or lacks the dataset's top-level subfolder,
    the distributed folder name is looked for one level down.
    """
    if dataset_id not in DATASET_IDS:
        raise ValueError(f"unknown dataset ID {dataset_id!r} (choose from {', '.join(DATASET_IDS)})")
    given = (roots or {}).get(dataset_id) or os.environ.get(f"{dataset_id}_ROOT")
    root = Path(given) if given else Path(data_root) / FOLDERS[dataset_id]
    if root.is_dir() and _is_dataset(root, dataset_id):
        return root
    found, looked = _one_level_down(root, dataset_id, None if given else data_root)
    if len(found) > 1:
        raise ValueError(f"{dataset_id}: several copies found ({', '.join(map(str, found))}): choose one with "
                         f"--root {dataset_id}=DIR")
    if found:
        return found[0]
    if root.is_dir():  # not the expected layout: the adapter names what is missing
        return root
    raise FileNotFoundError(
        f"{dataset_id} dataset not found: expected folder {root} (set --data-root DIR holding "
        f"{FOLDERS[dataset_id]}/, or --root {dataset_id}=DIR, or {dataset_id}_ROOT=DIR; also looked in {looked})")


def _index(folder, suffixes=IMAGE_SUFFIXES):
    """{stem: path} of the image files in a folder ({} when the folder does not exist)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()}


def _found(files, name):
    return (files[name],) if name in files else ()  # NOTE: IDR, RET: absent mask file = lesion absent


def _required(files, name, expected, dataset_id):
    """The mask file of one image where the dataset ships one per image and lesion (DDR, FGA, MES)."""
    if name not in files:
        raise FileNotFoundError(f"{dataset_id}: missing mask file {expected} ({dataset_id} ships every lesion mask "
                                f"of every image, all-zero when the lesion is absent)")
    return (files[name],)


def _mask_folder(folder, dataset_id):
    """A lesion mask folder that the distributed layout always has: FileNotFoundError naming it if absent
    (a renamed or deleted folder would otherwise read as lesion-free images)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{dataset_id}: mask folder {folder} not found (renamed or deleted? the "
                                f"distributed layout has it)")
    return folder


def _no_images(dataset_id, folder, layout):
    return ValueError(f"{dataset_id}: no images found under {folder} (expected the distributed layout {layout})")


# ----------------------------------------------------------------------------- adapters

IDR_MASKS = {"EX": ("3. Hard Exudates", "EX"), "HE": ("2. Haemorrhages", "HE"),
             "MA": ("1. Microaneurysms", "MA"), "CWS": ("4. Soft Exudates", "SE")}  # IDRiD calls CWS "SE"


def _idr(root, ret_he):
    seg = root / "A. Segmentation"
    samples = []
    for folder, split in (("a. Training Set", "train"), ("b. Testing Set", "test")):
        images = _index(seg / "1. Original Images" / folder)
        if images:
            _mask_folder(seg / "2. All Segmentation Groundtruths" / folder, "IDR")
        # NOTE: a lesion folder may be absent (the real sample tests/fixtures/idrid-he14 has only "2. Haemorrhages")
        masks = {les: _index(seg / "2. All Segmentation Groundtruths" / folder / sub)
                 for les, (sub, _) in IDR_MASKS.items()}
        for stem, path in images.items():
            files = {les: _found(masks[les], f"{stem}_{suffix}") for les, (_, suffix) in IDR_MASKS.items()}
            samples.append(Sample(stem, path, files, split))
    if not samples:
        raise _no_images("IDR", seg / "1. Original Images", "'A. Segmentation/1. Original Images/a. Training Set/'")
    return samples


DDR_MASKS = {"EX": "EX", "HE": "HE", "MA": "MA", "CWS": "SE"}


def _ddr(root, ret_he):
    base = root / "lesion_segmentation"
    samples = []
    for folder, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        # NOTE: DDR's valid split names it "segmentation label" (either name is accepted in every split)
        names = ("segmentation label", "label") if folder == "valid" else ("label", "segmentation label")
        labels = next((base / folder / n for n in names if (base / folder / n).is_dir()), base / folder / names[0])
        images = _index(base / folder / "image")
        if not images:
            continue
        dirs = {les: _mask_folder(labels / sub, "DDR") for les, sub in DDR_MASKS.items()}
        masks = {les: _index(d) for les, d in dirs.items()}
        for stem, path in images.items():
            files = {les: _required(masks[les], stem, dirs[les] / f"{stem}.tif", "DDR") for les in LESIONS}
            samples.append(Sample(stem, path, files, split))
    if not samples:
        raise _no_images("DDR", base, "'lesion_segmentation/{train,valid,test}/image/'")
    return samples


FGA_MASKS = {"EX": "HardExudate_Masks", "HE": "Hemohedge_Masks",  # NOTE: "Hemohedge" (sic) as distributed
             "MA": "Microaneurysms_Masks", "CWS": "SoftExudate_Masks"}


def _fga(root, ret_he):
    images = _index(root / "Original_Images")
    if not images:
        raise _no_images("FGA", root / "Original_Images", "'Seg-set/Original_Images/'")
    dirs = {les: _mask_folder(root / sub, "FGA") for les, sub in FGA_MASKS.items()}
    masks = {les: _index(d) for les, d in dirs.items()}
    return [Sample(stem, path, {les: _required(masks[les], stem, dirs[les] / f"{stem}.png", "FGA")
                                   for les in LESIONS})
            for stem, path in images.items()]


RET_MASKS = {"EX": ("hard_exudate",), "HE": ("retinal_hemorrhage",), "MA": ("microaneurysm",),
             "CWS": ("cotton_wool_spots",)}
RET_HE_ALL = ("retinal_hemorrhage", "preretinal_hemorrhage", "vitreous_hemorrhage")  # --ret-he all


def _ret(root, ret_he):
    names = dict(RET_MASKS, HE=RET_HE_ALL) if ret_he == "all" else RET_MASKS
    images = _index(root / "images_896x896")
    if images:
        _mask_folder(root / "lesion_segs_896x896", "RET")
    samples = []
    for stem, path in images.items():
        # NOTE: one folder per image holding only the lesions present; 17 images have no folder at all.
        pngs = _index(root / "lesion_segs_896x896" / stem, (".png",))
        files = {les: tuple(pngs[n] for n in names[les] if n in pngs) for les in LESIONS}
        samples.append(Sample(stem, path, files))
    if not samples:
        raise _no_images("RET", root / "images_896x896", "'retinal-lesions-v20191227/images_896x896/'")
    return samples


MES_MASKS = {"EX": "exudates", "HE": "hemorrhages", "MA": "microaneurysms",
             "CWS": "cottonWoolSpots"}  # camelCase folders of the maples-dr export


def _mes(root, ret_he):
    samples = []
    for split in ("train", "test"):
        images = _index(root / split / "fundus")
        if not images:
            continue
        # NOTE: the maples-dr export writes every lesion mask of every image (blank when absent)
        dirs = {les: _mask_folder(root / split / sub, "MES") for les, sub in MES_MASKS.items()}
        masks = {les: _index(d) for les, d in dirs.items()}
        for stem, path in images.items():
            files = {les: _required(masks[les], stem, dirs[les] / f"{stem}.png", "MES") for les in LESIONS}
            samples.append(Sample(stem, path, files, split))
    if not samples:
        raise _no_images("MES", root, "'MAPLES-DR/{train,test}/fundus/'")
    return samples


ADAPTERS = {"IDR": _idr, "DDR": _ddr, "FGA": _fga, "RET": _ret, "MES": _mes}


def list_samples(dataset_id, root, ret_he="retinal"):
    """All samples of one dataset, sorted by id. ret_he="all" merges RET's preretinal + vitreous into HE."""
    if dataset_id not in ADAPTERS:
        raise ValueError(f"unknown dataset ID {dataset_id!r} (choose from {', '.join(DATASET_IDS)})")
    if ret_he not in ("retinal", "all"):
        raise ValueError(f"--ret-he must be 'retinal' or 'all', got {ret_he!r}")
    samples = sorted(ADAPTERS[dataset_id](Path(root), ret_he), key=lambda s: s.id)
    for a, b in zip(samples, samples[1:]):
        if a.id == b.id:
            raise ValueError(f"{dataset_id}: duplicate image id {a.id!r} ({a.image} and {b.image})")
    return samples


# ----------------------------------------------------------------------------- decoding

def _unreadable(path, err):
    msg = " ".join(str(err).split())  # one line, whatever PIL says
    return ValueError(f"cannot read {path}: corrupt or truncated file ({msg})")


def load_image(path):
    """Decoded RGB PIL image; ValueError naming the file when it is corrupt or truncated."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return _wide_to_rgb(im)
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from None


def _wide_to_rgb(im):
    """A 16-bit (or 32-bit / float) grey image -> 8-bit RGB, scaled by its own range.

    NOTE: PIL's convert("RGB") clips such values at 255, which turns a 16-bit photograph white. The real
    range is unknown (12-bit sensors store 0..4095 in 16 bits), so the image's own maximum maps to 255.
    """
    a = np.asarray(im, dtype=np.float64)
    top = a.max() if a.size and np.isfinite(a.max()) and a.max() > 0 else 1.0
    grey = np.clip(np.nan_to_num(a) / top * 255 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def _decode_mask(im, threshold):
    """Lesion where intensity > threshold (default 0: any nonzero value, the authors' choice)."""
    if im.mode in ("L", "I", "I;16", "F"):
        a = np.asarray(im)
    else:
        # NOTE: 1-bit (MES), palette (IDR: index 1 = red), RGB with equal channels (FGA): max over RGB.
        a = np.asarray(im.convert("RGB")).max(axis=-1)
    return a > threshold


def load_masks(sample, image_size, threshold=0, box=None, size=None):
    """Lesion masks of one sample: bool (4, h, w) in LESIONS order.

    image_size: (W, H) of the sample's image (every mask must match it). box (x0, y0, x1, y1) and size (w, h)
    resample with nearest neighbour while decoding (prepare uses this); default: native resolution.
    """
    out_w, out_h = size or image_size
    masks = np.zeros((len(LESIONS), out_h, out_w), dtype=bool)  # (4, h, w)
    for c, lesion in enumerate(LESIONS):
        for path in sample.masks.get(lesion, ()):
            try:
                with Image.open(path) as im:
                    if im.size != tuple(image_size):
                        raise ValueError(f"mask {path} is {im.size[0]}x{im.size[1]} but its image {sample.image} "
                                         f"is {image_size[0]}x{image_size[1]}")
                    if size is not None:  # nearest commutes with the per-pixel threshold below
                        im = im.resize((out_w, out_h), Image.NEAREST, box=box)
                    else:
                        im.load()
                    masks[c] |= _decode_mask(im, threshold)
            except ValueError:
                raise
            except (OSError, SyntaxError, Image.DecompressionBombError) as e:
                raise _unreadable(path, e) from None
    return masks


def load_sample(sample, threshold=0):
    """Native-resolution (image uint8 (H, W, 3), masks bool (4, H, W))."""
    image = load_image(sample.image)
    return np.asarray(image), load_masks(sample, image.size, threshold)
