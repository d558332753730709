"""AUPR, its blank-map floor, AP and Dice from binned counts (docs/PROTOCOL.md, "Evaluation
protocol").

    from kernels import AP_BINS, binned_counts, pr_metrics
    m = pr_metrics(*binned_counts(probs, target, roi))   # aupr, aupr_floor, dice: (C,) float64
    m = pr_metrics(*binned_counts(probs, target, roi, ap_bins=AP_BINS))   # + the floor-free ap
    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py -k pr_metrics
"""
import torch

from .binned_counts import threshold_values


def _protocol_aupr(tp, fp, pos):
    """float64 tp (C, T), fp (C, T), pos (C,) -> (C,) trapezoid AUPR with the (0, 1) anchor (NaN if
    pos = 0)."""
    predicted = tp + fp
    # NOTE: Prec = 1 where nothing is predicted (torchmetrics 1.9 gives NaN, the authors' code 0)
    prec = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.ones_like(tp))  # (C, T)
    rec = tp / pos[:, None]  # (C, T); NaN (0/0) when the lesion is absent from the whole set
    # The (Rec, Prec) = (0, 1) anchor closes the curve after the last threshold
    prec = torch.cat([prec, torch.ones_like(prec[:, :1])], dim=1)  # (C, T+1)
    rec = torch.cat([rec, torch.zeros_like(rec[:, :1])], dim=1)  # (C, T+1)
    # Integrate in threshold order, never sorted by recall (a sort is unstable at ties)
    return ((rec[:, :-1] - rec[:, 1:]) * (prec[:, :-1] + prec[:, 1:]) / 2).sum(dim=1)  # (C,)


def _average_precision(tp, fp, pos):
    """float64 fine counts tp (C, F), fp (C, F) at ascending thresholds, pos (C,) -> (C,) step-rule
    AP.

    AP = sum_j (R_j - R_{j+1}) P_j with R_F = 0: scikit-learn's average_precision_score on the
    binned curve. P_j = 1 where nothing is predicted only ever meets R_j - R_{j+1} = 0 (R_j = 0
    there), so it adds nothing: a constant map scores (1 - 0) x prevalence, a perfect one 1 x 1.
    """
    predicted = tp + fp
    prec = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.ones_like(tp))  # (C, F)
    rec = tp / pos[:, None]  # (C, F), non-increasing in j
    # (C, F): R_{j+1}, with R_F = 0
    rec_next = torch.cat([rec[:, 1:], torch.zeros_like(rec[:, :1])], dim=1)
    return ((rec - rec_next) * prec).sum(dim=1)  # (C,)


def pr_metrics(tp, fp, pos, tp_fine=None, fp_fine=None):
    """Pooled counts -> {"aupr", "aupr_floor", "dice"[, "ap"]}: float64 (C,) each, NaN where
    pos == 0.

    tp (C, T), fp (C, T), pos (C,) from binned_counts; tp_fine (C, F), fp_fine (C, F) from
    binned_counts(..., ap_bins=F), both or neither.
    aupr: trapezoid over the T points in threshold order plus the (Rec, Prec) = (0, 1) anchor;
    Prec = 1 where nothing is predicted.
    aupr_floor: the same AUPR for an all-zero map on the same pixels, (1 + prevalence) / 2, with
    prevalence = pos / (pos + FP_0) (FP_0 counts p >= t_0 = 0: every negative of a probability map).
    dice: 2 TP / (2 TP + FP + FN) at the t = 0.5 threshold.
    ap: the floor-free step-rule average precision of the fine curve (a constant map scores the
    prevalence, a perfect map 1); only with the fine counts.
    """
    tp, fp, pos = (torch.as_tensor(x).to(torch.float64) for x in (tp, fp, pos))
    if tp.ndim != 2 or fp.shape != tp.shape or pos.shape != tp.shape[:1]:
        raise ValueError(f"expected tp (C, T), fp (C, T), pos (C,), got {tuple(tp.shape)}, "
                         f"{tuple(fp.shape)}, {tuple(pos.shape)}")
    if (tp_fine is None) != (fp_fine is None):
        raise ValueError("pass both tp_fine and fp_fine (binned_counts(..., ap_bins=F)) or neither")
    C, T = tp.shape
    half = (threshold_values(T) == 0.5).nonzero().flatten()  # Dice's threshold among the T
    if half.numel() != 1:
        raise ValueError(f"Dice needs a threshold of exactly 0.5: use an odd number of thresholds, "
                         f"got {T}")
    aupr = _protocol_aupr(tp, fp, pos)
    # An all-zero map: every counted pixel predicted at t_0 = 0 and none above
    blank_tp, blank_fp = torch.zeros_like(tp), torch.zeros_like(fp)
    blank_tp[:, 0], blank_fp[:, 0] = pos, fp[:, 0]
    aupr_floor = _protocol_aupr(blank_tp, blank_fp, pos)
    k = half.item()
    fn = pos - tp[:, k]
    dice = 2 * tp[:, k] / (2 * tp[:, k] + fp[:, k] + fn)  # (C,)
    metrics = {"aupr": aupr, "aupr_floor": aupr_floor, "dice": dice}
    if tp_fine is not None:
        tp_fine, fp_fine = (torch.as_tensor(x).to(torch.float64) for x in (tp_fine, fp_fine))
        if tp_fine.ndim != 2 or tp_fine.shape[0] != C or fp_fine.shape != tp_fine.shape:
            raise ValueError(f"expected tp_fine (C, F), fp_fine (C, F) with C = {C}, got "
                             f"{tuple(tp_fine.shape)}, {tuple(fp_fine.shape)}")
        metrics["ap"] = _average_precision(tp_fine, fp_fine, pos)
    absent = pos == 0  # a lesion absent from every counted pixel has no curve: NaN, never 0
    return {name: torch.where(absent, torch.full_like(v, float("nan")), v)
            for name, v in metrics.items()}
