"""The ``dex`` command line (also ``python -m dex``)."""

from __future__ import annotations

import argparse
import os
import sys


def _pretrain(args: argparse.Namespace) -> int:
    import logging

    from dex.train.objectives import load_pretrain_config
    from dex.train.pretrain import pretrain, summary

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = load_pretrain_config(args.config, args.set)
    result = pretrain(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(result.run_dir))
    return 0


def _make_phantoms(args: argparse.Namespace) -> int:
    from dex.data.phantoms import make_phantoms

    recipe = make_phantoms(args.out, per_modality=args.per_modality, size=args.size, seed=args.seed,
                           task_images=args.task_images, workers=args.workers)
    print(f"wrote {len(recipe.sources)} raw sources, the recipe {recipe.path} and task folders in {args.out}/tasks")
    return 0


def _curate(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from dex.data.curate import PRIVATE, QUARANTINED_EXIT, CurateOptions, curate, private_folder
    from dex.data.recipe import Recipe

    Recipe.load(args.recipe)  # a bad recipe is refused before anything is written
    out = Path(args.out)
    handler = logging.FileHandler(private_folder(out) / "curate.log")  # its warnings name files: the curator's
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("dex")
    logger.addHandler(handler)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = CurateOptions(min_size=args.min_size, dedup_distance=args.dedup_distance,
                            shard_samples=args.shard_samples)
    try:
        summary = curate(args.recipe, out, workers=args.workers, resume=args.resume, part=args.part, options=options)
    finally:
        logger.removeHandler(handler)
        handler.close()
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(summary.dropped.items())) or "none"
    print(f"written {summary.written} images; dropped: {dropped}; quarantined files: {summary.quarantined}"
          + (f"; sources without a root: {', '.join(summary.skipped_sources)}" if summary.skipped_sources else ""))
    if args.part == "0/1":
        print(f"Table 2 of this collection: {out / 'stats.md'}; training reads {out / 'index.json'}")
    if summary.quarantined:
        print(f"some files were quarantined: see {out / PRIVATE / 'quarantine.csv'}" if args.part == "0/1" else
              f"some files were quarantined: run dex data stats on the folder after every part for "
              f"{PRIVATE}/quarantine.csv")
        return QUARANTINED_EXIT
    return 0


