r"""Prepare a dataset once into a memory-mapped cache (crop to FOV, resize, pad); data/cache.py
reads it back.

    python -m data.prepare --dataset IDR --data-root data_raw --cache cache --resolution 1536
    python -m data.prepare --dataset all --data-root demo/data --cache demo/cache --resolution 512
    python -m data.prepare --dataset FGA,MES --mask-threshold FGA=127 --splits MES=official \
        --cache cache
    python -m data.prepare --dataset FGA RET --split-protocol authors --cache cache

CACHE/<ID>/<resolution>/ holds images.npy uint8 (N, R, R, 3), masks.npy uint8 (N, R, R) with bits
0-3 = EX, HE, MA, CWS and bit 4 = FOV, splits.json (the split protocol, split -> sorted ids) and
meta.json (ids in row order, per-image geometry and lesion statistics, options, the arrays' sizes,
and a fingerprint of the sources + options that makes a re-run a no-op). It is written into a
temporary folder and renamed into place, so an interrupted or failed preparation never leaves a
cache that looks complete, and the temporary folder is removed on any failure. Free space is
checked first and reserved before the memory-mapped writes (a full disk under a memory map is a
SIGBUS, not an error). A cache whose files no longer match meta.json (truncated, garbled) is
prepared again. Concurrent preparations of the same cache (make -j, several jobs on first use) take
turns on a lock file CACHE/<ID>/.<resolution>.lock: the first prepares, the others find it up to
date. More in docs/DATA.md, "The prepared cache".
"""
import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # `python data/prepare.py` as well as `python -m data.prepare`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils
from data.flags import add_data_args, add_dataset_list, data_options
from data import generic
from data.ids import LESIONS, is_own, parse_dataset_ids


