"""kernels/: reference vs brute force and Python loops; Triton kernel (interpreted on CPU) and fast
CPU path vs the reference; pr_metrics vs the formula, hand-computed numbers and sklearn.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py
    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py -k pr_metrics
"""
import importlib.util
import itertools
import math
import sys

import pytest
import torch

from kernels import (AP_BINS, binned_counts, binned_counts_torch, binned_counts_triton, pr_metrics,
                     reference_binned_counts)

HAS_TRITON = importlib.util.find_spec("triton") is not None  # Linux x86_64 only (requirements.txt)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


# --------------------------------------------------------------------------------------- references

def protocol_thresholds(T):
    """docs/PROTOCOL.md: t_k = float32 linspace(0, 1, T)[k] (written out here, not imported from
    kernels)."""
    return torch.linspace(0, 1, T, dtype=torch.float32)


def fine_thresholds(F):
    """The AP curve's u_j = j / F as float32, from Python's float64 j / F (never near a float32
    tie: exact)."""
    return torch.tensor([j / F for j in range(F)], dtype=torch.float32)


def brute_at(probs, target, roi, t):
    """(p >= t_k) for every pixel and threshold at once: fine on the tiny inputs of these tests."""
    ge = probs.float()[..., None] >= t  # (B, C, H, W, T)
    y = (target != 0)[..., None]
    keep = torch.ones_like(ge[:, :1, :, :, :1]) if roi is None else roi[:, None, :, :, None]
    tp = (ge & y & keep).sum((0, 2, 3))
    fp = (ge & ~y & keep).sum((0, 2, 3))
    pos = (y & keep).sum((0, 2, 3, 4))
    return tp, fp, pos


def brute_counts(probs, target, roi=None, T=11):
    return brute_at(probs, target, roi, protocol_thresholds(T))


def brute_fine(probs, target, roi=None, F=AP_BINS):
    """tp_fine (C, F), fp_fine (C, F) by brute force."""
    return brute_at(probs, target, roi, fine_thresholds(F))[:2]


def loop_counts(probs, target, roi, t):
    """Pixel by pixel, threshold by threshold, in Python floats: the slowest, most obvious count."""
    B, C, H, W = probs.shape
    p, y, t = probs.float().tolist(), target.tolist(), t.tolist()
    tp, fp, pos = [[0] * len(t) for _ in range(C)], [[0] * len(t) for _ in range(C)], [0] * C
    for b, c, h, w in itertools.product(range(B), range(C), range(H), range(W)):
        if roi is not None and not roi[b, h, w]:
            continue
        value, positive = p[b][c][h][w], y[b][c][h][w] != 0
        pos[c] += positive
        for k, t_k in enumerate(t):
            # a float32 value and threshold, both exact as Python floats; NaN: False
            if value >= t_k:
                (tp if positive else fp)[c][k] += 1
    return torch.tensor(tp), torch.tensor(fp), torch.tensor(pos)


def reference_metrics(tp, fp, pos, k_half=5):
    """The docs/PROTOCOL.md formula with plain Python floats (float64) and loops, lesion by
    lesion."""
    aupr, dice = [], []
    for tp_c, fp_c, P in zip(tp.tolist(), fp.tolist(), pos.tolist()):
        if P == 0:
            aupr.append(math.nan)
            dice.append(math.nan)
            continue
        prec = [t / (t + f) if t + f > 0 else 1.0 for t, f in zip(tp_c, fp_c)] + [1.0]
        rec = [t / P for t in tp_c] + [0.0]
        aupr.append(sum((rec[k] - rec[k + 1]) * (prec[k] + prec[k + 1]) / 2
                        for k in range(len(tp_c))))
        t, f = tp_c[k_half], fp_c[k_half]
        dice.append(2 * t / (2 * t + f + (P - t)))
    return aupr, dice


