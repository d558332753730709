"""`predict.py --images` on full-size 4288x2848 photographs: the work outside the network, per
stage.

    python bench/bench_images.py                # 2 photographs, a 1536 px model, 3 passes
    python bench/bench_images.py --resolution 512 --photos 4 --repeats 5

The photographs are real IDRiD ones (tests/fixtures/idrid-4l14, 1072x712) enlarged 4x back to the
originals' 4288x2848, written as JPEG (quality 95) to a temporary folder. Each path runs in a fresh
process on one thread, through predict.predict_images itself; each stage is timed (CPU seconds: the
machine may be shared) by wrapping the function that does it: read = load_image, preprocess =
data.preprocess_image, restore = data.restore_geometry and data.restore_crop, write = save_maps
(PNGs, overlay), network = predict_fitting, load = the checkpoint, once.
The peer is the previous implementation (overlay in float32 with the probability as opacity, PNGs
at zlib level 6, a float32 copy of the four maps), run in the same way on the same photographs. In
both, a stand-in replaces the network: blobs darker or brighter than their surroundings, 1-5 % of
the fundus per lesion, as a trained model's maps look; a third run uses the tiny untrained network
itself (p near 0.5 everywhere: the worst case for the overlay and the PNGs).
Peak memory: the process's maximum RSS (getrusage), printed with the part that importing torch +
timm and loading the model take before the first photograph. Correctness first: the probability
PNGs of both paths agree within 1/255 inside the FOV.
"""
import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root is importable

import utils  # noqa: E402


