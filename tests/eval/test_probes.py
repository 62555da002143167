"""The frozen-feature classifiers against direct computations, and the metrics they are scored by against
scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dex.downstream.metrics import (
    bootstrap_indices,
    bootstrap_intervals,
    classification_metric_draws,
    classification_metrics,
    paired_gain_interval,
    score_interval,
)
from dex.eval.probes import LINEAR_C, _logistic, fewshot_indices, knn_probabilities, linear_probe


def test_knn_matches_a_direct_weighted_vote():
    rng = np.random.default_rng(0)
    train, labels, query = rng.normal(size=(30, 6)), rng.integers(0, 3, 30), rng.normal(size=(7, 6))
    got = knn_probabilities(train, labels, query, 3, k=5, temperature=0.07)
    for row, q in zip(got, query):
        similarity = train @ q / (np.linalg.norm(train, axis=1) * np.linalg.norm(q))
        nearest = np.argsort(-similarity)[:5]
        votes = np.zeros(3)
        for i in nearest:
            votes[labels[i]] += np.exp(similarity[i] / 0.07)
        np.testing.assert_allclose(row, votes / votes.sum(), rtol=1e-5)
    assert knn_probabilities(train, labels, query, 3, k=100).shape == (7, 3)  # k capped at the training set


def _accuracy(probs, labels):
    return float((probs.argmax(1) == labels).mean())


def test_the_linear_probe_recovers_a_linear_rule_and_picks_c_on_validation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8)) * rng.uniform(0.5, 20, 8)  # scales far apart: the probe standardises
    w = rng.normal(size=(8, 3))
    y = np.argmax((x / x.std(0)) @ w, axis=1)
    train, val, test = slice(0, 300), slice(300, 450), slice(450, 600)
    val_probs, test_probs, c = linear_probe(x[train], y[train], x[val], y[val], x[test], 3, _accuracy)
    assert _accuracy(test_probs, y[test]) > 0.93 and np.allclose(test_probs.sum(1), 1)
    scores = {}
    for candidate in LINEAR_C:
        scores[candidate] = linear_probe(x[train], y[train], x[val], y[val], x[test], 3, _accuracy, [candidate])[0]
    assert c == max(LINEAR_C, key=lambda v: (_accuracy(scores[v], y[val]), -LINEAR_C.index(v)))
    np.testing.assert_array_equal(val_probs, scores[c])


def test_a_training_set_of_one_class_gives_that_class():
    rng = np.random.default_rng(2)
    val_probs, test_probs, c = linear_probe(rng.normal(size=(4, 3)), np.full(4, 2), rng.normal(size=(5, 3)),
                                            np.arange(5) % 3, rng.normal(size=(6, 3)), 3, _accuracy)
    assert c is None and val_probs.shape == (5, 3) and (test_probs.argmax(1) == 2).all()
    np.testing.assert_array_equal(test_probs.sum(1), 1)


def test_a_score_interval_holds_the_score_and_narrows_with_more_images():
    rng = np.random.default_rng(3)

    def outputs(count):
        labels = rng.integers(0, 2, count)
        right = rng.random(count) < 0.8
        probs = np.where((labels == 1) == right, 0.9, 0.1)
        return {"ids": [str(i) for i in range(count)], "labels": labels.tolist(),
                "probabilities": np.stack([1 - probs, probs], 1).tolist()}

    small, large = outputs(40), outputs(400)
    for run in (small, large):
        accuracy = float(np.mean(np.argmax(run["probabilities"], 1) == run["labels"]))
        low, high = score_interval(run, "accuracy", resamples=500)
        assert low <= accuracy <= high
    assert np.diff(score_interval(large, "accuracy", resamples=500)) < np.diff(score_interval(small, "accuracy",
                                                                                            resamples=500))
    assert score_interval({}, "accuracy") is None
    dice = {"ids": ["a", "b", "c"], "dice": [[1.0], [0.5], [0.0]]}
    assert score_interval(dice, "dice", resamples=200)[0] < 0.5 < score_interval(dice, "dice", resamples=200)[1]


def test_the_linear_probe_passes_l2_regularisation_of_strength_c_to_scikit_learn():
    params = _logistic(0.1, 3).get_params()
    assert params["C"] == 0.1 and params["l1_ratio"] in (0, 0.0, None) and params["solver"] == "lbfgs"
    assert params["fit_intercept"] and params["max_iter"] == 1000 and params["tol"] == 1e-4
    assert params["random_state"] == 3
    assert params["penalty"] in ("l2", "deprecated")  # scikit-learn >= 1.8: L2 by l1_ratio = 0


def test_a_class_missing_from_the_training_set_gets_probability_zero():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 3)), np.repeat([0, 2], 20)
    _, test_probs, _ = linear_probe(x, y, x, y, x[:5], 3, _accuracy, [1.0])
    assert test_probs.shape == (5, 3) and np.all(test_probs[:, 1] == 0)


def test_fewshot_draws_are_reproducible_per_class_and_differ_between_draws():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 8)
    draws = fewshot_indices(labels, 5, 5, seed=4)
    assert [d.tolist() for d in draws] == [d.tolist() for d in fewshot_indices(labels, 5, 5, seed=4)]
    for d in draws:
        assert np.bincount(labels[d]).tolist() == [5, 3, 5] and len(set(d.tolist())) == len(d)
    assert len({tuple(d) for d in draws}) > 1
    assert fewshot_indices(labels, 5, 1, seed=5)[0].tolist() != draws[0].tolist()


def test_auroc_and_balanced_accuracy_match_scikit_learn():
    rng = np.random.default_rng(3)
    for classes in (2, 4):
        target = rng.integers(0, classes, 80)
        logits = rng.normal(size=(80, classes)) + 1.5 * np.eye(classes)[target]
        metrics = classification_metrics(torch.from_numpy(logits), torch.from_numpy(target))
        probs = torch.from_numpy(logits).softmax(1).numpy()
        expected = (roc_auc_score(target, probs[:, 1]) if classes == 2
                    else roc_auc_score(target, probs, multi_class="ovr", average="macro"))
        assert metrics["auroc"] == pytest.approx(expected, abs=1e-5)
        recall = np.mean([(probs.argmax(1)[target == c] == c).mean() for c in range(classes)])
        assert metrics["balanced_accuracy"] == pytest.approx(recall, abs=1e-6)


def test_a_bootstrap_interval_holds_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(5)
    widths = []
    for count in (40, 640):
        correct = rng.random(count) < 0.7
        low, high = bootstrap_intervals(lambda idx: {"accuracy": float(correct[idx].mean())}, count, 500,
                                        seed=0)["accuracy"]
        assert low <= correct.mean() <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


@pytest.mark.parametrize("classes,count", [(2, 30), (4, 25), (5, 12)])
def test_the_vectorised_bootstrap_metrics_equal_the_metrics_of_each_resample(classes, count):
    rng = np.random.default_rng(classes)
    target = torch.from_numpy(rng.integers(0, classes - 1 if classes > 3 else classes, count))  # a class never true
    logits = torch.from_numpy(rng.normal(size=(count, classes)).astype(np.float32))
    logits[:3] = logits[:3].round()  # ties
    indices = bootstrap_indices(count, 60, seed=1)
    draws = classification_metric_draws(logits, target, indices)
    for r, row in enumerate(indices):
        expected = classification_metrics(logits[row], target[row])
        for name, value in expected.items():
            got = draws[name][r]
            assert (np.isnan(value) and np.isnan(got)) or got == pytest.approx(value, abs=2e-6), (name, r)


def test_the_bootstrap_draws_are_those_of_one_draw_at_a_time():
    generator = np.random.default_rng(7)
    sequential = np.stack([generator.integers(0, 13, 13) for _ in range(20)])
    np.testing.assert_array_equal(bootstrap_indices(13, 20, seed=7), sequential)


def test_the_paired_gain_interval_resamples_both_runs_on_the_same_images():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, 60)
    good = np.eye(3)[labels] * 0.8 + 0.2 / 3  # always right
    noisy = rng.dirichlet(np.ones(3), 60)
    ids = [f"i{n}" for n in range(60)]
    base = {"ids": ids, "labels": labels.tolist(), "probabilities": noisy.tolist()}
    other = {"ids": ids, "labels": labels.tolist(), "probabilities": good.tolist()}
    low, high = paired_gain_interval(base, other, "accuracy", resamples=300)
    indices = bootstrap_indices(60, 300, 0)
    diffs = [float((good[i].argmax(1) == labels[i]).mean() - (noisy[i].argmax(1) == labels[i]).mean())
             for i in indices]
    assert [low, high] == pytest.approx(list(np.quantile(diffs, [0.025, 0.975])), abs=1e-9)
    assert low > 0  # a real gain is told apart
    assert paired_gain_interval(base, base, "accuracy", resamples=50) == [0.0, 0.0]
    assert paired_gain_interval(base, {**other, "ids": ids[::-1]}, "accuracy") is None  # other images: no pairing
    dice = {"ids": ids, "dice": rng.random((60, 2)).tolist()}
    low, high = paired_gain_interval(dice, {"ids": ids, "dice": (np.array(dice["dice"]) + 0.1).tolist()}, "dice")
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
