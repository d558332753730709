"""hub.py and model.py's loader of the authors' released models: torchseg as the reference, no network.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_hub.py

The reference model is built by torchseg (the authors' library) and saved by huggingface_hub's
PyTorchModelHubMixin exactly as the authors' toolkit defines its hub class, so the folder is the released layout.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hub
import model
from model import load_checkpoint, load_models
from protocol import predict

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the authors' normalisation


def authors_class():
    """The hub class of the authors' toolkit (fundus_lesions_toolkit.models.hf_hub): a torchseg model as `model`."""
    torchseg = pytest.importorskip("torchseg")
    from huggingface_hub import PyTorchModelHubMixin

    class HuggingFaceModel(PyTorchModelHubMixin, torch.nn.Module):
        def __init__(self, arch: str, encoder: str, in_channels: int = 3, classes: int = 5):
            super().__init__()
            self.model = torchseg.create_model(arch=arch, encoder_name=encoder, encoder_weights=None,
                                               in_channels=in_channels, classes=classes)
    return HuggingFaceModel


@pytest.fixture(scope="module")
def authors_model(tmp_path_factory):
    """(folder in the hub layout, the torchseg model): random weights and random BatchNorm statistics."""
    torch.manual_seed(0)
    net = authors_class()(arch="unet", encoder="seresnext50_32x4d", in_channels=3, classes=5)
    with torch.no_grad():  # non-trivial running statistics, so that the buffers' mapping is checked too
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
    """The authors' inference: ImageNet normalisation, torchseg forward, softmax; the input padded with black to
    multiples of 32 (torchseg refuses other sizes) and the output cropped -> (B, 4, H, W) in EX, HE, MA, CWS."""
    H, W = x.shape[-2:]
    xp = F.pad(x, (0, -W % 32, 0, -H % 32))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.softmax(net((xp - mean) / std), dim=1)  # (B, 5, H', W'): BG, CTW, EX, HE, MA
    return p[:, [2, 3, 4, 1], :H, :W], p[..., :H, :W]


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_loader_matches_torchseg_on_a_size_not_a_multiple_of_32(authors_model):
    folder, net = authors_model
    assert json.loads((folder / "config.json").read_text()) == model.AUTHORS_CONFIG  # the released layout
    torch.manual_seed(1)
    x = torch.rand(1, 3, 80, 112)  # 2.5 x 3.5 times 32
    with pytest.raises(RuntimeError, match="divisible by 32"):
        net(x)  # why our model pads: the authors' decoder upsamples by exactly 2
    ref, _ = reference_probs(net, x)
    assert ref.std() > 0.05 and 0.01 < ref.mean() < 0.5  # not saturated: the comparison means something
    for path in (folder, folder / "model.safetensors"):  # the folder, and the weights file alone
        (ours,) = load_models(path)
        assert ours.softmax and ours.head.kernel_size == (3, 3)
        with torch.no_grad():
            probs = predict([ours], x)  # the protocol's prediction: (B, 4, H, W), sigmoid of the lesion logits
        assert probs.shape == (1, 4, 80, 112)
        assert (probs - ref).abs().max().item() <= 1e-5


def test_argmax_lesions_is_the_softmax_argmax(authors_model):
    folder, net = authors_model
    torch.manual_seed(2)
    x = torch.rand(2, 3, 64, 96)
    ref, full = reference_probs(net, x)
    winner = full.argmax(dim=1)  # (B, H, W) over BG, CTW, EX, HE, MA
    expected = torch.stack([winner == c for c in (2, 3, 4, 1)], dim=1)
    assert expected.any() and not expected.all()
    assert torch.equal(model.argmax_lesions(ref), expected)


