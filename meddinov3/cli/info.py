"""`meddinov3 info MODEL`: describe any model layout as JSON; `meddinov3 info RUN_DIR`: a run's state and model."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print what a model is (format, architecture, classes, spacing...) as JSON, or "
                       "the state of a training / pretraining run folder")
    p.add_argument("model", help="model package folder, nnU-Net result folder, .pth checkpoint, hf: reference, "
                   "a name that `meddinov3 models list` shows, or a train / pretrain run folder")
    p.add_argument("--offline", action="store_true", default=None, help="never use the network")
    p.set_defaults(run=run)


def describe_run(run_dir: Path, offline: bool | None = None) -> dict:
    """A run folder's status.json as readers should see it (a dead "running" process is "killed", with what to
    do), and the description of the model it exported, if any."""
    from ..checkpoints import describe
    from ..checkpoints.loader import run_package
    from ..runs import RunStatus, killed_message, run_state

    status = RunStatus.read(run_dir) or {}
    report = {"run": str(run_dir), "kind": status.get("kind"), "state": run_state(status),
              "step": status.get("step"), "total": status.get("total"), "error": status.get("error")}
    if report["state"] == "killed":
        report["message"] = killed_message(run_dir, status)
    model = run_package(run_dir)  # run_dir itself when it exported no package
    report["model"] = describe(model, offline=offline) if model is not run_dir else None
    return report


def run(args) -> int:
    import sys

    from ..checkpoints import describe
    from ..checkpoints.package import is_package

    path = Path(args.model).expanduser()
    if path.is_dir() and (path / "status.json").is_file() and not is_package(path):
        report = describe_run(path, offline=args.offline)
        if report.get("message"):
            print(f"meddinov3 info: {report['message']}", file=sys.stderr)
    else:
        report = describe(args.model, offline=args.offline)
    print(json.dumps(report, indent=2))
    return 0
