"""The standard long-tail report: top-1, balanced, many-/medium-/few-shot accuracy, and a text table.

Split accuracies follow the usual long-tail evaluation code (Liu et al. 2019, Kang et al. 2020):
the per-class recall of each test class, averaged over the classes of the split, where a class is
many-shot with more than ``many_threshold`` (100) training samples, few-shot with fewer than
``few_threshold`` (20), and medium-shot otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING

import torch

from ._validation import INT_DTYPES, as_cpu_tensor, check_finite_float

if TYPE_CHECKING:
    import numpy as np

METRIC_KEYS = ("overall", "balanced", "many", "medium", "few")


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    try:
        t = as_cpu_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        kind = type(value).__name__
        raise TypeError(f"{name} must be a tensor, numpy array or sequence, got {kind}") from exc
    if t.numel() == 0 and t.dim() == 1 and not hasattr(value, "dtype"):  # [] reads as float: no samples, indices
        t = t.to(torch.int64)
    return t


def _train_counts(train_class_counts) -> torch.Tensor:
    counts = _as_tensor("train_class_counts", train_class_counts)
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"train_class_counts must hold integers, got {counts.dtype}")
    if counts.dim() != 1 or counts.numel() < 1:
        raise ValueError(
            f"train_class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}"
        )
    counts = counts.to(torch.float64)
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("train_class_counts must be finite and non-negative")
    if (counts != counts.round()).any():  # (a prior passed for the counts put every class in few-shot)
        raise TypeError("train_class_counts must hold whole numbers (per-class training counts, not a prior)")
    return counts


def shot_accuracy(predictions_or_logits: torch.Tensor | Sequence[int] | Sequence[Sequence[float]] | np.ndarray,
                  targets: torch.Tensor | Sequence[int] | np.ndarray,
                  train_class_counts: torch.Tensor | Sequence[int] | np.ndarray, many_threshold: float = 100,
                  few_threshold: float = 20) -> dict[str, float]:
    """Top-1, balanced and many/medium/few-shot accuracy, as fractions in [0, 1].

    Args:
        predictions_or_logits: (N,) predicted labels (integer dtype, in ``[0, C)``) or (N, C) real scores
            (argmax is taken; a NaN score raises); tensor, numpy array or sequence.
        targets: (N,) integer labels in ``[0, C)``, N >= 1.
        train_class_counts: (C,) training counts ``n`` (finite, non-negative), which define the splits.
        many_threshold: a class with ``n_j > many_threshold`` is many-shot (default 100).
        few_threshold: a class with ``n_j < few_threshold`` is few-shot (default 20); at most
            ``many_threshold``.

    Returns:
        A dict of Python floats with the keys ``'overall', 'balanced', 'many', 'medium', 'few'``:


        - ``'overall'``: ``mean_i [pred_i == y_i]``.
        - ``'balanced'``: mean per-class recall over the classes present in ``targets``.
        - ``'many'`` (``n_j > many_threshold``), ``'medium'`` (``few_threshold <= n_j <= many_threshold``),
          ``'few'`` (``n_j < few_threshold``): mean per-class recall over the split's classes present in
          ``targets`` (the standard long-tail report); NaN when the split has no test class.
    """
    scores = _as_tensor("predictions_or_logits", predictions_or_logits)
    targets = _as_tensor("targets", targets)
    counts = _train_counts(train_class_counts)
    num_classes = counts.numel()
    many_threshold = check_finite_float("many_threshold", many_threshold, min_value=0.0)
    few_threshold = check_finite_float("few_threshold", few_threshold, min_value=0.0)
    if few_threshold > many_threshold:
        raise ValueError(f"few_threshold ({few_threshold}) must be <= many_threshold ({many_threshold})")

    if targets.dtype not in INT_DTYPES:
        raise TypeError(f"targets must hold integer class indices, got {targets.dtype}")
    if targets.dim() != 1 or targets.numel() == 0:
        raise ValueError(f"targets must have shape (N,) with N >= 1, got {tuple(targets.shape)}")
    targets = targets.to(torch.int64)
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        bad = int(targets.min()) if int(targets.min()) < 0 else int(targets.max())
        raise ValueError(f"targets holds class {bad}, outside [0, C={num_classes}) of train_class_counts")

    if scores.dim() == 2:
        if scores.shape[1] != num_classes:
            raise ValueError(
                f"predictions_or_logits has C = {scores.shape[1]} columns but train_class_counts "
                f"has {num_classes} classes"
            )
        if scores.dtype == torch.bool or scores.is_complex():
            raise TypeError(f"predictions_or_logits must be real scores, got {scores.dtype}")
        if scores.is_floating_point() and bool(scores.isnan().any()):
            # argmax takes a NaN for the largest score: a diverged model's rows would count as predictions
            bad = int(scores.isnan().any(dim=1).nonzero()[0, 0])
            raise ValueError(f"predictions_or_logits holds NaN (row {bad} first): a NaN score has no argmax")
        preds = scores.argmax(dim=1)
    elif scores.dim() == 1:
        if scores.dtype not in INT_DTYPES:
            raise TypeError(
                f"predictions_or_logits of shape (N,) must hold integer labels, got {scores.dtype}"
            )
        preds = scores.to(torch.int64)
        if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= num_classes):  # (not counted as wrong)
            bad = int(preds.min()) if int(preds.min()) < 0 else int(preds.max())
            raise ValueError(f"predictions_or_logits holds class {bad}, outside [0, C={num_classes}) of "
                             f"train_class_counts")
    else:
        raise ValueError(
            f"predictions_or_logits must have shape (N,) or (N, C), got {tuple(scores.shape)}"
        )
    if preds.shape[0] != targets.shape[0]:
        raise ValueError(
            f"predictions_or_logits has N = {preds.shape[0]} rows but targets has {targets.shape[0]}"
        )

    correct = (preds == targets).to(torch.float64)
    support = torch.bincount(targets, minlength=num_classes).to(torch.float64)
    hits = torch.bincount(targets, weights=correct, minlength=num_classes)
    tested = support > 0
    recall = torch.where(tested, hits / support.clamp_min(1.0), torch.zeros_like(hits))

    def mean_recall(mask: torch.Tensor) -> float:
        mask = mask & tested
        return float(recall[mask].mean()) if bool(mask.any()) else math.nan

    return {
        "overall": float(correct.mean()),
        "balanced": mean_recall(torch.ones_like(tested)),
        "many": mean_recall(counts > many_threshold),
        "medium": mean_recall((counts >= few_threshold) & (counts <= many_threshold)),
        "few": mean_recall(counts < few_threshold),
    }


def format_report(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width text table: one line per method, the ``shot_accuracy`` keys as percentages.

    Args:
        rows: method name -> dict with the keys ``'overall', 'balanced', 'many', 'medium', 'few'``
            (fractions in [0, 1], shown as percent with one decimal; NaN shows as ``-``) and optionally
            ``'time_s'`` (seconds, a column added when any row has it).

    Returns:
        The table as one string: a header line, a rule of dashes and one line per row, joined by newlines
        (no trailing newline).
    """
    if not isinstance(rows, Mapping):
        raise TypeError(f"rows must be a dict of method name -> metrics, got {type(rows).__name__}")
    for name, row in rows.items():
        if not isinstance(name, str):
            raise TypeError(f"rows keys must be method names (str), got {type(name).__name__}")
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{name!r}] must be a dict of metrics, got {type(row).__name__}")
        missing = [k for k in METRIC_KEYS if k not in row]
        if missing:
            raise ValueError(f"rows[{name!r}] lacks the metric(s) {', '.join(missing)}")
        for key in (*METRIC_KEYS, "time_s"):
            if key in row and (isinstance(row[key], bool) or not isinstance(row[key], Real)):
                kind = type(row[key]).__name__
                raise TypeError(f"rows[{name!r}][{key!r}] must be a real number, got {kind}")

    with_time = any("time_s" in row for row in rows.values())
    headers = ["Overall", "Balanced", "Many", "Medium", "Few"] + (["Time (s)"] if with_time else [])
    width = max([len("Method"), *(len(name) for name in rows)])
    col = max(len(h) for h in headers)

    def cell(value, fmt: str) -> str:
        return "-" if value is None or math.isnan(float(value)) else format(value, fmt)

    lines = ["  ".join(["Method".ljust(width), *(h.rjust(col) for h in headers)])]
    lines.append("-" * len(lines[0]))
    for name, row in rows.items():
        cells = [cell(100.0 * float(row[k]), ".1f").rjust(col) for k in METRIC_KEYS]
        if with_time:
            cells.append(cell(row.get("time_s"), ".3f").rjust(col))
        lines.append("  ".join([name.ljust(width), *cells]))
    return "\n".join(lines)
