"""Metrics against scikit-learn, and the federated (histogram) path against the exact one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from common.metrics import (
    ScoreHistogram,
    binary_auc,
    classification_metrics,
    histogram_metrics,
    score_histogram,
)

METRIC_KEYS = {
    "auc",
    "auc_per_class",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "sensitivity_per_class",
    "specificity_per_class",
    "num_examples",
}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def realistic_scores(seed: int, num_classes: int, n: int = 2000, separation: float = 1.5, noise: float = 1.0):
    """Softmax outputs of a decent but imperfect classifier: probs [n, C], labels [n]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    logits = separation * np.eye(num_classes)[labels] + noise * rng.standard_normal((n, num_classes))
    return _softmax(logits), labels


# ---------------------------------------------------------------- binary AUC


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, size=300)
    # Rounded scores: many ties, within and across classes.
    scores = np.round(rng.normal(size=300) + 0.8 * targets, 1)
    assert binary_auc(scores, targets) == pytest.approx(skm.roc_auc_score(targets, scores), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=60).filter(
        lambda pairs: len({t for _, t in pairs}) == 2
    )
)
def test_binary_auc_matches_sklearn_property(pairs):
    scores = np.array([s for s, _ in pairs], dtype=float)
    targets = np.array([t for _, t in pairs])
    assert binary_auc(scores, targets) == pytest.approx(skm.roc_auc_score(targets, scores), abs=1e-12)


def test_binary_auc_one_class_is_nan():
    assert math.isnan(binary_auc(np.array([0.1, 0.5]), np.array([1, 1])))
    assert math.isnan(binary_auc(np.array([0.1, 0.5]), np.array([0, 0])))


# ---------------------------------------------------------------- exact metrics


@pytest.mark.parametrize("num_classes", [2, 3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_classification_metrics_match_sklearn(seed, num_classes):
    probs, labels = realistic_scores(seed, num_classes, n=500)
    out = classification_metrics(probs, labels)
    assert set(out) == METRIC_KEYS
    preds = probs.argmax(axis=1)

    if num_classes == 2:
        ref_auc = skm.roc_auc_score(labels, probs[:, 1])
    else:
        ref_auc = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert out["auc"] == pytest.approx(ref_auc, abs=1e-12)
    for c in range(num_classes):
        assert out["auc_per_class"][c] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]), abs=1e-12)

    assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert out["sensitivity"] == pytest.approx(skm.recall_score(labels, preds, average="macro"))
    assert out["precision"] == pytest.approx(skm.precision_score(labels, preds, average="macro", zero_division=0))
    assert out["f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro", zero_division=0))
    np.testing.assert_allclose(out["sensitivity_per_class"], skm.recall_score(labels, preds, average=None))

    cm = skm.confusion_matrix(labels, preds, labels=range(num_classes))
    spec = [np.delete(np.delete(cm, c, 0), c, 1).sum() / np.delete(cm, c, 0).sum() for c in range(num_classes)]
    np.testing.assert_allclose(out["specificity_per_class"], spec)
    assert out["specificity"] == pytest.approx(np.mean(spec))
    assert out["num_examples"] == len(labels)


def test_absent_class_gives_nan_and_macro_over_present():
    probs, labels = realistic_scores(0, 3, n=400)
    keep = labels != 1
    probs, labels = probs[keep], labels[keep]
    out = classification_metrics(probs, labels)
    assert math.isnan(out["auc_per_class"][1])
    assert math.isnan(out["sensitivity_per_class"][1])
    present = [0, 2]
    assert out["auc"] == pytest.approx(np.mean([out["auc_per_class"][c] for c in present]))
    preds = probs.argmax(axis=1)
    assert out["sensitivity"] == pytest.approx(skm.recall_score(labels, preds, labels=present, average="macro"))
    assert out["f1"] == pytest.approx(skm.f1_score(labels, preds, labels=present, average="macro", zero_division=0))
    assert all(math.isfinite(out[k]) for k in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1"))


def test_perfect_and_random_classifiers():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=3000)
    perfect = _softmax(10.0 * np.eye(3)[labels])
    random = _softmax(rng.standard_normal((3000, 3)))
    for metrics in (classification_metrics, lambda p, y: histogram_metrics(score_histogram(p, y))):
        good = metrics(perfect, labels)
        assert good["auc"] == pytest.approx(1.0)
        for key in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
            assert good[key] == pytest.approx(1.0)
        bad = metrics(random, labels)
        assert bad["auc"] == pytest.approx(0.5, abs=0.03)
        assert bad["accuracy"] == pytest.approx(1 / 3, abs=0.03)