def test_checkpoint_header_and_soup_round_trip(authors_model, tmp_path):
    folder, _ = authors_model
    ckpt = load_checkpoint(folder)
    assert ckpt["args"]["resolution"] == model.AUTHORS_RESOLUTION == 1024 and ckpt["method"] == "authors"
    # saved in our training format (what average.py writes) it loads back to the same weights
    model.save_checkpoint(tmp_path / "authors.pt", ckpt)
    a, b = load_models(folder)[0].state_dict(), load_models(tmp_path / "authors.pt")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_strict_key_mapping_errors_are_one_line(authors_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = authors_model
    sd = load_file(folder / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    cases = {
        "extra": ({**sd, "model.decoder.center.0.0.weight": torch.zeros(1)}, "no counterpart"),
        "missing": ({k: v for k, v in sd.items() if k != "model.segmentation_head.0.bias"}, "missing key 'head.bias'"),
        "shape": ({**sd, "model.segmentation_head.0.weight": torch.zeros(5, 16, 1, 1)}, "key 'head.weight' has shape"),
    }
    for name, (bad, expected) in cases.items():
        save_file(bad, tmp_path / "model.safetensors")
        with pytest.raises(ValueError) as e:
            load_models(tmp_path)
        assert expected in one_line(e) and str(tmp_path) in str(e.value), name
    (tmp_path / "config.json").write_text(json.dumps({**model.AUTHORS_CONFIG, "classes": 4}))
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path)
    assert "classes 5" in one_line(e)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_one_vs_rest_logits_give_the_softmax_even_for_extreme_logits():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 7, 9) * torch.tensor([1.0, 30.0, 300.0, 1e4, 1e-3]).view(1, 5, 1, 1)
    probs = torch.sigmoid(model.one_vs_rest_logits(logits))
    expected = torch.softmax(logits.double(), dim=1)[:, [2, 3, 4, 1]]
    assert torch.isfinite(probs).all() and (probs.double() - expected).abs().max() < 1e-6
    # the default head is the 1x1 sigmoid one of our runs (tests/test_model.py checks it against smp's U-Net)
    net = model.build_model(model.ModelConfig(encoder="test_resnet", pretrained=False))
    assert net.head.kernel_size == (1, 1) and not net.softmax and net.pad_to == 1


@pytest.mark.parametrize("spec, branch", [
    ("hub:", "main"), ("hub:IDR+DDR+FGA+RET+MES", "main"), ("hub:IDR+DDR", "DDR_IDRID"),
    ("hub:mes,idr", "IDRID_MESSIDOR"), ("hub:RET", "RETLES"), ("hub:FGA+DDR+RET", "DDR_FGADR_RETLES"), ("hub:IDR+DDR+FGA+MES", "DDR_FGADR_IDRID_MESSIDOR"),
])
def test_branch_names(spec, branch):
    assert hub.branch(hub.parse_spec(spec)) == branch


def test_branch_names_match_the_authors_export_tags():
    # reference/: the authors' runs are tagged with the same names ("DDR, FGADR, IDRID, RETLES"), sorted
    import csv

    with open(ROOT / "reference" / "lesions_database_cross_study.csv", newline="") as f:
        tags = {row["Tags"] for row in csv.DictReader(f)}
    names = {v: k for k, v in hub.HUB_NAMES.items()}
    for tag in tags:
        parts = [t.strip() for t in tag.split(",")]
        assert parts == sorted(parts)
        ids = [names[t] for t in parts]
        assert hub.branch(ids) == ("main" if len(ids) == 5 else "_".join(parts))
    with pytest.raises(ValueError, match="unknown dataset ID 'XYZ'"):
        hub.parse_spec("hub:IDR+XYZ")


def test_hub_spec_loads_through_the_download(authors_model, monkeypatch):
    folder, _ = authors_model
    asked = []
    monkeypatch.setattr(hub, "download", lambda branch, repo_id=hub.REPO: asked.append(branch) or folder)
    ckpt = load_checkpoint("hub:IDR+DDR")
    assert asked == ["DDR_IDRID"] and ckpt["args"]["train"] == ["IDR", "DDR"]
    assert ckpt["provenance"]["source"] == f"{hub.REPO}@DDR_IDRID"
    assert len(load_models("hub:")) == 1 and asked[-1] == "main"


def test_manifest_of_hub_members(authors_model, monkeypatch, tmp_path):
    folder, _ = authors_model
    monkeypatch.setattr(hub, "download", lambda branch, repo_id=hub.REPO: folder)
    manifest = tmp_path / "ens.json"
    manifest.write_text(json.dumps({"kind": "ensemble", "members": ["hub:IDR", str(folder)]}))
    assert len(load_models(manifest)) == 2


