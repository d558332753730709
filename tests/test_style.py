"""Style conditioning (train.py --style-condition, model.FiLM, evaluate.py --style, style.py): off is the paper's
model bit for bit, a fresh conditioned model computes the same function, tokens separate after training,
checkpoints, soups and ensembles keep the conditioning, and every misuse is one line.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_style.py
"""
import copy
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import average
import evaluate
import style
import train
from data import PatchDataset
from data.cache import FOV_BIT
from model import ModelConfig, build_model, load_models, save_checkpoint
from protocol import predict

WIDTHS = (16, 8, 8, 8, 8)
TOKENS = ("fine", "mixed", "coarse")


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=WIDTHS, **kw))


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def randomize_films(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for film in net.decoder.films:
            film.gamma.copy_(0.5 * torch.randn(film.gamma.shape, generator=g))
            film.beta.copy_(0.5 * torch.randn(film.beta.shape, generator=g))
    return net


def reference_forward(net, x):
    """The paper's U-Net written out (encoder -> every decoder block -> head): what the off model must compute."""
    features = net.encoder((x - net.mean) / net.std)
    y = features[-1]
    for block, skip in zip(net.decoder.blocks, features[-2::-1]):
        y = block(y, skip=skip)
    return net.head(net.decoder.blocks[-1](y, size=x.shape[-2:]))


def checkpoint(path, net, train_ids=("IDR", "RET")):
    save_checkpoint(path, {"model": net.state_dict(), "model_cfg": asdict(ModelConfig(
        encoder="test_resnet", pretrained=False, decoder_channels=WIDTHS, style_tokens=net.style_tokens,
        token_styles=net.token_styles)), "args": {"resolution": 64, "train": list(train_ids)}, "step": 0})
    return path


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
def test_off_is_the_unconditioned_model_bit_for_bit():
    off, conditioned = tiny(), tiny(style_tokens=TOKENS)
    keys = list(off.state_dict())
    assert not any("film" in k for k in keys)
    assert [k for k in conditioned.state_dict() if k not in keys] == [
        f"decoder.films.{i}.{p}" for i in range(len(WIDTHS)) for p in ("gamma", "beta")]
    assert len(list(off.buffers())) == len(list(conditioned.buffers()))  # FiLM adds parameters only
    # a few thousand parameters at the paper's widths: 2 x 3 tokens x (256 + 128 + 64 + 32 + 16) = 2976
    assert sum(p.numel() for n, p in conditioned.named_parameters() if "films" in n) == 2 * 3 * sum(WIDTHS)
    x = torch.rand(2, 3, 64 + 3, 64 + 7)
    for mode in ("eval", "train"):  # train: BatchNorm on batch statistics
        getattr(off, mode)()
        assert torch.equal(off(x), reference_forward(off, x)), mode
    with pytest.raises(ValueError, match="not style-conditioned"):
        off(x, style="fine")


def test_identity_init_gives_the_unconditioned_outputs():
    off, conditioned = tiny().eval(), tiny(style_tokens=TOKENS).eval()
    sd = conditioned.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in off.state_dict().items())  # same init, same RNG draws
    x = torch.rand(3, 3, 67, 71)
    with torch.no_grad():
        want = off(x)
        for s in (None, "fine", "coarse", torch.tensor([0, 2, 1])):
            assert torch.equal(conditioned(x, style=s), want), s


def test_tokens_differ_after_a_training_step_and_unseen_tokens_stay_identity():
    net = tiny(style_tokens=TOKENS).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 64, 64), (torch.rand(4, 4, 64, 64) > 0.9).float()
    F.binary_cross_entropy_with_logits(net(x, style=torch.tensor([0, 0, 2, 2])), y).backward()
    opt.step()
    for film in net.decoder.films:  # "mixed" (token 1) had no patch: no gradient, still the identity
        assert torch.count_nonzero(film.gamma[1]) == 0 and torch.count_nonzero(film.beta[1]) == 0
        assert torch.count_nonzero(film.gamma[0]) > 0 and torch.count_nonzero(film.beta[2]) > 0
    net.eval()
    with torch.no_grad():
        fine, coarse = net(x, style="fine"), net(x, style="coarse")
        assert (fine - coarse).abs().max() > 1e-4
        assert torch.equal(net(x), fine)  # None = the default style, fine
        assert torch.equal(net(x, style=torch.tensor([2, 2, 2, 2])), coarse)


