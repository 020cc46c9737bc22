"""`meddinov3 train --data DATASET --out RUN_DIR [...]`: fine-tune a MedDINOv3 segmentation model.

Options given on the command line override `--config FILE.json` (a JSON object of `TrainConfig` fields, or a
previous run's config.json), which overrides `--recipe` (`reference`, `reference-896`: the MedDINOv3 reference
trainer's settings, files in Resources/recipes/; or the path of such a file), which overrides the defaults.
`--resume` continues RUN_DIR with its saved config (only --device and --json-progress may differ; a finished run is
left as it is): to train longer, start a new run with `--base RUN_DIR`, which keeps the decoder. RUN_DIR must be
new or empty, and one process trains into it at a time.
Launch with `torchrun --nproc_per_node N -m meddinov3.cli train ...` for several GPUs / processes.
"""

from __future__ import annotations

import argparse
import sys
from .common import CommandError, config_from_args, explicit_options


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a segmentation model on an nnU-Net dataset or a JSON/CSV case list",
                       description=__doc__)
    p.add_argument("--data", help="nnU-Net v2 raw dataset folder, or a .json / .csv list of image,label pairs")
    p.add_argument("--out", required=True, help="run folder (config.json, checkpoints/, model/, metrics.jsonl...)")
    p.add_argument("--base", help="starting weights: MedDINOv3/DINOv3 backbone, model package, pretrain run folder")
    p.add_argument("--size", choices=["tiny", "small", "base", "large"],
                   help="architecture when there is no --base (default base)")
    p.add_argument("--recipe", help="named recipe (reference, reference-896) or a recipe file: the reference "
                   "trainer's settings, overridden by --config, --set and flags")
    p.add_argument("--config", help="JSON file of training options (TrainConfig fields)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, help="epochs of --steps-per-epoch steps (default 1000 x 250)")
    g.add_argument("--steps", type=int, help="total optimiser steps")
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--batch-size", type=batch_size_option,
                   help="global batch size (all processes together; default 8), or 'nnunet': nnU-Net's 2D planner rule")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--val-fraction", type=float, help="fraction of cases held out for validation (default 0.2)")
    v.add_argument("--val-cases", nargs="+", help="case names held out for validation")
    v.add_argument("--fold", type=int, choices=range(5), metavar="{0-4}",
                   help="nnU-Net's cross-validation fold (KFold(5, shuffle, seed 12345) over the sorted case names, "
                   "or of --splits); RUN_DIR/splits_final.json records the folds")
    p.add_argument("--splits", help="an nnU-Net splits_final.json to take the fold from (--fold, default 0)")
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="name of the exported model package")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from checkpoints/latest.pt")
    p.add_argument("--json-progress", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1...")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=JSON",
                   help='any other option, e.g. --set lr_decoder=1e-4 \'model={"depth": 2}\'')
    p.set_defaults(run=run)


def batch_size_option(value: str):
    if value == "nnunet":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'nnunet', got {value!r}") from None


def flags(args) -> dict:
    return dict(data=args.data, out=args.out, base=args.base, size=args.size, epochs=args.epochs, steps=args.steps,
                steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, val_fraction=args.val_fraction,
                val_cases=args.val_cases, fold=args.fold, splits=args.splits, seed=args.seed, name=args.name,
                device=args.device)


def recipe(args) -> dict:
    from ..train.recipes import recipe_options

    if not args.recipe:
        return {}
    try:
        return recipe_options(args.recipe)
    except ValueError as e:
        raise CommandError(str(e)) from None


def build_config(args):
    from ..train import TrainConfig

    if args.splits and (args.val_fraction is not None or args.val_cases):
        raise CommandError("--splits chooses the validation cases: drop --val-fraction / --val-cases")
    clear = {"steps": None} if args.epochs is not None else {}  # --epochs replaces steps
    if args.fold is not None or args.splits:  # the fold replaces validation cases from a recipe or --config
        clear.update(val_cases=None)
    elif args.val_cases or args.val_fraction is not None:  # and the other way round
        clear.update(fold=None, splits=None)
    return config_from_args(TrainConfig, args, flags(args), clear=clear or None, recipe=recipe(args))


def run(args) -> int:
    from ..data import DatasetError
    from ..train import TrainError, train

    cfg = build_config(args)
    try:
        status = train(cfg, resume=args.resume, json_progress=args.json_progress,
                       explicit=explicit_options(args, cfg, flags(args), recipe(args)))
    except (TrainError, DatasetError) as e:
        raise CommandError(str(e)) from None
    if status and status.get("state") == "stopped":
        print("training stopped; continue with --resume", file=sys.stderr)
    return 0
