r"""The five lesion datasets read exactly as distributed: one adapter per dataset ID.

    python -c "from data.datasets import list_samples, dataset_root; \
        print(len(list_samples('IDR', dataset_root('IDR', 'data_raw'))))"
    python -c "from data.datasets import *; r = dataset_root('RET', 'data_raw'); \
        print(len(list_samples('RET', r)))"

An adapter turns a dataset root into a sorted list of `Sample`s (id, image file, mask files per
lesion, distributed split folder); data/splits.py splits them. `load_image` / `load_masks` decode
them; every quirk of the distributed layouts (docs/PROTOCOL.md, "Datasets") lives in this file and
nowhere else.
"""
import difflib
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

from data import generic
from data.ids import DATASET_IDS, FOLDERS, LESIONS, is_own

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# A subfolder every copy of the dataset has at its root: tells the dataset's folder from a wrapper
# around it.
LANDMARKS = {"IDR": ("A. Segmentation",), "DDR": ("lesion_segmentation",),
             "FGA": ("Original_Images",), "RET": ("images_896x896",), "MES": ("train", "test")}


@dataclass
class Sample:
    """One image of a dataset and its mask files, as an adapter lists it."""
    id: str
    image: Path
    masks: dict = field(default_factory=dict)  # lesion -> files OR-ed together; () = all-zero
    split: str | None = None  # the distributed split folder ("train"/"val"/"test"), or None
    dataset: str | None = None  # its dataset ID, set by list_samples (for --mask-threshold ID=T)


# ----------------------------------------------------------------------------- roots

def _is_dataset(folder, dataset_id):
    """Does `folder` hold the dataset itself (one of its LANDMARKS subfolders)?"""
    return any((folder / name).is_dir() for name in LANDMARKS[dataset_id])


def _one_level_down(base, dataset_id, data_root):
    """Copies of the dataset one level below where it was expected: BASE/<name> (DATA/IDRiD/IDRiD)
    and, for --data-root, DATA/*/<name> (DATA/idrid/IDRiD): (found, where it looked, as text)."""
    name = FOLDERS[dataset_id]
    places, looked = [base / name], [str(base / name)]
    if data_root is not None:
        looked.append(str(Path(data_root) / "*" / name))
        if Path(data_root).is_dir():
            places += sorted(d / name for d in Path(data_root).iterdir()
                             if d.is_dir() and d != base)
    return [p for p in places if p.is_dir() and _is_dataset(p, dataset_id)], " and ".join(looked)


def dataset_root(dataset_id, data_root, roots=None):
    """Folder of one dataset: --root ID=DIR, else env <ID>_ROOT, else DATA_ROOT/<distributed name>.

    NOTE: users often unpack an archive into a folder of its own (DATA/IDRiD/IDRiD/A. Segmentation,
    or DATA/idrid/IDRiD/...): when the expected folder is missing or lacks the dataset's top-level
    subfolder, the distributed folder name is looked for one level down.
    """
    given = (roots or {}).get(dataset_id) or os.environ.get(f"{dataset_id}_ROOT")
    if is_own(dataset_id):
        return _own_root(dataset_id, given)
    root = Path(given) if given else Path(data_root) / FOLDERS[dataset_id]
    if root.is_dir() and _is_dataset(root, dataset_id):
        return root
    if (root / "dataset.json").is_file():  # NOTE: the five IDs name their distributed layouts
        raise ValueError(f"{dataset_id}: {root} holds a dataset.json (the generic layout of "
                         f"docs/DATA.md, 'Your own dataset'), but {dataset_id} names "
                         f"{FOLDERS[dataset_id]} as distributed: give the folder an ID of your "
                         f"own, e.g. --root ABC={root}")
    found, looked = _one_level_down(root, dataset_id, None if given else data_root)
    if len(found) > 1:
        raise ValueError(f"{dataset_id}: several copies found ({', '.join(map(str, found))}): "
                         f"choose one with --root {dataset_id}=DIR")
    if found:
        return found[0]
    if root.is_dir():  # not the expected layout: the adapter names what is missing
        return root
    raise FileNotFoundError(
        f"{dataset_id} dataset not found: expected folder {root} (set --data-root DIR holding "
        f"{FOLDERS[dataset_id]}/, or --root {dataset_id}=DIR, or {dataset_id}_ROOT=DIR; also "
        f"looked in {looked})")


