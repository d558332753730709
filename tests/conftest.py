"""Shared fixtures: a small synthetic copy of the five datasets, prepared once per test session."""
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU in tests
# Fourteen real IDRiD photographs, downscaled 4x, with their four lesion masks
# (tests/fixtures/idrid-4l14/README.md)
FIXTURE_IDRID = ROOT / "tests" / "fixtures" / "idrid-4l14"


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
    """One intra-op thread for the whole suite: CPU results stay deterministic, and on 2 shared
    cores torch's OpenMP threads spin against other processes (tiny steps measured 5-30x slower
    with two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixture_idrid():
    """Root of the real IDRiD sample in the repository (14 images 1072x712 with HE masks)."""
    # NOTE: part of the repository, never skipped: a missing fixture is a broken checkout (fail)
    if not (FIXTURE_IDRID / "A. Segmentation").is_dir():
        raise FileNotFoundError(f"real IDRiD fixture missing: {FIXTURE_IDRID} "
                                f"(restore tests/fixtures/ from git)")
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


@pytest.fixture(scope="session")
def generic_source(tmp_path_factory):
    """The synthetic IDRiD, 6 photographs of 96x64 px with their masks: generic_dataset's source."""
    from data.synthetic import generate

    out = tmp_path_factory.mktemp("generic_source")
    generate(out, images=6, size=64, seed=0, datasets="IDR")
    return out / "IDRiD" / "A. Segmentation"


@pytest.fixture
def generic_dataset(generic_source, tmp_path):
    """make(lesions=("EX", "HE"), folder="ABC") -> tmp_path/folder: generic_source's 6 photographs
    in the generic layout (docs/DATA.md, "Your own dataset"), written here by hand, not by data/:
    images/<stem>.jpg, masks/<LESION>/<stem>.png (0/255, a file per image, all-zero where the lesion
    is absent), dataset.json annotating `lesions`, no splits.json."""
    import numpy as np
    from PIL import Image

    tifs = {"EX": "3. Hard Exudates", "HE": "2. Haemorrhages", "MA": "1. Microaneurysms",
            "CWS": "4. Soft Exudates"}
    codes = {"EX": "EX", "HE": "HE", "MA": "MA", "CWS": "SE"}  # IDRiD's file suffixes

    def make(lesions=("EX", "HE"), folder="ABC"):
        root = tmp_path / folder
        (root / "images").mkdir(parents=True)
        for lesion in lesions:
            (root / "masks" / lesion).mkdir(parents=True)
        for split in ("a. Training Set", "b. Testing Set"):
            for jpg in sorted((generic_source / "1. Original Images" / split).glob("*.jpg")):
                shutil.copy(jpg, root / "images" / jpg.name)
                W, H = Image.open(jpg).size
                for lesion in lesions:
                    tif = (generic_source / "2. All Segmentation Groundtruths" / split /
                           tifs[lesion] / f"{jpg.stem}_{codes[lesion]}.tif")
                    mask = (np.asarray(Image.open(tif).convert("RGB")).max(-1) > 0
                            if tif.is_file() else np.zeros((H, W), bool))
                    Image.fromarray(mask.astype(np.uint8) * 255).save(
                        root / "masks" / lesion / f"{jpg.stem}.png")
        info = {"name": "My clinic", "lesions": {les: f"masks/{les}" for les in lesions}}
        (root / "dataset.json").write_text(json.dumps(info))
        return root
    return make


@pytest.fixture()
def small_cache(synth_root, tmp_path):
    """(cache, cache/DDR/32): the synthetic DDR prepared at 32 px in a private cache (free to
    damage)."""
    from data.prepare import prepare_cache

    cache = tmp_path / "cache"
    prepare_cache("DDR", synth_root, cache, 32, verbose=False)
    return cache, cache / "DDR" / "32"


# ---- TB: fixtures of test_train, test_evaluate, test_predict, test_protocol, test_maps, and of the
# style-conditioning blocks of test_model and test_average (from the old test_train*, test_lesions,
# test_style, test_evaluate, test_maps)
EVAL_R = 128  # the resolution of cache_dir, at which eval_ckpts are made
STYLE_WIDTHS = (16, 8, 8, 8, 8)  # the decoder of style_net's models


