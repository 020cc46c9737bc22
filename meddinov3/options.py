"""`SegmentOptions`: every user option of a segmentation, in one frozen dataclass.

The engine (`segment_image`, `segment_file`), the command line (`meddinov3 segment`) and the Slicer Segment Logic
(which runs that command in a child process) all take this one object, so a new option is one field here plus its
argparse line in `add_arguments`; `to_argv` / `from_args` and `to_dict` / `from_dict` carry it across the process
boundary and into JSON. Torch-free: the Slicer modules import it before PyTorch is installed.

What is not an option of the segmentation stays outside: the model and the input (arguments of their own), output
paths, progress reporting, cancellation.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence, Union

BatchSize = Union[int, str]


def _folds(value) -> tuple[str, ...] | None:
    """None (all folds) or a tuple of fold names without repeats ("0,0" runs fold 0 once)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() in ("", "all"):
            return None
        value = value.split(",")
    names = [str(f).strip() for f in value if str(f).strip()]
    return tuple(dict.fromkeys(names)) or None


def _batch_size(value) -> BatchSize:
    """"auto" or a positive integer (strings are the command line's business: `from_args`)."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"batch_size must be 'auto' or a positive integer, got {value!r}")
    return value


def _roi(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        box = tuple(int(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        box = ()
    if len(box) != 6:
        raise ValueError(f"the ROI needs six integers x0,y0,z0,x1,y1,z1, got {value!r}")
    return box


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment: device and speed, folds, region, post-processing, nnU-Net convention.

    Attributes:
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (a `torch.device` is accepted and stored as its name).
        fast: the model's fast in-plane spacing and only every n-th thin slice through the network (CPUs).
        tta: mirroring test-time augmentation (up to 4 passes).
        folds: fold names whose probabilities are averaged; None: every fold the model has.
        batch_size: slices/tiles per forward pass, "auto" (sized from the free memory) or a positive integer.
        roi: voxel box (x0, y0, z0, x1, y1, z1) of the input, end exclusive; outside is background. None: all.
        keep_largest: keep the largest connected component per label.
        fill_holes: fill holes per label.
        postprocess: run the steps the model package declares (`model.json` "postprocessing").
        compile: `torch.compile` the network; None lets the engine decide (not on CPU).
        training_orientation: nnU-Net convention only: how the training files were stored (e.g. "RAS").
        reference_precision: RoPE in bf16 as the reference code computes it (fidelity checks).
    """

    device: str = "auto"
    fast: bool = False
    tta: bool = False
    folds: tuple[str, ...] | None = None
    batch_size: BatchSize = "auto"
    roi: tuple[int, ...] | None = None
    keep_largest: bool = False
    fill_holes: bool = False
    postprocess: bool = True
    compile: bool | None = None
    training_orientation: str | None = None
    reference_precision: bool = False

    def __post_init__(self):
        # normalised once, so that equal options compare equal whatever types the caller used
        set_ = object.__setattr__
        set_(self, "device", str(self.device or "auto"))
        set_(self, "folds", _folds(self.folds))
        set_(self, "batch_size", _batch_size(self.batch_size))
        set_(self, "roi", _roi(self.roi))
        for name in ("fast", "tta", "keep_largest", "fill_holes", "postprocess", "reference_precision"):
            set_(self, name, bool(getattr(self, name)))
        if self.compile is not None:
            set_(self, "compile", bool(self.compile))
        if self.training_orientation == "":
            set_(self, "training_orientation", None)

    def replace(self, **changes) -> "SegmentOptions":
        """A copy with `changes` (field names; an unknown name is a TypeError)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def merged(cls, options: "SegmentOptions | None" = None, **changes) -> "SegmentOptions":
        """`options` (default: the defaults) with `changes` applied; keyword callers of the engine land here."""
        return (options or cls()).replace(**changes) if changes else (options or cls())

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: tuples become lists."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmentOptions":
        """Inverse of `to_dict`; a key that is no field is a TypeError (a typo must not be ignored)."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown segmentation option(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    # -- command line -------------------------------------------------------------------------

    def to_argv(self) -> list[str]:
        """The `meddinov3 segment` flags for these options (defaults left out, except --device and --batch-size,
        which are always written so that a child's command line shows them)."""
        argv = ["--device", self.device, "--batch-size", str(self.batch_size)]
        for name, flag in (("fast", "--fast"), ("tta", "--tta"), ("keep_largest", "--keep-largest"),
                           ("fill_holes", "--fill-holes"), ("compile", "--compile"),
                           ("reference_precision", "--reference-precision")):
            if getattr(self, name):
                argv.append(flag)
        if not self.postprocess:
            argv.append("--no-postprocessing")
        if self.folds is not None:
            argv += ["--folds", ",".join(self.folds)]
        if self.roi is not None:
            box = ",".join(str(v) for v in self.roi)
            argv += [f"--roi={box}"] if box.startswith("-") else ["--roi", box]  # argparse: "-5,..." is no flag
        if self.training_orientation is not None:
            argv += ["--training-orientation", self.training_orientation]
        return argv

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SegmentOptions":
        """From a namespace parsed with `add_arguments`' flags; a bad value is a ValueError naming its flag."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        if values["batch_size"] != "auto":
            try:
                values["batch_size"] = int(values["batch_size"])
                if values["batch_size"] < 1:
                    raise ValueError
            except ValueError:
                raise ValueError(f"--batch-size must be 'auto' or a positive integer, got {args.batch_size!r}") from None
        try:
            values["roi"] = _roi(args.roi) if args.roi else None
        except ValueError:
            raise ValueError(f"--roi needs six integers x0,y0,z0,x1,y1,z1, got {args.roi!r}") from None
        return cls(**values)

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> "SegmentOptions":
        """Inverse of `to_argv` (flags of other arguments are an error)."""
        parser = argparse.ArgumentParser(prog="segment options", add_help=False)
        add_arguments(parser)
        return cls.from_args(parser.parse_args(list(argv)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The argparse lines of every `SegmentOptions` field (dest = field name); `meddinov3 segment` uses them."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--fast", action="store_true",
                   help="for CPUs: lower in-plane resolution (the model's fast spacing or 2x), and only every n-th thin "
                   "slice through the network (the slices between are interpolated)")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (up to 4 passes)")
    p.add_argument("--folds", default="all", help="'all' or comma-separated fold names (probabilities averaged)")
    p.add_argument("--batch-size", default="auto", help="slices/tiles per forward pass: auto or a number")
    p.add_argument("--roi", help="voxel box x0,y0,z0,x1,y1,z1 (end exclusive); outside is background")
    p.add_argument("--keep-largest", action="store_true", help="keep the largest connected component per label")
    p.add_argument("--fill-holes", action="store_true", help="fill holes per label")
    p.add_argument("--no-postprocessing", dest="postprocess", action="store_false",
                   help="skip the post-processing the model package declares (model.json 'postprocessing')")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network (CUDA)")
    p.add_argument("--training-orientation", metavar="CODE",
                   help="nnU-Net result folders (and their conversions): how the training files were stored, e.g. RAS "
                        "(NIfTI) or LPS (DICOM-derived); inputs stored otherwise are reoriented to it before slicing "
                        "and the labels back (default: the package's setting, else the input's array as stored, "
                        "like nnUNetv2_predict)")
    p.add_argument("--reference-precision", action="store_true",
                   help="compute RoPE in bf16 as the reference MedDINOv3 code does (fidelity checks; default fp32)")