def test_film_scale_and_shift_and_the_mean_of_dataset_tokens():
    # dataset tokens: "fine" is the mean of the fine datasets' tokens, "RET" its own
    net = randomize_films(tiny(style_tokens=("IDR", "DDR", "RET", "MES"), token_styles=("fine", "fine", "coarse",
                                                                                           "fine")), 3)
    assert net.default_style == "fine" and net.styles() == ("IDR", "DDR", "RET", "MES", "fine", "coarse")
    third = float(torch.tensor(1 / 3))  # float32
    assert net.style_mix("fine", 2).tolist() == [[third, third, 0, third]] * 2
    assert net.style_mix("ret", 1).tolist() == [[0, 0, 1, 0]]
    film, x = net.decoder.films[1], torch.randn(2, WIDTHS[1], 5, 7, dtype=torch.float64)
    g, b = film.gamma.detach().double(), film.beta.detach().double()
    want = x * (1 + (g[0] + g[1] + g[3]) / 3)[None, :, None, None] + ((b[0] + b[1] + b[3]) / 3)[None, :, None, None]
    got = copy.deepcopy(film).double()(x, torch.tensor([[1 / 3, 1 / 3, 0, 1 / 3]] * 2, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="'mixed' is not one of the model's: IDR, DDR, RET, MES, fine, coarse"):
        net.style_mix("mixed", 1)
    # a model trained without a fine set defaults to its first token's style
    assert tiny(style_tokens=("coarse",)).default_style == "coarse"


def test_checkpoint_round_trip_and_older_checkpoints(tmp_path):
    net = randomize_films(tiny(style_tokens=("fine", "coarse")), 1).eval()
    (loaded,) = load_models(checkpoint(tmp_path / "c.pt", net))
    assert loaded.style_tokens == ("fine", "coarse") and loaded.token_styles == ("fine", "coarse")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for s in ("fine", "coarse"):
            assert torch.equal(loaded(x, style=s), net(x, style=s))
    # a checkpoint written before style conditioning lacks both fields: it loads as the unconditioned model
    old = tiny().eval()
    cfg = asdict(ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=WIDTHS))
    del cfg["style_tokens"], cfg["token_styles"]
    save_checkpoint(tmp_path / "old.pt", {"model": old.state_dict(), "model_cfg": cfg, "args": {}})
    (loaded,) = load_models(tmp_path / "old.pt")
    assert loaded.style_tokens == () and torch.equal(loaded(x), old(x))


# ---------------------------------------------------------------------------------------------------------
# Data and training
# ---------------------------------------------------------------------------------------------------------
class FlatSet:
    """A prepared-dataset stand-in whose every pixel has one grey value and is inside the FOV."""

    def __init__(self, grey, n=3, size=32):
        self.grey, self.n, self.size = grey, n, size

    def __len__(self):
        return self.n

    def read(self, j):
        return (np.full((self.size, self.size, 3), self.grey, np.uint8),
                np.full((self.size, self.size), 1 << FOV_BIT, np.uint8))

    def geometry(self, j):
        return {"size": (self.size, self.size), "pad": (0, 0)}


def test_patches_carry_their_datasets_token_and_the_plain_stream_is_unchanged():
    sets = [FlatSet(40), FlatSet(200, n=5)]
    plain = PatchDataset(sets, patch=16, length=40, seed=3, augment=False)
    tagged = PatchDataset(sets, patch=16, length=40, seed=3, augment=False, styles=[2, 0])
    seen = set()
    for i in range(len(plain)):
        a, b = plain[i], tagged[i]
        assert "style" not in a and all(torch.equal(a[k], b[k]) for k in a)
        grey = int(b["image"][0, 8, 8])  # which dataset the patch came from, read off its pixels
        assert b["style"].dtype == torch.int64 and int(b["style"]) == {40: 2, 200: 0}[grey]
        seen.add(grey)
    assert seen == {40, 200}
    batch = torch.utils.data.default_collate([tagged[i] for i in range(4)])
    assert batch["style"].shape == (4,)
    with pytest.raises(ValueError, match="1 style tokens for 2 datasets"):
        PatchDataset(sets, styles=[0])


def test_style_tokens_from_the_table_and_from_characterize_json(tmp_path):
    assert style.style_tokens("off", ["IDR", "RET"]) == ((), (), {})
    assert style.style_tokens("style", ["IDR", "DDR", "RET", "MES"]) == (
        ("fine", "coarse"), ("fine", "coarse"), {"IDR": 0, "DDR": 0, "RET": 1, "MES": 0})
    assert style.style_tokens("dataset", ["IDR", "FGA", "RET"]) == (
        ("IDR", "FGA", "RET"), ("fine", "mixed", "coarse"), {"IDR": 0, "FGA": 1, "RET": 2})
    path = tmp_path / "characterize.json"  # characterize.py's format: {"datasets": {ID: {"style": ...}}}
    path.write_text(json.dumps({"datasets": {"IDR": {"style": "coarse"}, "RET": {"style": "fine"},
                                             "MES": {"style": "undetermined"}}}))
    assert style.style_tokens("style", ["IDR", "RET"], path) == (
        ("fine", "coarse"), ("fine", "coarse"), {"IDR": 1, "RET": 0})
    with pytest.raises(ValueError) as err:
        style.style_tokens("style", ["IDR", "MES"], path)
    assert "training set MES the style 'undetermined'" in one_line(err)
    with pytest.raises(ValueError) as err:
        style.style_tokens("style", ["DDR"], path)
    assert "training set DDR the style None" in one_line(err)
    with pytest.raises(FileNotFoundError, match="--characterize file not found"):
        style.style_tokens("style", ["IDR"], tmp_path / "missing.json")


