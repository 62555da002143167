"""M-IDoL's diagnostics: alignment, uniformity and spread against direct formulas, NMI against scikit-learn, and
``dex analyze`` of an M-IDoL run (its routed projector read from the run's checkpoint)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from dex.analysis.subspaces import alignment, spread, subspace_diagnostics, uniformity
from dex.cli import main
from dex.train.objectives import load_pretrain_config
from dex.train.pretrain import pretrain
from tests.train.test_midol import TINY


def test_alignment_uniformity_and_spread_against_direct_formulas():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(7, 5), dim=-1), F.normalize(torch.randn(7, 5), dim=-1)
    assert alignment(a, b) == pytest.approx(sum(float((a[i] - b[i]).norm() ** 2) for i in range(7)) / 7, rel=1e-6)
    pairs = [math.exp(-2 * float((a[i] - a[j]).norm() ** 2)) for i, j in itertools.combinations(range(7), 2)]
    assert uniformity(a) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-6)
    mean = a.mean(0)
    assert spread(a) == pytest.approx(sum(float((a[i] - mean).norm() ** 2) for i in range(7)) / 7, rel=1e-6)
    assert math.isnan(uniformity(a[:1]))
    # identical features: perfectly aligned, no spread, the worst uniformity (0)
    same = a[:1].expand(4, -1)
    assert alignment(same, same) == 0 and spread(same) == pytest.approx(0, abs=1e-12)
    assert uniformity(same) == pytest.approx(0, abs=1e-12)


def test_nmi_of_experts_and_modalities_equals_scikit_learn():
    torch.manual_seed(1)
    labels = torch.randint(0, 4, (60,))
    experts = (labels + (torch.rand(60) < 0.3).long()) % 5
    features = F.normalize(torch.randn(60, 8), dim=-1)
    result = subspace_diagnostics(features, (features, features), labels, ["a", "b", "c", "d"], experts, 5)
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(labels.numpy(), experts.numpy()), rel=1e-9)
    assert sum(result["expert_load"]) == pytest.approx(1.0) and len(result["expert_load"]) == 5
    assert sum(map(sum, result["expert_table"].values())) == 60
    routed_by_modality = subspace_diagnostics(features, (features, features), labels, ["a", "b", "c", "d"],
                                              labels, 5)
    assert routed_by_modality["nmi"] == pytest.approx(1.0)
    assert all(r["alignment"] == 0 for r in routed_by_modality["per_modality"])


def test_analyze_an_midol_run_reports_specificity_from_its_projector(phantom_collection, tmp_path):
    run = tmp_path / "midol"
    pretrain(load_pretrain_config(None, [*TINY, f"data={phantom_collection / 'curated'}", "epochs=2",
                                         "checkpoint_every=0", f"out_dir={run}"]))
    out = tmp_path / "analysis"
    code = main(["analyze", str(run), str(phantom_collection / "curated"), "--out", str(out), "--per-modality", "6",
                 "--clusters", "2", "--cost-model", "dex_vit_tiny_patch16_256"])
    assert code == 0
    result = json.loads((out / "analysis.json").read_text())
    sub = result["subspaces"]["midol"]
    table = sub["expert_table"]
    assert len(table) == 10 and all(sum(row) == 6 for row in table.values()) and len(sub["expert_load"]) == 5
    labels = [m for m, row in table.items() for e, n in enumerate(row) for _ in range(n)]
    experts = [e for row in table.values() for e, n in enumerate(row) for _ in range(n)]
    assert sub["nmi"] == pytest.approx(normalized_mutual_info_score(labels, experts), rel=1e-9)
    markdown = (out / "analysis.md").read_text()
    assert "NMI(routed expert; modality)" in markdown and "| midol | all |" in markdown
    assert "routing" not in result  # a plain ViT backbone has no DEX routing