@pytest.fixture(scope="session")
def tiny_runs_dir(tiny_runs, tmp_path_factory):
    """tiny_runs trained once per session (read them, don't change them) -> (runs folder, cache)."""
    return tiny_runs(tmp_path_factory.mktemp("tiny_runs"))


@pytest.fixture(scope="session")
def he_run(synth_root, cache_dir, tmp_path_factory):
    """A 4-step run on IDR training only HE (train.py --lesions HE) -> (run folder, parsed args)."""
    import train

    out = tmp_path_factory.mktemp("he") / "run"
    args = train.parse_args([
        "--train", "IDR", "--data-root", str(synth_root), "--cache", str(cache_dir),
        "--out", str(out), "--encoder", "test_resnet", "--no-pretrained", "--resolution", "128",
        "--patch", "64", "--batch", "2", "--device", "cpu", "--dtype", "float32", "--workers", "0",
        "--warmup", "2", "--iters", "4", "--val-every", "2", "--lesions", "HE", "--lr", "1e-2"])
    train.run(args)
    return out, args


def _eval_checkpoint(path, seed, cache_dir):
    """A tiny U-Net 'trained' on MES at EVAL_R px, its head scaled so that its probabilities spread
    over [0, 1]."""
    import torch
    from dataclasses import asdict

    from data import LESIONS, PreparedDataset
    from model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(seed)
    cfg = ModelConfig(encoder="test_resnet", pretrained=False, resolution=EVAL_R)
    m = build_model(cfg).eval()
    head = [mod for mod in m.modules()
            if isinstance(mod, torch.nn.Conv2d) and mod.out_channels == len(LESIONS)][-1]
    image = PreparedDataset(cache_dir, "MES", EVAL_R, "train")[0]["image"]
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        s = m(x.float() / 255).std().item()
        head.weight.mul_(2.5 / max(s, 1e-6))  # logits ~ N(., 2.5): every threshold bin gets pixels
        if head.bias is not None:
            head.bias.fill_(-1.0)
    args = {"train": ["MES"], "seed": seed, "resolution": EVAL_R, "patch": 64, "n_train_images": 8}
    save_checkpoint(path, {"model": m.state_dict(), "model_cfg": asdict(cfg), "args": args,
                           "step": 0, "epoch": 0, "optimizer": {}, "scheduler": {}, "scaler": None,
                           "metric": 0.0, "version": 1})
    return path


@pytest.fixture(scope="session")
def eval_ckpts(cache_dir, tmp_path_factory):
    """Two such checkpoints (seeds 0 and 1: "a", "b") and an ensemble file of "a" alone ("ens1")."""
    import torch

    from model import save_checkpoint

    d = tmp_path_factory.mktemp("eval_ckpts")
    a, b = _eval_checkpoint(d / "a.pt", 0, cache_dir), _eval_checkpoint(d / "b.pt", 1, cache_dir)
    ck = torch.load(a, weights_only=True)
    ens = d / "ens1.pt"
    member = {"model": ck["model"], "model_cfg": ck["model_cfg"]}
    save_checkpoint(ens, {"kind": "ensemble", "members": [member], "args": ck["args"],
                          "version": 1})
    return {"a": a, "b": b, "ens1": ens}


@pytest.fixture(scope="session")
def model_from():
    """path -> the model of a checkpoint built by hand (ModelConfig + load_state_dict), in eval
    mode: a reference that does not go through model.load_models or predict.load_ensemble."""
    def build(path):
        import torch

        from model import ModelConfig, build_model

        ckpt = torch.load(path, weights_only=True)
        m = build_model(ModelConfig(**ckpt["model_cfg"]))
        m.load_state_dict(ckpt["model"])
        return m.eval()
    return build


@pytest.fixture(scope="session")
def edit_ckpt():
    """(src, dst, args={...}, cfg={...}) -> dst: a copy of a checkpoint with some training args and
    model_cfg fields changed (what a checkpoint of another run would record)."""
    def edit(src, dst, args=None, cfg=None):
        import torch

        from model import save_checkpoint

        ck = torch.load(src, weights_only=True)
        ck["args"] = {**ck["args"], **(args or {})}
        ck["model_cfg"] = {**ck["model_cfg"], **(cfg or {})}
        save_checkpoint(dst, ck)
        return dst
    return edit