def tiny_args(synth_root, tmp_path, out, *extra):
    return train.parse_args([
        "--train", "IDR,RET", "--out", str(out), "--data-root", str(synth_root), "--cache", str(tmp_path / "cache"),
        "--encoder", "test_resnet", "--no-pretrained", "--decoder-channels", "16,8,8,8,8", "--resolution", "64",
        "--patch", "64", "--batch", "4", "--iters", "2", "--val-every", "2", "--warmup", "1", "--lr", "1e-2",
        "--device", "cpu", "--dtype", "float32", "--workers", "0", *extra])


def test_train_style_condition_end_to_end(synth_root, tmp_path):
    out = tmp_path / "runs" / "cond"
    train.run(tiny_args(synth_root, tmp_path, out, "--style-condition", "style"))
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["model_cfg"]["style_tokens"] == ("fine", "coarse") and ckpt["args"]["style_condition"] == "style"
    films = [v for k, v in ckpt["model"].items() if "films" in k]
    assert all(torch.count_nonzero(v[t]) > 0 for v in films for t in (0, 1))  # both tokens were trained
    (net,) = load_models(out / "best.pt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert (net(x, style="fine") - net(x, style="coarse")).abs().max() > 0
    with pytest.raises(ValueError) as err:  # a resume under another conditioning
        train.run(tiny_args(synth_root, tmp_path, out, "--iters", "3"))
    assert "--style-condition style -> off" in one_line(err)


def test_train_flag_errors(synth_root, tmp_path):
    with pytest.raises(ValueError) as err:
        tiny_args(synth_root, tmp_path, tmp_path / "x", "--characterize", str(tmp_path / "c.json"))
    assert "--characterize gives the styles of --style-condition" in one_line(err)
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(ValueError) as err:
        tiny_args(synth_root, tmp_path, tmp_path / "x", "--style-condition", "dataset", "--characterize",
                  str(tmp_path / "c.json"))
    assert "is not readable JSON" in one_line(err)
    with pytest.raises(SystemExit):
        tiny_args(synth_root, tmp_path, tmp_path / "x", "--style-condition", "labels")


# ---------------------------------------------------------------------------------------------------------
# Evaluation, averaging, ensembles
# ---------------------------------------------------------------------------------------------------------
def fundus(h=90, w=120):
    """A red disc on black: enough of a fundus for the FOV crop."""
    yy, xx = np.mgrid[:h, :w]
    image = np.zeros((h, w, 3), np.uint8)
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * h) ** 2
    image[disc] = (170, 80, 40)
    image[disc & (xx % 9 == 0)] = (120, 40, 30)  # some texture
    return image


def test_evaluate_style_refusals_are_one_line_before_any_work(tmp_path):
    plain = checkpoint(tmp_path / "plain.pt", tiny())
    cond = checkpoint(tmp_path / "cond.pt", tiny(style_tokens=("fine", "coarse")))
    nowhere = ["--test", "IDR", "--data-root", str(tmp_path / "no-data"), "--cache", str(tmp_path / "no-cache"),
               "--device", "cpu"]
    with pytest.raises(ValueError) as err:
        evaluate.main(["--ckpt", str(plain), "--style", "fine", *nowhere])
    assert one_line(err) == ("--style fine: the model is not style-conditioned (train.py --style-condition)")
    with pytest.raises(ValueError) as err:
        evaluate.main(["--ckpt", str(cond), "--style", "mixed", *nowhere])
    assert one_line(err) == "--style mixed: style 'mixed' is not one of the model's: fine, coarse"
    with pytest.raises(ValueError) as err:  # an ensemble with an unconditioned member
        evaluate.main(["--ckpt", str(cond), str(plain), "--style", "coarse", *nowhere])
    assert "not style-conditioned" in one_line(err)
    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(ValueError) as err:
        evaluate.main(["--ckpt", str(plain), "--images", str(photos), "--style", "coarse", "--device", "cpu"])
    assert one_line(err).startswith("--style coarse: the model is not style-conditioned")
    assert not (tmp_path / "no-cache").exists()


