"""Benchmark: kernels.binned_counts vs torchmetrics BinaryPrecisionRecallCurve(thresholds=11),
counts checked first.

    python bench/bench_metrics.py                       # 1536 px maps: 4 on the CPU, 32 on a GPU
    python bench/bench_metrics.py --images 2 --size 512 --repeats 3 --threads 1
    python bench/bench_metrics.py --device cuda         # Triton kernel: GB/s vs a device copy
    python bench/bench_metrics.py --dtype float16       # shows torchmetrics' float16 threshold rule

On the CPU `binned_counts` runs its fast CPU path; on CUDA the Triton kernel; both are first
checked against `reference_binned_counts`, the definition. The fine counts behind the floor-free AP
(ap_bins=AP_BINS, the same pass) are timed beside the 11-threshold ones. torchmetrics gets one
metric per lesion fed image by image (contiguous (H, W) slices: its most favourable input), the way
an evaluation streams a test set. Synthetic maps: smooth blobs as lesions, a circular FOV, 1% of
the pixels planted exactly on the float32 thresholds so the `>=` convention is exercised.
"""
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root is importable

import utils  # noqa: E402


def build_parser():
    """The maps (how many, their size and dtype), the device, the repeats, the threads."""
    # NOTE: every help text says its default (ArgumentDefaultsHelpFormatter would add
    # "(default: None)" to those resolved after parsing)
    parser = utils.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=None,
                        help="probability maps (default: 4 on the CPU, 32 on CUDA; %(default)s = "
                             "by device)")
    parser.add_argument("--size", type=int, default=1536,
                        help="map side in pixels (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="probability dtype (default: %(default)s)")
    # None: resolved after parsing (torch is not loaded for --help)
    parser.add_argument("--device", default=None,
                        help="device to time on (default: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs, the median reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs first (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic maps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; 1 gives steady timings on a shared machine "
                             "(default: torch's own count)")
    return parser


utils.start(__name__, build_parser)  # --help before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import (AP_BINS, binned_counts, binned_counts_torch,  # noqa: E402
                     reference_binned_counts, threshold_values)

T = 11  # the protocol's thresholds: float32 linspace(0, 1, 11)


def make_maps(images, size, dtype, seed):
    """probs (B, 4, S, S), target (B, 4, S, S) bool, roi (B, S, S) bool, built on the CPU."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(images, 4, max(2, size // 48), max(2, size // 48), generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear",
                           align_corners=False)  # (B, 4, S, S)
    target = smooth > 0.85  # a few percent of lesion pixels, in blobs
    probs = (smooth + 0.3 * torch.rand(smooth.shape, generator=g) - 0.35).clamp_(0, 1)
    # 1 % of the values set exactly on a threshold: the `>=` convention is exercised
    where = torch.randint(0, probs.numel(), (probs.numel() // 100,), generator=g)
    probs.view(-1)[where] = threshold_values(T)[torch.randint(0, T, where.shape, generator=g)]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    # (S, S) circular field of view
    fov = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.47 * size) ** 2
    return probs.to(dtype), target, fov.expand(images, size, size).contiguous()


def torchmetrics_counts(probs, target, roi=None, validate_args=True):
    """tp (C, T), fp (C, T), pos (C,) from one BinaryPrecisionRecallCurve per lesion, updated per
    image."""
    from torchmetrics.classification import BinaryPrecisionRecallCurve

    tp, fp, pos = [], [], []
    for c in range(probs.shape[1]):  # one metric per lesion
        metric = BinaryPrecisionRecallCurve(thresholds=T,
                                            validate_args=validate_args).to(probs.device)
        for b in range(probs.shape[0]):
            if roi is None:
                metric.update(probs[b, c], target[b, c])
            else:  # torchmetrics has no ROI: hand it the ROI pixels only
                metric.update(probs[b, c][roi[b]], target[b, c][roi[b]])
        confmat = metric.confmat  # (T, 2, 2): [k, target, prediction]
        tp.append(confmat[:, 1, 1])
        fp.append(confmat[:, 0, 1])
        pos.append(confmat[0, 1].sum())
    return torch.stack(tp), torch.stack(fp), torch.stack(pos)


def sync(device):
    """Wait for the GPU's queued work (timings must include it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, warmup, repeats):
    """Median wall and CPU (this process) seconds of fn(), after warm-up calls (Triton compiles on
    the first).

    NOTE: on a shared CPU the wall time also counts the time other processes hold the cores; the
    CPU time does not, so its ratio is the steadier one there.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side logs start/stop lines (and 'no GPU'
    errors) there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_extra_bytes(fn):
    """Peak of the bytes torch allocates (and has not yet freed) while fn() runs, from the
    profiler's log."""
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    # NOTE: kineto_results is the profiler's raw event list: the only place holding every
    # allocation in order
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:  # a free is a negative allocation: a running sum
        now += nbytes
        peak = max(peak, now)
    return peak


