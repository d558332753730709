"""average.py: exact averaging identities, parts, integer buffers, greedy soups, ensemble manifests,
BN recompute.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_average.py
"""
import functools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import average
import evaluate
import kernels
import protocol
from data import PreparedDataset
from kernels import pr_metrics
from model import ModelConfig, build_model, load_checkpoint, load_models, save_checkpoint
from predict import load_ensemble, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = (16, 8, 8, 8, 8)  # decoder widths: keeps the checkpoints tiny


def scorer(val_sets, metric="dice"):
    """The validation scorer of `average.py soup --greedy` on these sets (a Combination's score)."""
    return average.Combination(["IDR"], 128, (None, None, None), metric, val_sets=val_sets).score




def make_ckpt(path, seed, encoder="test_resnet", decoder=SMALL, **extra):
    """A random-weight checkpoint in the training format; BN statistics and counters random too."""
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder=encoder, pretrained=False, decoder_channels=decoder)
    sd = build_model(cfg).state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            v.normal_()
        elif k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("num_batches_tracked"):
            v.fill_(1000 * seed + 7)
    ckpt = {"model": sd, "model_cfg": {**cfg.__dict__, "decoder_channels": list(decoder)},
            "args": {"train": ["IDR"], "resolution": 128, "patch": 64, "batch": 2, "seed": seed},
            "step": 10 * seed, "epoch": seed, "optimizer": None, "scheduler": None, "scaler": None,
            "metric": 0.5, "version": 1, **extra}
    save_checkpoint(path, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def abc(tmp_path_factory):
    d = tmp_path_factory.mktemp("ingredients")
    return [(str(d / f"{n}.pt"), make_ckpt(d / f"{n}.pt", seed, tag=n))
            for seed, n in enumerate("ABCD", 1)]


def is_int(v):
    return not v.is_floating_point()


# --------------------------------------------------------------------------------------------------
# Exact identities
# --------------------------------------------------------------------------------------------------
def test_uniform_of_copies_is_exact(abc, tmp_path):
    (pa, a), _, _, _ = abc
    copy = tmp_path / "copy.pt"
    save_checkpoint(copy, a)
    for paths in ([pa, copy], [pa, copy, pa]):
        out = average.average_checkpoints(paths)["model"]
        assert out.keys() == a["model"].keys()
        for k, v in a["model"].items():
            assert torch.equal(out[k], v) and out[k].dtype == v.dtype, k


def test_uniform_of_two_is_the_float64_mean(abc):
    (pa, a), (pb, b), _, _ = abc
    for ref, ref_sd in ((pa, a["model"]), (pb, b["model"])):
        out = average.average_checkpoints([pa, pb], reference=ref)
        for k, v in out["model"].items():
            if is_int(v):  # num_batches_tracked: copied from the reference, never averaged
                assert (torch.equal(v, ref_sd[k])
                        and not torch.equal(a["model"][k], b["model"][k])), k
            else:
                want = ((a["model"][k].double() + b["model"][k].double()) / 2).float()
                assert torch.equal(v, want), k
        prov = out["provenance"]
        assert (prov["ingredients"] == [pa, pb] and prov["weights"] == [0.5, 0.5]
                and prov["reference"] == ref)
        assert prov["part"] == "full" and prov["bn"] == "keep"


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_part_takes_the_rest_from_the_reference(abc, part):
    (pa, a), (pb, b), (pc, c), _ = abc
    # reference not first
    out = average.average_checkpoints([pa, pb, pc], part=part, reference=pc)["model"]
    n_avg = n_ref = 0
    for k, v in out.items():
        encoder_side = k.startswith("encoder.")
        if is_int(v) or encoder_side != (part == "encoder"):
            # the reference ingredient's tensor, bit for bit
            assert torch.equal(v, c["model"][k]), k
            n_ref += 1
        else:
            want = ((a["model"][k].double() + b["model"][k].double()
                     + c["model"][k].double()) / 3).float()
            assert torch.equal(v, want), k
            n_avg += 1
    assert n_avg and n_ref
    assert any(k.startswith("head.") for k in out)  # the head is on the decoder side


# --------------------------------------------------------------------------------------------------
# Greedy soups
# --------------------------------------------------------------------------------------------------
def test_greedy_never_accepts_a_drop(abc):
    paths = {n: p for (p, _), n in zip(abc, "ABCD")}
    single = {"A": 0.50, "B": 0.60, "C": 0.40, "D": 0.55}  # order: B, D, A, C
    # D lowers it; A raises it; C only ties it
    soups = {"B": 0.60, "BD": 0.58, "AB": 0.61, "ABC": 0.61}
    name = {p: n for n, p in paths.items()}
    seen = []

    def score(ckpt):
        if "provenance" not in ckpt:  # an ingredient on its own
            return single[ckpt["tag"]]
        key = "".join(sorted(name[p] for p in ckpt["provenance"]["ingredients"]))
        seen.append(key)
        return soups[key]

    soup = average.greedy_soup([paths[n] for n in "ABCD"], score)
    prov = soup["provenance"]
    # NOTE: C ties the soup (0.61 = 0.61) and is left out: kept only on a strict improvement
    # (model-soups)
    assert prov["ingredients"] == [paths["B"], paths["A"]]
    assert prov["soup_score"] == 0.61 and seen == ["BD", "AB", "ABC"]
    ref = load_checkpoint(paths["A"])["model"]  # --reference first: A supplies the integer buffers
    sds = [load_checkpoint(paths[n])["model"] for n in "BA"]
    for k, v in soup["model"].items():
        want = ref[k] if is_int(v) else (sum(sd[k].double() for sd in sds) / 2).float()
        assert torch.equal(v, want), k


def test_greedy_rejects_a_tie(abc):
    """A scripted scorer where every ingredient and every soup ties, except A+D: only D joins A."""
    paths = {n: p for (p, _), n in zip(abc, "ABCD")}
    name = {p: n for n, p in paths.items()}
    seen = []

    def score(ckpt):
        if "provenance" not in ckpt:
            return 0.5  # all ingredients tie: the command-line order A, B, C, D is kept
        key = "".join(sorted(name[p] for p in ckpt["provenance"]["ingredients"]))
        seen.append(key)
        return 0.7 if key == "AD" else 0.5

    soup = average.greedy_soup([paths[n] for n in "ABCD"], score)
    prov = soup["provenance"]
    assert seen == ["AB", "AC", "AD"]  # B and C were tried and tied
    assert prov["ingredients"] == [paths["A"], paths["D"]] and prov["soup_score"] == 0.7
    a, d = (load_checkpoint(paths[n])["model"] for n in "AD")
    for k, v in soup["model"].items():
        want = a[k] if is_int(v) else ((a[k].double() + d[k].double()) / 2).float()
        assert torch.equal(v, want), k

    # Nothing ever improves: the soup is the best ingredient alone, bit for bit.
    alone = average.greedy_soup([paths[n] for n in "ABCD"], lambda ckpt: 0.5)
    assert alone["provenance"]["ingredients"] == [paths["A"]]
    for k, v in alone["model"].items():
        assert torch.equal(v, a[k]), k


# --------------------------------------------------------------------------------------------------
# The validation scorer: a key of kernels.pr_metrics, Dice by default
# --------------------------------------------------------------------------------------------------
def scripted_counts():
    """Pooled 11-threshold counts whose Dice at t = 0.5 (index 5) is easy by hand; MA absent (pos
    0)."""
    tp, fp = torch.zeros(4, 11, dtype=torch.int64), torch.zeros(4, 11, dtype=torch.int64)
    tp[:, 5], fp[:, 5] = torch.tensor([2, 0, 0, 3]), torch.tensor([2, 1, 0, 1])
    pos = torch.tensor([4, 2, 0, 3])
    return tp, fp, pos


def test_scorer_default_is_dice_and_any_metric_key_works(abc, monkeypatch):
    (_, a), _, _, _ = abc
    calls = []

    def fake_pooled(models, sets, device, **kw):
        calls.append(kw)
        return scripted_counts()

    monkeypatch.setattr(protocol, "pooled_counts", fake_pooled)
    # Dice = 2 TP / (2 TP + FP + FN): EX 4 / (4 + 2 + 2), HE 0 / (0 + 1 + 2), CWS 6 / (6 + 1 + 0);
    # MA left out
    assert scorer([])(a) == pytest.approx((0.5 + 0.0 + 6 / 7) / 3, abs=1e-12)
    assert calls == [{}]
    for sub in (["soup", "x.pt", "-o", "y.pt"], ["swa", "run", "-o", "y.pt"]):
        assert average.build_parser().parse_args(sub).metric == "dice"

    # "ap" asks for the fine counts and reads pr_metrics(...)["ap"] as soon as pr_metrics returns
    # that key.
    ap = torch.tensor([0.2, 0.4, float("nan"), 0.9], dtype=torch.float64)
    monkeypatch.setattr(kernels, "pr_metrics", lambda *c: {"dice": torch.zeros(4), "ap": ap})
    assert scorer([], "ap")(a) == pytest.approx(0.5, abs=1e-12)
    assert calls[-1] == {"ap_bins": kernels.AP_BINS} and kernels.AP_BINS >= 1000


def test_scorer_ap_matches_sklearn_on_the_binned_maps(abc, cache_dir):
    """Real counts: the scorer's "ap" is sklearn's average precision on the probabilities binned to
    1 / kernels.AP_BINS (the fine curve's resolution), per lesion over the FOV pixels, averaged over
    present lesions."""
    from sklearn.metrics import average_precision_score

    (_, a), _, _, _ = abc
    val = PreparedDataset(cache_dir, "IDR", 128, "val")
    assert len(val)
    models = load_models(a)
    probs, masks = [], []
    for i in range(len(val)):
        item = val[i]
        # contiguous NCHW, as the scorer's count_dataset feeds it: the same float32 sums, the same
        # fine bins; x is (1, 3, H, W)
        x = torch.from_numpy(item["image"]).permute(2, 0, 1)[None].contiguous().float() / 255
        with torch.no_grad():
            p = protocol.predict(models, x)[0]  # (4, H, W)
        fov = torch.from_numpy(item["fov"])
        probs.append(p[:, fov])  # (4, N) FOV pixels only
        masks.append(torch.from_numpy(item["masks"])[:, fov])
    probs, masks = torch.cat(probs, 1).double(), torch.cat(masks, 1)
    # the bin each pixel falls in: its rank on the fine curve
    binned = torch.floor(probs * kernels.AP_BINS)
    want = [average_precision_score(masks[c].numpy(), binned[c].numpy())
            for c in range(4) if masks[c].any()]
    assert want  # at least one lesion present in the validation split
    got = scorer([val], "ap")(a)
    assert got == pytest.approx(sum(want) / len(want), rel=1e-4, abs=1e-9)  # values here are ~0.01


def test_scorer_without_the_metric_key_fails_in_one_line(abc, monkeypatch):
    (_, a), _, _, _ = abc
    monkeypatch.setattr(protocol, "pooled_counts", lambda *args, **kw: scripted_counts())
    no_ap = {"aupr": torch.zeros(4), "dice": torch.zeros(4)}
    monkeypatch.setattr(kernels, "pr_metrics", lambda *c: no_ap)
    with pytest.raises(ValueError) as e:
        scorer([], "ap")(a)
    assert "--metric ap" in str(e.value) and "'ap'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:
        scorer([], "loss")
    msg = str(e.value)
    assert "--metric" in msg and "'loss'" in msg and "dice, ap, aupr" in msg, msg


# --------------------------------------------------------------------------------------------------
# Ensembles
# --------------------------------------------------------------------------------------------------
def test_ensemble_of_one_and_mean_of_members(abc, tmp_path):
    (pa, a), (pb, b), _, _ = abc
    torch.manual_seed(0)
    x = torch.rand(2, 3, 35, 41)  # odd size on purpose
    singles = []
    for ckpt in (a, b):
        m = build_model(ModelConfig(**{**ckpt["model_cfg"], "decoder_channels": SMALL}))
        m.load_state_dict(ckpt["model"])
        with torch.no_grad():
            singles.append(torch.sigmoid(m.eval()(x)))

    average.main(["ensemble", pa, "-o", str(tmp_path / "one.json")])
    (m1,), _ = load_ensemble([tmp_path / "one.json"])
    with torch.no_grad():
        assert torch.equal(protocol.predict([m1], x), singles[0])

    average.main(["ensemble", pa, pb, "-o", str(tmp_path / "two.json")])
    ens = read_checkpoint(tmp_path / "two.json")
    assert ens["kind"] == "ensemble" and ens["args"] == a["args"] and len(ens["members"]) == 2
    assert (ens["provenance"]["method"] == "ensemble"
            and ens["provenance"]["ingredients"] == [pa, pb])
    models, _ = load_ensemble([tmp_path / "two.json"])
    with torch.no_grad():
        mean = (singles[0] + singles[1]) / 2
        torch.testing.assert_close(protocol.predict(models, x), mean, rtol=0, atol=1e-6)

    # An ensemble file as a member contributes its members: ((A, B), A) = three equal votes.
    average.main(["ensemble", str(tmp_path / "two.json"), pa, "-o", str(tmp_path / "three.json")])
    three = read_checkpoint(tmp_path / "three.json")
    assert len(three["members"]) == 3 and three["provenance"]["weights"] == [2 / 3, 1 / 3]


def test_ensemble_is_a_manifest_of_relative_paths(abc, tmp_path):
    (pa, a), (pb, b), _, _ = abc
    runs = tmp_path / "runs"
    for n, ckpt in (("s0", a), ("s1", b)):
        save_checkpoint(runs / n / "best.pt", ckpt)
    out = runs / "avg" / "ens.json"
    average.main(["ensemble", str(runs / "s0" / "best.pt"), str(runs / "s1" / "best.pt"),
                  "-o", str(out)])
    manifest = json.loads(out.read_text())  # plain JSON: no weights in it
    assert (manifest["kind"] == "ensemble"
            and manifest["members"] == ["../s0/best.pt", "../s1/best.pt"])
    assert out.stat().st_size < 2000

    # The folder moves as a whole: members are found relative to the manifest, not the working
    # directory.
    moved = tmp_path / "moved"
    runs.rename(moved)
    models, headers = load_ensemble([str(moved / "avg" / "ens.json")], "cpu")
    assert len(models) == 2
    for m, ckpt in zip(models, (a, b)):
        for k, v in m.state_dict().items():
            assert torch.equal(v, ckpt["model"][k]), k
    # what evaluate.py writes of it: an ensemble, trained as its first member
    header = evaluate.results_header([str(moved / "avg" / "ens.json")], models, headers, {})
    assert header["method"] == "ensemble" and headers[0]["args"] == a["args"]
    assert (header["train"], header["seed"]) == (a["args"]["train"], a["args"]["seed"])

    # A member gone: one line naming the manifest and the member, from the library and from
    # evaluate.py.
    (moved / "s1" / "best.pt").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_ensemble([moved / "avg" / "ens.json"])
    msg = str(e.value)
    assert (str(moved / "avg" / "ens.json") in msg and "../s1/best.pt" in msg
            and "\n" not in msg), msg
    proc = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(moved / "avg" / "ens.json"),
                           "--test", "IDR"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "ens.json" in err and "../s1/best.pt" in err


def test_ensemble_refusals_and_older_ensemble_files(abc, tmp_path):
    (pa, a), (pb, b), _, _ = abc
    with pytest.raises(ValueError, match=r"-o .*ens\.pt: an ensemble is a JSON manifest.*\.json"):
        average.main(["ensemble", pa, "-o", str(tmp_path / "ens.pt")])
    assert not (tmp_path / "ens.pt").exists()
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({"kind": "ensemble", "members": ["loop.json"]}))
    with pytest.raises(ValueError, match="lists itself"):
        load_ensemble([loop])
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "ensemble", "members": []}))
    with pytest.raises(ValueError, match=r"bad\.json needs a non-empty \"members\" list"):
        load_ensemble([tmp_path / "bad.json"])
    manifest = tmp_path / "m.json"
    average.write_ensemble(manifest, [pa, pb], read_checkpoint)
    # a manifest is not a soup ingredient
    with pytest.raises(ValueError, match=r"m\.json is an ensemble"):
        average.average_checkpoints([manifest, pa], load=read_checkpoint)  # as the command line

    # An ensemble file of the older format (every member's weights embedded) still loads, alone or
    # as a member.
    old = tmp_path / "old_ensemble.pt"
    save_checkpoint(old, {"kind": "ensemble", "version": 1, "args": a["args"],
                          "members": [{"model": c["model"], "model_cfg": c["model_cfg"],
                                       "args": c["args"]}
                                      for c in (a, b)]})
    assert len(load_models(old)) == 2
    average.main(["ensemble", str(old), pa, "-o", str(tmp_path / "mixed.json")])
    mixed = read_checkpoint(tmp_path / "mixed.json")
    assert len(mixed["members"]) == 3 and mixed["provenance"]["weights"] == [2 / 3, 1 / 3]
    k = "head.weight"
    assert [torch.equal(m["model"][k], c["model"][k])
            for m, c in zip(mixed["members"], (a, b, a))] == [True] * 3


