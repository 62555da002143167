"""Figures and numbers of a pretraining run for docs/pretraining.md: loss curves, routing balance per layer over
training, and how specialised the final routing is (NMI between modality and chosen experts per layer, against the
same architecture at initialisation), with the final routing tables as heatmaps (the paper's Fig. 9).

    python scripts/pretrain_report.py RUN_DIR --data CURATED_DIR [--images 1000] [--out docs/images/pretrain]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import dex
from dex.analysis.plots import routing_heatmaps, run_top_k, training_curves
from dex.analysis.routing import layer_nmi, routing_tables, usage_entropy
from dex.data.stream import CuratedImages
from dex.models.weights import load_preprocessing
from dex.train.objectives import build_objective, load_pretrain_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("docs/images/pretrain"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (args.run_dir / "log.jsonl").read_text().splitlines()]
    config = load_pretrain_config(args.run_dir / "config.yaml")
    training_curves(rows, args.out / "curves.png", run_top_k(config.model_args))
    trained = dex.load_pretrained(args.run_dir / "encoder")
    torch.manual_seed(config.seed)
    initial = build_objective(config).kept()["encoder"]
    preprocessing = load_preprocessing(args.run_dir / "encoder")

    def batches():
        data = CuratedImages(args.data, preprocessing, seed=1, batch_size=64)
        return DataLoader(data, batch_size=64)

    tables = {name: routing_tables(model, batches(), max_images=args.images)
              for name, model in (("initial", initial), ("trained", trained))}
    routing_heatmaps(tables["trained"], args.out / "routing.png")
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
