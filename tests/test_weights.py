"""weights.py: timm's pretrained encoders (one probe, then huggingface_hub's offline mode or torch's
hub cache), every failure one line and fast offline; --encoder-weights files (every format timm's
loader took, keys matched, pickled code never run). Nothing is downloaded.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_weights.py
"""
import urllib.error
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch

import authors
import weights
from model import ModelConfig, build_model, save_checkpoint


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def with_weights(path, encoder="test_resnet", pretrained=False):
    """A model whose encoder is read from the file `path` (train.py --encoder-weights PATH)."""
    encoder_net = weights.create_encoder(encoder, pretrained, str(path))
    return build_model(ModelConfig(encoder=encoder, pretrained=pretrained), encoder_net)


# ---- pretrained encoders ---------------------------------------------------------------------
def test_pretrained_download_failure_is_one_line(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):  # what timm raises with no network (URL weights)
        if pretrained:
            raise urllib.error.URLError(OSError(-2, "Name or service not known"))
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    # the probe answered; the download fails
    monkeypatch.setattr(weights, "hub_answers", lambda repo_id: True)
    monkeypatch.setattr(weights, "hf_offline", lambda: False)
    with pytest.raises(ValueError) as e:
        weights.create_encoder("test_resnet", pretrained=True)
    msg = one_line(e)
    assert msg.startswith("could not download pretrained weights for test_resnet"), msg
    assert "Hugging Face hub repository timm/test_resnet.r160_in1k" in msg and "URLError" in msg
    assert "--no-pretrained" in msg and "--encoder-weights PATH" in msg


def test_bad_encoder_names_are_one_line():
    # an unknown name: model.py's own line (test_model.py), with pretrained weights asked for too
    with pytest.raises(ValueError) as e:
        weights.create_encoder("no_such_net", pretrained=True)
    assert "unknown timm encoder 'no_such_net'" in one_line(e)
    with pytest.raises(ValueError) as e:
        weights.create_encoder("seresnet101", pretrained=True)  # timm has no weights for it
    assert "seresnet101" in one_line(e) and "--no-pretrained" in str(e.value)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_failures_are_one_fast_line(tmp_path, how, in_fresh_python):
    # NOTE: nothing is downloaded: HF_HUB_OFFLINE=1, or a hub endpoint and a proxy that refuse
    # connections (port 9). The paper's encoder has its weights on GitHub, in torch's hub cache once
    # downloaded: its line names both, and HF_HUB_OFFLINE=1 tries no URL (a refusal would show).
    proxy = "http://127.0.0.1:9"
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": proxy, "http_proxy": proxy,
           "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}
    env.update({"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": proxy})
    hf_cache = str(tmp_path / "hf")
    torch_file = tmp_path / "torch" / "hub" / "checkpoints" / "se_resnet101-7e38fcc6.pth"
    cases = {"weights.create_encoder('test_resnet', pretrained=True)":
             ("pretrained weights for test_resnet from the Hugging Face hub repository timm/",
              "HF_HUB_OFFLINE", hf_cache, "--no-pretrained", "--encoder-weights PATH"),
             "authors.load('hub:IDR+DDR')":
             (f"{authors.REPO}@DDR_IDRID", "HF_HUB_OFFLINE", hf_cache, "--ckpt a local folder"),
             "weights.create_encoder('legacy_seresnet101.in1k', pretrained=True)":
             ("pretrained weights for legacy_seresnet101.in1k from https://github.com/",
              f"not in torch's hub cache: {torch_file}", "--no-pretrained",
              "HF_HUB_OFFLINE is set" if how == "HF_HUB_OFFLINE" else "Connection refused")}
    results = in_fresh_python(list(cases), tmp_path, **env)
    for (text, seconds), expected in zip(results, cases.values()):
        assert "\n" not in text and text.startswith("could not download"), text
        assert all(e in text for e in expected), text
        assert ("Hugging Face" in text) == ("legacy" not in text), text  # right source and cache
        assert seconds < 10, (seconds, text)


def test_url_weights_in_torch_cache_are_used_offline(tmp_path, monkeypatch):
    """A URL encoder's weights in torch's hub cache load with HF_HUB_OFFLINE=1 and no download."""
    import torch.hub

    cfg = timm.models.get_pretrained_cfg("legacy_seresnet18.in1k")
    assert not cfg.hf_hub_id and cfg.url.startswith("https://github.com/")  # as legacy_seresnet101
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(3)
    sd = timm.create_model("legacy_seresnet18").state_dict()
    torch.save(sd, checkpoints / Path(cfg.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "hf_offline", lambda: True)

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(weights, "url_answers", no_download)
    net = build_model(ModelConfig(encoder="legacy_seresnet18.in1k"),
                      weights.create_encoder("legacy_seresnet18.in1k", pretrained=True))
    own = net.encoder.state_dict()
    assert set(own) <= set(sd) and all(torch.equal(v, sd[k]) for k, v in own.items())


# ---- --encoder-weights FILE ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["classifier", "features", "torchvision-old"])
def test_encoder_weights_from_local_file(tmp_path, kind):
    torch.manual_seed(1)
    src = timm.create_model("test_resnet", features_only=kind == "features")
    sd = src.state_dict()
    if kind == "torchvision-old":  # old torchvision files: no BN counters, wrapped in "state_dict"
        sd = {"state_dict": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}}
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    net = with_weights(path, pretrained=True)  # the file wins over the download
    ref = src.state_dict()
    for k, v in net.encoder.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, ref[k]), k