def cuda_peak_extra_bytes(fn, device):
    """Peak bytes allocated on the GPU while fn() runs, beyond what was allocated before."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def check_counts(ours, theirs, probs, target, roi, label):
    """Assert identical counts wherever torchmetrics compares like the protocol; explain every
    difference."""
    thr = threshold_values(T)
    # values in one torchmetrics update
    update = probs[0, 0].numel() if roi is None else int(roi[0].sum())
    # NOTE: torchmetrics 1.9 compares `preds >= thresholds[k]` with a 0-dim float32 threshold once
    # an update holds > 50,000 values (its loop path): PyTorch's promotion keeps that comparison in
    # float16/bfloat16, i.e. the threshold is rounded to the input dtype. Smaller updates (its
    # vectorised path) and float32 inputs compare in float32, like the protocol (and ours). Its
    # thresholds are linspace on the device.
    rounded = probs.dtype != torch.float32 and update > 50_000
    tm_thr = torch.linspace(0, 1, T, device=probs.device).cpu()
    tm_thr = tm_thr.to(probs.dtype).float() if rounded else tm_thr
    assert torch.equal(ours[2].cpu(), theirs[2].cpu()), f"{label}: pos differs"
    p, y = probs.cpu().float(), target.cpu()
    keep = torch.ones(1, 1, 1, 1, dtype=torch.bool) if roi is None else roi.cpu()[:, None]
    lines = []
    for k in range(T):
        # pixels torchmetrics counts at t_k and the protocol does not (or the reverse: negative)
        extra = ((p >= tm_thr[k]) & keep).long() - ((p >= thr[k]) & keep).long()
        for name, a, b, lab in (("tp", ours[0], theirs[0], y), ("fp", ours[1], theirs[1], ~y)):
            expected = (extra * lab).sum((0, 2, 3))
            assert torch.equal(b[:, k].cpu() - a[:, k].cpu(), expected), \
                f"{label}: {name}[{k}] unexplained"
        if extra.any():
            lo, hi = sorted((thr[k].item(), tm_thr[k].item()))
            lines.append(f"  t_{k} = {thr[k].item():.9f} is {tm_thr[k].item():.9f} for "
                         f"torchmetrics: it counts {int(extra.sum()):+d} pixels (the values in "
                         f"[{lo:.9f}, {hi:.9f}))")
    if not lines:
        print(f"counts identical ({label}): tp, fp (4 x {T}) and pos (4)")
        return
    print(f"counts differ exactly as predicted ({label}): torchmetrics' thresholds are not the "
          f"float32 ones")
    print("\n".join(lines) + "\n  every other count identical")


def check_fine_counts(probs, target, roi):
    """ap_bins=AP_BINS: the first three counts unchanged, the fine ones equal to the reference's
    (on the CPU)."""
    if probs.is_cuda:  # the Triton kernel against the fast CPU path, fine counts included
        fast = binned_counts_torch(probs.cpu(), target.cpu(), roi.cpu(), ap_bins=AP_BINS)
        for a, b in zip(binned_counts(probs, target, roi, ap_bins=AP_BINS), fast):
            assert torch.equal(a.cpu(), b), "Triton kernel and fast CPU path differ"
        print(f"counts identical: Triton kernel (CUDA) and fast CPU path, with the ROI and "
              f"{AP_BINS} AP bins")
    coarse = binned_counts(probs, target, roi)
    ours = binned_counts(probs, target, roi, ap_bins=AP_BINS)
    want = reference_binned_counts(probs.cpu(), target.cpu(), roi.cpu(), ap_bins=AP_BINS)
    for name, a, b in zip(("tp", "fp", "pos"), ours, coarse):
        assert torch.equal(a, b), f"{name} changed with ap_bins={AP_BINS}"
    for name, a, b in zip(("tp", "fp", "pos", "tp_fine", "fp_fine"), ours, want):
        assert torch.equal(a.cpu(), b), f"{name} differs from reference_binned_counts"
    print(f"counts identical (inside the ROI): ours and the reference, with {AP_BINS} AP bins; "
          f"11-threshold counts unchanged by them")


def parse_args():
    """The command line, with --device and --threads resolved and the device's default --images."""
    args = build_parser().parse_args()
    if args.device is None:
        args.device = utils.default_device()
    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    if args.images is None:  # a GPU reads 4 maps in ~0.1 ms: launch overheads would dominate
        args.images = 32 if device.type == "cuda" else 4
    if args.images < 1 or args.size < 8 or args.repeats < 1:
        raise ValueError("--images and --repeats must be >= 1 and --size >= 8")
    return args, device


