"""Training datasets: an nnU-Net v2 raw folder, or a JSON / CSV list of image-label pairs, checked up front.

Formats accepted by `load_dataset(path)`:

- nnU-Net v2 raw dataset folder: `dataset.json` (`labels` {name: value}, `channel_names` with one channel),
  `imagesTr/<case>_0000.<ext>`, `labelsTr/<case>.<ext>` (or the path of its dataset.json). Refused: further
  channels (`<case>_0001.<ext>`), labels without an image, `numTraining` not matching imagesTr.
- JSON list (what the Slicer Train module exports):
  `{"labels": {"background": 0, "liver": 1}, "modality": "CT",
    "cases": [{"image": "a.nii.gz", "label": "a_seg.nii.gz", "name": "a"}, ...]}`
  Relative paths are relative to the JSON file. `name` is optional (default: image file name).
- CSV list (`.tsv`: tab-separated; a spreadsheet's byte order mark is fine): a header row with columns
  `image,label[,name]`; label names either in a sidecar JSON next to it
  (`<file>.labels.json` or `labels.json`, holding `{"background": 0, "liver": 1}`) or in comment lines before
  the header: `# labels: background=0, liver=1`.

`check_dataset` opens every case before any training starts and raises `DatasetError` naming the case:
missing or unreadable files, image/label geometry mismatch, label values not declared in the label names.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..volumes import IMAGE_SUFFIXES, InputError, image_suffix, read_image, same_geometry


class DatasetError(ValueError):
    """A problem with the training data the user can fix; the message names the case and the file."""


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path


@dataclass
class Dataset:
    cases: list[Case]
    labels: dict[str, int]  # class name -> label value, background included
    modality: str = "CT"
    source: str = ""
    format: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def label_values(self) -> list[int]:
        return sorted(set(self.labels.values()))

    def class_names(self) -> list[tuple[int, str]]:
        """(value, name) sorted by value: the network's channel order."""
        return sorted(((v, k) for k, v in self.labels.items()), key=lambda t: t[0])

    def subset(self, names: list[str]) -> "Dataset":
        keep = set(names)
        return Dataset([c for c in self.cases if c.name in keep], self.labels, self.modality, self.source, self.format,
                       self.extra)

    def summary(self) -> dict:
        return {"source": self.source, "format": self.format, "modality": self.modality, "labels": self.labels,
                "cases": [{"name": c.name, "image": str(c.image), "label": str(c.label)} for c in self.cases]}


