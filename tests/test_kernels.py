"""kernels/: Triton kernel (interpreted on CPU) vs torch twin vs brute force; pr_metrics vs the formula, sklearn.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py
    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py -k pr_metrics
"""
import importlib.util
import math
import sys

import pytest
import torch

from kernels import binned_counts, binned_counts_torch, binned_counts_triton, pr_metrics

HAS_TRITON = importlib.util.find_spec("triton") is not None  # Linux x86_64 only (requirements.txt)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


# ---------------------------------------------------------------------------------------------- references

def protocol_thresholds(T):
    """REFERENCE.md: t_k = float32 linspace(0, 1, T)[k] (written out here, not imported from kernels)."""
    return torch.linspace(0, 1, T, dtype=torch.float32)


def brute_counts(probs, target, roi=None, T=11):
    """(p >= t_k) for every pixel and threshold at once: fine on the tiny inputs of these tests."""
    t = protocol_thresholds(T)
    ge = probs.float()[..., None] >= t  # (B, C, H, W, T)
    y = (target != 0)[..., None]
    keep = torch.ones_like(ge[:, :1, :, :, :1]) if roi is None else roi[:, None, :, :, None]
    tp = (ge & y & keep).sum((0, 2, 3))
    fp = (ge & ~y & keep).sum((0, 2, 3))
    pos = (y & keep).sum((0, 2, 3, 4))
    return tp, fp, pos


def reference_metrics(tp, fp, pos, k_half=5):
    """The REFERENCE.md formula with plain Python floats (float64) and loops, lesion by lesion."""
    aupr, dice = [], []
    for tp_c, fp_c, P in zip(tp.tolist(), fp.tolist(), pos.tolist()):
        if P == 0:
            aupr.append(math.nan)
            dice.append(math.nan)
            continue
        prec = [t / (t + f) if t + f > 0 else 1.0 for t, f in zip(tp_c, fp_c)] + [1.0]
        rec = [t / P for t in tp_c] + [0.0]
        aupr.append(sum((rec[k] - rec[k + 1]) * (prec[k] + prec[k + 1]) / 2 for k in range(len(tp_c))))
        t, f = tp_c[k_half], fp_c[k_half]
        dice.append(2 * t / (2 * t + f + (P - t)))
    return aupr, dice


def edge_values(dtype):
    """Probabilities exactly on the thresholds, their float32 neighbours and their neighbours in `dtype`."""
    t = protocol_thresholds(11)
    vals = [t, t.nextafter(torch.tensor(2.0)), t.nextafter(torch.tensor(-2.0))]
    if dtype in (torch.float16, torch.bfloat16):
        bits = t.to(dtype).view(torch.int16)
        vals += [(bits + d).view(dtype).float() for d in (-1, 0, 1)]  # rounded thresholds and next values
    extra = torch.tensor([0.0, -0.0, 1.0, -1e-3, 1.5])
    return torch.cat(vals + [extra]).to(dtype)


