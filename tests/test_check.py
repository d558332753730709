"""data/check.py: every problem of a dataset at once, a report per lesion, the exit status; against
folders built by hand here (conftest's generic_dataset, then damaged)."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import data.check

ROOT = Path(__file__).resolve().parents[1]


def check(*argv):
    """python -m data.check ARGV in this process -> (stdout lines, the final error or None)."""
    out = io.StringIO()
    sys.stdout, saved = out, sys.stdout
    try:
        data.check.main([str(a) for a in argv])
        error = None
    except ValueError as e:  # utils.run prints it as one error: line and exits 1
        error = str(e)
    finally:
        sys.stdout = saved
    return out.getvalue().splitlines(), error


def row(lines, lesion):
    """The words of a lesion's row in the report's table."""
    return next(line.split() for line in lines if line.split()[:1] == [lesion])


def test_report_per_lesion_of_a_clean_dataset(generic_dataset):
    """Counts and pixel shares computed here from the PNGs; MA, CWS not annotated; the paper split;
    no finding, exit status 0."""
    root = generic_dataset(("EX", "HE"))
    lines, error = check("--root", f"ABC={root}")
    assert error is None and lines[0].startswith(f"ABC (My clinic): {root}: 6 images"), lines
    for lesion in ("EX", "HE"):
        masks = [np.asarray(Image.open(p)) for p in sorted((root / "masks" / lesion).iterdir())]
        share = 100 * sum((m > 0).sum() for m in masks) / sum(m.size for m in masks)
        present = sum(bool((m > 0).any()) for m in masks)
        assert row(lines, lesion) == [lesion, "6", str(present), f"{share:.2f}%", "0/255"], lines
    for lesion in ("MA", "CWS"):
        assert row(lines, lesion) == [lesion, "-", "not", "annotated"], lines
    assert "  splits: train 3, val 1, test 2 (paper protocol)" in lines, lines
    assert not [line for line in lines if line.startswith(("error:", "warning:"))], lines
    assert lines[-1] == "ABC: 0 error(s), 0 warning(s)"


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def test_every_error_is_collected_and_the_exit_status_is_1(generic_dataset):
    """Nine problems in one folder: nine error lines, each naming its file, and a non-zero exit."""
    root = generic_dataset(("EX", "HE"))
    images, ex, he = root / "images", root / "masks" / "EX", root / "masks" / "HE"
    Image.open(images / "IDRiD_02.jpg").save(images / "IDRiD_02.png")  # two images, one stem
    shutil.copy(he / "IDRiD_01.png", he / "IDRiD_99.png")  # a mask without an image
    shutil.copy(he / "IDRiD_01.png", he / "IDRiD_01_HE.png")  # another, named the IDRiD way
    Image.open(ex / "IDRiD_01.png").save(ex / "IDRiD_01.jpg")  # a JPEG file in a mask folder
    Image.open(he / "IDRiD_03.png").resize((32, 32)).save(he / "IDRiD_03.png")  # another size
    _truncate(ex / "IDRiD_04.png")  # a truncated PNG mask
    _truncate(images / "IDRiD_05.jpg")  # a truncated photograph
    Image.open(ex / "IDRiD_06.png").save(ex / "IDRiD_06.png", format="JPEG", quality=75)  # .png
    (root / "splits.json").write_text(json.dumps({"train": ["IDRiD_01"], "test": ["gone"]}))
    lines, error = check("--root", f"ABC={root}")
    errors = [line for line in lines if line.startswith("error:")]
    named = {"IDRiD_02.jpg and IDRiD_02.png": "two files named IDRiD_02",
             str(he / "IDRiD_99.png"): "has no image", str(he / "IDRiD_01_HE.png"): "has no image",
             str(ex / "IDRiD_01.jpg"): "JPEG", str(he / "IDRiD_03.png"): "is 32x32",
             str(ex / "IDRiD_04.png"): "truncated", str(images / "IDRiD_05.jpg"): "truncated",
             str(ex / "IDRiD_06.png"): "is a JPEG", str(root / "splits.json"): "'gone'"}
    assert len(errors) == len(named), errors
    for name, what in named.items():
        assert any(name in e and what in e for e in errors), (name, errors)
    assert error is not None and "9 in ABC" in error and "\n" not in error
    assert lines[-1] == "ABC: 9 error(s), 0 warning(s)"


def _noisy(path, quality=75):
    """The mask JPEG-compressed once, then saved again as PNG: grey levels of compression noise."""
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="JPEG", quality=quality)
    Image.open(buffer).save(path)
    return len(np.unique(np.asarray(Image.open(path))))


def test_mask_values_two_levels_fine_jpeg_noise_flagged(generic_dataset):
    """0/255 and 0/1 masks are clean; a mask that went through JPEG (dozens of grey levels, saved
    back as PNG) is a warning naming it: the exit status stays 0."""
    root = generic_dataset(("EX", "HE"))
    for path in (root / "masks" / "HE").iterdir():  # HE as 0/1
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(path)
    levels = _noisy(root / "masks" / "EX" / "IDRiD_02.png")
    assert levels > 10
    lines, error = check("--root", f"ABC={root}")
    assert error is None, error
    assert row(lines, "HE")[-1] == "0/1" and row(lines, "EX")[-2:] == [
        "values", f"0..{np.asarray(Image.open(root / 'masks/EX/IDRiD_02.png')).max()}"], lines
    assert int(row(lines, "EX")[-3]) >= levels
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and str(root / "masks/EX/IDRiD_02.png") in warnings[0], warnings
    assert "JPEG noise" in warnings[0]


def test_empty_lesions_are_warnings(generic_dataset):
    """A lesion annotated but marked nowhere: an empty mask folder; masks of 0/1 under
    mask_threshold 127 (dataset.json), which the warning names."""
    root = generic_dataset(("EX", "HE", "MA"))
    for path in (root / "masks" / "MA").iterdir():
        path.unlink()
    for path in (root / "masks" / "HE").iterdir():
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(path)
    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**info, "mask_threshold": 127}))
    lines, error = check("--root", f"ABC={root}")
    assert error is None, error
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert any("ABC: MA is annotated in 6 image(s) but no pixel" in w for w in warnings), warnings
    he = next(w for w in warnings if "ABC: HE is annotated" in w)
    assert "values reach 1" in he and "threshold 127" in he, he
    assert row(lines, "EX")[2] != "0"  # EX, 0/255, is above 127: read as lesion


def test_one_of_the_five_as_distributed(generic_source, tmp_path):
    """--dataset IDR --data-root: the IDRiD layout checked the same way, a mask of another size
    named."""
    data_root = tmp_path / "data"
    shutil.copytree(generic_source.parent, data_root / "IDRiD")
    lines, error = check("--dataset", "IDR", "--data-root", data_root)
    photos = sorted((data_root / "IDRiD").rglob("*.jpg"))
    assert error is None and lines[0] == f"IDR: {data_root / 'IDRiD'}: {len(photos)} images"
    assert all(row(lines, les)[1] == str(len(photos)) for les in ("EX", "HE", "MA", "CWS"))
    mask = next((data_root / "IDRiD").rglob("IDRiD_02_EX.tif"))
    Image.open(mask).resize((10, 10)).save(mask)
    lines, error = check("--dataset", "IDR", "--data-root", data_root)
    assert [line for line in lines if line.startswith("error:")] == [
        f"error: mask {mask} is 10x10 but its image {photos[1]} is 96x64"] and "1 in IDR" in error


def test_nothing_to_check_and_a_folder_not_found_are_one_line(tmp_path):
    lines, error = check()
    assert lines == [] and "--root ID=DIR" in error
    lines, error = check("--root", f"ABC={tmp_path / 'nowhere'}")
    assert len(lines) == 3 and lines[0] == "ABC: not read" and str(tmp_path / "nowhere") in lines[1]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("{bad")
    lines, error = check("--root", f"ABC={tmp_path / 'bad'}")  # no table of lesions never read
    assert lines[0] == "ABC: not read" and lines[1].startswith(
        f"error: {tmp_path / 'bad' / 'dataset.json'} is not valid JSON") and len(lines) == 3, lines
    lines, error = check("--root", f"ABC={tmp_path}", "--workers", "0")
    assert lines == [] and "--workers" in error


def test_command_line_help_is_fast_and_errors_exit_1(generic_dataset):
    """As a user runs it: --help answers before numpy loads; an error found: exit status 1, the
    last line one error: line; a clean folder: exit status 0."""
    code = ("import runpy, sys\n"
            "sys.argv = ['data/check.py', '--help']\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('@@', e.code, 'numpy' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.startswith("usage: python -m data.check") and "--root ID=DIR" in r.stdout
    assert "--cache" not in r.stdout and r.stdout.splitlines()[-1] == "@@ 0 False", r.stdout
    root = generic_dataset()
    run = [sys.executable, "-m", "data.check", "--root", f"ABC={root}"]
    assert subprocess.run(run, cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    (root / "masks" / "EX" / "IDRiD_01.png").rename(root / "masks" / "EX" / "stray.png")
    r = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: data.check found errors (1 in ABC): see above"], r.stderr
    assert f"error: mask {root / 'masks/EX/stray.png'} has no image" in r.stdout
