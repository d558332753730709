"""Binned confusion counts for the IDRiD-style AUPR: one pass, every threshold and lesion at once.

    from kernels import binned_counts, AP_BINS
    tp, fp, pos = binned_counts(probs, target, roi)     # (C, 11), (C, 11), (C,) int64; p >= t_k
    tp, fp, pos, tp_fine, fp_fine = binned_counts(probs, target, roi, ap_bins=AP_BINS)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py
    python bench/bench_metrics.py --images 4 --size 1536

Definition (docs/PROTOCOL.md, "Evaluation protocol"), for lesion c and
t_k = float32 linspace(0, 1, T)[k]:
    TP[c, k] = #{p >= t_k, y = 1}    FP[c, k] = #{p >= t_k, y = 0}    pos[c] = #{y = 1}
counted over the pixels inside the ROI (the FOV) only. With ap_bins = F > 0 the same pass also
counts the fine curve behind the floor-free average precision (kernels.pr_metrics "ap"), tp_fine
and fp_fine (C, F), at the F fine thresholds
    u_j = j / F rounded to the nearest float32, j = 0..F-1 (exact binary fractions for F = 1024)
    TP_fine[c, j] = #{p >= u_j, y = 1}    FP_fine[c, j] = #{p >= u_j, y = 0}
Probabilities are upcast to float32 and compared with the float32 thresholds themselves (exact for
float16/bfloat16); NaN counts as below every threshold (`NaN >= t` is False); a target is positive
where it is non-zero. The 11-threshold counts do not depend on ap_bins.

Three implementations, all giving identical counts:
- `reference_binned_counts`: the definition, a few lines of bucketize + bincount (the tests check
  the others against it);
- `binned_counts_triton`: the Triton kernel and its launcher (CUDA);
- `binned_counts_torch`: the fast CPU path, the same histogram with table look-ups instead of
  bucketize.
`binned_counts` takes Triton for CUDA tensors and the fast CPU path elsewhere. The fast paths
reduce a pixel to its bin = #{k : t_k <= p} (0..T) and build a (C, 2, T+1) histogram of (label,
bin); a reverse cumulative sum turns it into the counts, so no (pixels x thresholds) tensor ever
exists.
"""
import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # NOTE: triton ships for Linux x86_64 only (requirements.txt)
    triton = None  # the CPU path serves elsewhere

PROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.bool, torch.uint8)
# Fine thresholds of the AP curve: at least 1000, so that AP stays within 1e-3 of scikit-learn's
# unbinned average_precision_score on continuous maps (tests/test_kernels.py), and a power of two,
# so that u_j = j / 1024 is exact in float32 and the kernel's (label, j) histogram fills 2 x 1024
# bins exactly
AP_BINS = 1024
MAX_AP_BINS = 4096  # the Triton kernel keeps a (C, 2 F) int32 histogram in registers


def threshold_values(n=11):
    """The protocol's thresholds: float32 linspace(0, 1, n), always built on the CPU (one
    definition)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"thresholds must be an integer >= 2, got {n!r}")
    return torch.linspace(0, 1, n, dtype=torch.float32)


def fine_threshold_values(n=AP_BINS):
    """The AP curve's thresholds u_j = j / n, j = 0..n-1, as float32 (IEEE division: correctly
    rounded)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_AP_BINS:
        raise ValueError(f"ap_bins must be 0 (no fine counts) or an integer in 1..{MAX_AP_BINS}, "
                         f"got {n!r}")
    return torch.arange(n, dtype=torch.float32) / n


