"""Figures of the analyses and reports (matplotlib, written as PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dex.data.preprocess import Preprocessing
from dex.data.recipe import MODALITIES
from dex.figures import plt, save_figure
from dex.models import DEXSettings


def display(image: torch.Tensor, preprocessing: Preprocessing | None = None) -> np.ndarray:
    """A z-scored [3, H, W] model input (by ``preprocessing``, the default one if None) back to an [H, W, 3]
    picture in [0, 1]."""
    return (preprocessing or Preprocessing()).unnormalize(image.cpu()).permute(1, 2, 0).numpy()


def run_top_k(model_args: dict) -> int | None:
    """The K of a pretraining run's ``model_args`` when one K serves every block; None for per-block K or no experts."""
    settings = DEXSettings.from_model_args(model_args)
    return settings.top_k if isinstance(settings.top_k, int) and settings.num_experts else None


def training_curves(rows: list[dict], path: Path, top_k: int | None = None,
                    terms: tuple[str, ...] = ("reconstruction", "alignment", "balance"),
                    routing_keys: tuple[str, ...] = ()) -> None:
    """A run's ``log.jsonl`` rows: the loss with its first term, one panel per other loss term (``terms``, the
    objective's), and what the run logged of its routing: per-layer DEX expert usage entropy, and in one panel the
    shares of ``routing_keys`` that the last row holds (the objective's
    :attr:`~dex.train.objective.Objective.routing_log_keys`: M-IDoL's load entropy and view agreement, MedMoE's
    agreement with the report type...). ``top_k`` (the run's K, when the same in every layer) marks the balance
    loss of a perfectly balanced DEX routing."""
    steps = [r["step"] for r in rows]
    entropy = np.array([r["usage_entropy"] for r in rows if r.get("usage_entropy")])
    projector = [key for key in routing_keys if key in rows[-1]]
    panels = len(terms) + (1 if entropy.size else 0) + (1 if projector else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    for key in ("loss", terms[0]):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set(title="loss", xlabel="step", yscale="log")
    axes[0].legend()
    for ax, term in zip(axes[1:], terms[1:]):
        ax.plot(steps, [r[term] for r in rows])
        ax.set(title=term, xlabel="step")
        if term == "balance" and top_k is not None:
            ax.axhline(top_k, color="grey", linestyle="--", label=f"balanced (K = {top_k})")
            ax.legend()
    panel = len(terms)
    if entropy.size:
        ax = axes[panel]
        layers = entropy.shape[1]
        for layer in range(layers):
            ax.plot(steps[-len(entropy):], entropy[:, layer], color=plt.cm.viridis(layer / max(layers - 1, 1)),
                    label=f"layer {layer + 1}" if layer in (0, layers - 1) else None)
        ax.set(title="expert usage entropy / log R", xlabel="step", ylim=(0, 1.05))
        ax.legend()
        panel += 1
    if projector:
        ax = axes[panel]
        for key in projector:
            ax.plot(steps, [r.get(key, np.nan) for r in rows], label=key)
        ax.set(title="routing of the heads", xlabel="step", ylim=(0, 1.05))
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def feature_map(points: np.ndarray, labels: Sequence[str], path: Path, experts: Sequence[int] | None = None) -> None:
    """A 2D map of features ([N, 2], e.g. t-SNE) coloured by modality and, when given, by routed expert."""
    panels = [("modality", list(labels))] + ([("expert", [f"expert {e}" for e in experts])] if experts is not None
                                             else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels):
        names = sorted(set(groups))
        colours = plt.cm.tab10 if len(names) <= 10 else plt.cm.tab20
        for i, name in enumerate(names):
            chosen = np.array([g == name for g in groups])
            ax.scatter(points[chosen, 0], points[chosen, 1], s=9, color=colours(i % colours.N), label=name)
        ax.set(title=f"features by {title}", xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def routing_heatmaps(tables: torch.Tensor, path: Path) -> None:
    """Fig. 9: for every DEX layer, each modality's share of activation per expert."""
    layers = tables.shape[0]
    columns = min(layers, 4)
    rows = -(-layers // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows), squeeze=False)
    present = [i for i in range(tables.shape[1]) if tables[:, i].sum() > 0]
    for layer, ax in enumerate(axes.flat):
        if layer >= layers:
            ax.axis("off")
            continue
        table = tables[layer][present]
        shares = table / table.sum(1, keepdim=True).clamp_min(1e-9)
        image = ax.imshow(shares.numpy(), cmap="magma", vmin=0, vmax=1)
        ax.set(title=f"layer {layer + 1}", xlabel="expert", yticks=range(len(present)),
               yticklabels=[MODALITIES[i] for i in present])
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.colorbar(image, cax=fig.add_axes((0.95, 0.3, 0.012, 0.4)), label="share of the modality's activation")
    save_figure(fig, path)


def attention_grid(examples: list[tuple[str, torch.Tensor, torch.Tensor]], query: tuple[int, int], patch: int,
                   path: Path, preprocessing: Preprocessing | None = None) -> None:
    """Fig. 6: per modality, the image (a model input by ``preprocessing``, shown by :func:`display`) and the last
    block's attention of the query patch (star) over it."""
    fig, axes = plt.subplots(len(examples), 2, figsize=(5, 2.5 * len(examples)), squeeze=False)
    for (name, image, attention), (left, right) in zip(examples, axes):
        picture = display(image, preprocessing)
        for ax in (left, right):
            ax.imshow(picture)
            ax.plot((query[1] + 0.5) * patch, (query[0] + 0.5) * patch, marker="*", color="yellow", markersize=12)
            ax.axis("off")
        right.imshow(attention.numpy(), cmap="jet", alpha=0.5)
        left.set_title(name, fontsize=9, loc="left")
    fig.tight_layout()
    save_figure(fig, path)


def pattern_grid(rows: list[tuple[str, list[list[np.ndarray]]]], path: Path) -> None:
    """Fig. 7: per modality, a few patches of each feature cluster (clusters side by side)."""
    columns = max(sum(len(c) for c in clusters) for _, clusters in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.9, len(rows) * 1.0), squeeze=False)
    for (name, clusters), line in zip(rows, axes):
        cells = [(c, patch) for c, patches in enumerate(clusters) for patch in patches]
        for ax in line:
            ax.axis("off")
        for ax, (cluster, patch) in zip(line, cells):
            ax.imshow(patch)
            ax.set_title(f"c{cluster}", fontsize=6)
        line[0].text(-0.3, 0.5, name, transform=line[0].transAxes, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def cost_curves(cost: dict, path: Path) -> None:
    """Fig. 8: extra forward GFLOPs over the plain ViT, image-wise vs token-wise, by image size and by batch, and the
    part of each spent in routing."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, key, label in ((axes[0], "by_size", "img_size"), (axes[1], "by_batch", "batch")):
        xs = [r[label] for r in cost[key]]
        for mode, marker in (("image", "o"), ("token", "x")):
            ax.plot(xs, [r[f"{mode}_extra"] / 1e9 for r in cost[key]], marker=marker, label=f"{mode}-wise")
        for mode, color in (("image", "C0"), ("token", "C1")):
            ax.plot(xs, [r[f"{mode}_routing"] / 1e9 for r in cost[key]], marker=".", linestyle=":", color=color,
                    label=f"{mode}-wise: routing only")
        ax.plot(xs, [r["vit"] / 1e9 for r in cost[key]], linestyle="--", color="grey", label="plain ViT (total)")
        ax.set(xlabel=label.replace("_", " "), ylabel="GFLOP", yscale="log",
               title=f"extra over the plain ViT, K = {cost['top_k']} of R = {cost['num_experts']}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path)


def collapse_curves(results: dict[str, list[dict]], path: Path) -> None:
    """Per layer, the modality probe's accuracy and the between-modality share of variance, per encoder."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in results.items():
        layers = [r["layer"] for r in rows]
        axes[0].plot(layers, [r["probe_accuracy"] for r in rows], marker="o", label=name)
        axes[1].plot(layers, [r["between_share"] for r in rows], marker="o", label=name)
    axes[0].set(xlabel="layer", ylabel="accuracy", title="linear probe: modality from features", ylim=(0, 1.05))
    axes[1].set(xlabel="layer", ylabel="share", title="variance between modalities / total", ylim=(0, 1.05))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
