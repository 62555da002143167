"""``dex curate`` and ``dex data``: making collections and task folders."""

from __future__ import annotations

import argparse
import os
import sys

from dex.cli.common import SOME_INPUTS_FAILED, command, option_flags


def add_commands(commands) -> None:
    _curate_parser(commands)
    data = command(commands, "data", help="data tools").add_subparsers(dest="data_command", required=True,
                                                                        metavar="DATA_COMMAND")
    _make_phantoms_parser(data)
    _import_task_parser(data)
    _stats_parser(data)
    _verify_parser(data)


def _curate_parser(commands) -> None:
    curate = command(
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
    curate_option_flags(curate)
    curate.set_defaults(func=_curate)


def curate_option_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`~dex.data.curation.CurateOptions` (dex curate, dex submit curate)."""
    parser.add_argument("--min-size", type=int, default=32, help="drop images with a side under this (32)")
    parser.add_argument("--dedup-distance", type=int, default=2,
                        help="pHash bits within which images of one source are near-duplicates (2)")
    parser.add_argument("--shard-samples", type=int, default=1000, help="images per shard (1000)")


def curate_options(args: argparse.Namespace):
    """The :class:`~dex.data.curation.CurateOptions` of :func:`curate_option_flags`."""
    from dex.data.curation import CurateOptions

    return CurateOptions(min_size=args.min_size, dedup_distance=args.dedup_distance, shard_samples=args.shard_samples)


def _curate(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from dex.data.curation import PRIVATE, curate, private_log
    from dex.data.recipe import Recipe

    Recipe.load(args.recipe)  # a bad recipe is refused before anything is written
    out = Path(args.out)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with private_log(out):
        summary = curate(args.recipe, out, workers=args.workers, resume=args.resume, part=args.part,
                         options=curate_options(args))
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(summary.dropped.items())) or "none"
    print(f"written {summary.written} images; dropped: {dropped}; quarantined files: {summary.quarantined}"
          + (f"; sources without a root: {', '.join(summary.skipped_sources)}" if summary.skipped_sources else ""))
    if args.part == "0/1":
        print(f"Table 2 of this collection: {out / 'stats.md'}; training reads {out / 'index.json'}")
    if summary.quarantined:
        print(f"some files were quarantined: see {out / PRIVATE / 'quarantine.csv'}" if args.part == "0/1" else
              f"some files were quarantined: run dex data stats on the folder after every part for "
              f"{PRIVATE}/quarantine.csv")
        return SOME_INPUTS_FAILED
    return 0


def _make_phantoms_parser(data) -> None:
    phantoms = command(
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


def _make_phantoms(args: argparse.Namespace) -> int:
    from dex.data.phantoms import make_phantoms

    recipe = make_phantoms(args.out, per_modality=args.per_modality, size=args.size, seed=args.seed,
                           task_images=args.task_images, workers=args.workers)
    print(f"wrote {len(recipe.sources)} raw sources, the recipe {recipe.path} and task folders in {args.out}/tasks")
    return 0


def _import_task_parser(data) -> None:
    from dex.data.importers import LAYOUTS, ImportOptions

    imports = command(
        data, "import-task", help="turn a public dataset's layout into a task folder",
        description="Import a dataset as it was released into a dex task folder (images/, masks/ or labels.csv, "
                    "splits.csv, task.yaml). Layouts: class-folders (SRC/[split/]class/image), csv (SRC is a CSV "
                    "of image names and labels), pairs (SRC or --images holds images, --masks their masks matched by "
                    "name, --rois optional regions of interest), volumes (SRC holds NIfTI volumes or DICOM series "
                    "folders, --labels their NIfTI label volumes; cut into normalised 2D slices, split by case), "
                    "medmnist (SRC is a MedMNIST .npz). A relative --images, --masks, --rois, --labels or --splits "
                    "is taken below SRC (the CSV's folder for csv) when it is there, else from the working "
                    "directory. Items that cannot be imported are listed in OUT/problems.csv and the command exits "
                    "with status 3.")
    imports.add_argument("layout", choices=LAYOUTS)
    imports.add_argument("src", help="the dataset folder, CSV or .npz")
    imports.add_argument("out", help="the task folder to write")
    option_flags(imports, ImportOptions)
    imports.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads (all cores)")
    imports.add_argument("--resume", action="store_true", help="go on with an import that was interrupted")
    imports.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    imports.set_defaults(func=_import_task)


def _import_task(args: argparse.Namespace) -> int:
    import dataclasses

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
        return SOME_INPUTS_FAILED
    return 0


def _stats_parser(data) -> None:
    stats = command(data, "stats", help="merge a curation's parts and write its manifest, index and Table 2",
                     description="Read every part's journal in FOLDER and (re)write manifest.csv, "
                                 "index.json, stats.md / stats.json and the private reports "
                                 "(private/paths.csv, dropped.csv, quarantine.csv); print Table 2.")
    stats.add_argument("folder", help="a dex curate output folder")
    stats.set_defaults(func=_stats)


def _stats(args: argparse.Namespace) -> int:
    from dex.data.curation import finalize, stats_markdown

    print(stats_markdown(finalize(args.folder)), end="")
    return 0


def _verify_parser(data) -> None:
    verify = command(data, "verify", help="check a collection's shards against its index (size and SHA-256)",
                      description="Check that every shard listed in FOLDER/index.json is there with the size "
                                  "and SHA-256 curation recorded, and that no other shard is; print each "
                                  "problem. Exit status 3 when there is any.")
    verify.add_argument("folder", help="a dex curate output folder")
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from dex.data.curation import verify

    count, problems = verify(args.folder)
    for problem in problems:
        print(f"{problem.path}: {problem.reason}")
    print(f"{count} shards listed in {args.folder}/index.json; {len(problems)} problem(s)")
    return SOME_INPUTS_FAILED if problems else 0