def random_case(shape=(2, 4, 37, 29), dtype=torch.float32, layout="contiguous", roi="mask", seed=0):
    """Probabilities with edge values planted, bool targets and an ROI, in the requested memory layout."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    probs = torch.rand(shape, generator=g).to(dtype)
    edges = edge_values(dtype)
    where = torch.randperm(probs.numel(), generator=g)[: min(probs.numel() // 2, 20 * edges.numel())]
    probs.view(-1)[where] = edges.repeat(20)[: where.numel()]
    target = torch.rand(shape, generator=g) < 0.3
    mask = {"none": None, "mask": torch.rand(B, H, W, generator=g) < 0.7,
            "empty": torch.zeros(B, H, W, dtype=torch.bool)}[roi]
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
    for name, a, b in zip(("tp", "fp", "pos"), got, want):
        assert a.dtype == torch.int64, name
        assert torch.equal(a.cpu(), b), f"{name}: {a.tolist()} != {b.tolist()}"


# ------------------------------------------------------------------------------------------ binned_counts

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("roi", ["none", "mask"])
def test_twin_and_kernel_match_brute_force(dtype, layout, roi):
    probs, target, mask = random_case(dtype=dtype, layout=layout, roi=roi)
    want = brute_counts(probs, target, mask)
    assert_counts_equal(binned_counts_torch(probs, target, mask), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, chunk=64), want)  # 2 rows a chunk
    assert_counts_equal(binned_counts(probs, target, mask), want)  # CPU: the public function takes the twin
    if HAS_TRITON:
        # 37 x 29 = 1073 pixels: not a multiple of the block; 2 programs an image walk the grid-stride loop
        assert_counts_equal(binned_counts_triton(probs, target, mask, block=256, programs=2), want)


@needs_triton
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 1, 16, 16), (1, 5, 9, 130)])
def test_kernel_odd_shapes_uint8_targets(shape):
    """C not a power of two, a single lesion, W wider than the block; uint8 targets; chunk narrower than W."""
    probs, target, mask = random_case(shape, roi="mask", seed=1)
    target = target.to(torch.uint8)
    want = brute_counts(probs, target, mask)
    assert_counts_equal(binned_counts_triton(probs, target, mask, block=64), want)
    assert_counts_equal(binned_counts_torch(probs, target, mask, chunk=50), want)


@pytest.mark.parametrize("T", [2, 5, 21, 150, 1001])
def test_other_threshold_counts(T):
    """Any linspace size: 150 needs int32 bins in the twin; 1001 puts several thresholds in one float
    bucket (the twin's bucketize fallback)."""
    probs, target, mask = random_case((1, 2, 13, 11), seed=T)
    probs.view(-1)[:T] = protocol_thresholds(T)[: probs.numel()]
    want = brute_counts(probs, target, mask, T)
    assert_counts_equal(binned_counts_torch(probs, target, mask, T), want)
    if T <= 21 and HAS_TRITON:
        assert_counts_equal(binned_counts_triton(probs, target, mask, T, block=64), want)


def test_nonfinite_and_nonbinary_values():
    """NaN fails every `p >= t`; +-inf and values outside [0, 1] act as the nearest end; uint8 255 is positive."""
    probs = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0, -0.5, -0.0]).view(1, 1, 2, 3)
    target = torch.tensor([1, 255, 0, 1, 1, 0], dtype=torch.uint8).view(1, 1, 2, 3)
    want = brute_counts(probs, target)
    assert want[0][0].tolist() == [2] * 11 and want[2].tolist() == [4]  # inf and 2.0 of 4 positives
    assert want[1][0].tolist() == [1] + [0] * 10  # -0.0 >= 0.0
    assert_counts_equal(binned_counts_torch(probs, target), want)
    if HAS_TRITON:
        assert_counts_equal(binned_counts_triton(probs, target, block=16), want)


@pytest.mark.parametrize("roi", ["none", "empty"])
def test_empty_targets_and_empty_roi(roi):
    probs, target, mask = random_case((2, 4, 11, 9), roi=roi, seed=3)
    target = torch.zeros_like(target)
    tp, fp, pos = binned_counts_torch(probs, target, mask)
    assert tp.sum() == 0 and pos.sum() == 0
    assert_counts_equal((tp, fp, pos), brute_counts(probs, target, mask))
    if HAS_TRITON:
        assert_counts_equal(binned_counts_triton(probs, target, mask, block=32), (tp, fp, pos))


def test_counts_add_across_batches():
    probs, target, mask = random_case((4, 4, 19, 17), seed=4)
    whole = binned_counts(probs, target, mask)
    parts = [binned_counts(probs[i:i + 1], target[i:i + 1], mask[i:i + 1]) for i in range(4)]
    for k in range(3):
        assert torch.equal(whole[k], sum(p[k] for p in parts))


def test_empty_batch_gives_zero_counts():
    probs = torch.rand(0, 4, 8, 8)
    tp, fp, pos = binned_counts(probs, probs > 0.5)
    assert tp.shape == (4, 11) and fp.shape == (4, 11) and pos.shape == (4,) and tp.sum() == 0