def build_parser():
    """The command line: the datasets, the resolution, the decoding threads and the data flags."""
    # NOTE: prog: run as `python -m data.prepare`, argparse would call itself prepare.py (a file one
    # can't run as is)
    parser = utils.Parser(prog="python -m data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_list(parser, "--dataset", "datasets to prepare", required=True)
    parser.add_argument("--resolution", type=int, default=1536,
                        help="side of the square prepared images "
                             "(default: %(default)s, the paper's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (default: min(8, CPU count))")
    # NOTE: --out was this script's name for --cache (the one the other scripts use); kept, hidden,
    # for old commands
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    add_data_args(parser)  # --cache among them
    return parser


utils.start(__name__, build_parser)  # --help before numpy loads; a Ctrl-C while it loads: one line

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.cache import (ARRAYS, CACHE_VERSION, FOV_BIT, damaged_arrays, read_meta,  # noqa: E402
                        read_splits)
from data.check import check_command, empty_lesion, first_error, structure  # noqa: E402
from data.datasets import annotated, dataset_root, load_image, load_masks  # noqa: E402
from data.preprocess import fit_geometry, fov_box, fov_mask, pad_square, resize_image  # noqa: E402

# free space needed: arrays x 1.02 + 64 MiB (JSON files, file system slack)
SPACE_MARGIN = 1.02, 64 << 20


# ----------------------------------------------------------------------------- preparation

def preprocess_sample(sample, resolution, threshold=0):
    """Decode + preprocess one sample (paper section 2.2):
    (image uint8 (R, R, 3), bitmask uint8 (R, R), geometry, stats)."""
    image = load_image(sample.image)
    box, t = fov_box(image)
    geometry = fit_geometry(image.width, image.height, box, resolution, t)
    out = resize_image(image, geometry)  # (R, R, 3)
    fov = fov_mask(out, geometry)  # (R, R)
    # NOTE: a black or blank photograph: training never samples it, evaluation scores nothing
    if not fov.any():
        print(f"warning: {sample.image}: no field of view found (black or blank image?); it has no "
              f"pixel to train on or to score", file=sys.stderr, flush=True)
    # the masks are cropped and resized while decoding, to the content size (w, h) before padding
    masks = load_masks(sample, image.size, threshold, box=tuple(box),
                       size=tuple(geometry["size"]))  # (4, h, w)
    bits = np.zeros(masks.shape[1:], np.uint8)
    for c in range(len(LESIONS)):  # lesion c -> bit c of one byte per pixel
        bits |= masks[c].astype(np.uint8) << c
    bits = pad_square(bits, geometry)  # (R, R)
    inside = bits[fov]  # (FOV pixels,): the lesion bits where the lesions are counted
    bits |= fov.astype(np.uint8) << FOV_BIT
    stats = {"lesion_pixels": [int(m.sum()) for m in masks], "fov_pixels": int(fov.sum()),
             "lesion_fov_pixels": [int((inside >> c & 1).sum()) for c in range(len(LESIONS))]}
    return out, bits, geometry, stats


def _split_key(split_file):
    """None / "official" / "seeded" as is; a split file by the hash of its content (its name when
    unreadable)."""
    if split_file not in (None, "official", "seeded") and Path(split_file).is_file():
        return hashlib.sha256(Path(split_file).read_bytes()).hexdigest()
    return split_file


def _options(threshold, ret_he, split_file, split_seed, split_protocol):
    """The options recorded in meta.json: everything besides the source files that changes the
    cache."""
    return {"mask_threshold": threshold, "ret_he": ret_he, "splits": split_file or "default",
            "split_key": _split_key(split_file), "split_seed": split_seed,
            "split_protocol": split_protocol}


def _fingerprint(dataset_id, root, samples, resolution, options):
    """Hash of the source files (path, size, mtime) and of every option that changes the cache."""
    files = []
    for s in samples:
        for p in (s.image, *[f for les in LESIONS for f in s.masks.get(les, ())]):
            st = p.stat()  # size and mtime stand for the content: hashing it would cost a read
            files.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    key = {"version": CACHE_VERSION, "dataset": dataset_id, "resolution": resolution,
           "threshold": options["mask_threshold"],
           "ret_he": options["ret_he"] if dataset_id == "RET" else None,
           "split": options["split_key"], "split_seed": options["split_seed"], "files": files}
    # NOTE: only where some lesion is not annotated (meta.json's "annotated" is new): the caches of
    # fully annotated datasets, prepared before, stay valid
    if any(annotated(s) != LESIONS for s in samples):
        key["annotated"] = [annotated(s) for s in samples]
    # NOTE: the default protocol adds no key, so caches prepared before --split-protocol existed
    # stay valid; except RET's, whose paper split now keeps both eyes of a patient on the same side.
    if options["split_protocol"] != "paper":
        key["split_protocol"] = options["split_protocol"]
    elif dataset_id == "RET":
        key["split_by"] = "patient"
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _option_changes(dataset_id, recorded, requested):
    """['--mask-threshold FGA=127 (cache: 0)', ...]: the requested options that differ from a
    cache's."""
    flags = {"mask_threshold": f"--mask-threshold {dataset_id}=",
             "splits": f"--splits {dataset_id}=", "split_seed": "--split-seed ",
             "split_protocol": "--split-protocol ", "ret_he": "--ret-he "}
    # NOTE: caches prepared before --split-protocol existed used the paper protocol
    recorded = {"split_protocol": "paper", **recorded}
    # --ret-he matters to RET only
    changes = [f"{flag}{requested[k]} (cache: {recorded[k]})" for k, flag in flags.items()
               if k in recorded and recorded[k] != requested[k]
               and (k != "ret_he" or dataset_id == "RET")]
    # NOTE: caches of older versions record no "split_key"
    if not changes and recorded.get("split_key", requested["split_key"]) != requested["split_key"]:
        changes.append(f"--splits {dataset_id}={requested['splits']} (the file's content changed)")
    return changes


def _pid_alive(pid):
    """Is process `pid` running (signal 0 checks without sending anything)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_leftovers(parent, resolution):
    """Folders of earlier interrupted preparations of this resolution (each as big as the cache):
    the .tmp-<R>-<pid>-* of processes no longer running and every .old-<R>-*. Call with the lock
    held."""
    for p in parent.glob(f".tmp-{resolution}-*"):
        pid = p.name.split("-")[2]  # .tmp-<R>-<pid>-<uuid>
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".old-{resolution}-*"):
        shutil.rmtree(p, ignore_errors=True)


# NOTE: the split table is printed when a cache is prepared, and by `python -m data.prepare`; a
# cache found up to date otherwise says one line, once per process (the demo's log printed the same
# table 157 times: once per script and dataset).
_TABLE_SHOWN, _LINE_SAID = set(), set()  # the caches whose table / line this process printed


def _say_up_to_date(out, meta, splits, note="up to date"):
    """One line for a cache found up to date, the first time this process uses it."""
    if out in _TABLE_SHOWN or out in _LINE_SAID:
        return
    _LINE_SAID.add(out)
    counts = ", ".join(f"{len(splits[k])} {k}" for k in ("train", "val", "test"))
    print(f"{meta['dataset']} @ {meta['resolution']} px -> {out} ({note}: {counts} images; "
          f"its split table: python -m data.prepare --dataset {meta['dataset']})")


def prepare_cache(dataset_id, data_root, cache_dir, resolution, roots=None, thresholds=None,
                  split_files=None, ret_he="retinal", split_seed=0, split_protocol="paper",
                  workers=None, verbose=True):
    """Prepare CACHE/<ID>/<resolution> on first use; a no-op when sources and options are
    unchanged."""
    ids = parse_dataset_ids(dataset_id)
    if len(ids) != 1:
        raise ValueError(f"prepare_cache takes one dataset ID, got {dataset_id!r}")
    dataset_id = ids[0]
    resolution = int(resolution)
    if resolution < 16:
        raise ValueError(f"--resolution must be at least 16, got {resolution}")
    out = Path(cache_dir) / dataset_id / str(resolution)
    split_file = (split_files or {}).get(dataset_id)
    threshold = (thresholds or {}).get(dataset_id)
    try:
        root = dataset_root(dataset_id, data_root, roots)
    except FileNotFoundError:
        # sources gone but a complete cache remains: use it if it fits
        if (out / "meta.json").is_file():
            options = _options(int(threshold or 0), ret_he, split_file, split_seed, split_protocol)
            return _use_without_sources(out, dataset_id, options, verbose)
        raise
    if is_own(dataset_id):  # its dataset.json's threshold and splits.json, unless flags say others
        threshold, split_file = generic.own_options(root, threshold, split_file)
    options = _options(int(threshold or 0), ret_he, split_file and str(split_file), split_seed,
                       split_protocol)
    # the listing and the split checked as data.check does: the first problem stops here, with how
    # many more there are and the data.check command that lists them
    samples, splits, errors = structure(dataset_id, root, ret_he, split_file, split_seed,
                                        split_protocol)
    if errors:
        raise first_error(errors, dataset_id, root)
    fingerprint = _fingerprint(dataset_id, root, samples, resolution, options)
    if _up_to_date(out, fingerprint, verbose):  # the common case, without touching the lock
        if verbose:
            _say_up_to_date(out, read_meta(out), splits)
        return out

    # Only the images of some split are cached (a user split file may name a subset), in sorted id
    # order.
    keep = set(sum(splits.values(), []))
    samples = [s for s in samples if s.id in keep]
    meta = {"version": CACHE_VERSION, "dataset": dataset_id, "resolution": resolution,
            "root": str(root), "lesions": list(LESIONS),
            "bits": {**{les: c for c, les in enumerate(LESIONS)}, "FOV": FOV_BIT},
            "ids": [s.id for s in samples], "annotated": [annotated(s) for s in samples],
            "options": options, "fingerprint": fingerprint}
    created = [p for p in (Path(cache_dir), out.parent) if not p.exists()]  # removed on failure
    try:
        waiting = f"note: {out} is being prepared by another process, waiting" if verbose else None
        with utils.locked(out.parent / f".{resolution}.lock", waiting):
            if _up_to_date(out, fingerprint, False):  # another process prepared it while we waited
                if verbose:
                    _say_up_to_date(out, read_meta(out), splits,
                                    note="up to date: prepared by another process meanwhile")
                return out
            _remove_leftovers(out.parent, resolution)
            meta = _build(out, meta, samples, {"protocol": split_protocol, **splits}, workers,
                          verbose)
    except BaseException:
        for p in reversed(created):  # folders this call created, when left empty
            # not empty (another process uses it) or already gone
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    if verbose:
        print(summary(out, meta, splits,
                      note=f"prepared {len(samples)} images in {meta['seconds']} s"))
        _TABLE_SHOWN.add(out)
    for warning in _empty_lesions(meta):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return out


def _empty_lesions(meta):
    """data.check's warning for each lesion annotated in some image that no mask marks in any."""
    out = []
    for c, lesion in enumerate(LESIONS):
        images = sum(lesion in a for a in meta["annotated"])
        if images and not any(pixels[c] for pixels in meta["lesion_pixels"]):
            out.append(empty_lesion(meta["dataset"], lesion, images,
                                    meta["options"]["mask_threshold"]))
    return out


def _use_without_sources(out, dataset_id, options, verbose):
    """The sources are gone but a complete cache remains: use it when it was prepared with these
    options."""
    try:
        meta = read_meta(out)
    except ValueError as e:
        raise ValueError(f"{dataset_id} sources not found, and {e}") from None
    changes = _option_changes(dataset_id, meta.get("options", {}), options)
    if changes:
        raise FileNotFoundError(
            f"{dataset_id} sources not found and the existing cache {out} was prepared with other "
            f"options ({'; '.join(changes)}): restore the sources or pass the cache's options")
    if verbose:
        print(f"note: {dataset_id} sources not found, using the existing cache {out}")
    return out


def _up_to_date(out, fingerprint, verbose):
    """Whether out holds a complete, intact cache with this fingerprint. A garbled meta.json or
    splits.json, or arrays that do not match meta.json (truncated, replaced), mean: prepare again
    (with a note)."""
    try:
        meta = read_meta(out)
        if meta is None or meta.get("fingerprint") != fingerprint:
            return False
        damage = damaged_arrays(out, meta)
        if damage is None:
            json.loads((out / "splits.json").read_text())["test"]  # readable, with a test list
            return True
    except (OSError, ValueError, KeyError, TypeError) as e:
        damage = " ".join(str(e).split())
    if verbose:
        print(f"note: {out} is damaged ({damage}): preparing it again", flush=True)
    return False


def _check_free_space(folder, N, R):
    """ValueError naming the folder and the space needed when the disk cannot hold the arrays."""
    # 4 bytes a pixel: images (R, R, 3) + bitmask (R, R)
    need = int(N * R * R * 4 * SPACE_MARGIN[0]) + SPACE_MARGIN[1]
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"not enough free space in {folder}: the {N} images at {R} px need "
                         f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free (free some space or "
                         f"choose another --cache)")


def _reserve(path):
    """Allocate the whole file now: a full disk is then an error here instead of a SIGBUS in a
    mapped write."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        # EOPNOTSUPP / EINVAL: a file system without fallocate; the free-space check above has to
        # do
    finally:
        os.close(fd)


def _build(out, meta, samples, splits, workers, verbose=True):
    """Write the cache into a temporary folder, then rename it into place -> meta. Call with the
    lock held. verbose: a bar of images with an ETA on stderr (only where stderr is a terminal)."""
    R, N = meta["resolution"], len(samples)
    _check_free_space(out.parent, N, R)
    tmp = out.parent / f".tmp-{R}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.time()
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (N, R, R, 3))
        bitmasks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (N, R, R))
        for name in ARRAYS:
            _reserve(tmp / name)

        def one(k):  # row k of both arrays
            threshold = meta["options"]["mask_threshold"]
            try:
                images[k], bitmasks[k], geometry, stats = preprocess_sample(samples[k], R,
                                                                            threshold)
            except ValueError as e:  # a file's problem (size, corrupt, JPEG): maybe not the only
                raise ValueError(f"{e} ({check_command(meta['dataset'], meta['root'])} lists every "
                                 f"problem)") from None
            return geometry, stats

        # Threads: PIL decoding/resizing and numpy release the GIL; each row is written by one
        # thread.
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(one, k) for k in range(N)]
            try:
                # NOTE: disable=None hides the bar where stderr is no terminal (logs, make -j,
                # tests)
                with tqdm(futures, desc=f"{meta['dataset']} @ {R} px", unit="image",
                          disable=None if verbose else True) as bar:
                    results = [f.result() for f in bar]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        images.flush(), bitmasks.flush()
        del images, bitmasks  # closes the memory maps before the rename
        meta = {**meta, "geometry": [g for g, _ in results],
                **{key: [st[key] for _, st in results]
                   for key in ("lesion_pixels", "fov_pixels", "lesion_fov_pixels")},
                "bytes": {name: (tmp / name).stat().st_size for name in ARRAYS},
                "seconds": round(time.time() - start, 1)}
        (tmp / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
        # written last: marks the folder complete
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        # swap: the old cache moves aside first, so `out` is never a half-written folder
        old = out.parent / f".old-{R}-{uuid.uuid4().hex[:8]}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ValueError(f"no space left in {out.parent} while preparing {out} (the {N} images "
                             f"at {R} px need {(N * R * R * 4) / 1e9:.2f} GB; free some space or "
                             f"choose another --cache)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def summary(out, meta, splits, note=""):
    """Images per split and lesion prevalence: images with the lesion and its share of FOV
    pixels."""
    row = {x: k for k, x in enumerate(meta["ids"])}
    # NOTE: lesion pixels inside the FOV over FOV pixels, so a share is at most 100 % even when an
    # image has no FOV (a black photograph); caches prepared before "lesion_fov_pixels" existed
    # count all lesion pixels.
    lesion = meta.get("lesion_fov_pixels", meta["lesion_pixels"])
    annotations = meta.get("annotated") or [LESIONS] * len(meta["ids"])  # older caches: all four
    lines = [f"{meta['dataset']} @ {meta['resolution']} px -> {out} ({note})",
             f"  {'split':<6}{'images':>7}" + "".join(f"{les:>15}" for les in LESIONS)]
    for name in ("train", "val", "test"):
        rows = [row[x] for x in splits[name]]
        present = np.array([meta["lesion_pixels"][r] for r in rows],
                           dtype=np.int64).reshape(-1, len(LESIONS)) > 0  # (n, 4)
        pix = np.array([lesion[r] for r in rows], dtype=np.int64).reshape(-1, len(LESIONS))
        fov = sum(meta["fov_pixels"][r] for r in rows)
        shares = [f"{100 * pix[:, c].sum() / fov:6.2f}%" if fov else f"{'-':>7}"
                  for c in range(len(LESIONS))]
        # NOTE: a lesion no image of the split annotates has no count: it is not a zero
        noted = [any(les in annotations[r] for r in rows) or not rows for les in LESIONS]
        cells = [f"{int(present[:, c].sum()):>7} {shares[c]}" if noted[c]
                 else f"{'not annotated':>15}" for c in range(len(LESIONS))]
        lines.append(f"  {name:<6}{len(rows):>7}" + "".join(cells))
    lines.append("  (per lesion: images containing it, lesion pixels in the FOV as % of FOV "
                 "pixels)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is not None:  # the old name of --cache
        if args.cache != parser.get_default("cache") and args.cache != args.out:
            raise ValueError(f"--out {args.out} and --cache {args.cache} name two cache folders: "
                             f"pass only --cache")
        print(f"note: --out is deprecated, use --cache {args.out}", file=sys.stderr)
        args.cache = args.out
    for dataset_id in args.dataset:
        # asked for: the table, not the up-to-date line
        _LINE_SAID.add(Path(args.cache) / dataset_id / str(args.resolution))
        out = prepare_cache(dataset_id, args.data_root, args.cache, args.resolution,
                            workers=args.workers, **data_options(args))
        if out is not None and out not in _TABLE_SHOWN:  # up to date: its table all the same
            print(summary(out, read_meta(out), read_splits(out), note="up to date"))
            _TABLE_SHOWN.add(out)


if __name__ == "__main__":
    utils.run(main, interrupted="interrupted: the dataset in progress was not written (its "
                                "temporary folder is removed); rerun the same command")
