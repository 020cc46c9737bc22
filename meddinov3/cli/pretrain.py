"""`meddinov3 pretrain --data DIR_OR_LIST --out RUN_DIR [...]`: self-supervised pretraining of the backbone on CT.

Stage 1: DINO + iBOT + KoLeo self-distillation with an EMA teacher; stage 2 adds Gram anchoring; stage 3 is
high-resolution adaptation (larger crops, Gram anchoring kept). Continue a stage with `--base PREV_RUN --stage 2`.
Options given on the command line override `--config FILE.json` (PretrainConfig fields, or a previous run's
config.json), which overrides the defaults. `--resume` continues RUN_DIR with its saved config (only --device and
--json-progress may differ; a finished run is left as it is). Launch with `torchrun --nproc_per_node N -m
meddinov3.cli pretrain ...` for several GPUs / processes; add `--set parallel=fsdp` to shard the networks over
them (FSDP2) when they do not fit one GPU each. Checkpoints are the same either way: resume with or without FSDP.
Every `probe_every` steps a ridge probe on the teacher's frozen patch features scores foreground Dice on
`--probe-data` (a labelled dataset in any `meddinov3 train --data` layout; default: the LiTS liver CT).
"""

from __future__ import annotations

import sys
from .common import CommandError, config_from_args, explicit_options


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining (DINOv3 recipe) of the backbone on CT volumes",
                       description=__doc__)
    p.add_argument("--data", help="folder of CT volumes (NIfTI/NRRD/MHA/DICOM series) or a .txt/.json list")
    p.add_argument("--out", required=True, help="run folder (config.json, checkpoints/, backbone/, metrics.jsonl...)")
    p.add_argument("--base", help="starting weights: MedDINOv3/DINOv3 backbone (any layout) or a previous run folder; "
                   "without --base and --size: the official MedDINOv3 backbone when it is available offline "
                   "(`meddinov3 models import`), else a random ViT-B with a warning")
    p.add_argument("--size", choices=["tiny", "small", "base", "large"], help="architecture from scratch")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], help="1 DINO+iBOT, 2 + Gram anchoring, 3 high resolution")
    p.add_argument("--config", help="JSON file of options (PretrainConfig fields)")
    p.add_argument("--steps", type=int, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, help="images per step, all processes together")
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="name of the exported backbone package")
    p.add_argument("--probe-data", help="labelled dataset of the dense probe that tracks the features during the run "
                   "(any layout `meddinov3 train --data` reads: nnU-Net folder, .json or .csv list; all classes are "
                   "foreground); default: the LiTS liver CT")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from checkpoints/latest.pt")
    p.add_argument("--json-progress", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1...")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=JSON",
                   help='any other option, e.g. --set lr=1e-4 \'head={"out_dim": 4096}\'')
    p.set_defaults(run=run)


def flags(args) -> dict:
    return dict(data=args.data, out=args.out, base=args.base, size=args.size, stage=args.stage, steps=args.steps,
                batch_size=args.batch_size, seed=args.seed, name=args.name, device=args.device,
                probe_data=args.probe_data)


def build_config(args):
    from ..pretrain.config import PretrainConfig

    return config_from_args(PretrainConfig, args, flags(args))


def run(args) -> int:
    from ..pretrain.data import PretrainDataError
    from ..pretrain.loop import PretrainError, pretrain

    if args.base and args.size:  # the base's architecture is used: --size must not be recorded as if it applied
        print(f"meddinov3 pretrain: warning: --size {args.size} is ignored: the architecture comes from --base "
              f"{args.base}", file=sys.stderr)
        args.size = None
    cfg = build_config(args)
    try:
        status = pretrain(cfg, resume=args.resume, json_progress=args.json_progress,
                          explicit=explicit_options(args, cfg, flags(args)))
    except (PretrainError, PretrainDataError) as e:
        raise CommandError(str(e)) from None
    if status and status.get("state") == "stopped":
        print("pretraining stopped; continue with --resume", file=sys.stderr)
    return 0
