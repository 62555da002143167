"""The ``dex`` command line (also ``python -m dex``): one module per command group, each parser next to its handler.

- :mod:`dex.cli.pretrain`: ``pretrain``, ``export``
- :mod:`dex.cli.downstream`: ``finetune``, ``predict``, ``embed``
- :mod:`dex.cli.evaluate`: ``benchmark``, ``vl-eval``
- :mod:`dex.cli.analysis`: ``analyze``, ``report``
- :mod:`dex.cli.data`: ``curate``, ``data make-phantoms | import-task | stats | verify``
- :mod:`dex.cli.submit`: ``submit benchmark`` (submitit: Slurm, or this machine's processes)

Handlers import what they run when they run it, so that ``dex --help`` is quick.
"""

from __future__ import annotations

import argparse
import sys

from dex.cli import analysis, data, downstream, evaluate, pretrain, submit

GROUPS = (pretrain, downstream, evaluate, analysis, data, submit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dex", description="DEX: Director-Experts medical vision foundation model")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a wrong value, key or file) is one line on stderr and exit status 2; any other
    failure one line and status 1; ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    command = " ".join(c for c in (args.command, getattr(args, "data_command", None),
                                   getattr(args, "submit_command", None)) if c)
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