def _own_root(dataset_id, given):
    """The folder of a dataset of one's own: --root ID=DIR or ID_ROOT, holding dataset.json."""
    generic.check_id(dataset_id, "dataset ID")
    if not given:
        raise ValueError(f"unknown dataset ID {dataset_id!r} (choose from "
                         f"{', '.join(DATASET_IDS)}, or give the folder of your own dataset with "
                         f"--root {dataset_id}=DIR or {dataset_id}_ROOT=DIR: docs/DATA.md)")
    root = Path(given)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset_id} dataset not found: folder {root} (--root "
                                f"{dataset_id}=DIR or {dataset_id}_ROOT)")
    if not (root / "dataset.json").is_file():  # one of the five, as distributed, under a new ID?
        five = next((d for d in DATASET_IDS if _is_dataset(root, d)), None)
        if five:
            raise ValueError(f"{dataset_id}: {root} holds {FOLDERS[five]} as distributed, not the "
                             f"generic layout (no dataset.json): read it as --root {five}={root}")
    generic.read_dataset_json(root)  # one line naming it when missing or wrong
    return root


def own_styles(ids, roots=None):
    """{dataset ID: its dataset.json "style"} of the datasets of one's own among `ids` that say one:
    style conditioning's token where no characterize.json is given (data.ids.dataset_styles)."""
    styles = {}
    for d in ids:
        if is_own(d):
            info = generic.read_dataset_json(dataset_root(d, None, roots))
            if "style" in info:
                styles[d] = info["style"]
    return styles


def annotated(sample):
    """The lesions annotated in a sample's image (LESIONS order): a lesion absent from sample.masks
    is not annotated there, left out of the loss and the scores (not a negative)."""
    return tuple(les for les in LESIONS if les in sample.masks)


def _index(folder, suffixes=IMAGE_SUFFIXES, clashes=None):
    """{stem: path} of the image files in a folder ({} when the folder does not exist). Two files of
    one stem (IDRiD_01.jpg and IDRiD_01.png) are a ValueError naming both: either could be the one
    its masks belong to. clashes: a list instead, each such ValueError appended to it (the first
    file of the stem kept), so that data.check reports them all."""
    if not folder.is_dir():
        return {}
    files = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file():
            if p.stem in files:
                e = ValueError(f"two files named {p.stem} in {folder}: {files[p.stem].name} and "
                               f"{p.name} (which one to read is ambiguous: keep one)")
                if clashes is None:
                    raise e
                clashes.append(e)
                continue
            files[p.stem] = p
    return files


def _found(files, name):
    """The mask file of one image where the dataset ships only the lesions present (IDR, RET)."""
    return (files[name],) if name in files else ()  # NOTE: an absent mask file = lesion absent


def _required(files, name, expected, dataset_id):
    """The mask file of one image where the dataset ships one per image and lesion (DDR, FGA,
    MES)."""
    if name not in files:
        raise FileNotFoundError(f"{dataset_id}: missing mask file {expected} ({dataset_id} ships "
                                f"every lesion mask of every image, all-zero when the lesion is "
                                f"absent)")
    return (files[name],)