def edge_values(dtype, t=None):
    """Probabilities exactly on the thresholds, their float32 neighbours and their neighbours in
    `dtype`."""
    t = protocol_thresholds(11) if t is None else t
    vals = [t, t.nextafter(torch.tensor(2.0)), t.nextafter(torch.tensor(-2.0))]
    if dtype in (torch.float16, torch.bfloat16):
        bits = t.to(dtype).view(torch.int16)
        # rounded thresholds and next values
        vals += [(bits + d).view(dtype).float() for d in (-1, 0, 1)]
    extra = torch.tensor([0.0, -0.0, 1.0, -1e-3, 1.5])
    return torch.cat(vals + [extra]).to(dtype)


def random_case(shape=(2, 4, 37, 29), dtype=torch.float32, layout="contiguous", roi="mask", seed=0,
                fine=None):
    """Probabilities with edge values planted, bool targets and an ROI, in the requested memory
    layout.

    fine=F also plants (a random subset of) the F fine thresholds and their neighbours on other
    pixels."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    probs = torch.rand(shape, generator=g).to(dtype)
    edges = edge_values(dtype)
    perm = torch.randperm(probs.numel(), generator=g)
    where = perm[: min(probs.numel() // 2, 20 * edges.numel())]
    probs.view(-1)[where] = edges.repeat(20)[: where.numel()]
    target = torch.rand(shape, generator=g) < 0.3
    mask = {"none": None, "mask": torch.rand(B, H, W, generator=g) < 0.7,
            "empty": torch.zeros(B, H, W, dtype=torch.bool)}[roi]
    if fine is not None:  # pixels not yet planted; a random choice of the fine edges
        fine_edges = edge_values(dtype, fine_thresholds(fine))
        free = perm[where.numel():][: probs.numel() // 3]
        probs.view(-1)[free] = fine_edges[torch.randint(0, fine_edges.numel(), free.shape,
                                                        generator=g)]
    if layout == "channels_last":
        probs = probs.contiguous(memory_format=torch.channels_last)
        target = target.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # H and W swapped in memory; a view skipping every other channel
        probs = probs.transpose(2, 3).contiguous().transpose(2, 3)
        target = torch.cat([target, target], dim=1)[:, ::2]
        mask = None if mask is None else mask.transpose(1, 2).contiguous().transpose(1, 2)
        assert not probs.is_contiguous() and not target.is_contiguous()
    return probs, target, mask


def assert_counts_equal(got, want):
    assert len(got) == len(want), f"{len(got)} results, expected {len(want)}"
    for name, a, b in zip(("tp", "fp", "pos", "tp_fine", "fp_fine"), got, want):
        assert a.dtype == torch.int64, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: {a.tolist()} != {b.tolist()}"


# ----------------------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("F", [AP_BINS, 1000, 3])
@pytest.mark.parametrize("roi", ["none", "mask"])
def test_reference_matches_python_loops(F, roi):
    """The definition, checked against the slowest possible count (values on both sets of
    thresholds)."""
    probs, target, mask = random_case((2, 2, 5, 7), roi=roi, seed=11, fine=F)
    got = reference_binned_counts(probs, target, mask, ap_bins=F)
    want = loop_counts(probs, target, mask, protocol_thresholds(11))
    assert_counts_equal(got, want + loop_counts(probs, target, mask, fine_thresholds(F))[:2])


def test_fine_thresholds_are_j_over_F():
    from kernels import fine_threshold_values

    for F in (AP_BINS, 1000, 7):
        assert torch.equal(fine_threshold_values(F), fine_thresholds(F))
    # exact j / 1024
    assert fine_thresholds(AP_BINS).double().mul(AP_BINS).tolist() == list(range(AP_BINS))


# ------------------------------------------------------------------------------------ binned_counts

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("roi", ["none", "mask"])
def test_fast_path_and_kernel_match_reference_and_brute_force(dtype, layout, roi):
    probs, target, mask = random_case(dtype=dtype, layout=layout, roi=roi)
    want = brute_counts(probs, target, mask)
    assert_counts_equal(reference_binned_counts(probs, target, mask), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, chunk=64), want)  # 2 rows a chunk
    # CPU: the public function takes the CPU path
    assert_counts_equal(binned_counts(probs, target, mask), want)
    if HAS_TRITON:
        # 37 x 29 = 1073 pixels: not a multiple of the block; 2 programs an image walk the
        # grid-stride loop
        assert_counts_equal(binned_counts_triton(probs, target, mask, block=256, programs=2), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("roi", ["none", "mask"])
def test_fine_counts_match_reference_and_brute_force(dtype, layout, roi):
    """ap_bins = AP_BINS: fine counts right at the fine thresholds; the 11-threshold counts
    unchanged."""
    probs, target, mask = random_case(dtype=dtype, layout=layout, roi=roi, seed=12, fine=AP_BINS)
    coarse = brute_counts(probs, target, mask)
    want = reference_binned_counts(probs, target, mask, ap_bins=AP_BINS)
    assert_counts_equal(want, coarse + brute_fine(probs, target, mask))
    assert_counts_equal(binned_counts_torch(probs, target, mask, ap_bins=AP_BINS), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, ap_bins=AP_BINS, chunk=64), want)
    assert_counts_equal(binned_counts(probs, target, mask, ap_bins=AP_BINS), want)
    assert_counts_equal(binned_counts(probs, target, mask), coarse)
    if HAS_TRITON:  # 1073 pixels in blocks of 512: 2 programs, one of them loops twice
        assert_counts_equal(binned_counts_triton(probs, target, mask, ap_bins=AP_BINS, block=512,
                                                 programs=2), want)


@needs_triton
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 1, 16, 16), (1, 5, 9, 130)])
def test_kernel_odd_shapes_uint8_targets(shape):
    """C not a power of two, a single lesion, W wider than the block; uint8 targets; chunk
    narrower than W; 1000 fine thresholds (not binary fractions: the rounding fix-up at work)."""
    probs, target, mask = random_case(shape, roi="mask", seed=1)
    target = target.to(torch.uint8)
    want = brute_counts(probs, target, mask)
    assert_counts_equal(binned_counts_triton(probs, target, mask, block=64), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, chunk=50), want)
    probs, target, mask = random_case(shape, roi="mask", seed=1, fine=1000)
    target = target.to(torch.uint8)
    want = reference_binned_counts(probs, target, mask, ap_bins=1000)
    assert_counts_equal(want, brute_counts(probs, target, mask)
                        + brute_fine(probs, target, mask, 1000))
    assert_counts_equal(binned_counts_triton(probs, target, mask, ap_bins=1000, block=256), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, ap_bins=1000, chunk=50), want)


@pytest.mark.parametrize("T", [2, 5, 21, 150, 1001])
def test_other_threshold_counts(T):
    """Any linspace size: 150 needs int32 bins in the fast path; 1001 puts several thresholds in
    one float bucket (the fast path's bucketize fallback)."""
    probs, target, mask = random_case((1, 2, 13, 11), seed=T)
    probs.view(-1)[:T] = protocol_thresholds(T)[: probs.numel()]
    want = brute_counts(probs, target, mask, T)
    assert_counts_equal(reference_binned_counts(probs, target, mask, T), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, T), want)
    if T <= 21 and HAS_TRITON:
        assert_counts_equal(binned_counts_triton(probs, target, mask, T, block=64), want)


