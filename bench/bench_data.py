"""Augmented training patches per second: from the prepared cache vs decoding the source for every
patch.

    python bench/bench_data.py                    # the real IDRiD sample if present, else synthetic
    python bench/bench_data.py --patch 512 --n 100
    python bench/bench_data.py --dataset DDR --data-root data_raw --resolution 1536 --n 200

Both paths draw the same items (same images, same random crop and augmentation: item i depends only
on (seed, i)); the decode path reads the source JPEG + mask files and preprocesses them (FOV crop,
resize, pad) for every patch, which is what training without the cache would do. Correctness
first: the two paths must give identical patches. Timings are medians of per-patch times, one
process, one core.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# run from anywhere: the repo root is importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402


def build_parser():
    """The patch size, how many patches each path times, and where the images come from."""
    parser = utils.Parser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=512,
                        help="patch size in pixels (default: %(default)s)")
    parser.add_argument("--n", type=int, default=100,
                        help="patches timed from the cache (default: %(default)s)")
    parser.add_argument("--n-decode", type=int, default=12,
                        help="patches timed with source decoding, the slow path "
                             "(default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=1536,
                        help="prepared resolution (default: %(default)s)")
    parser.add_argument("--dataset", default="IDR",
                        help="dataset ID with --data-root (default: %(default)s)")
    parser.add_argument("--data-root", default=None,
                        help="datasets folder (default: the real IDRiD sample in "
                             "tests/fixtures/idrid-4l14, else synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="patch seed (default: %(default)s)")
    return parser


utils.start(__name__, build_parser)  # --help before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import PatchDataset, PreparedDataset, prepare_cache  # noqa: E402
from data.datasets import dataset_root, list_samples  # noqa: E402
from data.prepare import preprocess_sample  # noqa: E402

# 14 real IDRiD photographs downscaled 4x (1072x712): decoding them costs about 1/16 of a full-size
# 4288x2848 JPEG, so the cache's advantage measured on them is a lower bound
# (tests/fixtures/idrid-4l14/README.md)
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "idrid-4l14"


def cpu_info():
    """The CPU's model, the cores this process may use, the GPU if any, torch's version."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"{model}, {cores} cores usable; {gpu} (this path runs on the CPU); "
            f"torch {torch.__version__}")


def source(args, tmp):
    """(dataset id, data_root, prepare options, description) of the images to benchmark."""
    if args.data_root:
        return args.dataset, args.data_root, {}, f"{args.dataset} from {args.data_root}"
    # the real IDRiD sample: training images only, so write a split with a test image
    if FIXTURE.is_dir():
        ids = [s.id for s in list_samples("IDR", FIXTURE)]
        split = Path(tmp) / "split.json"
        split.write_text(json.dumps({"train": ids[:-1], "test": ids[-1:]}))
        opts = {"roots": {"IDR": str(FIXTURE)}, "split_files": {"IDR": str(split)}}
        return "IDR", tmp, opts, (f"real IDRiD sample ({len(ids)} JPEGs 1072x712, downscaled 4x, "
                                  f"+ HE masks)")
    from data.synthetic import generate  # the fallback: full-size synthetic photographs

    generate(Path(tmp) / "synth", images=6, size=2848, seed=0, datasets=("IDR",))
    return "IDR", Path(tmp) / "synth", {}, ("synthetic IDR (6 images 4288x2848; real fixture not "
                                            "found)")


def per_patch_times(fn, items):
    """(wall seconds, CPU seconds) of each call: on a shared machine the CPU time is the per-core
    cost."""
    times = []
    for i in items:
        t, c = time.perf_counter(), time.process_time()
        fn(i)
        times.append((time.perf_counter() - t, time.process_time() - c))
    return np.array(times)  # (n, 2)


def main():
    args = build_parser().parse_args()
    torch.set_num_threads(1)  # one core: the figure is patches per second per core

    with tempfile.TemporaryDirectory() as tmp:
        dataset_id, data_root, opts, what = source(args, tmp)
        t = time.perf_counter()
        prepare_cache(dataset_id, data_root, Path(tmp) / "cache", args.resolution, verbose=False,
                      **opts)
        prep_s = time.perf_counter() - t
        ds = PreparedDataset(Path(tmp) / "cache", dataset_id, args.resolution, "all")
        patches = PatchDataset([ds], patch=args.patch, length=max(args.n, args.n_decode),
                               seed=args.seed)
        root = dataset_root(dataset_id, data_root, opts.get("roots"))
        samples = {s.id: s for s in list_samples(dataset_id, root)}  # id -> source files

        # the no-cache path: decode + preprocess the source image and its masks
        def decode(d, j):
            image, bits, _, _ = preprocess_sample(samples[ds.ids[j]], args.resolution)
            return image, bits

        print(f"device: {cpu_info()}")
        print(f"data: {what}, prepared at {args.resolution} px in {prep_s:.1f} s; {args.patch} px "
              f"patches, flips/rotation/scale/shift + HSV/brightness/contrast jitter")

        # Correctness first: both paths give the same patch for the same item.
        for i in range(3):
            a, b = patches[i], patches.sample(i, read=decode)
            if not all(torch.equal(a[k], b[k]) for k in a):
                sys.exit(f"error: patch {i} differs between the cache and source decoding")
        print("check: patches 0-2 identical from the cache and from source decoding")

        for i in range(3):  # warm-up (page cache, allocator)
            patches[i]
        cache = per_patch_times(lambda i: patches[i], range(args.n))
        slow = per_patch_times(lambda i: patches.sample(i, read=decode), range(args.n_decode))
    # per-patch medians: patches per second = 1 / the median time
    (wall_c, cpu_c), (wall_s, cpu_s) = np.median(cache, 0), np.median(slow, 0)
    print(f"{'':8}{'wall clock':>22}{'CPU time (1 core)':>24}   (medians of per-patch times)")
    print(f"{'cache':8}{1 / wall_c:12.1f} patches/s{1 / cpu_c:14.1f} patches/s   n={args.n}")
    print(f"{'decode':8}{1 / wall_s:12.1f} patches/s{1 / cpu_s:14.1f} patches/s   "
          f"n={args.n_decode}")
    print(f"{'ratio':8}{wall_s / wall_c:21.1f}x{cpu_s / cpu_c:23.1f}x   "
          f"(targets: cache >= 20x decode, >= 25 patches/s per core)")


if __name__ == "__main__":
    utils.run(main)
