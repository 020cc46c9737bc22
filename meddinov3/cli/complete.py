"""`meddinov3 complete IMAGE --labels SPARSE -o OUTPUT`: complete structures painted on a few slices."""

from __future__ import annotations

import sys
import time
from .common import CommandError, device_option, failure_reported


def add_parser(sub) -> None:
    p = sub.add_parser("complete", help="complete structures painted on a few slices (few-shot)")
    p.add_argument("image", metavar="IMAGE", help=".nii/.nii.gz/.nrrd/.mha/.mhd file or DICOM series folder")
    p.add_argument("--labels", required=True, metavar="SPARSE",
                   help="label map on IMAGE's grid (.seg.nrrd too): slices (along S-I) holding any non-zero label "
                        "are painted, and all their voxels are truth (0 = background)")
    p.add_argument("-o", "--output", required=True, help="output .nii.gz/.nrrd label map or .seg.nrrd")
    p.add_argument("--model", default=None,
                   help="'scratch' (no backbone), or a backbone / model package whose backbone features are used "
                        "(default: the official backbone when it is on this machine, else scratch)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="seconds spent fitting on the painted slices (default 20)")
    p.add_argument("--extrapolate", action="store_true",
                   help="also fill beyond each label's first and last painted slice (needed for one painted slice)")
    p.add_argument("--json-progress", action="store_true", help="one JSON event per line on stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..complete import complete_image, read_sparse
    from ..complete.pipeline import DEFAULT_TIME_BUDGET_S
    from ..engine.outputs import check_not_input, check_output, input_files, write_labels
    from ..progress import Progress
    from ..volumes import InputError, read_image

    progress = Progress(json_lines=args.json_progress, desc="complete")
    started = time.perf_counter()
    budget = DEFAULT_TIME_BUDGET_S if args.time_budget is None else args.time_budget
    with failure_reported(progress):
        if not budget > 0:
            raise CommandError(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
        try:
            check_not_input(args.output, input_files([args.image, args.labels]))
            check_output(args.output, args.overwrite)
        except ValueError as e:
            raise CommandError(str(e)) from None
        device = device_option(args.device)
        try:
            image = read_image(args.image)
            sparse, classes = read_sparse(args.labels)
            progress.event("started", image=args.image, labels=args.labels, output=args.output, device=str(device))
            result = complete_image(image, sparse, model=args.model, device=device, time_budget_s=budget,
                                    extrapolate=args.extrapolate, classes=classes, progress=progress,
                                    source=args.image, labels_source=args.labels)
        except InputError as e:
            raise CommandError(str(e)) from None
        progress.update(1, 1, stage="writing")
        write_labels(result.labels, args.output, result.classes, overwrite=args.overwrite)
        progress.close()
        seconds = round(time.perf_counter() - started, 2)
        progress.event("finished", output=args.output, seconds=seconds, least_confident=result.least_confident,
                       **{k: result.stats[k] for k in ("model", "painted_slices", "completed_slices", "features_cached")})
        if not args.json_progress:
            print(f"{result.stats['model']}", file=sys.stderr)
            print(f"{args.labels} -> {args.output}: {result.stats['completed_slices']} slice(s) completed from "
                  f"{len(result.stats['painted_slices'])} painted ({seconds:.1f} s)", file=sys.stderr)
        progress.event("done", seconds=seconds)
        return 0
