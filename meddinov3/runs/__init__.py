"""Run machinery shared by fine-tuning (`meddinov3.train`) and pretraining (`meddinov3.pretrain`).

- `folder`: whether a run may go into a folder (busy, not empty, resume with changed options): `open_run`;
- `status`: status.json, written by the run and read by `meddinov3 info` and the Slicer Train module;
- `signals`: SIGTERM / SIGINT as a clean stop;
- `metrics`: metrics.jsonl (append, cut back on resume, read, follow);
- `batch`: the micro-batch (sizing, out-of-memory halving) and the autocast precision (torch);
- `session`: `RunSession`, the context manager both loops run in (torch).

This package and the first four modules import no torch: the Slicer Train module uses them in a Slicer without it.
"""

from .folder import JOB_FILES, RunFolderError, open_run
from .metrics import MetricsFollower, append_metrics, cut_metrics, read_metrics
from .signals import RunStopped, StopRequest
from .status import BUSY_STATES, RunStatus, is_finished, killed_message, run_process_alive, run_state, running_pid

__all__ = ["BUSY_STATES", "JOB_FILES", "MetricsFollower", "RunFolderError", "RunStatus", "RunStopped", "StopRequest",
           "append_metrics", "cut_metrics", "is_finished", "killed_message", "open_run", "read_metrics",
           "run_process_alive", "run_state", "running_pid"]
