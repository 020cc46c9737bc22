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