def test_segment_and_ensembles_pass_the_style_to_every_member(tmp_path):
    a, b = (randomize_films(tiny(seed, style_tokens=("fine", "coarse")), seed).eval() for seed in (1, 2))
    image = fundus()
    maps = {s: evaluate.segment(image, [a], resolution=64, style=s) for s in (None, "fine", "coarse")}
    assert maps["fine"].shape == (4, 90, 120) and np.array_equal(maps[None], maps["fine"])
    assert np.abs(maps["fine"] - maps["coarse"]).max() > 1e-3
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = predict([a, b], x, style="coarse")
        want = (torch.sigmoid(a(x, style="coarse")) + torch.sigmoid(b(x, style="coarse"))) / 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert evaluate.check_style([a, b]) == "fine" and evaluate.check_style([tiny()]) is None


def test_soup_of_conditioned_checkpoints_is_the_mean_of_their_film_parameters(tmp_path):
    nets = [randomize_films(tiny(seed, style_tokens=("fine", "coarse")), 10 + seed) for seed in (1, 2)]
    paths = [checkpoint(tmp_path / f"s{i}.pt", n) for i, n in enumerate(nets)]
    films = [{k: v for k, v in n.state_dict().items() if "films" in k} for n in nets]
    assert len(films[0]) == 2 * len(WIDTHS)
    for part in ("full", "decoder", "encoder"):
        soup = average.average_checkpoints(paths, part)["model"]
        for k in films[0]:
            # float64 mean of the two float32 tensors, then float32: numpy as the independent reference
            mean = ((films[0][k].numpy().astype(np.float64) + films[1][k].numpy().astype(np.float64)) / 2)
            want = films[0][k] if part == "encoder" else torch.from_numpy(mean.astype(np.float32))
            assert torch.equal(soup[k], want), (part, k)  # FiLM lives in the decoder: averaged with it
    (souped,) = load_models(average.average_checkpoints(paths))
    assert souped.style_tokens == ("fine", "coarse")
    other = checkpoint(tmp_path / "other.pt", tiny(style_tokens=("fine", "mixed", "coarse")))
    plain = checkpoint(tmp_path / "plain.pt", tiny())
    for path in (other, plain):
        with pytest.raises(ValueError) as err:
            average.average_checkpoints([paths[0], path])
        assert "model_cfg key 'style_tokens'" in one_line(err)


def test_older_unconditioned_checkpoint_soups_with_a_new_one(tmp_path):
    new = checkpoint(tmp_path / "new.pt", tiny(1))
    ckpt = torch.load(new, weights_only=True)
    for key in ("style_tokens", "token_styles", "local_contrast"):  # fields older checkpoints lack
        del ckpt["model_cfg"][key]
    save_checkpoint(tmp_path / "old.pt", {**ckpt, "model": tiny(2).state_dict()})
    soup = average.average_checkpoints([tmp_path / "old.pt", new])
    assert soup["model"].keys() == ckpt["model"].keys()


def test_evaluate_counts_at_the_requested_style(synth_root, tmp_path):
    from data import PreparedDataset, prepare_cache

    net = randomize_films(tiny(5, style_tokens=("fine", "coarse")), 5).eval()
    path = checkpoint(tmp_path / "cond.pt", net)
    prepare_cache("IDR", synth_root, tmp_path / "cache", 64, verbose=False)
    ds = PreparedDataset(tmp_path / "cache", "IDR", 64, "test")
    counted = {}
    for s in ("fine", "coarse"):
        report = evaluate.evaluate_checkpoints(path, "IDR", synth_root, tmp_path / "cache", device="cpu", style=s,
                                               verbose=False)
        assert report["protocol"]["style"] == s
        # brute force: the model at that style, thresholded at 0.5 inside the FOV, pooled over the test images
        tp = np.zeros(4, np.int64)
        for i in range(len(ds)):
            item = ds[i]
            # contiguous NCHW, as evaluate feeds it: the same float32 sums (channels_last kernels round otherwise)
            x = torch.from_numpy(item["image"]).permute(2, 0, 1)[None].contiguous().float() / 255
            with torch.no_grad():
                p = torch.sigmoid(net(x, style=s))[0].numpy()  # (4, R, R)
            tp += ((p >= 0.5) & item["masks"] & item["fov"][None]).sum((1, 2))
        counted[s] = [b["tp"][5] for b in report["results"]["IDR"]["lesions"].values()]
        assert counted[s] == tp.tolist(), s
    assert counted["fine"] != counted["coarse"]
    plain = evaluate.evaluate_checkpoints(checkpoint(tmp_path / "plain.pt", tiny()), "IDR", synth_root,
                                          tmp_path / "cache", device="cpu", verbose=False)
    assert "style" not in plain["protocol"]  # unconditioned: the protocol block of older results files
