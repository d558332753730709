"""Binned confusion counts for the IDRiD-style AUPR: one pass, every threshold and lesion at once.

    from kernels import binned_counts
    tp, fp, pos = binned_counts(probs, target, roi)     # (C, 11), (C, 11), (C,) int64; p >= t_k
    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py
    python bench/bench_metrics.py --images 4 --size 1536

Definition (../shared/REFERENCE.md, "Evaluation protocol"), for lesion c and t_k = float32 linspace(0, 1, T)[k]:
    TP[c, k] = #{p >= t_k, y = 1}    FP[c, k] = #{p >= t_k, y = 0}    pos[c] = #{y = 1}
counted over the pixels inside the ROI (the FOV) only. Both implementations below reduce a pixel to its bin
= #{k : t_k <= p} (0..T) and build a (C, 2, T+1) histogram of (label, bin); a reverse cumulative sum turns
it into the counts, so no (pixels x thresholds) tensor ever exists. Probabilities are upcast to float32 and
compared with the float32 thresholds themselves (exact for float16/bfloat16); NaN counts as below every
threshold (`NaN >= t` is False); a target is positive where it is non-zero.

File layout (STYLE.md): the Triton kernel, its launcher, the torch twin that defines correctness, and
`binned_counts`, which takes Triton for CUDA tensors and the twin elsewhere.
"""
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # NOTE: triton ships for Linux x86_64 only (requirements.txt); the twin serves elsewhere
    triton = None

PROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.bool, torch.uint8)


