"""What the command groups share: a sub-command that takes ``--debug``, flags made from a dataclass's fields, the input
flags of ``dex predict`` and ``dex embed``, and the exit status of a command some of whose inputs failed."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

#: The exit status of a command that did its work on the good inputs but left some out (quarantined files, inputs
#: that could not be read, shards that fail their check), each listed in a file the command names.
SOME_INPUTS_FAILED = 3


def command(group, name: str, **kwargs) -> argparse.ArgumentParser:
    """A sub-command of ``group``; it takes ``--debug`` after its name too."""
    parser = group.add_parser(name, **kwargs)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    return parser


def option_flags(parser: argparse.ArgumentParser, options: type) -> None:
    """A flag per field of the dataclass ``options``: ``--field-name`` (or the field's ``flag``) with the ``help``,
    ``choices``, ``metavar`` and ``required`` of the field's metadata; an int field takes an int, a list field is a
    repeated flag (or, with a ``separator``, one value split at it). A flag not given is None, which leaves the
    field's own default."""
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


def suite_selection_flags(parser: argparse.ArgumentParser) -> None:
    """SUITE and the subsets of it that dex benchmark and dex submit benchmark take: --encoders, --tasks,
    --protocols (each a comma-separated list; :func:`suite_selection` reads them)."""
    parser.add_argument("suite", help="suite YAML (see configs/benchmark_*.yaml)")
    parser.add_argument("--encoders", help="comma-separated subset of the suite's encoders")
    parser.add_argument("--tasks", help="comma-separated subset of the suite's tasks (their folder names)")
    parser.add_argument("--protocols", help="comma-separated protocols replacing the suite's: finetune, linear, knn, "
                                            "fewshot (classification tasks), lora, frozen-unetr (segmentation tasks)")


def suite_selection(args: argparse.Namespace) -> dict[str, list[str] | None]:
    """The subsets of :func:`suite_selection_flags` as lists (None where not given), by their names in
    :meth:`dex.eval.suite.Suite.load`: ``only`` (encoders), ``tasks``, ``protocols``."""
    def listed(value: str | None) -> list[str] | None:
        return value.split(",") if value else None

    return {"only": listed(args.encoders), "tasks": listed(args.tasks), "protocols": listed(args.protocols)}


def inference_flags(parser: argparse.ArgumentParser, batch_size: int, inputs: str = "+") -> None:
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


def inputs_status(out: Path, errors: int) -> int:
    """The exit status of a command over many inputs: :data:`SOME_INPUTS_FAILED` (and a line naming errors.csv) when
    some failed."""
    if not errors:
        return 0
    print(f"{errors} inputs could not be read: {out / 'errors.csv'}", file=sys.stderr)
    return SOME_INPUTS_FAILED
