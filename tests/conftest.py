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


# ---- TC: tiny training runs, scripts in a fresh interpreter -------------------------------------
@pytest.fixture(scope="session")
def tiny_runs(synth_root):
    """tiny_runs(base) -> (runs folder, cache): two seeds of IDR+MES trained under `base` at 64 px
    (4 steps, snapshots every 2). Each module trains its own copy: fig4.py writes into it."""
    def train_two_seeds(base):
        import train

        cache, runs_dir = base / "cache", base / "runs"
        for seed in (0, 1):
            out = runs_dir / "IDR+MES" / f"s{seed}"
            train.run(train.parse_args([
                "--train", "IDR,MES", "--seed", str(seed), "--out", str(out),
                "--data-root", str(synth_root), "--cache", str(cache), "--encoder", "test_resnet",
                "--no-pretrained", "--decoder-channels", "16,8,8,8,8", "--resolution", "64",
                "--patch", "64", "--batch", "2", "--iters", "4", "--val-every", "2",
                "--snapshot-every", "2", "--warmup", "1", "--lr", "1e-2", "--device", "cpu",
                "--dtype", "float32", "--workers", "0"]))
        return runs_dir, cache
    return train_two_seeds


@pytest.fixture
def in_fresh_python():
    """in_fresh_python(codes, tmp_path, **env) -> [(output, seconds)]: each code line run in one
    fresh interpreter (the project importable, HF_* unset, an empty hub cache tmp_path/hf, then
    env), a ValueError printed as its message. The imports of torch and timm are not timed."""
    import subprocess

    def run(codes, tmp_path, **env):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
               "HF_HUB_CACHE": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT), **env}
        prog = "import time, authors, model, weights\n" + "".join(
            f"t = time.time()\ntry:\n    {code}\nexcept ValueError as e:\n    print(e)\n"
            f"print('@@', time.time() - t)\n" for code in codes)
        out = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True,
                             timeout=120)
        results, lines = [], []
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("@@ "):
                results.append(("\n".join(lines), float(line[3:])))
                lines = []
            else:
                lines.append(line)
        assert len(results) == len(codes) and not lines, out.stdout + out.stderr
        return results
    return run
