"""characterize.py and mcfnet.py: lesion components, quality measures, the labelling-style rule,
figures, MCF-Net (structure, shapes, checkpoint loading, bad files), and an end-to-end run on the
synthetic datasets."""
import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import characterize as ch
import mcfnet

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- connected components
def brute_components(mask):
    """Independent reference: breadth-first flood fill over the 8 neighbours -> list of component
    sizes."""
    seen = np.zeros_like(mask, bool)
    sizes = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        queue.append((v, u))
        sizes.append(size)
    return sizes


def test_touching_diagonal_pixels_are_one_lesion():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = True  # touch only at a corner
    assert ch.component_stats(mask) == (1, 2.0)
    mask[4, 0] = True  # a separate single pixel
    assert ch.component_stats(mask) == (2, 1.5)


def test_separate_blobs_and_empty_mask():
    mask = np.zeros((10, 12), bool)
    mask[0:2, 0:2] = True  # 4 px
    mask[5:8, 6:10] = True  # 12 px
    mask[9, 11] = True  # 1 px, in the corner
    count, area = ch.component_stats(mask)
    assert count == 3 and area == pytest.approx(17 / 3)
    count, area = ch.component_stats(np.zeros((7, 9), bool))
    assert count == 0 and math.isnan(area)  # documented: no lesion -> NaN mean area


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_match_flood_fill(seed):
    mask = np.random.default_rng(seed).random((37, 41)) < 0.3  # odd shape, many diagonal contacts
    sizes = brute_components(mask)
    count, area = ch.component_stats(mask)
    assert count == len(sizes)
    assert area == pytest.approx(np.mean(sizes))


# ----------------------------------------------------------------------------- quality measures
def _disc(res):
    yy, xx = np.mgrid[:res, :res]
    return (yy - res / 2 + 0.5) ** 2 + (xx - res / 2 + 0.5) ** 2 < (0.45 * res) ** 2


def test_quality_measures_react_to_blur_noise_and_light():
    res = 128
    fov = _disc(res)
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.normal(size=(res, res)), 2)
    texture = 128 + 40 * texture / texture.std()
    sharp = np.repeat(np.clip(texture, 0, 255)[..., None], 3, 2).astype(np.uint8)
    sharp[~fov] = 0
    blurred = ndimage.gaussian_filter(sharp.astype(float), (2, 2, 0)).round().astype(np.uint8)
    m_sharp, m_blur = ch.quality_measures(sharp, fov), ch.quality_measures(blurred, fov)
    assert m_blur["sharpness"] < 0.5 * m_sharp["sharpness"]
    assert m_sharp["fov_coverage"] == pytest.approx(fov.mean())
    # Immerkaer's estimate recovers the sigma of added white noise on a smooth image (within 20%).
    flat = np.full((res, res, 3), 120.0)
    noisy = np.clip(flat + rng.normal(0, 8, (res, res, 1)), 0, 255).astype(np.uint8)
    assert ch.quality_measures(noisy, fov)["noise"] == pytest.approx(8, rel=0.2)
    assert ch.quality_measures(flat.astype(np.uint8), fov)["noise"] == pytest.approx(0, abs=1e-6)
    # Uniform light -> uniformity 1; a strong left-to-right falloff -> clearly lower.
    assert (ch.quality_measures(flat.astype(np.uint8), fov)["uniformity"]
            == pytest.approx(1, abs=1e-3))
    ramp = np.repeat(np.linspace(30, 220, res)[None, :, None], res, 0).repeat(3, 2).astype(np.uint8)
    assert ch.quality_measures(ramp, fov)["uniformity"] < 0.85
    assert (ch.quality_measures(ramp, fov)["contrast"]
            == pytest.approx(ramp[..., 0][fov].std(), rel=1e-3))


# ------------------------------------------------------------------------- the labelling-style rule
def _synthetic_stats(rng, n, style):
    """Per image (count, mean area) like a labelling style: fine = many small components, coarse
    = few large ones (merged, dilated), mixed = half and half; some images lack the lesion."""
    out = {}
    for lesion, (fine_area, fine_count) in {"EX": (20.0, 25), "MA": (4.0, 15)}.items():
        coarse_img = np.zeros(n, bool) if style == "fine" else np.ones(n, bool) \
            if style == "coarse" else np.arange(n) % 2 == 0
        area = np.where(coarse_img, fine_area * 8, fine_area) * np.exp(rng.normal(0, 0.35, n))
        count = np.maximum(1, np.where(coarse_img, fine_count / 4, fine_count)
                           * np.exp(rng.normal(0, 0.5, n)))
        count = count.round().astype(int)
        absent = rng.random(n) < 0.2
        count[absent], area[absent] = 0, np.nan
        out[lesion] = {"count": count, "area": area}
    return out