def _labels(raw, source: str) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{source}: no label names (a 'labels' object like {{\"background\": 0, \"liver\": 1}})")
    out = {}
    for name, value in raw.items():
        if name == "ignore":
            raise DatasetError(f"{source}: the nnU-Net 'ignore' label is not supported")
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"{source}: label {name!r}: region-based (overlapping) labels are not supported")
        try:
            out[str(name)] = int(value)
        except (TypeError, ValueError):
            raise DatasetError(f"{source}: label {name!r} has a non-integer value {value!r}") from None
    values = sorted(out.values())
    if len(set(values)) != len(values):
        raise DatasetError(f"{source}: two label names share one value")
    if 0 not in values:
        raise DatasetError(f"{source}: label value 0 (background) must be named, e.g. \"background\": 0")
    if values != list(range(len(values))):
        raise DatasetError(f"{source}: label values must be consecutive 0..{len(values) - 1}, got {values}")
    return out


def _nnunet(folder: Path) -> Dataset:
    meta_path = folder / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{meta_path}: unreadable dataset.json ({e})") from None
    labels = _labels(meta.get("labels"), str(meta_path))
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if len(channels) != 1:
        raise DatasetError(f"{meta_path}: {len(channels)} input channels; MedDINOv3 takes one channel (one CT/MR image)")
    modality = str(next(iter(channels.values())))
    ext = meta.get("file_ending", ".nii.gz")
    images, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not images.is_dir():
        raise DatasetError(f"{folder}: no imagesTr folder")
    cases = []
    for img in sorted(images.glob(f"*_0000{ext}")):
        name = img.name[: -len(f"_0000{ext}")]
        cases.append(Case(name, img, labels_dir / f"{name}{ext}"))
    if not cases:
        raise DatasetError(f"{images}: no images named <case>_0000{ext}")
    names = {c.name for c in cases}
    for other in sorted(images.glob(f"*_[0-9][0-9][0-9][0-9]{ext}")):  # a second channel would be dropped silently
        name = other.name[: -len(f"_0000{ext}")]
        if not other.name.endswith(f"_0000{ext}") and name in names:
            raise DatasetError(f"case {name!r}: {other} is a further input channel, but {meta_path.name} declares "
                               "one channel (MedDINOv3 takes one channel)")
    for lab in sorted(labels_dir.glob(f"*{ext}")) if labels_dir.is_dir() else []:
        name = lab.name[: -len(ext)]
        if name not in names and not name.startswith("."):  # "._x.nii.gz": macOS metadata, not a case
            raise DatasetError(f"case {name!r}: label {lab} has no image {images / f'{name}_0000{ext}'}")
    expected = meta.get("numTraining")
    if isinstance(expected, int) and not isinstance(expected, bool) and expected != len(cases):
        raise DatasetError(f"{meta_path}: numTraining is {expected} but imagesTr holds {len(cases)} case(s) "
                           f"(<case>_0000{ext}); fix numTraining or add the missing cases")
    return Dataset(cases, labels, "CT" if modality.upper() == "CT" else modality, str(folder), "nnunet")


def _resolve(base: Path, p: str) -> Path:
    path = Path(os.path.expanduser(str(p)))
    return path if path.is_absolute() else base / path


def _default_name(image: Path) -> str:
    suffix = image_suffix(image) or image.suffix
    name = image.name[: -len(suffix)] if suffix else image.name
    return name[:-5] if name.endswith("_0000") else name


def _json_list(path: Path) -> Dataset:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("cases"), list):
        raise DatasetError(f"{path}: expected {{\"labels\": {{...}}, \"cases\": [{{\"image\": ..., \"label\": ...}}]}}")
    labels = _labels(meta.get("labels"), str(path))
    cases = []
    for i, c in enumerate(meta["cases"]):
        if not isinstance(c, dict) or "image" not in c or "label" not in c:
            raise DatasetError(f"{path}: case #{i + 1} needs 'image' and 'label'")
        for key in ("image", "label"):
            if not isinstance(c[key], str) or not c[key].strip():
                raise DatasetError(f"{path}: case #{i + 1}: {key!r} must be a file path, got {c[key]!r}")
        img = _resolve(path.parent, c["image"])
        cases.append(Case(str(c.get("name") or _default_name(img)), img, _resolve(path.parent, c["label"])))
    return Dataset(cases, labels, str(meta.get("modality", "CT")), str(path), "json")


def _csv_list(path: Path) -> Dataset:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # spreadsheets write a byte order mark
    except OSError as e:
        raise DatasetError(f"{path}: unreadable ({e})") from None
    labels_raw = None
    comment = [ln.lstrip("#").strip() for ln in lines if ln.startswith("#")]
    for ln in comment:
        if ln.lower().startswith("labels:"):
            labels_raw = {}
            for item in ln.split(":", 1)[1].split(","):
                if "=" not in item:
                    raise DatasetError(f"{path}: bad '# labels:' line, expected name=value pairs")
                k, v = item.split("=", 1)
                labels_raw[k.strip()] = v.strip()
    if labels_raw is None:
        for side in (path.with_name(path.name + ".labels.json"), path.with_suffix(".labels.json"),
                     path.with_name("labels.json")):
            if side.is_file():
                try:
                    labels_raw = json.loads(side.read_text())
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{side}: unreadable JSON ({e})") from None
                if not isinstance(labels_raw, dict):
                    raise DatasetError(f"{side}: expected the label names as an object, e.g. "
                                       '{"background": 0, "liver": 1}')
                labels_raw = labels_raw.get("labels", labels_raw)
                break
    labels = _labels(labels_raw, f"{path} (label names: '# labels: background=0, ...' or {path.name}.labels.json)")
    reader = csv.DictReader((ln for ln in lines if not ln.startswith("#") and ln.strip()),
                            delimiter="\t" if path.suffix.lower() == ".tsv" else ",", skipinitialspace=True)
    rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    if not rows or "image" not in rows[0] or "label" not in rows[0]:
        raise DatasetError(f"{path}: needs a header row with columns image,label[,name]"
                           f"{' (tab-separated)' if path.suffix.lower() == '.tsv' else ''}")
    cases = []
    for i, r in enumerate(rows):
        image, label, name = ((r.get(k) or "").strip() for k in ("image", "label", "name"))
        if not image or not label:
            raise DatasetError(f"{path}: row {i + 1} after the header{f' (case {name!r})' if name else ''} needs "
                               "both an image and a label path")
        img = _resolve(path.parent, image)
        cases.append(Case(name or _default_name(img), img, _resolve(path.parent, label)))
    return Dataset(cases, labels, "CT", str(path), "csv")