@pytest.mark.parametrize("F", [1, 2, 7, 999, 4096])
def test_other_fine_bin_counts(F):
    """Any number of fine thresholds up to 4096, every one of them planted exactly; T = 5 beside
    them."""
    probs, target, mask = random_case((1, 2, 13, 11), seed=F, fine=F)
    want = brute_counts(probs, target, mask, 5) + brute_fine(probs, target, mask, F)
    assert_counts_equal(reference_binned_counts(probs, target, mask, 5, ap_bins=F), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, 5, ap_bins=F), want)
    if F <= 999 and HAS_TRITON:
        assert_counts_equal(binned_counts_triton(probs, target, mask, 5, ap_bins=F, block=128),
                            want)


def test_nonfinite_and_nonbinary_values():
    """NaN fails every `p >= t`; +-inf and values outside [0, 1] act as the nearest end; uint8
    255 is positive."""
    probs = torch.tensor([float("nan"), float("inf"), -float("inf"),
                          2.0, -0.5, -0.0]).view(1, 1, 2, 3)
    target = torch.tensor([1, 255, 0, 1, 1, 0], dtype=torch.uint8).view(1, 1, 2, 3)
    want = brute_counts(probs, target)
    assert want[0][0].tolist() == [2] * 11 and want[2].tolist() == [4]  # inf and 2.0 of 4 positives
    assert want[1][0].tolist() == [1] + [0] * 10  # -0.0 >= 0.0
    assert_counts_equal(binned_counts_torch(probs, target), want)
    assert_counts_equal(reference_binned_counts(probs, target), want)
    fine = brute_fine(probs, target)
    assert fine[0][0].tolist() == [2] * AP_BINS and fine[1][0].tolist() == [1] + [0] * (AP_BINS - 1)
    assert_counts_equal(reference_binned_counts(probs, target, ap_bins=AP_BINS), want + fine)
    assert_counts_equal(binned_counts_torch(probs, target, ap_bins=AP_BINS), want + fine)
    if HAS_TRITON:
        assert_counts_equal(binned_counts_triton(probs, target, block=16), want)
        assert_counts_equal(binned_counts_triton(probs, target, ap_bins=AP_BINS, block=16),
                            want + fine)


