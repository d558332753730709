"""model.py: shapes at odd sizes, the default encoder's features, the softmax adapter, local
contrast, checkpoint I/O (atomic, Ctrl-C, a full disk), one-line errors; model.py copied alone.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_model.py
"""
import errno
import io
import os
import signal
import time
from dataclasses import asdict

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

import model
import utils
from model import ModelConfig, build_model, load_checkpoint, load_models, save_checkpoint




def tiny(encoder="test_resnet", **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder=encoder, pretrained=False, **kw))


def used_param_shapes(net, x):
    """Shapes of the parameters that get a gradient, in registration order (drops dead modules)."""
    net.zero_grad(set_to_none=True)
    net(x).sum().backward()
    return [tuple(p.shape) for p in net.parameters() if p.grad is not None]


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("encoder", ["test_resnet", "resnet18"])
def test_forward_backward_odd_size(encoder, attention):
    net = tiny(encoder, attention=attention, dropout=0.1)
    x = torch.rand(2, 3, 64 + 3, 96 + 7)
    y = net(x)
    assert y.shape == (2, 4, 67, 103)
    y.square().mean().backward()
    for name, p in net.named_parameters():  # every module is used: no dead parameters
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_four_stage_encoder():
    # convnext-style features start at stride 4: the final block jumps straight back to input size
    net = tiny("test_convnext", decoder_channels=(64, 32, 16, 8))
    assert net(torch.rand(1, 3, 64 + 3, 64 + 7)).shape == (1, 4, 67, 71)
    with pytest.raises(ValueError, match="decoder_channels needs 4 widths"):
        tiny("test_convnext")


def test_channels_last_input_gives_same_logits():
    # NOTE: float64: in float32 the channels_last kernels sum in another order (a CPU-dependent gap
    # of ~1e-6)
    net = tiny(attention=True).double().eval()
    x = torch.rand(2, 3, 67, 71, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        out = net(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("attention", [False, True])
def test_same_function_as_smp_unet(attention):
    # independent reference: smp's U-Net with the same timm encoder and widths, our 1x1 head instead
    # of its 3x3 one; smp also builds an scSE for the last block's (absent) skip that it never
    # calls, hence "used".
    ours = tiny(attention=attention)
    peer = smp.Unet(encoder_name="tu-test_resnet", encoder_weights=None, classes=4,
                    decoder_attention_type="scse" if attention else None)
    peer.segmentation_head[0] = torch.nn.Conv2d(16, 4, 1)
    x = torch.rand(2, 3, 64 + 3, 64 + 7)
    assert used_param_shapes(ours, x) == used_param_shapes(peer, x)
    # same weights in registration order -> same logits (smp expects normalised input)
    dead = {n for n, p in peer.named_parameters() if p.grad is None}
    peer_sd = {k: v for k, v in peer.state_dict().items() if k not in dead}
    ours_sd = ours.state_dict()
    assert len(peer_sd) == len(ours_sd)
    with torch.no_grad():
        for a, b in zip(ours_sd.values(), peer_sd.values()):
            b.copy_(a)
        # float64: the two sum in another order (scSE), a CPU-dependent float32 gap (1.2e-5 seen on
        # one CPU)
        ours, peer, x = ours.double().eval(), peer.double().eval(), x.double()
        torch.testing.assert_close(ours(x), peer((x - ours.mean) / ours.std), atol=1e-10,
                                   rtol=1e-10)


def test_default_encoder_features_feed_the_decoder():
    net = build_model(ModelConfig(pretrained=False))  # legacy_seresnet101.in1k, random weights
    info = net.encoder.feature_info
    assert info.channels() == [64, 256, 512, 1024, 2048]
    assert info.reduction() == [2, 4, 8, 16, 32]
    # blocks see upsampled deeper features + the skip:
    # (2048+1024), (256+512), (128+256), (64+64), 32
    assert [b.conv1.conv.in_channels for b in net.decoder.blocks] == [3072, 768, 384, 128, 32]
    assert net.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    net.eval()
    with torch.no_grad():
        feats = net.encoder(torch.rand(1, 3, 64, 64))
        assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
        assert net(torch.rand(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_state_dict_keys_split_encoder_decoder():
    net = tiny(attention=True)
    keys = list(net.state_dict())
    enc = timm.create_model("test_resnet", features_only=True)
    assert ([k for k in keys if k.startswith("encoder.")]
            == ["encoder." + k for k in enc.state_dict()])
    assert all(k.split(".")[0] in ("encoder", "decoder", "head") for k in keys)
    assert "mean" not in keys and "std" not in keys  # normalisation buffers are not persistent


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_checkpoint_round_trip(tmp_path, prefix):
    net = tiny(attention=True)
    net(torch.rand(2, 3, 64, 64))  # train mode: move the BN running stats off their init
    cfg = ModelConfig(encoder="test_resnet", pretrained=False, attention=True)
    # as DDP / torch.compile name them
    wrapped = {prefix + k: v for k, v in net.state_dict().items()}
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, {"model": wrapped, "model_cfg": asdict(cfg), "step": 3, "version": 1})
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no .tmp left behind
    raw = torch.load(path, weights_only=True)
    assert list(raw["model"]) == list(net.state_dict()) and raw["step"] == 3
    [loaded] = load_models(path)
    assert not loaded.training
    x = torch.rand(1, 3, 67, 71)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x), atol=0, rtol=0)


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "model_cfg": {}})
    with pytest.raises(Exception):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "model_cfg": {}, "bad": lambda: 0})
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
    assert torch.load(path, weights_only=True)["model"]["w"].tolist() == [1.0, 1.0]


