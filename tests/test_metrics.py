"""fastlt.metrics: the many/medium/few-shot report and its text table."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score

from fastlt.metrics import format_report, shot_accuracy

# Classes 0, 1 many-shot; 2, 3 medium; 4, 5, 6 few. Class 6 is only in the training set.
TRAIN = [200, 150, 50, 30, 10, 5, 7]
TARGETS = [0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 5]
PREDS = [0, 0, 0, 6, 1, 1, 0, 3, 2, 6, 4, 0, 5]
# per-class recall: 0: 3/4, 1: 2/2, 2: 0/1, 3: 1/3, 4: 1/2, 5: 1/1


def _one_hot_logits(preds, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(preds), num_classes, generator=g)
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 10.0
    return logits


def test_hand_made_case():
    got = shot_accuracy(torch.tensor(PREDS), torch.tensor(TARGETS), TRAIN)
    assert set(got) == {"overall", "balanced", "many", "medium", "few"}
    assert got["overall"] == pytest.approx(8 / 13)
    assert got["balanced"] == pytest.approx((0.75 + 1 + 0 + 1 / 3 + 0.5 + 1) / 6)
    assert got["many"] == pytest.approx((0.75 + 1.0) / 2)
    assert got["medium"] == pytest.approx((0 + 1 / 3) / 2)
    # class 6 has no test sample: it does not enter the few-shot mean (which would be 0.5 otherwise).
    assert got["few"] == pytest.approx((0.5 + 1.0) / 2)
    assert all(isinstance(v, float) for v in got.values())


def test_logits_give_the_same_report_as_labels():
    a = shot_accuracy(torch.tensor(PREDS), torch.tensor(TARGETS), torch.tensor(TRAIN))
    b = shot_accuracy(_one_hot_logits(PREDS, 7), torch.tensor(TARGETS), TRAIN)
    c = shot_accuracy(np.array(PREDS), np.array(TARGETS), np.array(TRAIN))
    assert a == b == c


def test_split_boundaries():
    # counts: 101 many, 100 medium, 20 medium, 19 few. Class j is correct iff j is odd.
    train = [101, 100, 20, 19]
    targets = torch.tensor([0, 1, 2, 3])
    preds = torch.tensor([1, 1, 0, 3])
    got = shot_accuracy(preds, targets, train)
    assert got["many"] == 0.0
    assert got["medium"] == 0.5
    assert got["few"] == 1.0
    custom = shot_accuracy(preds, targets, train, many_threshold=19, few_threshold=19)
    # many: n > 19 (classes 0-2); medium: 19 <= n <= 19 (class 3); few: n < 19 (none).
    assert custom["many"] == pytest.approx(1 / 3) and custom["medium"] == 1.0 and math.isnan(custom["few"])


def test_empty_split_is_nan():
    got = shot_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), [500, 300, 5])
    assert got["many"] == 1.0 and got["overall"] == 1.0 and got["balanced"] == 1.0
    assert math.isnan(got["medium"])
    assert math.isnan(got["few"])  # class 2 is few-shot but has no test sample


def test_balanced_is_mean_recall_not_overall():
    # 9 head samples all right, 1 tail sample wrong: overall 0.9, balanced 0.5.
    targets = torch.tensor([0] * 9 + [1])
    preds = torch.zeros(10, dtype=torch.long)
    got = shot_accuracy(preds, targets, [1000, 3])
    assert got["overall"] == pytest.approx(0.9)
    assert got["balanced"] == pytest.approx(0.5)
    assert got["many"] == 1.0 and got["few"] == 0.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 60), st.integers(0, 2**31 - 1))
def test_matches_sklearn_and_split_means(num_classes, n, seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, num_classes, n)
    preds = np.where(rng.random(n) < 0.5, targets, rng.integers(0, num_classes, n))
    train = rng.integers(0, 300, num_classes)
    got = shot_accuracy(torch.from_numpy(preds), torch.from_numpy(targets), train)
    assert got["overall"] == pytest.approx(float(np.mean(preds == targets)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when preds hold classes absent from targets
        expected_bal = balanced_accuracy_score(targets, preds)
    assert got["balanced"] == pytest.approx(expected_bal)
    recall = {c: np.mean(preds[targets == c] == c) for c in np.unique(targets)}
    for key, mask in (("many", train > 100), ("medium", (train >= 20) & (train <= 100)), ("few", train < 20)):
        vals = [r for c, r in recall.items() if mask[c]]
        if vals:
            assert got[key] == pytest.approx(float(np.mean(vals)))
        else:
            assert math.isnan(got[key])


@pytest.mark.parametrize(
    ("preds", "targets", "train", "kwargs", "exc", "match"),
    [
        (torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), [5, 5], {}, TypeError, "targets"),
        (torch.tensor([0, 1]), torch.tensor([[0, 1]]), [5, 5], {}, ValueError, "targets"),
        (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), [5, 5], {}, ValueError,
         "targets"),
        ([], [], [5, 5], {}, ValueError, "N >= 1"),  # (empty lists read as float: a dtype message before)
        (torch.tensor([0, 1]), torch.tensor([0, 2]), [5, 5], {}, ValueError, "targets"),
        (torch.tensor([0, 1]), torch.tensor([0, -1]), [5, 5], {}, ValueError, "targets"),
        (torch.tensor([0, 1, 1]), torch.tensor([0, 1]), [5, 5], {}, ValueError, "predictions_or_logits"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), [5, 5], {}, ValueError, "predictions_or_logits"),
        (torch.zeros(3, 2), torch.tensor([0, 1]), [5, 5], {}, ValueError, "predictions_or_logits"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), [5, 5], {}, TypeError, "predictions_or_logits"),
        (torch.zeros(2, 2, 2), torch.tensor([0, 1]), [5, 5], {}, ValueError, "predictions_or_logits"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 0]), [5, 5], {}, ValueError,
         "NaN \\(row 1"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), [5, -1], {}, ValueError, "train_class_counts"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), [[5, 5]], {}, ValueError, "train_class_counts"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), [True, False], {}, TypeError, "train_class_counts"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), [5, 5], {"few_threshold": 200}, ValueError,
         "few_threshold"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), [5, 5], {"many_threshold": -1}, ValueError,
         "many_threshold"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), [5, 5], {"few_threshold": "20"}, TypeError,
         "few_threshold"),
    ],
)
def test_shot_accuracy_errors(preds, targets, train, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        shot_accuracy(preds, targets, train, **kwargs)


# ----------------------------------------------------------------------------- format_report


def test_format_report_exact_table():
    rows = {
        "CE": {"overall": 0.5, "balanced": 0.25, "many": 0.9, "medium": 0.123, "few": math.nan},
        "LA tau=1.5": {"overall": 1.0, "balanced": 0.0, "many": 0.0, "medium": 0.0004, "few": 0.9994,
                       "time_s": 1.23456},
    }
    expected = "\n".join([
        "Method       Overall  Balanced      Many    Medium       Few  Time (s)",
        "----------------------------------------------------------------------",
        "CE              50.0      25.0      90.0      12.3         -         -",
        "LA tau=1.5     100.0       0.0       0.0       0.0      99.9     1.235",
    ])
    assert format_report(rows) == expected


def test_format_report_without_time_column_and_from_shot_accuracy():
    report = shot_accuracy(torch.tensor(PREDS), torch.tensor(TARGETS), TRAIN)
    text = format_report({"ce": report})
    lines = text.splitlines()
    assert "Time" not in lines[0]
    assert lines[2].split() == ["ce", "61.5", "59.7", "87.5", "16.7", "75.0"]
    assert len({len(line) for line in lines}) == 1  # fixed width


@pytest.mark.parametrize(
    ("rows", "exc", "match"),
    [
        ([("CE", {})], TypeError, "rows"),
        ({"CE": [0.5]}, TypeError, "rows\\['CE'\\]"),
        ({"CE": {"overall": 0.5}}, ValueError, "balanced"),
        ({1: {"overall": 0.5}}, TypeError, "rows keys"),
        ({"CE": {"overall": "50%", "balanced": 0, "many": 0, "medium": 0, "few": 0}}, TypeError, "overall"),
        ({"CE": {"overall": 0, "balanced": 0, "many": 0, "medium": 0, "few": 0, "time_s": "1s"}}, TypeError,
         "time_s"),
    ],
)
def test_format_report_errors(rows, exc, match):
    with pytest.raises(exc, match=match):
        format_report(rows)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_shot_accuracy_takes_unsigned_numpy_labels(dtype):
    preds = np.array([0, 1, 2, 2], dtype=dtype)
    targets = np.array([0, 1, 1, 2], dtype=dtype)
    expected = shot_accuracy(preds.astype(np.int64), targets.astype(np.int64), [200, 50, 5])
    assert shot_accuracy(preds, targets, [200, 50, 5]) == expected


def test_counts_that_are_not_whole_numbers_are_refused():
    """A prior passed for the training counts put every class in few-shot, with no error."""
    with pytest.raises(TypeError, match="whole numbers"):
        shot_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0.75, 0.25]))


def test_predicted_labels_outside_the_classes_and_reversed_arrays():
    """A predicted label outside [0, C) is refused, as a target is (it counted as a wrong prediction silently); a
    reversed numpy array (a negative stride) is taken as any array."""
    counts = [500, 150, 100, 50, 20, 3]
    with pytest.raises(ValueError, match=r"predictions_or_logits holds class 7, outside \[0, C=6\)"):
        shot_accuracy([7, 0], [0, 1], counts)
    with pytest.raises(ValueError, match=r"predictions_or_logits holds class -1"):
        shot_accuracy([0, -1], [0, 1], counts)
    y = np.array([0, 1, 2, 5, 5])
    assert shot_accuracy(y[::-1], y[::-1], np.array(counts)[::-1]) == shot_accuracy(y, y, counts[::-1])
