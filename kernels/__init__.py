"""Fused evaluation metrics: binned confusion counts (Triton on CUDA, a fast CPU path elsewhere,
both checked against a plain reference) and AUPR / its floor / AP / Dice (docs/PROTOCOL.md,
"Evaluation protocol").

    from kernels import AP_BINS, binned_counts, pr_metrics
    counts = binned_counts(probs, target, roi, ap_bins=AP_BINS)   # tp, fp, pos, tp_fine, fp_fine
    # ... add the counts across batches, then once:
    metrics = pr_metrics(*counts)   # {"aupr", "aupr_floor", "ap", "dice"}: (C,) float64 each
"""
from .binned_counts import (AP_BINS, binned_counts, binned_counts_torch, binned_counts_triton,
                            fine_threshold_values, reference_binned_counts, threshold_values)
from .pr_metrics import pr_metrics

__all__ = ["AP_BINS", "binned_counts", "binned_counts_torch", "binned_counts_triton",
           "fine_threshold_values", "pr_metrics", "reference_binned_counts", "threshold_values"]