def test_ctrl_c_during_a_checkpoint_write_lands_after_the_file_is_whole(tmp_path, monkeypatch):
    # The CI failure this guards: SIGINT inside torch.save became "RuntimeError: unexpected pos ..."
    # from its zip writer (a traceback, not the one-line exit). Here SIGINT arrives in the middle of
    # every write.
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, mid-write, as in the real failure
        real_save(obj, f)

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "model_cfg": {}, "step": 2})
    monkeypatch.setattr(model.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.full((1000,), 3.0)}, "model_cfg": {},
                               "step": 4})
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no .tmp left
    assert torch.load(path, weights_only=True)["step"] == 4  # the new file, whole
    # nested blocks deliver once, at the outer end; an ignored SIGINT stays ignored
    with pytest.raises(KeyboardInterrupt):
        with model.ctrl_c_deferred():
            save_checkpoint(path, {"model": {}, "model_cfg": {}, "step": 6})
            reached = True
    assert reached and torch.load(path, weights_only=True)["step"] == 6
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        save_checkpoint(path, {"model": {}, "model_cfg": {}, "step": 8})
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # put back, and the Ctrl-C ignored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(path, weights_only=True)["step"] == 8


def test_a_second_ctrl_c_stops_a_checkpoint_write_at_once(tmp_path, monkeypatch):
    real_save = torch.save

    def stuck_save(obj, f):  # a write on a slow disk; the user presses Ctrl-C twice
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        real_save(obj, f)

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {}, "model_cfg": {}, "step": 2})
    monkeypatch.setattr(model.torch, "save", stuck_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {}, "model_cfg": {}, "step": 4})
    assert (torch.load(path, weights_only=True)["step"] == 2
            and [p.name for p in tmp_path.iterdir()] == ["last.pt"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_load_models_ensemble(tmp_path):
    cfg = asdict(ModelConfig(encoder="test_resnet", pretrained=False))
    nets = [tiny().eval() for _ in range(2)]
    with torch.no_grad():
        nets[1].head.bias.add_(1.0)
    path = tmp_path / "ensemble.pt"
    save_checkpoint(path, {"kind": "ensemble",
                           "members": [{"model": n.state_dict(), "model_cfg": cfg} for n in nets]})
    loaded = load_models(str(path))
    assert len(loaded) == 2
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded, nets):
            torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_checkpoint_errors_are_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError) as e:
        load_checkpoint(text)
    assert str(text) in one_line(e)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    no_cfg = tmp_path / "no_cfg.pt"
    torch.save({"model": {}}, no_cfg)
    with pytest.raises(ValueError) as e:
        load_models(no_cfg)
    assert str(no_cfg) in one_line(e) and "'model_cfg'" in str(e.value)
    ens = tmp_path / "ens.pt"
    torch.save({"kind": "ensemble"}, ens)
    with pytest.raises(ValueError) as e:
        load_checkpoint(ens)
    assert "members" in one_line(e)


def test_load_models_rejects_state_dict_of_another_config(tmp_path):
    net = tiny(attention=False)
    path = tmp_path / "last.pt"
    cfg = ModelConfig(encoder="test_resnet", pretrained=False, attention=True)  # config disagrees
    save_checkpoint(path, {"model": net.state_dict(), "model_cfg": asdict(cfg)})
    with pytest.raises(ValueError) as e:
        load_models(path)
    msg = one_line(e)
    assert str(path) in msg and "missing key 'decoder.blocks.0.attention1." in msg