def threshold_values(n=11):
    """The protocol's thresholds: float32 linspace(0, 1, n), always built on the CPU (one definition)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"thresholds must be an integer >= 2, got {n!r}")
    return torch.linspace(0, 1, n, dtype=torch.float32)


def _check_inputs(probs, target, roi, thresholds):
    """One-line ValueErrors for the shapes, dtypes and devices binned_counts accepts."""
    threshold_values(thresholds)
    if not isinstance(probs, torch.Tensor) or probs.ndim != 4:
        raise ValueError(f"probs must be a (B, C, H, W) tensor, got {getattr(probs, 'shape', type(probs))}")
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
        raise ValueError(f"probs, target and roi must be on one device, got {sorted(map(str, devices))}")


def _counts_from_histogram(hist, T):
    """(C, 2, T+1) histogram of (label, bin) -> tp (C, T), fp (C, T), pos (C,), all int64."""
    # at_least[..., j] = #pixels with bin >= j; p >= t_k  <=>  bin >= k + 1 (thresholds ascend)
    at_least = hist.flip(-1).cumsum(-1).flip(-1)  # (C, 2, T+1)
    return at_least[:, 1, 1:].clone(), at_least[:, 0, 1:].clone(), at_least[:, 1, 0].clone()


# ----------------------------------------------------------------------------------------------------------
# Triton kernel: grid (programs, B); each program walks the pixels of image b with a grid stride, reads
# probabilities, targets and ROI once, and keeps a private (C, bins) histogram; the launcher sums programs.

if triton is not None:

    @triton.jit
    def _binned_counts_kernel(
        p_ptr, y_ptr, roi_ptr, thr_ptr, out_ptr,
        H, W,
        p_sb, p_sc, p_sh, p_sw,
        y_sb, y_sc, y_sh, y_sw,
        r_sb, r_sh, r_sw,
        C: tl.constexpr, T: tl.constexpr, NBINS: tl.constexpr, C_PAD: tl.constexpr,
        HAS_ROI: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        b = tl.program_id(1).to(tl.int64)  # int64 offsets: 228 maps of 4 x 1536^2 pass 2**31 elements
        HW = H * W
        DUMP: tl.constexpr = 2 * (T + 1)  # histogram bin of the pixels outside the image or the ROI
        rows = tl.arange(0, C_PAD)[:, None]  # (C_PAD, 1)
        bins = tl.arange(0, NBINS)[None, :]  # (1, NBINS)
        acc = tl.zeros((C_PAD, NBINS), dtype=tl.int64)
        for start in range(pid * BLOCK, HW, nprog * BLOCK):
            # (BLOCK,) int32 (the launcher checks H * W < 2**31); a block start is a multiple of BLOCK: aligned loads
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
        out = out_ptr + (b * nprog + pid) * (C_PAD * NBINS)
        tl.store(out + rows * NBINS + bins, acc)


def binned_counts_triton(probs, target, roi=None, thresholds=11, block=1024, programs=None):
    """Launcher: CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), any strides, no copies."""
    _check_inputs(probs, target, roi, thresholds)
    if triton is None:
        raise ValueError("binned_counts_triton needs triton (pip install triton); use binned_counts_torch")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (probs.is_cuda or (probs.device.type == "cpu" and interpret)):
        raise ValueError(f"binned_counts_triton needs CUDA tensors (or CPU with TRITON_INTERPRET=1), "
                         f"got {probs.device}")
    B, C, H, W = probs.shape
    if H * W + block >= 2**31:
        raise ValueError(f"image of {H}x{W} pixels is too large for int32 pixel indices")
    T = thresholds
    hist = torch.zeros(C, 2, T + 1, dtype=torch.int64, device=probs.device)
    if probs.numel() == 0:
        return _counts_from_histogram(hist, T)
    nbins = triton.next_power_of_2(2 * (T + 1) + 1)  # (label, bin) pairs + the dump bin
    c_pad = triton.next_power_of_2(C)
    if programs is None:  # enough programs to fill the GPU, few enough that the partials stay tiny
        sms = torch.cuda.get_device_properties(probs.device).multi_processor_count if probs.is_cuda else 1
        programs = max(1, (8 * sms) // B)
    programs = max(1, min(programs, triton.cdiv(H * W, block)))
    # NOTE: bool tensors are reinterpreted as uint8 (same bytes): Triton's i1 pointers are awkward
    y = target.view(torch.uint8) if target.dtype == torch.bool else target
    r = roi.view(torch.uint8) if roi is not None else y  # y: a dummy pointer, never read when HAS_ROI=False
    r_strides = roi.stride() if roi is not None else (0, 0, 0)
    thr = threshold_values(T).to(probs.device)
    planes = [probs.stride()[2:], y.stride()[2:]] + ([roi.stride()[1:]] if roi is not None else [])
    flat = all(tuple(st) == (W, 1) for st in planes)  # (H, W) planes contiguous: index pixels directly
    partial = torch.empty(B, programs, c_pad, nbins, dtype=torch.int64, device=probs.device)
    _binned_counts_kernel[(programs, B)](
        probs, y, r, thr, partial, H, W,
        *probs.stride(), *y.stride(), *r_strides,
        C=C, T=T, NBINS=nbins, C_PAD=c_pad, HAS_ROI=roi is not None, FLAT=flat, BLOCK=block,
    )
    hist = partial.sum((0, 1))[:C, : 2 * (T + 1)].view(C, 2, T + 1)  # (C, 2, T+1)
    return _counts_from_histogram(hist, T)


# ----------------------------------------------------------------------------------------------------------
# Torch twin: the definition of correctness. Rows of one image at a time, so memory is bounded by the chunk.
# NOTE: torch.bucketize costs ~20 ns a value on CPU (a binary search per element), slower than torchmetrics'
# own passes. A float32's top 16 bits instead name a bucket of 65536 consecutive floats holding at most one
# threshold (for T <= 256 or so), so bin(p) = below[bucket] + (p >= inside[bucket]): two table look-ups and
# one exact float32 comparison, ~3 ns a value on one core.

@functools.lru_cache(maxsize=8)
def _bucket_tables(T):
    """For each float32 bucket (bits >> 16): #thresholds <= its smallest value, the threshold inside it (or inf).

    None when some bucket holds two thresholds (T in the hundreds); the twin then falls back to bucketize.
    """
    thr = threshold_values(T)  # (T,)
    first = torch.arange(1 << 16, dtype=torch.int64) << 16  # bit patterns 0xXXXX0000

    def as_float(bits):  # uint32 patterns held in int64 -> float32 values
        return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)

    a, b = as_float(first), as_float(first | 0xFFFF)
    negative = first >= 1 << 31  # sign bit set: values fall as the low bits rise
    lo, hi = torch.where(negative, b, a), torch.where(negative, a, b)  # (65536,) numeric range of each bucket
    below = (thr[None, :] <= lo[:, None]).sum(1)  # (65536,)
    inside = (lo[:, None] < thr[None, :]) & (thr[None, :] <= hi[:, None])  # (65536, T)
    if T > 256 or inside.sum(1).max() > 1:
        return None
    inf = torch.tensor(float("inf"))
    t_inside = torch.where(inside.any(1), thr[inside.to(torch.int8).argmax(1)], inf)  # (65536,)
    # uint8 bins (4x less memory traffic than int32) while every (label, bin) index and the dump bin fit
    return below.to(torch.uint8 if 2 * (T + 1) < 256 else torch.int32), t_inside


def _bins(p, thr, tables):
    """(C, n) float32 without NaN or inf -> (C, n) integer bin = #{k : t_k <= p}."""
    if tables is None:
        return torch.bucketize(p, thr, right=True, out_int32=True)
    below, t_inside = tables
    bucket = (p.view(torch.int32) >> 16).bitwise_and_(0xFFFF).view(-1)  # (C*n,) top 16 bits, unsigned
    k_bin = below.index_select(0, bucket).view_as(p)  # (C, n)
    above = p >= t_inside.index_select(0, bucket).view_as(p)  # (C, n) bool
    return k_bin.add_(above.view(k_bin.dtype) if k_bin.dtype == torch.uint8 else above)  # a view: no cast


