r"""The figures of the GPU check (bench/gpu_check.sh): environment, metric kernel timings, merged
JSON.

    python bench/gpu_check.py env --json out/steps/env.json
    python bench/gpu_check.py counts --images 32 --size 1536 --json out/steps/counts.json
    python bench/gpu_check.py share --encoder legacy_seresnet101.in1k --images 8 \
        --json out/steps/share.json
    python bench/gpu_check.py merge out            # out/steps/* + out/logs/* -> out/gpu_check.json

`counts` times kernels.binned_counts over synthetic maps in float32 and bfloat16 against a device
copy of the same bytes and against torchmetrics in the same run, after checking its counts against
the torch twin on the CPU. `share` times what one evaluate.py image costs (protocol.predict, the
same forward pass) against counting its maps, at batch 1 like evaluate.py's default. `merge`
gathers every step's figures, exit status and, for a failed step, the last line of its log.
"""
import inspect
import json
import platform
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: kernels, model, ...
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: bench_metrics
# NOTE: kernels, bench_metrics and protocol are imported where used: `merge` and `env` must work
# even when one of them is broken, so that the JSON still says what failed.

import utils  # noqa: E402


def build_parser():
    """One subcommand per step of the check: env, counts, share, train-log, merge."""
    p = utils.Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="versions and GPU name")
    e.add_argument("--json", required=True, help="output file (required)")
    c = sub.add_parser("counts", help="binned_counts GB/s vs a copy, and vs torchmetrics")
    s = sub.add_parser("share", help="counting's share of an evaluate.py pass")
    for q in (c, s):
        q.add_argument("--device", default="cuda", help="device (default: %(default)s)")
        q.add_argument("--size", type=int, default=1536,
                       help="map side in pixels (default: %(default)s)")
        q.add_argument("--seed", type=int, default=0,
                       help="seed of the synthetic maps (default: %(default)s)")
        q.add_argument("--json", required=True, help="output file (required)")
    c.add_argument("--images", type=int, default=32,
                   help="maps in the test set (default: %(default)s)")
    c.add_argument("--dtypes", default="float32,bfloat16",
                   help="probability dtypes (default: %(default)s)")
    c.add_argument("--repeats", type=int, default=10,
                   help="timed runs, median (default: %(default)s)")
    s.add_argument("--images", type=int, default=8,
                   help="timed images, median (default: %(default)s)")
    s.add_argument("--encoder", default="legacy_seresnet101.in1k",
                   help="timm encoder (default: %(default)s)")
    s.add_argument("--dtype", default="bfloat16",
                   help="autocast dtype of the forward (default: %(default)s)")
    t = sub.add_parser("train-log", help="figures of a train.py run folder")
    t.add_argument("run", help="train.py --out folder")
    t.add_argument("--json", required=True, help="output file (required)")
    m = sub.add_parser("merge", help="steps/ and logs/ of OUT -> OUT/gpu_check.json")
    m.add_argument("out", help="the check's output folder")
    return p


utils.start(__name__, build_parser)  # --help before torch loads

import torch  # noqa: E402


def fine_bins():
    """{"ap_bins": kernels.AP_BINS} when binned_counts counts the floor-free score's fine bins,
    else {}."""
    import kernels

    takes = "ap_bins" in inspect.signature(kernels.binned_counts).parameters
    return {"ap_bins": kernels.AP_BINS} if takes and getattr(kernels, "AP_BINS", 0) else {}


def write_json(path, obj):
    """obj as indented JSON, through a temporary file (a killed step leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def sync(device):
    """Wait for the GPU's queued work (timings must include it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup, repeats):
    """Median wall seconds of fn() after warm-up calls (Triton and cuDNN pick their kernels on the
    first)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_of(name):
    """--device as a torch.device; one line when it names a GPU torch cannot see."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU (dry run: GPU_CHECK_DEVICE=cpu)")
    return device


# ---------------------------------------------------------------------------------------------- env
def env_figures(args):
    """Versions and the device's name: the header of gpu_check.json."""
    import triton  # noqa: F401  (a missing triton is the first thing the JSON should say)

    cuda = torch.cuda.is_available()
    figures = {"gpu": torch.cuda.get_device_name(0) if cuda else None, "cuda_available": cuda,
               "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if cuda else None,
               "python": platform.python_version(), "gpu_count": torch.cuda.device_count()}
    if cuda:
        prop = torch.cuda.get_device_properties(0)
        figures.update(gpu_memory_gib=prop.total_memory / 2**30,
                       sm_count=prop.multi_processor_count)
    for name in ("timm", "segmentation_models_pytorch", "torchmetrics"):  # missing: said, not fatal
        try:
            figures[name] = __import__(name).__version__
        except ImportError as e:
            figures[name] = f"error: {e}"
    print(json.dumps(figures, indent=2))
    write_json(args.json, figures)