def build_parser():
    """The model's resolution, the number of photographs and passes."""
    p = utils.Parser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1536,
                   help="the model's resolution (default: %(default)s)")
    p.add_argument("--photos", type=int, default=2,
                   help="4288x2848 photographs (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="passes over the photographs (default: %(default)s)")
    p.add_argument("--skip-network", action="store_true",
                   help="do not time the tiny network itself (default: %(default)s)")
    return p


# --help before numpy loads; NOTE: the spawned children import this file as __mp_main__: no-op there
utils.start(__name__, build_parser)

import numpy as np  # noqa: E402

FIXTURE = (ROOT / "tests" / "fixtures" / "idrid-4l14" / "A. Segmentation" / "1. Original Images"
           / "a. Training Set")
# load: the checkpoint, once a pass
STAGES = ("load", "read", "preprocess", "network", "restore", "write")
DECODER = (64, 32, 32, 16, 16)  # the demo's tiny model: test_resnet encoder, these decoder widths


def make_photos(folder, n):
    """n fixture photographs enlarged 4x to 4288x2848, JPEG quality 95 -> their paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in sorted(FIXTURE.glob("*.jpg"))[:n]:
        with Image.open(src) as im:
            big = im.convert("RGB").resize((4 * im.width, 4 * im.height), Image.BICUBIC)
        paths.append(folder / src.name)
        big.save(paths[-1], quality=95)
    return paths


def make_checkpoint(path, resolution):
    """A tiny random model (test_resnet + DECODER) saved at `path` -> its parameter count."""
    import torch

    from model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="test_resnet", pretrained=False, decoder_channels=DECODER)
    model = build_model(cfg)
    save_checkpoint(path, {"model": model.state_dict(), "model_cfg": asdict(cfg),
                           "args": {"resolution": resolution}, "step": 0, "epoch": 0,
                           "optimizer": {}, "scaler": None, "metric": 0.0, "version": 1})
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# The previous implementation (evaluate.py before issue 14), the peer
# --------------------------------------------------------------------------------------------------
PREVIOUS_COLOURS = np.array([[255, 230, 0], [230, 20, 20], [40, 230, 40], [0, 200, 255]],
                            dtype=np.float32)


def previous_save_maps(out_dir, name, image, probs):
    """The previous save_maps: 8-bit PNGs at zlib's default level, a float32 overlay with the
    probability as opacity."""
    from PIL import Image

    probs = np.clip(np.asarray(probs, dtype=np.float32), 0.0, 1.0)  # (4, H, W)
    for c, lesion in enumerate(("EX", "HE", "MA", "CWS")):
        png = Path(out_dir) / f"{name}_{lesion}.png"
        Image.fromarray(np.round(probs[c] * 255).astype(np.uint8)).save(png)
    out = image.astype(np.float32)
    for c in range(4):
        a = probs[c][..., None]  # the probability as opacity
        out = out * (1 - a) + PREVIOUS_COLOURS[c] * a
    Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)).save(
        Path(out_dir) / f"{name}_overlay.png")


def previous_predict_images(ckpt_paths, image_dir, out_dir):
    """The previous predict_images: full-size float32 copies of the four maps per photograph."""
    import torch

    import data
    import predict

    models, headers = predict.load_ensemble(ckpt_paths, torch.device("cpu"))
    resolution = headers[0]["args"]["resolution"]
    with torch.inference_mode():
        for path in sorted(Path(image_dir).glob("*.jpg")):
            original = np.asarray(predict.load_image(path))
            image, fov, geometry = data.preprocess_image(original, resolution)
            probs, _ = predict.predict_fitting(models, predict.to_input(image[None], "cpu"), None,
                                                "float32", False, 0.5)
            probs = probs[0].masked_fill(~torch.from_numpy(fov), 0.0).numpy()
            # NOTE: the whole photograph as float32, four times: what the new code avoids
            probs = np.asarray(data.restore_geometry(probs, geometry), dtype=np.float32)
            # wrapped below: the previous one
            predict.save_maps(out_dir, path.stem, original, probs)


# --------------------------------------------------------------------------------------------------
# One measured process
# --------------------------------------------------------------------------------------------------
def stand_in_network(models, x, tile, dtype, tta, overlap, style=None):
    """The network's output without the network, (B, 4, R, R): blobs darker (HE, MA) or brighter
    (EX, CWS) than their surroundings in the green channel, about 1-5 % of the fundus each at
    p >= 0.5, near 0 elsewhere."""
    import torch
    import torch.nn.functional as F

    g = x[:, 1:2]  # (B, 1, R, R): the green channel
    # separable 31x31 box
    blur = F.avg_pool2d(g, (31, 1), stride=1, padding=(15, 0), count_include_pad=False)
    # local contrast
    d = g - F.avg_pool2d(blur, (1, 31), stride=1, padding=(0, 15), count_include_pad=False)
    return torch.sigmoid(torch.cat([d - 0.06, -d - 0.04, -d - 0.08, d - 0.1], dim=1) * 200), tile


def measure(path_name, ckpt, photos, out_dir, repeats, network, queue):
    """Child process: run one path `repeats` times -> queue.put(per-photo stage medians, peak RSS,
    sizes)."""
    import torch

    torch.set_num_threads(1)
    sys.stdout = open(os.devnull, "w")  # predict_images' line per photograph
    import data
    import predict

    # per pass: the stage's CPU seconds, summed over the photographs
    times = {s: [0.0] for s in STAGES}

    def timed(owner, name, stage):  # replace owner.name by a wrapper adding its CPU time to stage
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.process_time()
            try:
                return inner(*a, **k)
            finally:
                times[stage][-1] += time.process_time() - t
        setattr(owner, name, wrapper)

    if not network:
        predict.predict_fitting = stand_in_network
    if path_name == "previous":
        predict.save_maps = previous_save_maps
    timed(predict, "load_ensemble", "load")
    timed(predict, "load_image", "read")
    timed(data, "preprocess_image", "preprocess")
    timed(predict, "predict_fitting", "network")
    timed(data, "restore_geometry", "restore")
    # segment's per-lesion restore (restore_geometry's own call is not wrapped)
    timed(data, "restore_crop", "restore")
    timed(predict, "save_maps", "write")
    run = previous_predict_images if path_name == "previous" else predict.predict_images
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB: imports, model
    n_photos = len(list(Path(photos).glob("*.jpg")))
    totals, walls = [], []
    for _ in range(repeats):
        start, wall = time.process_time(), time.perf_counter()
        run([ckpt], photos, out_dir)
        totals.append((time.process_time() - start) / n_photos)
        walls.append((time.perf_counter() - wall) / n_photos)
        for v in times.values():  # the next pass's sums
            v.append(0.0)
    # medians over the passes (the last entry is the unused next pass)
    per_photo = {s: statistics.median(v[:-1]) / n_photos for s, v in times.items()}
    per_photo["total"], per_photo["wall"] = statistics.median(totals), statistics.median(walls)
    sizes = {p.name: p.stat().st_size for p in Path(out_dir).iterdir()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB units)
    queue.put({"times": per_photo, "peak": peak, "baseline": baseline, "sizes": sizes})


def run_child(*args):
    """measure(*args) in a fresh process (its own imports and peak memory) -> its figures."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=measure, args=(*args, queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def check_same_maps(new_dir, old_dir):
    """The 8-bit probability PNGs of both paths agree within 1/255 wherever ours is not 0; ours is
    0 on a rim the previous one left non-zero: the pixels just outside the restored FOV ->
    (max difference, rim pixels)."""
    from PIL import Image

    worst, rim = 0, 0
    for old in sorted(Path(old_dir).glob("*.png")):
        if old.stem.endswith("overlay"):
            continue
        with Image.open(old) as a, Image.open(Path(new_dir) / old.name) as b:
            a, b = np.asarray(a, int), np.asarray(b, int)
        worst = max(worst, int(np.abs(a - b)[b > 0].max(initial=0)))
        rim += int(((a != b) & (b == 0)).sum())
    assert worst <= 1, f"probability PNGs differ by {worst}/255 inside the FOV"
    return worst, rim


def main():
    args = build_parser().parse_args()
    from bench_data import cpu_info

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "photos", args.photos)
        params = make_checkpoint(tmp / "tiny.pt", args.resolution)
        print(f"{cpu_info()}\n{args.photos} photographs 4288x2848, model at {args.resolution} px "
              f"(test_resnet + decoder {DECODER}, {params / 1e6:.2f} M parameters), one thread, "
              f"{args.repeats} passes")
        runs = {}  # path -> its figures; the stand-in network first, both paths
        for name in ("ours", "previous"):
            (tmp / name).mkdir()
            runs[name] = run_child(name, str(tmp / "tiny.pt"), str(tmp / "photos"), str(tmp / name),
                                   args.repeats, False)
        worst, rim = check_same_maps(tmp / "ours", tmp / "previous")
        print(f"probability PNGs agree within {worst}/255 inside the FOV; "
              f"{rim / args.photos / 4:.0f} pixels per map just outside it are now 0", flush=True)
        if not args.skip_network:  # then ours with the untrained network itself
            (tmp / "net").mkdir()
            runs["network"] = run_child("ours", str(tmp / "tiny.pt"), str(tmp / "photos"),
                                        str(tmp / "net"), args.repeats, True)
    report(runs, args)