@pytest.mark.parametrize("roi", ["none", "empty"])
def test_empty_targets_and_empty_roi(roi):
    probs, target, mask = random_case((2, 4, 11, 9), roi=roi, seed=3)
    target = torch.zeros_like(target)
    tp, fp, pos = binned_counts_torch(probs, target, mask)
    assert tp.sum() == 0 and pos.sum() == 0
    assert_counts_equal((tp, fp, pos), brute_counts(probs, target, mask))
    want = (tp, fp, pos) + brute_fine(probs, target, mask)
    assert_counts_equal(reference_binned_counts(probs, target, mask, ap_bins=AP_BINS), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, ap_bins=AP_BINS), want)
    if HAS_TRITON:
        assert_counts_equal(binned_counts_triton(probs, target, mask, block=32), (tp, fp, pos))
        assert_counts_equal(binned_counts_triton(probs, target, mask, ap_bins=AP_BINS, block=128),
                            want)


def test_counts_add_across_batches():
    probs, target, mask = random_case((4, 4, 19, 17), seed=4)
    whole = binned_counts(probs, target, mask)
    parts = [binned_counts(probs[i:i + 1], target[i:i + 1], mask[i:i + 1]) for i in range(4)]
    for k in range(3):
        assert torch.equal(whole[k], sum(p[k] for p in parts))
    whole = binned_counts(probs, target, mask, ap_bins=AP_BINS)
    parts = [binned_counts(probs[i:i + 1], target[i:i + 1], mask[i:i + 1], ap_bins=AP_BINS)
             for i in range(4)]
    for k in range(5):
        assert torch.equal(whole[k], sum(p[k] for p in parts))


def test_empty_batch_gives_zero_counts():
    probs = torch.rand(0, 4, 8, 8)
    tp, fp, pos = binned_counts(probs, probs > 0.5)
    assert tp.shape == (4, 11) and fp.shape == (4, 11) and pos.shape == (4,) and tp.sum() == 0
    counts = binned_counts(probs, probs > 0.5, ap_bins=AP_BINS)
    assert [tuple(c.shape) for c in counts] == [(4, 11), (4, 11), (4,), (4, AP_BINS), (4, AP_BINS)]
    assert sum(c.sum() for c in counts) == 0
    assert_counts_equal(reference_binned_counts(probs, probs > 0.5, ap_bins=AP_BINS), counts)
    if HAS_TRITON:
        assert_counts_equal(binned_counts_triton(probs, probs > 0.5, ap_bins=AP_BINS), counts)


