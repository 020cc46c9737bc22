"""`meddinov3` command line: one module per verb, each with `add_parser(subparsers)` and `run(args) -> int`.

Imported only: `python -m meddinov3.cli` (cli/__main__.py; torchrun, the Slicer modules) and the `meddinov3`
console script call `main`, so that this module exists once and the verbs' `CommandError` is the class `main`
catches.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

VERBS = ("segment", "complete", "train", "evaluate", "pretrain", "convert", "info", "models", "demo")


class CommandError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


@contextlib.contextmanager
def failure_reported(progress):
    """Make a failure the last event of a command's progress (`progress.Progress`), as the Slicer modules read it: a
    cancel (SIGTERM from the module's Cancel) becomes one error line; any other error propagates after the event."""
    from ..engine import Cancelled

    try:
        yield
    except Cancelled as e:
        progress.event("failed", message=str(e))
        raise CommandError(str(e)) from None
    except Exception as e:
        progress.close()
        progress.event("failed", message=str(e))
        raise


def device_option(value: str):
    """`--device` as a torch.device, or a CommandError naming the value (unknown name, no CUDA, no such GPU)."""
    from ..engine import resolve_device

    try:
        return resolve_device(value)
    except (ValueError, RuntimeError) as e:
        raise CommandError(f"--device {value}: {e}") from None


def config_from_args(config_cls, args, overrides: dict, clear: dict | None = None, recipe: dict | None = None):
    """Defaults < `recipe` (options of `train --recipe`) < `--config FILE.json` < `--set KEY=JSON` < explicit flags
    (`overrides` that are not None).

    Shared by `train` and `pretrain`, whose config classes have `from_file`, `from_dict` and `to_dict`.
    `clear` sets keys after merging (e.g. `--epochs` clears a configured step count).
    """
    import json

    try:
        cfg = config_cls.from_dict({**config_cls().to_dict(), **(recipe or {})})
    except (TypeError, ValueError) as e:
        raise CommandError(f"--recipe: {e}") from None
    if args.config:
        try:
            from_file = config_cls.from_file(args.config)
        except (OSError, ValueError) as e:
            raise CommandError(f"--config {args.config}: {e}") from None
        with open(args.config) as f:  # only the keys the file gives override the recipe
            saved = json.load(f)
        keys = set(saved.get(config_cls.SECTION, saved))
        try:
            cfg = config_cls.from_dict({**cfg.to_dict(), **{k: v for k, v in from_file.to_dict().items() if k in keys}})
        except ValueError as e:
            raise CommandError(f"--config {args.config}: {e}") from None
    changes = {}
    for item in args.set:
        if "=" not in item:
            raise CommandError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    changes.update({k: v for k, v in overrides.items() if v is not None})
    merged = {**cfg.to_dict(), **changes, **(clear or {})}
    try:
        cfg = config_cls.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise CommandError(str(e)) from None
    if not cfg.data and not args.resume:
        raise CommandError("--data is required")
    return cfg


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


if __name__ == "__main__":  # a second copy of this module, whose CommandError the verbs do not raise: refuse
    sys.exit("meddinov3: run `python -m meddinov3.cli ...` (or the `meddinov3` command), not `-m meddinov3.cli.main`")
