"""evaluate.py end to end on the synthetic test sets, against brute-force counts and a float64 AUPR/Dice."""
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import evaluate
from data import LESIONS, PreparedDataset
from model import ModelConfig, build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
R = 128  # the conftest cache's resolution
T32 = np.linspace(0, 1, 11, dtype=np.float32)  # the protocol's float32 thresholds, independent of kernels/




# ---------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------
def brute_counts(probs, masks, roi):
    """probs float32 (N, 4, H, W), masks bool (N, 4, H, W), roi bool (N, H, W) -> tp (4, 11), fp (4, 11), pos (4,)."""
    tp = np.zeros((4, 11), np.int64)
    fp = np.zeros((4, 11), np.int64)
    pos = np.zeros(4, np.int64)
    for c in range(4):
        p, y = probs[:, c][roi], masks[:, c][roi]
        pos[c] = y.sum()
        for k, t in enumerate(T32):
            hit = p >= t
            tp[c, k] = (hit & y).sum()
            fp[c, k] = (hit & ~y).sum()
    return tp, fp, pos


def ref_metrics(tp, fp, pos):
    """The REFERENCE.md formula in float64, one lesion: (aupr, dice), NaN when the lesion is absent."""
    if pos == 0:
        return math.nan, math.nan
    tp, fp = np.asarray(tp, np.float64), np.asarray(fp, np.float64)
    prec = [tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] > 0 else 1.0 for k in range(11)] + [1.0]
    rec = [tp[k] / pos for k in range(11)] + [0.0]
    aupr = sum((rec[k] - rec[k + 1]) * (prec[k] + prec[k + 1]) / 2 for k in range(11))
    dice = 2 * tp[5] / (2 * tp[5] + fp[5] + (pos - tp[5]))
    return aupr, dice


def model_from(path):
    ckpt = torch.load(path, weights_only=True)
    m = build_model(ModelConfig(**ckpt["model_cfg"]))
    m.load_state_dict(ckpt["model"])
    return m.eval()


@torch.no_grad()
def dataset_probs(models, ds):
    """Mean sigmoid probability of the models on every test image, one image at a time: (N, 4, R, R) float32."""
    out = []
    for i in range(len(ds)):
        # NOTE: contiguous NCHW as protocol.to_input gives it: a permuted (channels_last) input runs other conv
        # kernels whose float32 sums differ by ~1e-6 on some CPUs, and a pixel at a threshold would move a count
        x = torch.from_numpy(ds[i]["image"]).permute(2, 0, 1)[None].contiguous().float() / 255
        ps = [torch.sigmoid(m(x)) for m in models]
        out.append((sum(ps[1:], ps[0]) / len(ps))[0].numpy())
    return np.stack(out)


def dataset_truth(ds):
    return (np.stack([ds[i]["masks"] for i in range(len(ds))]).astype(bool),
            np.stack([ds[i]["fov"] for i in range(len(ds))]).astype(bool))


def assert_block_matches(block, tp, fp, pos, n_images):
    assert block["n_images"] == n_images
    for c, lesion in enumerate(LESIONS):
        got = block["lesions"][lesion]
        assert got["tp"] == tp[c].tolist(), lesion
        assert got["fp"] == fp[c].tolist(), lesion
        assert got["pos"] == int(pos[c]), lesion
        aupr, dice = ref_metrics(tp[c], fp[c], pos[c])
        floor = (1 + pos[c] / (tp[c][0] + fp[c][0])) / 2 if pos[c] else math.nan  # every pixel has p >= t_0 = 0
        for name, want in (("aupr", aupr), ("dice", dice), ("aupr_floor", floor)):
            if math.isnan(want):
                assert got[name] is None or math.isnan(got[name]), (lesion, name)
            else:
                assert got[name] == pytest.approx(want, rel=1e-12, abs=1e-12), (lesion, name)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints made here: a tiny U-Net whose head is scaled so the probabilities spread over [0, 1]
# ---------------------------------------------------------------------------------------------------------
def make_checkpoint(path, seed, cache_dir):
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder="test_resnet", pretrained=False)
    m = build_model(cfg).eval()
    head = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d) and mod.out_channels == len(LESIONS)][-1]
    x = torch.from_numpy(PreparedDataset(cache_dir, "MES", R, "train")[0]["image"]).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        s = m(x.float()).std().item()
        head.weight.mul_(2.5 / max(s, 1e-6))  # logits ~ N(., 2.5): every threshold bin gets pixels
        if head.bias is not None:
            head.bias.fill_(-1.0)
    save_checkpoint(path, {"model": m.state_dict(), "model_cfg": asdict(cfg),
                           "args": {"train": ["MES"], "seed": seed, "resolution": R, "patch": 64,
                                    "n_train_images": 8},
                           "step": 0, "epoch": 0, "optimizer": {}, "scheduler": {}, "scaler": None,
                           "metric": 0.0, "version": 1})
    return path


