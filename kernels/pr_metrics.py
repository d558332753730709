"""AUPR and Dice from binned counts, exactly as ../shared/REFERENCE.md ("Evaluation protocol") defines them.

    from kernels import binned_counts, pr_metrics
    m = pr_metrics(*binned_counts(probs, target, roi))   # {"aupr": (C,), "dice": (C,)} float64
    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py -k pr_metrics
"""
import torch

from .binned_counts import threshold_values


def pr_metrics(tp, fp, pos):
    """tp (C, T), fp (C, T), pos (C,) pooled counts -> {"aupr": float64 (C,), "dice": float64 (C,)}.

    AUPR: trapezoid over the T points in threshold order plus the (Rec, Prec) = (0, 1) anchor; Prec = 1 where
    nothing is predicted. Dice: 2 TP / (2 TP + FP + FN) at the t = 0.5 threshold. Both NaN when pos == 0.
    """
    tp, fp, pos = (torch.as_tensor(x).to(torch.float64) for x in (tp, fp, pos))
    if tp.ndim != 2 or fp.shape != tp.shape or pos.shape != tp.shape[:1]:
        raise ValueError(f"expected tp (C, T), fp (C, T), pos (C,), got {tuple(tp.shape)}, "
                         f"{tuple(fp.shape)}, {tuple(pos.shape)}")
    C, T = tp.shape
    half = (threshold_values(T) == 0.5).nonzero().flatten()
    if half.numel() != 1:
        raise ValueError(f"Dice needs a threshold of exactly 0.5: use an odd number of thresholds, got {T}")
    predicted = tp + fp
    # NOTE: Prec = 1 where nothing is predicted (torchmetrics 1.9 gives NaN, the authors' code 0)
    prec = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.ones_like(tp))  # (C, T)
    rec = tp / pos[:, None]  # (C, T); NaN (0/0) when the lesion is absent from the whole set
    # The (Rec, Prec) = (0, 1) anchor closes the curve after the last threshold
    prec = torch.cat([prec, torch.ones_like(prec[:, :1])], dim=1)  # (C, T+1)
    rec = torch.cat([rec, torch.zeros_like(rec[:, :1])], dim=1)  # (C, T+1)
    # Integrate in threshold order, never sorted by recall (a sort is unstable at ties)
    aupr = ((rec[:, :-1] - rec[:, 1:]) * (prec[:, :-1] + prec[:, 1:]) / 2).sum(dim=1)  # (C,)
    k = half.item()
    fn = pos - tp[:, k]
    dice = 2 * tp[:, k] / (2 * tp[:, k] + fp[:, k] + fn)  # (C,)
    nan = torch.full_like(aupr, float("nan"))
    absent = pos == 0
    return {"aupr": torch.where(absent, nan, aupr), "dice": torch.where(absent, nan, dice)}
