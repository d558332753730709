"""Prepare a dataset once into a memory-mapped cache (crop to FOV, resize, pad), and read it back.

    python -m data.prepare --dataset IDR --data-root data_raw --out cache --resolution 1536
    python -m data.prepare --dataset all --data-root demo/data --out demo/cache --resolution 512
    python -m data.prepare --dataset FGA,MES --mask-threshold FGA=127 --splits MES=official --out cache

CACHE/<ID>/<resolution>/ holds images.npy uint8 (N, R, R, 3), masks.npy uint8 (N, R, R) with bits 0-3 =
EX, HE, MA, CWS and bit 4 = FOV, splits.json (split -> sorted ids) and meta.json (ids in row order,
per-image geometry and lesion statistics, options, and a fingerprint of the sources + options that makes
a re-run a no-op). It is written into a temporary folder and renamed into place, so an interrupted or
failed preparation never leaves a cache that looks complete. Concurrent preparations of the same cache
(make -j, several jobs on first use) take turns on a lock file CACHE/<ID>/.<resolution>.lock: the first
prepares, the others find it up to date.
"""
import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python data/prepare.py` as well as `python -m data.prepare`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import DATASET_IDS, LESIONS, parse_dataset_ids
from data.datasets import dataset_root, list_samples, load_image, load_masks, make_splits
from data.preprocess import fit_geometry, fov_box, fov_mask, pad_square, resize_image

CACHE_VERSION = 1  # bump when the cache format or the preprocessing changes
FOV_BIT = 4  # bits 0-3: LESIONS; bit 4: field of view


# ----------------------------------------------------------------------------- shared command-line flags

def add_data_args(parser):
    """The data flags shared by data.prepare, train.py, evaluate.py and characterize.py."""
    g = parser.add_argument_group("data")
    g.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data_raw"),
                   help="folder holding the datasets under their distributed names (IDRiD/, DDR-dataset/, "
                        "Seg-set/, retinal-lesions-v20191227/, MAPLES-DR/) (default: env DATA_ROOT or %(default)s)")
    g.add_argument("--cache", default="cache", help="prepared-data cache folder (default: %(default)s)")
    g.add_argument("--root", action="append", default=[], metavar="ID=DIR",
                   help="folder of one dataset, overrides --data-root and env <ID>_ROOT; repeatable (default: none)")
    g.add_argument("--mask-threshold", action="append", default=[], metavar="ID=T",
                   help="lesion where mask value > T for that dataset, e.g. FGA=127 drops anti-aliased edges, "
                        "RET=127 keeps only the 255 (guideline) labels; repeatable (default: 0 for all)")
    g.add_argument("--splits", action="append", default=[], metavar="ID=FILE",
                   help="split of one dataset: a JSON file {train,val,test: [ids]}, 'official' or 'seeded'; "
                        "repeatable (default: official for IDR and DDR, seeded 30%% test for FGA, RET, MES)")
    g.add_argument("--ret-he", choices=("retinal", "all"), default="retinal",
                   help="Retinal-Lesions HE: retinal_hemorrhage only, or also preretinal + vitreous "
                        "(default: %(default)s)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the seeded splits (default: %(default)s)")
    return parser


def _pairs(values, flag):
    """['idr=/x', 'FGA=3'] -> {'IDR': '/x', 'FGA': '3'}; ValueError naming the flag."""
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not val or not key.strip():
            raise ValueError(f"{flag} expects ID=VALUE, got {v!r}")
        try:
            (key,) = parse_dataset_ids(key)
        except ValueError as e:
            raise ValueError(f"{flag} {v}: {e}") from None
        out[key] = val
    return out


def data_options(args):
    """Keyword arguments of prepare_cache from the add_data_args flags."""
    thresholds = {}
    for k, v in _pairs(args.mask_threshold, "--mask-threshold").items():
        if not v.isdigit() or int(v) > 254:
            raise ValueError(f"--mask-threshold {k}={v}: the threshold must be an integer in 0..254")
        thresholds[k] = int(v)
    return {"roots": _pairs(args.root, "--root"), "thresholds": thresholds,
            "split_files": _pairs(args.splits, "--splits"), "ret_he": args.ret_he, "split_seed": args.split_seed}


# The flags above that decide which images are read and how they are split.
DATA_FLAGS = ("data_root", "cache", "root", "mask_threshold", "splits", "ret_he", "split_seed")


def data_settings(args, parser, recorded):
    """(data_root, cache, prepare_cache options): a data flag given on this command line wins, else the
    training run's recorded value (its checkpoint's "args"), else the default.

    NOTE: split flags decide which images are validation and test; reading a run's data with other split
    options would re-split the cache and could score on images the run trained on.
    """
    merged = argparse.Namespace(**vars(args))
    for key in DATA_FLAGS:
        if getattr(args, key) == parser.get_default(key) and recorded.get(key) is not None:
            setattr(merged, key, recorded[key])
    return merged.data_root, merged.cache, data_options(merged)


# ----------------------------------------------------------------------------- preparation

def preprocess_sample(sample, resolution, threshold=0):
    """Decode + preprocess one sample: (image uint8 (R, R, 3), bitmask uint8 (R, R), geometry, stats)."""
    image = load_image(sample.image)
    box, t = fov_box(image)
    geometry = fit_geometry(image.width, image.height, box, resolution, t)
    out = resize_image(image, geometry)  # (R, R, 3)
    fov = fov_mask(out, geometry)  # (R, R)
    masks = load_masks(sample, image.size, threshold, box=tuple(box), size=tuple(geometry["size"]))  # (4, h, w)
    bits = np.zeros(masks.shape[1:], np.uint8)
    for c in range(len(LESIONS)):
        bits |= masks[c].astype(np.uint8) << c
    bits = pad_square(bits, geometry)
    bits |= fov.astype(np.uint8) << FOV_BIT
    stats = {"lesion_pixels": [int(m.sum()) for m in masks], "fov_pixels": int(fov.sum())}
    return out, bits, geometry, stats


def _split_key(split_file):
    """None / "official" / "seeded" as is; a split file by the hash of its content (its name when unreadable)."""
    if split_file not in (None, "official", "seeded") and Path(split_file).is_file():
        return hashlib.sha256(Path(split_file).read_bytes()).hexdigest()
    return split_file


def _options(threshold, ret_he, split_file, split_seed):
    """The options recorded in meta.json: everything besides the source files that changes the cache."""
    return {"mask_threshold": threshold, "ret_he": ret_he, "splits": split_file or "default",
            "split_key": _split_key(split_file), "split_seed": split_seed}


def _fingerprint(dataset_id, root, samples, resolution, threshold, ret_he, split_file, split_seed):
    """Hash of the source files (path, size, mtime) and of every option that changes the cache."""
    files = []
    for s in samples:
        for p in (s.image, *[f for les in LESIONS for f in s.masks.get(les, ())]):
            st = p.stat()
            files.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    key = {"version": CACHE_VERSION, "dataset": dataset_id, "resolution": resolution, "threshold": threshold,
           "ret_he": ret_he if dataset_id == "RET" else None, "split": _split_key(split_file),
           "split_seed": split_seed, "files": files}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _option_changes(dataset_id, recorded, requested):
    """['--mask-threshold FGA=127 (cache: 0)', ...]: the requested options that differ from a cache's."""
    flags = {"mask_threshold": f"--mask-threshold {dataset_id}=", "splits": f"--splits {dataset_id}=",
             "split_seed": "--split-seed ", "ret_he": "--ret-he "}
    changes = [f"{flag}{requested[k]} (cache: {recorded[k]})" for k, flag in flags.items()
               if k in recorded and recorded[k] != requested[k] and (k != "ret_he" or dataset_id == "RET")]
    # NOTE: caches of older versions record no "split_key"
    if not changes and recorded.get("split_key", requested["split_key"]) != requested["split_key"]:
        changes.append(f"--splits {dataset_id}={requested['splits']} (the file's content changed)")
    return changes


@contextlib.contextmanager
def _locked(path, waiting=None):
    """Hold an exclusive flock on the file `path` (created on demand) for the block; the file is removed on
    release, while still held, so a waiter that wakes on a removed file retries on the new one.
    waiting: note printed when another process holds the lock."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder vanished (a failed preparation tidied up): try again
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    print(waiting, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:  # removed by the holder that just released it
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_leftovers(parent, resolution):
    """Folders of earlier interrupted preparations of this resolution (each as big as the cache): the
    .tmp-<R>-<pid>-* of processes no longer running and every .old-<R>-*. Call with the lock held."""
    for p in parent.glob(f".tmp-{resolution}-*"):
        pid = p.name.split("-")[2]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".old-{resolution}-*"):
        shutil.rmtree(p, ignore_errors=True)


def prepare_cache(dataset_id, data_root, cache_dir, resolution, roots=None, thresholds=None, split_files=None,
                  ret_he="retinal", split_seed=0, workers=None, verbose=True):
    """Prepare CACHE/<ID>/<resolution> on first use; a no-op when sources and options are unchanged."""
    ids = parse_dataset_ids(dataset_id)
    if len(ids) != 1:
        raise ValueError(f"prepare_cache takes one dataset ID, got {dataset_id!r}")
    dataset_id = ids[0]
    resolution = int(resolution)
    if resolution < 16:
        raise ValueError(f"--resolution must be at least 16, got {resolution}")
    out = Path(cache_dir) / dataset_id / str(resolution)
    threshold = int((thresholds or {}).get(dataset_id, 0))
    split_file = (split_files or {}).get(dataset_id)
    try:
        root = dataset_root(dataset_id, data_root, roots)
    except FileNotFoundError:
        if (out / "meta.json").is_file():  # sources gone but a complete cache remains: use it if it fits
            recorded = json.loads((out / "meta.json").read_text()).get("options", {})
            changes = _option_changes(dataset_id, recorded,
                                      _options(threshold, ret_he, split_file, split_seed))
            if changes:
                raise FileNotFoundError(
                    f"{dataset_id} sources not found and the existing cache {out} was prepared with other options "
                    f"({'; '.join(changes)}): restore the sources or pass the cache's options") from None
            if verbose:
                print(f"note: {dataset_id} sources not found, using the existing cache {out}")
            return out
        raise
    samples = list_samples(dataset_id, root, ret_he)
    splits = make_splits(samples, dataset_id, split_seed, split_file)
    fingerprint = _fingerprint(dataset_id, root, samples, resolution, threshold, ret_he, split_file, split_seed)
    meta = _read_meta(out)
    if meta and meta.get("fingerprint") == fingerprint:  # the common case, without touching the lock
        if verbose:
            print(summary(out, meta, splits, note="up to date"))
        return out

    # Only the images of some split are cached (a user split file may name a subset), in sorted id order.
    keep = set(sum(splits.values(), []))
    samples = [s for s in samples if s.id in keep]
    created = [p for p in (Path(cache_dir), out.parent) if not p.exists()]
    try:
        waiting = f"note: {out} is being prepared by another process, waiting" if verbose else None
        with _locked(out.parent / f".{resolution}.lock", waiting):
            meta = _read_meta(out)
            if meta and meta.get("fingerprint") == fingerprint:  # another process prepared it while we waited
                if verbose:
                    print(summary(out, meta, splits, note="up to date: prepared by another process meanwhile"))
                return out
            _remove_leftovers(out.parent, resolution)
            meta = _build(out, dataset_id, root, samples, splits, resolution, threshold, ret_he, split_file,
                          split_seed, fingerprint, workers)
    except BaseException:
        for p in reversed(created):  # folders this call created, when left empty
            with contextlib.suppress(OSError):  # not empty (another process uses it) or already gone
                p.rmdir()
        raise
    if verbose:
        print(summary(out, meta, splits, note=f"prepared {len(samples)} images in {meta['seconds']} s"))
    return out


def _read_meta(out):
    """out/meta.json as a dict, None when there is no complete cache."""
    try:
        return json.loads((out / "meta.json").read_text())
    except FileNotFoundError:
        return None


def _build(out, dataset_id, root, samples, splits, resolution, threshold, ret_he, split_file, split_seed,
           fingerprint, workers):
    """Write the cache into a temporary folder, then rename it into place -> meta. Call with the lock held."""
    tmp = out.parent / f".tmp-{resolution}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.time()
    try:
        R, N = resolution, len(samples)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (N, R, R, 3))
        bitmasks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (N, R, R))

        def one(k):
            images[k], bitmasks[k], geometry, stats = preprocess_sample(samples[k], R, threshold)
            return geometry, stats

        # Threads: PIL decoding/resizing and numpy release the GIL; each row is written by one thread.
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(one, k) for k in range(N)]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        images.flush(), bitmasks.flush()
        del images, bitmasks
        meta = {"version": CACHE_VERSION, "dataset": dataset_id, "resolution": R, "root": str(root),
                "lesions": list(LESIONS), "bits": {**{les: c for c, les in enumerate(LESIONS)}, "FOV": FOV_BIT},
                "ids": [s.id for s in samples], "geometry": [g for g, _ in results],
                "lesion_pixels": [st["lesion_pixels"] for _, st in results],
                "fov_pixels": [st["fov_pixels"] for _, st in results],
                "options": _options(threshold, ret_he, split_file, split_seed),
                "fingerprint": fingerprint, "seconds": round(time.time() - start, 1)}
        (tmp / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")  # written last: marks the folder complete
        old = out.parent / f".old-{resolution}-{uuid.uuid4().hex[:8]}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def summary(out, meta, splits, note=""):
    """Images per split and lesion prevalence: images with the lesion and its share of FOV pixels."""
    row = {x: k for k, x in enumerate(meta["ids"])}
    lines = [f"{meta['dataset']} @ {meta['resolution']} px -> {out} ({note})",
             f"  {'split':<6}{'images':>7}" + "".join(f"{les:>15}" for les in LESIONS)]
    for name in ("train", "val", "test"):
        rows = [row[x] for x in splits[name]]
        pix = np.array([meta["lesion_pixels"][r] for r in rows], dtype=np.int64).reshape(-1, len(LESIONS))
        fov = max(1, sum(meta["fov_pixels"][r] for r in rows))
        cells = [f"{int((pix[:, c] > 0).sum()):>7} {100 * pix[:, c].sum() / fov:6.2f}%" for c in range(len(LESIONS))]
        lines.append(f"  {name:<6}{len(rows):>7}" + "".join(cells))
    lines.append("  (per lesion: images containing it, lesion pixels as % of FOV pixels)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reading back

class PreparedDataset:
    """One split of a prepared cache: ds[i] -> {"id", "image" (R, R, 3) uint8, "masks" (4, R, R) bool, "fov"}.

    split: "train", "val", "test" or "all". Arrays are memory-mapped lazily, per process (DataLoader workers
    re-open them instead of pickling them); each (re)opening checks that the cache still has the fingerprint
    read here, since a job with other data options re-prepares the same folder in place.
    """

    def __init__(self, cache_dir, dataset_id, resolution, split):
        self.dataset_id, self.resolution, self.split = dataset_id, int(resolution), split
        self.dir = Path(cache_dir) / dataset_id / str(int(resolution))
        if not (self.dir / "meta.json").is_file():
            raise FileNotFoundError(
                f"no prepared {dataset_id} cache at {self.dir} (run: python -m data.prepare --dataset {dataset_id} "
                f"--out {cache_dir} --resolution {resolution})")
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.fingerprint = self.meta.get("fingerprint")
        splits = json.loads((self.dir / "splits.json").read_text())
        self._check_fingerprint()  # meta.json and splits.json come from the same preparation
        if split != "all" and split not in splits:
            raise ValueError(f"unknown split {split!r} (choose from train, val, test, all)")
        self.ids = list(self.meta["ids"]) if split == "all" else list(splits[split])
        row = {x: k for k, x in enumerate(self.meta["ids"])}
        self.rows = [row[x] for x in self.ids]
        self._arrays = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def arrays(self):
        """(images (N, R, R, 3), bitmasks (N, R, R)) memory maps over all cached rows."""
        if self._arrays is None:
            try:
                arrays = (np.load(self.dir / "images.npy", mmap_mode="r"),
                          np.load(self.dir / "masks.npy", mmap_mode="r"))
            except FileNotFoundError:
                arrays = None  # mid-swap, or removed: reported below
            # NOTE: checked after opening: maps opened before a swap keep the old files, which match self.ids
            self._check_fingerprint()
            if arrays is None:
                raise FileNotFoundError(f"{self.dir} lost its arrays while in use (removed?); rerun")
            self._arrays = arrays
        return self._arrays

    def _check_fingerprint(self):
        meta = _read_meta(self.dir)
        if meta is None:
            raise FileNotFoundError(f"{self.dir} was removed or is being re-prepared while in use; rerun")
        if meta.get("fingerprint") != self.fingerprint:
            was, now = self.meta.get("options", {}), meta.get("options", {})
            what = [f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now))
                    if k != "split_key" and was.get(k) != now.get(k)]
            if not what and was.get("split_key") != now.get("split_key"):
                what = ["split file content changed"]
            what = ", ".join(what) or "source files changed"
            raise ValueError(f"{self.dir} was re-prepared with other options while in use ({what}); rerun")

    def read(self, i):
        """Lazy views (image (R, R, 3), bitmask (R, R)) of item i: slicing them reads only that window."""
        images, bitmasks = self.arrays()
        return images[self.rows[i]], bitmasks[self.rows[i]]

    def geometry(self, i):
        return self.meta["geometry"][self.rows[i]]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        image, bits = self.read(i)
        bits = np.asarray(bits)
        masks = (bits[None] >> np.arange(len(LESIONS), dtype=np.uint8)[:, None, None]) & 1  # (4, R, R)
        return {"id": self.ids[i], "image": np.array(image), "masks": masks.astype(bool),
                "fov": (bits >> FOV_BIT & 1).astype(bool)}


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True,
                        help="dataset ID(s), comma-separated, or 'all' (IDs: " + ", ".join(DATASET_IDS) + ")")
    parser.add_argument("--out", default=None, help="cache folder (default: the value of --cache)")
    parser.add_argument("--resolution", type=int, default=1536,
                        help="side of the square prepared images (default: %(default)s, the paper's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (default: min(8, CPU count))")
    add_data_args(parser)
    args = parser.parse_args(argv)
    ids = DATASET_IDS if args.dataset.strip().lower() == "all" else parse_dataset_ids(args.dataset)
    for dataset_id in ids:
        prepare_cache(dataset_id, args.data_root, args.out or args.cache, args.resolution,
                      workers=args.workers, **data_options(args))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
