"""The analyses of ``dex analyze``: cost against the closed form, attention against timm's own attention weights,
pattern layout, collapse diagnostics against direct formulas, and the whole command on a tiny encoder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dex.analysis.analyze import markdown, shared_experts
from dex.analysis.attention import last_layer_attention
from dex.analysis.cost import activation_cost, parameters
from dex.analysis.patterns import pattern_layout
from dex.analysis.collapse import between_share, collapse_diagnostics, probe_accuracy
from dex.analysis.routing import layer_nmi
from dex.cli import main
from dex.models import save_pretrained
from tests.conftest import tiny_vit

TINY = "dex_vit_tiny_patch16_256"  # ViT-Ti: C = 192, H = 768, 12 blocks


def extra_flops(batch: int, tokens: int, activation: str, dim=192, hidden=768, depth=12, experts=8, top_k=2):
    """Closed-form extra forward FLOPs of the experts mode over a plain ViT, per image batch: K expert MLPs instead
    of one (``4 (K-1) B N C H``), the router's linear map on one feature per image or per token (``2 U C R``), and
    the weighted sum of the K outputs (``2 B N K C``)."""
    units = batch if activation == "image" else batch * tokens
    per_layer = 4 * (top_k - 1) * batch * tokens * dim * hidden + 2 * units * dim * experts
    return depth * (per_layer + 2 * batch * tokens * top_k * dim)


def test_activation_cost_matches_the_closed_form():
    cost = activation_cost(TINY, sizes=(32, 64), batches=(1, 3), fixed_size=32, measure=False)
    rows = cost["by_size"] + cost["by_batch"]
    assert [(r["img_size"], r["batch"]) for r in rows] == [(32, 1), (64, 1), (32, 1), (32, 3)]
    for row in rows:
        tokens = (row["img_size"] // 16) ** 2 + 1
        assert row["image_extra"] == extra_flops(row["batch"], tokens, "image")
        assert row["token_extra"] == extra_flops(row["batch"], tokens, "token")
        # routing alone: one C x R map per image per block, or per token
        assert row["image_routing"] == 12 * 2 * row["batch"] * 192 * 8
        assert row["token_routing"] == 12 * 2 * row["batch"] * tokens * 192 * 8
        # the plain ViT: qkv, proj and the MLP (24 N C^2 per block) plus attention (4 N^2 C) and the patch embed
        b, n = row["batch"], tokens
        patch_embed = 2 * b * (n - 1) * 3 * 16 * 16 * 192
        assert row["vit"] == 12 * b * (24 * n * 192 ** 2 + 4 * n * n * 192) + patch_embed
    # parameters: per block R experts and a director of the MLP's shape instead of one MLP, plus the router
    mlp = 2 * 192 * 768 + 768 + 192
    assert cost["parameters"]["dex"] - cost["parameters"]["vit"] == 12 * (8 * mlp + 192 * 8)
    assert parameters(TINY, num_experts=0) == cost["parameters"]["vit"]


def test_measured_forward_times_reach_the_cost_table():
    cost = activation_cost(TINY, sizes=(32,), batches=(2,), fixed_size=32, measure=True, device="cpu")
    for row in cost["by_size"] + cost["by_batch"]:
        assert all(row[f"{name}_s"] > 0 for name in ("vit", "image", "token"))
    result = {"encoder": "e", "data": "d", "images": 0, "modalities": {}, "cost": cost, "collapse": {},
              "subspaces": {}}
    table = [line for line in markdown(result).splitlines() if line.startswith("| 32 | 2 |")]
    assert len(table) == 1 and len(table[0].split("|")) == 12  # 10 columns: sizes, FLOPs, routing and 3 times


def test_attention_equals_timm_attention_weights():
    encoder = tiny_vit(mode="experts").eval()
    images = torch.randn(2, 3, 32, 32)
    attention = encoder.blocks[-1].attn
    attention.fused_attn = False  # timm's explicit path, whose softmax goes through attn_drop
    captured = {}
    handle = attention.attn_drop.register_forward_hook(lambda m, args, out: captured.setdefault("attn", args[0]))
    try:
        maps = last_layer_attention(encoder, images, query=(1, 2), smooth=0.0)
    finally:
        handle.remove()
    row = captured["attn"].mean(1)[:, 1 + 1 * 4 + 2, 1:].reshape(2, 1, 4, 4)  # class token first, 4 x 4 grid
    expected = torch.nn.functional.interpolate(row, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert maps.shape == (2, 32, 32)
    torch.testing.assert_close(maps, expected)
    smoothed = last_layer_attention(encoder, images, query=(1, 2), smooth=1.0)
    assert smoothed.sum().item() == pytest.approx(maps.sum().item(), rel=0.05)  # smoothing moves, keeps mass


def test_pattern_layout_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0], [0, 10, 0], [0, 0, 10]])
    truth = rng.integers(0, 3, size=(4, 9))
    features = torch.from_numpy(centres[truth] + rng.normal(0, 0.1, size=(4, 9, 3)))
    labels, representatives = pattern_layout(features, clusters=3, per_cluster=2, seed=0)
    assert labels.shape == (4, 9)
    mapping = {int(t): int(c) for t, c in zip(truth.ravel(), labels.ravel())}
    assert len(set(mapping.values())) == 3 and all(mapping[int(t)] == int(c) for t, c in zip(truth.ravel(),
                                                                                             labels.ravel()))
    for cluster, members in enumerate(representatives):
        assert len(members) == 2 and all(labels[i, p] == cluster for i, p in members)


def test_between_share_and_probe_against_direct_formulas():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 5)) + labels[:, None] * np.array([8.0, 0, 0, 0, 0])
    within = sum(((features[labels == m] - features[labels == m].mean(0)) ** 2).sum() for m in range(3))
    total = ((features - features.mean(0)) ** 2).sum()
    assert between_share(features, labels) == pytest.approx(1 - within / total)  # total = between + within
    assert between_share(np.ones((6, 2)), np.array([0, 0, 1, 1, 2, 2])) == 0.0
    assert between_share(labels[:, None].astype(float), labels) == pytest.approx(1.0)
    assert probe_accuracy(features, labels) > 0.9
    assert probe_accuracy(rng.normal(size=(60, 5)), labels) < 0.7  # nothing to find
    rows = collapse_diagnostics([features, rng.normal(size=(60, 5))], labels)
    assert [r["layer"] for r in rows] == [1, 2] and rows[0]["between_share"] > rows[1]["between_share"]


def test_shared_experts_counts_experts_used_by_two_modalities():
    table = torch.tensor([[5.0, 5, 0, 0], [0, 5, 5, 0], [0, 0, 0, 0], [0, 0, 1, 9]])
    assert shared_experts(table) == 2  # expert 1 (modalities 0, 1) and expert 2 (modalities 1, 3)
    assert shared_experts(torch.eye(4)) == 0


def is_png(path) -> bool:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format == "PNG" and min(image.size) > 100 and len(np.unique(np.asarray(image.convert("L")))) > 10


@pytest.fixture(scope="module")
def analysis(phantom_collection, tmp_path_factory):
    """``dex analyze`` of a tiny random DEX encoder on the curated phantoms, with a scratch baseline."""
    root = tmp_path_factory.mktemp("analysis")
    torch.manual_seed(0)
    save_pretrained(tiny_vit(mode="experts"), root / "encoder")
    out = root / "out"
    code = main(["analyze", str(root / "encoder"), str(phantom_collection / "curated"), "--out", str(out),
                 "--compare", "scratch=scratch", "--per-modality", "8", "--clusters", "3", "--cost-model", TINY])
    assert code == 0
    return out


def test_analyze_writes_every_figure_and_number(analysis):
    result = json.loads((analysis / "analysis.json").read_text())
    assert result["images"] == sum(result["modalities"].values()) and len(result["modalities"]) == 10
    assert all(count == 8 for count in result["modalities"].values())
    tables = torch.tensor(result["routing_tables"])
    assert tables.shape == (3, 10, 4)
    assert tables.sum((1, 2)).tolist() == pytest.approx([80.0] * 3)  # every image's weights sum to 1, per layer
    assert [r["nmi"] for r in result["routing"]] == pytest.approx(layer_nmi(tables))
    assert set(result["collapse"]) == {"encoder", "scratch"}
    for rows in result["collapse"].values():
        assert len(rows) == 3
        assert all(0 <= r["probe_accuracy"] <= 1 and 0 <= r["between_share"] <= 1 for r in rows)
    assert set(result["subspaces"]) == {"encoder", "scratch"}
    for sub in result["subspaces"].values():  # no routed projector: diversity only
        assert "nmi" not in sub and [r["modality"] for r in sub["per_modality"]] == list(result["modalities"])
        assert all(r["images"] == 8 and 0 <= r["spread"] <= 4 and r["uniformity"] <= 0 for r in sub["per_modality"])
    for figure in ("routing", "attention", "patterns", "cost", "collapse", "subspaces"):
        assert is_png(analysis / f"{figure}.png"), figure
    markdown = (analysis / "analysis.md").read_text()
    assert len(re.findall(r"^\| scratch \| \d+ \|", markdown, re.M)) == 3 and "## Routing (Fig. 9)" in markdown
    assert markdown.count("| scratch | all |") == 1


def test_analyze_reports_bad_input(tmp_path, capsys):
    assert main(["analyze", "scratch", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["analyze", "scratch", str(tmp_path), "--out", str(tmp_path), "--compare", "oops"]) == 2
    assert "NAME=SOURCE" in capsys.readouterr().err
    assert main(["analyze", "scratch", str(tmp_path), "--out", str(tmp_path), "--compare", "scratch=scratch"]) == 2
    assert "both named 'scratch'" in capsys.readouterr().err
