"""``dex analyze ENCODER DATA --out DIR``: routing (Fig. 9), attention (Fig. 6), pattern layout (Fig. 7), computation
(Fig. 8) and modality-collapse diagnostics (App. A) for an encoder on labelled images. Writes ``analysis.json`` (every
number), ``analysis.md`` (tables) and the figures."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dex.analysis import plots
from dex.analysis.attention import last_layer_attention
from dex.analysis.collapse import collapse_diagnostics, layer_features
from dex.analysis.cost import activation_cost
from dex.analysis.patterns import pattern_layout
from dex.analysis.routing import layer_nmi, routing_tables, usage_entropy
from dex.analysis.subspaces import features_and_experts, subspace_diagnostics, tsne_map
from dex.data.recipe import MODALITIES
from dex.data.stream import CuratedImages, FolderImages
from dex.data.transforms import MultiViewTransform
from dex.downstream.encoders import EncoderSpec, encoder_preprocessing, load_encoder
from dex.models.backbones import final_tokens, input_size, is_vit, token_grid
from dex.train.objective import Objective
from dex.train.runs import run_objective, run_objective_class


def labelled_images(data: str | Path, preprocessing: Callable[[torch.Tensor], torch.Tensor],
                    per_modality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``per_modality`` images of each modality (model inputs by ``preprocessing``, e.g. a
    :class:`~dex.data.preprocess.Preprocessing`: [N, 3, H, W], z-scored) and their modality indices."""
    data = Path(data)
    dataset = (CuratedImages(data, preprocessing, seed=0, shuffle_buffer=4096) if (data / "index.json").is_file()
               else FolderImages(data, preprocessing))
    images, labels, counts = [], [], {}
    iterator = iter(dataset) if isinstance(dataset, CuratedImages) else (dataset[i] for i in range(len(dataset)))
    for sample in iterator:
        modality = sample["modality"]
        if modality < 0 or counts.get(modality, 0) >= per_modality:
            continue
        counts[modality] = counts.get(modality, 0) + 1
        images.append(sample["image"])
        labels.append(modality)
    if not images:
        raise ValueError(f"{data}: no images with a known modality")
    return torch.stack(images), torch.tensor(labels)


def shared_experts(table: torch.Tensor, threshold: float = 0.1) -> int:
    """Experts that take at least ``threshold`` of the activation of two modalities or more."""
    present = table[table.sum(1) > 0]
    shares = present / present.sum(1, keepdim=True)
    return int(((shares >= threshold).sum(0) >= 2).sum())


def _batches(images: torch.Tensor, labels: torch.Tensor, size: int = 64):
    for start in range(0, len(images), size):
        yield {"image": images[start:start + size], "modality": labels[start:start + size]}


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """[..., 3, H, W] model inputs resized (bilinear) to ``size``."""
    flat = images.reshape(-1, *images.shape[-3:])
    return torch.nn.functional.interpolate(flat, size=size, mode="bilinear").reshape(*images.shape[:-2], size, size)


def routed_module(source: str | Path) -> torch.nn.Module | None:
    """The module that routes the encoder's features to experts, of a pretraining run whose objective declares one
    (:meth:`~dex.train.objective.Objective.routed_module`: an M-IDoL run's teacher projector, from the newest
    checkpoint); None for any other source, whose checkpoints are then not read."""
    if not (Path(str(source)) / "config.yaml").is_file():
        return None
    if run_objective_class(source).routed_module is Objective.routed_module:
        return None
    return run_objective(source).routed_module().eval()


