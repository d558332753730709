"""report.py on a hand-made fixture of results JSON files: exact table numbers, combos, figures,
errors."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import report

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROTOCOL = {"thresholds": 11, "roi": "fov", "resolution": 128, "tta": False, "tile": None}


def write_run(runs, combo, seed, tests, n_train=None, mean=None):
    """tests: {TEST: (aupr per lesion, dice per lesion)}; None = NaN (written as null, as the
    contract says). mean: {TEST: (mean_aupr, mean_dice)} written as given (default: null, so
    report.py must average itself)."""
    results = {}
    for test, (aupr, dice) in tests.items():
        m = (mean or {}).get(test, (None, None))
        results[test] = {"n_images": 3, "mean_aupr": m[0], "mean_dice": m[1],
                         "lesions": {c: {"aupr": a, "dice": d, "tp": [0] * 11, "fp": [0] * 11,
                                         "pos": 1}
                                     for c, a, d in zip(("EX", "HE", "MA", "CWS"), aupr, dice)}}
    rec = {"version": 1, "checkpoints": [], "train": combo.split("+"), "seed": seed,
           "method": "baseline", "protocol": PROTOCOL, "results": results}
    if n_train is not None:
        rec["n_train_images"] = n_train
    path = runs / combo / f"s{seed}" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def flat(x):
    return (x, x, x, x)


@pytest.fixture
def fixture_dirs(tmp_path):
    runs = tmp_path / "runs"
    # Table 2 rows: IDR and DDR trained alone, two seeds each (RET has no single-dataset run ->
    # "—").
    write_run(runs, "IDR", 0, {"IDR": ((.8, .6, .4, .7), flat(.5)), "MES": (flat(.3), flat(.40))},
              54, mean={"IDR": (.625, None)})
    write_run(runs, "IDR", 1, {"IDR": ((.9, .5, .5, None), flat(.6)), "MES": (flat(.3), flat(.44))},
              54)
    write_run(runs, "DDR", 0, {"DDR": ((.5, .4, .2, .3), flat(.3)), "IDR": (flat(.5), flat(.20))},
              383)
    write_run(runs, "DDR", 1, {"DDR": ((.6, .4, .3, .3), flat(.3)), "IDR": (flat(.5), flat(.30))},
              383)
    # Table 3, IDRiD-test: DDR+MES (2 seeds), RET (1 seed); DDR+FGA+MES missing.
    write_run(runs, "DDR+MES", 0, {"IDR": (flat(.5), (.6, .6, .6, .6))}, 500)
    write_run(runs, "DDR+MES", 1, {"IDR": (flat(.5), (.7, .6, .6, .66))}, 500,
              mean={"IDR": (None, .64)})
    write_run(runs, "RET", 0, {"IDR": (flat(.5), (.1, .2, .3, None)), "MES": (flat(.2), flat(.19))},
              1000)
    write_run(runs, "FGA", 0, {"IDR": (flat(.5), flat(.25))}, 1200)
    # Messidor-test: IDR+DDR with one seed whose metrics are all null (NaN): only the other counts.
    write_run(runs, "IDR+DDR", 0, {"MES": (flat(.4), flat(.42))}, 437)
    write_run(runs, "IDR+DDR", 1, {"MES": (flat(None), flat(None))}, 437)
    # DDR-test: IDR+MES evaluated, but its only metric is undefined -> "NaN (n=0 of 1)".
    write_run(runs, "IDR+MES", 0, {"DDR": (flat(None), flat(None))}, 192)
    # Unrelated files must be ignored.
    (runs / "notes.txt").write_text("hello")
    (runs / "IDR" / "s0" / "args.json").write_text("{}")
    (runs / "junk" / "s0").mkdir(parents=True)
    (runs / "junk" / "s0" / "results.json").write_text("{not json")
    (runs / "IDR" / "swa" / "results.json").parent.mkdir(parents=True)
    (runs / "IDR" / "swa" / "results.json").write_text(json.dumps({"results": {}}))
    # Figure 4 for two combinations.
    m = lambda d: {t: {"mean_dice": v, "mean_aupr": 0.5} for t, v in d.items()}  # noqa: E731
    (runs / "DDR+MES" / "fig4.json").write_text(json.dumps({
        "combo": "DDR+MES", "train": ["DDR", "MES"], "methods": {
            "baseline": m({"IDR": .6, "MES": .4}), "ensemble": m({"IDR": .7, "MES": .5}),
            "swa-full": m({"IDR": .65, "MES": None})}}))
    (runs / "IDR+DDR" / "fig4.json").write_text(json.dumps({
        "combo": "IDR+DDR", "train": ["IDR", "DDR"], "methods": {
            "baseline": m({"MES": .3, "DDR": .5}), "ensemble": m({"MES": .4, "DDR": .6})}}))
    char = tmp_path / "characterize.json"
    char.write_text(json.dumps({"rule": "test", "datasets": {
        "IDR": {"style": "fine"}, "DDR": {"style": "fine"}, "MES": {"style": "fine"},
        "FGA": {"style": "coarse"}, "RET": {"style": "mixed"}}}))
    return runs, char, tmp_path / "report"


def build(fixture_dirs, *extra):
    runs, char, out = fixture_dirs
    report.main([str(runs), "-o", str(out), "--characterize", str(char), *extra])
    return out


def load(out, name):
    return json.loads((out / name).read_text())


def test_table2_exact_numbers(fixture_dirs):
    t2 = load(build(fixture_dirs), "table2.json")
    idr = t2["IDR"]["ours"]
    assert idr["EX"]["mean"] == pytest.approx((.8 + .9) / 2)
    assert idr["EX"]["std"] == pytest.approx(math.sqrt(((.8 - .85) ** 2 + (.9 - .85) ** 2) / 1))
    assert idr["HE"]["mean"] == pytest.approx(.55) and idr["MA"]["mean"] == pytest.approx(.45)
    # CWS is null in seed 1: one finite value, no std.
    assert idr["CWS"] == {**idr["CWS"], "mean": pytest.approx(.7), "std": None, "n": 1, "n_runs": 2}
    # mean: seed 0's file value .625, seed 1 has a null mean -> mean of its defined lesions
    # (.9+.5+.5)/3.
    assert idr["mean"]["mean"] == pytest.approx((.625 + (.9 + .5 + .5) / 3) / 2)
    ddr = t2["DDR"]["ours"]
    assert ddr["EX"]["mean"] == pytest.approx(.55) and ddr["HE"]["std"] == pytest.approx(0.0)
    assert ddr["mean"]["mean"] == pytest.approx(((.5 + .4 + .2 + .3) / 4
                                                 + (.6 + .4 + .3 + .3) / 4) / 2)
    assert t2["RET"]["ours"]["EX"]["n_runs"] == 0 and t2["RET"]["ours"]["EX"]["mean"] is None
    assert t2["IDR"]["seeds"] == [0, 1]
    assert t2["IDR"]["published"]["Playout & Cheriet"] == {"EX": .825, "HE": .620, "MA": .451,
                                                          "CWS": .713, "mean": .652}
    assert t2["DDR"]["published"]["Playout & Cheriet"]["mean"] == .429


def test_table3_combos_and_missing(fixture_dirs):
    out = build(fixture_dirs)
    t3 = load(out, "table3.json")
    assert list(t3) == ["IDR", "MES", "DDR"]
    assert list(t3["IDR"]) == ["DDR+MES", "RET", "DDR+FGA+MES"]
    assert list(t3["MES"]) == ["IDR+DDR", "RET", "IDR+DDR+FGA"]
    assert list(t3["DDR"]) == ["IDR+MES", "RET", "IDR+FGA+MES"]
    dm = t3["IDR"]["DDR+MES"]
    # seed 0: mean of lesions .6; seed 1: the file's mean_dice .64 wins over the lesions.
    assert (dm["ours"]["mean"] == pytest.approx(.62)
            and dm["ours"]["std"] == pytest.approx(math.sqrt(2 * .02 ** 2)))
    assert dm["paper"] == .634
    assert (t3["IDR"]["RET"]["ours"]["mean"] == pytest.approx(.2)
            and t3["IDR"]["RET"]["ours"]["n"] == 1)
    assert t3["IDR"]["DDR+FGA+MES"]["ours"]["n_runs"] == 0
    assert t3["MES"]["IDR+DDR"]["ours"] == {**t3["MES"]["IDR+DDR"]["ours"],
                                            "mean": pytest.approx(.42), "n": 1, "n_runs": 2}
    assert t3["MES"]["RET"]["ours"]["mean"] == pytest.approx(.19)
    assert t3["DDR"]["IDR+MES"]["ours"]["n"] == 0 and t3["DDR"]["IDR+MES"]["ours"]["n_runs"] == 1
    md = (out / "report.md").read_text()
    assert "| IDRiD-test | DDR+MES | 0.620 ± 0.028 (n=2) | 0.634 |" in md
    assert "| IDRiD-test | DDR+FGA+MES | — | 0.661 |" in md
    assert "| IDRiD-test | RET | 0.200 (n=1) | 0.222 |" in md
    assert "| DDR-test | IDR+MES | NaN (n=0 of 1) | 0.426 |" in md
    assert "| Retinal-Lesions | ours | — | — | — | — | — |" in md


def test_figure3_order_styles_best(fixture_dirs):
    out = build(fixture_dirs)
    f3 = load(out, "figure3.json")
    assert f3["order_by"] == "n_train_images"
    idr = f3["panels"]["IDR"]
    # Excludes every combination holding IDR; ordered by training images (383, 500, 1000, 1200).
    assert [r["combo"] for r in idr] == ["DDR", "DDR+MES", "RET", "FGA"]
    assert [r["style"] for r in idr] == ["fine", "fine", "mixed", "coarse"]
    assert [r["best"] for r in idr] == [False, True, False, False]
    assert idr[0]["min"] == pytest.approx(.2) and idr[0]["max"] == pytest.approx(.3)
    assert [r["combo"] for r in f3["panels"]["MES"]] == ["IDR", "IDR+DDR", "RET"]
    assert combo_style_independent("IDR+DDR+FGA") == "coarse"


def combo_style_independent(combo):
    return report.combo_style(combo, {"IDR": "fine", "DDR": "mixed", "FGA": "coarse"})


def test_figure3_falls_back_to_dataset_count(fixture_dirs):
    runs, _, _ = fixture_dirs
    path = runs / "FGA" / "s0" / "results.json"
    rec = json.loads(path.read_text())
    del rec["n_train_images"]
    path.write_text(json.dumps(rec))
    f3 = load(build(fixture_dirs), "figure3.json")
    assert f3["order_by"] == "n_datasets"
    # canonical within ties
    assert [r["combo"] for r in f3["panels"]["IDR"]] == ["DDR", "FGA", "RET", "DDR+MES"]
    assert report.combo_style("IDR+DDR", {"IDR": "fine", "DDR": "mixed"}) == "mixed"
    assert report.combo_style("IDR+DDR", {"IDR": "fine"}) is None  # DDR not characterized


def test_figure4_numbers(fixture_dirs):
    f4 = load(build(fixture_dirs), "figure4.json")
    # every method fig4.py evaluates, also those no fig4.json holds (n/a cells, with why)
    assert list(f4) == ["baseline", "ensemble", "swa-encoder", "swa-decoder", "swa-full",
                        "soup-encoder", "soup-decoder", "soup-full"]
    assert f4["swa-full"]["missing"] == {"IDR+DDR": "not in fig4.json"}
    assert f4["soup-full"]["n_combos"] == 0 and f4["soup-full"]["mean_dice"] is None
    assert f4["soup-full"]["missing"] == {c: "not in fig4.json" for c in ("DDR+MES", "IDR+DDR")}
    assert f4["baseline"]["per_combo"] == {"DDR+MES": pytest.approx(.5),
                                           "IDR+DDR": pytest.approx(.4)}
    assert f4["baseline"]["mean_dice"] == pytest.approx(.45)
    assert f4["baseline"]["std"] == pytest.approx(math.sqrt(2 * .05 ** 2))
    assert f4["ensemble"]["mean_dice"] == pytest.approx(.55)
    assert f4["ensemble"]["delta_vs_baseline"] == pytest.approx(.1)
    # swa-full: MES is null, so only IDR counts (.65), one combination, paired with baseline .5.
    assert f4["swa-full"] == {**f4["swa-full"], "mean_dice": pytest.approx(.65), "n_combos": 1,
                              "std": None, "delta_vs_baseline": pytest.approx(.15)}


def test_figures_and_report_md(fixture_dirs):
    out = build(fixture_dirs)
    md = (out / "report.md").read_text()
    for name in ("figure3.png", "figure4.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in md
    # protocol stated, with the number of runs
    assert '"resolution": 128' in md and "(11 run(s))" in md
    # NaN written as null
    assert "seeds [0, 1]" in md and "NaN" not in (out / "table3.json").read_text()


@pytest.mark.skipif(not (ROOT / "reference" / "lesions_database_cross_study.csv").is_file(),
                    reason="reference/lesions_database_cross_study.csv not in the project")
def test_reference_beside_ours(fixture_dirs):
    out = build(fixture_dirs)  # default --reference: the project's copy
    pairs = load(out, "reference_aupr.json")
    # The authors' single IDRID-only run ("fiery-bush-76") has IDRID EXUDATES AUC-PR
    # 0.8319008350372314.
    (hit,) = [p for p in pairs if (p["combo"], p["test"], p["lesion"]) == ("IDR", "IDR", "EX")]
    assert hit["ours"] == pytest.approx(.85) and hit["authors"] == pytest.approx(0.8319008350372314)
    # NaN ours: no pair
    assert not any(p["lesion"] == "CWS" and p["combo"] == "IDR+MES" for p in pairs)
    assert (out / "reference_aupr.png").read_bytes()[:8] == PNG_MAGIC
    assert "](reference_aupr.png)" in (out / "report.md").read_text()
    runs, char, _ = fixture_dirs
    report.main([str(runs), "-o", str(out), "--characterize", str(char), "--reference", "none"])
    assert not (out / "reference_aupr.json").exists() and not (out / "reference_aupr.png").exists()
    assert "Not plotted" in (out / "report.md").read_text()


def test_without_characterize_and_fig4(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "IDR", 0, {"IDR": (flat(.5), flat(.5)), "DDR": (flat(.5), flat(.1))})
    out = tmp_path / "out"
    report.main([str(runs), "-o", str(out), "--reference", "none"])
    f3 = load(out, "figure3.json")
    assert f3["panels"]["DDR"][0]["style"] is None and f3["order_by"] == "n_datasets"
    assert (not (out / "figure4.png").exists()
            and "No fig4.json found." in (out / "report.md").read_text())


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "report.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_no_results_one_line_error(tmp_path):
    (tmp_path / "runs" / "IDR" / "s0").mkdir(parents=True)
    (tmp_path / "runs" / "readme.txt").write_text("nothing here")
    proc = run_cli(tmp_path / "runs", "-o", tmp_path / "out")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (proc.stderr.strip().count("\n") == 0
            and proc.stderr.startswith("error: no results found under"))
    with pytest.raises(FileNotFoundError, match="missing"):
        report.main([str(tmp_path / "missing"), "-o", str(tmp_path / "out")])


def test_bad_flags_one_line(fixture_dirs, tmp_path):
    runs, char, out = fixture_dirs
    with pytest.raises(FileNotFoundError, match="--characterize"):
        report.main([str(runs), "-o", str(out), "--characterize", str(tmp_path / "nope.json")])
    with pytest.raises(FileNotFoundError, match="--reference"):
        report.main([str(runs), "-o", str(out), "--characterize", str(char),
                     "--reference", str(tmp_path / "x.csv")])
    char.write_text(json.dumps({"datasets": {"IDR": {"style": "blurry"}}}))
    with pytest.raises(ValueError, match="unknown labelling style"):
        report.main([str(runs), "-o", str(out), "--characterize", str(char)])


def test_sweep_curves_figure(fixture_dirs):
    """Runs with a log.jsonl get the sweep's validation curves, linked in report.md; a rerun
    without logs drops it."""
    runs, char, out = fixture_dirs
    for combo, seed, dice in (("IDR", 0, (.1, .3)), ("IDR", 1, (.2, .25)),
                              ("DDR+MES", 0, (.05, .4))):
        val = [{"step": s, "split": "val", "loss": 1.0 / s, "mean_dice": d, "best": True}
               for s, d in zip((5, 10), dice)]
        (runs / combo / f"s{seed}" / "log.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                                     for r in val))
    build(fixture_dirs)
    md = (out / "report.md").read_text()
    assert (out / "sweep_curves.png").read_bytes()[:8] == PNG_MAGIC and "](sweep_curves.png)" in md
    assert "## Training curves of the sweep" in md and "best.pt" in md
    for path in runs.glob("*/s*/log.jsonl"):
        path.unlink()
    build(fixture_dirs)
    assert not (out / "sweep_curves.png").exists()
    assert "No run's log.jsonl holds a validation yet." in (out / "report.md").read_text()


def test_real_section(fixture_dirs, tmp_path):
    rec = {"flags": ["--lesion-weights", "MA=4"], "resolution": 1024,
           "lesions": ["EX", "HE", "MA", "CWS"],
           "train": {"n_images": 8, "ap": [0.79, 0.36, 0.028, 0.32],
                     "prevalence": [0.015, 0.032, 0.0011, 0.0014],
                     "baseline_ap": [0.061, 0.25, 0.0015, 0.0035]},
           "test": {"n_images": 4, "ap": [0.81, 0.099, 0.0275, 0.118],
                    "prevalence": [0.0158, 0.0053, 0.0016, 0.00035],
                    "baseline_ap": [0.077, 0.018, 0.002, 0.001]},
           "targets_met": {"EX": True, "HE": True, "MA": True, "CWS": False}}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "real.json").write_text(json.dumps(rec))
    (tmp_path / "r" / "heldout.png").write_bytes(PNG_MAGIC + b"x")
    out = build(fixture_dirs, "--real", str(tmp_path / "r" / "real.json"))
    md = (out / "report.md").read_text()
    # AP / prevalence = 0.0275 / 0.0016 = 17.2
    assert "| MA | 0.028 | 0.028 | 0.0016 | 17.2 | 0.002 | met |" in md, md
    assert ("| CWS | 0.320 | 0.118 | 0.00035 | 337.1 | 0.001 | missed |" in md
            and "`--lesion-weights MA=4`" in md)
    assert ((out / "real_heldout.png").read_bytes() == PNG_MAGIC + b"x"
            and "](real_heldout.png)" in md)
    build(fixture_dirs)  # a rerun without it drops the section and the stale figure
    assert (not (out / "real_heldout.png").exists()
            and "real-data" not in (out / "report.md").read_text())
    with pytest.raises(FileNotFoundError, match="--real"):
        build(fixture_dirs, "--real", str(tmp_path / "nope.json"))


# The paper's Table 2 as /work/shared/REFERENCE.md transcribes it (EX, HE, MA, CWS, mean): every
# cell is published.
PUBLISHED_TABLE2 = {
    "IDR": {"L-Seg": (.795, .637, .463, .711, .652), "other method": (.842, .593, .484, .641, .640),
            "Playout & Cheriet": (.825, .620, .451, .713, .652)},
    "DDR": {"L-Seg": (.555, .359, .105, .265, .321),
            "Playout & Cheriet": (.592, .408, .281, .434, .429)},
    "RET": {"Lesion-Net": (.740, .617, .377, .575, .577),
            "Playout & Cheriet": (.724, .589, .451, .540, .571)},
}


def test_table2_every_published_cell_filled(fixture_dirs):
    out = build(fixture_dirs)
    t2, md = load(out, "table2.json"), (out / "report.md").read_text()
    for ds, rows in PUBLISHED_TABLE2.items():
        for name, values in rows.items():
            assert t2[ds]["published"][name] == dict(zip(("EX", "HE", "MA", "CWS", "mean"), values))
            cells = " | ".join(f"{v:.3f}" for v in values)
            assert f"| | {name} (published) | {cells} |" in md
    assert "| | other method (published) | 0.842 | 0.593 | 0.484 | 0.641 | 0.640 |" in md


def test_report_refuses_to_count_a_backup_folder_as_a_seed(fixture_dirs, capsys):
    """`cp -r runs/IDR runs/IDR.bak`: the same two runs in two more folders; each counted once."""
    runs, _, out = fixture_dirs
    for seed in (0, 1):
        args = {"train": ["IDR"], "seed": seed, "lr": 3e-4, "resolution": 128,
                "out": f"runs/IDR/s{seed}"}
        (runs / "IDR" / f"s{seed}" / "args.json").write_text(json.dumps(args))
    shutil.copytree(runs / "IDR", runs / "IDR.bak")
    idr = load(build(fixture_dirs), "table2.json")["IDR"]
    assert idr["seeds"] == [0, 1]
    ex = idr["ours"]["EX"]  # the two seeds' EX AUPR, .8 and .9, each once
    assert ex["n"] == 2 and ex["mean"] == pytest.approx(.85)
    assert ex["std"] == pytest.approx(np.std([.8, .9], ddof=1))
    err, md = capsys.readouterr().err, (out / "report.md").read_text()
    for seed in (0, 1):
        line = f"{runs / 'IDR.bak' / f's{seed}'} holds the same run as {runs / 'IDR' / f's{seed}'}"
        assert f"note: {line}" in err and f"- NOTE: {line}" in md
    # Another setting (lr) under one seed is another run: counted, and named.
    shutil.rmtree(runs / "IDR.bak" / "s1")
    other = json.loads((runs / "IDR.bak" / "s0" / "args.json").read_text()) | {"lr": 1e-3}
    (runs / "IDR.bak" / "s0" / "args.json").write_text(json.dumps(other))
    idr = load(build(fixture_dirs), "table2.json")["IDR"]
    assert idr["seeds"] == [0, 0, 1] and idr["ours"]["EX"]["n"] == 3
    assert "IDR seed 0 is 2 runs with other settings (lr)" in (out / "report.md").read_text()


def test_run_identity_from_args_json_not_folder(fixture_dirs, capsys):
    """A run's combination and seed are what its args.json says, whatever its folder is called; a
    second fig4.json of one combination is named, not counted."""
    runs, _, out = fixture_dirs
    rec = json.loads((runs / "FGA" / "s0" / "results.json").read_text())
    del rec["train"], rec["seed"]
    (runs / "old" / "s7").mkdir(parents=True)
    (runs / "old" / "s7" / "results.json").write_text(json.dumps(rec))
    (runs / "old" / "s7" / "args.json").write_text(json.dumps({"train": ["RET"], "seed": 3}))
    (runs / "old" / "fig4.json").write_text((runs / "IDR+DDR" / "fig4.json").read_text())
    (runs / "bad" / "s2").mkdir(parents=True)  # a damaged args.json: skipped, never a traceback
    (runs / "bad" / "s2" / "results.json").write_text(json.dumps(rec))
    (runs / "bad" / "s2" / "args.json").write_text(json.dumps({"train": ["RET"], "seed": [2]}))
    (runs / "oops" / "s4").mkdir(parents=True)  # a test set's block that is no scores
    (runs / "oops" / "s4" / "results.json").write_text(
        json.dumps({**rec, "results": {"IDR": "oops"}}))
    (runs / "cut" / "s5").mkdir(parents=True)  # a truncated file
    (runs / "cut" / "s5" / "results.json").write_text(json.dumps(rec)[:50])
    out = build(fixture_dirs)
    err = capsys.readouterr().err
    for folder, why in (("bad/s2", "its args.json gives no combination and seed (a damaged file)"),
                        ("oops/s4", "results.IDR is not a test set's scores (a damaged file)"),
                        ("cut/s5", "not readable as JSON")):
        assert (f"skipped {runs / folder / 'results.json'}: {why}; "
                f"left out of the tables\n" in err), err
    (ret,) = [r for r in load(out, "figure3.json")["panels"]["IDR"] if r["combo"] == "RET"]
    assert ret["n_runs"] == 2 and sorted(ret["values"]) == pytest.approx([.2, .25])
    assert load(out, "figure4.json")["baseline"]["n_combos"] == 2
    assert f"{runs / 'old' / 'fig4.json'} is a second Figure 4 of IDR+DDR: not counted" in \
        (out / "report.md").read_text()


def test_names_agree_with_runfolder_resumable():
    """report.NOT_IDENTITY is a copy of runfolder.RESUMABLE (the flags a resume may change)."""
    import runfolder

    assert set(report.NOT_IDENTITY) == set(runfolder.RESUMABLE)


def _give_args(runs, **settings):
    """An args.json beside every results file of the fixture, recording the run's data settings."""
    for path in runs.glob("*/s*/results.json"):
        rec = report._read_json(path)
        if not rec or "train" not in rec:  # the fixture's junk files
            continue
        args = {"train": rec["train"], "seed": rec["seed"], "resolution": 64, **settings}
        (path.parent / "args.json").write_text(json.dumps(args))


