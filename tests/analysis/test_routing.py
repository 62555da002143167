"""Routing tables against a direct count over the recorded routing; NMI against its definition and scikit-learn."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from dex.analysis.routing import layer_nmi, normalized_mutual_information, routing_tables, usage_entropy
from dex.data.recipe import MODALITIES
from tests.conftest import tiny_vit


def nmi_from_pairs(pairs: list[tuple[int, int]]) -> float:
    n = len(pairs)
    joint, left, right = Counter(pairs), Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    mutual = sum(c / n * math.log((c / n) / (left[a] / n * right[b] / n)) for (a, b), c in joint.items())
    h = lambda counts: -sum(c / n * math.log(c / n) for c in counts.values())  # noqa: E731
    return mutual / ((h(left) + h(right)) / 2)


def test_nmi_matches_its_definition():
    torch.manual_seed(0)
    pairs = [(int(m), int(torch.randint(0, 4, ()) if m < 2 else m + 1)) for m in torch.randint(0, 3, (200,))]
    table = torch.zeros(3, 5)
    for m, e in pairs:
        table[m, e] += 1
    assert normalized_mutual_information(table) == pytest.approx(nmi_from_pairs(pairs))
    modality, expert = zip(*pairs)
    assert normalized_mutual_information(table) == pytest.approx(normalized_mutual_info_score(modality, expert))
    assert normalized_mutual_information(torch.eye(4) * 10) == pytest.approx(1.0)  # one expert per modality
    assert normalized_mutual_information(torch.ones(4, 4)) == pytest.approx(0.0)  # everyone alike


def test_routing_tables_equal_a_direct_count():
    torch.manual_seed(1)
    encoder = tiny_vit()
    batches = [{"image": torch.randn(4, 3, 32, 32), "modality": torch.tensor([0, 1, 1, 5])} for _ in range(3)]
    tables = routing_tables(encoder, batches)
    assert tables.shape == (3, len(MODALITIES), 4)
    expected = torch.zeros_like(tables)
    for batch in batches:
        encoder.eval().forward_features(batch["image"])
        for layer, routing in enumerate(encoder.last_routing):
            for i, modality in enumerate(batch["modality"].tolist()):
                for k in range(routing.indices.shape[1]):
                    expected[layer, modality, routing.indices[i, k]] += float(routing.weights[i, k])
    torch.testing.assert_close(tables, expected)
    assert tables[:, 0].sum(-1).tolist() == pytest.approx([3.0] * 3)  # 3 images of modality 0, weights sum to 1
    assert len(layer_nmi(tables)) == 3 and all(0 <= v <= 1 for v in usage_entropy(tables))