@pytest.mark.parametrize("call, message", [
    (lambda p, y, r: binned_counts(p[0], y[0], None), "(B, C, H, W)"),
    (lambda p, y, r: binned_counts(p.double(), y, r), "float32, float16 or bfloat16"),
    (lambda p, y, r: binned_counts(p, y.float(), r), "bool or uint8"),
    (lambda p, y, r: binned_counts(p, y[:, :2], r), "shape of probs"),
    (lambda p, y, r: binned_counts(p, y, r[:, :3]), "roi must be a (B, H, W)"),
    (lambda p, y, r: binned_counts(p, y, r.to(torch.uint8)), "roi must be bool"),
    (lambda p, y, r: binned_counts(p, y, r, thresholds=1), "thresholds must be an integer >= 2"),
    (lambda p, y, r: binned_counts(p, y, r, ap_bins=-1), "ap_bins must be 0"),
    (lambda p, y, r: binned_counts(p, y, r, ap_bins=4097), "ap_bins must be 0"),
    (lambda p, y, r: binned_counts(p, y, r, ap_bins=10.5), "ap_bins must be 0"),
    (lambda p, y, r: reference_binned_counts(p, y.float(), r), "bool or uint8"),
])
def test_bad_inputs_raise_one_line_value_errors(call, message):
    probs, target, mask = random_case((1, 4, 6, 6))
    with pytest.raises(ValueError) as err:
        call(probs, target, mask)
    assert message in str(err.value) and "\n" not in str(err.value)