def test_synthetic_data_said_first_and_beside_published_numbers(fixture_dirs, tmp_path):
    """Runs that read data.synthetic's output: the report's first lines and every caption beside
    published numbers say so; without a recorded data source: "data source unknown", not either."""
    from data.synthetic import generate

    runs, _, out = fixture_dirs
    md = (build(fixture_dirs) / "report.md").read_text()  # no args.json records a data root
    assert "data source unknown" in md.split("## Protocol")[0] and "Synthetic" not in md
    generate(tmp_path / "data", images=1, size=64, seed=0)  # the demo's datasets, with the marker
    _give_args(runs, data_root=str(tmp_path / "data"), cache=str(tmp_path / "no-cache"))
    md = (build(fixture_dirs) / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Synthetic data, toy models.**")
    warned = [x for x in md.splitlines() if x.startswith("**Ours: toy models on synthetic data**")]
    # Table 2, Table 3 and the reference AUPR (when the project has the authors' export)
    assert len(warned) == 2 + (ROOT / report.DEFAULT_REFERENCE).is_file()
    assert any("Published rows" in x for x in warned) and any("*paper*" in x for x in warned)
    # The authors' released models: scored on data their results file does not name -> unknown.
    rec = {"method": "authors", "train": ["IDR"], "protocol": {"resolution": 64},
           "results": {"IDR": {"mean_aupr": .6, "mean_dice": .4}}}
    (tmp_path / "authors" / "IDR").mkdir(parents=True)
    (tmp_path / "authors" / "IDR" / "results.json").write_text(json.dumps(rec))
    md = (build(fixture_dirs, "--authors", str(tmp_path / "authors")) / "report.md").read_text()
    (line,) = [x for x in md.splitlines() if "*model*: the authors' released model" in x]
    assert line.startswith("**Ours: toy models on synthetic data**")
    assert "under our protocol, on test data of unknown source (data source unknown)" in line


def test_real_data_source_from_the_prepared_cache(fixture_idrid, tmp_path):
    """The cache's meta.json names the root a run read: the real IDRiD sample has no marker."""
    from data import prepare_cache

    prepare_cache("IDR", tmp_path / "none", tmp_path / "cache", 64, roots={"IDR": fixture_idrid},
                  split_files={"IDR": str(fixture_idrid / "split.json")}, verbose=False)
    runs = tmp_path / "runs"
    write_run(runs, "IDR", 0, {"IDR": (flat(.5), flat(.5))})
    rec = json.loads((runs / "IDR" / "s0" / "results.json").read_text())
    rec["protocol"]["resolution"] = 64  # evaluated at the prepared cache's resolution
    (runs / "IDR" / "s0" / "results.json").write_text(json.dumps(rec))
    args = {"train": ["IDR"], "seed": 0, "resolution": 64, "cache": str(tmp_path / "cache"),
            "data_root": str(tmp_path / "none"), "root": [f"IDR={fixture_idrid}"]}
    (runs / "IDR" / "s0" / "args.json").write_text(json.dumps(args))
    report.main([str(runs), "-o", str(tmp_path / "out"), "--reference", "none"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.splitlines()[2].startswith("Data: the real datasets") and "synthetic data" not in md
    assert "**Ours" not in md


def test_missing_swa_is_a_visible_cell(fixture_dirs):
    """fig4.json of a run without snapshots lists SWA under "missing": an n/a cell with why, in the
    table and on the figure's data; the other combination's SWA still counts."""
    runs, _, out = fixture_dirs
    path = runs / "IDR+DDR" / "fig4.json"
    rec = json.loads(path.read_text())
    why = "no snapshots in s0/snapshots"
    rec["missing"] = {f"swa-{p}": why for p in ("encoder", "decoder", "full")}
    path.write_text(json.dumps(rec))
    out = build(fixture_dirs)
    f4 = load(out, "figure4.json")
    assert f4["swa-full"]["missing"] == {"IDR+DDR": "no snapshots in s0/snapshots"}
    assert f4["swa-full"]["per_combo"] == {"DDR+MES": pytest.approx(.65)}
    assert f4["swa-encoder"]["n_combos"] == 0
    md = (out / "report.md").read_text()
    assert "| swa-full | 0.650 | — | 1 | 0.150 | no snapshots in s0/snapshots (IDR+DDR) |" in md
    assert "| swa-encoder | n/a | — | 0 | — | not in fig4.json (DDR+MES); " \
           "no snapshots in s0/snapshots (IDR+DDR) |" in md
    assert (out / "figure4.png").read_bytes()[:8] == PNG_MAGIC


def test_figure4_over_the_training_sets(fixture_dirs):
    """The paper's Figure 4: per training combination (x), each method's Dice averaged over that
    combination's test sets; n/a where a combination lacks a method; drawn beside the summary."""
    runs, _, out = fixture_dirs
    path = runs / "IDR+DDR" / "fig4.json"
    rec = json.loads(path.read_text())
    members = [str(runs / "IDR+DDR" / f"s{i}" / "best.pt") for i in (0, 1)]
    rec.update(tests=["MES", "DDR"], members=members, snapshots=["a.pt", "b.pt", "c.pt"],
               missing={"swa-full": "no snapshots in s0/snapshots"})
    path.write_text(json.dumps(rec))
    out = build(fixture_dirs)
    sweep = load(out, "figure4_sweep.json")
    assert sweep["combos"] == ["IDR+DDR", "DDR+MES"]  # two sets each: canonical order
    # by hand from the fig4.json files: IDR+DDR on MES and DDR, DDR+MES on IDR and MES (MES null)
    assert sweep["series"]["baseline"] == pytest.approx([(.3 + .5) / 2, (.6 + .4) / 2])
    assert sweep["series"]["ensemble"] == pytest.approx([(.4 + .6) / 2, (.7 + .5) / 2])
    assert sweep["series"]["swa-full"] == [None, pytest.approx(.65)]
    assert sweep["missing"]["swa-full"] == {"IDR+DDR": "no snapshots in s0/snapshots"}
    assert sweep["runs"]["IDR+DDR"] == {"members": ["s0", "s1"], "baseline": "", "snapshots": 3,
                                        "tests": ["MES", "DDR"]}
    md = (out / "report.md").read_text()
    assert (out / "figure4_sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert "](figure4_sweep.png)" in md
    assert md.index("](figure4.png)") < md.index("](figure4_sweep.png)")  # beside the summary
    assert "| IDR+DDR | s0, s1 | 3 | MES, DDR | 0.400 | 0.500 | n/a | n/a | n/a |" in md
    assert "| DDR+MES | — | 0 | IDR, MES | 0.500 | 0.600 | n/a | n/a | 0.650 |" in md
    assert "2 training combination(s), each from its `<COMBO>/fig4.json` (`fig4.py`" in md


# ---- the authors' released models (authors.py) beside ours ----
def test_report_shows_the_authors_models_beside_ours(tmp_path):
    block = {"n_images": 3, "mean_aupr": 0.61, "mean_dice": 0.25, "mean_dice_argmax": 0.43,
             "lesions": {}}
    rec = {"version": 1, "checkpoints": ["hub:IDR+DDR"], "train": ["IDR", "DDR"], "seed": None,
           "method": "authors", "protocol": {}, "results": {"MES": block}}
    (tmp_path / "authors" / "IDR+DDR").mkdir(parents=True)
    (tmp_path / "authors" / "IDR+DDR" / "results.json").write_text(json.dumps(rec))
    ours = {**rec, "method": "baseline", "seed": 0,
            "results": {"MES": {**block, "mean_aupr": 0.5, "mean_dice": 0.4}}}
    (tmp_path / "runs" / "IDR+DDR" / "s0").mkdir(parents=True)
    (tmp_path / "runs" / "IDR+DDR" / "s0" / "results.json").write_text(json.dumps(ours))
    report.main([str(tmp_path / "runs"), "-o", str(tmp_path / "report"), "--authors",
                 str(tmp_path / "authors")])
    md = (tmp_path / "report" / "report.md").read_text()
    # the export's mean AUPR of IDR+DDR on Messidor, from the CSV itself
    export = report.load_reference(ROOT / "reference" / "lesions_database_cross_study.csv")
    mean_export = sum(export[("IDR+DDR", "MES", les)] for les in ("EX", "HE", "MA", "CWS")) / 4
    row = (f"| IDR+DDR | Messidor | 0.500 (n=1) | 0.610 | {mean_export:.3f} | 0.400 (n=1) | 0.250 "
           f"| 0.430 |")
    assert row in md
    assert "softmax vs sigmoid" in md and "ROI" in md
    table = json.loads((tmp_path / "report" / "authors.json").read_text())
    assert table[-1]["model_dice_argmax"] == 0.43


def test_real_styles_section(fixture_dirs, tmp_path):
    scores = lambda d: {les: {"dice": d, "ap": d / 2}  # noqa: E731
                        for les in ("EX", "HE", "MA", "CWS")}
    rec = {"flags": ["--iters", "100"], "resolution": 512, "n_test": 4,
           "styles": {"FIN": "fine", "CRS": "coarse"},
           "runs": {"FIN": {"scores": scores(0.5), "train_seconds": 1},
                    "FIN+CRS": {"scores": scores(0.25), "train_seconds": 1},
                    "CRS": {"scores": scores(0.125), "train_seconds": 1}}}
    (tmp_path / "table3.json").write_text(json.dumps(rec))
    out = build(fixture_dirs, "--real-styles", str(tmp_path / "table3.json"))
    md = (out / "report.md").read_text()
    assert ("| fine + coarse (FIN+CRS) | 0.250 (0.125) | 0.250 (0.125) | 0.250 (0.125) | "
            "0.250 (0.125) |" in md)
    assert "FIN fine, CRS coarse" in md and "## Table 3 on real photographs" in md
    with pytest.raises(FileNotFoundError, match="--real-styles"):
        build(fixture_dirs, "--real-styles", str(tmp_path / "nope.json"))


def test_a_dataset_of_ones_own_in_the_report(tmp_path):
    """Runs trained on and tested on ABC (--root ABC=DIR): no error; ABC after the five in every
    order, named by its dataset.json ("My clinic (ABC)"); a Figure 3 panel of its own; a Table 2
    row of ours (trained alone, tested on itself) with the numbers written here; in Figure 4's
    test sets."""
    clinic = tmp_path / "clinic"
    clinic.mkdir()
    (clinic / "dataset.json").write_text(json.dumps({"name": "My clinic",
                                                     "lesions": {"EX": "masks/EX"}}))
    runs = tmp_path / "runs"
    abc = ((.4, .3, None, None), (.2, .1, None, None))  # EX, HE annotated; MA, CWS not
    write_run(runs, "IDR", 0, {"IDR": (flat(.5), flat(.5)), "ABC": abc}, 54)
    write_run(runs, "ABC", 0, {"IDR": (flat(.5), flat(.3)), "ABC": abc}, 6)
    write_run(runs, "ABC", 1, {"IDR": (flat(.5), flat(.3)), "ABC": ((.6, .5, None, None), abc[1])},
              6)
    write_run(runs, "IDR+ABC", 0, {"IDR": (flat(.5), flat(.4)), "ABC": abc}, 60)
    _give_args(runs, root=[f"ABC={clinic}"])
    m = lambda d: {t: {"mean_dice": v, "mean_aupr": 0.5} for t, v in d.items()}  # noqa: E731
    (runs / "IDR+ABC" / "fig4.json").write_text(json.dumps({"train": ["ABC", "IDR"], "methods": {
        "baseline": m({"IDR": .6, "ABC": .4}), "ensemble": m({"IDR": .7, "ABC": .5})}}))
    out = tmp_path / "report"
    report.main([str(runs), "-o", str(out), "--reference", "none"])
    f3 = load(out, "figure3.json")
    assert list(f3["panels"]) == ["IDR", "ABC"]
    assert f3["names"] == {"IDR": "IDRiD", "ABC": "My clinic (ABC)"}
    assert [r["combo"] for r in f3["panels"]["ABC"]] == ["IDR"]  # the only one without ABC
    assert [r["combo"] for r in f3["panels"]["IDR"]] == ["ABC"]
    t2 = load(out, "table2.json")
    assert list(t2) == ["IDR", "DDR", "RET", "ABC"] and t2["ABC"]["seeds"] == [0, 1]
    assert t2["ABC"]["ours"]["EX"]["mean"] == pytest.approx(.5)  # (0.4 + 0.6) / 2
    assert t2["ABC"]["ours"]["MA"]["n"] == 0
    md = (out / "report.md").read_text()
    assert "| My clinic (ABC) | ours | 0.500 ± 0.141 (n=2) | 0.400 ± 0.141 (n=2) |" in md, md
    sweep = load(out, "figure4_sweep.json")
    assert sweep["combos"] == ["IDR+ABC"] and sweep["runs"]["IDR+ABC"]["tests"] == ["IDR", "ABC"]


# ---- what the reader sees (issue 26) ----
def test_help_has_examples_and_whole_sentences():
    """--help: the docstring's examples as written, and each flag's help a whole sentence (a
    capital first, a full stop last)."""
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "    python report.py runs -o report/" in proc.stdout and "docs/STUDY.md" in proc.stdout
    actions = [a for a in report.build_parser()._actions if a.dest != "help"]
    assert len(actions) == 7
    for a in actions:
        text = a.help % {"default": a.default}
        assert text[0].isupper() and text.endswith(".") and len(text.split()) > 5, text


def captured_figures(monkeypatch):
    """report's figures as they are saved: {file name: Figure}."""
    figures = {}
    monkeypatch.setattr(report, "_save",
                        lambda fig, path: figures.__setitem__(Path(path).name, fig))
    return figures


@pytest.mark.skipif(not (ROOT / "reference" / "lesions_database_cross_study.csv").is_file(),
                    reason="reference/lesions_database_cross_study.csv not in the project")
def test_reference_figure_uses_the_lesion_colours(fixture_dirs, monkeypatch):
    """reference_aupr.png: each lesion's points in its fixed colour (data.ids.LESION_COLOURS)."""
    from data.ids import LESION_COLOURS

    figures = captured_figures(monkeypatch)
    build(fixture_dirs)
    ax = figures["reference_aupr.png"].axes[0]
    points = {c.get_label(): c for c in ax.collections}
    for lesion, rgb in LESION_COLOURS.items():
        face = points[lesion].get_facecolor()[0][:3]
        assert np.allclose(face, np.array(rgb) / 255, atol=1 / 255), lesion


def test_figure4_title_names_the_combination_and_the_test_sets(fixture_dirs, monkeypatch):
    runs, _, _ = fixture_dirs
    figures = captured_figures(monkeypatch)
    build(fixture_dirs)
    title = " ".join(figures["figure4.png"].axes[0].get_title().split())
    assert "DDR+MES (tested on IDR, MES)" in title and "IDR+DDR (tested on DDR, MES)" in title
    (runs / "IDR+DDR" / "fig4.json").unlink()  # one combination, its test sets recorded
    rec = json.loads((runs / "DDR+MES" / "fig4.json").read_text())
    (runs / "DDR+MES" / "fig4.json").write_text(json.dumps({**rec, "tests": ["IDR", "MES"]}))
    build(fixture_dirs)
    title = " ".join(figures["figure4.png"].axes[0].get_title().split())
    assert title.endswith("trained on DDR+MES, tested on IDR, MES")