def time_both(probs, target, roi, device, args):
    """Ours and torchmetrics timed in this run on the same maps: medians after warm-up, printed ->
    ours' wall seconds (without, with the ROI)."""
    ours_label = "Triton kernel" if device.type == "cuda" else "fast CPU path"
    timed = {
        f"binned_counts ({ours_label})": lambda: binned_counts(probs, target),
        "binned_counts with the ROI": lambda: binned_counts(probs, target, roi),
        f"  + {AP_BINS} AP bins": lambda: binned_counts(probs, target, roi, ap_bins=AP_BINS),
        "torchmetrics (11 thresholds)": lambda: torchmetrics_counts(probs, target),
        "  with validate_args=False":
            lambda: torchmetrics_counts(probs, target, validate_args=False),
    }
    times = {label: median_time(fn, device, args.warmup, args.repeats)
             for label, fn in timed.items()}
    (t_ours, c_ours) = times[f"binned_counts ({ours_label})"]
    (t_roi, _) = times["binned_counts with the ROI"]
    n = probs.numel()
    print(f"{'median of ' + str(args.repeats) + ' runs:':32s}{'wall':>10s}    {'CPU':>10s}")
    for label, (wall, cpu) in times.items():
        # ours: no ratio; the AP bins: against the ROI alone; torchmetrics: against ours
        versus = "" if label.startswith("binned_counts") else \
            f"  -> {wall / t_roi:.2f}x the time with the ROI alone" if "AP bins" in label else \
            f"  -> ours {wall / t_ours:.1f}x faster (wall), {cpu / c_ours:.1f}x (CPU)"
        cpu_text = f"{cpu * 1e3:10.2f} ms" if device.type == "cpu" else f"{'-':>10s}   "
        print(f"{label + ':':32s}{wall * 1e3:10.2f} ms {cpu_text}{versus}")
    print(f"ours: {t_ours / n * 1e9:.2f} ns a value (wall)")
    return t_ours, t_roi


def main():
    args, device = parse_args()
    probs, target, roi = make_maps(args.images, args.size, getattr(torch, args.dtype), args.seed)
    probs, target, roi = probs.to(device), target.to(device), roi.to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device: {device} ({name}); torch {torch.__version__}")
    print(f"maps: {args.images} x 4 x {args.size} x {args.size} {args.dtype}, "
          f"{target.float().mean().item():.2%} positive, "
          f"ROI {roi.float().mean().item():.1%} of the pixels")

    # 1. Correctness first: ours (whole maps, and inside the ROI) against torchmetrics on the same
    # pixels
    check_counts(binned_counts(probs, target), torchmetrics_counts(probs, target), probs, target,
                 None, "whole maps")
    check_counts(binned_counts(probs, target, roi), torchmetrics_counts(probs, target, roi), probs,
                 target, roi, "inside the ROI")
    check_fine_counts(probs, target, roi)

    # 2. Time: medians after warm-up, both in this run on the same maps
    t_ours, t_roi = time_both(probs, target, roi, device, args)
    n = probs.numel()

    # 3. Memory: the peak of what each allocates beyond the maps
    if device.type == "cuda":
        extra = cuda_peak_extra_bytes(lambda: binned_counts(probs, target, roi), device)
        extra_tm = cuda_peak_extra_bytes(lambda: torchmetrics_counts(probs, target), device)
    else:
        extra = cpu_peak_extra_bytes(lambda: binned_counts(probs, target, roi))
        extra_tm = cpu_peak_extra_bytes(lambda: torchmetrics_counts(probs, target))
    print(f"peak extra memory: ours {extra / 2**20:.1f} MiB, torchmetrics "
          f"{extra_tm / 2**20:.1f} MiB "
          f"(maps: {(n * probs.element_size() + target.numel()) / 2**20:.0f} MiB)")

    # 4. GPU: bandwidth over the bytes the kernel must read, against a measured device copy
    if device.type == "cuda":
        read = n * probs.element_size() + target.numel() * target.element_size()
        read_roi = read + roi.numel() * roi.element_size()
        big = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
        t_copy = median_time(lambda: big.clone(), device, 2, args.repeats)
        copy_bw = 2 * big.numel() * 4 / t_copy  # read + write
        del big
        bw, bw_roi = read / t_ours, read_roi / t_roi
        print(f"device copy (clone of 1 GiB): {copy_bw / 1e9:.0f} GB/s")
        print(f"kernel: {bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of copy; with the ROI "
              f"{bw_roi / 1e9:.0f} GB/s = {bw_roi / copy_bw:.0%}")


if __name__ == "__main__":
    utils.run(main)
