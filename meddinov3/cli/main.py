"""`meddinov3` command line: one module per verb, each with `add_parser(subparsers)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ("segment", "train", "pretrain", "convert", "info", "models", "demo")


class CommandError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="meddinov3", description="MedDINOv3 CT/MRI segmentation")
    parser.add_argument("--version", action="version", version=f"meddinov3 {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for verb in VERBS:
        try:
            module = importlib.import_module(f".{verb}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{verb}":
                raise
            continue  # verb not available in this build
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..checkpoints import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CommandError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"meddinov3 {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meddinov3 {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the imported module's main: verbs raise `meddinov3.cli.main.CommandError`, which is not this
    # `__main__` module's class under `python -m meddinov3.cli.main` (the form torchrun needs).
    from meddinov3.cli.main import main as _main

    sys.exit(_main())
