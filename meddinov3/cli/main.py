"""`meddinov3` command line: one module per verb, each with `add_parser(subparsers)` and `run(args) -> int`.

Entry points: the `meddinov3` console script, `python -m meddinov3.cli` (the Slicer modules) and `python -m
meddinov3.cli.main` (torchrun's `-m`). The verbs take what they share from `common.py`, so running this file as
`__main__` duplicates nothing they raise: `CommandError` is one class whichever entry ran.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS = ("segment", "complete", "train", "evaluate", "pretrain", "convert", "info", "models", "demo")


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


# options whose value may start with "-" (argparse would take `--roi -5,0,0,...` for an option)
NEGATIVE_VALUE_OPTIONS = ("--roi",)


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--roi -5,...` -> `--roi=-5,...`."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in NEGATIVE_VALUE_OPTIONS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    from ..checkpoints import CheckpointError
    from .common import CommandError
    from .logs import configure_logging

    configure_logging()  # log lines of the core package to stderr (the library itself only logs)
    args = build_parser().parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe (`| head`) is handled below, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader went away (`meddinov3 info X | head`): not an error of ours; no traceback, no flush error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CommandError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"meddinov3 {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meddinov3 {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
