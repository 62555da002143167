"""``dex finetune``, ``dex predict`` and ``dex embed``: making a task model and using models."""

from __future__ import annotations

import argparse

from dex.cli.common import command, inference_flags, inputs_status


def add_commands(commands) -> None:
    _finetune_parser(commands)
    _predict_parser(commands)
    _embed_parser(commands)


def _finetune_parser(commands) -> None:
    finetune = command(
        commands, "finetune", help="fine-tune an encoder on a task and keep the model",
        description="Fine-tune ENCODER (any source dex benchmark takes: an exported or saved encoder folder, a "
                    "pretraining run, scratch, timm:ARCH:FILE, or peer: a U-Net or timm CNN from scratch, "
                    "--set encoder.model=unet or encoder.model=resnet18) on the task folder TASK with the recipe "
                    "derived from the task (recipe=derived: layer decay, drop path, RandAugment, mixup, EMA for "
                    "classification; patches at the images' own size and a sliding window for large-image "
                    "segmentation; docs/benchmark.md) or the paper's (recipe=paper), and write OUT: config.json "
                    "(network, task, classes, preprocessing, the plans that derived the settings), "
                    "model.safetensors, metrics.json, log.jsonl, progress.log (the lines printed while it ran: one per "
                    "epoch) and README.md, the model card (dex.load_model). "
                    "--set budget_minutes=M fits the schedule to M minutes of this machine.")
    finetune.add_argument("encoder", help="the encoder source")
    finetune.add_argument("task", help="a task folder (dex data make-phantoms, dex data import-task)")
    finetune.add_argument("--out", required=True, help="the model folder to write")
    finetune.add_argument("--seed", type=int, default=0, help="seed (0)")
    finetune.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                          help="fine-tuning settings, e.g. --set budget_minutes=15, --set epochs=20 batch_size=8 "
                               "(a setting given wins over the derived one); encoder.KEY for the encoder "
                               "(encoder.mode=director, encoder.top_k=1, encoder.img_size=224)")
    finetune.add_argument("--resume", action="store_true",
                          help="go on with a run that was stopped, from its last epoch (OUT.partial/checkpoints)")
    finetune.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    finetune.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from dex.config import load_config
    from dex.data.tasks import load_task
    from dex.downstream.encoders import EncoderSpec, check_encoder
    from dex.downstream.finetune import FinetuneConfig, train_task_model
    from dex.downstream.model_folder import ModelFolder

    folder = ModelFolder(args.out, resume=args.resume, overwrite=args.overwrite)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # the epochs' lines on the terminal
    folder.partial.mkdir(parents=True, exist_ok=True)
    progress = logging.FileHandler(folder.partial / "progress.log")  # and in OUT, as printed
    progress.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("dex")
    logger.setLevel(logging.INFO)
    logger.addHandler(progress)
    encoder_pairs = [p.removeprefix("encoder.") for p in args.set if p.startswith("encoder.")]
    config = load_config(FinetuneConfig, None, [p for p in args.set if not p.startswith("encoder.")])
    spec = load_config(EncoderSpec, None, [f"name={Path(args.encoder).name or 'encoder'}", f"source={args.encoder}",
                                           *encoder_pairs])
    check_encoder(spec, "encoder")
    task = load_task(args.task)
    if folder.resuming:
        print(f"resuming from {folder.checkpoints}")
    try:
        record, model = train_task_model(spec, task, args.seed, config, folder.checkpoints, bootstrap=1000)
    finally:
        logger.removeHandler(progress)
        progress.close()
    out = folder.write(model, record)
    score = record["score_name"]
    print(f"{task.name}: test {score} {record['test'][score]:.4f} (best validation epoch {record['best_epoch']})")
    print(f"model: {out} (dex.load_model; model card {out / 'README.md'})")
    return 0


def _predict_parser(commands) -> None:
    prediction = command(
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
    inference_flags(prediction, 16)
    prediction.add_argument("--tta", choices=["auto", "none", "flip", "mirror"], default="auto",
                            help="test-time mirroring: auto (the model's plan: a segmentation model of the derived "
                                 "recipe mirrors along both axes), none, flip (left-right) or mirror (left-right "
                                 "and up-down, segmentation)")
    prediction.add_argument("--labels", help="ground truth: a folder of label volumes (NAME.nii.gz) and masks "
                                             "(NAME.png), or an id,label CSV: adds OUT/metrics.csv and metrics.json")
    prediction.add_argument("--split", choices=["train", "val", "test", "all"], default="test",
                            help="the split of a task folder given as INPUT (test)")
    prediction.add_argument("--dicom-seg", action="store_true",
                            help="segmentation of a DICOM series: also a DICOM Segmentation object (highdicom)")
    prediction.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from dex.downstream.predict import predict

    summary = predict(args.model, args.inputs, args.out, args.batch_size, args.device, args.tta, args.labels,
                      args.split, args.dicom_seg, args.volume_normalization, args.slice_axis)
    print(f"{summary.predicted} inputs predicted: {summary.out / 'predictions.csv'}")
    if (summary.out / "metrics.json").is_file():
        print(f"metrics against the ground truth: {summary.out / 'metrics.json'} (per case: metrics.csv)")
    return inputs_status(summary.out, summary.errors)


def _embed_parser(commands) -> None:
    embedding = command(
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
    inference_flags(embedding, 64, inputs="*")
    embedding.add_argument("--texts", nargs="+", metavar="FILE",
                           help="texts to embed with a vision-language model: .txt files (one text per line) or "
                                ".csv files with a 'report' column; an empty text goes to OUT/errors.csv")
    embedding.set_defaults(func=_embed)


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
    return inputs_status(summary.out, summary.errors)
