"""Figures and numbers of a pretraining run for docs/pretraining.md: loss curves, routing balance per layer over
training, and how specialised the final routing is (NMI between modality and chosen experts per layer, against the
same architecture at initialisation), with the final routing tables as heatmaps (the paper's Fig. 9).

    python scripts/pretrain_report.py RUN_DIR --data CURATED_DIR [--images 1000] [--out docs/images/pretrain]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import dex  # noqa: E402
from dex.analysis.routing import layer_nmi, routing_tables, usage_entropy  # noqa: E402
from dex.config import load_config  # noqa: E402
from dex.data.recipe import MODALITIES  # noqa: E402
from dex.data.stream import CuratedImages  # noqa: E402
from dex.data.transforms import EvalTransform  # noqa: E402
from dex.train.pretrain import PretrainConfig, build_mae  # noqa: E402


def curves(rows: list[dict], out: Path) -> None:
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "reconstruction"):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set(title="MAE-DEX loss (Eq. 8)", xlabel="step", yscale="log")
    axes[0].legend()
    axes[1].plot(steps, [r["alignment"] for r in rows], label="alignment (1/L sum alpha_l L_co)")
    axes[1].plot(steps, [r["balance"] / 2 for r in rows], label="balance / K (1 = balanced)")
    axes[1].set(title="auxiliary losses", xlabel="step")
    axes[1].legend()
    entropy = torch.tensor([r["usage_entropy"] for r in rows])
    for layer in range(entropy.shape[1]):
        axes[2].plot(steps, entropy[:, layer], color=plt.cm.viridis(layer / max(entropy.shape[1] - 1, 1)),
                     label=f"layer {layer + 1}" if layer in (0, entropy.shape[1] - 1) else None)
    axes[2].set(title="expert usage entropy / log R", xlabel="step", ylim=(0, 1.05))
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def heatmaps(tables: torch.Tensor, out: Path) -> None:
    layers = [0, tables.shape[0] // 2, tables.shape[0] - 1]
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4))
    for ax, layer in zip(axes, layers):
        table = tables[layer]
        shares = table / table.sum(1, keepdim=True).clamp_min(1e-9)
        ax.imshow(shares, cmap="magma", vmin=0, vmax=max(0.5, float(shares.max())))
        ax.set(title=f"layer {layer + 1}: share of each modality's activation", xlabel="expert",
               yticks=range(len(MODALITIES)), yticklabels=MODALITIES)
    fig.tight_layout()
    fig.savefig(out / "routing.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("docs/images/pretrain"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (args.run_dir / "log.jsonl").read_text().splitlines()]
    curves(rows, args.out)
    trained = dex.load_pretrained(args.run_dir / "encoder")
    config = load_config(PretrainConfig, args.run_dir / "config.yaml")
    torch.manual_seed(config.seed)
    initial = build_mae(config).encoder
    size = trained.patch_embed.img_size[0]

    def batches():
        data = CuratedImages(args.data, EvalTransform(size), seed=1, batch_size=64)
        return DataLoader(data, batch_size=64)

    tables = {name: routing_tables(model, batches(), max_images=args.images)
              for name, model in (("initial", initial), ("trained", trained))}
    heatmaps(tables["trained"], args.out)
    nmi = {name: layer_nmi(t) for name, t in tables.items()}
    balance = usage_entropy(tables["trained"])
    print("| layer | NMI at initialisation | NMI trained | usage entropy / log R (trained) |")
    print("| ---: | ---: | ---: | ---: |")
    for layer, (a, b, c) in enumerate(zip(nmi["initial"], nmi["trained"], balance), start=1):
        print(f"| {layer} | {a:.3f} | {b:.3f} | {c:.3f} |")
    first, last = rows[0], rows[-1]
    print(f"\nsteps {last['step']}, loss {first['loss']:.4f} -> {last['loss']:.4f}, "
          f"reconstruction {first['reconstruction']:.4f} -> {last['reconstruction']:.4f}, "
          f"alignment {first['alignment']:.4f} -> {last['alignment']:.4f}, skipped {last['skipped']}, "
          f"{last['images_per_s']:.0f} images/s")


if __name__ == "__main__":
    main()
