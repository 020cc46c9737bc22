"""`meddinov3 segment INPUT... -o OUTPUT --model MODEL`: segment CT volumes (files, DICOM folders, folders of them).

Several inputs (or a folder of them) are a cohort (`engine/cohort.py`): finished outputs are skipped, a CSV reports
every case, and under torchrun the cases are shared out over all processes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..options import SegmentOptions, add_arguments
from .common import CommandError, device_option, failure_reported

FORMATS = ("nii.gz", "nrrd", "seg.nrrd", "dicom-seg")
# (argparse name, flag, file suffix in an output folder) of the files written beside each label map
SIDE_FLAGS = (("save_probabilities", "--save-probabilities", "npz"), ("statistics", "--statistics", "json"),
              ("save_uncertainty", "--save-uncertainty", "nii.gz"))


def add_parser(sub) -> None:
    p = sub.add_parser("segment", help="segment 3D images with a MedDINOv3 model")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".nii/.nii.gz/.nrrd/.mha/.mhd file, DICOM series folder, or a folder of those")
    p.add_argument("-o", "--output", required=True,
                   help="output .nii.gz/.nrrd label map, .seg.nrrd or .dcm (DICOM SEG); a folder when there are "
                        "several inputs")
    p.add_argument("--model", required=True, help="model package, nnU-Net result folder, hf: reference or name")
    p.add_argument("--save-probabilities", metavar="FILE.npz",
                   help="also save float16 class probabilities (several inputs: a folder, one NAME.npz per input); "
                        "they are the model's, before post-processing (the .npz lists the steps the labels had), "
                        "so their argmax can differ from the label map where a step changed it")
    p.add_argument("--statistics", metavar="FILE.json|.csv",
                   help="also write per-structure statistics: voxels, volume (ml), intensity mean/std/min/max and "
                        "5/50/95th percentiles (HU for CT), centroid (LPS mm), bounding box (several inputs: a "
                        "folder, one NAME.json per input); the folder must exist")
    p.add_argument("--save-uncertainty", metavar="FILE.nii.gz",
                   help="also save the per-voxel normalised entropy of the class probabilities in percent (uint8 "
                        "0-100, input grid; several inputs: a folder) and report a per-slice mean confidence")
    p.add_argument("--output-format", choices=FORMATS, default="nii.gz",
                   help="file type written into the -o folder when there are several inputs (default nii.gz); "
                        "dicom-seg: a DICOM Segmentation (.dcm; any -o ending in .dcm is one) referencing the "
                        "input DICOM series")
    add_arguments(p)  # every SegmentOptions field: --device, --fast, --tta, --folds, --batch-size, --roi, ...
    p.add_argument("--json-progress", action="store_true", help="one JSON event per line on stdout")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (a folder of inputs otherwise skips the cases already done)")
    p.set_defaults(run=run)


def _options(args):
    """The `SegmentOptions` of the parsed arguments, checked (one error line naming the flag)."""

    try:
        options = SegmentOptions.from_args(args)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return options.replace(training_orientation=_orientation(options.training_orientation))


def _orientation(code: str | None) -> str | None:
    """--training-orientation, checked (one error line naming the problem)."""
    from ..volumes import check_orientation_code

    if code is None:
        return None
    try:
        return check_orientation_code(code)
    except ValueError as e:
        raise CommandError(f"--training-orientation: {e}") from None


def _outputs(inputs: list[Path], args, batch_mode: bool) -> tuple[list[Path], list]:
    """(label outputs, `SideOutputs`) per input: the given files, or NAME.<format> / NAME.npz ... in folders
    (`engine.cohort.cohort_cases`)."""
    from ..engine.cohort import cohort_cases
    from ..engine.side_outputs import SideOutputs

    out = Path(args.output)
    sides = {flag: Path(getattr(args, name)) if getattr(args, name) else None for name, flag, _ in SIDE_FLAGS}
    if not batch_mode:
        for flag, file in (("-o", out), *sides.items()):
            if file is not None and file.is_dir():
                raise CommandError(f"{file}: is a folder; a folder {flag} needs several inputs (or a folder of "
                                   f"them), one input needs a file name")
        if args.output_format == "dicom-seg" and not out.name.lower().endswith(".dcm"):
            raise CommandError(f"{out}: --output-format dicom-seg writes a DICOM SEG: name the -o file NAME.dcm")
        return [out], [SideOutputs(*sides.values())]
    for flag, folder in (("-o", out), *sides.items()):
        if folder is not None and not folder.is_dir() and (folder.exists() or _file_name(folder)):
            raise CommandError(f"{folder}: several inputs, or a folder of them, need {flag} to be a folder, not a "
                               "file name")
    suffix = "dcm" if args.output_format == "dicom-seg" else args.output_format
    try:
        cases = cohort_cases(inputs, out, suffix, [(folder, ext) for (_, _, ext), folder in
                                                   zip(SIDE_FLAGS, sides.values()) if folder is not None])
    except ValueError as e:
        raise CommandError(str(e)) from None
    given = [i for i, folder in enumerate(sides.values()) if folder is not None]  # SideOutputs' order
    return ([c.output for c in cases],
            [SideOutputs(*(dict(zip(given, c.extras)).get(i) for i in range(len(SIDE_FLAGS)))) for c in cases])


def _file_name(path: Path) -> bool:
    """Whether `path` is named like an output file (label map, .seg.nrrd, .dcm, .npz, .json, .csv) rather than a
    folder."""
    from ..engine.outputs import output_kind

    try:
        output_kind(path)
        return True
    except ValueError:
        return path.name.lower().endswith((".npz", ".json", ".csv"))


def run(args) -> int:
    """One input, or a cohort (`_run_cohort`); every check before the model is loaded. Returns the exit code."""
    from ..engine import segment_file
    from ..progress import Progress
    from ..volumes import InputError, list_inputs

    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    progress = Progress(json_lines=args.json_progress, desc="segment", enabled=int(os.environ.get("RANK", "0")) == 0)
    started = time.perf_counter()
    with failure_reported(progress):
        options = _options(args)
        try:
            inputs = list_inputs(args.inputs)
        except InputError as e:
            raise CommandError(str(e)) from None
        batch_mode = len(inputs) > 1 or (len(args.inputs) == 1 and Path(args.inputs[0]).is_dir()
                                         and inputs[0] != Path(args.inputs[0]))
        if under_torchrun and not batch_mode:
            raise CommandError("under torchrun, segment shares a cohort out over the processes: give a folder of "
                               "scans (or several inputs) and an output folder")
        outputs, side_outputs = _outputs(inputs, args, batch_mode)
        _check_outputs(inputs, outputs, side_outputs, batch_mode, args.overwrite)
        info, device = _join(args.device) if batch_mode else (None, device_option(args.device))
        from ..checkpoints import load_model

        options = options.replace(device=str(device))
        model = load_model(args.model, device=device, folds=options.folds)
        if options.training_orientation and model.spec.slicing != "stored":
            raise CommandError(f"{args.model}: --training-orientation is for nnU-Net result folders and packages "
                               "converted from them; this model slices the engine's canonical view")
        progress.event("started", inputs=[str(p) for p in inputs], outputs=[str(o) for o in outputs],
                       model=str(model.path), device=str(device))

        def segment_one(inp, out, side, case_progress):
            result = segment_file(inp, out, model, options, probabilities_path=side.probabilities,
                                  statistics_path=side.statistics, uncertainty_path=side.uncertainty,
                                  overwrite=args.overwrite, progress=case_progress)
            omitted = result.stats.get("dicom_seg_omitted")
            if omitted:
                print(f"meddinov3 segment: note: {out}: empty classes left out of the DICOM SEG: {', '.join(omitted)}",
                      file=sys.stderr)
            return result

        if batch_mode:
            return _run_cohort(args, inputs, outputs, side_outputs, segment_one, info, progress, started)
        t0 = time.perf_counter()
        side = side_outputs[0]
        try:
            result = segment_one(inputs[0], outputs[0], side, progress)
        except (InputError, FileExistsError) as e:
            raise CommandError(str(e)) from None
        progress.event("finished", input=str(inputs[0]), output=str(outputs[0]),
                       seconds=round(time.perf_counter() - t0, 2),
                       **{k: str(v) if v else None for k, v in (("probabilities", side.probabilities),
                           ("statistics", side.statistics), ("uncertainty", side.uncertainty))},
                       **{k: result.stats[k] for k in ("device", "slices", "batch_size", "dicom_seg_omitted",
                                                       "slice_confidence") if k in result.stats})
        if not args.json_progress:
            print(f"{inputs[0]} -> {outputs[0]} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        progress.close()
        progress.event("done", seconds=round(time.perf_counter() - started, 2), count=1)
        return 0


def _check_outputs(inputs: list[Path], outputs: list[Path], side_outputs: list, batch_mode: bool,
                   overwrite: bool) -> None:
    """Refuse, before any work, outputs that are inputs, or that exist without `overwrite` (one input), or folders
    that cannot take the files (a cohort)."""
    from ..engine.outputs import check_not_input, check_output, input_files
    from ..files import check_writable

    sources = input_files(inputs) if any(o.exists() for o in outputs) else []
    try:
        for o, side in zip(outputs, side_outputs):
            check_not_input(o, sources)
            if not batch_mode:  # a cohort skips the cases whose outputs exist: only its folders must take files
                check_output(o, overwrite)
                side.check(overwrite)
        if batch_mode:
            check_writable(outputs[0])
            # the side folders' rules (a statistics folder must exist, all must take files); existing files are
            # not refused here: a finished case is skipped, an unfinished one is checked by `segment_file`
            side_outputs[0].check(overwrite=True)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _join(device: str):
    """(rank/world, this rank's device): the torchrun job's when there is one (`engine.cohort.join_cohort`)."""
    from ..engine.cohort import join_cohort
    from ..distributed import DeviceError

    try:
        return join_cohort(device)
    except DeviceError as e:
        raise CommandError(f"--device {device}: {e}") from None


def _run_cohort(args, inputs, outputs, side_outputs, segment_one, info, progress, started) -> int:
    """Several inputs: `engine.cohort.run_cohort` (skips finished cases, shares out under torchrun, writes the CSV).
    A case is finished when its label map and all its side outputs (`SideOutputs.files`) exist."""
    from ..engine.cohort import CSV_NAME, CohortCase, run_cohort
    from ..distributed import cleanup

    cases = [CohortCase(i, o, side.files) for i, o, side in zip(inputs, outputs, side_outputs)]
    beside = dict(zip(outputs, side_outputs))  # each label map's other outputs
    csv_path = Path(args.output) / CSV_NAME
    report = run_cohort(cases, lambda c: segment_one(c.input, c.output, beside[c.output], None).stats, info,
                        args.overwrite, csv_path, progress)
    cleanup(info)
    failed, skipped = report.count("failed"), report.count("skipped")
    if not info.is_main:  # rank 0 reports; every rank exits with the cohort's code
        return 1 if failed else 0
    if not args.json_progress:
        print(f"cohort: {report.count('done')} segmented, {skipped} skipped (already done), {failed} failed; "
              f"every case in {csv_path}", file=sys.stderr)
    if failed:
        progress.event("failed", message=f"{failed} of {len(cases)} input(s) failed", csv=str(csv_path))
        return 1
    progress.event("done", seconds=round(time.perf_counter() - started, 2), count=len(cases), skipped=skipped,
                   csv=str(csv_path))
    return 0