@pytest.mark.parametrize("call, message", [
    (lambda p, y, r: binned_counts(p[0], y[0], None), "(B, C, H, W)"),
    (lambda p, y, r: binned_counts(p.double(), y, r), "float32, float16 or bfloat16"),
    (lambda p, y, r: binned_counts(p, y.float(), r), "bool or uint8"),
    (lambda p, y, r: binned_counts(p, y[:, :2], r), "shape of probs"),
    (lambda p, y, r: binned_counts(p, y, r[:, :3]), "roi must be a (B, H, W)"),
    (lambda p, y, r: binned_counts(p, y, r.to(torch.uint8)), "roi must be bool"),
    (lambda p, y, r: binned_counts(p, y, r, thresholds=1), "thresholds must be an integer >= 2"),
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
def test_cuda_kernel_matches_twin_on_full_size_maps(monkeypatch):
    bc = sys.modules["kernels.binned_counts"]  # the module (kernels.binned_counts is also the function's name)

    probs, target, mask = random_case((2, 4, 1536, 1536), dtype=torch.float16, layout="channels_last", seed=5)
    want = binned_counts_torch(probs, target, mask)

    def no_twin(*args, **kwargs):
        raise AssertionError("binned_counts fell back to the torch twin on CUDA tensors")

    monkeypatch.setattr(bc, "binned_counts_torch", no_twin)  # the public function must take Triton on CUDA
    for p in (probs, probs.contiguous()):  # channels_last and plain NCHW
        got = binned_counts(p.cuda(), target.cuda(), mask.cuda())
        assert_counts_equal(got, want)


# --------------------------------------------------------------------------------------------- pr_metrics

def test_pr_metrics_matches_the_formula_and_sklearn():
    from sklearn.metrics import f1_score

    probs, target, mask = random_case((3, 4, 23, 21), seed=6)
    probs[:, 1] = probs[:, 1].clamp(0, 1) * 0.75  # lesion 1: nothing predicted at t >= 0.8 (Prec = 1 there)
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


def test_perfect_prediction_scores_one():
    _, target, mask = random_case((2, 4, 16, 16), seed=7)
    m = pr_metrics(*binned_counts(target.float(), target, mask))
    assert m["aupr"].tolist() == pytest.approx([1.0] * 4, abs=1e-15)
    assert m["dice"].tolist() == pytest.approx([1.0] * 4, abs=1e-15)


def test_all_zero_prediction():
    """Only t = 0 predicts anything: AUPR = (1 + prevalence) / 2 (the (1, P/N) -> (0, 1) trapezoid), Dice 0."""
    _, target, mask = random_case((2, 4, 16, 16), seed=8)
    tp, fp, pos = binned_counts(torch.zeros(target.shape), target, mask)
    m = pr_metrics(tp, fp, pos)
    prevalence = pos.double() / mask.sum()
    assert m["aupr"].tolist() == pytest.approx(((1 + prevalence) / 2).tolist(), rel=1e-12)
    assert m["dice"].tolist() == [0.0] * 4


def test_absent_lesion_is_nan_and_others_are_not():
    probs, target, mask = random_case((2, 4, 16, 16), seed=9)
    target[:, 3] = False  # CWS absent from the whole set
    m = pr_metrics(*binned_counts(probs, target, mask))
    assert math.isnan(m["aupr"][3]) and math.isnan(m["dice"][3])
    assert not m["aupr"][:3].isnan().any() and not m["dice"][:3].isnan().any()


def test_pr_metrics_of_summed_batches_equals_pooled():
    probs, target, mask = random_case((4, 4, 19, 17), seed=10)
    total = [sum(x) for x in zip(*(binned_counts(probs[i:i + 1], target[i:i + 1], mask[i:i + 1])
                                    for i in range(4)))]
    aupr, dice = reference_metrics(*brute_counts(probs, target, mask))
    got = pr_metrics(*total)
    assert got["aupr"].tolist() == pytest.approx(aupr, rel=1e-12)
    assert got["dice"].tolist() == pytest.approx(dice, rel=1e-12)


def test_pr_metrics_bad_inputs():
    tp = torch.zeros(4, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="odd number of thresholds"):
        pr_metrics(tp, tp, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected tp \(C, T\)"):
        pr_metrics(tp, tp[:2], torch.ones(4, dtype=torch.int64))