def _import_task(args: argparse.Namespace) -> int:
    import dataclasses

    from dex.data.curate import QUARANTINED_EXIT
    from dex.data.importers import ImportOptions, import_task

    fields = {f.name for f in dataclasses.fields(ImportOptions)}
    options = ImportOptions(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    summary = import_task(args.layout, args.src, args.out, options, resume=args.resume, overwrite=args.overwrite,
                          workers=args.workers)
    splits = ", ".join(f"{summary.splits.get(s, 0)} {s}" for s in ("train", "val", "test"))
    where = f"{len(summary.across_splits)} across splits" if summary.across_splits else "each within one split"
    print(f"wrote {summary.images} images ({splits}) to {summary.out}; {len(summary.duplicates)} near-duplicate "
          f"group(s), {where}")
    if summary.across_splits:
        print(f"warning: {len(summary.across_splits)} near-duplicate group(s) lie on both sides of the source's own "
              f"split (see {summary.out / 'duplicates.csv'}); scores on it may be inflated", file=sys.stderr)
    if summary.problems:
        print(f"{len(summary.problems)} source item(s) could not be imported; see {summary.out / 'problems.csv'} "
              f"(first: {summary.problems[0][0]}: {summary.problems[0][1]})", file=sys.stderr)
        return QUARANTINED_EXIT
    return 0


def _option_flags(parser: argparse.ArgumentParser, options: type) -> None:
    """A flag per field of the dataclass ``options``: ``--field-name`` (or the field's ``flag``) with the ``help``,
    ``choices``, ``metavar`` and ``required`` of the field's metadata; an int field takes an int, a list field is a
    repeated flag (or, with a ``separator``, one value split at it). A flag not given is None, which leaves the
    field's own default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(options)
    for option in dataclasses.fields(options):
        settings = dict(option.metadata)
        flag = settings.pop("flag", "--" + option.name.replace("_", "-"))
        separator = settings.pop("separator", None)
        kind = hints[option.name]
        if typing.get_origin(kind) is list:
            settings.update({"type": lambda text, at=separator: text.split(at)} if separator else {"action": "append"})
        elif kind in (int, float):
            settings["type"] = kind
        parser.add_argument(flag, dest=option.name, **settings)


def _stats(args: argparse.Namespace) -> int:
    from dex.data.curate import finalize, stats_markdown

    print(stats_markdown(finalize(args.folder)), end="")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dex.data.curate import QUARANTINED_EXIT, verify

    count, problems = verify(args.folder)
    for problem in problems:
        print(f"{problem.path}: {problem.reason}")
    print(f"{count} shards listed in {args.folder}/index.json; {len(problems)} problem(s)")
    return QUARANTINED_EXIT if problems else 0


def _export(args: argparse.Namespace) -> int:
    from dex.train.export import export_run

    out = export_run(args.run_dir, args.out)
    print(f"encoder: {out} (dex.load_pretrained)")
    if (out / "director").is_dir():
        print(f"director path as a timm ViT: {out / 'director'} "
              f"(timm.create_model('local-dir:{out / 'director'}', pretrained=True))")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dex.config import load_config
    from dex.data.tasks import load_task
    from dex.downstream.encoders import EncoderSpec, check_encoder
    from dex.downstream.finetune import FinetuneConfig, train_task_model
    from dex.downstream.model_folder import ModelFolder

    folder = ModelFolder(args.out, resume=args.resume, overwrite=args.overwrite)
    checkpoint = folder.checkpoints / "last.pt"
    encoder_pairs = [p.removeprefix("encoder.") for p in args.set if p.startswith("encoder.")]
    config = load_config(FinetuneConfig, None, [p for p in args.set if not p.startswith("encoder.")])
    spec = load_config(EncoderSpec, None, [f"name={Path(args.encoder).name or 'encoder'}", f"source={args.encoder}",
                                           *encoder_pairs])
    check_encoder(spec, "encoder")
    task = load_task(args.task)
    if args.resume and checkpoint.is_file():
        print(f"resuming from {checkpoint}")
    record, model = train_task_model(spec, task, args.seed, config, checkpoint, bootstrap=1000)
    out = folder.write(model, record)
    score = record["score_name"]
    print(f"{task.name}: test {score} {record['test'][score]:.4f} (best validation epoch {record['best_epoch']})")
    print(f"model: {out} (dex.load_model; model card {out / 'README.md'})")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from dex.downstream.embed import embed

    if not args.inputs and not args.texts:
        raise SystemExit("dex embed: give INPUT images, --texts files, or both")
    summary = embed(args.encoder, args.inputs, args.out, args.batch_size, args.device, args.volume_normalization,
                    args.slice_axis, args.texts or ())
    if args.inputs:
        shared = (summary.out / "shared.npy").is_file()
        print(f"{summary.rows} images or slices x {summary.dim} features: {summary.out / 'cls.npy'}, "
              f"{summary.out / 'mean_patch.npy'}" + (f", {summary.out / 'shared.npy'}" if shared else "")
              + f" (rows named in {summary.out / 'index.csv'})")
    if args.texts:
        print(f"{summary.texts} texts: {summary.out / 'text_shared.npy'} (rows named in "
              f"{summary.out / 'text_index.csv'})")
    return _inputs_status(summary.out, summary.errors)


def _predict(args: argparse.Namespace) -> int:
    from dex.downstream.predict import predict

    summary = predict(args.model, args.inputs, args.out, args.batch_size, args.device, args.tta, args.labels,
                      args.split, args.dicom_seg, args.volume_normalization, args.slice_axis)
    print(f"{summary.predicted} inputs predicted: {summary.out / 'predictions.csv'}")
    if (summary.out / "metrics.json").is_file():
        print(f"metrics against the ground truth: {summary.out / 'metrics.json'} (per case: metrics.csv)")
    return _inputs_status(summary.out, summary.errors)


def _inputs_status(out, errors: int) -> int:
    """The exit status of a command over many inputs: 3 (and a line naming errors.csv) when some failed."""
    from dex.data.curate import QUARANTINED_EXIT

    if not errors:
        return 0
    print(f"{errors} inputs could not be read: {out / 'errors.csv'}", file=sys.stderr)
    return QUARANTINED_EXIT


def _inference_flags(parser: argparse.ArgumentParser, batch_size: int, inputs: str = "+") -> None:
    """INPUT... (``inputs`` of them), --out, --batch-size, --device and the volume reading, as dex predict and dex
    embed take them."""
    from dex.data.normalize import SLICE_AXES, VOLUME_NORMALIZERS

    parser.add_argument("inputs", nargs=inputs, metavar="INPUT",
                        help="image, NIfTI or DICOM files, or folders of them (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"images or slices per forward ({batch_size})")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--volume-normalization", choices=list(VOLUME_NORMALIZERS),
                        help="the Table 2 rule for volumes (default: the one the model records, else the modality's)")
    parser.add_argument("--slice-axis", choices=list(SLICE_AXES),
                        help="the axis volumes are cut along (default: the one the model records, else axial)")


def _benchmark(args: argparse.Namespace) -> int:
    import logging

    from dex.eval.suite import Suite, run_suite
    from dex.eval.tables import report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    suite = Suite.load(args.suite, args.encoders.split(",") if args.encoders else None,
                       check_encoders=not args.report_only,
                       protocols=args.protocols.split(",") if args.protocols else None)
    if args.report_only:
        report(suite.out_dir, suite.baseline, suite.ablations)
    else:
        run_suite(suite)
    report_dir = suite.out_dir / "report"
    for table in ("table1_modalities.md", "table_protocols.md"):
        if (report_dir / table).is_file():
            print((report_dir / table).read_text())
    print(f"tables and figures: {report_dir}")
    return 0


def _vl_eval(args: argparse.Namespace) -> int:
    from dex.eval.vision_language import evaluate_vision_language

    result = evaluate_vision_language(args.model, args.pairs, args.out, args.task, args.batch_size)
    retrieval = result["retrieval"]
    print(f"{retrieval['pairs']} pairs: image-to-text R@5 {100 * retrieval['i2t_R@5']:.1f}, text-to-image R@5 "
          f"{100 * retrieval['t2i_R@5']:.1f} (chance {100 * retrieval['chance_R@5']:.1f}); tables: "
          f"{args.out}/vl_metrics.md; every number: {args.out}/vl_metrics.json")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from dex.analysis.analyze import analyze

    compare = {}
    for item in args.compare:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--compare takes NAME=SOURCE, got {item!r}")
        compare[name] = source
    analyze(args.encoder, args.data, args.out, compare=compare, per_modality=args.per_modality,
            clusters=args.clusters, cost_model=args.cost_model, seed=args.seed)
    print(f"tables: {args.out}/analysis.md; every number: {args.out}/analysis.json; page: dex report {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from dex.analysis.report import write_report

    print(f"report: {write_report(args.folder, args.out)}")
    return 0


def _command(group, name: str, **kwargs) -> argparse.ArgumentParser:
    """A sub-command; it takes ``--debug`` after its name too."""
    command = group.add_parser(name, **kwargs)
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dex", description="DEX: Director-Experts medical vision foundation model")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pretrain = _command(commands, "pretrain", help="pretraining (MAE-DEX by default) from a YAML config",
                        description="Pretraining from a YAML config (see configs/); its objective key picks the "
                                    "method (mae_dex, the default).")
    pretrain.add_argument("config", help="YAML config file")
    pretrain.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                          help="override config keys, e.g. --set epochs=2 model_args.num_experts=4")
    pretrain.add_argument("--resume", metavar="auto|CHECKPOINT",
                          help="continue from the newest complete checkpoint of the run (auto) or from a file")
    pretrain.set_defaults(func=_pretrain)

    export = _command(commands, "export", help="write a run's encoder (and a ViT's director path as a timm ViT)",
                      description="Write the encoder of a pretraining run (its final encoder, else its "
                                  "newest checkpoint) to OUT (config.json + model.safetensors, read by "
                                  "dex.load_pretrained) and, for a ViT, its director path as a plain timm "
                                  "ViT to OUT/director.")
    export.add_argument("run_dir", help="a dex pretrain run folder")
    export.add_argument("out", help="output folder")
    export.set_defaults(func=_export)

    finetune = _command(
        commands, "finetune", help="fine-tune an encoder on a task and keep the model",
        description="Fine-tune ENCODER (any source dex benchmark takes: an exported or saved encoder folder, a "
                    "pretraining run, scratch, timm:ARCH:FILE) on the task folder TASK with the benchmark's "
                    "protocol, and write OUT: config.json (network, task, classes, preprocessing), "
                    "model.safetensors, metrics.json, log.jsonl and README.md, the model card (dex.load_model).")
    finetune.add_argument("encoder", help="the encoder source")
    finetune.add_argument("task", help="a task folder (dex data make-phantoms, dex data import-task)")
    finetune.add_argument("--out", required=True, help="the model folder to write")
    finetune.add_argument("--seed", type=int, default=0, help="seed (0)")
    finetune.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                          help="fine-tuning settings, e.g. --set epochs=20 batch_size=8; encoder.KEY for the encoder "
                               "(encoder.mode=director, encoder.top_k=1, encoder.img_size=224)")
    finetune.add_argument("--resume", action="store_true",
                          help="go on with a run that was stopped, from its last epoch (OUT.partial/checkpoints)")
    finetune.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    finetune.set_defaults(func=_finetune)

    prediction = _command(
        commands, "predict", help="run a fine-tuned model (dex finetune) on images, DICOM series and NIfTI volumes",
        description="Run MODEL (a dex finetune folder) on every input of INPUT: images (PNG / JPEG / BMP / TIFF / "
                    "NPY), NIfTI volumes in any orientation, DICOM files and series (grouped by SeriesInstanceUID, "
                    "ordered by position), or a task folder (its --split images, against its masks or labels), "
                    "read as the model records: OUT/predictions.csv (classification: the class and its "
                    "probabilities per image or slice, and per volume; segmentation: label maps in OUT/masks/ at "
                    "the input's own size, a NIfTI label volume in the input's geometry for volumes and series). "
                    "Inputs that cannot be read, or DICOM of another modality, go to OUT/errors.csv and the command "
                    "exits with status 3.")
    prediction.add_argument("model", help="a dex finetune model folder")
    _inference_flags(prediction, 16)
    prediction.add_argument("--tta", choices=["none", "flip"], default="none",
                            help="flip: average with the mirror image's prediction")
    prediction.add_argument("--labels", help="ground truth: a folder of label volumes (NAME.nii.gz) and masks "
                                             "(NAME.png), or an id,label CSV: adds OUT/metrics.csv and metrics.json")
    prediction.add_argument("--split", choices=["train", "val", "test", "all"], default="test",
                            help="the split of a task folder given as INPUT (test)")
    prediction.add_argument("--dicom-seg", action="store_true",
                            help="segmentation of a DICOM series: also a DICOM Segmentation object (highdicom)")
    prediction.set_defaults(func=_predict)

    embedding = _command(
        commands, "embed", help="an encoder's features of images (class token and mean patch token)",
        description="Embed every image, volume slice and DICOM frame of INPUT (image, NIfTI or DICOM files, or "
                    "folders of them, sorted by path) with ENCODER (an exported or saved encoder, a pretraining "
                    "run, a dex finetune model folder, timm:ARCH:FILE), read as its folder records: OUT/cls.npy and "
                    "OUT/mean_patch.npy ([N, D] float32), OUT/index.csv (row, input, slice). Unreadable inputs go "
                    "to OUT/errors.csv and the command exits with status 3. A vision-language model (a MedMoE "
                    "export or run folder) adds OUT/shared.npy, the images' embeddings in the space they share with "
                    "reports, and embeds --texts into OUT/text_shared.npy, rows named in OUT/text_index.csv (file, "
                    "line); compare the two by cosine similarity.")
    embedding.add_argument("encoder", help="the encoder source")
    _inference_flags(embedding, 64, inputs="*")
    embedding.add_argument("--texts", nargs="+", metavar="FILE",
                           help="texts to embed with a vision-language model: .txt files (one text per line) or "
                                ".csv files with a 'report' column; an empty text goes to OUT/errors.csv")
    embedding.set_defaults(func=_embed)

    benchmark = _command(
        commands, "benchmark", help="fine-tune and test encoders on a suite of tasks; write the paper's tables",
        description="Run every (encoder, task, seed) of SUITE (resuming: stored runs are skipped), then write the "
                    "per-task and per-modality tables with the gain over the baseline, a radar chart, and the "
                    "ablation tables and figures (docs/benchmark.md).")
    benchmark.add_argument("suite", help="suite YAML (see configs/benchmark_*.yaml)")
    benchmark.add_argument("--encoders", help="comma-separated subset of the suite's encoders")
    benchmark.add_argument("--protocols", help="comma-separated protocols replacing the suite's: finetune, linear, "
                                               "knn, fewshot (classification tasks), lora, frozen-unetr "
                                               "(segmentation tasks)")
    benchmark.add_argument("--report-only", action="store_true", help="only recompute the reports from stored runs")
    benchmark.set_defaults(func=_benchmark)

    vl_eval = _command(
        commands, "vl-eval", help="retrieval, routing and zero-shot figures of a vision-language (MedMoE) model",
        description="Evaluate the MedMoE model MODEL (a dex export folder or a finished run) on the held-out "
                    "image-report pairs of PAIRS (a dex curate collection of pairs): image-to-text and text-to-image "
                    "Recall@1/5/10 against chance, overall and per report type; the routers' agreement with the "
                    "report type; zero-shot classification of the report type and of each --task from class "
                    "prompts. Writes vl_metrics.md and vl_metrics.json to --out.")
    vl_eval.add_argument("model", help="a MedMoE dex export folder or finished run folder")
    vl_eval.add_argument("pairs", help="a dex curate collection of held-out image-report pairs")
    vl_eval.add_argument("--out", required=True, help="output folder")
    vl_eval.add_argument("--task", nargs="+", default=[], help="classification task folders for zero-shot")
    vl_eval.add_argument("--batch-size", type=int, default=64, help="images or texts per batch (64)")
    vl_eval.set_defaults(func=_vl_eval)

    analyze = _command(
        commands, "analyze",
        help="routing, attention, pattern layout, cost and modality-collapse analyses of an encoder",
        description="Analyse ENCODER on the labelled images of DATA: expert activation per modality and layer "
                    "(Fig. 9) with NMI, usage entropy and shared experts; last-block attention of the centre patch "
                    "(Fig. 6); k-means pattern layout of patch features (Fig. 7); FLOPs of image-wise vs token-wise "
                    "activation (Fig. 8); per-layer modality probe and between-modality variance (App. A) next to "
                    "the --compare encoders. Writes analysis.md, analysis.json and the figures to --out.")
    analyze.add_argument("encoder", help="an exported encoder folder, a pretraining run, 'scratch' or "
                                         "timm:ARCH:FILE (a weights file with its architecture)")
    analyze.add_argument("data", help="a dex curate output folder, or a folder of images in modality sub-folders")
    analyze.add_argument("--out", required=True, help="output folder")
    analyze.add_argument("--compare", nargs="+", default=[], metavar="NAME=SOURCE",
                         help="baselines for the collapse diagnostics, e.g. scratch=scratch mae=runs/mae/encoder")
    analyze.add_argument("--per-modality", type=int, default=40, help="images per modality (40)")
    analyze.add_argument("--clusters", type=int, default=4, help="k-means clusters of the pattern layout (4)")
    analyze.add_argument("--cost-model", default="dex_vit_base_patch16_256",
                         help="architecture of the FLOP count (dex_vit_base_patch16_256, the paper's ViT-B)")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.set_defaults(func=_analyze)

    report = _command(
        commands, "report", help="one self-contained HTML page of a run, benchmark or analysis folder",
        description="Write FOLDER/report.html: every pretraining run (config, curves, summary), benchmark (tables, "
                    "figures) and analysis (tables, figures) in FOLDER and its sub-folders, with the figures "
                    "embedded, so that the page opens offline.")
    report.add_argument("folder", help="a run, benchmark or analysis folder, or a folder holding several")
    report.add_argument("--out", help="HTML file to write (FOLDER/report.html)")
    report.set_defaults(func=_report)

    curate = _command(
        commands, "curate",
        help="build a MedVerse-style collection of normalised 2D images in tar shards from a recipe",
        description="Read every source of the recipe (DICOM, NIfTI, images, NPY, video), normalise as the paper's "
                    "Table 2, slice volumes, drop empty/constant/small/background slices and near-duplicates, and "
                    "write WebDataset tar shards, a manifest, and Table 2 of what was written. Bad files are "
                    "quarantined and the run goes on; the exit status is 3 when any was.")
    curate.add_argument("recipe", help="recipe YAML (see recipes/medverse.yaml)")
    curate.add_argument("--out", required=True, help="output folder")
    curate.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (all cores)")
    curate.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    curate.add_argument("--part", default="0/1", metavar="I/N",
                        help="curate only part I of N (for a cluster array job); merge with dex data stats OUT")
    curate.add_argument("--min-size", type=int, default=32, help="drop images with a side under this (32)")
    curate.add_argument("--dedup-distance", type=int, default=2,
                        help="pHash bits within which images of one source are near-duplicates (2)")
    curate.add_argument("--shard-samples", type=int, default=1000, help="images per shard (1000)")
    curate.set_defaults(func=_curate)

    data = _command(commands, "data", help="data tools").add_subparsers(dest="data_command", required=True,
                                                                        metavar="DATA_COMMAND")
    phantoms = _command(
        data, "make-phantoms",
        help="write procedural images of all 10 modalities, a curation recipe and task folders",
        description="Write procedural images of the 10 MedVerse modalities in real file formats (DICOM, NIfTI, "
                    "PNG, JPEG, TIFF, MP4), a curation recipe for them, and downstream task folders with exact "
                    "labels. The same seed gives byte-identical output.")
    phantoms.add_argument("out", help="output folder")
    phantoms.add_argument("--per-modality", type=int, default=200, help="pretraining images per modality (200)")
    phantoms.add_argument("--size", type=int, default=64, help="image size in pixels (64)")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--task-images", type=int, default=60, help="images per downstream task (60)")
    phantoms.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (all cores)")
    phantoms.set_defaults(func=_make_phantoms)
    from dex.data.importers import LAYOUTS, ImportOptions

    imports = _command(
        data, "import-task", help="turn a public dataset's layout into a task folder",
        description="Import a dataset as it was released into a dex task folder (images/, masks/ or labels.csv, "
                    "splits.csv, task.yaml). Layouts: class-folders (SRC/[split/]class/image), csv (SRC is a CSV "
                    "of image names and labels), pairs (SRC holds images, masks matched by name), volumes (SRC "
                    "holds NIfTI volumes or DICOM series folders, --labels their NIfTI label volumes; cut into "
                    "normalised 2D slices, split by case), medmnist (SRC is a MedMNIST .npz). Items that cannot "
                    "be imported are listed in OUT/problems.csv and the command exits with status 3.")
    imports.add_argument("layout", choices=LAYOUTS)
    imports.add_argument("src", help="the dataset folder, CSV or .npz")
    imports.add_argument("out", help="the task folder to write")
    _option_flags(imports, ImportOptions)
    imports.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads (all cores)")
    imports.add_argument("--resume", action="store_true", help="go on with an import that was interrupted")
    imports.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    imports.set_defaults(func=_import_task)
    stats = _command(data, "stats", help="merge a curation's parts and write its manifest, index and Table 2",
                     description="Read every part's journal in FOLDER and (re)write manifest.csv, "
                                 "index.json, stats.md / stats.json and the private reports "
                                 "(private/paths.csv, dropped.csv, quarantine.csv); print Table 2.")
    stats.add_argument("folder", help="a dex curate output folder")
    stats.set_defaults(func=_stats)
    verify = _command(data, "verify", help="check a collection's shards against its index (size and SHA-256)",
                      description="Check that every shard listed in FOLDER/index.json is there with the size "
                                  "and SHA-256 curation recorded, and that no other shard is; print each "
                                  "problem. Exit status 3 when there is any.")
    verify.add_argument("folder", help="a dex curate output folder")
    verify.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a wrong value, key or file) is one line on stderr and exit status 2; any other
    failure one line and status 1; ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    command = " ".join(c for c in (args.command, getattr(args, "data_command", None)) if c)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"dex {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, (ValueError, OSError)):
            print(f"dex {command}: error: {message}", file=sys.stderr)
            return 2
        print(f"dex {command}: error: {type(err).__name__}: {message} (--debug shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