def test_rule_assigns_fine_coarse_mixed():
    rng = np.random.default_rng(0)
    styles = {"IDR": "fine", "DDR": "fine", "FGA": "mixed", "RET": "coarse", "MES": "fine"}
    stats = {ds: _synthetic_stats(rng, 40, s) for ds, s in styles.items()}
    summary, reference, rule = ch.labelling_styles(stats)
    assert {ds: s["style"] for ds, s in summary.items()} == styles
    assert set(reference) == {"EX", "MA"} and reference["MA"]["dataset"] in {"IDR", "DDR", "MES"}
    assert 0.3 < summary["FGA"]["coarse_share"] < 0.7 and summary["RET"]["coarse_share"] > 0.9
    # Medians are plain numbers and agree with numpy on the present images.
    present = stats["RET"]["MA"]["count"] > 0
    assert summary["RET"]["median_log10_area"]["MA"] == pytest.approx(
        np.median(np.log10(stats["RET"]["MA"]["area"][present])))
    assert "log10(3)" in rule and "fine" in rule and "mixed" in rule


def test_rule_edge_cases():
    rng = np.random.default_rng(1)
    # The rule is relative to the finest dataset given: a lone dataset would be its own
    # reference ("fine" by definition, even a coarse one), so its style is undetermined,
    # and the rule text says why.
    alone, _, rule = ch.labelling_styles({"RET": _synthetic_stats(rng, 30, "coarse")})
    assert alone["RET"]["style"] == "undetermined" and alone["RET"]["n_scored"] > 20
    assert "undetermined: only 1 dataset(s) with >= 3 scored images (RET)" in rule
    two, _, rule = ch.labelling_styles({"IDR": _synthetic_stats(rng, 30, "fine"),
                                        "RET": _synthetic_stats(rng, 30, "coarse")})
    assert (two["IDR"]["style"], two["RET"]["style"]) == ("fine", "coarse") and "Here" not in rule
    # Too few images with EX or MA: undetermined, with
    # NaN medians rather than a crash; IDR is then alone.
    empty = {lesion: {"count": np.zeros(5, int), "area": np.full(5, np.nan)}
             for lesion in ("EX", "MA")}
    summary, _, rule = ch.labelling_styles({"IDR": _synthetic_stats(rng, 30, "fine"), "DDR": empty})
    assert summary["DDR"]["style"] == "undetermined" and summary["DDR"]["n_scored"] == 0
    assert math.isnan(summary["DDR"]["median_log10_area"]["MA"])
    assert summary["IDR"]["style"] == "undetermined" and "only 1 dataset(s)" in rule


def test_rule_without_a_fine_dataset_is_undetermined():
    # Two datasets, each half 10 px and half 100 px components: the reference median is
    # log10(31.6), every image is 3.16x off it, so half of each dataset is coarse: both
    # "mixed", none fine -> no trusted reference.
    half = {"count": np.full(10, 5), "area": np.array([10.0] * 5 + [100.0] * 5)}
    stats = {ds: {"EX": half, "MA": half} for ds in ("FGA", "RET")}
    summary, _, rule = ch.labelling_styles(stats)
    assert {s["coarse_share"] for s in summary.values()} == {0.5}
    assert all(s["style"] == "undetermined" for s in summary.values())
    assert "no dataset among FGA, RET comes out fine" in rule


def test_default_resolution_is_the_training_resolution():
    import train

    assert ch.parse_args([]).resolution == train.build_parser().get_default("resolution") == 1536


