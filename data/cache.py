r"""Read a prepared cache back: PreparedDataset, one split of CACHE/<ID>/<R>/, memory-mapped.

    python -c "from data.cache import PreparedDataset; \
        ds = PreparedDataset('cache', 'IDR', 1536, 'test'); print(len(ds), ds[0]['image'].shape)"

The folder (written by data/prepare.py) holds images.npy uint8 (N, R, R, 3), masks.npy uint8
(N, R, R) with bits 0-3 = EX, HE, MA, CWS and bit 4 = FOV, splits.json and meta.json (ids in row
order, geometry, options, fingerprint, the arrays' sizes in bytes). A missing, truncated or garbled
file is one line naming it and the command that prepares the cache again.
"""
import json
from pathlib import Path

import numpy as np

from data.ids import LESIONS

CACHE_VERSION = 1  # bump when the cache format or the preprocessing changes
FOV_BIT = 4  # bits 0-3: LESIONS; bit 4: field of view
ARRAYS = ("images.npy", "masks.npy")
SPLITS = ("train", "val", "test")


def prepare_command(folder):
    """The command that prepares CACHE/<ID>/<R> again (the user adds the --data-root they used)."""
    folder = Path(folder)
    return (f"python -m data.prepare --dataset {folder.parent.name} --cache {folder.parent.parent} "
            f"--resolution {folder.name} --data-root DIR")


def _corrupt(path, why):
    """The one-line error for a damaged cache file: what is wrong, and how to prepare it again."""
    return ValueError(f"{path} is {why}: prepare the cache again (delete {path.parent}, then run: "
                      f"{prepare_command(path.parent)})")


def _read_json(path):
    """A cache JSON file as a dict; FileNotFoundError when absent, ValueError (one line) when
    garbled."""
    try:
        out = json.loads(path.read_text())
    except FileNotFoundError:  # the caller decides: no cache yet, or a missing file
        raise
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise _corrupt(path, f"not valid JSON ({' '.join(str(e).split())[:80]})") from None
    if not isinstance(out, dict):
        raise _corrupt(path, "not a JSON object")
    return out


def read_meta(folder):
    """folder/meta.json as a dict, None when there is no complete cache; ValueError when it is
    garbled."""
    try:
        meta = _read_json(Path(folder) / "meta.json")
    except FileNotFoundError:
        return None
    # meta.json is written last: these keys missing mean a damaged file, not an unfinished one
    if not all(k in meta for k in ("ids", "geometry", "fingerprint")):
        raise _corrupt(Path(folder) / "meta.json", "incomplete (no ids, geometry or fingerprint)")
    return meta


def read_splits(folder):
    """folder/splits.json: {"train", "val", "test"} -> ids (and "protocol"); ValueError when
    garbled."""
    path = Path(folder) / "splits.json"
    try:
        splits = _read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {prepare_command(path.parent)}") from None
    if not all(isinstance(splits.get(k), list) for k in SPLITS):
        raise _corrupt(path, "missing a train, val or test list")
    return splits


def damaged_arrays(folder, meta):
    """Why the arrays of a cache do not match meta.json ('images.npy is 10 bytes, meta.json records
    99'), or None. Caches prepared before meta.json recorded the sizes are checked from the arrays'
    headers."""
    folder, R, N = Path(folder), int(meta.get("resolution", 0)), len(meta["ids"])
    shapes = {"images.npy": (N, R, R, 3), "masks.npy": (N, R, R)}  # what meta.json describes
    for name in ARRAYS:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size, recorded = path.stat().st_size, meta.get("bytes", {}).get(name)
        # the size check is instant; reading a header is not needed when the size is recorded
        if recorded is not None and size != recorded:
            return f"{name} is {size} bytes, meta.json records {recorded}"
        if recorded is None:  # an older cache: open the array to read its header
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                return f"{name} is unreadable ({' '.join(str(e).split())[:80]})"
            if arr.shape != shapes[name] or arr.dtype != np.uint8:
                return (f"{name} holds {arr.dtype} {arr.shape}, meta.json describes uint8 "
                        f"{shapes[name]}")
    return None


