"""authors.py: the authors' released models (hub specs, branches, the cached download, their layout
read into model.py's U-Net, their argmax Dice) through predict.py and evaluate.py: torchseg as the
reference, no network.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_authors.py

The reference model is built by torchseg (the authors' library) and saved by huggingface_hub's
PyTorchModelHubMixin exactly as the authors' toolkit defines its hub class, so the folder is the
released layout.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import authors
import model
from model import load_models
from predict import load_ensemble, read_checkpoint
from protocol import predict

ROOT = Path(__file__).resolve().parents[1]
# the authors' normalisation
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def authors_class():
    """The hub class of the authors' toolkit (fundus_lesions_toolkit.models.hf_hub): a torchseg
    model as `model`."""
    torchseg = pytest.importorskip("torchseg")
    from huggingface_hub import PyTorchModelHubMixin

    class HuggingFaceModel(PyTorchModelHubMixin, torch.nn.Module):
        def __init__(self, arch: str, encoder: str, in_channels: int = 3, classes: int = 5):
            super().__init__()
            self.model = torchseg.create_model(arch=arch, encoder_name=encoder,
                                               encoder_weights=None, in_channels=in_channels,
                                               classes=classes)
    return HuggingFaceModel


@pytest.fixture(scope="module")
def authors_model(tmp_path_factory):
    """(folder in the hub layout, the torchseg model): random weights and random BatchNorm
    statistics."""
    torch.manual_seed(0)
    net = authors_class()(arch="unet", encoder="seresnext50_32x4d", in_channels=3, classes=5)
    # non-trivial running statistics, so that the buffers' mapping is checked too
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    folder = tmp_path_factory.mktemp("authors") / "DDR_IDRID"
    net.save_pretrained(folder)
    return folder, net.model.eval()


def reference_probs(net, x):
    """The authors' inference: ImageNet normalisation, torchseg forward, softmax; the input
    padded with black to multiples of 32 (torchseg refuses other sizes) and the output cropped ->
    (B, 4, H, W) in EX, HE, MA, CWS."""
    H, W = x.shape[-2:]
    xp = F.pad(x, (0, -W % 32, 0, -H % 32))
    mean, std = (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                 torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    with torch.no_grad():
        p = torch.softmax(net((xp - mean) / std), dim=1)  # (B, 5, H', W'): BG, CTW, EX, HE, MA
    return p[:, [2, 3, 4, 1], :H, :W], p[..., :H, :W]


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_loader_matches_torchseg_on_a_size_not_a_multiple_of_32(authors_model):
    folder, net = authors_model
    assert json.loads((folder / "config.json").read_text()) == authors.CONFIG  # the released layout
    torch.manual_seed(1)
    x = torch.rand(1, 3, 80, 112)  # 2.5 x 3.5 times 32
    with pytest.raises(RuntimeError, match="divisible by 32"):
        net(x)  # why our model pads: the authors' decoder upsamples by exactly 2
    ref, _ = reference_probs(net, x)
    # not saturated: the comparison means something
    assert ref.std() > 0.05 and 0.01 < ref.mean() < 0.5
    for path in (folder, folder / "model.safetensors"):  # the folder, and the weights file alone
        (ours,) = load_models(authors.load(path))
        assert ours.softmax and ours.head.kernel_size == (3, 3)
        with torch.no_grad():
            # the protocol's prediction: (B, 4, H, W), sigmoid of the lesion logits
            probs = predict([ours], x)
        assert probs.shape == (1, 4, 80, 112)
        # NOTE: float32 sums in another order differ by ~1e-6 of the scale (1 here) and by more on
        # another CPU's kernels; a wrong key or adapter moves probabilities by far more than 1e-4
        assert (probs - ref).abs().max().item() <= 1e-4


def test_argmax_lesions_is_the_softmax_argmax(authors_model):
    folder, net = authors_model
    torch.manual_seed(2)
    x = torch.rand(2, 3, 64, 96)
    ref, full = reference_probs(net, x)
    winner = full.argmax(dim=1)  # (B, H, W) over BG, CTW, EX, HE, MA
    expected = torch.stack([winner == c for c in (2, 3, 4, 1)], dim=1)
    assert expected.any() and not expected.all()
    assert torch.equal(authors.argmax_lesions(ref), expected)


def test_checkpoint_header_and_soup_round_trip(authors_model, tmp_path):
    folder, _ = authors_model
    ckpt = authors.load(folder)
    assert ckpt["args"]["resolution"] == authors.RESOLUTION == 1024 and ckpt["method"] == "authors"
    assert ckpt["model_cfg"]["resolution"] == 1024  # the input contract (predict, evaluate)
    # saved in our training format (what average.py writes) it loads back to the same weights
    model.save_checkpoint(tmp_path / "authors.pt", ckpt)
    (a,), (b,) = load_models(authors.load(folder)), load_models(tmp_path / "authors.pt")
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_strict_key_mapping_errors_are_one_line(authors_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = authors_model
    sd = load_file(folder / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    cases = {
        "extra": ({**sd, "model.decoder.center.0.0.weight": torch.zeros(1)}, "no counterpart"),
        "missing": ({k: v for k, v in sd.items() if k != "model.segmentation_head.0.bias"},
                    "missing key 'head.bias'"),
        "shape": ({**sd, "model.segmentation_head.0.weight": torch.zeros(5, 16, 1, 1)},
                  "key 'head.weight' has shape"),
    }
    for name, (bad, expected) in cases.items():
        save_file(bad, tmp_path / "model.safetensors")
        with pytest.raises(ValueError) as e:
            load_ensemble([tmp_path])  # what evaluate.py and predict.py load with
        assert expected in one_line(e) and str(tmp_path) in str(e.value), name
    (tmp_path / "config.json").write_text(json.dumps({**authors.CONFIG, "classes": 4}))
    with pytest.raises(ValueError) as e:
        authors.load(tmp_path)
    assert "classes 5" in one_line(e) and "config.json" in str(e.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        authors.load(tmp_path)


@pytest.mark.parametrize("spec, branch", [
    ("hub:", "main"), ("hub:IDR+DDR+FGA+RET+MES", "main"), ("hub:IDR+DDR", "DDR_IDRID"),
    ("hub:mes,idr", "IDRID_MESSIDOR"), ("hub:RET", "RETLES"),
    ("hub:FGA+DDR+RET", "DDR_FGADR_RETLES"), ("hub:IDR+DDR+FGA+MES", "DDR_FGADR_IDRID_MESSIDOR"),
])
def test_branch_names(spec, branch):
    assert authors.branch(authors.parse_spec(spec)) == branch


def test_branch_names_match_the_authors_export_tags():
    # reference/: the authors' runs are tagged with the
    # same names ("DDR, FGADR, IDRID, RETLES"), sorted
    import csv

    with open(ROOT / "reference" / "lesions_database_cross_study.csv", newline="") as f:
        tags = {row["Tags"] for row in csv.DictReader(f)}
    names = {v: k for k, v in authors.HUB_NAMES.items()}
    for tag in tags:
        parts = [t.strip() for t in tag.split(",")]
        assert parts == sorted(parts)
        ids = [names[t] for t in parts]
        assert authors.branch(ids) == ("main" if len(ids) == 5 else "_".join(parts))
    with pytest.raises(ValueError, match="unknown dataset ID 'XYZ'"):
        authors.parse_spec("hub:IDR+XYZ")


def test_hub_spec_loads_through_the_download(authors_model, monkeypatch):
    folder, _ = authors_model
    asked = []
    monkeypatch.setattr(authors, "download",
                        lambda branch, repo_id=authors.REPO: asked.append(branch) or folder)
    ckpt = read_checkpoint("hub:IDR+DDR")
    assert asked == ["DDR_IDRID"] and ckpt["args"]["train"] == ["IDR", "DDR"]
    assert ckpt["provenance"]["source"] == f"{authors.REPO}@DDR_IDRID"
    assert len(load_ensemble(["hub:"])[0]) == 1 and asked[-1] == "main"


def test_manifest_of_hub_members(authors_model, monkeypatch, tmp_path):
    folder, _ = authors_model
    monkeypatch.setattr(authors, "download", lambda branch, repo_id=authors.REPO: folder)
    manifest = tmp_path / "ens.json"
    manifest.write_text(json.dumps({"kind": "ensemble", "members": ["hub:IDR", str(folder)]}))
    assert len(load_ensemble([manifest])[0]) == 2


def test_cached_download_is_used_offline(authors_model, tmp_path, in_fresh_python):
    # the hub cache's own layout (refs/<branch> ->
    # snapshots/<commit>/...), filled by hand: no network
    folder, _ = authors_model
    repo = tmp_path / "hf" / ("models--" + authors.REPO.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "DDR_IDRID").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in authors.FILES:
        (repo / "snapshots" / commit / name).symlink_to(folder / name)
    ((text, _),) = in_fresh_python(["print(authors.download('DDR_IDRID'))"], tmp_path,
                                   HF_HUB_OFFLINE="1")
    assert text.endswith(str(repo / "snapshots" / commit)), text


def test_missing_huggingface_hub_is_one_line(monkeypatch):
    # import huggingface_hub -> ImportError
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError) as e:  # an optional package missing: utils.run's one line
        authors.download("main")
    assert "pip install huggingface_hub" in one_line(e)


# --------------------------------------------------------------------------------------------------
# evaluate.py and predict.py with the authors' models
# --------------------------------------------------------------------------------------------------
def reference_counts(net, ds):
    """Pooled Dice at p >= 0.5 and argmax Dice of the torchseg model over a prepared test set,
    FOV pixels only, in plain numpy -> (dice (4,), dice_argmax (4,), pos (4,))."""
    import numpy as np

    tp, fp, tpa, fpa, pos = (np.zeros(4) for _ in range(5))
    for i in range(len(ds)):
        item = ds[i]
        x = torch.from_numpy(item["image"]).permute(2, 0, 1)[None].float() / 255
        probs, full = reference_probs(net, x)
        probs, winner = probs[0].numpy(), full[0].argmax(0).numpy()
        for c, k in enumerate((2, 3, 4, 1)):
            y, fov = item["masks"][c], item["fov"]
            pred, arg = (probs[c] >= np.float32(0.5)) & fov, (winner == k) & fov
            tp[c] += (pred & y).sum(); fp[c] += (pred & ~y).sum()
            tpa[c] += (arg & y).sum(); fpa[c] += (arg & ~y).sum(); pos[c] += (y & fov).sum()
    return 2 * tp / (tp + fp + pos), 2 * tpa / (tpa + fpa + pos), pos


def test_evaluate_hub_spec_end_to_end(authors_model, cache_dir, synth_root, tmp_path, monkeypatch):
    import evaluate
    from data import LESIONS, PreparedDataset

    folder, net = authors_model
    monkeypatch.setattr(authors, "download", lambda branch, repo_id=authors.REPO: folder)
    monkeypatch.chdir(tmp_path)  # the default --out of a hub spec: authors/<COMBO>/results.json
    evaluate.main(["--ckpt", "hub:IDR+DDR", "--test", "MES", "--data-root", str(synth_root),
                   "--cache", str(cache_dir), "--resolution", "128", "--device", "cpu",
                   "--dice-argmax"])
    res = json.loads((tmp_path / "authors" / "IDR+DDR" / "results.json").read_text())
    assert (res["method"] == "authors" and res["train"] == ["IDR", "DDR"]
            and res["checkpoints"] == ["hub:IDR+DDR"])
    assert res["protocol"]["resolution"] == 128 and res["protocol"]["dice_argmax"] is True
    dice, dice_argmax, pos = reference_counts(net, PreparedDataset(cache_dir, "MES", 128, "test"))
    block = res["results"]["MES"]["lesions"]
    for c, name in enumerate(LESIONS):
        assert block[name]["pos"] == pos[c]
        if pos[c]:  # a probability within 1e-5 of 0.5 may flip a pixel: pooled Dice agrees to 1e-3
            assert block[name]["dice"] == pytest.approx(dice[c], abs=1e-3)
            assert block[name]["dice_argmax"] == pytest.approx(dice_argmax[c], abs=1e-3)
    # two variants
    assert any(block[n]["dice"] != block[n]["dice_argmax"] for n in LESIONS if block[n]["pos"])
    assert evaluate.default_out("hub:") == Path("authors") / "IDR+DDR+FGA+RET+MES" / "results.json"


def test_dice_argmax_refuses_sigmoid_models(cache_dir, synth_root, tmp_path):
    import evaluate
    from dataclasses import asdict

    cfg = model.ModelConfig(encoder="test_resnet", pretrained=False,
                            decoder_channels=(16, 8, 8, 8, 8))
    path = tmp_path / "ours.pt"
    model.save_checkpoint(path, {"model": model.build_model(cfg).state_dict(),
                                 "model_cfg": asdict(cfg), "args": {"resolution": 64}})
    with pytest.raises(ValueError) as e:
        evaluate.evaluate([str(path)], ["MES"], (synth_root, cache_dir, {}), device="cpu",
                          dice_argmax=True, verbose=False)
    msg = one_line(e)  # the flag, the checkpoint, and why: one sigmoid per lesion, not a softmax
    assert msg.startswith("--dice-argmax") and str(path) in msg and "sigmoid" in msg, msg


def test_segment_and_images_with_the_authors_model(authors_model, fixture_idrid, tmp_path):
    import numpy as np
    from PIL import Image

    import data
    import predict

    folder, net = authors_model
    photo = sorted((fixture_idrid / "A. Segmentation" / "1. Original Images").rglob("*.jpg"))[0]
    image = np.asarray(Image.open(photo).convert("RGB"))[::4, ::4].copy()  # (178, 268, 3)
    probs = predict.segment(image, str(folder), resolution=96, device="cpu")
    assert probs.shape == (4, *image.shape[:2]) and probs.dtype == np.float32
    # independent route: the torchseg reference
    square, fov, geometry = data.preprocess_image(image, 96)
    ref, _ = reference_probs(net, torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255)
    ref = ref[0].masked_fill(~torch.from_numpy(fov), 0.0)
    # segment()'s fundus edge
    outside = data.restore_geometry(torch.from_numpy(fov).float(), geometry) < 0.5
    ref = data.restore_geometry(ref, geometry).masked_fill_(outside, 0)
    assert np.abs(probs - ref.numpy()).max() <= 1e-4  # float32 in another order, as above
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(image).save(photos / "eye.png")
    predict.main(["--ckpt", str(folder), "--images", str(photos), "--out", str(tmp_path / "maps"),
                  "--resolution", "96", "--device", "cpu"])
    with Image.open(tmp_path / "maps" / "eye_HE.png") as im:
        assert im.size == (image.shape[1], image.shape[0])