def test_bad_encoder_names_are_one_line():
    with pytest.raises(ValueError) as e:
        build_model(ModelConfig(encoder="no_such_net", pretrained=False))
    assert "unknown timm encoder 'no_such_net'" in one_line(e)
    # pretrained weights and --encoder-weights files: weights.py (tests/test_weights.py)


def test_config_from_dict_rejects_unknown_fields():
    cfg = model.config_from_dict({"encoder": "test_resnet", "decoder_channels": [8, 8, 8, 8, 8]})
    assert cfg.decoder_channels == (8, 8, 8, 8, 8)
    with pytest.raises(ValueError, match="unknown model_cfg field 'depth'"):
        model.config_from_dict({"depth": 5})


def test_config_from_dict_reads_older_checkpoints(tmp_path):
    """The input contract (resolution, lesions) of a checkpoint older than it comes from its
    training args; the encoder_weights key such checkpoints have is ignored."""
    old_cfg = {"encoder": "test_resnet", "pretrained": False, "decoder_channels": [8, 8, 8, 8, 8],
               "encoder_weights": "/gone/seresnet101.pth"}
    cfg = model.config_from_dict(old_cfg, {"resolution": 96, "lesions": ["HE", "EX"]})
    assert (cfg.resolution, cfg.lesions) == (96, ("HE", "EX"))
    # a config written with resolution None (ModelConfig's default) takes it from the args too
    cfg = model.config_from_dict({**old_cfg, "resolution": None}, {"resolution": 96})
    assert cfg.resolution == 96
    cfg = model.config_from_dict(old_cfg)  # no args either: unknown resolution, all four lesions
    assert (cfg.resolution, cfg.lesions) == (None, ("EX", "HE", "MA", "CWS"))
    for bad, name in (({"resolution": 12.5}, "resolution"), ({"resolution": 0}, "resolution"),
                      ({"lesions": ["SE"]}, "lesions")):
        with pytest.raises(ValueError, match=name):
            model.config_from_dict({**old_cfg, **bad})
    torch.manual_seed(0)
    net = build_model(model.config_from_dict(old_cfg))
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"model": net.state_dict(), "model_cfg": old_cfg,
                           "args": {"resolution": 64}})
    (loaded,) = load_models(path)
    assert loaded.cfg.resolution == 64 and loaded.cfg.lesions == model.LESIONS


def test_one_vs_rest_logits_give_the_softmax_even_for_extreme_logits():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 7, 9) * torch.tensor([1.0, 30.0, 300.0, 1e4, 1e-3]).view(1, 5, 1, 1)
    probs = torch.sigmoid(model.one_vs_rest_logits(logits))
    expected = torch.softmax(logits.double(), dim=1)[:, [2, 3, 4, 1]]
    assert torch.isfinite(probs).all() and (probs.double() - expected).abs().max() < 1e-6
    # the default head is the 1x1 sigmoid one of our runs (test_same_function_as_smp_unet checks it)
    net = build_model(ModelConfig(encoder="test_resnet", pretrained=False))
    assert net.head.kernel_size == (1, 1) and not net.softmax and net.pad_to == 1


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""
    room = 100

    def write(self, b):
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_checkpoint_on_a_full_disk_is_one_oserror_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "model_cfg": {}, "step": 2})
    full_disk = lambda p, mode: FullDisk(p, mode.replace("b", ""))  # noqa: E731
    monkeypatch.setattr(model, "open", full_disk, raising=False)
    # torch's zip writer turned it into "RuntimeError: unexpected pos"
    with pytest.raises(OSError) as err:
        save_checkpoint(path, {"model": {"w": torch.zeros(10_000)}, "model_cfg": {}, "step": 4})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    msg = utils.message(err.value)  # the line a script ends with: the file, what failed, why
    assert msg.startswith(f"{path}: ") and "checkpoint" in msg, msg
    assert "No space left on device" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no .tmp left
    assert torch.load(path, weights_only=True)["step"] == 2


# ---- model.local_contrast (bench/real.py's recipe) ----
def test_local_contrast_removes_smooth_illumination():
    torch.manual_seed(0)
    H = W = 96
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    fov = ((yy - 48) ** 2 + (xx - 48) ** 2 < 40 ** 2).float()
    texture = 0.05 * torch.rand(1, 3, H, W)
    flat = (0.4 + texture) * fov
    lit = (0.4 + 0.15 * xx / W + texture) * fov  # a smooth gradient of illumination
    a, b = model.local_contrast(flat, 4.0), model.local_contrast(lit, 4.0)
    inside = fov.bool().expand(1, 3, H, W)
    assert (a[~inside] == 0.5).all() and (b[~inside] == 0.5).all()  # background: a flat grey
    # the gradient is gone; the texture (+-0.1 after x4) stays
    assert (a - b)[inside].abs().max() < 0.02
    assert (a[inside] - 0.5).abs().mean() > 0.03