# ---------------------------------------------------------------- histograms


@pytest.mark.parametrize("num_classes", [2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("separation,noise", [(1.0, 1.0), (2.5, 1.0), (2.0, 1.5)])
def test_histogram_auc_close_to_exact(seed, num_classes, separation, noise):
    probs, labels = realistic_scores(seed, num_classes, n=3000, separation=separation, noise=noise)
    exact = classification_metrics(probs, labels)
    binned = histogram_metrics(score_histogram(probs, labels, num_bins=200))
    assert binned["auc"] == pytest.approx(exact["auc"], abs=0.005)
    np.testing.assert_allclose(binned["auc_per_class"], exact["auc_per_class"], atol=0.005)
    # Everything else comes from the confusion matrix: identical.
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "num_examples"):
        assert binned[key] == pytest.approx(exact[key], abs=1e-12)
    for key in ("sensitivity_per_class", "specificity_per_class"):
        np.testing.assert_allclose(binned[key], exact[key])


def test_histogram_with_distinct_bins_is_exact():
    # When no two scores of a class share a bin, the binned ROC is the exact one.
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=50)
    p1 = (rng.permutation(1000)[:50] + 0.5) / 1000
    probs = np.stack([1 - p1, p1], axis=1)
    binned = histogram_metrics(score_histogram(probs, labels, num_bins=1000))
    assert binned["auc"] == pytest.approx(classification_metrics(probs, labels)["auc"], abs=1e-12)


def test_histograms_of_split_data_add_to_whole():
    probs, labels = realistic_scores(7, 3, n=1000)
    cuts = [0, 120, 121, 600, 1000]  # includes a one-image site
    parts = [score_histogram(probs[a:b], labels[a:b], num_bins=50) for a, b in zip(cuts, cuts[1:])]
    total = sum(parts[1:], parts[0])
    whole = score_histogram(probs, labels, num_bins=50)
    for field in ("positives", "negatives", "confusion"):
        np.testing.assert_array_equal(getattr(total, field), getattr(whole, field))
    assert histogram_metrics(total) == histogram_metrics(whole)
    assert (total.num_classes, total.num_bins, total.num_examples) == (3, 50, 1000)


def test_histogram_counts_and_edges():
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0 + 1e-9, -1e-9]])
    labels = np.array([0, 1, 0, 1])
    hist = score_histogram(probs, labels, num_bins=4)
    assert hist.positives.dtype == np.int64
    # Scores are clipped to [0, 1]; 1.0 falls in the last bin.
    np.testing.assert_array_equal(hist.positives, [[0, 0, 1, 1], [1, 0, 0, 1]])
    np.testing.assert_array_equal(hist.negatives, [[1, 0, 0, 1], [1, 0, 1, 0]])
    np.testing.assert_array_equal(hist.confusion, [[2, 0], [1, 1]])
    assert hist.positives.sum(axis=1).tolist() == np.bincount(labels).tolist()


def test_histogram_shape_errors():
    a = score_histogram(*realistic_scores(0, 3, n=20), num_bins=10)
    b = score_histogram(*realistic_scores(0, 3, n=20), num_bins=20)
    with pytest.raises(ValueError):
        a + b
    with pytest.raises(ValueError):
        ScoreHistogram(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        score_histogram(np.full((2, 2), 0.5), np.array([0, 2]))
