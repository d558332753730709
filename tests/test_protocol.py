"""protocol.py: the ensemble mean of sigmoids, flip TTA, overlapping tiles, count_dataset,
summarize, nanmean.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_protocol.py
"""
import math

import numpy as np
import pytest
import torch

import protocol
from data import LESIONS, PreparedDataset

R = 128  # the conftest cache's resolution


class Pointwise(torch.nn.Module):
    """A 1x1 convolution: no receptive field, so tiling and flips must not change its output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) * 5


def test_tiling_and_tta_identities():
    x = torch.rand(2, 3, 70, 90)  # odd, non-square
    m = Pointwise().eval()
    with torch.no_grad():
        plain = torch.sigmoid(m(x))
        for tile, ov in ((32, 0.5), (40, 0.25), (64, 0.0), (90, 0.5)):
            tiled = protocol.predict_tiled([m], x, tile, overlap=ov)
            torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-6)
        # one window: exact
        assert torch.equal(protocol.predict_tiled([m], x, 96), protocol.predict([m], x))
        # TTA of a flip-equivariant model changes nothing (up to rounding)
        torch.testing.assert_close(protocol.predict([m], x, tta=True), plain, rtol=0, atol=1e-6)


def test_tta_is_mean_over_flips_and_flip_equivariant(eval_ckpts, model_from):
    m = model_from(eval_ckpts["a"])
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = sum(torch.sigmoid(m(x.flip(d))).flip(d) if d else torch.sigmoid(m(x))
                  for d in ((), (-1,), (-2,), (-2, -1))) / 4
        got = protocol.predict([m], x, tta=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        # the U-Net itself is not flip-invariant
        assert (got - torch.sigmoid(m(x))).abs().max() > 1e-4
        for d in ((-1,), (-2,)):
            torch.testing.assert_close(protocol.predict([m], x.flip(d), tta=True), got.flip(d),
                                       rtol=0, atol=1e-6)


def test_empty_test_set(eval_ckpts, model_from):
    class Empty:
        ids = []

        def __len__(self):
            return 0

    with pytest.raises(ValueError, match="no images"):
        protocol.count_dataset([model_from(eval_ckpts["a"])], Empty(), "cpu")


def test_count_dataset_bfloat16_and_train_mode(eval_ckpts, model_from, cache_dir):
    ds = PreparedDataset(cache_dir, "MES", R, "test")
    m = model_from(eval_ckpts["a"]).train()  # as train.py's validation finds it
    tp32, fp32, pos32 = protocol.count_dataset([m], ds, "cpu")
    assert m.training  # handed back in the mode it came in
    tp16, fp16, pos16 = protocol.count_dataset([m], ds, "cpu", dtype="bfloat16", batch=3)
    assert tp16.dtype == torch.int64 and torch.equal(pos16, pos32)
    # same ROI pixels, batched by 3
    assert torch.equal(tp16[:, 0] + fp16[:, 0], tp32[:, 0] + fp32[:, 0])
    assert ((tp16 + fp16 - tp32 - fp32).abs().sum(1) < 0.1 * 11 * (tp32[:, 0] + fp32[:, 0])).all()


def test_summarize_scores_the_given_lesions_and_the_means_skip_absent_ones():
    """summarize on hand-made counts: the trapezoid AUPR and the Dice at t = 0.5 in float64
    (docs/PROTOCOL.md) for the given lesions; the others keep their counts but score NaN; a lesion
    absent from the test set (pos 0) scores NaN and leaves the means, as nanmean does."""
    rng = np.random.default_rng(0)
    fp = np.sort(rng.integers(0, 500, (4, 11)), axis=1)[:, ::-1].copy()  # counts fall as t rises
    tp = np.sort(rng.integers(1, 80, (4, 11)), axis=1)[:, ::-1].copy()
    pos = tp[:, 0] + rng.integers(0, 20, 4)
    tp[3], pos[3] = 0, 0  # CWS absent from the test set
    counts = (torch.from_numpy(tp), torch.from_numpy(fp), torch.from_numpy(pos))
    block = protocol.summarize(*counts, n_images=7, lesions=("EX", "MA", "CWS"))

    def reference(c):
        t, f = tp[c].astype(np.float64), fp[c].astype(np.float64)
        prec = [t[k] / (t[k] + f[k]) if t[k] + f[k] else 1.0 for k in range(11)] + [1.0]
        rec = [t[k] / pos[c] for k in range(11)] + [0.0]
        aupr = sum((rec[k] - rec[k + 1]) * (prec[k] + prec[k + 1]) / 2 for k in range(11))
        return aupr, 2 * t[5] / (2 * t[5] + f[5] + pos[c] - t[5])

    assert block["n_images"] == 7
    for c, name in enumerate(LESIONS):
        got = block["lesions"][name]
        assert got["tp"] == tp[c].tolist() and got["fp"] == fp[c].tolist() and got["pos"] == pos[c]
        if name in ("EX", "MA"):
            aupr, dice = reference(c)
            assert got["aupr"] == pytest.approx(aupr, rel=1e-12)
            assert got["dice"] == pytest.approx(dice, rel=1e-12)
        else:  # HE: not a trained lesion; CWS: absent
            assert math.isnan(got["aupr"]) and math.isnan(got["dice"]), name
    for k, key in enumerate(("aupr", "dice")):  # EX and MA: the scored lesions present
        want = (reference(0)[k] + reference(2)[k]) / 2
        assert block[f"mean_{key}"] == pytest.approx(want, rel=1e-12)
    assert math.isnan(protocol.nanmean([float("nan")] * 4))  # no lesion present: NaN
    assert protocol.nanmean([1.0, float("nan"), 3.0]) == 2.0


def test_counts_skip_the_lesions_an_image_does_not_annotate():
    """Each image counts only for its annotated lesions (a union of datasets annotating different
    lesions: issue 25): pooled counts == brute force over the images that annotate each lesion."""
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((3, 4, 9, 7), dtype=np.float32))
    masks = torch.from_numpy(rng.random((3, 4, 9, 7)) > 0.6)
    roi = torch.from_numpy(rng.random((3, 9, 7)) > 0.2)
    ann = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]], bool)
    items = [{"annotated": a} for a in ann]
    thresholds = protocol.THRESHOLDS  # the protocol's 11
    tp, fp, pos = protocol.annotated_counts(probs, masks, roi, items, thresholds, {})
    t32 = np.linspace(0, 1, 11, dtype=np.float32)
    for c in range(4):
        keep = roi.numpy() & ann[:, c, None, None]  # (3, 9, 7): pixels of annotating images
        p, y = probs[:, c].numpy()[keep], masks[:, c].numpy()[keep]
        assert int(pos[c]) == y.sum()
        assert [int(v) for v in tp[c]] == [int(((p >= t) & y).sum()) for t in t32]
        assert [int(v) for v in fp[c]] == [int(((p >= t) & ~y).sum()) for t in t32]
    # every image annotating everything: the plain counts
    full = [{"annotated": np.ones(4, bool)}] * 3
    for a, b in zip(protocol.annotated_counts(probs, masks, roi, full, thresholds, {}),
                    protocol.binned_counts(probs, masks, roi, thresholds)):
        assert torch.equal(a, b)