# ----------------------------------------------------------------------------- figures
def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_figures_are_valid_pngs(tmp_path):
    rng = np.random.default_rng(2)
    rows_by_dataset, stats = {}, {}
    for ds, style in {"IDR": "fine", "FGA": "mixed", "RET": "coarse"}.items():
        st = _synthetic_stats(rng, 20, style)
        stats[ds] = st
        rows = []
        for i in range(20):
            row = {"dataset": ds, "split": "train", "id": f"{ds}{i}"}
            for lesion in ch.LESIONS:
                src = st.get(lesion, st["MA"])
                row[f"{lesion}_count"], row[f"{lesion}_area"] = (int(src["count"][i]),
                                                                 float(src["area"][i]))
            row.update({m: float(rng.random()) for m in ch.QUALITY_MEASURES})
            rows.append(row)
        rows[0]["CWS_count"], rows[0]["CWS_area"] = 0, math.nan
        rows_by_dataset[ds] = rows
    # one point: no contour, no crash
    rows_by_dataset["DDR"] = [dict(rows_by_dataset["IDR"][0], dataset="DDR")]
    stats["DDR"] = {lesion: {"count": [rows_by_dataset["DDR"][0][f"{lesion}_count"]],
                             "area": [rows_by_dataset["DDR"][0][f"{lesion}_area"]]}
                    for lesion in ("EX", "MA")}
    styles, reference, rule = ch.labelling_styles(stats)
    ch.plot_labelling_style(rows_by_dataset, styles, reference, rule, 3.0, tmp_path / "fig2.png",
                            128)
    ch.plot_quality_measures(rows_by_dataset, tmp_path / "quality.png")
    ch.plot_grades({"IDR": {"Good": 0.5, "Usable": 0.3, "Reject": 0.2},
                    "RET": {"Good": 0.1, "Usable": 0.4, "Reject": 0.5}},
                   tmp_path / "fig1.png")
    for name in ("fig2.png", "quality.png", "fig1.png"):
        _assert_png(tmp_path / name)


# ----------------------------------------------------------------------------- MCF-Net
@pytest.fixture(scope="module")
def mcf():
    # NOTE: one intra-op thread: loading ~5000 small tensors with 2 threads on a busy 2-core
    # machine spends seconds in thread hand-offs (measured 13 s vs 0.1 s for the copies).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield mcfnet.MCFNet().eval()
    torch.set_num_threads(threads)


def test_mcfnet_structure_matches_published_keys(mcf):
    sd = mcf.state_dict()
    # Key names and shapes of the authors' checkpoint (read from their public densenet_mcf.py).
    # 3 branch predictions + feature fusion, 3 grades each
    assert sd["combine1.0.weight"].shape == (3, 12)
    assert sd["combine2.0.weight"].shape == (3, 3 * 1024)
    assert sd["featureA.densenet121.classifier.0.weight"].shape == (3, 1024)
    assert sd["densenet121.classifier.weight"].shape == (1000, 1024)  # their unused fourth DenseNet
    assert ("classB.denseblock4.denselayer16.conv2.weight" in sd
            and "featureC.densenet121.features.norm5.bias" in sd)
    # Their published parameter count (README of
    # github.com/fyii200/MCF_Net and the EyeQ code): 28.86M.
    assert sum(p.numel() for p in mcf.parameters()) / 1e6 == pytest.approx(28.86, abs=0.005)


def test_mcfnet_forward_shapes_and_branch_equivalence(mcf):
    # 3 views, batch 1, 32 px: DenseNet-121 pools adaptively (1 x 1 at /32)
    x = torch.randn(3, 1, 3, 32, 32)
    with torch.no_grad():
        outs = mcf(x[0], x[1], x[2])
        # Independent reference for a branch: torchvision's
        # own DenseNet forward (features + classifier).
        ref_rgb = mcf.featureA.densenet121(x[0])
    assert [tuple(o.shape) for o in outs] == [(1, 3)] * 5
    assert torch.allclose(outs[0], ref_rgb, atol=1e-6)
    assert all(((o > 0) & (o < 1)).all() for o in outs)  # sigmoids
    probs = mcfnet.predict_grades(mcf, x.transpose(0, 1))  # (B, 3 views, 3, S, S)
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(1), torch.ones(1))


