"""Fused evaluation metrics: binned confusion counts (Triton on CUDA, torch twin elsewhere) and AUPR / Dice.

    from kernels import binned_counts, pr_metrics
    tp, fp, pos = binned_counts(probs, target, roi)   # add these across batches, then:
    metrics = pr_metrics(tp, fp, pos)                  # {"aupr": (C,), "dice": (C,)} float64
"""
from .binned_counts import binned_counts, binned_counts_torch, binned_counts_triton, threshold_values
from .pr_metrics import pr_metrics

__all__ = ["binned_counts", "binned_counts_torch", "binned_counts_triton", "pr_metrics", "threshold_values"]
