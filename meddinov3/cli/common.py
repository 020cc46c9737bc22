"""What the verbs share: the user's-error exception, the progress failure tail, `--device` and config merging.

Its own module, not cli/main.py, so that `python -m meddinov3.cli.main` (the form torchrun's `-m` takes) runs main.py
as `__main__` without a second copy of anything a verb raises or uses: verbs import from here, never from main.
"""

from __future__ import annotations

import contextlib


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
        try:  # only the keys the file gives override the recipe
            cfg = config_cls.from_dict({**cfg.to_dict(), **config_cls.file_options(args.config)})
        except (OSError, ValueError) as e:
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


def explicit_options(args, cfg, flags: dict, recipe: dict | None = None) -> dict:
    """The options the command line gave (flags, `--set` keys, `--recipe` options and `--config` keys) with their
    values in `cfg`: what `--resume` compares with the saved configuration."""
    keys = {k for k, v in flags.items() if v is not None} | {item.split("=", 1)[0] for item in args.set}
    keys |= set(recipe or {})
    if args.config:
        keys |= set(type(cfg).file_options(args.config))
    return {k: getattr(cfg, k) for k in keys}