def test_colour_views():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:20] = 255  # white top half, black bottom half
    views = mcfnet.colour_views(img, size=32)
    assert views.shape == (3, 3, 32, 32)
    mean = torch.tensor(mcfnet.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(mcfnet.IMAGENET_STD).view(3, 1, 1)
    raw = views * std + mean  # back to 0..255 (the authors do not divide by 255)
    white, black = raw[:, :, 2, 2], raw[:, :, -3, -3]  # (view, channel)
    # RGB, HSV, LAB
    assert torch.allclose(white, torch.tensor([[255.0, 255, 255], [0, 0, 255], [255, 0, 0]]),
                          atol=1)
    assert torch.allclose(black, torch.zeros(3, 3), atol=1e-3)
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = wide[:, 48:] = 255  # Resize(32) + CenterCrop(32) keeps only the black middle
    assert torch.allclose(mcfnet.colour_views(wide, size=32) * std + mean,
                          torch.zeros(3, 3, 32, 32), atol=1e-3)
    fov = np.zeros((40, 40), bool)  # everything outside the FOV is blacked out
    assert torch.allclose(mcfnet.colour_views(img, fov, size=32) * std + mean,
                          torch.zeros(3, 3, 32, 32), atol=1e-3)


def test_mcfnet_checkpoint_round_trip_and_bad_files(mcf, tmp_path):
    sd = mcf.state_dict()
    # The authors' wrapper ({"state_dict": ..., "best_loss": numpy float}),
    # DataParallel prefixes, and pre-0.3 torchvision names ("norm.1") for one layer.
    wrapped = {}
    for k, v in sd.items():
        k = k.replace("denselayer1.norm1.", "denselayer1.norm.1.")
        wrapped["module." + k] = v
    path = tmp_path / "DenseNet121_v3_v1.tar"
    torch.save({"state_dict": wrapped, "best_loss": np.float64(0.25)}, path)
    other = mcfnet.load_mcfnet(path)
    x = torch.randn(3, 1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other(x[0], x[1], x[2])[-1], mcf(x[0], x[1], x[2])[-1])

    junk = tmp_path / "junk.tar"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    small = {k: v for k, v in sd.items() if not k.startswith("combine1")}
    # 5 grades
    small["combine1.0.weight"], small["combine1.0.bias"] = torch.zeros(5, 20), torch.zeros(5)
    torch.save(small, tmp_path / "shape.pt")
    for name, words in (("junk.tar", "not a readable"), ("other.pt", "missing keys"),
                        ("shape.pt", "other shapes")):
        with pytest.raises(ValueError) as err:
            mcfnet.load_weights(mcf, tmp_path / name)  # fails before touching the model
        assert name in str(err.value) and words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        mcfnet.load_weights(mcf, tmp_path / "nope.tar")


# ---------------------------------------------------------------------- end to end (synthetic data)
# as generated
SYNTH_STYLES = {"IDR": "fine", "DDR": "fine", "FGA": "mixed", "RET": "coarse", "MES": "fine"}


def _characterize(out, *argv):
    """Run characterize.main, return (report dict, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ch.main([*argv, "--resolution", "128", "--out", str(out)])
    return json.loads((out / "characterize.json").read_text()), buf.getvalue()


def _medians(report):
    return {ds: {"style": s["style"], "coarse_share": s["coarse_share"],
                 "log10_area": s["median_log10_area"]}
            for ds, s in report["datasets"].items()}


@pytest.fixture(scope="module")
def default_run(synth_root, cache_dir, tmp_path_factory):
    """characterize.py on the synthetic datasets with the default data options (the shared
    cache)."""
    out = tmp_path_factory.mktemp("characterize")
    report, printed = _characterize(out, "--data-root", str(synth_root), "--cache", str(cache_dir))
    return out, report, printed


def test_end_to_end_outputs(default_run):
    out, report, printed = default_run
    assert "Quality network skipped" in printed
    assert report["rule"] and set(report["reference"]) == {"EX", "MA"}
    for ds, s in report["datasets"].items():
        assert sum(s["splits"].values()) == s["n_images"] == 12
        assert set(s["quality"]) == set(ch.QUALITY_MEASURES)
        assert all(0 <= p <= 1 for p in s["prevalence"].values())
        assert sum(s["native_sizes"].values()) == 12
    # The synthetic RET photographs are blurrier and less evenly lit than the fine datasets'.
    q = {ds: s["quality"] for ds, s in report["datasets"].items()}
    assert q["RET"]["sharpness"] < min(q[d]["sharpness"] for d in ("IDR", "DDR", "FGA", "MES")), q
    assert q["RET"]["uniformity"] < min(q[d]["uniformity"] for d in ("IDR", "DDR", "FGA", "MES")), q
    assert "| IDR |" in (out / "characterize.md").read_text()
    lines = (out / "per_image.csv").read_text().splitlines()
    assert len(lines) == 1 + 5 * 12 and lines[0].startswith("dataset,split,id,EX_count,EX_area")
    for name in ("fig2_labelling_style.png", "quality_measures.png"):
        _assert_png(out / name)
    assert not (out / "fig1_quality_grades.png").exists()


def test_end_to_end_fine_and_coarse_styles(default_run):
    styles = {ds: s["style"] for ds, s in default_run[1]["datasets"].items()}
    assert {ds: styles[ds] for ds in ("IDR", "DDR", "RET", "MES")} == \
        {ds: SYNTH_STYLES[ds] for ds in ("IDR", "DDR", "RET", "MES")}, _medians(default_run[1])


def test_end_to_end_fga_mixed_default_options(default_run):
    assert default_run[1]["datasets"]["FGA"]["style"] == "mixed", _medians(default_run[1])


def test_end_to_end_fga_mixed_without_fringe(synth_root, cache_dir, tmp_path):
    """With the anti-aliased fringe dropped (--mask-threshold FGA=127), FGA's fine and coarse
    halves separate."""
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)  # FGA is re-prepared here, not in the shared cache
    report, _ = _characterize(tmp_path / "out", "--data-root", str(synth_root),
                              "--cache", str(cache), "--mask-threshold", "FGA=127")
    assert {ds: s["style"] for ds, s in report["datasets"].items()} == SYNTH_STYLES, \
        _medians(report)


@pytest.mark.slow
def test_end_to_end_with_quality_weights(synth_root, cache_dir, tmp_path, mcf):
    """--quality-weights: a checkpoint in the authors' format grades every image and Figure 1 is
    drawn."""
    weights = tmp_path / "DenseNet121_v3_v1.tar"
    torch.save({"state_dict": mcf.state_dict(), "best_loss": 0.3}, weights)
    report, printed = _characterize(tmp_path / "out", "--datasets", "IDR,RET",
                                    "--data-root", str(synth_root), "--cache", str(cache_dir),
                                    "--quality-weights", str(weights), "--device", "cpu")
    assert "skipped" not in printed and str(weights) in report["quality_network"]
    for s in report["datasets"].values():
        assert (set(s["grades"]) == {"Good", "Usable", "Reject"}
                and sum(s["grades"].values()) == pytest.approx(1))
    _assert_png(tmp_path / "out" / "fig1_quality_grades.png")
    header = (tmp_path / "out" / "per_image.csv").read_text().splitlines()[0]
    assert header.endswith("p_Good,p_Usable,p_Reject,grade")


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        ch.main(["--datasets", "IDR", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--quality-weights", str(tmp_path / "missing.tar")])
    assert not (tmp_path / "o").exists()  # checked before anything is written
    # The script itself: one "error: ..." line, no traceback.
    cmd = [sys.executable, str(ROOT / "characterize.py"), "--datasets", "IDR,XYZ",
           "--data-root", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("error:") and "unknown dataset ID 'XYZ'" in res.stderr


def test_datasets_same_list_syntax():
    """--datasets as every dataset-list flag reads it (data.flags.DatasetList)."""
    assert ch.parse_args(["--datasets", "RET,idr", "MES"]).datasets == ["IDR", "RET", "MES"]
    assert ch.parse_args(["--datasets", "IDR+DDR"]).datasets == ["IDR", "DDR"]
    assert ch.parse_args([]).datasets == ["IDR", "DDR", "FGA", "RET", "MES"]


def test_a_dataset_of_ones_own_beside_idrid(synth_root, generic_dataset, tmp_path):
    """--datasets IDR,ABC: ABC annotates EX and HE only. Its EX prevalence is the share of its PNGs
    with a lesion pixel (counted here); MA and CWS have none (null, "not annotated", empty cells),
    not 0 %; it is drawn in a colour of its own."""
    root = generic_dataset(("EX", "HE"))
    report, _ = _characterize(tmp_path / "out", "--datasets", "IDR,ABC", "--data-root",
                              str(synth_root), "--root", f"ABC={root}", "--cache",
                              str(tmp_path / "cache"))
    abc = report["datasets"]["ABC"]
    pngs = [np.asarray(Image.open(p)) > 0 for p in sorted((root / "masks" / "EX").iterdir())]
    assert abc["n_images"] == len(pngs) == 6
    assert abc["prevalence"]["EX"] == pytest.approx(np.mean([m.any() for m in pngs]))
    assert abc["prevalence"]["MA"] is None and abc["prevalence"]["CWS"] is None
    assert abc["lesions"]["MA"]["images_annotated"] == 0
    assert abc["lesions"]["EX"]["images_annotated"] == 6
    assert report["datasets"]["IDR"]["prevalence"]["MA"] is not None
    row = next(line for line in (tmp_path / "out" / "characterize.md").read_text().splitlines()
               if line.startswith("| ABC | 6 |"))
    assert row.count("not annotated") == 2, row
    rows = (tmp_path / "out" / "per_image.csv").read_text().splitlines()
    header = rows[0].split(",")
    for line in (r.split(",") for r in rows[1:] if r.startswith("ABC,")):
        assert line[header.index("MA_count")] == "" and line[header.index("EX_count")] != ""
    colours = ch.dataset_colours(["IDR", "ABC", "XYZ"])
    assert len(set(colours.values())) == 3 and colours["IDR"] == ch.COLOURS["IDR"]