def _children(codes, tmp_path, **env):
    """Run each code line in one fresh interpreter with an empty hub cache -> [(its output, seconds it took)];
    the imports of torch and timm are not timed (seconds on a loaded machine, and not what is asked)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "HF_HUB_CACHE": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT), **env}
    prog = "import time, hub, model\n" + "".join(
        f"t = time.time()\ntry:\n    {code}\nexcept ValueError as e:\n    print(e)\nprint('@@', time.time() - t)\n"
        for code in codes)
    out = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=120)
    results, lines = [], []
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("@@ "):
            results.append(("\n".join(lines), float(line[3:])))
            lines = []
        else:
            lines.append(line)
    assert len(results) == len(codes) and not lines, out.stdout + out.stderr
    return results


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_failures_are_one_fast_line(tmp_path, how):
    # NOTE: nothing is downloaded: HF_HUB_OFFLINE=1, or a hub endpoint and a proxy that refuse
    # connections (port 9). The paper's encoder has its weights on GitHub, in torch's hub cache once
    # downloaded: its line names both, and HF_HUB_OFFLINE=1 tries no URL (a refusal would show).
    proxy = "http://127.0.0.1:9"
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": proxy, "http_proxy": proxy,
           "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}
    env.update({"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": proxy})
    hf_cache = str(tmp_path / "hf")
    torch_file = tmp_path / "torch" / "hub" / "checkpoints" / "se_resnet101-7e38fcc6.pth"
    cases = {"model.build_model(model.ModelConfig(encoder='test_resnet', pretrained=True))":
             ("pretrained weights for test_resnet from the Hugging Face hub repository timm/",
              "HF_HUB_OFFLINE", hf_cache, "--no-pretrained", "--encoder-weights PATH"),
             "model.load_checkpoint('hub:IDR+DDR')":
             (f"{hub.REPO}@DDR_IDRID", "HF_HUB_OFFLINE", hf_cache, "--ckpt a local folder"),
             "model.build_model(model.ModelConfig(encoder='legacy_seresnet101.in1k'))":
             ("pretrained weights for legacy_seresnet101.in1k from https://github.com/",
              f"not in torch's hub cache: {torch_file}", "--no-pretrained",
              "(HF_HUB_OFFLINE is set;" if how == "HF_HUB_OFFLINE" else "Connection refused")}
    for (text, seconds), expected in zip(_children(list(cases), tmp_path, **env), cases.values()):
        assert "\n" not in text and text.startswith("could not download"), text
        assert all(e in text for e in expected), text
        assert ("Hugging Face" in text) == ("legacy" not in text), text  # right source and cache
        assert seconds < 10, (seconds, text)


def test_cached_download_is_used_offline(authors_model, tmp_path):
    # the hub cache's own layout (refs/<branch> -> snapshots/<commit>/...), filled by hand: no network
    folder, _ = authors_model
    repo = tmp_path / "hf" / ("models--" + hub.REPO.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "DDR_IDRID").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in hub.FILES:
        (repo / "snapshots" / commit / name).symlink_to(folder / name)
    ((text, _),) = _children(["print(hub.download('DDR_IDRID'))"], tmp_path, HF_HUB_OFFLINE="1")
    assert text.endswith(str(repo / "snapshots" / commit)), text


def test_missing_huggingface_hub_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub -> ImportError
    with pytest.raises(ValueError) as e:
        hub.download("main")
    assert "pip install huggingface_hub" in one_line(e)


# ---------------------------------------------------------------------------------------------------------
# evaluate.py with the authors' models (needs its hub/argmax support)
# ---------------------------------------------------------------------------------------------------------
def reference_counts(net, ds):
    """Pooled Dice at p >= 0.5 and argmax Dice of the torchseg model over a prepared test set, FOV pixels only,
    in plain numpy -> (dice (4,), dice_argmax (4,), pos (4,))."""
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
    monkeypatch.setattr(hub, "download", lambda branch, repo_id=hub.REPO: folder)
    monkeypatch.chdir(tmp_path)  # the default --out of a hub spec: authors/<COMBO>/results.json
    evaluate.main(["--ckpt", "hub:IDR+DDR", "--test", "MES", "--data-root", str(synth_root), "--cache",
                   str(cache_dir), "--resolution", "128", "--device", "cpu", "--dice-argmax"])
    res = json.loads((tmp_path / "authors" / "IDR+DDR" / "results.json").read_text())
    assert res["method"] == "authors" and res["train"] == ["IDR", "DDR"] and res["checkpoints"] == ["hub:IDR+DDR"]
    assert res["protocol"]["resolution"] == 128 and res["protocol"]["dice_argmax"] is True
    dice, dice_argmax, pos = reference_counts(net, PreparedDataset(cache_dir, "MES", 128, "test"))
    block = res["results"]["MES"]["lesions"]
    for c, name in enumerate(LESIONS):
        assert block[name]["pos"] == pos[c]
        if pos[c]:  # a probability within 1e-5 of 0.5 may flip a pixel: pooled Dice agrees to 1e-3
            assert block[name]["dice"] == pytest.approx(dice[c], abs=1e-3)
            assert block[name]["dice_argmax"] == pytest.approx(dice_argmax[c], abs=1e-3)
    assert any(block[n]["dice"] != block[n]["dice_argmax"] for n in LESIONS if block[n]["pos"])  # two variants
    assert evaluate.default_out("hub:") == Path("authors") / "IDR+DDR+FGA+RET+MES" / "results.json"


def test_dice_argmax_refuses_sigmoid_models(cache_dir, synth_root, tmp_path):
    import evaluate
    from dataclasses import asdict

    cfg = model.ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=(16, 8, 8, 8, 8))
    path = tmp_path / "ours.pt"
    model.save_checkpoint(path, {"model": model.build_model(cfg).state_dict(), "model_cfg": asdict(cfg),
                                 "args": {"resolution": 64}})
    with pytest.raises(ValueError) as e:
        evaluate.evaluate_checkpoints([str(path)], ["MES"], synth_root, cache_dir, {}, device="cpu",
                                      dice_argmax=True, verbose=False)
    assert "one sigmoid per lesion" in one_line(e)


def test_segment_and_images_with_the_authors_model(authors_model, fixture_idrid, tmp_path):
    import numpy as np
    from PIL import Image

    import data
    import evaluate

    folder, net = authors_model
    photo = sorted((fixture_idrid / "A. Segmentation" / "1. Original Images").rglob("*.jpg"))[0]
    image = np.asarray(Image.open(photo).convert("RGB"))[::4, ::4].copy()  # (178, 268, 3)
    probs = evaluate.segment(image, str(folder), resolution=96, device="cpu")
    assert probs.shape == (4, *image.shape[:2]) and probs.dtype == np.float32
    square, fov, geometry = data.preprocess_image(image, 96)  # independent route: the torchseg reference
    ref, _ = reference_probs(net, torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255)
    ref = ref[0].masked_fill(~torch.from_numpy(fov), 0.0)
    outside = data.restore_geometry(torch.from_numpy(fov).float(), geometry) < 0.5  # segment()'s fundus edge
    ref = data.restore_geometry(ref, geometry).masked_fill_(outside, 0)
    assert np.abs(probs - ref.numpy()).max() <= 1e-5
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(image).save(photos / "eye.png")
    evaluate.main(["--ckpt", str(folder), "--images", str(photos), "--save-maps", str(tmp_path / "maps"),
                   "--resolution", "96", "--device", "cpu"])
    with Image.open(tmp_path / "maps" / "eye_HE.png") as im:
        assert im.size == (image.shape[1], image.shape[0])


def test_report_shows_the_authors_models_beside_ours(tmp_path):
    import report

    block = {"n_images": 3, "mean_aupr": 0.61, "mean_dice": 0.25, "mean_dice_argmax": 0.43, "lesions": {}}
    rec = {"version": 1, "checkpoints": ["hub:IDR+DDR"], "train": ["IDR", "DDR"], "seed": None, "method": "authors",
           "protocol": {}, "results": {"MES": block}}
    (tmp_path / "authors" / "IDR+DDR").mkdir(parents=True)
    (tmp_path / "authors" / "IDR+DDR" / "results.json").write_text(json.dumps(rec))
    ours = {**rec, "method": "baseline", "seed": 0, "results": {"MES": {**block, "mean_aupr": 0.5, "mean_dice": 0.4}}}
    (tmp_path / "runs" / "IDR+DDR" / "s0").mkdir(parents=True)
    (tmp_path / "runs" / "IDR+DDR" / "s0" / "results.json").write_text(json.dumps(ours))
    report.main([str(tmp_path / "runs"), "-o", str(tmp_path / "report"), "--authors", str(tmp_path / "authors")])
    md = (tmp_path / "report" / "report.md").read_text()
    # the export's mean AUPR of IDR+DDR on Messidor, from the CSV itself
    export = report.load_reference(ROOT / "reference" / "lesions_database_cross_study.csv")
    mean_export = sum(export[("IDR+DDR", "MES", les)] for les in ("EX", "HE", "MA", "CWS")) / 4
    assert f"| IDR+DDR | Messidor | 0.500 (n=1) | 0.610 | {mean_export:.3f} | 0.400 (n=1) | 0.250 | 0.430 |" in md
    assert "softmax vs sigmoid" in md and "ROI" in md
    assert json.loads((tmp_path / "report" / "authors.json").read_text())[-1]["model_dice_argmax"] == 0.43


# ---- timm weights from a URL (the paper's encoder): torch's hub cache (issue 23) ----
def test_url_weights_in_torch_cache_are_used_offline(tmp_path, monkeypatch):
    """A URL encoder's weights in torch's hub cache load with HF_HUB_OFFLINE=1 and no download."""
    import timm
    import torch.hub

    cfg = timm.models.get_pretrained_cfg("legacy_seresnet18.in1k")
    assert not cfg.hf_hub_id and cfg.url.startswith("https://github.com/")  # as legacy_seresnet101
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(3)
    weights = timm.create_model("legacy_seresnet18").state_dict()
    torch.save(weights, checkpoints / Path(cfg.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hub, "is_offline", lambda: True)

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    net = model.build_model(model.ModelConfig(encoder="legacy_seresnet18.in1k", pretrained=True))
    own = net.encoder.state_dict()
    assert set(own) <= set(weights) and all(torch.equal(v, weights[k]) for k, v in own.items())
