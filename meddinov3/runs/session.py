"""A run session: one process's part in a training or pretraining run, from start-up to clean-up.

Both loops (`train`, `pretrain`) run inside one: it joins the torchrun job, checks and opens the run folder, keeps
status.json, turns SIGTERM / SIGINT into a clean stop, writes metrics.jsonl, reports a failure where a GUI reads it,
and ends the process group whatever happens. What differs between the two is a `RunKind`.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed as D
from ..files import absolute_path, absolute_paths
from ..progress import Progress
from .folder import RunFolderError, open_run
from .metrics import append_metrics, cut_metrics
from .signals import RunStopped, StopRequest
from .status import RunStatus, is_finished


@dataclass(frozen=True)
class RunKind:
    """What a kind of run (fine-tuning, pretraining) brings to the shared machinery.

    `name`: status.json's "kind" and the log prefix ("train", "pretrain"); `options`: its `JsonOptions` class
    (SECTION, KIND, PATHS, PATHS_IF_EXISTING); `error`: its user-error class (raised for a refused run folder or
    device); `user_errors`: the errors reported by their message alone; `output`: the folder of its product, named
    in the `finished` event ("model", "backbone"); `total`: options -> total steps; `leftovers`: what a failed start
    leaves in the folder; `longer`: how to train further than a finished run ("{run_dir}" filled in);
    `quiet_with_json`: no log lines under --json-progress.
    """

    name: str
    options: type
    error: type
    user_errors: tuple
    output: str
    total: Callable[[Any], int]
    leftovers: tuple = ("status.json",)
    longer: str = ""
    quiet_with_json: bool = False


@contextlib.contextmanager
def report_failure(status: RunStatus | None, progress: Progress, user_errors: tuple[type, ...] = ()):
    """Record how a run that raised ended, in status.json and as an event.

    `RunStopped` (a signal during start-up) is a clean stop: state "stopped", a `stopped` event, not re-raised.
    Anything else is "failed" and re-raised: a user error (one of `user_errors`) is reported by its message alone,
    anything else with its type name; a resume that fails before training starts puts the previous status back.
    `status` is None on the ranks of a distributed run that do not report.
    """
    try:
        yield
    except RunStopped as e:
        if status is not None:
            status.update(state="stopped")
            progress.event("stopped", step=status.data["step"], signal=e.signal)
    except BaseException as e:
        if status is not None and not isinstance(e, SystemExit):
            message = str(e) if isinstance(e, user_errors) else f"{type(e).__name__}: {e}"
            if status.previous is not None and status.data["state"] == "starting":
                status.put_back_previous()
            else:
                status.update(state="failed", error=message)
            progress.event("failed", message=message)
        raise


class RunSession:
    """A context manager around one process's part in a run.

    Entering joins the torchrun job and picks the device (`distributed.init`), checks the run folder on rank 0
    (`open_run`), and resolves the options (the saved ones on `resume`, paths absolute: `cfg`). A resumed run that
    already finished is `finished` (nothing else happens: the body returns `previous`). Otherwise rank 0 writes
    status.json ("starting") and keeps it (`status`, None elsewhere), a signal during the start-up becomes a clean
    "stopped" (the `with` block then ends without a result: return `result()` after it), and an exception is
    reported into status.json and as a `failed` event, then re-raised. Leaving restores the signal handlers, closes the progress bar and
    ends the process group.

    Arguments: `kind` (a `RunKind`), `cfg` (its options as given), `resume`, `json_progress` and `stream` (progress
    events as JSON lines, see `Progress`), `explicit` (with `resume`: the options the user gave, refused when they
    differ from the saved ones).
    """

    def __init__(self, kind: RunKind, cfg, resume: bool = False, json_progress: bool = False, stream=None,
                 explicit: dict | None = None):
        self.kind, self.cfg, self.resume, self.json_progress = kind, cfg, resume, json_progress
        self._stream, self._explicit = stream, explicit
        self.finished = False
        self.previous: dict | None = None
        self.status: RunStatus | None = None
        self.stopper = StopRequest()  # the loop's: SIGTERM / SIGINT remembered until the next step ends
        self._stack = contextlib.ExitStack()

    # ---- start-up and clean-up

    def __enter__(self) -> RunSession:
        try:
            self.dist_info, self.device = D.init(self.cfg.device)
        except D.DeviceError as e:
            raise self.kind.error(f"--device {self.cfg.device}: {e}") from None
        self.main = self.dist_info.is_main
        self.run_dir = absolute_path(self.cfg.out)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.progress = Progress(json_lines=self.json_progress, stream=self._stream, desc=self.kind.options.KIND,
                                 enabled=self.main)
        startup_stop = StopRequest(immediate=True)
        self._stack.callback(D.cleanup, self.dist_info)
        self._stack.callback(self.progress.close)
        self._stack.callback(startup_stop.restore)
        try:
            self._open()
            if not self.finished:
                self.status = RunStatus(self.run_dir, self.kind.total(self.cfg), self.kind.name,
                                        self.previous if self.resume else None) if self.main else None
                if self.main:  # "starting" (with this process's pid) is on disk before any slow work
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    self.status.update()
                startup_stop.install()  # from here a signal outside the loop abandons the start-up: "stopped"
                self._stack.enter_context(report_failure(self.status, self.progress, self.kind.user_errors))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def _open(self) -> None:
        """Check the run folder (rank 0 decides for all) and resolve the options."""
        options, run_dir = self.kind.options, self.run_dir
        opened, error = D.decide_on_main(lambda: open_run(
            run_dir, options.SECTION, self.resume,
            absolute_paths(self._explicit or {}, options.PATHS, options.PATHS_IF_EXISTING),
            leftovers=self.kind.leftovers, longer=self.kind.longer.format(run_dir=run_dir)),
            (RunFolderError,), self.dist_info)
        if error:
            raise self.kind.error(error)
        saved, self.previous = opened
        if not self.resume:
            self.cfg = options.from_dict(absolute_paths(self.cfg.to_dict(), options.PATHS, options.PATHS_IF_EXISTING))
            return
        self.cfg = options.from_dict({**saved, "device": self.cfg.device})
        if is_finished(self.previous):
            self.finished = True
            step = self.previous["step"]
            self.log(f"{run_dir} already finished ({step} steps): nothing to do")
            self.progress.event("finished", step=step, already_finished=True,
                                **{self.kind.output: str(run_dir / self.kind.output)})

    def result(self) -> dict:
        """What the run returns when a signal stopped its start-up: the status (rank 0), {} elsewhere."""
        return self.status.data if self.main else {}

    # ---- during the run

    def log(self, message: str) -> None:
        """An information line of the run (logger "meddinov3.<kind>.loop"), from rank 0 only; none under
        --json-progress for a kind that is `quiet_with_json` (its events carry the same)."""
        if self.main and not (self.kind.quiet_with_json and self.json_progress):
            logging.getLogger(f"meddinov3.{self.kind.name}.loop").info(message)

    def restart_metrics(self, step: int) -> None:
        """Rank 0 of a resumed run: metrics.jsonl cut back to the checkpoint's `step` (the rest is done again)."""
        if self.main and self.resume:
            cut_metrics(self.metrics_path, step)

    def write_metrics(self, record: dict) -> None:
        """Append `record` to metrics.jsonl (rank 0)."""
        if self.main:
            append_metrics(self.metrics_path, record)

    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it after the same step)."""
        return D.any_true(self.stopper.requested, self.dist_info, self.device)

    def mark_stopping(self, step: int) -> None:
        if self.main:
            self.status.update(state="stopping", step=step)

    def rank_checksums(self, parameters) -> list:
        """Every rank's sum of `parameters` (whole tensors, also when sharded): the final status shows that the
        ranks kept identical weights. A collective."""
        checksum = float(sum(D.full_tensor(p.detach()).double().sum().item() for p in parameters))
        return D.all_gather_object(checksum, self.dist_info)

    def finish(self, stopped: bool, step: int, checkpoint: Path, status_fields: dict, finished_fields: dict) -> dict:
        """The end of the loop on rank 0: the final state in status.json (with `status_fields`), then a `stopped`
        event (naming `checkpoint`) or a `finished` one (with `finished_fields`) and a log line. Returns the final
        status ({} on the other ranks)."""
        if not self.main:
            return {}
        final = self.status.update(state="stopped" if stopped else "finished", step=step, **status_fields)
        if stopped:
            self.progress.event("stopped", step=step, signal=self.stopper.signal, checkpoint=str(checkpoint))
            self.log(f"stopped by {self.stopper.signal} at step {step}; continue with --resume")
        else:
            self.progress.event("finished", step=step, **finished_fields)
            self.log(f"finished: {step} steps; {self.kind.output} package in {self.run_dir / self.kind.output}")
        return final


def versions() -> dict:
    """The software a run used (recorded in its config.json)."""
    import numpy as np
    import timm

    from .. import __version__
    return {"meddinov3": __version__, "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}
