"""interop.py: ONNX against onnxruntime, conversion to and from segmentation_models_pytorch's Unet
(the peer).

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_interop.py
"""
import copy
import json
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

import interop
from model import ModelConfig, build_model, load_models, save_checkpoint
from protocol import predict

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def randomize_norms(net, seed=0):
    """Random batch-norm statistics and affine weights: eval-mode BN then matters, as in a
    trained model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, (lo, hi) in ((m.running_mean, (-0.2, 0.2)), (m.running_var, (0.5, 1.5)),
                                    (m.weight, (0.8, 1.2)), (m.bias, (-0.2, 0.2))):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=g))
    return net.eval()


def tiny_ckpt(encoder="test_resnet", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder=encoder, pretrained=False, **kw)
    net = randomize_norms(build_model(cfg), seed)
    return {"model": net.state_dict(), "model_cfg": asdict(cfg), "args": {"resolution": 64}}, net


def smp_unet(encoder="tu-test_resnet", centre_head=True, seed=0, **kw):
    """A freshly made random smp Unet (4 classes); centre_head: its 3x3 head's off-centre taps
    set to 0."""
    torch.manual_seed(seed)
    net = smp.Unet(encoder, encoder_weights=None, classes=kw.pop("classes", 4), **kw)
    if centre_head:
        with torch.no_grad():
            w = net.segmentation_head[0].weight  # (4, C, 3, 3)
            w.copy_(torch.nn.functional.pad(w[:, :, 1:2, 1:2], (1, 1, 1, 1)))
    return randomize_norms(net, seed)


GAP = 1e-9  # float64 logits of size ~5: a wrong weight or layer is off by far more


def logits_gap(ours, smp_model, shape=(2, 3, 67, 71)):
    """Max abs difference ours(x) vs smp((x - mean) / std), odd sizes (both Unets accept any
    size), both run in float64 (copies): the same function then agrees to ~1e-14, on any CPU.
    NOTE: in float32 the two sum in another order (scSE attention) and the gap depends on the
    CPU's kernels: 5e-6 on one machine, 1.2e-5 on another."""
    ours, smp_model = copy.deepcopy(ours).double(), copy.deepcopy(smp_model).double()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        a, b = ours.eval()(x), smp_model.eval()((x - ours.mean) / ours.std)
    assert a.shape == b.shape == (shape[0], 4, *shape[2:])
    assert a.abs().max() > 0.1  # not a trivially zero output
    return float((a - b).abs().max())


# ---- ONNX ----

def test_onnx_matches_torch_on_other_sizes(tmp_path):
    """An ensemble of two exported at 64x64 runs in onnxruntime at other batch sizes and odd
    sizes and gives protocol.predict's probabilities within 1e-4; the graph's batch, height and
    width are symbolic. The second member is shaped as the authors' models (softmax head, 3x3,
    inputs padded to 32: shape arithmetic in the graph)."""
    import onnx
    import onnxruntime as ort

    models = [tiny_ckpt(seed=0, attention=True)[1],
              tiny_ckpt(seed=1, classes=5, softmax=True, head_kernel=3, pad_to=32)[1]]
    path = interop.export_onnx(models, tmp_path / "m.onnx")
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in onnx.load(path).graph.input]
    assert dims == [["batch", 3, "height", "width"]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 67, 71), (1, 3, 35, 96)]:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(2))
        out = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            ref = predict(models, x).numpy()  # (B, 4, H, W) probabilities
        assert out.shape == ref.shape and out.dtype == np.float32
        assert 0 <= out.min() and out.max() <= 1
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    diff, torch_err = interop.check_onnx(models, path)
    assert diff <= 1e-4 and torch_err <= 1e-4  # probabilities: scale 1 (5e-7 measured)