def test_local_contrast_off_is_the_plain_model():
    cfg = ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=(16, 8, 8, 8, 8))
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    torch.manual_seed(0)
    on = build_model(ModelConfig(**{**cfg.__dict__, "local_contrast": 3.0})).eval()
    # a fixed layer: no weights, soups still work
    assert plain.state_dict().keys() == on.state_dict().keys()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(plain(x), on(x))
        on.local_contrast = 0.0
        assert torch.equal(plain(x), on(x))
    older = {"encoder": "test_resnet", "decoder_channels": [16, 8, 8, 8, 8], "attention": False,
             "classes": 4}  # a model_cfg of older checkpoints
    assert model.architecture(older) == model.architecture(asdict(cfg))


COPIED = """
import dataclasses, os, sys
sys.path.insert(0, os.getcwd())  # this folder only: nothing else of the project
import torch
import model

torch.manual_seed(0)
# the paper's SE-ResNet101 U-Net
cfg = model.ModelConfig(pretrained=False, resolution=96, lesions=("HE",))
net = model.build_model(cfg).eval()
model.save_checkpoint("ckpt/best.pt",
                      {"model": net.state_dict(), "model_cfg": dataclasses.asdict(cfg)})
(loaded,) = model.load_models("ckpt/best.pt")
x = torch.rand(1, 3, 96, 80)
with torch.no_grad():
    a, b = net(x), loaded(x)
print(loaded.cfg.resolution, loaded.cfg.lesions, tuple(b.shape), torch.equal(a, b))
"""