def nnunet_folder_named_by(path: Path) -> Path | None:
    """The nnU-Net raw dataset folder that `path` names through its dataset.json (users pass either), else None."""
    return path.parent if path.name == "dataset.json" and (path.parent / "imagesTr").is_dir() else None


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read a dataset description (no voxels read); see the module docstring for the formats.

    Paths come out absolute: the run's config.json records them, and a resume may start in another folder.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset folder or file")
    path = nnunet_folder_named_by(path) or path
    if path.is_dir():
        if not (path / "dataset.json").is_file():
            raise DatasetError(f"{path}: folder has no dataset.json (expected an nnU-Net v2 raw dataset)")
        ds = _nnunet(path)
    elif path.suffix.lower() == ".json":
        ds = _json_list(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        ds = _csv_list(path)
    else:
        raise DatasetError(f"{path}: unknown dataset format (an nnU-Net folder, a .json or a .csv list)")
    if not ds.cases:
        raise DatasetError(f"{path}: the dataset has no cases")
    names = [c.name for c in ds.cases]
    for n in names:  # names become file names in the slice cache
        if not n.strip() or n in (".", "..") or "/" in n or "\\" in n or "\0" in n:
            raise DatasetError(f"{path}: case name {n!r} cannot be a file name (no '/' or '\\', not empty)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"{path}: duplicate case names {dup}")
    return ds


def read_case(case: Case, modality: str = "CT") -> tuple[sitk.Image, sitk.Image]:
    """Both images of a case, with errors naming it."""
    for what, p in (("image", case.image), ("label", case.label)):
        if not p.exists():
            raise DatasetError(f"case {case.name!r}: {what} file {p} is missing")
        if p.is_file() and image_suffix(p) is None:
            raise DatasetError(f"case {case.name!r}: {what} file {p} is not one of {', '.join(IMAGE_SUFFIXES)}")
    try:
        image = read_image(case.image)
    except InputError as e:
        raise DatasetError(f"case {case.name!r}: {e}") from None
    try:
        label = read_image(case.label)
    except InputError as e:
        raise DatasetError(f"case {case.name!r}: {e}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"case {case.name!r}: {case.image} is not a 3D single-channel image")
    if not same_geometry(image, label, tol=1e-3):
        raise DatasetError(f"case {case.name!r}: label geometry does not match the image "
                           f"({geometry_difference(image, label)})")
    return image, label


def geometry_difference(image: sitk.Image, label: sitk.Image, tol: float = 1e-3) -> str:
    """The geometry fields in which `label` differs from `image`, with both values."""
    fields = {"size": lambda im: im.GetSize(), "spacing": lambda im: tuple(round(v, 4) for v in im.GetSpacing()),
              "origin": lambda im: tuple(round(v, 3) for v in im.GetOrigin()),
              "direction": lambda im: tuple(round(v, 4) for v in im.GetDirection())}
    differ = [f"{name}: image {get(image)}, label {get(label)}" for name, get in fields.items()
              if len(get(image)) != len(get(label)) or not np.allclose(get(image), get(label), atol=tol)]
    return "; ".join(differ)


def label_array(case: Case, label: sitk.Image, declared: list[int]) -> np.ndarray:
    """Label voxels as uint8, refusing values that are not declared (or not integers)."""
    arr = sitk.GetArrayFromImage(label)
    if arr.dtype.kind == "f":
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise DatasetError(f"case {case.name!r}: label file {case.label} has non-integer values")
    values = np.unique(arr)
    extra = sorted(set(int(v) for v in values) - set(declared))
    if extra:
        raise DatasetError(f"case {case.name!r}: label value(s) {extra} in {case.label} are not declared in the "
                           f"label names (declared: {declared})")
    return arr.astype(np.uint8)


def check_dataset(ds: Dataset, min_cases: int = 1) -> dict[str, dict]:
    """Open every case (images, geometry, label values). Returns per-case header facts; raises DatasetError."""
    if len(ds.cases) < min_cases:
        raise DatasetError(f"{ds.source}: {len(ds.cases)} case(s), need at least {min_cases}")
    info = {}
    for case in ds.cases:
        image, label = read_case(case, ds.modality)
        counts = np.bincount(label_array(case, label, ds.label_values).ravel())  # one pass: no second sort
        info[case.name] = {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
                           "foreground_voxels": int(counts[1:].sum()), "values": np.flatnonzero(counts).tolist()}
    return info