def test_onnx_check_catches_another_model(tmp_path):
    """check_onnx compares the graph with the models given: another model's export fails in one
    line."""
    first, second = tiny_ckpt(seed=0)[1], tiny_ckpt(seed=1)[1]
    path = interop.export_onnx([first], tmp_path / "m.onnx")
    with pytest.raises(ValueError) as err:
        interop.check_onnx([second], path)
    assert "onnxruntime differs from torch" in one_line(err)


def test_onnx_cli_and_missing_package(tmp_path, monkeypatch, capsys):
    ckpt, _ = tiny_ckpt()
    save_checkpoint(tmp_path / "ck.pt", ckpt)
    interop.main(["onnx", str(tmp_path / "ck.pt"), str(tmp_path / "m.onnx")])
    assert "max abs diff" in capsys.readouterr().out and (tmp_path / "m.onnx").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "m.onnx"]  # no .tmp left
    with pytest.raises(ValueError) as err:  # no silent overwrite
        interop.main(["onnx", str(tmp_path / "ck.pt"), str(tmp_path / "m.onnx")])
    assert "--force" in one_line(err)
    # import onnxruntime now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError) as err:
        interop.main(["onnx", str(tmp_path / "ck.pt"), str(tmp_path / "m.onnx"), "--force"])
    assert "pip install onnx onnxruntime" in one_line(err)


def test_onnx_of_a_style_conditioned_model(tmp_path, capsys):
    """A style-conditioned checkpoint (FiLM after every decoder block) exports, and onnxruntime
    gives protocol.predict's probabilities (the default style) within 1e-4; FiLM's weights matter in
    the graph."""
    import onnxruntime as ort

    ckpt, net = tiny_ckpt(style_tokens=("IDR", "DDR"), token_styles=("fine", "coarse"))
    with torch.no_grad():  # as if trained: a random scale and shift per token (identity at init)
        g = torch.Generator().manual_seed(3)
        for film in net.decoder.films:
            film.gamma.copy_(0.5 * torch.randn(film.gamma.shape, generator=g))
            film.beta.copy_(0.5 * torch.randn(film.beta.shape, generator=g))
    ckpt["model"] = net.state_dict()
    save_checkpoint(tmp_path / "ck.pt", ckpt)
    interop.main(["onnx", str(tmp_path / "ck.pt"), str(tmp_path / "m.onnx")])
    assert "max abs diff" in capsys.readouterr().out
    x = torch.rand((2, 3, 67, 71), generator=torch.Generator().manual_seed(2))
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})[0]
    plain = tiny_ckpt()[1]  # the same weights without FiLM
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if ".films." not in k})
    with torch.no_grad():
        ref, unconditioned = predict([net], x).numpy(), predict([plain], x).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    assert np.abs(ref - unconditioned).max() > 1e-2  # the graph holds FiLM, not the bare U-Net


def test_onnx_output_that_is_a_folder_is_one_line(tmp_path):
    ckpt, _ = tiny_ckpt()
    save_checkpoint(tmp_path / "ck.pt", ckpt)
    (tmp_path / "out.onnx").mkdir()
    for force in ([], ["--force"]):  # --force cannot replace a folder by a file either
        with pytest.raises(ValueError) as err:
            interop.main(["onnx", str(tmp_path / "ck.pt"), str(tmp_path / "out.onnx"), *force])
        assert one_line(err).startswith(f"{tmp_path / 'out.onnx'} is a folder")
    assert list((tmp_path / "out.onnx").iterdir()) == []


# ---- smp ----

@pytest.mark.parametrize("encoder,attention", [("test_resnet", True), ("resnet18", False),
                                               ("test_efficientnet", True)])
