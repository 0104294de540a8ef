"""Generic metrics, pure functions on numpy / Python inputs: accuracy, Matthews correlation, binary F1,
Pearson and Spearman correlation. Task-specific metrics live with their task (e.g. vqa.vqa_accuracy).
"""

import numpy as np

# -----------------------------------------------------------------------------
# Metrics (pure functions on numpy / Python inputs)


def _pair(preds, labels, name):
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.ndim != 1 or len(preds) == 0:
        raise ValueError(f"{name}: predictions {preds.shape} and labels {labels.shape} must be equal, non-empty 1-D")
    return preds, labels


def accuracy(preds, labels) -> float:
    """Fraction of predictions equal to their label."""
    preds, labels = _pair(preds, labels, "accuracy")
    return float((preds == labels).mean())


def _binary_counts(preds, labels, name):
    preds, labels = _pair(preds, labels, name)
    for values, what in ((preds, "predictions"), (labels, "labels")):
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name}: {what} must be 0 or 1")
    tp = int(((preds == 1) & (labels == 1)).sum())
    tn = int(((preds == 0) & (labels == 0)).sum())
    fp = int(((preds == 1) & (labels == 0)).sum())
    fn = int(((preds == 0) & (labels == 1)).sum())
    return tp, tn, fp, fn


def matthews_corrcoef(preds, labels) -> float:
    """Binary Matthews correlation (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0 when a
    factor is 0 (a constant predictor or a single-class label set), the usual convention."""
    tp, tn, fp, fn = _binary_counts(preds, labels, "matthews_corrcoef")
    denominator = float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / denominator ** 0.5 if denominator else 0.0


def f1_binary(preds, labels) -> float:
    """F1 of the positive class 1: 2 tp / (2 tp + fp + fn); 0 when there is no true positive."""
    tp, _, fp, fn = _binary_counts(preds, labels, "f1_binary")
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def pearson(x, y) -> float:
    """Pearson correlation; 0 when either input is constant (no linear relation can be measured)."""
    x, y = _pair(x, y, "pearson")
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def average_ranks(values) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]  # (N,)
    group = np.cumsum(starts_group) - 1  # (N,) tie group of each sorted position
    first = np.flatnonzero(starts_group)  # (G,) first sorted position of each group
    last = np.r_[first[1:], len(values)] - 1  # (G,)
    ranks = np.empty(len(values))
    ranks[order] = ((first + last) / 2 + 1)[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman correlation: Pearson of the average ranks (ties share their mean rank)."""
    x, y = _pair(x, y, "spearman")
    return pearson(average_ranks(x), average_ranks(y))