def _check_inputs(probs, target, roi, thresholds, ap_bins=0):
    """One-line ValueErrors for the shapes, dtypes and devices binned_counts accepts."""
    threshold_values(thresholds)
    if ap_bins != 0 or isinstance(ap_bins, bool):
        fine_threshold_values(ap_bins)
    if not isinstance(probs, torch.Tensor) or probs.ndim != 4:
        raise ValueError(f"probs must be a (B, C, H, W) tensor, "
                         f"got {getattr(probs, 'shape', type(probs))}")
    if probs.dtype not in PROB_DTYPES:
        raise ValueError(f"probs must be float32, float16 or bfloat16, got {probs.dtype}")
    if not isinstance(target, torch.Tensor) or target.shape != probs.shape:
        raise ValueError(f"target must have the shape of probs {tuple(probs.shape)}, "
                         f"got {tuple(getattr(target, 'shape', ()))}")
    if target.dtype not in TARGET_DTYPES:
        raise ValueError(f"target must be bool or uint8, got {target.dtype}")
    if roi is not None:
        B, _, H, W = probs.shape
        if not isinstance(roi, torch.Tensor) or roi.shape != (B, H, W):
            raise ValueError(f"roi must be a (B, H, W) = {(B, H, W)} tensor or None, "
                             f"got {tuple(getattr(roi, 'shape', ()))}")
        if roi.dtype != torch.bool:
            raise ValueError(f"roi must be bool, got {roi.dtype}")
    devices = {t.device for t in (probs, target, roi) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"probs, target and roi must be on one device, "
                         f"got {sorted(map(str, devices))}")


# --------------------------------------------------------------------------------------------------
# The reference: the definition of correctness, plainly (memory and time are not its concern).

def reference_binned_counts(probs, target, roi=None, thresholds=11, ap_bins=0):
    """The definition of the counts (docs/PROTOCOL.md, "Evaluation protocol"): bucketize + bincount.

    Same arguments and results as binned_counts: tp (C, T), fp (C, T), pos (C,) int64, and with
    ap_bins = F also tp_fine (C, F), fp_fine (C, F) at u_j = fine_threshold_values(F)[j].
    """
    _check_inputs(probs, target, roi, thresholds, ap_bins)
    C = probs.shape[1]
    p = probs.float().transpose(0, 1).reshape(C, -1)  # (C, N): every pixel of every image
    # `NaN >= t` is False: below every threshold
    p = torch.where(p.isnan(), -math.inf, p).contiguous()
    y = (target != 0).transpose(0, 1).reshape(C, -1)  # (C, N)
    # (N,) in the same (b, h, w) order
    keep = torch.ones_like(y[0]) if roi is None else roi.reshape(-1)

    def at_least(thr):  # thr (n,) ascending -> tp (C, n), fp (C, n): counts of p >= thr[k]
        n = len(thr)
        bins = torch.bucketize(p, thr.to(p.device), right=True)  # (C, N) = #{k : thr[k] <= p}, 0..n
        tp = torch.stack([torch.bincount(bins[c][keep & y[c]], minlength=n + 1)
                          for c in range(C)])  # (C, n+1)
        fp = torch.stack([torch.bincount(bins[c][keep & ~y[c]], minlength=n + 1)
                          for c in range(C)])
        # p >= thr[k]  <=>  bin > k: the pixels in bins k+1..n, a reverse cumulative sum
        return tp.flip(1).cumsum(1).flip(1)[:, 1:], fp.flip(1).cumsum(1).flip(1)[:, 1:]

    tp, fp = at_least(threshold_values(thresholds))
    pos = (y & keep).sum(1)  # (C,)
    if not ap_bins:
        return tp, fp, pos
    return (tp, fp, pos, *at_least(fine_threshold_values(ap_bins)))


def _counts_from_histogram(hist, T):
    """(C, 2, T+1) histogram of (label, bin) -> tp (C, T), fp (C, T), pos (C,), all int64."""
    # at_least[..., j] = #pixels with bin >= j; p >= t_k  <=>  bin >= k + 1 (thresholds ascend)
    at_least = hist.flip(-1).cumsum(-1).flip(-1)  # (C, 2, T+1)
    return at_least[:, 1, 1:].clone(), at_least[:, 0, 1:].clone(), at_least[:, 1, 0].clone()