def test_to_smp_and_back(encoder, attention):
    """ours -> smp: smp's own forward equals ours; -> ours again: the very same tensors and
    outputs."""
    ckpt, ours = tiny_ckpt(encoder, attention=attention)
    smp_model = interop.to_smp(ckpt)
    assert type(smp_model) is smp.Unet and smp_model.name == f"u-tu-{encoder}"
    assert logits_gap(ours, smp_model) <= GAP
    back = interop.from_smp(smp_model)
    assert back["model_cfg"] == ckpt["model_cfg"]
    assert back["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(back["model"][k], v) for k, v in ckpt["model"].items())
    assert logits_gap(load_models(back)[0], smp_model) <= GAP


@pytest.mark.parametrize("encoder,kw", [
    ("resnet18", {"decoder_attention_type": "scse"}),
    ("tu-test_resnet", {"decoder_channels": (64, 32, 32, 16, 16)})])
def test_from_random_smp_unet(encoder, kw):
    """A freshly made random smp Unet (smp's own resnet18 encoder or a timm one) -> ours gives
    smp's outputs, with smp's 3x3 head as a 3x3 head; back to smp: the very same tensors."""
    smp_model = smp_unet(encoder, centre_head=False, **kw)
    ckpt = interop.from_smp(smp_model)
    assert (ckpt["model_cfg"]["encoder"] == encoder.removeprefix("tu-")
            and ckpt["model_cfg"]["head_kernel"] == 3)
    assert logits_gap(load_models(ckpt)[0], smp_model) <= GAP
    if encoder.startswith("tu-"):  # to-smp writes tu- encoders (resnet18's keys differ by "model.")
        again = interop.to_smp(ckpt).state_dict()
        assert all(torch.equal(again[k], v) for k, v in smp_model.state_dict().items()
                   if ".4.attention1." not in k)


def test_from_smp_reads_a_centre_only_head_as_1x1():
    """Off-centre taps all 0 (as to-smp writes them) -> head_kernel=1, our default: the same
    outputs."""
    smp_model = smp_unet("resnet18", centre_head=True)
    ckpt = interop.from_smp(smp_model)
    assert (ckpt["model_cfg"]["head_kernel"] == 1
            and ckpt["model"]["head.weight"].shape == (4, 16, 1, 1))
    assert logits_gap(load_models(ckpt)[0], smp_model) <= GAP


@pytest.mark.parametrize("kw,words", [
    ({"encoder_depth": 4, "decoder_channels": (64, 32, 16, 16)}, "encoder_depth must be 5"),
    ({"activation": "sigmoid"}, "activation=None"),
    ({"decoder_interpolation": "bilinear"}, "decoder_interpolation"),
    ({"decoder_use_norm": False}, "decoder_use_norm"),
    ({"aux_params": {"classes": 4}}, "aux_params"),
    ({"classes": 3}, "classes must be 4"),
    ({"encoder_name": "mobilenet_v2"}, "no timm counterpart"),
])
def test_from_smp_refuses_what_has_no_counterpart(kw, words):
    encoder = kw.pop("encoder_name", "tu-test_resnet")
    with pytest.raises(ValueError) as err:
        interop.from_smp(smp_unet(encoder, **kw), where="my_unet")
    assert words in one_line(err) and one_line(err).startswith("my_unet: ")


def test_from_smp_refuses_other_architectures():
    with pytest.raises(ValueError) as err:
        interop.from_smp(smp.FPN("tu-test_resnet", encoder_weights=None, classes=4))
    assert "only smp.Unet" in one_line(err)


@pytest.mark.parametrize("encoder,kw,words", [
    # strides 4..32: smp adds a block
    ("test_convnext", {"decoder_channels": (64, 32, 16, 16)}, "feature strides"),
    ("test_resnet", {"classes": 5, "softmax": True, "head_kernel": 3, "pad_to": 32},
     "softmax head"),
    ("test_resnet", {"local_contrast": 2.0}, "local_contrast"),
    ("test_resnet", {"head_kernel": 5}, "5x5 head"),
])
def test_to_smp_refuses_what_has_no_counterpart(encoder, kw, words):
    ckpt, _ = tiny_ckpt(encoder, **kw)
    with pytest.raises(ValueError) as err:
        interop.to_smp(ckpt)
    assert words in one_line(err) and "no smp counterpart" in one_line(err)


def test_to_smp_refuses_an_ensemble():
    ckpt, _ = tiny_ckpt()
    with pytest.raises(ValueError) as err:
        interop.to_smp({"kind": "ensemble", "members": [ckpt, ckpt]})
    assert "ensemble of 2" in one_line(err)


def test_smp_cli_round_trip(tmp_path, capsys):
    """to-smp writes what smp.from_pretrained (smp's own loader, offline) reads; from-smp reads
    it back."""
    ckpt, ours = tiny_ckpt(attention=True)
    save_checkpoint(tmp_path / "ck.pt", ckpt)
    interop.main(["to-smp", str(tmp_path / "ck.pt"), str(tmp_path / "smp")])
    assert "mean=(0.5, 0.5, 0.5)" in capsys.readouterr().out  # test_resnet's timm normalization
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = smp.from_pretrained(str(tmp_path / "smp"))
    assert logits_gap(ours, loaded) <= GAP
    interop.main(["from-smp", str(tmp_path / "smp"), str(tmp_path / "back.pt")])
    assert logits_gap(load_models(tmp_path / "back.pt")[0], loaded) <= GAP
    with pytest.raises(FileNotFoundError) as err:
        interop.main(["from-smp", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")])
    assert "save_pretrained" in one_line(err)


# ---- what the exports say about themselves (issue 26) ----

def timm_normalization(encoder="test_resnet"):
    """(mean, std) from timm's own config of the encoder: the reference for the metadata."""
    import timm

    cfg = timm.create_model(encoder, pretrained=False).pretrained_cfg
    return tuple(cfg["mean"]), tuple(cfg["std"])


def test_onnx_metadata_describes_the_input(tmp_path):
    """The ONNX file's metadata_props: the training resolution, NCHW RGB in [0, 1], the encoder's
    mean/std (timm's config), the output's lesions; onnxruntime sees the same."""
    import onnx
    import onnxruntime as ort

    ckpt, _ = tiny_ckpt(lesions=("EX", "HE"))  # train.py --lesions EX,HE
    save_checkpoint(tmp_path / "ck.pt", ckpt)
    interop.main(["onnx", str(tmp_path / "ck.pt"), str(tmp_path / "m.onnx")])
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    mean, std = timm_normalization()
    assert (meta["resolution"], meta["layout"], meta["channel_order"], meta["value_range"]) == \
        ("64", "NCHW", "RGB", "0,1")
    assert [float(v) for v in meta["mean"].split(",")] == pytest.approx(mean)
    assert [float(v) for v in meta["std"].split(",")] == pytest.approx(std)
    assert (meta["lesions"], meta["trained_lesions"]) == ("EX,HE,MA,CWS", "EX,HE")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == meta


def test_smp_export_records_the_normalization_with_usual_permissions(tmp_path):
    """to-smp's config.json carries mean/std (timm's), which smp.from_pretrained ignores; every
    file gets the permissions of a new file under the umask (0640 under 027), not 0600."""
    ckpt, ours = tiny_ckpt()
    save_checkpoint(tmp_path / "ck.pt", ckpt)
    old = os.umask(0o027)
    try:
        interop.main(["to-smp", str(tmp_path / "ck.pt"), str(tmp_path / "smp")])
    finally:
        os.umask(old)
    config = json.loads((tmp_path / "smp" / "config.json").read_text())
    mean, std = timm_normalization()
    assert (config["_input_mean"] == pytest.approx(mean)
            and config["_input_std"] == pytest.approx(std))
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "smp").iterdir()}
    assert set(modes) >= {"config.json", "model.safetensors"}
    assert set(modes.values()) == {"0o640"}, modes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = smp.from_pretrained(str(tmp_path / "smp"))
    assert logits_gap(ours, loaded) <= GAP