def binned_counts_torch(probs, target, roi=None, thresholds=11, chunk=1 << 16):
    """Same counts as the kernel with plain torch ops, `chunk` pixels (x C lesions) at a time."""
    _check_inputs(probs, target, roi, thresholds)
    B, C, H, W = probs.shape
    T = thresholds
    device = probs.device
    thr = threshold_values(T).to(device)
    tables = _bucket_tables(T)
    if tables is not None:
        tables = tuple(t.to(device) for t in tables)
    dump = 2 * (T + 1)  # bin of the pixels outside the ROI, dropped at the end
    hist = torch.zeros(C, dump + 1, dtype=torch.int64, device=device)
    rows = max(1, chunk // max(W, 1))
    for b in range(B):
        for h0 in range(0, H, rows):
            src = probs[b, :, h0:h0 + rows].reshape(C, -1)  # (C, n), a view when the layout allows
            # NOTE: `NaN >= t` is False, so NaN belongs below every threshold; +inf above every one
            if src.dtype == torch.float32 and src.is_contiguous():
                p = torch.nan_to_num(src, nan=-1.0, posinf=2.0)  # the one copy of the chunk
            else:  # float16/bfloat16, channels_last, strided: one contiguous float32 copy, cleaned in place
                p = torch.empty(src.shape, dtype=torch.float32, device=device).copy_(src)
                p.nan_to_num_(nan=-1.0, posinf=2.0)
            k_bin = _bins(p, thr, tables)  # (C, n) in 0..T
            y = target[b, :, h0:h0 + rows].reshape(C, -1)  # (C, n)
            y = y if y.dtype == torch.bool else y != 0
            if k_bin.dtype == torch.uint8:  # bool -> uint8 is a free view; add_ would cast a copy
                y = y.view(torch.uint8)
            k_bin.add_(y, alpha=T + 1)  # (C, n) index of (label, bin)
            if roi is not None:
                k_bin.masked_fill_(~roi[b, h0:h0 + rows].reshape(1, -1), dump)
            for c in range(C):
                hist[c] += torch.bincount(k_bin[c], minlength=dump + 1)
    return _counts_from_histogram(hist[:, :dump].view(C, 2, T + 1), T)


def binned_counts(probs, target, roi=None, thresholds=11):
    """tp (C, T), fp (C, T), pos (C,) int64 for p >= float32 linspace(0, 1, T); Triton on CUDA, torch elsewhere.

    probs (B, C, H, W) float32/float16/bfloat16, target (B, C, H, W) bool/uint8, roi (B, H, W) bool or None
    (pixels outside it are not counted). Counts add across batches: accumulate, then call pr_metrics once.
    """
    _check_inputs(probs, target, roi, thresholds)
    if probs.is_cuda and triton is not None:
        return binned_counts_triton(probs, target, roi, thresholds)
    return binned_counts_torch(probs, target, roi, thresholds)