def analyze(encoder_source: str, data: str | Path, out: str | Path, compare: dict[str, str] | None = None,
            per_modality: int = 40, clusters: int = 4, cost_model: str = "dex_vit_base_patch16_256",
            seed: int = 0) -> dict[str, Any]:
    """Run every analysis of ``encoder_source`` (any source of :class:`EncoderSpec`) on up to ``per_modality``
    images of each modality in ``data``; ``compare`` maps names to the sources of baselines for the collapse
    diagnostics (``scratch`` is a random plain ViT of the analysed architecture), next to the analysed encoder
    under its folder's name. Returns what analysis.json holds."""
    name = Path(str(encoder_source)).name or "analysed"
    if name in (compare or {}):
        raise ValueError(f"the analysed encoder and a --compare encoder are both named {name!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    spec = EncoderSpec("analysed", encoder_source)
    encoder = load_encoder(spec).eval()
    size = input_size(encoder)[0]
    preprocessing = encoder_preprocessing(spec, encoder)
    views = MultiViewTransform(size)  # two augmented views of every image, for the alignment of its features
    samples, labels = labelled_images(data, lambda image: torch.cat([preprocessing(image)[None], views(image)]),
                                      per_modality)
    images, view_images = samples[:, 0], samples[:, 1:]
    present = sorted(set(labels.tolist()))
    result: dict[str, Any] = {"encoder": str(encoder_source), "data": str(data), "images": len(images),
                              "modalities": {MODALITIES[m]: int((labels == m).sum()) for m in present}}
    if getattr(encoder, "dex_modules", lambda: [])():
        result["routing"], result["routing_tables"] = _routing(encoder, images, labels, out)
    if is_vit(encoder):  # a ViT's global attention; a Swin's is windowed
        result["attention"] = _attention(encoder, images, labels, present, preprocessing, out)
    _patterns(encoder, images, labels, present, preprocessing, clusters, seed, out)
    result["cost"] = activation_cost(cost_model)
    plots.cost_curves(result["cost"], out / "cost.png")
    # modality-collapse diagnostics, side by side with the baselines
    same_shape = dict(model=encoder.pretrained_cfg.get("architecture", "dex_vit_base_patch16_256"), img_size=size,
                      model_args={k: v for k, v in getattr(encoder, "model_args", {}).items() if k != "img_size"})
    encoders = {name: encoder, **{other: load_encoder(EncoderSpec(other, source, **same_shape)).eval()
                                  for other, source in (compare or {}).items()}}
    projector = routed_module(encoder_source)
    result["collapse"], result["subspaces"] = {}, {}
    for label, model in encoders.items():
        result["collapse"][label], result["subspaces"][label] = _features_diagnostics(
            model, images, view_images, labels, size, projector if label == name else None, seed,
            out / "subspaces.png" if label == name else None)
    plots.collapse_curves(result["collapse"], out / "collapse.png")
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "analysis.md").write_text(markdown(result))
    return result


def _routing(encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             out: Path) -> tuple[list[dict[str, Any]], list]:
    """Fig. 9: the expert activation per modality and layer (``routing.png``), and per layer the NMI of modality and
    experts, the usage entropy and the experts shared by modalities."""
    tables = routing_tables(encoder, _batches(images, labels))
    plots.routing_heatmaps(tables, out / "routing.png")
    return ([{"layer": i + 1, "nmi": nmi, "usage_entropy": entropy, "shared_experts": shared_experts(t)}
             for i, (t, nmi, entropy) in enumerate(zip(tables, layer_nmi(tables), usage_entropy(tables)))],
            tables.tolist())