def _mask_folder(folder, dataset_id):
    """A lesion mask folder that the distributed layout always has: FileNotFoundError naming it if
    absent (a renamed or deleted folder would otherwise read as lesion-free images)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{dataset_id}: mask folder {folder} not found (renamed or "
                                f"deleted? the distributed layout has it)")
    return folder


def _no_images(dataset_id, folder, layout):
    """The error of an adapter that found no image: where it looked, the layout it expected."""
    return ValueError(f"{dataset_id}: no images found under {folder} (expected the distributed "
                      f"layout {layout})")


# ----------------------------------------------------------------------------- adapters

# lesion -> (ground-truth folder, file suffix); NOTE: IDRiD calls CWS "SE" (soft exudates)
IDR_MASKS = {"EX": ("3. Hard Exudates", "EX"), "HE": ("2. Haemorrhages", "HE"),
             "MA": ("1. Microaneurysms", "MA"), "CWS": ("4. Soft Exudates", "SE")}
IDR_UNUSED = {"5. Optic Disc": "OD"}  # distributed beside the lesions, not read


def _idr_meant(folder):
    """The distributed name a ground-truth folder of another name stands for: told by its files'
    suffix (IDRiD_01_EX.tif), else by a close name ("3. Hard Exudate"); None when neither tells."""
    names = {sub: code for sub, code in [*IDR_MASKS.values(), *IDR_UNUSED.items()]}
    by_code = {code.lower(): sub for sub, code in names.items()}
    for p in sorted(folder.iterdir()):
        sub = by_code.get(p.stem.rsplit("_", 1)[-1].lower())
        if sub and p.suffix.lower() in IMAGE_SUFFIXES:
            return sub
    close = difflib.get_close_matches(folder.name.lower(), [n.lower() for n in names], 1, 0.75)
    return next((n for n in names if close and n.lower() == close[0]), None)


def _idr_lesion_folders(gt):
    """Lesion -> folder of one IDRiD ground-truth set (".../a. Training Set").

    A lesion folder may be absent (a subset of IDRiD annotated for some lesions only): one warning,
    the lesion is not annotated in those images (left out of the loss and the scores, no key in
    their masks). A folder of another name standing for an absent one ("3. Hard Exudate"), or an
    unknown one holding images beside an absent one, is a ValueError: read as it is, it would be
    "no such lesion in any image".
    """
    subs = {les: sub for les, (sub, _) in IDR_MASKS.items()}
    absent = sorted(sub for sub in subs.values() if not (gt / sub).is_dir())
    if absent:
        others = [d for d in sorted(gt.iterdir()) if d.is_dir() and not d.name.startswith(".")
                  and d.name not in [*subs.values(), *IDR_UNUSED] and _index(d)]  # with images
        for d in others:
            meant = _idr_meant(d)
            if meant in absent:
                raise ValueError(f"IDR: mask folder {d} is not named as distributed: rename it to "
                                 f"'{meant}' (under another name its masks are not read)")
            if meant is None:
                missing = f"{', '.join(map(repr, absent))} {'is' if len(absent) == 1 else 'are'}"
                raise ValueError(f"IDR: unknown mask folder {d} while {missing} missing: rename it "
                                 f"to the lesion's distributed name, or move it out of {gt}")
        lesions = [les for sub in absent for les in subs if subs[les] == sub]
        print(f"warning: IDR: no {', '.join(map(repr, absent))} in {gt}: {', '.join(lesions)} not "
              f"annotated there (left out of the loss and the scores)", file=sys.stderr, flush=True)
    return {les: gt / sub for les, sub in subs.items() if sub not in absent}


def _idr(root, ret_he):
    """IDRiD, segmentation part: official train / test folders, one TIFF per lesion present."""
    seg = root / "A. Segmentation"
    samples = []
    for folder, split in (("a. Training Set", "train"), ("b. Testing Set", "test")):
        images = _index(seg / "1. Original Images" / folder)
        if not images:
            continue
        gt = _mask_folder(seg / "2. All Segmentation Groundtruths" / folder, "IDR")
        dirs = _idr_lesion_folders(gt)
        masks = {les: _index(d) for les, d in dirs.items()}
        # renamed files would read as "no lesion" too
        for les, (_, code) in IDR_MASKS.items():
            if masks.get(les) and not any(stem.endswith(f"_{code}") for stem in masks[les]):
                raise ValueError(f"IDR: no file in {dirs[les]} is named as IDRiD names them "
                                 f"(<image>_{code}.tif, e.g. {next(iter(images))}_{code}.tif): "
                                 f"rename them")
        for stem, path in images.items():  # IDRiD_01.jpg -> IDRiD_01_EX.tif, ...
            files = {les: _found(masks[les], f"{stem}_{suffix}")
                     for les, (_, suffix) in IDR_MASKS.items() if les in masks}
            samples.append(Sample(stem, path, files, split))
    if not samples:
        raise _no_images("IDR", seg / "1. Original Images",
                         "'A. Segmentation/1. Original Images/a. Training Set/'")
    return samples


DDR_MASKS = {"EX": "EX", "HE": "HE", "MA": "MA", "CWS": "SE"}


def _ddr(root, ret_he):
    """OIA-DDR lesion segmentation: official train / valid / test, a TIFF per image and lesion."""
    base = root / "lesion_segmentation"
    samples = []
    for folder, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        # NOTE: DDR's valid split names it "segmentation label" (either name is accepted in every
        # split)
        names = (("segmentation label", "label") if folder == "valid"
                 else ("label", "segmentation label"))
        labels = next((base / folder / n for n in names if (base / folder / n).is_dir()),
                      base / folder / names[0])
        images = _index(base / folder / "image")
        if not images:
            continue
        dirs = {les: _mask_folder(labels / sub, "DDR") for les, sub in DDR_MASKS.items()}
        masks = {les: _index(d) for les, d in dirs.items()}
        for stem, path in images.items():
            files = {les: _required(masks[les], stem, dirs[les] / f"{stem}.tif", "DDR")
                     for les in LESIONS}
            samples.append(Sample(stem, path, files, split))
    if not samples:
        raise _no_images("DDR", base, "'lesion_segmentation/{train,valid,test}/image/'")
    return samples


# NOTE: "Hemohedge" (sic) as distributed
FGA_MASKS = {"EX": "HardExudate_Masks", "HE": "Hemohedge_Masks",
             "MA": "Microaneurysms_Masks", "CWS": "SoftExudate_Masks"}


def _fga(root, ret_he):
    """FGADR Seg-set: no distributed split, one PNG per image and lesion."""
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
    """Retinal-Lesions: no distributed split, one folder per image with the lesions present."""
    names = dict(RET_MASKS, HE=RET_HE_ALL) if ret_he == "all" else RET_MASKS
    images = _index(root / "images_896x896")
    if images:
        _mask_folder(root / "lesion_segs_896x896", "RET")
    samples = []
    for stem, path in images.items():
        # NOTE: one folder per image holding only the lesions present; 17 images have no folder at
        # all.
        pngs = _index(root / "lesion_segs_896x896" / stem, (".png",))
        files = {les: tuple(pngs[n] for n in names[les] if n in pngs) for les in LESIONS}
        samples.append(Sample(stem, path, files))
    if not samples:
        raise _no_images("RET", root / "images_896x896",
                         "'retinal-lesions-v20191227/images_896x896/'")
    return samples


MES_MASKS = {"EX": "exudates", "HE": "hemorrhages", "MA": "microaneurysms",
             "CWS": "cottonWoolSpots"}  # camelCase folders of the maples-dr export


def _mes(root, ret_he):
    """MAPLES-DR (MESSIDOR photographs) as maples-dr exports it: official train / test."""
    samples = []
    for split in ("train", "test"):
        images = _index(root / split / "fundus")
        if not images:
            continue
        # NOTE: the maples-dr export writes every lesion mask of every image (blank when absent)
        dirs = {les: _mask_folder(root / split / sub, "MES") for les, sub in MES_MASKS.items()}
        masks = {les: _index(d) for les, d in dirs.items()}
        for stem, path in images.items():
            files = {les: _required(masks[les], stem, dirs[les] / f"{stem}.png", "MES")
                     for les in LESIONS}
            samples.append(Sample(stem, path, files, split))
    if not samples:
        raise _no_images("MES", root, "'MAPLES-DR/{train,test}/fundus/'")
    return samples


ADAPTERS = {"IDR": _idr, "DDR": _ddr, "FGA": _fga, "RET": _ret, "MES": _mes}


def list_samples(dataset_id, root, ret_he="retinal", errors=None):
    """All samples of one dataset, sorted by id. ret_he="all" merges RET's preretinal + vitreous
    into HE. errors: a list: the problems of a dataset of one's own are appended to it (each an
    exception, one line) instead of the first being raised, so that data.check reports them all."""
    if ret_he not in ("retinal", "all"):
        raise ValueError(f"--ret-he must be 'retinal' or 'all', got {ret_he!r}")
    if dataset_id in ADAPTERS:
        samples = ADAPTERS[dataset_id](Path(root), ret_he)
    elif errors is None:
        samples = generic.generic_samples(root, dataset_id)
    else:
        samples, found = generic.scan(root, dataset_id)
        errors += found
    samples = sorted(samples, key=lambda s: s.id)
    for a, b in zip(samples, samples[1:]):
        if a.id == b.id:
            raise ValueError(f"{dataset_id}: duplicate image id {a.id!r} "
                             f"({a.image} and {b.image})")
    for s in samples:
        s.dataset = dataset_id
    return samples


# ----------------------------------------------------------------------------- decoding

def _unreadable(path, err):
    """The one-line error for an image or mask PIL cannot decode."""
    msg = " ".join(str(err).split())  # one line, whatever PIL says
    return ValueError(f"cannot read {path}: corrupt or truncated file ({msg})")


# EXIF / TIFF orientation tag -> the transpose showing the stored pixels upright (as exif_transpose)
ORIENTATION = 0x0112
TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _orientation(im):
    """The orientation tag of an open image: 1 (as stored) when absent or invalid; 5-8 swap width
    and height. NOTE: read after decoding, as ImageOps.exif_transpose does: PIL turns a TIFF while
    decoding it and drops the tag."""
    im.load()
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, TypeError):  # a malformed EXIF block: as stored
        return 1
    return value if value in TURNS else 1


def load_image(path):
    """Decoded RGB PIL image, turned upright as viewers show it (its EXIF orientation tag: a phone's
    portrait photograph is stored sideways); ValueError naming the file when it is corrupt or
    truncated."""
    try:
        with Image.open(path) as im:
            turn = _orientation(im)  # decodes now: a truncated file fails here, not later
            if turn != 1:
                im = im.transpose(TURNS[turn])
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return _wide_to_rgb(im)
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from None


def _wide_to_rgb(im):
    """A 16-bit (or 32-bit / float) grey image -> 8-bit RGB, scaled by its own range.

    NOTE: PIL's convert("RGB") clips such values at 255, which turns a 16-bit photograph white. The
    real range is unknown (12-bit sensors store 0..4095 in 16 bits), so the image's own maximum maps
    to 255.
    """
    a = np.asarray(im, dtype=np.float64)
    top = a.max() if a.size and np.isfinite(a.max()) and a.max() > 0 else 1.0
    grey = np.clip(np.nan_to_num(a) / top * 255 + 0.5, 0, 255).astype(np.uint8)  # rounded
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def _decode_mask(im, threshold):
    """Lesion where intensity > threshold (default 0: any nonzero value, the authors' choice)."""
    if im.mode in ("L", "I", "I;16", "F"):
        a = np.asarray(im)
    else:
        # NOTE: 1-bit (MES), palette (IDR: index 1 = red), RGB with equal channels (FGA): max over
        # RGB.
        a = np.asarray(im.convert("RGB")).max(axis=-1)
    return a > threshold


FAINT_MIN = 32  # faint pixels a PNG / TIFF mask must have before its grey levels are judged
_NOISY = set()  # dataset IDs warned about: one warning per dataset and process
_NOISY_LOCK = threading.Lock()  # data.prepare decodes in threads


def _value_histogram(im):
    """256-bin histogram of a mask's values as _decode_mask reads them (palette entries and RGB
    pixels by their brightest channel); None for 1-bit and 16-bit / float masks (no JPEG gives
    those)."""
    if im.mode == "P":  # IDRiD: the histogram of palette indices, mapped through the palette
        brightest = np.asarray(im.getpalette() or [0, 0, 0], np.int64).reshape(-1, 3).max(1)
        counts = np.asarray(im.histogram()[:len(brightest)], np.int64)
        return np.bincount(brightest[:len(counts)], weights=counts, minlength=256)
    if im.mode in ("L", "LA"):
        return np.asarray(im.histogram()[:256], np.int64)
    if im.mode in ("RGB", "RGBA"):  # the brightest channel in C (3x faster than numpy's max)
        r, g, b = im.convert("RGB").split()
        return np.asarray(ImageChops.lighter(ImageChops.lighter(r, g), b).histogram(), np.int64)
    return None


def _compression_noise(hist, threshold, jpeg):
    """(faint pixels counted as lesion, top faint value) where a mask's histogram shows compression
    noise, else (0, 0). Faint: threshold < value <= max / 8. In a JPEG any faint pixel is noise.

    NOTE: JPEG noise around a 0/255 mask piles up at faint values with almost no mid values
    (max / 4 .. 3 max / 4): measured faint / mid = 13 to 7000 (quality 50-100, grey or red masks).
    Anti-aliased, bilinear-resampled or blurred edges spread over all levels: faint / mid from 0
    (FGADR's fringe) to 4; RET's 127/255 has no faint value. A ringing resampler's halo (Lanczos,
    bicubic) looks like JPEG noise: hence a warning only, for PNG and TIFF masks.
    """
    top = int(np.flatnonzero(hist)[-1]) if hist.any() else 0
    faint = int(hist[threshold + 1:top // 8 + 1].sum())  # threshold < value <= top / 8
    mid = int(hist[top // 4 + 1:3 * top // 4 + 1].sum())  # top / 4 < value <= 3 top / 4
    if faint and (jpeg or (faint >= FAINT_MIN and faint > 8 * mid)):
        return faint, top // 8
    return 0, 0


def noise_finding(im, path, dataset_id, threshold, hist=None):
    """("error" | "warning", message) where a mask's compression noise would count as lesion at
    this threshold, else None: a JPEG's (whatever the file's name says) is an error, a PNG / TIFF
    whose grey levels look like JPEG noise a warning (_compression_noise). hist: the mask's
    _value_histogram when already computed."""
    jpeg = im.format == "JPEG"  # the file's content, whatever its name says
    hist = _value_histogram(im) if hist is None else hist
    faint, top = (0, 0) if hist is None else _compression_noise(hist, threshold, jpeg)
    if not faint:
        return None
    ds = dataset_id or "ID"
    if jpeg:
        return "error", (f"mask {path} is a JPEG: {faint} pixels of values {threshold + 1}..{top} "
                         f"(compression noise) would count as lesion; re-export the masks as PNG "
                         f"or TIFF, or pass --mask-threshold {ds}=127")
    return "warning", (f"mask {path}: {faint} pixels of faint values {threshold + 1}..{top}, few "
                       f"mid ones (JPEG noise, or a resampling halo?) count as lesion; if so, "
                       f"re-export the masks from the originals or pass --mask-threshold "
                       f"{ds}=127")


def _check_noise(im, path, sample, threshold):
    """A JPEG mask whose noise would count as lesion: ValueError naming it. A PNG / TIFF whose grey
    levels look like JPEG noise: one warning naming it (the first such mask of each dataset)."""
    if im.format != "JPEG" and sample.dataset in _NOISY:
        return
    found = noise_finding(im, path, sample.dataset, threshold)
    if found is None:
        return
    level, msg = found
    if level == "error":
        raise ValueError(msg)
    with _NOISY_LOCK:  # one warning per dataset, whichever thread sees it first
        if sample.dataset in _NOISY:
            return
        _NOISY.add(sample.dataset)
    print(f"warning: {msg} (no further warning for {sample.dataset or 'ID'})", file=sys.stderr,
          flush=True)


def _upright_mask(im, path, sample, image_size):
    """A mask turned as its image is shown (load_image): by its own orientation tag if it has one.
    One without must match its image as shown, or, where the image's tag turns it by 90 degrees,
    the image as stored (it was drawn on the stored pixels): then it is turned the same way. Any
    other size is a ValueError naming both files.
    NOTE: a 180 degree or mirror tag (or a square image) keeps the size: the mask is read as
    shown."""
    own, turn = _orientation(im), 1
    if own != 1:
        im = im.transpose(TURNS[own])
    elif im.size != tuple(image_size):  # drawn on the stored pixels of a turned photograph?
        with Image.open(sample.image) as photo:
            turn = _orientation(photo)
        if turn >= 5 and im.size == tuple(image_size)[::-1]:
            return im.transpose(TURNS[turn])
    if im.size != tuple(image_size):
        W, H = image_size if turn < 5 else tuple(image_size)[::-1]
        shown = f" as shown (EXIF orientation {turn} turns the stored {W}x{H})" if turn != 1 else ""
        raise ValueError(f"mask {path} is {im.size[0]}x{im.size[1]} but its image {sample.image} "
                         f"is {image_size[0]}x{image_size[1]}{shown}")
    return im


def load_masks(sample, image_size, threshold=0, box=None, size=None):
    """Lesion masks of one sample: bool (4, h, w) in LESIONS order.

    image_size: (W, H) of the sample's image as load_image gives it (each mask must fit it:
    _upright_mask). box (x0, y0, x1, y1) and size (w, h) resample with nearest neighbour while
    decoding (prepare uses this); default: native resolution. A JPEG mask whose compression noise
    would count as lesion at this threshold is a ValueError naming it (the noise took MA from
    0.33 % to 15.7 % of a fundus); a PNG / TIFF that looks like one gets a warning (_check_noise).
    """
    out_w, out_h = size or image_size
    masks = np.zeros((len(LESIONS), out_h, out_w), dtype=bool)  # (4, h, w)
    for c, lesion in enumerate(LESIONS):
        for path in sample.masks.get(lesion, ()):  # several files (RET --ret-he all): OR-ed
            try:
                with Image.open(path) as im:
                    _check_noise(im, path, sample, threshold)
                    im = _upright_mask(im, path, sample, image_size)
                    if size is not None:  # nearest commutes with the per-pixel threshold below
                        im = im.resize((out_w, out_h), Image.NEAREST, box=box)
                    else:
                        im.load()
                    masks[c] |= _decode_mask(im, threshold)
            except ValueError:  # ours, already one line naming the file
                raise
            except (OSError, SyntaxError, Image.DecompressionBombError) as e:
                raise _unreadable(path, e) from None
    return masks


def load_sample(sample, threshold=0):
    """Native-resolution (image uint8 (H, W, 3), masks bool (4, H, W))."""
    image = load_image(sample.image)
    return np.asarray(image), load_masks(sample, image.size, threshold)
