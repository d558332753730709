"""retlesions.py: segment() from any folder, in a fresh interpreter started elsewhere, with modules
named like ours (evaluate, utils, data, model, predict) on the path and beside the script; an
exported ONNX model through preprocess() and to_photograph() against segment(), without torch.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_retlesions.py
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# a module that must never be imported in our place: it says so
FAKE = "raise ImportError('the other {name} was imported: ' + __file__)\n"

SCRIPT = """
import sys
sys.path.append({root!r})  # the documented step
import retlesions
print("torch after import:", "torch" in sys.modules)
import numpy as np
yy, xx = np.mgrid[:90, :120]
image = np.zeros((90, 120, 3), np.uint8)
image[(yy - 45) ** 2 + (xx - 60) ** 2 < 40 ** 2] = (170, 80, 40)
models = retlesions.load_ensemble([{ckpt!r}], "cpu")
probs = retlesions.segment(image, models)
print("shape:", probs.shape, probs.dtype)
ours = sorted(n.split(".")[0] for n, m in sys.modules.items()
              if str(getattr(m, "__file__", None) or "").startswith({root!r} + "/")
              and "site-packages" not in str(m.__file__))
print("modules:", ",".join(sorted(set(ours))))
try:
    import evaluate
except ImportError as e:
    print("their evaluate:", e)
"""


def run_elsewhere(tmp_path, code, pythonpath):
    """`code` as a script in tmp_path/elsewhere (its folder first on sys.path, as Python puts it),
    with PYTHONPATH=pythonpath -> CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath)}
    script = tmp_path / "elsewhere" / "job.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=300)


def test_segment_from_another_folder_past_modules_named_like_ours(style_net, style_checkpoint,
                                                                  tmp_path):
    """Fake evaluate, utils, data, model and predict beside the script and on PYTHONPATH (an
    installed Hugging Face `evaluate`), the repository appended last: segment() runs on ours, and
    the script's own `import evaluate` afterwards still gets its own."""
    ckpt = style_checkpoint(tmp_path / "m.pt", style_net())
    for folder in ("elsewhere", "site"):
        (tmp_path / folder).mkdir()
        for name in ("evaluate", "utils", "data", "model", "predict"):
            (tmp_path / folder / f"{name}.py").write_text(FAKE.format(name=name))
    r = run_elsewhere(tmp_path, SCRIPT.format(root=str(ROOT), ckpt=str(ckpt)), tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert lines["torch after import"] == "False"
    assert lines["shape"] == "(4, 90, 120) float32"
    assert lines["their evaluate"].startswith("the other evaluate was imported")
    assert str(tmp_path / "elsewhere" / "evaluate.py") in lines["their evaluate"]
    # every project module segment() needed is one retlesions guards
    import retlesions

    used = set(lines["modules"].split(",")) - {"retlesions"}
    assert used <= set(retlesions.API_MODULES) and {"predict", "utils", "model"} <= used, used


def test_a_module_of_ours_imported_from_elsewhere_is_one_line(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "utils.py").write_text("X = 1\n")  # the script's own utils
    code = f"import utils\nimport sys\nsys.path.append({str(ROOT)!r})\nimport retlesions\n"
    r = run_elsewhere(tmp_path, code, tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr  # a plain script: Python's report
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: retlesions: a module named 'utils' is already imported "
                           f"from {tmp_path / 'elsewhere' / 'utils.py'}")
    assert "import retlesions before it" in last


# ---- an exported model without torch: preprocess, to_photograph --------------------------------
PHOTO = (ROOT / "tests/fixtures/idrid-4l14/A. Segmentation/1. Original Images/a. Training Set"
         / "IDRiD_01.jpg")  # a real photograph, 1072x712


def test_onnx_with_preprocess_and_to_photograph_gives_segments_maps(style_net, style_checkpoint,
                                                                    tmp_path):
    """read_photo -> preprocess (the sizes from the ONNX file's metadata) -> onnxruntime ->
    to_photograph equals predict.segment on the checkpoint (within interop's 1e-4, the fundus the
    same), on a real photograph (maps enlarged) and on one smaller than the model's square."""
    import onnxruntime as ort

    import interop
    import predict
    import retlesions

    ckpt = style_checkpoint(tmp_path / "m.pt", style_net())  # 64 px
    interop.main(["onnx", str(ckpt), str(tmp_path / "m.onnx")])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert retlesions.read_metadata(session)["resolution"] == 64
    photo = retlesions.read_photo(PHOTO)  # (712, 1072, 3)
    models = predict.load_ensemble([ckpt], "cpu")
    for image in (photo, np.ascontiguousarray(photo[::24, ::24])):  # (30, 45, 3): shrunk maps
        x, geometry = retlesions.preprocess(image, session)
        assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
        probs = retlesions.to_photograph(session.run(None, {"image": x})[0], geometry)
        want = predict.segment(image, models)
        assert probs.shape == want.shape and probs.dtype == np.float32
        assert np.abs(probs - want).max() <= 1e-4
        assert np.array_equal(probs.any(0), want.any(0))  # 0 outside the same fundus
        assert want.any(0).mean() > 0.3


def test_preprocess_imports_no_torch(tmp_path):
    """The ONNX path in a fresh interpreter: read_photo, preprocess, to_photograph, numpy only (and
    PIL, scipy); a file without our metadata is one line."""
    code = (f"import sys\nsys.path.append({str(ROOT)!r})\nimport retlesions, numpy as np\n"
            f"x, g = retlesions.preprocess(retlesions.read_photo({str(PHOTO)!r}), 64)\n"
            f"p = retlesions.to_photograph(np.ones((1, 4, 64, 64), np.float32), g)\n"
            f"print(x.shape, p.shape, round(float(p.mean()), 2), 'torch' in sys.modules)\n"
            f"retlesions.preprocess(np.zeros((9, 9, 3), np.uint8), {{'resolution': '64'}})\n")
    (tmp_path / "elsewhere").mkdir()
    r = run_elsewhere(tmp_path, code, tmp_path)
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("(1, 3, 64, 64) (4, 712, 1072) 0.") and lines[0].endswith("False")
    assert r.stderr.strip().splitlines()[-1].startswith("ValueError: {'resolution': '64'}: no "
                                                         "metadata of interop.py")
