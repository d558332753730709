"""Shared fixtures: a small synthetic copy of the five datasets, prepared once per test session."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU in tests
# Fourteen real IDRiD photographs, downscaled 4x, with their HE masks (tests/fixtures/idrid-he14/README.md)
FIXTURE_IDRID = ROOT / "tests" / "fixtures" / "idrid-he14"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test, run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole suite: CPU results stay deterministic, and on 2 shared cores
    torch's OpenMP threads spin against other processes (tiny steps measured 5-30x slower with two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixture_idrid():
    """Root of the real IDRiD sample in the repository (14 images 1072x712 with HE masks)."""
    # NOTE: part of the repository, never skipped: a missing fixture is a broken checkout, so it fails
    if not (FIXTURE_IDRID / "A. Segmentation").is_dir():
        raise FileNotFoundError(f"real IDRiD fixture missing: {FIXTURE_IDRID} (restore tests/fixtures/ from git)")
    return FIXTURE_IDRID


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """All five datasets in their distributed layouts: 12 images each, 192 px."""
    from data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, images=12, size=192, seed=0)
    return out


@pytest.fixture(scope="session")
def cache_dir(synth_root, tmp_path_factory):
    """The synthetic datasets prepared at resolution 128 (all five)."""
    from data import DATASET_IDS, prepare_cache

    cache = tmp_path_factory.mktemp("cache")
    for ds in DATASET_IDS:
        prepare_cache(ds, synth_root, cache, 128)
    return cache


def tiny_runs(synth_root, base):
    """Train two seeds of IDR+MES at 64 px (4 steps, snapshots every 2) under base -> (runs folder, cache)."""
    import train

    cache, runs_dir = base / "cache", base / "runs"
    for seed in (0, 1):
        train.run(train.parse_args([
            "--train", "IDR,MES", "--seed", str(seed), "--out", str(runs_dir / "IDR+MES" / f"s{seed}"),
            "--data-root", str(synth_root), "--cache", str(cache), "--encoder", "test_resnet", "--no-pretrained",
            "--decoder-channels", "16,8,8,8,8", "--resolution", "64", "--patch", "64", "--batch", "2",
            "--iters", "4", "--val-every", "2", "--snapshot-every", "2", "--warmup", "1", "--lr", "1e-2",
            "--device", "cpu", "--dtype", "float32", "--workers", "0"]))
    return runs_dir, cache


# ----------------------------------------------------------------------------- TA: data/ helpers
# Shared by test_datasets.py, test_splits.py, test_prepare.py, test_cache.py and test_patches.py.

@pytest.fixture(scope="session")
def dataset_folders():
    """Each dataset's folder under --data-root as distributed, spelled out here (not read from
    data.ids)."""
    return {"IDR": "IDRiD", "DDR": "DDR-dataset", "FGA": "Seg-set",
            "RET": "retinal-lesions-v20191227", "MES": "MAPLES-DR"}


@pytest.fixture(scope="session")
def no_cache_left():
    """check(cache): nothing was left in (or as) the cache folder."""
    def check(cache):
        leftovers = list(cache.rglob("*")) if cache.exists() else []
        assert leftovers == [], f"left behind: {leftovers}"
    return check


@pytest.fixture(scope="session")
def nearest_reference():
    """reference(mask (..., H, W), geometry) -> (..., R, R) bool: nearest-neighbour resize of a
    native mask onto the padded square, written out in numpy."""
    import numpy as np

    def reference(mask, geo):
        x0, y0, x1, y1 = geo["box"]
        (w, h), (left, top), R = geo["size"], geo["pad"], geo["resolution"]
        ys = y0 + np.floor((np.arange(h) + 0.5) * (y1 - y0) / h).astype(int)
        xs = x0 + np.floor((np.arange(w) + 0.5) * (x1 - x0) / w).astype(int)
        out = np.zeros(mask.shape[:-2] + (R, R), bool)
        out[..., top:top + h, left:left + w] = mask[..., ys[:, None], xs[None, :]]
        return out
    return reference


@pytest.fixture(scope="session")
def nntools_split():
    """split(items, lengths): nntools.dataset.utils.ops.random_split (the authors' split), written
    out: randperm with a fresh seed-42 generator, then consecutive slices of the permutation, each
    part in permuted order."""
    import torch

    def split(items, lengths):
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(42)).tolist()
        parts, offset = [], 0
        for n in lengths:
            parts.append([items[k] for k in perm[offset:offset + n]])
            offset += n
        return parts
    return split


@pytest.fixture()
def small_cache(synth_root, tmp_path):
    """(cache, cache/DDR/32): the synthetic DDR prepared at 32 px in a private cache (free to
    damage)."""
    from data.prepare import prepare_cache

    cache = tmp_path / "cache"
    prepare_cache("DDR", synth_root, cache, 32, verbose=False)
    return cache, cache / "DDR" / "32"
