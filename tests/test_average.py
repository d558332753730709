"""average.py: exact averaging identities, parts, integer buffers, greedy soups, ensembles, BN recompute, fig4.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_average.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import average
import evaluate
import report
import train
from data import PreparedDataset
from kernels import pr_metrics
from model import ModelConfig, build_model, load_checkpoint, load_models, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = (16, 8, 8, 8, 8)  # decoder widths: keeps the checkpoints tiny




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
    return [(str(d / f"{n}.pt"), make_ckpt(d / f"{n}.pt", seed, tag=n)) for seed, n in enumerate("ABCD", 1)]


def is_int(v):
    return not v.is_floating_point()


# ---------------------------------------------------------------------------------------------------------
# Exact identities
# ---------------------------------------------------------------------------------------------------------
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
                assert torch.equal(v, ref_sd[k]) and not torch.equal(a["model"][k], b["model"][k]), k
            else:
                want = ((a["model"][k].double() + b["model"][k].double()) / 2).float()
                assert torch.equal(v, want), k
        prov = out["provenance"]
        assert prov["ingredients"] == [pa, pb] and prov["weights"] == [0.5, 0.5] and prov["reference"] == ref
        assert prov["part"] == "full" and prov["bn"] == "keep"


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_part_takes_the_rest_from_the_reference(abc, part):
    (pa, a), (pb, b), (pc, c), _ = abc
    out = average.average_checkpoints([pa, pb, pc], part=part, reference=pc)["model"]  # reference not first
    n_avg = n_ref = 0
    for k, v in out.items():
        encoder_side = k.startswith("encoder.")
        if is_int(v) or encoder_side != (part == "encoder"):
            assert torch.equal(v, c["model"][k]), k  # the reference ingredient's tensor, bit for bit
            n_ref += 1
        else:
            want = ((a["model"][k].double() + b["model"][k].double() + c["model"][k].double()) / 3).float()
            assert torch.equal(v, want), k
            n_avg += 1
    assert n_avg and n_ref
    assert any(k.startswith("head.") for k in out)  # the head is on the decoder side


# ---------------------------------------------------------------------------------------------------------
# Greedy soups
# ---------------------------------------------------------------------------------------------------------
def test_greedy_never_accepts_a_drop(abc):
    paths = {n: p for (p, _), n in zip(abc, "ABCD")}
    single = {"A": 0.50, "B": 0.60, "C": 0.40, "D": 0.55}  # order: B, D, A, C
    soups = {"B": 0.60, "BD": 0.58, "AB": 0.61, "ABC": 0.61}  # D lowers it; A raises it; C keeps it equal
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
    assert prov["ingredients"] == [paths["B"], paths["A"], paths["C"]]
    assert prov["soup_score"] == 0.61 and seen == ["BD", "AB", "ABC"]
    ref = load_checkpoint(paths["A"])["model"]  # --reference first: A supplies the integer buffers
    sds = [load_checkpoint(paths[n])["model"] for n in "BAC"]
    for k, v in soup["model"].items():
        want = ref[k] if is_int(v) else (sum(sd[k].double() for sd in sds) / 3).float()
        assert torch.equal(v, want), k


# ---------------------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------------------
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

    average.main(["ensemble", pa, "-o", str(tmp_path / "one.pt")])
    (m1,) = load_models(tmp_path / "one.pt")
    with torch.no_grad():
        assert torch.equal(evaluate.predict([m1], x), singles[0])

    average.main(["ensemble", pa, pb, "-o", str(tmp_path / "two.pt")])
    ens = load_checkpoint(tmp_path / "two.pt")
    assert ens["kind"] == "ensemble" and ens["args"] == a["args"] and len(ens["members"]) == 2
    assert ens["provenance"]["method"] == "ensemble" and ens["provenance"]["ingredients"] == [pa, pb]
    models = load_models(tmp_path / "two.pt")
    with torch.no_grad():
        torch.testing.assert_close(evaluate.predict(models, x), (singles[0] + singles[1]) / 2, rtol=0, atol=1e-6)

    # An ensemble file as a member contributes its members: ((A, B), A) = three equal votes.
    average.main(["ensemble", str(tmp_path / "two.pt"), pa, "-o", str(tmp_path / "three.pt")])
    three = load_checkpoint(tmp_path / "three.pt")
    assert len(three["members"]) == 3 and three["provenance"]["weights"] == [2 / 3, 1 / 3]


# ---------------------------------------------------------------------------------------------------------
# BatchNorm recomputation
# ---------------------------------------------------------------------------------------------------------
def test_bn_recompute_changes_only_running_stats(abc, cache_dir):
    (pa, a), _, _, _ = abc
    train_sets = [PreparedDataset(cache_dir, "IDR", 128, "train")]
    batches = list(average.training_batches(train_sets, patch=64, batch=2, n_batches=3))
    assert batches[0].shape == (2, 3, 64, 64) and 0 <= batches[0].min() and batches[0].max() <= 1

    # Reference: torch's own SWA helper (whole model in train mode: the same here, as dropout is 0).
    (ref_model,) = load_models(a)
    torch.optim.swa_utils.update_bn(batches, ref_model)
    ref = ref_model.state_dict()

    ckpt = average.average_checkpoints([pa])
    before = {k: v.clone() for k, v in ckpt["model"].items()}
    ckpt = average.recompute_bn_checkpoint(ckpt, iter(batches))
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


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------
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
    for path, key in ((other_encoder, "'encoder'"), (other_widths, "'decoder_channels'"), (reshaped, "'head.bias'")):
        with pytest.raises(ValueError) as e:
            average.main(["soup", pa, str(path), "-o", str(tmp_path / "soup.pt")])
        msg = str(e.value)
        assert str(path) in msg and key in msg and "\n" not in msg, msg
    assert not (tmp_path / "soup.pt").exists()

    # The command line shows that one line, no traceback.
    proc = subprocess.run([sys.executable, "average.py", "soup", pa, str(other_widths), "-o", str(tmp_path / "s.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
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


# ---------------------------------------------------------------------------------------------------------
# Tiny real runs: greedy with the real validation scorer, BN recompute from the CLI, fig4 + report.py
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(synth_root, tmp_path_factory):
    """Two seeds of IDR+MES at 64 px, 4 steps, snapshots every 2 steps."""
    base = tmp_path_factory.mktemp("avg_runs")
    cache, runs_dir = base / "cache", base / "runs"
    for seed in (0, 1):
        train.run(train.parse_args([
            "--train", "IDR,MES", "--seed", str(seed), "--out", str(runs_dir / "IDR+MES" / f"s{seed}"),
            "--data-root", str(synth_root), "--cache", str(cache), "--encoder", "test_resnet", "--no-pretrained",
            "--decoder-channels", "16,8,8,8,8", "--resolution", "64", "--patch", "64", "--batch", "2",
            "--iters", "4", "--val-every", "2", "--snapshot-every", "2", "--warmup", "1", "--lr", "1e-2",
            "--device", "cpu", "--dtype", "float32", "--workers", "0"]))
    return runs_dir, cache


def val_score(ckpt, cache):
    """Independent of average.py: pooled validation counts of IDR + MES, mean AUPR over present lesions."""
    models = load_models(ckpt)
    tp = fp = pos = 0
    for ds_id in ("IDR", "MES"):
        t, f, p = evaluate.count_dataset(models, PreparedDataset(cache, ds_id, 64, "val"), "cpu")
        tp, fp, pos = tp + t, fp + f, pos + p
    aupr = pr_metrics(tp, fp, pos)["aupr"]
    return float(aupr[~aupr.isnan()].mean())


def test_greedy_soup_on_real_runs(runs, tmp_path):
    runs_dir, cache = runs
    paths = [str(runs_dir / "IDR+MES" / f"s{s}" / "best.pt") for s in (0, 1)]
    out = tmp_path / "greedy.pt"
    average.main(["soup", *paths, "--greedy", "--device", "cpu", "-o", str(out)])  # data flags: the run's own
    soup = load_checkpoint(out)
    prov = soup["provenance"]
    singles = {p: val_score(load_checkpoint(p), cache) for p in paths}
    assert prov["scores"] == pytest.approx(singles, abs=1e-9)
    assert prov["ingredients"][0] == max(singles, key=singles.get)
    got = val_score(soup, cache)
    assert got == pytest.approx(prov["soup_score"], abs=1e-9)
    assert got >= max(singles.values()) - 1e-12  # the greedy soup never scores below its best ingredient
    assert evaluate._ckpt_method([soup]) == "greedy-soup-full"


def test_bn_recompute_from_the_cli(runs, tmp_path):
    runs_dir, _ = runs
    run0 = runs_dir / "IDR+MES" / "s0"
    average.main(["swa", str(run0), "-o", str(tmp_path / "keep.pt")])
    average.main(["swa", str(run0), "-o", str(tmp_path / "bn.pt"), "--bn", "recompute", "--bn-batches", "2",
                  "--device", "cpu"])
    keep, bn = load_checkpoint(tmp_path / "keep.pt"), load_checkpoint(tmp_path / "bn.pt")
    assert bn["provenance"]["bn"] == "recompute" and keep["provenance"]["bn"] == "keep"
    for k, v in keep["model"].items():
        if k.endswith(("running_mean", "running_var")):
            assert not torch.equal(v, bn["model"][k]), k
        else:
            assert torch.equal(v, bn["model"][k]), k


def test_fig4_writes_what_report_reads(runs, synth_root, tmp_path, capsys):
    runs_dir, cache = runs
    combo = runs_dir / "IDR+MES"
    out = combo / "fig4.json"
    flags = ["--test", "IDR,MES", "--data-root", str(synth_root), "--cache", str(cache), "--device", "cpu"]
    average.main(["fig4", str(combo), *flags, "-o", str(out)])
    fig = json.loads(out.read_text())
    methods = ["baseline", "ensemble"] + [f"{k}-{p}" for k in ("swa", "soup") for p in ("encoder", "decoder", "full")]
    assert sorted(fig["methods"]) == sorted(methods)
    assert fig["combo"] == "IDR+MES" and fig["train"] == ["IDR", "MES"] and fig["bn"] == "keep"
    for m in methods:
        assert set(fig["methods"][m]) == {"IDR", "MES"}
        assert set(fig["methods"][m]["IDR"]) == {"mean_dice", "mean_aupr"}
    # The ensemble file scores exactly what evaluate.py gives the two checkpoints passed together.
    both = evaluate.evaluate_checkpoints([combo / "s0" / "best.pt", combo / "s1" / "best.pt"], "IDR", synth_root,
                                         cache, device="cpu", verbose=False)["results"]["IDR"]
    assert fig["methods"]["ensemble"]["IDR"]["mean_aupr"] == pytest.approx(both["mean_aupr"], abs=1e-12)
    for name in ("ensemble", "swa-full", "soup-encoder"):
        assert (combo / "avg" / f"{name}.pt").is_file()

    # A rerun reuses the averages and refuses to overwrite fig4.json without --force.
    with pytest.raises(ValueError, match="--force"):
        average.main(["fig4", str(combo), *flags, "-o", str(out)])
    capsys.readouterr()
    average.main(["fig4", str(combo), *flags, "-o", str(out), "--force", "--test", "IDR"])
    assert "reusing" in capsys.readouterr().out

    # --bn both: every average twice; the "+bn" copies differ from the kept ones only in BN running stats.
    both_out = tmp_path / "fig4-both.json"
    average.main(["fig4", str(combo), *flags, "-o", str(both_out), "--test", "IDR", "--bn", "both",
                  "--bn-batches", "2"])
    fig_both = json.loads(both_out.read_text())
    assert sorted(fig_both["methods"]) == sorted(methods + [m + "+bn" for m in methods[2:]])
    kept, recomputed = (load_checkpoint(combo / "avg" / f"soup-full{s}.pt")["model"] for s in ("", "-bn"))
    changed = {k for k in kept if not torch.equal(kept[k], recomputed[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)

    report.main([str(runs_dir), "-o", str(tmp_path / "report"), "--reference", "none"])
    f4 = json.loads((tmp_path / "report" / "figure4.json").read_text())
    assert sorted(f4) == sorted(methods)


def test_fig4_needs_two_seeds_and_skips_swa_without_snapshots(runs, synth_root, tmp_path, capsys):
    runs_dir, cache = runs
    one = tmp_path / "IDR+MES"
    (one / "s0").mkdir(parents=True)
    (one / "s0" / "best.pt").write_bytes((runs_dir / "IDR+MES" / "s0" / "best.pt").read_bytes())
    flags = ["--test", "IDR", "--data-root", str(synth_root), "--cache", str(cache), "--device", "cpu"]
    with pytest.raises(FileNotFoundError, match=r"at least 2 seeds .*found: s0\)"):
        average.main(["fig4", str(one), *flags, "-o", str(one / "fig4.json")])
    (one / "s3").mkdir()
    (one / "s3" / "best.pt").write_bytes((runs_dir / "IDR+MES" / "s1" / "best.pt").read_bytes())
    average.main(["fig4", str(one), *flags, "-o", str(one / "fig4.json")])
    assert "SWA entries skipped" in capsys.readouterr().out
    fig = json.loads((one / "fig4.json").read_text())
    assert sorted(fig["methods"]) == ["baseline", "ensemble", "soup-decoder", "soup-encoder", "soup-full"]


def test_soup_refuses_runs_of_another_combination(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    make_ckpt(a, 0)
    ckpt = make_ckpt(b, 1)
    save_checkpoint(b, {**ckpt, "args": {**ckpt["args"], "train": ["RET"]}})
    with pytest.raises(ValueError, match=r"b\.pt does not match .*a\.pt: trained with train \['RET'\]"):
        average.average_checkpoints([a, b], "full", a, "soup-full")
