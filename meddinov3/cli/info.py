"""`meddinov3 info MODEL`: describe any model layout as JSON."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print what a model is (format, architecture, classes, spacing...) as JSON")
    p.add_argument("model", help="model package folder, nnU-Net result folder, .pth checkpoint, hf: reference, "
                   "or a name that `meddinov3 models list` shows")
    p.add_argument("--offline", action="store_true", default=None, help="never use the network")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..checkpoints import describe

    print(json.dumps(describe(args.model, offline=args.offline), indent=2))
    return 0
