"""`SegmentOptions`: one object for the engine, the command line and the Slicer Logic.

Round trips through argv and JSON, and the same set of options in every place: a field that the command line's
parser, `to_argv` or the Logic's command misses makes these tests fail.
"""

import dataclasses
import json

import pytest

from meddinov3.cli.main import build_parser
from meddinov3.options import SegmentOptions

# every field away from its default (compile=False cannot be said on the command line: only True or the default)
ALL_SET = SegmentOptions(device="cuda:1", fast=True, tta=True, folds=("1", "0"), batch_size=7, roi=(1, 2, 3, 40, 50, 9),
                         keep_largest=True, fill_holes=True, postprocess=False, compile=True,
                         training_orientation="RAS", reference_precision=True)


def _cli_options(argv: list[str]) -> SegmentOptions:
    args = build_parser().parse_args(["segment", "in.nrrd", "-o", "out.nii.gz", "--model", "m", *argv])
    return SegmentOptions.from_args(args)


def test_every_field_is_set_away_from_its_default():
    defaults = SegmentOptions()
    assert all(getattr(ALL_SET, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(SegmentOptions))


def test_round_trip_through_argv_and_json():
    for options in (SegmentOptions(), ALL_SET, SegmentOptions(folds=["2"], roi=[-5, 0, 0, 1, 1, 1], batch_size=1)):
        assert SegmentOptions.from_argv(options.to_argv()) == options
        assert SegmentOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    assert ALL_SET.to_dict()["folds"] == ["1", "0"] and ALL_SET.to_dict()["roi"] == [1, 2, 3, 40, 50, 9]
    with pytest.raises(TypeError, match="unknown segmentation option"):
        SegmentOptions.from_dict({"devcie": "cpu"})


def test_each_field_changes_the_argv():
    """Each field on its own reaches the command line (and comes back)."""
    defaults = SegmentOptions()
    for f in dataclasses.fields(SegmentOptions):
        one = defaults.replace(**{f.name: getattr(ALL_SET, f.name)})
        assert one.to_argv() != defaults.to_argv(), f.name
        assert SegmentOptions.from_argv(one.to_argv()) == one, f.name


def test_the_cli_parser_has_every_option_and_nothing_else_of_segmentation():
    assert _cli_options(ALL_SET.to_argv()) == ALL_SET
    assert _cli_options([]) == SegmentOptions()
    dests = set(vars(build_parser().parse_args(["segment", "in.nrrd", "-o", "out.nii.gz", "--model", "m"])))
    dests -= {"verb", "run"}
    not_options = {"inputs", "output", "model", "save_probabilities", "statistics", "save_uncertainty",
                   "output_format", "json_progress", "overwrite"}  # what to segment and where to write: no options
    assert dests - not_options == {f.name for f in dataclasses.fields(SegmentOptions)}


def test_values_are_checked_where_they_enter():
    with pytest.raises(ValueError, match="batch_size must be 'auto' or a positive integer"):
        SegmentOptions(batch_size=0)
    with pytest.raises(ValueError, match="--batch-size must be 'auto' or a positive integer, got 'x'"):
        SegmentOptions.from_argv(["--batch-size", "x"])
    with pytest.raises(ValueError, match="--roi needs six integers"):
        SegmentOptions.from_argv(["--roi", "1,2,3"])
    assert SegmentOptions(folds="all").folds is None and SegmentOptions(folds="0, 0,1").folds == ("0", "1")


def test_the_logic_command_carries_every_option(headless_slicer):
    """What the Slicer Logic hands the child is what the command line parses back: options as an object, or as the
    Logic's own keyword arguments."""
    from MedDINOv3SegmentLib.logic import OPTION_KEYWORDS, buildCommand, segmentOptions

    command = buildCommand("in.nrrd", "out.seg.nrrd", "m", options=ALL_SET)
    assert _cli_options(command[command.index("--model") + 2:]) == ALL_SET
    keywords = dict(device="cpu", fast=True, tta=True, roiBox=[1, 2, 3, 4, 5, 6], keepLargest=True, fillHoles=True,
                    batchSize=8, modelPostprocessing=False)
    assert set(keywords) == set(OPTION_KEYWORDS)
    command = buildCommand("in.nrrd", "out.seg.nrrd", "m", **keywords)
    assert _cli_options(command[command.index("--model") + 2:]) == segmentOptions(**keywords)
    # keywords override single fields of the object; None leaves them
    merged = segmentOptions(ALL_SET, device="cpu", batchSize=0, fast=None)
    assert merged == ALL_SET.replace(device="cpu", batch_size="auto")


def test_the_logic_accepts_options(headless_slicer, slicer_scene, monkeypatch):
    """`segmentAsync(options=...)` starts the child with exactly those options (the child is not run here)."""
    import numpy as np
    import slicer

    from MedDINOv3SegmentLib import logic as logic_module

    started = []

    class FakeChild:
        def __init__(self, command, env=None, cwd=None):
            started.append(command)

        def kill(self, timeout=1.0):
            pass

    monkeypatch.setattr(logic_module, "ChildProcess", FakeChild)
    volume = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), dtype=np.int16))
    logic = logic_module.MedDINOv3SegmentLogic()
    options = ALL_SET.replace(roi=None)
    task = logic.segmentAsync(volume, "m", options=options, tta=False)
    command = started[-1]
    assert _cli_options(command[command.index("--model") + 2:command.index("--json-progress")]) == \
        options.replace(tta=False)
    task.cancel()