def test_model_py_works_copied_alone_into_an_empty_folder(tmp_path):
    """model.py is the file people copy: alone in a folder (no other module of this project
    importable), it builds the paper's model (random weights), saves and loads a checkpoint and
    predicts."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).resolve().parents[1] / "model.py", tmp_path / "model.py")
    (tmp_path / "run.py").write_text(COPIED)
    # -I: isolated (no PYTHONPATH, no script folder on the path), -B: no __pycache__
    r = subprocess.run([sys.executable, "-I", "-B", "run.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "96 ('HE',) (1, 4, 96, 80) True"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model.py", "run.py"]


# --------------------------------------------------------------------------------------------------
# TB: style conditioning (FiLM, SegModel.style_mix), from the old tests/test_style.py: off is the
# paper's model bit for bit, a fresh conditioned model computes the same function, tokens separate
# after training, checkpoints keep the conditioning. Models from conftest's style_net (test_resnet,
# a small decoder).
# --------------------------------------------------------------------------------------------------
FILM_TOKENS = ("fine", "mixed", "coarse")


def unet_reference_forward(net, x):
    """The paper's U-Net written out (encoder -> every decoder block -> head): what the off model
    must compute."""
    features = net.encoder((x - net.mean) / net.std)
    y = features[-1]
    for block, skip in zip(net.decoder.blocks, features[-2::-1]):
        y = block(y, skip=skip)
    return net.head(net.decoder.blocks[-1](y, size=x.shape[-2:]))


def test_style_off_is_the_unconditioned_model_bit_for_bit(style_net):
    off, conditioned = style_net(), style_net(style_tokens=FILM_TOKENS)
    widths = off.cfg.decoder_channels
    keys = list(off.state_dict())
    assert not any("film" in k for k in keys)
    assert [k for k in conditioned.state_dict() if k not in keys] == [
        f"decoder.films.{i}.{p}" for i in range(len(widths)) for p in ("gamma", "beta")]
    assert len(list(off.buffers())) == len(list(conditioned.buffers()))  # FiLM adds parameters only
    # a few thousand parameters at the paper's widths:
    # 2 x 3 tokens x (256 + 128 + 64 + 32 + 16) = 2976
    assert (sum(p.numel() for n, p in conditioned.named_parameters() if "films" in n)
            == 2 * 3 * sum(widths))
    x = torch.rand(2, 3, 64 + 3, 64 + 7)
    for mode in ("eval", "train"):  # train: BatchNorm on batch statistics
        getattr(off, mode)()
        assert torch.equal(off(x), unet_reference_forward(off, x)), mode
    with pytest.raises(ValueError, match="not style-conditioned"):
        off(x, style="fine")


def test_style_identity_init_gives_the_unconditioned_outputs(style_net):
    off, conditioned = style_net().eval(), style_net(style_tokens=FILM_TOKENS).eval()
    sd = conditioned.state_dict()
    # same init, same RNG draws
    assert all(torch.equal(v, sd[k]) for k, v in off.state_dict().items())
    x = torch.rand(3, 3, 67, 71)
    with torch.no_grad():
        want = off(x)
        for s in (None, "fine", "coarse", torch.tensor([0, 2, 1])):
            assert torch.equal(conditioned(x, style=s), want), s


def test_style_tokens_differ_after_a_training_step_and_unseen_tokens_stay_identity(style_net):
    net = style_net(style_tokens=FILM_TOKENS).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 64, 64), (torch.rand(4, 4, 64, 64) > 0.9).float()
    torch.nn.functional.binary_cross_entropy_with_logits(
        net(x, style=torch.tensor([0, 0, 2, 2])), y).backward()
    opt.step()
    # "mixed" (token 1) had no patch: no gradient, still the identity
    for film in net.decoder.films:
        assert torch.count_nonzero(film.gamma[1]) == 0 and torch.count_nonzero(film.beta[1]) == 0
        assert torch.count_nonzero(film.gamma[0]) > 0 and torch.count_nonzero(film.beta[2]) > 0
    net.eval()
    with torch.no_grad():
        fine, coarse = net(x, style="fine"), net(x, style="coarse")
        assert (fine - coarse).abs().max() > 1e-4
        assert torch.equal(net(x), fine)  # None = the default style, fine
        assert torch.equal(net(x, style=torch.tensor([2, 2, 2, 2])), coarse)


def test_film_scale_and_shift_and_the_mean_of_dataset_tokens(style_net, randomize_films):
    import copy

    # dataset tokens: "fine" is the mean of the fine datasets' tokens, "RET" its own
    net = randomize_films(style_net(style_tokens=("IDR", "DDR", "RET", "MES"),
                                    token_styles=("fine", "fine", "coarse", "fine")), 3)
    assert (net.default_style == "fine"
            and net.styles() == ("IDR", "DDR", "RET", "MES", "fine", "coarse"))
    third = float(torch.tensor(1 / 3))  # float32
    assert net.style_mix("fine", 2).tolist() == [[third, third, 0, third]] * 2
    assert net.style_mix("ret", 1).tolist() == [[0, 0, 1, 0]]
    width = net.cfg.decoder_channels[1]
    film, x = net.decoder.films[1], torch.randn(2, width, 5, 7, dtype=torch.float64)
    g, b = film.gamma.detach().double(), film.beta.detach().double()
    want = (x * (1 + (g[0] + g[1] + g[3]) / 3)[None, :, None, None]
            + ((b[0] + b[1] + b[3]) / 3)[None, :, None, None])
    got = copy.deepcopy(film).double()(x, torch.tensor([[1 / 3, 1 / 3, 0, 1 / 3]] * 2,
                                                       dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError) as err:  # the style asked for and the model's own, named
        net.style_mix("mixed", 1)
    assert "'mixed'" in str(err.value) and "IDR, DDR, RET, MES, fine, coarse" in str(err.value)
    # a model trained without a fine set defaults to its first token's style
    assert style_net(style_tokens=("coarse",)).default_style == "coarse"


def test_style_checkpoint_round_trip_and_older_checkpoints(style_net, randomize_films,
                                                           style_checkpoint, tmp_path):
    net = randomize_films(style_net(style_tokens=("fine", "coarse")), 1).eval()
    (loaded,) = load_models(style_checkpoint(tmp_path / "c.pt", net))
    assert loaded.style_tokens == ("fine", "coarse") and loaded.token_styles == ("fine", "coarse")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for s in ("fine", "coarse"):
            assert torch.equal(loaded(x, style=s), net(x, style=s))
    # a checkpoint written before style conditioning lacks both fields: it loads as the
    # unconditioned model
    old = style_net().eval()
    cfg = asdict(old.cfg)
    del cfg["style_tokens"], cfg["token_styles"]
    save_checkpoint(tmp_path / "old.pt", {"model": old.state_dict(), "model_cfg": cfg, "args": {}})
    (loaded,) = load_models(tmp_path / "old.pt")
    assert loaded.style_tokens == () and torch.equal(loaded(x), old(x))