@pytest.fixture(scope="module")
def ckpts(cache_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    a = make_checkpoint(d / "a.pt", 0, cache_dir)
    b = make_checkpoint(d / "b.pt", 1, cache_dir)
    ck = torch.load(a, weights_only=True)
    ens = d / "ens1.pt"
    save_checkpoint(ens, {"kind": "ensemble", "members": [{"model": ck["model"], "model_cfg": ck["model_cfg"]}],
                          "args": ck["args"], "version": 1})
    return {"a": a, "b": b, "ens1": ens}


@pytest.fixture(scope="module")
def single(ckpts, cache_dir, synth_root, tmp_path_factory):
    """The single model on MES, maps written: (results dict, maps folder), shared by several tests."""
    maps = tmp_path_factory.mktemp("maps")
    return run_eval([ckpts["a"]], cache_dir, synth_root, maps_dir=maps), maps


def run_eval(paths, cache_dir, synth_root, tests=("MES",), **kw):
    kw.setdefault("verbose", False)
    return evaluate.evaluate_checkpoints([str(p) for p in paths], list(tests), synth_root, cache_dir, {},
                                         device="cpu", **kw)


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------------------
def test_cli_json_equals_brute_force(ckpts, cache_dir, synth_root, tmp_path):
    out = tmp_path / "res.json"
    r = cli("--ckpt", ckpts["a"], "--test", "MES,IDR", "--data-root", synth_root, "--cache", cache_dir,
            "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "AUPR" in r.stdout and "MES" in r.stdout
    res = json.loads(out.read_text())  # strict JSON: NaN written as null
    assert res["version"] == 1 and res["checkpoints"] == [str(ckpts["a"])]
    assert res["train"] == ["MES"] and res["seed"] == 0 and res["method"] == "baseline"
    assert res["n_train_images"] == 8
    assert res["protocol"] == {"thresholds": 11, "ap_bins": 1024, "roi": "fov", "resolution": R, "tta": False, "tile": None,
                               "overlap": None, "dtype": "float32", "split_protocol": "paper", "split_seed": 0,
                               "lesions": list(LESIONS)}
    assert list(res["results"]) == ["IDR", "MES"]  # canonical order
    assert (res["data_root"], res["cache"], res["root"]) == (str(synth_root), str(cache_dir), [])  # where read
    model = model_from(ckpts["a"])
    for test_id, block in res["results"].items():
        ds = PreparedDataset(cache_dir, test_id, R, "test")
        masks, fov = dataset_truth(ds)
        tp, fp, pos = brute_counts(dataset_probs([model], ds), masks, fov)
        assert tp[:, 0].sum() > tp[:, 10].sum() and (fp[:, 1:10] > 0).any()  # non-trivial maps
        assert_block_matches(block, tp, fp, pos, len(ds))
        present = [ref_metrics(tp[c], fp[c], pos[c]) for c in range(4) if pos[c] > 0]
        if present:
            assert block["mean_aupr"] == pytest.approx(np.mean([a for a, _ in present]), abs=1e-12)
            assert block["mean_dice"] == pytest.approx(np.mean([d for _, d in present]), abs=1e-12)


def test_ensembles(ckpts, cache_dir, synth_root, single):
    single = single[0]["results"]["MES"]
    # an ensemble file of one member, and the same checkpoint twice (mean of p and p is p), equal the model
    assert run_eval([ckpts["ens1"]], cache_dir, synth_root)["results"]["MES"] == single
    twice = run_eval([ckpts["a"], ckpts["a"]], cache_dir, synth_root)
    assert twice["results"]["MES"] == single and twice["method"] == "ensemble"
    # two different models: counts of the mean of the two probability maps
    pair = run_eval([ckpts["a"], ckpts["b"]], cache_dir, synth_root)["results"]["MES"]
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    masks, fov = dataset_truth(ds)
    probs = dataset_probs([model_from(ckpts["a"]), model_from(ckpts["b"])], ds)
    assert_block_matches(pair, *brute_counts(probs, masks, fov), len(ds))
    assert pair != single


def test_no_roi_counts_every_pixel(ckpts, cache_dir, synth_root):
    res = run_eval([ckpts["a"]], cache_dir, synth_root, roi=False)
    assert res["protocol"]["roi"] == "all"
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    masks, fov = dataset_truth(ds)
    probs = dataset_probs([model_from(ckpts["a"])], ds)
    probs[~np.broadcast_to(fov[:, None], probs.shape)] = 0.0  # the authors' way: p = 0 outside the FOV
    tp, fp, pos = brute_counts(probs, masks, np.ones_like(fov))
    assert (tp[:, 0] + fp[:, 0] == len(ds) * R * R).all()
    assert_block_matches(res["results"]["MES"], tp, fp, pos, len(ds))


class Pointwise(torch.nn.Module):
    """A 1x1 convolution: no receptive field, so tiling and flips must not change its output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) * 5


def test_tiling_and_tta_identities():
    x = torch.rand(2, 3, 70, 90)  # odd, non-square
    m = Pointwise().eval()
    with torch.no_grad():
        plain = torch.sigmoid(m(x))
        for tile, ov in ((32, 0.5), (40, 0.25), (64, 0.0), (90, 0.5)):
            tiled = evaluate.predict_tiled([m], x, tile, overlap=ov)
            torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-6)
        assert torch.equal(evaluate.predict_tiled([m], x, 96), evaluate.predict([m], x))  # one window: exact
        # TTA of a flip-equivariant model changes nothing (up to rounding)
        torch.testing.assert_close(evaluate.predict([m], x, tta=True), plain, rtol=0, atol=1e-6)


def test_tta_is_mean_over_flips_and_flip_equivariant(ckpts):
    m = model_from(ckpts["a"])
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = sum(torch.sigmoid(m(x.flip(d))).flip(d) if d else torch.sigmoid(m(x))
                  for d in ((), (-1,), (-2,), (-2, -1))) / 4
        got = evaluate.predict([m], x, tta=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        assert (got - torch.sigmoid(m(x))).abs().max() > 1e-4  # the U-Net itself is not flip-invariant
        for d in ((-1,), (-2,)):
            torch.testing.assert_close(evaluate.predict([m], x.flip(d), tta=True), got.flip(d), rtol=0, atol=1e-6)


def test_tiled_counts(ckpts, cache_dir, synth_root, single):
    base = single[0]["results"]["MES"]
    same = run_eval([ckpts["a"]], cache_dir, synth_root, tile=R)
    assert same["results"]["MES"] == base and same["protocol"]["tile"] == R
    tiled = run_eval([ckpts["a"]], cache_dir, synth_root, tile=96)["results"]["MES"]
    for lesion in LESIONS:
        b, t = base["lesions"][lesion], tiled["lesions"][lesion]
        assert t["pos"] == b["pos"]
        n = b["tp"][0] + b["fp"][0]
        assert t["tp"][0] + t["fp"][0] == n  # every ROI pixel counted at t = 0
        # NOTE: a 96 px window of a 128 px image sees less context near its border: close, not equal
        moved = sum(abs(t["tp"][k] + t["fp"][k] - b["tp"][k] - b["fp"][k]) for k in range(11))
        assert moved < 0.05 * 11 * n, lesion
    # the same on one map: the blended tiles differ from the whole-image map far less than the map varies
    m = model_from(ckpts["a"])
    x = torch.from_numpy(PreparedDataset(cache_dir, "MES", R, "test")[0]["image"]).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        whole = torch.sigmoid(m(x.float()))
        tiled = evaluate.predict_tiled([m], x.float(), 96)
    assert ((tiled - whole).abs().mean((2, 3)) < 0.25 * whole.std((2, 3))).all()


def test_save_maps(ckpts, cache_dir, single):
    from PIL import Image

    tmp_path = single[1]
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    probs = dataset_probs([model_from(ckpts["a"])], ds)
    for i, image_id in enumerate(ds.ids):
        # the maps on the photograph's geometry: the prepared maps enlarged into the crop box (PIL, bilinear)
        geo = ds.geometry(i)
        (w, h), (left, top), (x0, y0, x1, y1) = geo["size"], geo["pad"], geo["box"]
        fov = Image.fromarray(ds[i]["fov"][top:top + h, left:left + w]).resize((x1 - x0, y1 - y0), Image.NEAREST)
        inside = np.zeros((geo["height"], geo["width"]), bool)  # FOV pixels clear of its rim
        inside[y0:y1, x0:x1] = ndimage.binary_erosion(np.asarray(fov), iterations=3)
        for c, lesion in enumerate(LESIONS):
            crop = Image.fromarray(probs[i, c, top:top + h, left:left + w]).resize((x1 - x0, y1 - y0), Image.BILINEAR)
            ref = np.zeros(inside.shape, np.float32)
            ref[y0:y1, x0:x1] = np.asarray(crop)
            with Image.open(tmp_path / "MES" / f"{image_id}_{lesion}.png") as im:
                assert im.mode == "L" and im.size == (geo["width"], geo["height"])
                diff = np.abs(np.asarray(im).astype(int) - np.round(ref * 255).astype(int))
                assert diff[inside].max() <= 1  # 8-bit quantisation of the same map
        for picture, tiles in (("overlay", 1), ("panel", 3)):  # the panel: image | ground truth | prediction
            with Image.open(tmp_path / "MES" / f"{image_id}_{picture}.jpg") as im:
                assert im.mode == "RGB" and im.width == tiles * geo["width"] and im.height > geo["height"]


def fundus_jpeg(path, w, h):
    """A bright disc on black, as a fundus photograph looks to the FOV detector."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (w, h))
    r = min(w, h) // 2 - 4
    ImageDraw.Draw(im).ellipse([w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r], fill=(170, 80, 40))
    im.save(path, quality=95)


def test_images_folder(ckpts, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = {"left": (200, 150), "right": (150, 180)}
    for name, (w, h) in sizes.items():
        fundus_jpeg(photos / f"{name}.jpg", w, h)
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "maps"
    evaluate.main(["--ckpt", str(ckpts["a"]), "--images", str(photos), "--save-maps", str(out), "--device", "cpu"])
    for name, size in sizes.items():
        for lesion in LESIONS:
            with Image.open(out / f"{name}_{lesion}.png") as im:
                assert im.size == size, (name, lesion)
        with Image.open(out / f"{name}_overlay.jpg") as im:  # the photograph, the legend band below it
            assert im.width == size[0] and im.height > size[1], name


def test_unwritable_maps_folder_is_one_line_before_any_work(ckpts, cache_dir, synth_root, tmp_path):
    """--save-maps on a file, or under one (an OSError even for root), stops in one line naming the flag,
    before a photograph is segmented or a test set scored; the file is untouched."""
    photos = tmp_path / "photos"
    photos.mkdir()
    fundus_jpeg(photos / "eye.jpg", 120, 100)
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        r = cli("--ckpt", ckpts["a"], "--images", photos, "--save-maps", out, "--device", "cpu")
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(f"error: --save-maps {out}: cannot write maps there")
        assert "eye.jpg: maps" not in r.stdout
        with pytest.raises(ValueError, match="--save-maps .*cannot write maps there"):
            run_eval([ckpts["a"]], cache_dir, synth_root, maps_dir=out, out=tmp_path / "r.json")
        assert not (tmp_path / "r.json").exists()
    assert blocker.read_text() == "keep me"


def test_errors(ckpts, cache_dir, synth_root, tmp_path):
    common = ["--data-root", str(synth_root), "--cache", str(cache_dir), "--device", "cpu",
              "--out", str(tmp_path / "r.json")]
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    other = tmp_path / "other.pt"
    torch.save({"state": torch.zeros(2)}, other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    a = str(ckpts["a"])
    no_test = tmp_path / "no_test.json"  # every MES image in train: an empty test set
    no_test.write_text(json.dumps({"train": PreparedDataset(cache_dir, "MES", R, "all").ids}))
    idr = str(with_args(ckpts["a"], tmp_path / "idr.pt", train=["IDR"]))  # MES's split is free to change
    cases = [
        (["--ckpt", idr, "--test", "MES", "--splits", f"MES={no_test}", "--cache", str(tmp_path / "cache2")],
         "no images"),
        (["--ckpt", a, "--test", "XYZ"], "XYZ"),
        (["--ckpt", str(not_ckpt), "--test", "MES"], "notes.pt"),
        (["--ckpt", str(other), "--test", "MES"], "other.pt"),
        (["--ckpt", str(tmp_path / "missing.pt"), "--test", "MES"], "missing.pt"),
        (["--ckpt", a, "--images", str(broken)], "broken"),
        (["--ckpt", a, "--images", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for args, needle in cases:  # in-process: the exception main() lets through is one line naming the input
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            # later flags win: the empty-split case has its own --cache; --images takes no --out
            evaluate.main((common[:-2] if "--images" in args else common) + args)
        assert needle in str(e.value) and "\n" not in str(e.value)
    for args, needle in cases[2:3]:  # through the command line: one stderr line, no traceback
        r = cli(*args, *common)
        assert r.returncode != 0, args
        assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert needle in r.stderr


def test_empty_test_set(ckpts):
    class Empty:
        ids = []

        def __len__(self):
            return 0

    with pytest.raises(ValueError, match="no images"):
        evaluate.count_dataset([model_from(ckpts["a"])], Empty(), "cpu")


def test_count_dataset_bfloat16_and_train_mode(ckpts, cache_dir):
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    m = model_from(ckpts["a"]).train()  # as train.py's validation finds it
    tp32, fp32, pos32 = evaluate.count_dataset([m], ds, "cpu")
    assert m.training  # handed back in the mode it came in
    tp16, fp16, pos16 = evaluate.count_dataset([m], ds, "cpu", dtype="bfloat16", batch=3)
    assert tp16.dtype == torch.int64 and torch.equal(pos16, pos32)
    assert torch.equal(tp16[:, 0] + fp16[:, 0], tp32[:, 0] + fp32[:, 0])  # same ROI pixels, batched by 3
    assert ((tp16 + fp16 - tp32 - fp32).abs().sum(1) < 0.1 * 11 * (tp32[:, 0] + fp32[:, 0])).all()


# ---------------------------------------------------------------------------------------------------------
# Faults: one line naming the flag or file, nothing lost
# ---------------------------------------------------------------------------------------------------------
def test_out_directory_refused_before_any_work(ckpts, cache_dir, synth_root, tmp_path, monkeypatch):
    counted = []
    monkeypatch.setattr(evaluate, "count_dataset", lambda *a, **k: counted.append(1))
    with pytest.raises(ValueError) as e:
        run_eval([ckpts["a"]], cache_dir, synth_root, out=tmp_path)
    assert "--out" in str(e.value) and str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert counted == [] and list(tmp_path.iterdir()) == []  # checked first: no work, no orphan .tmp


def test_results_merge_by_test_set_and_refuse_other_protocol(ckpts, cache_dir, synth_root, tmp_path):
    out = tmp_path / "results.json"
    mes = run_eval([ckpts["a"]], cache_dir, synth_root, tests=("MES",), out=out)["results"]["MES"]
    run_eval([ckpts["a"]], cache_dir, synth_root, tests=("IDR",), out=out)
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == ["IDR", "MES"]  # the earlier test set is kept, canonical order
    assert saved["results"]["MES"]["lesions"]["EX"]["tp"] == mes["lesions"]["EX"]["tp"]
    before = out.read_text()
    with pytest.raises(ValueError) as e:  # another protocol (TTA) into the same file: refused, file untouched
        run_eval([ckpts["a"]], cache_dir, synth_root, tests=("IDR",), out=out, tta=True)
    assert "another --out" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError):  # other checkpoints likewise
        run_eval([ckpts["b"]], cache_dir, synth_root, tests=("IDR",), out=out)
    assert out.read_text() == before
    out.write_text("{not json")
    with pytest.raises(ValueError) as e:
        run_eval([ckpts["a"]], cache_dir, synth_root, tests=("IDR",), out=out)
    assert str(out) in str(e.value) and "\n" not in str(e.value)


def test_images_oversized_photo_is_skipped_with_a_warning(ckpts, tmp_path, monkeypatch, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    fundus_jpeg(photos / "a_huge.jpg", 240, 200)  # 48,000 px: over twice the limit below, a decompression bomb
    fundus_jpeg(photos / "b_small.jpg", 100, 90)
    (photos / "._b_small.jpg").write_bytes(b"\x00\x05\x16\x07")  # a macOS AppleDouble file: hidden, skipped silently
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    out = tmp_path / "maps"
    evaluate.main(["--ckpt", str(ckpts["a"]), "--images", str(photos), "--save-maps", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "warning" in err and "a_huge.jpg" in err and "._b_small" not in err
    assert not list(out.glob("._*"))
    assert (out / "b_small_overlay.jpg").is_file() and not (out / "a_huge_overlay.jpg").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_without_gpu_is_one_line(ckpts):
    for device, needle in (("cuda", "no CUDA GPU"), ("cuda:3", "no CUDA GPU"), ("gpu0", "not a torch device")):
        with pytest.raises(ValueError) as e:
            evaluate.main(["--ckpt", str(ckpts["a"]), "--test", "MES", "--device", device])
        assert needle in str(e.value) and "--device" in str(e.value) and "\n" not in str(e.value)


def test_ctrl_c_is_one_line(ckpts, cache_dir, synth_root, tmp_path):
    # KeyboardInterrupt raised where the work starts, through the script's own __main__ block
    code = ("import runpy, sys, data\n"
            "def stop(*a, **k): raise KeyboardInterrupt\n"
            "data.prepare_cache = stop\n"
            f"sys.argv = ['evaluate.py', '--ckpt', {str(ckpts['a'])!r}, '--test', 'MES', '--device', 'cpu',"
            f" '--data-root', {str(synth_root)!r}, '--cache', {str(cache_dir)!r}, '--out', {str(tmp_path / 'r.json')!r}]\n"
            "runpy.run_path('evaluate.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and r.stderr.strip().startswith("interrupted"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_sixteen_bit_photo_scaled_by_its_range(ckpts, tmp_path):
    from PIL import Image, ImageDraw

    from data.datasets import load_image

    photos = tmp_path / "photos"
    photos.mkdir()
    disc = Image.new("L", (120, 100))
    ImageDraw.Draw(disc).ellipse([12, 2, 108, 98], fill=255)
    wide = (np.asarray(disc, np.uint16) * 12).astype(np.uint16)  # a 12-bit camera's range in a 16-bit file
    Image.fromarray(wide).save(photos / "deep.png")
    with Image.open(photos / "deep.png") as im:
        assert im.mode.startswith("I")  # PIL reads it as 16-bit grey; convert("RGB") would clip it to white
    rgb = np.asarray(load_image(photos / "deep.png"))
    expected = np.floor(wide.astype(np.float64) / wide.max() * 255 + 0.5).astype(np.uint8)
    assert rgb.dtype == np.uint8 and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert rgb.min() == 0 and (rgb == 0).mean() > 0.1  # the black surround stays black, not white
    out = tmp_path / "maps"
    evaluate.main(["--ckpt", str(ckpts["a"]), "--images", str(photos), "--save-maps", str(out), "--device", "cpu"])
    with Image.open(out / "deep_overlay.jpg") as im:
        assert im.width == 120 and im.height > 100


def test_results_ap_against_sklearn(ckpts, cache_dir, single):
    """results.json's floor-free ap: scikit-learn's average precision of the pooled FOV pixels, within 1e-3."""
    from sklearn.metrics import average_precision_score

    block = single[0]["results"]["MES"]
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    probs = dataset_probs([model_from(ckpts["a"])], ds)  # (N, 4, R, R)
    masks, fov = dataset_truth(ds)
    checked = 0
    for c, lesion in enumerate(LESIONS):
        y, p = masks[:, c][fov], probs[:, c][fov]
        got = block["lesions"][lesion]["ap"]
        if not y.any():
            assert got is None or math.isnan(got)
            continue
        assert got == pytest.approx(average_precision_score(y, p), abs=1e-3), lesion
        assert got < block["lesions"][lesion]["aupr_floor"]  # a weak random model: far below the protocol's floor
        checked += 1
    assert checked >= 2 and block["mean_ap"] == pytest.approx(np.mean([block["lesions"][k]["ap"] for k in LESIONS
                                                                       if block["lesions"][k]["pos"]]))


def test_non_finite_weights_refused(ckpts, cache_dir, synth_root, tmp_path):
    ck = torch.load(ckpts["a"], weights_only=True)
    key = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][key] = ck["model"][key].clone().fill_(float("nan"))
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, ck)
    with pytest.raises(ValueError) as e:
        evaluate.main(["--ckpt", str(bad), "--test", "MES", "--data-root", str(synth_root), "--cache",
                       str(cache_dir), "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert "nan.pt" in str(e.value) and "NaN" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r.json").exists()


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: where tqdm draws its bars."""

    def isatty(self):
        return True


def test_progress_bar_per_test_set_only_on_a_terminal(ckpts, cache_dir, synth_root, monkeypatch, capsys):
    n = {t: len(PreparedDataset(cache_dir, t, R, "test")) for t in ("IDR", "MES")}
    run_eval([ckpts["a"]], cache_dir, synth_root, tests=("MES", "IDR"), batch=3)
    assert capsys.readouterr().err == ""  # captured stderr is no terminal: no bar (logs and tests stay clean)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    run_eval([ckpts["a"]], cache_dir, synth_root, tests=("MES", "IDR"), batch=3, verbose=True)  # as the CLI
    bars = term.getvalue()
    for t in ("IDR", "MES"):  # images of each test set counted to the end, batches of 3 included
        assert f"{t} test: 100%" in bars and f"{n[t]}/{n[t]}" in bars and "image/s" in bars


def test_test_sets_same_list_syntax(monkeypatch, tmp_path):
    """--test IDR,DDR MES, IDR+DDR, 'all', the last one given: the syntax of every dataset-list flag (data.flags)."""
    seen = []
    monkeypatch.setattr(evaluate, "load_checkpoint", lambda path: {"args": {}})
    monkeypatch.setattr(evaluate, "evaluate_checkpoints", lambda ckpts, tests, *a, **kw: seen.append(tests))
    for argv, ids in ((["--test", "IDR,DDR", "MES"], ["IDR", "DDR", "MES"]), (["--test", "mes+idr"], ["IDR", "MES"]),
                      (["--test", "MES", "--test", "IDR"], ["IDR"]), ([], ["IDR", "DDR", "FGA", "RET", "MES"]),
                      (["--test", "all"], ["IDR", "DDR", "FGA", "RET", "MES"])):
        evaluate.main(["--ckpt", str(tmp_path / "a.pt"), *argv, "--device", "cpu"])
        assert seen.pop() == ids, argv
    with pytest.raises(ValueError, match=r"^--test: unknown dataset ID 'XYZ'"):
        evaluate.main(["--ckpt", str(tmp_path / "a.pt"), "--test", "IDR", "XYZ", "--device", "cpu"])


# ---------------------------------------------------------------------------------------------------------
# The results file: written per test set, under a lock, keyed on the weights (issue 23)
# ---------------------------------------------------------------------------------------------------------
def test_concurrent_evaluations_into_one_out_keep_both_test_sets(ckpts, cache_dir, synth_root, tmp_path,
                                                                  monkeypatch):
    """A second evaluate.py of the same checkpoint writes DDR into --out while the first scores IDR: both stay
    (the merge reads the file when it writes, not when it starts)."""
    out = tmp_path / "results.json"
    real, nested = evaluate.count_dataset, []

    def count_and_meanwhile(*a, **kw):
        if not nested:  # during the first run's first test set, a whole second run on another test set
            nested.append(1)
            run_eval([ckpts["a"]], cache_dir, synth_root, tests=("DDR",), out=out)
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "count_dataset", count_and_meanwhile)
    run_eval([ckpts["a"]], cache_dir, synth_root, tests=("IDR",), out=out)
    assert list(json.loads(out.read_text())["results"]) == ["IDR", "DDR"]


def test_results_merge_waits_for_the_lock(ckpts, cache_dir, synth_root, tmp_path):
    """merge_results reads, merges and writes under the lock beside --out: a writer that holds the lock
    (another evaluate.py) is waited for, and its test set kept."""
    import threading

    import cli as cli_module

    out = tmp_path / "results.json"
    report = run_eval([ckpts["a"]], cache_dir, synth_root, tests=("MES",), out=out)
    header = {k: v for k, v in report.items() if k != "results"}
    held, release = threading.Event(), threading.Event()

    def other_writer():
        with cli_module.locked(out.with_name(f".{out.name}.lock")):
            held.set()
            release.wait(5)
            saved = json.loads(out.read_text())
            saved["results"]["IDR"] = saved["results"]["MES"]  # another process's test set
            out.write_text(json.dumps(saved))

    t = threading.Thread(target=other_writer)
    t.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()  # the merge below must wait for this
    evaluate.merge_results(out, header, "DDR", report["results"]["MES"])
    t.join()
    assert sorted(json.loads(out.read_text())["results"]) == ["DDR", "IDR", "MES"]


def test_out_that_cannot_be_written_is_one_line_before_any_work(ckpts, cache_dir, synth_root, tmp_path,
                                                                 monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    counted = []
    monkeypatch.setattr(evaluate, "count_dataset", lambda *a, **k: counted.append(1))
    with pytest.raises(ValueError) as e:
        run_eval([ckpts["a"]], cache_dir, synth_root, out=blocker / "results.json")
    assert str(e.value).startswith(f"--out {blocker}") and "\n" not in str(e.value)
    assert counted == [] and blocker.read_text() == "keep me"


def test_ctrl_c_keeps_the_finished_test_sets_and_says_so(ckpts, cache_dir, synth_root, tmp_path):
    # Ctrl-C while the second of two test sets is prepared, through the script's own __main__ block
    out = tmp_path / "r.json"
    code = ("import runpy, sys, data\n"
            "real, calls = data.prepare_cache, []\n"
            "def stop(*a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2: raise KeyboardInterrupt\n"
            "    return real(*a, **k)\n"
            "data.prepare_cache = stop\n"
            f"sys.argv = ['evaluate.py', '--ckpt', {str(ckpts['a'])!r}, '--test', 'IDR,MES', '--device', 'cpu',"
            f" '--data-root', {str(synth_root)!r}, '--cache', {str(cache_dir)!r}, '--out', {str(out)!r}]\n"
            "runpy.run_path('evaluate.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 130 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "during test set MES" in r.stderr and f"IDR written to {out}" in r.stderr
    assert list(json.loads(out.read_text())["results"]) == ["IDR"]


def test_results_are_keyed_on_the_weights_not_the_path(ckpts, cache_dir, synth_root, tmp_path, monkeypatch):
    import shutil

    ckpt = tmp_path / "best.pt"
    shutil.copy(ckpts["a"], ckpt)
    out = tmp_path / "results.json"
    run_eval([ckpt], cache_dir, synth_root, tests=("MES",), out=out)
    monkeypatch.chdir(tmp_path)  # the same file by a relative path: the same weights, merged
    run_eval(["best.pt"], cache_dir, synth_root, tests=("IDR",), out=out)
    assert list(json.loads(out.read_text())["results"]) == ["IDR", "MES"]
    before = out.read_text()
    shutil.copy(ckpts["b"], ckpt)  # best.pt replaced (a run extended with a larger --iters)
    with pytest.raises(ValueError) as e:
        run_eval([ckpt], cache_dir, synth_root, tests=("DDR",), out=out)
    assert "other weights" in str(e.value) and str(out) in str(e.value) and "\n" not in str(e.value)
    assert out.read_text() == before
    legacy = json.loads(before)
    del legacy["fingerprint"]  # written by an older evaluate.py: can't be told to be of these weights
    out.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="fingerprint"):
        run_eval([ckpt], cache_dir, synth_root, tests=("DDR",), out=out)


# ---------------------------------------------------------------------------------------------------------
# Silently wrong results, refused (issue 23)
# ---------------------------------------------------------------------------------------------------------
def with_args(src, dst, **changes):
    ck = torch.load(src, weights_only=True)
    ck["args"] = {**ck["args"], **changes}
    save_checkpoint(dst, ck)
    return dst


def test_ensemble_of_members_at_other_resolutions_is_refused(ckpts, cache_dir, synth_root, tmp_path):
    low = with_args(ckpts["b"], tmp_path / "low.pt", resolution=64)
    for order in ([ckpts["a"], low], [low, ckpts["a"]]):
        with pytest.raises(ValueError) as e:
            run_eval(order, cache_dir, synth_root)
        assert "different resolutions" in str(e.value) and "low.pt at 64 px" in str(e.value)
        assert "--resolution" in str(e.value) and "\n" not in str(e.value)
    image = np.zeros((80, 90, 3), np.uint8)
    with pytest.raises(ValueError, match="different resolutions"):
        evaluate.segment(image, [str(ckpts["a"]), str(low)])
    # an explicit resolution runs every member at it: the member order no longer matters
    a = run_eval([ckpts["a"], low], cache_dir, synth_root, resolution=R)["results"]["MES"]
    b = run_eval([low, ckpts["a"]], cache_dir, synth_root, resolution=R)["results"]["MES"]
    assert a["lesions"]["EX"]["pos"] == b["lesions"]["EX"]["pos"]
    for lesion in LESIONS:
        ta, tb = np.array(a["lesions"][lesion]["tp"]), np.array(b["lesions"][lesion]["tp"])
        assert np.abs(ta - tb).max() <= 0.001 * max(ta.max(), 1)  # the mean in another order: the same counts


def test_checkpoint_resolution_that_is_no_number_is_one_line(ckpts, cache_dir, synth_root, tmp_path):
    bad = with_args(ckpts["a"], tmp_path / "abc.pt", resolution="abc")
    with pytest.raises(ValueError) as e:
        run_eval([bad], cache_dir, synth_root)
    assert "abc.pt" in str(e.value) and "resolution 'abc'" in str(e.value) and "\n" not in str(e.value)


def test_split_flags_other_than_the_runs_are_refused_for_its_training_sets(ckpts, cache_dir, synth_root, tmp_path,
                                                                           monkeypatch):
    """ckpts were trained on MES (paper split, seed 0): another --split-seed re-draws MES's test split and would
    score training images; a test set the run did not train on is scored, its split seed recorded."""
    common = ["--ckpt", str(ckpts["a"]), "--data-root", str(synth_root), "--cache", str(cache_dir), "--device",
              "cpu"]
    for extra, flag in ((["--split-seed", "1"], "--split-seed 1"),
                        (["--split-protocol", "authors"], "--split-protocol authors"),
                        (["--splits", "MES=official"], "--splits MES=official")):
        with pytest.raises(ValueError) as e:
            evaluate.main(common + ["--test", "MES", "--out", str(tmp_path / "r.json")] + extra)
        assert str(e.value).startswith(flag) and "training images" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r.json").exists()
    seen = []
    monkeypatch.setattr(evaluate, "evaluate_checkpoints", lambda *a, **kw: seen.append(a[4]))
    evaluate.main(common + ["--test", "IDR", "--split-seed", "1", "--out", str(tmp_path / "r.json")])
    assert seen[0]["split_seed"] == 1
    protocol = evaluate.make_protocol(R, LESIONS, seen[0])
    assert protocol["split_seed"] == 1 and protocol["split_protocol"] == "paper"


def test_recorded_cache_of_another_machine_is_not_written(ckpts, cache_dir, synth_root, tmp_path, monkeypatch):
    """A checkpoint records the --cache of the machine it was trained on; evaluate.py without --cache uses it only
    where a prepared cache already is, never creating the folder a received file names."""
    elsewhere = tmp_path / "their" / "cache"
    foreign = with_args(ckpts["a"], tmp_path / "foreign.pt", cache=str(elsewhere), data_root="/nonexistent")
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--ckpt", str(foreign), "--test", "MES", "--data-root", str(synth_root), "--device", "cpu",
                   "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "their").exists() and (tmp_path / "cache" / "MES").is_dir()
    own = with_args(ckpts["a"], tmp_path / "own.pt", cache=str(cache_dir))  # this machine's prepared cache: used
    _, cache, _ = evaluate.data.data_settings(*_parsed(["--ckpt", str(own)]), torch.load(own)["args"])
    assert cache == str(cache_dir)


def _parsed(argv):
    import argparse

    p = argparse.ArgumentParser()
    evaluate.data.add_data_args(p)
    args, _ = p.parse_known_args(argv)
    return args, p


def test_images_refuse_out_and_maps_show_only_the_trained_lesions(ckpts, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    fundus_jpeg(photos / "eye.jpg", 160, 120)
    with pytest.raises(ValueError) as e:
        evaluate.main(["--ckpt", str(ckpts["a"]), "--images", str(photos), "--out", str(tmp_path / "x.json"),
                       "--device", "cpu"])
    assert "--out" in str(e.value) and "--save-maps" in str(e.value) and "\n" not in str(e.value)
    he_only = with_args(ckpts["a"], tmp_path / "he.pt", lesions=["HE"])  # train.py --lesions HE
    evaluate.main(["--ckpt", str(he_only), "--images", str(photos), "--save-maps", str(tmp_path / "m"),
                   "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "m").glob("*.png")) == ["eye_HE.png"]
    # the overlay draws only HE: a certain exudate everywhere (not a trained output) leaves no yellow
    image = np.full((120, 160, 3), 90, np.uint8)
    probs = np.zeros((4, 120, 160), np.float32)
    probs[0] = 0.9
    probs[1, 40:80, 50:100] = 0.9
    import maps

    drawn = maps.overlay(image, probs, lesions=("HE",))[:120]
    assert not (drawn == maps.COLOURS[0]).all(-1).any() and (drawn == maps.COLOURS[1]).all(-1).any()
    assert (maps.overlay(image, probs)[:120] == maps.COLOURS[0]).all(-1).any()  # all four: yellow outline
    legend = maps.legend(600, lesions=("HE",))
    assert not (legend == maps.COLOURS[0]).all(-1).any() and (legend == maps.COLOURS[1]).all(-1).any()


def test_bad_checkpoint_contents_and_inputs_are_one_line(ckpts, tmp_path):
    ck = torch.load(ckpts["a"], weights_only=True)
    cases = {"tensor.pt": {**ck, "model": torch.zeros(3)},
             "int.pt": {**ck, "model": {**ck["model"], "head.weight": 3}}}
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        r = cli("--ckpt", tmp_path / name, "--test", "MES", "--device", "cpu")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().startswith("error:") and name in r.stderr and "'model'" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    run = tmp_path / "runs" / "IDR" / "s0"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes((ckpts["a"]).read_bytes())
    with pytest.raises(ValueError) as e:
        evaluate.main(["--ckpt", str(run), "--test", "MES", "--device", "cpu"])
    assert f"pass {run / 'best.pt'}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="H and W >= 1"):
        evaluate.segment(np.zeros((0, 0, 3), np.uint8), str(ckpts["a"]))