# ------------------------------------------------------------------------------------------- counts
def check_against_twin(probs, target, roi, device, fine):
    """The dispatched kernel (Triton on CUDA) against the torch twin on the CPU: identical counts
    or raise."""
    from kernels import binned_counts, binned_counts_torch

    twin = binned_counts_torch(probs.cpu(), target.cpu(), roi.cpu(), **fine)
    got = binned_counts(probs, target, roi, **fine)
    if len(got) != len(twin) or not all(torch.equal(a.cpu(), b) for a, b in zip(got, twin)):
        raise ValueError(f"binned_counts on {device} differs from the torch twin "
                         f"({probs.dtype}, {fine or 'no ap_bins'})")


def time_counts(probs, target, roi, device, repeats):
    """One dtype's figures: kernel GB/s against a copy of the same bytes, and the torchmetrics
    ratio."""
    from bench_metrics import torchmetrics_counts
    from kernels import binned_counts

    fine = fine_bins()
    for f in ({}, fine) if fine else ({},):  # without the fine bins, then with them
        check_against_twin(probs, target, roi, device, f)
    t_plain = median_seconds(lambda: binned_counts(probs, target), device, 2, repeats)
    t_roi = median_seconds(lambda: binned_counts(probs, target, roi), device, 2, repeats)
    t_fine = (median_seconds(lambda: binned_counts(probs, target, roi, **fine), device, 2, repeats)
              if fine else 0.0)
    # NOTE: a copy reads and writes its bytes, the kernel only reads them: bytes / t for the kernel
    # against 2 * bytes / t for the copy (the usual "effective bandwidth" of both).
    t_copy = median_seconds(lambda: (probs.clone(), target.clone()), device, 2, repeats)
    read = probs.numel() * probs.element_size() + target.numel() * target.element_size()
    read_roi = read + roi.numel() * roi.element_size()
    # the peer's faster setting
    t_tm = min(median_seconds(lambda: torchmetrics_counts(probs, target, validate_args=v),
                              device, 1, max(1, repeats // 2))
               for v in (True, False))
    copy_gbs = 2 * read / t_copy / 1e9
    figures = {"counts_equal_twin": True, "kernel_ms": t_plain * 1e3, "kernel_roi_ms": t_roi * 1e3,
               "copy_ms": t_copy * 1e3, "bytes_read": read, "kernel_gb_s": read / t_plain / 1e9,
               "kernel_roi_gb_s": read_roi / t_roi / 1e9, "copy_gb_s": copy_gbs,
               "torchmetrics_ms": t_tm * 1e3, "speedup_vs_torchmetrics": t_tm / t_plain,
               "ap_bins": fine.get("ap_bins", 0)}
    figures["fraction_of_copy"] = figures["kernel_gb_s"] / copy_gbs
    figures["fraction_of_copy_roi"] = figures["kernel_roi_gb_s"] / copy_gbs
    if fine:  # the pass evaluate.py makes: ROI and the fine bins of the floor-free score
        figures.update(kernel_roi_ap_bins_ms=t_fine * 1e3,
                       kernel_roi_ap_bins_gb_s=read_roi / t_fine / 1e9,
                       fraction_of_copy_roi_ap_bins=read_roi / t_fine / 1e9 / copy_gbs)
    # the targets of the check
    figures["meets_70pct_of_copy"] = figures["fraction_of_copy"] >= 0.7
    figures["meets_20x_torchmetrics"] = figures["speedup_vs_torchmetrics"] >= 20
    return figures


def counts_figures(args):
    """`counts`: time_counts per dtype, the JSON rewritten after each."""
    from bench_metrics import make_maps

    device = device_of(args.device)
    figures = {"device": str(device), "images": args.images, "size": args.size,
               "repeats": args.repeats}
    for name in args.dtypes.split(","):
        probs, target, roi = make_maps(args.images, args.size, getattr(torch, name), args.seed)
        probs, target, roi = probs.to(device), target.to(device), roi.to(device)
        figures[name] = time_counts(probs, target, roi, device, args.repeats)
        print(name, json.dumps(figures[name], indent=2))
        write_json(args.json, figures)  # after each dtype: a later failure keeps this one
        del probs, target, roi


# -------------------------------------------------------------------------------------------- share
def share_figures(args):
    """Forward pass (evaluate.py's protocol.predict) vs counting, per 1536 px image, batch 1."""
    from bench_metrics import make_maps
    from kernels import binned_counts
    from model import ModelConfig, build_model
    from protocol import predict

    device = device_of(args.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=args.encoder, pretrained=False)).to(device).eval()
    x = torch.rand(1, 3, args.size, args.size, device=device)  # (1, 3, S, S)
    _, target, roi = make_maps(1, args.size, torch.float32, args.seed)
    target, roi = target.to(device), roi.to(device)
    # NOTE: evaluate.py counts the floor-free score's fine bins in the same pass (kernels.AP_BINS):
    # time them too
    fine = fine_bins()
    dtype = getattr(torch, args.dtype)
    with torch.inference_mode():
        probs = predict([model], x, dtype=dtype).contiguous()  # (1, 4, S, S) float32
        t_fwd = median_seconds(lambda: predict([model], x, dtype=dtype), device, 2, args.images)
        t_count = median_seconds(lambda: binned_counts(probs, target, roi, **fine), device, 2,
                                 args.images)
        t_11 = median_seconds(lambda: binned_counts(probs, target, roi), device, 2, args.images)
    # the share of an image's evaluation spent counting, with and without the fine bins
    figures = {"device": str(device), "encoder": args.encoder, "size": args.size,
               "dtype": args.dtype, "ap_bins": fine.get("ap_bins", 0),
               "predict_ms_per_image": t_fwd * 1e3, "count_ms_per_image": t_count * 1e3,
               "count_share_of_evaluate": t_count / (t_fwd + t_count),
               "count_11_thresholds_ms_per_image": t_11 * 1e3,
               "count_11_share": t_11 / (t_fwd + t_11)}
    print(json.dumps(figures, indent=2))
    write_json(args.json, figures)


# ---------------------------------------------------------------------------------------- train log
def train_log_figures(args):
    """A train.py run folder's log.jsonl -> steps done, median patches/s, the last validation."""
    log = Path(args.run) / "log.jsonl"
    if not log.exists():
        raise FileNotFoundError(f"{log}: no training log (did the run start?)")
    lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    train = [ln for ln in lines if ln.get("split") == "train"]
    val = [ln for ln in lines if ln.get("split") == "val"]
    # the first line's speed holds the start-up
    speeds = [ln["patches_per_s"] for ln in train[1:] if "patches_per_s" in ln]
    figures = {"run": str(args.run), "last_step": lines[-1]["step"] if lines else None,
               "median_patches_per_s": statistics.median(speeds) if speeds else None,
               "last_train_loss": train[-1]["loss"] if train else None,
               "last_val": val[-1] if val else None}
    print(json.dumps(figures, indent=2))
    write_json(args.json, figures)


# -------------------------------------------------------------------------------------------- merge
def pytest_figures(xml_path):
    """passed / failed / errors / skipped from a pytest --junitxml file."""
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
            "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"]}


