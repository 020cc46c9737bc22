"""`meddinov3 convert SRC -o DIR`: any supported layout -> a model package."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert an nnU-Net folder or checkpoint into a MedDINOv3 model package")
    p.add_argument("source", help="nnU-Net result folder, .pth checkpoint, model package or hf: reference")
    p.add_argument("-o", "--output", required=True, help="package folder to create")
    p.add_argument("--name", help="model name stored in model.json")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--training-orientation", metavar="CODE",
                   help="nnU-Net result folders: how the training files were stored (e.g. RAS for NIfTI, LPS for "
                        "DICOM-derived); stored in model.json so inputs stored otherwise are reoriented to it")
    p.add_argument("--offline", action="store_true", default=None, help="never use the network")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..checkpoints import convert
    from .segment import _orientation

    out = convert(args.source, args.output, overwrite=args.overwrite, name=args.name, offline=args.offline,
                  training_orientation=_orientation(args.training_orientation))
    print(f"wrote model package {out}")
    return 0