def _attention(encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, present: list[int],
               preprocessing: Callable, out: Path) -> str:
    """Fig. 6: the last block's attention of the centre patch on the first image of each modality."""
    grid = token_grid(encoder)
    query = (grid[0] // 2, grid[1] // 2)
    firsts = [int(torch.nonzero(labels == m)[0]) for m in present]
    attention = last_layer_attention(encoder, images[firsts], query)
    plots.attention_grid([(MODALITIES[m], images[i], a) for m, i, a in zip(present, firsts, attention)], query,
                         input_size(encoder)[0] // grid[1], out / "attention.png", preprocessing)
    return "attention.png"


def _patterns(encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, present: list[int],
              preprocessing: Callable, clusters: int, seed: int, out: Path) -> None:
    """Fig. 7: per modality, the patches nearest to each k-means centre of the final patch tokens."""
    grid = token_grid(encoder)
    patch = input_size(encoder)[0] // grid[1]
    rows = []
    for m in present:
        members = images[labels == m]
        with torch.no_grad():
            tokens = final_tokens(encoder, members)[1]
        _, representatives = pattern_layout(tokens, clusters, 3, seed)
        crops = [[plots.display(members[i], preprocessing)[(p // grid[1]) * patch:(p // grid[1] + 1) * patch,
                                                           (p % grid[1]) * patch:(p % grid[1] + 1) * patch]
                  for i, p in cluster] for cluster in representatives]
        rows.append((MODALITIES[m], crops))
    plots.pattern_grid(rows, out / "patterns.png")


def _features_diagnostics(model: torch.nn.Module, images: torch.Tensor, view_images: torch.Tensor,
                          labels: torch.Tensor, size: int, routed: torch.nn.Module | None, seed: int,
                          feature_map: Path | None) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """One encoder's modality-collapse diagnostics per layer (App. A) and the specificity (with ``routed``, the
    module that routes its features: M-IDoL's projector) and diversity of its features (two views of each image);
    with ``feature_map``, their t-SNE map there. Inputs made at ``size`` are resized to the model's."""
    model_size = input_size(model)[0]
    inputs, model_views = (x if model_size == size else resized(x, model_size) for x in (images, view_images))
    per_layer = [torch.cat(chunk) for chunk in zip(*(layer_features(model, batch["image"])
                                                     for batch in _batches(inputs, labels)))]
    collapse = collapse_diagnostics([f.numpy() for f in per_layer], labels.numpy(), seed)
    features, experts = features_and_experts(model, (b["image"] for b in _batches(inputs, labels)), routed)
    view_features = [features_and_experts(model, (b["image"] for b in _batches(model_views[:, v], labels)))[0]
                     for v in (0, 1)]
    subspaces = subspace_diagnostics(features, tuple(view_features), labels, list(MODALITIES), experts,
                                     routed.num_experts if routed else None)
    if feature_map is not None:
        plots.feature_map(tsne_map(features, seed), [MODALITIES[m] for m in labels.tolist()], feature_map,
                          None if experts is None else experts.tolist())
    return collapse, subspaces


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Analysis of {result['encoder']}", "",
             f"{result['images']} images from {result['data']}: " +
             ", ".join(f"{m} {n}" for m, n in result["modalities"].items()) + ".", ""]
    if "routing" in result:
        lines += ["## Routing (Fig. 9)", "", "![routing](routing.png)", "",
                  "| layer | NMI(modality; experts) | usage entropy / log R | experts shared by 2+ modalities |",
                  "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['layer']} | {r['nmi']:.3f} | {r['usage_entropy']:.3f} | {r['shared_experts']} |"
                  for r in result["routing"]]
        lines.append("")
    lines += ["## Attention of the centre patch, last block (Fig. 6)", "",
              "![attention](attention.png)" if "attention" in result else
              "Not drawn: the encoder's attention is windowed (a Swin), not global.", "",
              "## Pattern layout (Fig. 7)", "", "![patterns](patterns.png)", "",
              "## Computation: image-wise vs token-wise activation (Fig. 8)", "", "![cost](cost.png)", ""]
    cost = result["cost"]
    timed = "vit_s" in cost["by_size"][0]
    lines += ["Extra GFLOP over the plain ViT, and the part of it spent in routing.", "",
              "| image size | batch | plain ViT GFLOP | image-wise extra | token-wise extra | image-wise routing "
              "| token-wise routing |" + (" plain ViT ms | DEX image-wise ms | DEX token-wise ms |" if timed else ""),
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if timed else "")]
    rows = {(r["img_size"], r["batch"]): r for r in cost["by_size"] + cost["by_batch"]}
    for r in rows.values():
        lines.append(f"| {r['img_size']} | {r['batch']} | {r['vit'] / 1e9:.4g} | {r['image_extra'] / 1e9:.4g} | "
                     f"{r['token_extra'] / 1e9:.4g} | {r['image_routing'] / 1e9:.3g} | {r['token_routing'] / 1e9:.3g} |"
                     + (f" {r['vit_s'] * 1e3:.2f} | {r['image_s'] * 1e3:.2f} | {r['token_s'] * 1e3:.2f} |"
                        if timed else ""))
    params = cost["parameters"]
    lines += ["", f"Parameters: plain ViT {params['vit'] / 1e6:.1f} M, DEX {params['dex'] / 1e6:.1f} M "
                  f"(the same for both activations).", "",
              "## Modality collapse (App. A)", "", "![collapse](collapse.png)", "",
              "| encoder | layer | probe accuracy | between-modality share |", "| --- | ---: | ---: | ---: |"]
    for name, rows in result["collapse"].items():
        lines += [f"| {name} | {r['layer']} | {r['probe_accuracy']:.3f} | {r['between_share']:.3f} |" for r in rows]
    lines += ["", "## Specificity and diversity (M-IDoL's claims)", "", "![subspaces](subspaces.png)", ""]
    for name, sub in result["subspaces"].items():
        if "nmi" in sub:
            lines += [f"{name}: NMI(routed expert; modality) {sub['nmi']:.3f}; expert load "
                      + ", ".join(f"{x:.2f}" for x in sub["expert_load"]) + ".", "",
                      "| modality | " + " | ".join(f"expert {k}" for k in range(len(sub["expert_load"]))) + " |",
                      "| --- |" + " ---: |" * len(sub["expert_load"])]
            lines += [f"| {m} | " + " | ".join(map(str, row)) + " |" for m, row in sub["expert_table"].items()]
            lines.append("")
    lines += ["Diversity on L2-normalised pooled features: spread E||f - mean||^2, alignment of two augmented views "
              "(lower: more invariant) and uniformity log E exp(-2||f_i - f_j||^2) (lower: more spread), "
              "per modality.", "",
              "| encoder | modality | images | spread | alignment | uniformity |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, sub in result["subspaces"].items():
        lines += [f"| {name} | {r['modality']} | {r['images']} | {r['spread']:.3f} | {r['alignment']:.3f} | "
                  f"{r['uniformity']:.3f} |" for r in sub["per_modality"]]
        lines.append(f"| {name} | all | | | {sub['alignment']:.3f} | {sub['uniformity']:.3f} |")
    return "\n".join(lines) + "\n"
