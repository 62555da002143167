"""``dex vl-eval MODEL PAIRS --out DIR``: a vision-language model (MedMoE) on held-out image-report pairs and on
classification tasks, from its global embeddings:

- retrieval among the held-out pairs, image-to-text and text-to-image Recall@1/5/10 and the median rank, against
  chance (K / N), overall and within each report type (:mod:`dex.eval.retrieval`);
- the report router's agreement with the report type (the share of pairs routed to their type's expert, when the
  model has one expert per type), and the image router's agreement with the report router (what routes an image
  that comes without a report);
- zero-shot classification from class prompts (CLIP's prompt ensembling): of each held-out image's report type, and
  of each classification task given (its test split, or all its images), scored as the benchmark scores
  (macro-F1, accuracy, balanced accuracy, AUROC).

Images are read by the model's own preprocessing, in a fixed order. Writes ``vl_metrics.json`` (every number) and
``vl_metrics.md`` (tables).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dex.data.stream import CuratedImages
from dex.data.tasks import load_task
from dex.downstream.metrics import classification_metrics
from dex.eval.retrieval import class_embeddings, retrieval_metrics, zero_shot_logits
from dex.models.weights import load_preprocessing
from dex.train.runs import load_kept

#: Prompt templates of zero-shot classification (ours); ``{name}`` is the class name, ``{modality}`` the task's.
TEMPLATES = ("{name}", "{modality} image: {name}.", "a {modality} image showing {name}.")
TYPE_TEMPLATES = ("{name}", "{name} image.", "a {name} examination.")


@torch.no_grad()
def _embed_texts(model, texts: list[str], batch_size: int) -> torch.Tensor:
    return torch.cat([model.encode_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])


@torch.no_grad()
def _embed_images(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.encode_images(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def zero_shot(model, images: torch.Tensor, names: Sequence[str], templates: Sequence[str], batch_size: int = 64,
              **fields: str) -> torch.Tensor:
    """[N, C] zero-shot logits of model inputs ``images`` [N, 3, H, W] over ``names`` (the prompts of each class:
    ``templates`` filled with its name and ``fields``)."""
    prompts = [template.format(name=name, **fields) for name in names for template in templates]
    embedded = _embed_texts(model, prompts, batch_size).view(len(names), len(templates), -1)
    return zero_shot_logits(_embed_images(model, images, batch_size), class_embeddings(embedded))


def held_out_pairs(folder: str | Path, preprocessing) -> tuple[torch.Tensor, list[str], list[str]]:
    """Every pair of a curated pair collection: model inputs [N, 3, H, W], reports, report types (a fixed order)."""
    images, reports, types = [], [], []
    for sample in CuratedImages(folder, preprocessing, seed=0, shuffle_buffer=1):
        images.append(sample["image"])
        reports.append(sample["report"])
        types.append(sample["report_type"])
    if not images:
        raise ValueError(f"{folder}: no image-report pairs")
    return torch.stack(images), reports, types


@torch.no_grad()
def evaluate_vision_language(model_folder: str | Path, pairs: str | Path, out: str | Path,
                             tasks: Sequence[str | Path] = (), batch_size: int = 64) -> dict[str, Any]:
    """Run every evaluation of the module's docstring for the MedMoE model of ``model_folder`` (a ``dex export``
    folder or a finished run) on the pair collection ``pairs`` and the classification ``tasks``; write and return
    the results."""
    model_folder, out = Path(model_folder), Path(out)
    model = load_kept(model_folder)
    if model is None:
        raise ValueError(f"{model_folder}: not a vision-language model (a MedMoE export or finished run folder, with "
                         "text/ and heads/)")
    backbone = model_folder / "encoder" if (model_folder / "encoder" / "config.json").is_file() else model_folder
    preprocessing = load_preprocessing(backbone)
    images, reports, types = held_out_pairs(pairs, preprocessing)
    image_embeddings, text_embeddings = _embed_images(model, images, batch_size), _embed_texts(model, reports,
                                                                                               batch_size)
    result: dict[str, Any] = {"model": str(model_folder), "pairs": str(pairs),
                              "retrieval": retrieval_metrics(image_embeddings, text_embeddings), "by_type": {}}
    names = sorted(set(types))
    for name in names:
        rows = [i for i, t in enumerate(types) if t == name]
        result["by_type"][name] = retrieval_metrics(image_embeddings[rows], text_embeddings[rows])
    report_experts, image_experts = [], []
    for start in range(0, len(images), batch_size):
        routing = model.heads["report_router"](model.text.encode(reports[start:start + batch_size]).global_embedding)
        pooled = model.pyramid(images[start:start + batch_size])[1]
        report_experts.append(routing.expert)
        image_experts.append(model.heads["image_router"](pooled).argmax(-1))
    report_experts, image_experts = torch.cat(report_experts), torch.cat(image_experts)
    known = [t for t in types if t in model.type_index]
    routing = {"image_router_agreement": float((image_experts == report_experts).float().mean()),
               "experts": model.heads["experts"].num_experts}
    if len(known) == len(types) and len(model.report_types) == routing["experts"]:
        routing["type_agreement"] = float((report_experts == model.type_indices(types, report_experts.device))
                                          .float().mean())
        routing["type_agreement_chance"] = max(types.count(t) for t in names) / len(types)
    result["routing"] = routing
    type_targets = torch.tensor([names.index(t) for t in types])
    result["zero_shot"] = {"report_type": {
        "classes": names, "templates": list(TYPE_TEMPLATES), "images": len(types),
        **classification_metrics(zero_shot(model, images, names, TYPE_TEMPLATES, batch_size), type_targets),
        "chance_accuracy": max(types.count(t) for t in names) / len(types)}}
    for folder in tasks:
        task = load_task(folder)
        if task.spec.type != "classification":
            raise ValueError(f"{folder}: zero-shot classification needs a classification task, not "
                             f"{task.spec.type}")
        ids = task.splits["test"] or sorted(task.images)
        task_images = torch.stack([preprocessing.read(task.images[i]) for i in ids])
        labels = torch.tensor([task.labels[i] for i in ids])
        logits = zero_shot(model, task_images, task.spec.classes, TEMPLATES, batch_size, modality=task.spec.modality)
        result["zero_shot"][task.name] = {"classes": list(task.spec.classes), "templates": list(TEMPLATES),
                                          "images": len(ids), **classification_metrics(logits, labels),
                                          "chance_accuracy": float(labels.bincount().max() / len(labels))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vl_metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "vl_metrics.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``vl_metrics.md``."""
    retrieval = result["retrieval"]
    lines = [f"# Vision-language evaluation of {result['model']}", "",
             f"{retrieval['pairs']} held-out pairs from {result['pairs']}.", "",
             "## Retrieval (x100; chance K/N)", "",
             "| pairs | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | chance R@1 / R@5 / R@10 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in [("all", retrieval), *result["by_type"].items()]:
        recalls = " | ".join(f"{100 * row[f'{d}_R@{k}']:.1f}" for d in ("i2t", "t2i") for k in (1, 5, 10))
        lines.append(f"| {name} ({row['pairs']}) | " + recalls
                     + " | " + " / ".join(f"{100 * row[f'chance_R@{k}']:.1f}" for k in (1, 5, 10)) + " |")
    routing = result["routing"]
    experts = f"{routing['experts']} expert" + ("s" if routing["experts"] != 1 else "")
    lines += ["", "## Routing", "", f"{experts}; image router agrees with the report router on "
              f"{100 * routing['image_router_agreement']:.1f}% of the pairs"
              + (f"; the report router picks the report type's expert for {100 * routing['type_agreement']:.1f}% "
                 f"(chance {100 * routing['type_agreement_chance']:.1f}%)" if "type_agreement" in routing else "")
              + ".", "", "## Zero-shot classification (x100)", "",
              "| what | images | classes | macro-F1 | accuracy | balanced accuracy | AUROC | chance accuracy |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in result["zero_shot"].items():
        lines.append(f"| {name} | {row['images']} | {len(row['classes'])} | {100 * row['f1_macro']:.1f} | "
                     f"{100 * row['accuracy']:.1f} | {100 * row['balanced_accuracy']:.1f} | {100 * row['auroc']:.1f} | "
                     f"{100 * row['chance_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"