class PreparedDataset:
    """One split of a prepared cache:
    ds[i] -> {"id", "image" (R, R, 3) uint8, "masks" (4, R, R) bool, "fov" (R, R) bool}.

    split: "train", "val", "test" or "all". Arrays are memory-mapped lazily, per process (DataLoader
    workers re-open them instead of pickling them); each (re)opening checks that the cache still has
    the fingerprint read here, since a job with other data options re-prepares the same folder in
    place.
    """

    def __init__(self, cache_dir, dataset_id, resolution, split):
        self.dataset_id, self.resolution, self.split = dataset_id, int(resolution), split
        self.dir = Path(cache_dir) / dataset_id / str(int(resolution))
        meta = read_meta(self.dir)
        if meta is None:  # no meta.json: never prepared, or a preparation that did not finish
            raise FileNotFoundError(
                f"no prepared {dataset_id} cache at {self.dir} (run: python -m data.prepare "
                f"--dataset {dataset_id} --cache {cache_dir} --resolution {resolution})")
        self.meta = meta
        self.fingerprint = self.meta.get("fingerprint")
        splits = read_splits(self.dir)
        self._check_fingerprint()  # meta.json and splits.json come from the same preparation
        if split != "all" and split not in SPLITS:  # "all": every cached row, in row order
            raise ValueError(f"unknown split {split!r} (choose from train, val, test, all)")
        self.ids = list(self.meta["ids"]) if split == "all" else list(splits[split])
        row = {x: k for k, x in enumerate(self.meta["ids"])}  # id -> row of the arrays
        unknown = [x for x in self.ids if x not in row]
        if unknown:
            raise _corrupt(self.dir / "splits.json",
                           f"naming images the cache lacks ({unknown[0]!r})")
        self.rows = [row[x] for x in self.ids]
        self._arrays = None

    def __getstate__(self):
        # NOTE: pickled (DataLoader workers) without its memory maps: each process opens its own
        return {**self.__dict__, "_arrays": None}

    def arrays(self):
        """(images (N, R, R, 3), bitmasks (N, R, R)) memory maps over all cached rows."""
        if self._arrays is None:
            present = all((self.dir / a).is_file() for a in ARRAYS)
            damage = damaged_arrays(self.dir, self.meta) if present else None
            # truncated or replaced: np.load would fail with a bare mmap error, or read garbage
            if damage:
                # re-prepared meanwhile with other options: say that instead
                self._check_fingerprint()
                raise _corrupt(self.dir / damage.split()[0], f"damaged ({damage})")
            try:
                arrays = tuple(np.load(self.dir / name, mmap_mode="r") for name in ARRAYS)
            except FileNotFoundError:
                arrays = None  # mid-swap, or removed: reported below
            except (OSError, ValueError, EOFError) as e:
                why = " ".join(str(e).split())[:80]
                raise _corrupt(self.dir / "images.npy", f"unreadable ({why})") from None
            # NOTE: checked after opening: maps opened before a swap keep the old files, which match
            # self.ids
            self._check_fingerprint()
            if arrays is None:
                raise FileNotFoundError(f"{self.dir} lost its arrays while in use (removed?); "
                                        "rerun")
            self._arrays = arrays
        return self._arrays

    def _check_fingerprint(self):
        """ValueError naming what changed if the cache was re-prepared since this object read it."""
        meta = read_meta(self.dir)
        if meta is None:
            raise FileNotFoundError(f"{self.dir} was removed or is being re-prepared while in use; "
                                    "rerun")
        if meta.get("fingerprint") != self.fingerprint:
            # name the options that differ; split_key is a hash, said in words below
            was, now = self.meta.get("options", {}), meta.get("options", {})
            what = [f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now))
                    if k != "split_key" and was.get(k) != now.get(k)]
            if not what and was.get("split_key") != now.get("split_key"):
                what = ["split file content changed"]
            what = ", ".join(what) or "source files changed"
            raise ValueError(f"{self.dir} was re-prepared with other options while in use "
                             f"({what}); rerun")

    def read(self, i):
        """Lazy views (image (R, R, 3), bitmask (R, R)) of item i: slicing them reads only that
        window."""
        images, bitmasks = self.arrays()
        return images[self.rows[i]], bitmasks[self.rows[i]]

    def geometry(self, i):
        """Item i's preprocessing geometry (data.preprocess: crop box, scale, padding)."""
        return self.meta["geometry"][self.rows[i]]

    def annotated(self, i):
        """bool (4,): the lesions annotated in item i's image (the others are not its negatives:
        left out of the loss and the scores). Caches without the record annotate all four."""
        names = (self.meta.get("annotated") or [LESIONS] * len(self.meta["ids"]))[self.rows[i]]
        return np.array([les in names for les in LESIONS])

    def annotates(self, lesion):
        """Is `lesion` annotated in every image of this split (a test set's scores count it)?"""
        return all(self.annotated(i)[LESIONS.index(lesion)] for i in range(len(self)))

    def __len__(self):  # the split's images
        return len(self.ids)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        image, bits = self.read(i)
        bits = np.asarray(bits)  # (R, R) uint8, read from the memory map
        # bit k of the mask byte is lesion k: unpack to (4, R, R)
        masks = (bits[None] >> np.arange(len(LESIONS), dtype=np.uint8)[:, None, None]) & 1
        return {"id": self.ids[i], "image": np.array(image), "masks": masks.astype(bool),
                "fov": (bits >> FOV_BIT & 1).astype(bool), "annotated": self.annotated(i)}