@needs_triton
def test_launcher_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    probs, target, mask = random_case((1, 4, 6, 6))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        binned_counts_triton(probs, target, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_matches_fast_path_on_full_size_maps(monkeypatch):
    # the module (kernels.binned_counts is also the function's name)
    bc = sys.modules["kernels.binned_counts"]

    probs, target, mask = random_case((2, 4, 1536, 1536), dtype=torch.float16,
                                      layout="channels_last", seed=5, fine=AP_BINS)
    want = binned_counts_torch(probs, target, mask, ap_bins=AP_BINS)
    # the reference on the GPU (bucketize is fast there): the CPU path's counts are the definition's
    assert_counts_equal(reference_binned_counts(probs.cuda(), target.cuda(), mask.cuda(),
                                                ap_bins=AP_BINS), want)

    def no_fast_path(*args, **kwargs):
        raise AssertionError("binned_counts fell back to the CPU path on CUDA tensors")

    # the public function must take Triton on CUDA
    monkeypatch.setattr(bc, "binned_counts_torch", no_fast_path)
    for p in (probs, probs.contiguous()):  # channels_last and plain NCHW
        got = binned_counts(p.cuda(), target.cuda(), mask.cuda())
        assert_counts_equal(got, want[:3])
        got = binned_counts(p.cuda(), target.cuda(), mask.cuda(), ap_bins=AP_BINS)
        assert_counts_equal(got, want)


# --------------------------------------------------------------------------------------- pr_metrics

def test_pr_metrics_matches_the_formula_and_sklearn():
    from sklearn.metrics import f1_score

    probs, target, mask = random_case((3, 4, 23, 21), seed=6)
    # lesion 1: nothing predicted at t >= 0.8 (Prec = 1 there)
    probs[:, 1] = probs[:, 1].clamp(0, 1) * 0.75
    probs[:, 2] = probs[:, 2] * 0.2 + 0.8 * target[:, 2]  # lesion 2: a good prediction
    tp, fp, pos = binned_counts(probs, target, mask)
    assert (tp[1, 8:] + fp[1, 8:]).sum() == 0
    got = pr_metrics(tp, fp, pos)
    aupr, dice = reference_metrics(tp, fp, pos)
    assert got["aupr"].dtype == torch.float64 and got["dice"].dtype == torch.float64
    assert got["aupr"].tolist() == pytest.approx(aupr, rel=1e-12, abs=1e-15)
    assert got["dice"].tolist() == pytest.approx(dice, rel=1e-12, abs=1e-15)
    for c in range(4):  # Dice = F1 of (p >= 0.5) over the pooled ROI pixels
        y = target[:, c][mask].numpy()
        pred = (probs[:, c][mask] >= 0.5).numpy()
        assert got["dice"][c].item() == pytest.approx(f1_score(y, pred), rel=1e-12)
    # the fine counts add "ap" and leave every other number as it was, to the bit
    with_ap = pr_metrics(*binned_counts(probs, target, mask, ap_bins=AP_BINS))
    assert (set(with_ap) == {"aupr", "aupr_floor", "dice", "ap"}
            and with_ap["ap"].dtype == torch.float64)
    for name in ("aupr", "aupr_floor", "dice"):
        assert torch.equal(with_ap[name], got[name]), name


def test_perfect_prediction_scores_one():
    _, target, mask = random_case((2, 4, 16, 16), seed=7)
    m = pr_metrics(*binned_counts(target.float(), target, mask))
    assert m["aupr"].tolist() == pytest.approx([1.0] * 4, abs=1e-15)
    assert m["dice"].tolist() == pytest.approx([1.0] * 4, abs=1e-15)
    m = pr_metrics(*binned_counts(target.float(), target, mask, ap_bins=AP_BINS))
    assert m["ap"].tolist() == [1.0] * 4


def test_all_zero_prediction():
    """Only t = 0 predicts anything: AUPR = (1 + prevalence) / 2 (the (1, P/N) -> (0, 1)
    trapezoid), Dice 0."""
    _, target, mask = random_case((2, 4, 16, 16), seed=8)
    tp, fp, pos = binned_counts(torch.zeros(target.shape), target, mask)
    m = pr_metrics(tp, fp, pos)
    prevalence = pos.double() / mask.sum()
    assert m["aupr"].tolist() == pytest.approx(((1 + prevalence) / 2).tolist(), rel=1e-12)
    assert m["dice"].tolist() == [0.0] * 4


def test_aupr_floor_is_the_all_zero_maps_aupr():
    """aupr_floor of any map = (1 + prevalence) / 2 by hand = the AUPR an all-zero map gets on
    those pixels."""
    probs, target, mask = random_case((2, 4, 16, 16), seed=13)
    m = pr_metrics(*binned_counts(probs.clamp(0, 1), target, mask))
    prevalence = [(target[:, c] & mask).sum().item() / mask.sum().item() for c in range(4)]
    assert m["aupr_floor"].tolist() == pytest.approx([(1 + p) / 2 for p in prevalence], rel=1e-12)
    blank = pr_metrics(*binned_counts(torch.zeros(probs.shape), target, mask))
    assert m["aupr_floor"].tolist() == pytest.approx(blank["aupr"].tolist(), rel=1e-12)
    # by hand: 3 lesion pixels of 100 -> (1 + 0.03) / 2; the map's own counts do not matter
    # beyond t_0
    tp = torch.tensor([[3, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0]])
    fp = torch.tensor([[97, 50, 9, 4, 2, 1, 0, 0, 0, 0, 0]])
    assert (pr_metrics(tp, fp, torch.tensor([3]))["aupr_floor"].item()
            == pytest.approx(0.515, rel=1e-15))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("separation", [1.0, 2.0, 4.0])
def test_ap_agrees_with_sklearn_on_continuous_maps(seed, separation):
    """Rare lesions (1% of the pixels), sigmoid scores from weak to strong: within 1e-3 of the
    unbinned AP.

    (Measured: the binned AP sits 0.0001-0.0006 below it, the ties that 1024 bins create.)"""
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(seed)
    # ~1200 lesion pixels: little sampling noise
    target = torch.rand(2, 2, 256, 256, generator=g) < 0.01
    probs = torch.sigmoid(torch.randn(target.shape, generator=g) + separation * target - 2)
    mask = torch.rand(2, 256, 256, generator=g) < 0.9
    ap = pr_metrics(*binned_counts(probs, target, mask, ap_bins=AP_BINS))["ap"]
    want = [average_precision_score(target[:, c][mask].numpy(), probs[:, c][mask].numpy())
            for c in range(2)]
    assert ap.tolist() == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("value", [0.0, 0.3, 257 / AP_BINS, 0.999, 1.0])
def test_ap_of_a_constant_map_is_the_prevalence(value):
    from sklearn.metrics import average_precision_score

    _, target, mask = random_case((2, 4, 16, 16), seed=14)
    m = pr_metrics(*binned_counts(torch.full(target.shape, value), target, mask, ap_bins=AP_BINS))
    prevalence = [(target[:, c] & mask).sum().item() / mask.sum().item() for c in range(4)]
    # exactly: (1 - 0) x TP / (TP + FP) at the last threshold <= value
    assert m["ap"].tolist() == prevalence
    sk = [average_precision_score(target[:, c][mask].numpy(),
                                  torch.full(target.shape, value)[:, c][mask].numpy())
          for c in range(4)]
    assert m["ap"].tolist() == pytest.approx(sk, rel=1e-12)


def test_absent_lesion_is_nan_and_others_are_not():
    probs, target, mask = random_case((2, 4, 16, 16), seed=9)
    target[:, 3] = False  # CWS absent from the whole set
    m = pr_metrics(*binned_counts(probs, target, mask))
    assert math.isnan(m["aupr"][3]) and math.isnan(m["dice"][3])
    assert not m["aupr"][:3].isnan().any() and not m["dice"][:3].isnan().any()
    m = pr_metrics(*binned_counts(probs, target, mask, ap_bins=AP_BINS))
    for name in ("aupr", "aupr_floor", "ap", "dice"):
        assert math.isnan(m[name][3]) and not m[name][:3].isnan().any(), name


def test_pr_metrics_of_summed_batches_equals_pooled():
    probs, target, mask = random_case((4, 4, 19, 17), seed=10)
    total = [sum(x) for x in zip(*(binned_counts(probs[i:i + 1], target[i:i + 1], mask[i:i + 1])
                                    for i in range(4)))]
    aupr, dice = reference_metrics(*brute_counts(probs, target, mask))
    got = pr_metrics(*total)
    assert got["aupr"].tolist() == pytest.approx(aupr, rel=1e-12)
    assert got["dice"].tolist() == pytest.approx(dice, rel=1e-12)


def test_ap_matches_the_step_rule_by_hand():
    """Two fine thresholds, counts written out: (R, P) = (1, 4/10), (1/2, 2/3), then R_2 = 0."""
    tp, fp, pos = torch.tensor([[4] * 11]), torch.tensor([[6] * 11]), torch.tensor([4])
    m = pr_metrics(tp, fp, pos, torch.tensor([[4, 2]]), torch.tensor([[6, 1]]))
    assert m["ap"].item() == pytest.approx((1 - 0.5) * 0.4 + (0.5 - 0) * 2 / 3, rel=1e-15)


def test_pr_metrics_bad_inputs():
    tp = torch.zeros(4, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="odd number of thresholds"):
        pr_metrics(tp, tp, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected tp \(C, T\)"):
        pr_metrics(tp, tp[:2], torch.ones(4, dtype=torch.int64))
    tp = torch.zeros(4, 11, dtype=torch.int64)
    with pytest.raises(ValueError, match="both tp_fine and fp_fine"):
        pr_metrics(tp, tp, torch.ones(4, dtype=torch.int64), tp_fine=tp)
    with pytest.raises(ValueError, match=r"expected tp_fine \(C, F\)"):
        pr_metrics(tp, tp, torch.ones(4, dtype=torch.int64), tp[:2], tp[:2])