@pytest.fixture(scope="session")
def fundus_jpeg():
    """(path, w, h): a bright disc on black as a JPEG, as a fundus looks to the FOV detector."""
    def write(path, w, h):
        from PIL import Image, ImageDraw

        im = Image.new("RGB", (w, h))
        r = min(w, h) // 2 - 4
        box = [w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r]
        ImageDraw.Draw(im).ellipse(box, fill=(170, 80, 40))
        im.save(path, quality=95)
    return write


@pytest.fixture(scope="session")
def style_net():
    """(seed=0, **ModelConfig fields, e.g. style_tokens) -> a tiny test_resnet U-Net (decoder
    STYLE_WIDTHS)."""
    def tiny(seed=0, **kw):
        import torch

        from model import ModelConfig, build_model

        torch.manual_seed(seed)
        return build_model(ModelConfig(encoder="test_resnet", pretrained=False,
                                       decoder_channels=STYLE_WIDTHS, **kw))
    return tiny


@pytest.fixture(scope="session")
def randomize_films():
    """(net, seed) -> net with random FiLM scales and shifts (fresh, FiLM is the identity)."""
    def randomize(net, seed):
        import torch

        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for film in net.decoder.films:
                film.gamma.copy_(0.5 * torch.randn(film.gamma.shape, generator=g))
                film.beta.copy_(0.5 * torch.randn(film.beta.shape, generator=g))
        return net
    return randomize


@pytest.fixture(scope="session")
def style_checkpoint():
    """(path, net, train_ids=("IDR", "RET")) -> path: a style_net model saved as a checkpoint
    trained at 64 px."""
    def save(path, net, train_ids=("IDR", "RET")):
        from dataclasses import asdict

        from model import ModelConfig, save_checkpoint

        cfg = ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=STYLE_WIDTHS,
                          style_tokens=net.style_tokens, token_styles=net.token_styles,
                          resolution=64)
        save_checkpoint(path, {"model": net.state_dict(), "model_cfg": asdict(cfg),
                               "args": {"resolution": 64, "train": list(train_ids)}, "step": 0})
        return path
    return save


# ---- shared by test_train.py and test_slurm.py ---------------------------------------------------
@pytest.fixture
def read_log():
    """read_log(run_dir, split) -> the records of a run's log.jsonl of one split ("train" or
    "val")."""
    def read(run_dir, split):
        lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["split"] == split]
    return read


# ---- a PostgreSQL server of the test's own (test_tune.py, test_slurm.py) ------------------------
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def as_server_user(argv, user):
    """initdb refuses to run as root: as root, run PostgreSQL's commands as `user`."""
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a free TCP port on the loopback (for the servers tests start)."""
    return _free_port


@pytest.fixture
def postgres_url():
    """postgresql://...@127.0.0.1:PORT/optuna on a fresh server, stopped (and its folder removed)
    afterwards."""
    if not all((PG_BIN / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")):
        pytest.skip(f"PostgreSQL binaries (initdb, pg_ctl, createdb) not found in {PG_BIN} "
                    f"(set PG_BIN)")
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.fail("running as root, and there is no 'postgres' user to run initdb as")
    # NOTE: not pytest's tmp_path: its parents are private to root; the server runs as another user
    folder = Path(tempfile.mkdtemp(prefix="tune-pg-"))
    if user:
        shutil.chown(folder, user)
    data, port, log = folder / "data", _free_port(), folder / "server.log"

    def run(*argv):
        return subprocess.run(as_server_user([str(a) for a in argv], user), check=True,
                              capture_output=True, text=True, timeout=120)

    run(PG_BIN / "initdb", "-D", data, "-U", "tune", "-A", "trust", "--no-sync", "-E", "UTF8")
    started = False
    try:
        run(PG_BIN / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start",
            "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off")
        started = True
        run(PG_BIN / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "tune", "optuna")
        yield f"postgresql://tune:secret@127.0.0.1:{port}/optuna"
    except subprocess.CalledProcessError as e:
        server_log = log.read_text() if log.exists() else ""
        pytest.fail(f"{e.cmd[-1]} failed: {e.stderr}\n{server_log}")
    finally:
        if started:
            stop = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            subprocess.run(as_server_user(stop, user), capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)