def report(runs, args):
    """The table: per stage, ours and the previous code on the stand-in's maps, then ours on the
    real network's."""
    names = [n for n in ("ours", "previous", "network") if n in runs]
    t = {n: runs[n]["times"] for n in names}
    # the work outside the network: the total less the network and loading the checkpoint
    outside = {n: t[n]["total"] - t[n]["network"] - t[n]["load"] for n in names}
    net = "  ours, untrained network" if "network" in runs else ""
    print(f"\n{'CPU seconds per photograph':28s}{'ours':>7s}{'previous':>10s}{'ratio':>8s}{net}")

    def row(label, values, fmt="7.3f"):  # ours, previous, their ratio, then the network run's
        ours, prev = values["ours"], values["previous"]
        extra = f"{values['network']:{fmt}}" if "network" in values else ""
        print(f"{label:28s}{ours:{fmt}}{prev:10{fmt[1:]}}{prev / max(ours, 1e-9):7.1f}x"
              f"{extra:>14s}")
    for stage in ("read", "preprocess", "restore", "write"):
        row(stage, {n: t[n][stage] for n in names})
    row("outside the network", outside)
    print(f"{'':28s}target <= 2 s")
    row("network (excluded)", {n: t[n]["network"] for n in names})
    row("wall, whole photograph", {n: t[n]["wall"] for n in names})
    row("peak RSS, MiB", {n: runs[n]["peak"] for n in names}, "7.0f")
    row("  of which the photographs", {n: runs[n]["peak"] - runs[n]["baseline"] for n in names},
        "7.0f")
    print(f"{'':28s}target < 1024 MiB; the rest ({runs['ours']['baseline']:.0f} MiB) is "
          f"importing torch + timm and loading the model")
    for name in ("ours", "previous"):
        sizes = runs[name]["sizes"]
        maps = sum(v for k, v in sizes.items()
                   if k.endswith(".png") and "overlay" not in k) / args.photos / 1e6
        pictures = sum(v for k, v in sizes.items() if "overlay" in k) / args.photos / 1e6
        print(f"files per photograph, {name}: 4 probability PNGs {maps:.2f} MB, overlay "
              f"{pictures:.2f} MB")
    print("the stand-in's maps: 1-5 % of the fundus per lesion at p >= 0.5; the untrained "
          "network's: about 70 %")


if __name__ == "__main__":
    utils.run(main)