def last_line(log):
    """The last non-blank line of a step's log: what a failed step says."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


def merge(args):
    """out/steps/NAME.rc ("rc seconds") + NAME.json + NAME.xml + logs/NAME.log ->
    out/gpu_check.json."""
    out = Path(args.out)
    steps_dir = out / "steps"
    result = {"env": None, "steps": {}}
    for rc_file in sorted(steps_dir.glob("*.rc"), key=lambda p: p.stat().st_mtime):  # run order
        name = rc_file.stem
        rc, seconds = (rc_file.read_text().split() + ["nan"])[:2]  # no seconds: NaN
        step = {"rc": int(rc), "seconds": float(seconds), "log": f"logs/{name}.log"}
        if step["rc"] != 0:  # 124, 137: timeout's exit statuses (its TERM, then KILL)
            timed_out = "timed out: " if step["rc"] in (124, 137) else ""
            step["error"] = timed_out + last_line(out / "logs" / f"{name}.log")
        # a step's figures: its JSON, or its pytest report
        for suffix, read in ((".json", lambda p: json.loads(p.read_text())),
                             (".xml", pytest_figures)):
            path = steps_dir / (name + suffix)
            if path.exists():
                try:
                    step["figures"] = read(path)
                except (ValueError, ET.ParseError) as e:
                    step["figures_error"] = f"{path.name}: {e}"
        if name.startswith("pytest") and step.get("figures", {}).get("passed") == 0:
            step["warning"] = ("no test passed: all skipped or deselected (is CUDA visible? see "
                               "the log)")
        if name == "env":
            result["env"] = step.get("figures")
        result["steps"][name] = step
    result["failed_steps"] = [n for n, s in result["steps"].items() if s["rc"] != 0]
    write_json(out / "gpu_check.json", result)
    print(f"{out / 'gpu_check.json'}: {len(result['steps'])} steps, "
          f"failed: {result['failed_steps'] or 'none'}")


def main():
    args = build_parser().parse_args()
    if getattr(args, "images", 1) < 1 or getattr(args, "repeats", 1) < 1:
        raise ValueError("--images and --repeats must be >= 1")
    commands = {"env": env_figures, "counts": counts_figures, "share": share_figures,
                "train-log": train_log_figures, "merge": merge}
    commands[args.cmd](args)


if __name__ == "__main__":
    utils.run(main)