def test_encoder_weights_of_flattened_features_model(tmp_path):
    # byobnet's features_only model renames "stages.0" -> "stages_0": classifier files still load
    torch.manual_seed(1)
    full = timm.create_model("test_byobnet")
    path = tmp_path / "byob.pth"
    torch.save(full.state_dict(), path)
    net = with_weights(path, "test_byobnet")
    w = net.encoder.state_dict()["stages_0.0.attn.fc1.weight"]
    assert torch.equal(w, full.state_dict()["stages.0.0.attn.fc1.weight"])


def test_encoder_weights_errors_are_one_line(tmp_path):
    wrong = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), wrong)
    with pytest.raises(ValueError) as e:
        with_weights(wrong, pretrained=True)
    assert str(wrong) in one_line(e) and "does not match encoder test_resnet" in str(e.value)
    renamed = tmp_path / "renamed.pth"
    sd = timm.create_model("test_resnet").state_dict()
    torch.save({"backbone." + k: v for k, v in sd.items()}, renamed)
    with pytest.raises(ValueError) as e:
        with_weights(renamed, pretrained=True)
    assert "missing key" in one_line(e)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        with_weights(tmp_path / "nope.pth", pretrained=True)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError) as e:
        with_weights(junk, pretrained=True)
    assert "is not a weights file" in one_line(e)


# ---- --encoder-weights: read without running code pickled in the file (issue 23) ----
def test_encoder_weights_never_run_pickled_code(tmp_path, monkeypatch):
    """A weights file whose pickle calls a function when loaded is refused in one line, and the
    function never runs, whatever timm's loader does (timm 1.0.9-1.0.25: weights_only=False)."""
    import pathlib

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):  # unpickling calls Path.touch(marker)
            return pathlib.Path.touch, (marker,)

    sd = timm.create_model("test_resnet").state_dict()
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {**sd, "extra": Payload()}}, evil)

    # timm's loader as in timm 1.0.20 (weights_only=False): the file must not go through it
    def old_timm(path, *args, **kwargs):
        return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    monkeypatch.setattr(timm.models, "load_state_dict", old_timm)
    with pytest.raises(ValueError) as e:
        with_weights(evil)
    msg = one_line(e)
    assert msg.startswith(f"--encoder-weights {evil}"), msg
    assert "refused" in msg and "pickled" in msg, msg
    assert "pathlib.Path" in str(e.value) and not marker.exists()
    torch.load(evil, weights_only=False)  # the test's own check: unpickled, this file runs code
    assert marker.exists()


@pytest.mark.parametrize("kind", ["ours", "module-prefix", "timm-train", "ema", "safetensors"])
def test_encoder_weights_in_every_accepted_format(tmp_path, kind):
    """The formats timm's loader took: our own checkpoints (their encoder), DDP prefixes, timm's
    train.py checkpoints (args as argparse.Namespace, EMA weights first), .safetensors."""
    import argparse

    from safetensors.torch import save_file

    torch.manual_seed(2)
    src = timm.create_model("test_resnet", features_only=True)
    ref = src.state_dict()
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "ours":  # a training checkpoint of this project: the encoder's part is taken
        cfg = ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=(8, 8, 8, 8, 8))
        net = build_model(cfg)
        net.encoder.load_state_dict(ref)
        save_checkpoint(path, {"model": net.state_dict(), "model_cfg": asdict(cfg), "args": {}})
    elif kind == "module-prefix":
        torch.save({"model": {"module." + k: v for k, v in ref.items()}}, path)
    elif kind == "timm-train":
        torch.save({"state_dict": ref, "args": argparse.Namespace(lr=0.1), "epoch": 3}, path)
    elif kind == "ema":  # timm takes the EMA weights when a checkpoint has both
        zeros = {k: torch.zeros_like(v) for k, v in ref.items()}
        torch.save({"state_dict": zeros, "state_dict_ema": ref}, path)
    else:
        save_file({k: v.contiguous() for k, v in ref.items()}, str(path))
    for k, v in with_weights(path).encoder.state_dict().items():
        assert torch.equal(v, ref[k]), k