# --------------------------------------------------------------------------------------------------
# BatchNorm recomputation
# --------------------------------------------------------------------------------------------------
def test_bn_recompute_changes_only_running_stats(abc, synth_root, cache_dir, monkeypatch):
    (pa, a), _, _, _ = abc
    # the combination's batches of training patches, as `average.py --bn recompute` makes them
    seen = []
    real = average.recompute_bn_checkpoint

    def keep_batches(ckpt, batches, device="cpu"):
        seen.extend(batches)
        return real(ckpt, iter(seen), device)
    monkeypatch.setattr(average, "recompute_bn_checkpoint", keep_batches)
    combo = average.Combination(["IDR"], 128, (synth_root, cache_dir, None), bn_batches=3, patch=64,
                                batch=2)
    ckpt = average.average_checkpoints([pa])
    before = {k: v.clone() for k, v in ckpt["model"].items()}
    ckpt = combo.recompute_bn(ckpt)
    batches = seen
    assert len(batches) == 3 and all(b.shape == (2, 3, 64, 64) for b in batches)
    assert 0 <= batches[0].min() and batches[0].max() <= 1

    # Reference: torch's own SWA helper (whole model in train mode: the same here, as dropout is 0).
    (ref_model,) = load_models(a)
    torch.optim.swa_utils.update_bn(batches, ref_model)
    ref = ref_model.state_dict()

    assert ckpt["provenance"]["bn"] == "recompute" and ckpt["provenance"]["bn_batches"] == 3
    n_stats = 0
    for k, v in ckpt["model"].items():
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)
            assert not torch.equal(v, before[k]), k
            n_stats += 1
        else:  # weights, biases and the integer counters: untouched, bit for bit
            assert torch.equal(v, before[k]), k
    assert n_stats > 10


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------
def test_mismatched_checkpoints_name_file_and_key(abc, tmp_path):
    (pa, a), _, _, _ = abc
    other_encoder = tmp_path / "effnet.pt"
    make_ckpt(other_encoder, 5, encoder="test_efficientnet")
    other_widths = tmp_path / "wide.pt"
    make_ckpt(other_widths, 6, decoder=(16, 8, 8, 8, 4))
    reshaped = tmp_path / "reshaped.pt"
    bad = {**a, "model": dict(a["model"])}
    bad["model"]["head.bias"] = torch.zeros(5)
    save_checkpoint(reshaped, bad)
    for path, key in ((other_encoder, "'encoder'"), (other_widths, "'decoder_channels'"),
                      (reshaped, "'head.bias'")):
        with pytest.raises(ValueError) as e:
            average.main(["soup", pa, str(path), "-o", str(tmp_path / "soup.pt")])
        msg = str(e.value)
        assert str(path) in msg and key in msg and "\n" not in msg, msg
    assert not (tmp_path / "soup.pt").exists()

    # The command line shows that one line, no traceback.
    proc = subprocess.run([sys.executable, "average.py", "soup", pa, str(other_widths),
                           "-o", str(tmp_path / "s.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert (proc.stderr.strip().startswith("error: ")
            and len(proc.stderr.strip().splitlines()) == 1), proc.stderr
    assert str(other_widths) in proc.stderr and "decoder_channels" in proc.stderr


def test_existing_output_needs_force(abc, tmp_path):
    (pa, a), (pb, b), _, _ = abc
    out = tmp_path / "soup.pt"
    out.write_bytes(b"precious")
    with pytest.raises(ValueError, match="--force"):
        average.main(["soup", pa, pb, "-o", str(out)])
    assert out.read_bytes() == b"precious"
    with pytest.raises(ValueError, match="--force"):
        average.main(["ensemble", pa, "-o", str(out)])
    average.main(["soup", pa, pb, "-o", str(out), "--force"])
    soup = load_checkpoint(out)
    assert soup["provenance"]["method"] == "soup-full" and soup["optimizer"] is None


def test_swa_selects_snapshots(abc, tmp_path):
    run = tmp_path / "run"
    for step, (_, ckpt) in zip((2, 4, 6, 8), abc):
        save_checkpoint(run / "snapshots" / f"step_{step:06d}.pt", {**ckpt, "step": step})
    sel = average.select_snapshots
    assert [Path(p).name for p in sel(run, last=2)] == ["step_000006.pt", "step_000008.pt"]
    assert [Path(p).name for p in sel(run, steps="3:6")] == ["step_000004.pt", "step_000006.pt"]
    assert len(sel(run, steps=":")) == 4
    with pytest.raises(ValueError, match="--steps"):
        sel(run, steps="9:")
    with pytest.raises(FileNotFoundError, match="no snapshots"):
        sel(tmp_path / "empty")
    average.main(["swa", str(run), "--last", "2", "-o", str(tmp_path / "swa.pt")])
    swa = load_checkpoint(tmp_path / "swa.pt")
    c, d = abc[2][1]["model"], abc[3][1]["model"]
    k = "encoder.conv1.0.weight"
    assert torch.equal(swa["model"][k], ((c[k].double() + d[k].double()) / 2).float())
    assert swa["provenance"]["method"] == "swa-full" and swa["step"] == 8


# --------------------------------------------------------------------------------------------------
# Tiny real runs: greedy with the real validation scorer, BN recompute from the CLI
# (fig4: test_fig4.py)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_runs, tmp_path_factory):
    """Two seeds of IDR+MES at 64 px, 4 steps, snapshots every 2 steps (this module's own copy)."""
    return tiny_runs(tmp_path_factory.mktemp("avg_runs"))


def _val_score(ckpt, cache, metric="aupr"):
    """Independent of average.py: pooled validation counts of IDR + MES, mean AUPR (or Dice) over
    present lesions."""
    models = load_models(ckpt)
    tp = fp = pos = 0
    for ds_id in ("IDR", "MES"):
        t, f, p = protocol.count_dataset(models, PreparedDataset(cache, ds_id, 64, "val"), "cpu")
        tp, fp, pos = tp + t, fp + f, pos + p
    values = pr_metrics(tp, fp, pos)[metric]
    return float(values[~values.isnan()].mean())


@pytest.mark.parametrize("metric", [None, "aupr"])  # None: the default, Dice
def test_greedy_soup_on_real_runs(runs, tmp_path, metric):
    runs_dir, cache = runs
    paths = [str(runs_dir / "IDR+MES" / f"s{s}" / "best.pt") for s in (0, 1)]
    out = tmp_path / "greedy.pt"
    flags = ["--metric", metric] if metric else []
    # data flags: the run's own
    average.main(["soup", *paths, "--greedy", "--device", "cpu", "-o", str(out), *flags])
    soup = load_checkpoint(out)
    prov = soup["provenance"]
    assert prov["metric"] == (metric or "dice")
    val_score = functools.partial(_val_score, metric=metric or "dice")
    singles = {p: val_score(load_checkpoint(p), cache) for p in paths}
    assert prov["scores"] == pytest.approx(singles, abs=1e-9)
    assert prov["ingredients"][0] == max(singles, key=singles.get)
    got = val_score(soup, cache)
    assert got == pytest.approx(prov["soup_score"], abs=1e-9)
    # the greedy soup never scores below its best ingredient
    assert got >= max(singles.values()) - 1e-12
    # the method evaluate.py writes in its results
    header = evaluate.results_header([str(out)], *load_ensemble([out]), {})
    assert header["method"] == "greedy-soup-full"


def test_bn_recompute_from_the_cli(runs, tmp_path):
    runs_dir, _ = runs
    run0 = runs_dir / "IDR+MES" / "s0"
    average.main(["swa", str(run0), "-o", str(tmp_path / "keep.pt")])
    average.main(["swa", str(run0), "-o", str(tmp_path / "bn.pt"), "--bn", "recompute",
                  "--bn-batches", "2", "--device", "cpu"])
    keep, bn = load_checkpoint(tmp_path / "keep.pt"), load_checkpoint(tmp_path / "bn.pt")
    assert bn["provenance"]["bn"] == "recompute" and keep["provenance"]["bn"] == "keep"
    for k, v in keep["model"].items():
        if k.endswith(("running_mean", "running_var")):
            assert not torch.equal(v, bn["model"][k]), k
        else:
            assert torch.equal(v, bn["model"][k]), k


def test_soup_refuses_runs_of_another_combination(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    make_ckpt(a, 0)
    ckpt = make_ckpt(b, 1)
    save_checkpoint(b, {**ckpt, "args": {**ckpt["args"], "train": ["RET"]}})
    with pytest.raises(ValueError,
                       match=r"b\.pt does not match .*a\.pt: trained with train \['RET'\]"):
        average.average_checkpoints([a, b], "full", a, "soup-full")
    # one combination, but trained on other lesions (train.py --lesions HE): untrained heads
    save_checkpoint(b, {**ckpt, "model_cfg": {**ckpt["model_cfg"], "lesions": ["HE"]}})
    with pytest.raises(ValueError) as err:
        average.average_checkpoints([a, b], "full", a, "soup-full")
    assert str(err.value) == (f"{b} does not match {a}: trained on lesions HE, not EX,HE,MA,CWS "
                              f"(average runs of the same --lesions)")


@pytest.mark.parametrize("command", ["swa", "soup", "ensemble"])
def test_each_subcommand_help_has_its_own_examples(command, capsys):
    """`average.py NAME --help` ends with NAME's own examples, and each of them parses as NAME's
    command line."""
    parser = average.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    text = capsys.readouterr().out
    examples = text.split("\nexamples:\n", 1)[1].strip().splitlines()
    own = [shlex.split(line)[2:] for line in examples
           if line.split()[:3] == ["python", "average.py", command]]
    assert own, text
    for argv in own:
        assert parser.parse_args(argv).command == command, argv
    assert text.index("examples:") > text.index("--out")  # below the flags, as an epilog


def test_ensemble_of_members_that_do_not_run_alike_is_refused_when_made(tmp_path):
    """A manifest of members trained at other resolutions (evaluate.py would run all at the first
    one's, so the member order would change the score), or of conditioned and unconditioned
    members: refused when written, one line naming the member; nothing written."""
    a = tmp_path / "a.pt"
    make_ckpt(a, 1)
    low = tmp_path / "low.pt"
    ck = make_ckpt(low, 2)
    ck["args"]["resolution"] = 64
    save_checkpoint(low, ck)
    cond = tmp_path / "cond.pt"
    torch.manual_seed(3)
    cfg = ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=SMALL,
                      style_tokens=("fine", "coarse"))
    save_checkpoint(cond, {"model": build_model(cfg).state_dict(),
                           "model_cfg": {**cfg.__dict__, "decoder_channels": list(SMALL)},
                           "args": {"train": ["IDR"], "resolution": 128}, "step": 1, "version": 1})
    for members, needle in (([a, low], "low.pt was trained at 64 px"),
                            ([low, a], "a.pt was trained at 128 px"),
                            ([a, cond], "cond.pt is style-conditioned"),
                            ([cond, a], "cond.pt is style-conditioned")):
        out = tmp_path / "ens.json"
        with pytest.raises(ValueError) as e:
            average.main(["ensemble", *map(str, members), "-o", str(out)])
        assert needle in str(e.value) and "\n" not in str(e.value) and not out.exists()


def test_average_refuses_an_unwritable_output_before_reading_any_checkpoint(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a folder"):
        average.check_out(tmp_path, force=False)
    # the command line: one line, exit 1, nothing read (the checkpoints named do not even exist)
    argv = ["soup", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "afile" / "soup.pt")]
    r = subprocess.run([sys.executable, str(ROOT / "average.py"), *argv], capture_output=True,
                       text=True, timeout=120)
    (line,) = r.stderr.splitlines()
    assert r.returncode == 1 and line.startswith(f"error: -o {tmp_path / 'afile'}"), line
    assert "soup.pt" in line, line
    assert "a file" in line and "missing.pt" not in line, line  # why; nothing read


# --------------------------------------------------------------------------------------------------
# TB: soups of style-conditioned checkpoints (from the old tests/test_style.py); models from
# conftest's
# style_net, saved by style_checkpoint
# --------------------------------------------------------------------------------------------------
def test_soup_of_conditioned_checkpoints_is_the_mean_of_their_film_parameters(
        style_net, randomize_films, style_checkpoint, tmp_path):
    import numpy as np

    nets = [randomize_films(style_net(seed, style_tokens=("fine", "coarse")), 10 + seed)
            for seed in (1, 2)]
    paths = [style_checkpoint(tmp_path / f"s{i}.pt", n) for i, n in enumerate(nets)]
    films = [{k: v for k, v in n.state_dict().items() if "films" in k} for n in nets]
    assert len(films[0]) == 2 * len(nets[0].cfg.decoder_channels)
    for part in ("full", "decoder", "encoder"):
        soup = average.average_checkpoints(paths, part)["model"]
        for k in films[0]:
            # float64 mean of the two float32 tensors, then float32: numpy as the independent
            # reference
            mean = ((films[0][k].numpy().astype(np.float64)
                     + films[1][k].numpy().astype(np.float64)) / 2)
            want = films[0][k] if part == "encoder" else torch.from_numpy(mean.astype(np.float32))
            # FiLM lives in the decoder: averaged with it
            assert torch.equal(soup[k], want), (part, k)
    (souped,) = load_models(average.average_checkpoints(paths))
    assert souped.style_tokens == ("fine", "coarse")
    other = style_checkpoint(tmp_path / "other.pt",
                             style_net(style_tokens=("fine", "mixed", "coarse")))
    plain = style_checkpoint(tmp_path / "plain.pt", style_net())
    for path in (other, plain):
        with pytest.raises(ValueError) as err:
            average.average_checkpoints([paths[0], path])
        msg = str(err.value)
        # the key and the file
        assert "\n" not in msg and "'style_tokens'" in msg and path.name in msg


def test_older_unconditioned_checkpoint_soups_with_a_new_one(style_net, style_checkpoint, tmp_path):
    new = style_checkpoint(tmp_path / "new.pt", style_net(1))
    ckpt = torch.load(new, weights_only=True)
    for key in ("style_tokens", "token_styles", "local_contrast"):  # fields older checkpoints lack
        del ckpt["model_cfg"][key]
    save_checkpoint(tmp_path / "old.pt", {**ckpt, "model": style_net(2).state_dict()})
    soup = average.average_checkpoints([tmp_path / "old.pt", new])
    assert soup["model"].keys() == ckpt["model"].keys()


# ---- average.py + model.py copied on their own (issue 24, item 4) ----
COPIED = """
import dataclasses, os, sys
sys.path.insert(0, os.getcwd())  # this folder only: nothing else of the project
import torch
import average, model

cfg = model.ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=(16, 8, 8, 8, 8))
nets = []
for seed in (0, 1):
    torch.manual_seed(seed)
    nets.append(model.build_model(cfg))
    model.save_checkpoint(f"s{seed}.pt", {"model": nets[-1].state_dict(),
                                          "model_cfg": dataclasses.asdict(cfg)})
soup = average.average_checkpoints(["s0.pt", "s1.pt"])
a, b = (n.state_dict() for n in nets)
exact = all(torch.allclose(soup["model"][k].double(), (a[k].double() + b[k].double()) / 2,
                           rtol=0, atol=1e-7)
            for k in a if a[k].is_floating_point())
net = model.build_model(cfg)
net.load_state_dict(soup["model"])
seen = average.recompute_bn(net, [torch.rand(2, 3, 64, 64) for _ in range(3)])
# a scorer that prefers s1's weights: the greedy rule starts from s1 and leaves s0 out (the soup of
# both scores worse), so the soup is s1 exactly
def score(ckpt):
    return -sum(float((ckpt["model"][k].double() - b[k].double()).abs().sum())
                for k in b if b[k].is_floating_point())
kept = average.greedy_soup(["s0.pt", "s1.pt"], score=score)
alone = all(torch.equal(kept["model"][k], b[k]) for k in b if b[k].is_floating_point())
ours = sorted(m for m in ("utils", "data", "kernels", "protocol", "predict") if m in sys.modules)
print(exact, seen, alone, ours)
"""


def test_average_py_and_model_py_work_copied_alone(tmp_path):
    """average.py's core needs torch and model.py only: copied with model.py into an empty folder,
    it averages two checkpoints (each float tensor the mean of the two, computed here in float64),
    recomputes BatchNorm statistics over given batches and runs the greedy rule with a given
    scorer, importing no other module of the project."""
    import os
    import shutil

    for name in ("average.py", "model.py"):
        shutil.copy(Path(__file__).resolve().parents[1] / name, tmp_path / name)
    (tmp_path / "run.py").write_text(COPIED)
    r = subprocess.run([sys.executable, "-I", "-B", "run.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    exact, seen, alone, ours = r.stdout.strip().splitlines()[-1].split(" ", 3)
    assert exact == "True" and seen == "3" and alone == "True" and ours == "[]", r.stdout
