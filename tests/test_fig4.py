"""fig4.py: the paper's Figure 4 on two tiny real runs, what report.py reads, reuse, --bn both,
refusals.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_fig4.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import fig4
import report
from model import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tiny_runs, tmp_path_factory):
    """Two seeds of IDR+MES at 64 px, 4 steps, snapshots every 2 steps (this module's own copy)."""
    return tiny_runs(tmp_path_factory.mktemp("fig4_runs"))


def test_fig4_writes_what_report_reads(runs, synth_root, tmp_path, capsys):
    runs_dir, cache = runs
    combo = runs_dir / "IDR+MES"
    out = combo / "fig4.json"
    flags = ["--test", "IDR,MES", "--data-root", str(synth_root), "--cache", str(cache),
             "--device", "cpu"]
    fig4.main([str(combo), *flags, "-o", str(out)])
    fig = json.loads(out.read_text())
    methods = ["baseline", "ensemble"] + [f"{k}-{p}" for k in ("swa", "soup")
                                          for p in ("encoder", "decoder", "full")]
    assert sorted(fig["methods"]) == sorted(methods)
    assert fig["combo"] == "IDR+MES" and fig["train"] == ["IDR", "MES"] and fig["bn"] == "keep"
    # The ensemble manifest scores exactly what evaluate.py
    # gives the two checkpoints passed together.
    pair = [combo / "s0" / "best.pt", combo / "s1" / "best.pt"]
    both = evaluate.evaluate(pair, "IDR", (synth_root, cache, None), device="cpu",
                             verbose=False)["results"]["IDR"]
    # fig4.json keeps evaluate.py's means over lesions:
    # Dice and AUPR (and AP, the AUPR floor once evaluated)
    means = {k for k in both if k.startswith("mean_")}
    assert {"mean_dice", "mean_aupr"} <= means
    for m in methods:
        assert set(fig["methods"][m]) == {"IDR", "MES"}
        assert set(fig["methods"][m]["IDR"]) == means
    assert fig["methods"]["ensemble"]["IDR"]["mean_aupr"] == pytest.approx(both["mean_aupr"],
                                                                           abs=1e-12)
    for name in ("swa-full", "soup-encoder"):
        assert (combo / "avg" / f"{name}.pt").is_file()
    # paths, never copies of the weights
    manifest = json.loads((combo / "avg" / "ensemble.json").read_text())
    assert (manifest["members"] == ["../s0/best.pt", "../s1/best.pt"]
            and not (combo / "avg" / "ensemble.pt").exists())

    # A rerun reuses the averages and refuses to overwrite fig4.json without --force.
    with pytest.raises(ValueError, match="--force"):
        fig4.main([str(combo), *flags, "-o", str(out)])
    capsys.readouterr()
    fig4.main([str(combo), *flags, "-o", str(out), "--force", "--test", "IDR"])
    assert "reusing" in capsys.readouterr().out
    # only the test sets asked for, though the methods'
    # results files still hold MES from the first run
    assert all(set(block) == {"IDR"} for block in json.loads(out.read_text())["methods"].values())

    # --bn both: every average twice; the "+bn" copies
    # differ from the kept ones only in BN running stats.
    both_out = tmp_path / "fig4-both.json"
    fig4.main([str(combo), *flags, "-o", str(both_out), "--test", "IDR", "--bn", "both",
                  "--bn-batches", "2"])
    fig_both = json.loads(both_out.read_text())
    assert sorted(fig_both["methods"]) == sorted(methods + [m + "+bn" for m in methods[2:]])
    kept, recomputed = (load_checkpoint(combo / "avg" / f"soup-full{s}.pt")["model"]
                        for s in ("", "-bn"))
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
    flags = ["--test", "IDR", "--data-root", str(synth_root), "--cache", str(cache),
             "--device", "cpu"]
    with pytest.raises(FileNotFoundError, match=r"at least 2 seeds .*found: s0\)"):
        fig4.main([str(one), *flags, "-o", str(one / "fig4.json")])
    (one / "s3").mkdir()
    (one / "s3" / "best.pt").write_bytes((runs_dir / "IDR+MES" / "s1" / "best.pt").read_bytes())
    fig4.main([str(one), *flags, "--bn", "both", "--bn-batches", "1"])  # -o: COMBO_DIR/fig4.json
    printed = capsys.readouterr().out
    fig = json.loads((one / "fig4.json").read_text())
    soups = [f"soup-{p}{s}" for s in ("", "+bn") for p in ("encoder", "decoder", "full")]
    assert sorted(fig["methods"]) == sorted(["baseline", "ensemble", *soups])
    # SWA is not dropped: every SWA entry is in "missing" with why, and a row of n/a on the terminal
    swa = [f"swa-{p}{s}" for s in ("", "+bn") for p in ("encoder", "decoder", "full")]
    why = "no snapshots in s0/snapshots"
    assert fig["missing"] == {m: why for m in swa}
    for m in swa:
        assert f"{m:16s}{'n/a':>8s}   ({why})" in printed
    # report.py: the missing SWA is a visible cell (n/a, why) in the Figure 4 table, not a silence
    report.main([str(tmp_path), "-o", str(tmp_path / "report"), "--reference", "none"])
    f4 = json.loads((tmp_path / "report" / "figure4.json").read_text())
    assert f4["swa-full"]["n_combos"] == 0 and f4["swa-full"]["missing"] == {"IDR+MES": why}
    md = (tmp_path / "report" / "report.md").read_text()
    (row,) = [x for x in md.splitlines() if x.startswith("| swa-full |")]
    assert row == f"| swa-full | n/a | — | 0 | — | {why} (IDR+MES) |"


def test_fig4_cli_errors_are_one_line(tmp_path):
    (tmp_path / "s0").mkdir()
    proc = subprocess.run([sys.executable, "fig4.py", str(tmp_path), "--test", "IDR"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert str(tmp_path) in err and "at least 2 seeds" in err
    with pytest.raises(ValueError, match="--members must be >= 1"):
        fig4.main([str(tmp_path), "--members", "0"])
    assert fig4.build_parser().parse_args([str(tmp_path)]).metric == "dice"


def test_test_sets_same_list_syntax(tmp_path):
    """--test as every dataset-list flag reads it (data.flags.DatasetList); COMBO_DIR first, as
    in --help."""
    parse = fig4.build_parser().parse_args
    assert parse([str(tmp_path), "--test", "IDR,DDR", "MES"]).test == ["IDR", "DDR", "MES"]
    assert parse([str(tmp_path), "--test", "mes+idr"]).test == ["IDR", "MES"]
    assert parse([str(tmp_path)]).test == ["IDR", "DDR", "FGA", "RET", "MES"]
    with pytest.raises(ValueError, match="^--test: unknown dataset ID .XYZ."):
        parse([str(tmp_path), "--test", "XYZ"])


def test_averaging_flags_are_average_pys():
    """fig4.py writes out average.add_averaging_args (importing average.py would load torch before
    --help): the same flags, types, choices, defaults and help as the function gives with fig4's
    reference, bn choices and bn_help."""
    import argparse

    import average

    ref = argparse.ArgumentParser()
    average.add_averaging_args(ref, reference="best", bn=("keep", "recompute", "both"),
                               bn_help=", or both (each average twice, '+bn' names the recomputed)")

    def flags(parser):
        return [(a.option_strings, a.dest, a.type, a.choices, a.default, a.help, a.metavar)
                for a in parser._actions if a.dest != "help"]
    ours = flags(fig4.build_parser())
    assert ours[-len(flags(ref)):] == flags(ref)