def _fine_counts(fine, C, F):
    """The kernel's (C_PAD, >= 2F) histogram of (label, j - 1) -> tp_fine (C, F), fp_fine (C, F)."""
    # at_least[.., j] = #{p >= u_j}
    at_least = fine[:C, : 2 * F].view(C, 2, F).flip(-1).cumsum(-1).flip(-1)
    return at_least[:, 1].clone(), at_least[:, 0].clone()


# --------------------------------------------------------------------------------------------------
# Triton kernel: grid (programs, B); each program walks the pixels of image b with a grid stride,
# reads probabilities, targets and ROI once, and keeps a private (C, bins) histogram; the launcher
# sums programs. With NFINE > 0 the same loads also feed the fine (label, j) histogram, added
# atomically into one buffer.

if triton is not None:

    @triton.jit
    def _fine_bin(p, fine_thr_ptr, NFINE: tl.constexpr):
        """p (BLOCK,) float32 -> j = #{u_j <= p} (BLOCK,) int32, fine_thr_ptr as in
        _binned_counts_kernel."""
        # floor(p * NFINE) + 1 is off by at most one (float32 rounding of p * NFINE and of u_j), so
        # two exact comparisons with the thresholds around it settle j. NaN and p < 0 give q = 0,
        # then j = 0.
        q = tl.where(p >= 0.0, tl.where(p <= 1.0, p, 1.0), 0.0)
        e = tl.minimum(tl.floor(q * NFINE).to(tl.int32), NFINE - 1)  # (BLOCK,) in 0..NFINE-1
        return (e + (p >= tl.load(fine_thr_ptr + e)).to(tl.int32)
                + (p >= tl.load(fine_thr_ptr + e + 1)).to(tl.int32))

    @triton.jit
    def _binned_counts_kernel(
        p_ptr,  # *Pointer* to the probabilities (B, C, H, W), float32/float16/bfloat16, any strides
        y_ptr,  # *Pointer* to the targets (B, C, H, W), uint8 (bool viewed as uint8), 0 = none
        roi_ptr,  # *Pointer* to the ROI (B, H, W), uint8, non-zero = counted; unread if not HAS_ROI
        thr_ptr,  # *Pointer* to the T protocol thresholds t_k, float32, ascending
        fine_thr_ptr,  # *Pointer* to the NFINE + 1 fine thresholds u_j = j / NFINE, +inf; float32
        out_ptr,  # *Pointer* to the partial histograms (B, programs, C_PAD, NBINS), int64
        fine_ptr,  # *Pointer* to the fine histogram (C_PAD, NBINS_FINE), int64, zeroed; added into
        H, W,  # image height and width in pixels (the launcher checks H * W < 2**31)
        p_sb, p_sc, p_sh, p_sw,  # strides of the probabilities along B, C, H, W, in elements
        y_sb, y_sc, y_sh, y_sw,  # strides of the targets, in elements
        r_sb, r_sh, r_sw,  # strides of the ROI along B, H, W, in elements (0 when there is none)
        C: tl.constexpr,  # lesions (channels)
        T: tl.constexpr,  # protocol thresholds (11)
        NBINS: tl.constexpr,  # power of two >= 2 (T + 1) + 1: the (label, bin) pairs, the dump bin
        C_PAD: tl.constexpr,  # power of two >= C (Triton tensor shapes are powers of two)
        NFINE: tl.constexpr,  # fine thresholds of the AP curve; 0: none, the 11-threshold kernel
        NBINS_FINE: tl.constexpr,  # power of two >= 2 NFINE: the fine counts' (label, j) pairs
        HAS_ROI: tl.constexpr,  # count only the pixels where roi != 0
        FLAT: tl.constexpr,  # every (H, W) plane contiguous: pixel hw sits at plane offset hw
        BLOCK: tl.constexpr,  # pixels a program handles per loop iteration (a power of two)
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        # int64 offsets: 228 maps of 4 x 1536^2 pass 2**31 elements
        b = tl.program_id(1).to(tl.int64)
        HW = H * W
        DUMP: tl.constexpr = 2 * (T + 1)  # histogram bin of the pixels outside the image or the ROI
        rows = tl.arange(0, C_PAD)[:, None]  # (C_PAD, 1)
        bins = tl.arange(0, NBINS)[None, :]  # (1, NBINS)
        acc = tl.zeros((C_PAD, NBINS), dtype=tl.int64)
        # int32 is enough: a program counts at most H * W < 2**31 pixels of one image
        acc_fine = tl.zeros((C_PAD, NBINS_FINE), dtype=tl.int32)
        fine_bins = tl.arange(0, NBINS_FINE)[None, :]  # (1, NBINS_FINE)
        uncounted = tl.zeros((C_PAD, 1), dtype=tl.int32)  # pixels parked in fine bin 0, per lesion
        for start in range(pid * BLOCK, HW, nprog * BLOCK):
            # (BLOCK,) int32 (the launcher checks H * W < 2**31); a block start is a multiple of
            # BLOCK: aligned loads
            hw = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
            inside = hw < HW
            if FLAT:  # every (H, W) plane contiguous: consecutive pixels, vectorised loads
                p_off = b * p_sb + hw
                y_off = b * y_sb + hw
                r_off = b * r_sb + hw
            else:  # any strides (channels_last, slices): rebuild (h, w)
                h = (hw // W).to(tl.int64)
                w = (hw % W).to(tl.int64)
                p_off = b * p_sb + h * p_sh + w * p_sw
                y_off = b * y_sb + h * y_sh + w * y_sw
                r_off = b * r_sb + h * r_sh + w * r_sw
            keep = inside
            if HAS_ROI:
                r = tl.load(roi_ptr + r_off, mask=inside, other=0)
                keep = keep & (r != 0)
            for c in tl.static_range(C):
                p = tl.load(p_ptr + p_off + c * p_sc, mask=inside, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + y_off + c * y_sc, mask=inside, other=0)
                # bin = #{k : t_k <= p}: T float32 comparisons, exact for float16/bfloat16 inputs
                k_bin = tl.zeros((BLOCK,), dtype=tl.int32)
                for k in tl.static_range(T):
                    k_bin += (p >= tl.load(thr_ptr + k)).to(tl.int32)
                idx = tl.where(keep, (y != 0).to(tl.int32) * (T + 1) + k_bin, DUMP)
                hist = tl.histogram(idx, NBINS)  # (NBINS,) int32
                acc += tl.where(rows == c, hist[None, :].to(tl.int64), 0)
                if NFINE > 0:
                    j = _fine_bin(p, fine_thr_ptr, NFINE)  # (BLOCK,) #{u_j <= p} in 0..NFINE
                    # (label, j - 1): j = 0 (below u_0 = 0) adds to no fine count, so the 2 NFINE
                    # pairs fill a power-of-two histogram exactly when NFINE is one.
                    # NOTE: tl.histogram has no mask before Triton 3.4, so the pixels not counted
                    # are parked in bin 0 and taken out at the end.
                    counted = keep & (j > 0)
                    f_idx = tl.where(counted, (y != 0).to(tl.int32) * NFINE + j - 1, 0)
                    f_hist = tl.histogram(f_idx, NBINS_FINE)  # (NBINS_FINE,) int32
                    acc_fine += tl.where(rows == c, f_hist[None, :], 0)
                    uncounted += tl.where(rows == c,
                                          BLOCK - tl.sum(counted.to(tl.int32), axis=0), 0)
        out = out_ptr + (b * nprog + pid) * (C_PAD * NBINS)
        tl.store(out + rows * NBINS + bins, acc)
        if NFINE > 0:
            # NOTE: atomics rather than per-program partials: a (programs, C, 2 x 1024) int64 buffer
            # would be written and summed per call, as many bytes as a 1536^2 map itself. Integer
            # sums are exact in any order, so the counts stay deterministic.
            acc_fine -= tl.where(fine_bins == 0, uncounted, 0)
            tl.atomic_add(fine_ptr + rows * NBINS_FINE + fine_bins, acc_fine.to(tl.int64))


def binned_counts_triton(probs, target, roi=None, thresholds=11, ap_bins=0, block=1024,
                         programs=None):
    """Launcher: CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), any strides, no copies."""
    _check_inputs(probs, target, roi, thresholds, ap_bins)
    if triton is None:
        raise ValueError("binned_counts_triton needs triton (pip install triton); use "
                         "binned_counts_torch")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (probs.is_cuda or (probs.device.type == "cpu" and interpret)):
        raise ValueError(f"binned_counts_triton needs CUDA tensors (or CPU with "
                         f"TRITON_INTERPRET=1), got {probs.device}")
    B, C, H, W = probs.shape
    if H * W + block >= 2**31:
        raise ValueError(f"image of {H}x{W} pixels is too large for int32 pixel indices")
    T, F = thresholds, ap_bins
    hist = torch.zeros(C, 2, T + 1, dtype=torch.int64, device=probs.device)
    c_pad = triton.next_power_of_2(C)
    nbins_fine = triton.next_power_of_2(2 * F) if F else 1  # 1: a placeholder, unused when F = 0
    # (C_PAD, 2F + padding)
    fine = torch.zeros(c_pad, nbins_fine, dtype=torch.int64, device=probs.device)
    if probs.numel() == 0:
        return _counts_from_histogram(hist, T) + (_fine_counts(fine, C, F) if F else ())
    nbins = triton.next_power_of_2(2 * (T + 1) + 1)  # (label, bin) pairs + the dump bin
    if programs is None:  # enough programs to fill the GPU, few enough that the partials stay tiny
        sms = (torch.cuda.get_device_properties(probs.device).multi_processor_count
               if probs.is_cuda else 1)
        programs = max(1, (8 * sms) // B)
    programs = max(1, min(programs, triton.cdiv(H * W, block)))
    # NOTE: bool tensors are reinterpreted as uint8 (same bytes): Triton's i1 pointers are awkward
    y = target.view(torch.uint8) if target.dtype == torch.bool else target
    # no ROI: y passed as a dummy pointer, never read when HAS_ROI=False
    r = roi.view(torch.uint8) if roi is not None else y
    r_strides = roi.stride() if roi is not None else (0, 0, 0)
    thr = threshold_values(T).to(probs.device)
    # u_0..u_{F-1} then +inf: the kernel compares p with u_e and u_{e+1} for e up to F - 1
    fine_thr = torch.cat([fine_threshold_values(F), torch.tensor([math.inf])]) if F else thr
    planes = [probs.stride()[2:], y.stride()[2:]] + ([roi.stride()[1:]] if roi is not None else [])
    # (H, W) planes contiguous: index pixels directly
    flat = all(tuple(st) == (W, 1) for st in planes)
    partial = torch.empty(B, programs, c_pad, nbins, dtype=torch.int64, device=probs.device)
    _binned_counts_kernel[(programs, B)](
        probs, y, r, thr, fine_thr.to(probs.device), partial, fine, H, W,
        *probs.stride(), *y.stride(), *r_strides,
        C=C, T=T, NBINS=nbins, C_PAD=c_pad, NFINE=F, NBINS_FINE=nbins_fine,
        HAS_ROI=roi is not None, FLAT=flat, BLOCK=block,
    )
    hist = partial.sum((0, 1))[:C, : 2 * (T + 1)].view(C, 2, T + 1)  # (C, 2, T+1)
    return _counts_from_histogram(hist, T) + (_fine_counts(fine, C, F) if F else ())


# --------------------------------------------------------------------------------------------------
# Fast CPU path: the reference's counts, rows of one image at a time, so memory is bounded by the
# chunk.
# NOTE: torch.bucketize costs ~20 ns a value on CPU (a binary search per element), slower than
# torchmetrics' own passes. A float32's top 16 bits instead name a bucket of 65536 consecutive
# floats holding at most one threshold (for T <= 256 or so), so
# bin(p) = below[bucket] + (p >= inside[bucket]): two table look-ups and one exact float32
# comparison, ~3 ns a value on one core.

@functools.lru_cache(maxsize=8)
def _bucket_tables(T):
    """For each float32 bucket (bits >> 16): #thresholds <= its smallest value, the threshold
    inside it (or inf).

    None when some bucket holds two thresholds (T in the hundreds); the fast path then falls back
    to bucketize.
    """
    thr = threshold_values(T)  # (T,)
    first = torch.arange(1 << 16, dtype=torch.int64) << 16  # bit patterns 0xXXXX0000

    def as_float(bits):  # uint32 patterns held in int64 -> float32 values
        return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)

    a, b = as_float(first), as_float(first | 0xFFFF)
    negative = first >= 1 << 31  # sign bit set: values fall as the low bits rise
    # (65536,) numeric range of each bucket
    lo, hi = torch.where(negative, b, a), torch.where(negative, a, b)
    below = (thr[None, :] <= lo[:, None]).sum(1)  # (65536,)
    inside = (lo[:, None] < thr[None, :]) & (thr[None, :] <= hi[:, None])  # (65536, T)
    if T > 256 or inside.sum(1).max() > 1:
        return None
    inf = torch.tensor(float("inf"))
    t_inside = torch.where(inside.any(1), thr[inside.to(torch.int8).argmax(1)], inf)  # (65536,)
    # uint8 bins (4x less memory traffic than int32) while every (label, bin) index and the dump
    # bin fit
    return below.to(torch.uint8 if 2 * (T + 1) < 256 else torch.int32), t_inside


def _bins(p, thr, tables):
    """(C, n) float32 without NaN or inf -> (C, n) integer bin = #{k : t_k <= p}."""
    if tables is None:
        return torch.bucketize(p, thr, right=True, out_int32=True)
    below, t_inside = tables
    # (C*n,) top 16 bits, unsigned
    bucket = (p.view(torch.int32) >> 16).bitwise_and_(0xFFFF).view(-1)
    k_bin = below.index_select(0, bucket).view_as(p)  # (C, n)
    above = p >= t_inside.index_select(0, bucket).view_as(p)  # (C, n) bool
    # bool -> uint8 is a view: no cast
    return k_bin.add_(above.view(k_bin.dtype) if k_bin.dtype == torch.uint8 else above)


def _fine_bins(p, fine_thr):
    """(C, n) float32 without NaN or +inf, (F + 1,) thresholds u_j then +inf ->
    (C, n) int32 j = #{u_j <= p}.

    floor(p F) + 1 is j give or take one (float32 rounding of p F and of u_j = j / F), so two exact
    comparisons with the thresholds on either side settle it, as in the kernel.
    """
    F = fine_thr.numel() - 1
    e = (p * F).floor_().clamp_(0, F - 1).to(torch.int32).view(-1)  # (C*n,) in 0..F-1; p < 0 -> 0
    j = (p.view(-1) >= fine_thr.index_select(0, e)).to(torch.int32).add_(e)
    j += p.view(-1) >= fine_thr.index_select(0, e.add_(1))
    return j.view_as(p)  # (C, n) in 0..F


def binned_counts_torch(probs, target, roi=None, thresholds=11, ap_bins=0, chunk=1 << 16):
    """The fast CPU path: reference_binned_counts' counts with table look-ups, `chunk` pixels (x C)
    at a time."""
    _check_inputs(probs, target, roi, thresholds, ap_bins)
    B, C, H, W = probs.shape
    T, F = thresholds, ap_bins
    device = probs.device
    thr = threshold_values(T).to(device)
    tables = _bucket_tables(T)
    if tables is not None:
        tables = tuple(t.to(device) for t in tables)
    dump = 2 * (T + 1)  # bin of the pixels outside the ROI, dropped at the end
    hist = torch.zeros(C, dump + 1, dtype=torch.int64, device=device)
    if F:
        # (F + 1,): u_0..u_{F-1} then +inf
        fine_thr = torch.cat([fine_threshold_values(F), torch.tensor([math.inf])]).to(device)
        fine_dump = 2 * (F + 1)
        hist_fine = torch.zeros(C, fine_dump + 1, dtype=torch.int64, device=device)
    rows = max(1, chunk // max(W, 1))  # image rows per chunk
    for b in range(B):
        for h0 in range(0, H, rows):
            src = probs[b, :, h0:h0 + rows].reshape(C, -1)  # (C, n), a view when the layout allows
            # NOTE: `NaN >= t` is False, so NaN belongs below every threshold; +inf above every one
            if src.dtype == torch.float32 and src.is_contiguous():
                p = torch.nan_to_num(src, nan=-1.0, posinf=2.0)  # the one copy of the chunk
            # float16/bfloat16, channels_last, strided: one contiguous float32 copy, cleaned in
            # place
            else:
                p = torch.empty(src.shape, dtype=torch.float32, device=device).copy_(src)
                p.nan_to_num_(nan=-1.0, posinf=2.0)
            k_bin = _bins(p, thr, tables)  # (C, n) in 0..T
            y = target[b, :, h0:h0 + rows].reshape(C, -1)  # (C, n)
            y = y if y.dtype == torch.bool else y != 0
            outside = (None if roi is None
                       else ~roi[b, h0:h0 + rows].reshape(1, -1))  # (1, n)
            if F:  # the fine (label, j) index from the same chunk: (C, n) in 0..2F+1
                j = _fine_bins(p, fine_thr).add_(y, alpha=F + 1)
                if outside is not None:
                    j.masked_fill_(outside, fine_dump)
                for c in range(C):
                    hist_fine[c] += torch.bincount(j[c], minlength=fine_dump + 1)
            if k_bin.dtype == torch.uint8:  # bool -> uint8 is a free view; add_ would cast a copy
                y = y.view(torch.uint8)
            k_bin.add_(y, alpha=T + 1)  # (C, n) index of (label, bin)
            if outside is not None:
                k_bin.masked_fill_(outside, dump)
            for c in range(C):
                hist[c] += torch.bincount(k_bin[c], minlength=dump + 1)
    counts = _counts_from_histogram(hist[:, :dump].view(C, 2, T + 1), T)
    if not F:
        return counts
    return counts + _counts_from_histogram(hist_fine[:, :fine_dump].view(C, 2, F + 1), F)[:2]


def binned_counts(probs, target, roi=None, thresholds=11, ap_bins=0):
    """tp (C, T), fp (C, T), pos (C,) int64 for p >= float32 linspace(0, 1, T); Triton on CUDA, the
    CPU path elsewhere.

    probs (B, C, H, W) float32/float16/bfloat16, target (B, C, H, W) bool/uint8, roi (B, H, W) bool
    or None (pixels outside it are not counted). ap_bins = F > 0 (evaluation: AP_BINS) also returns
    tp_fine (C, F), fp_fine (C, F) for p >= u_j = j / F (float32), counted in the same pass; the
    first three results are the same for every ap_bins. Counts add across batches: accumulate, then
    call pr_metrics once.
    Definition: reference_binned_counts and docs/PROTOCOL.md ("Evaluation protocol").
    """
    _check_inputs(probs, target, roi, thresholds, ap_bins)
    if probs.is_cuda and triton is not None:
        return binned_counts_triton(probs, target, roi, thresholds, ap_bins)
    return binned_counts_torch(probs, target, roi, thresholds, ap_bins)
