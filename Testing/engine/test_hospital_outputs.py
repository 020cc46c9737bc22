"""Outputs for hospital pipelines: DICOM SEG (read back with highdicom and pydicom), structure statistics (against
numpy), uncertainty (zero where certain, high at a tie), and their bad inputs (one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.checkpoints.package import ClassInfo, read_spec
from meddinov3.cli.main import main
from meddinov3.engine import segment_file
from meddinov3.engine.statistics import structure_statistics, write_statistics
from meddinov3.engine.uncertainty import normalised_entropy
from meddinov3.phantom import load_liver_ct, oblique_direction
from meddinov3.resources import resources_dir
from meddinov3.volumes import InputError, same_geometry
from Testing.helpers import CLASSES3, threshold_model, write_dicom_series

DEMO = resources_dir() / "demo-liver-ct"
UID = "1.2.826.0.1.3680043.2.1125.42"


def write_ct_series(image: sitk.Image, folder: Path, slice_thickness: bool = True, uid: str = UID) -> dict[str, int]:
    """A CT DICOM series of `image` (study `uid`, series, frame of reference, patient), files and instance numbers
    in the reverse of the slice order; returns SOP instance UID -> slice index k."""
    folder.mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    sops = {}
    depth = image.GetDepth()
    for k in range(depth):
        sl = image[:, :, k]
        sop = f"{uid}.1.{k + 1}"
        tags = {"0008|0060": "CT", "0008|0018": sop, "0020|000d": uid, "0020|000e": f"{uid}.1",
                "0020|0052": f"{uid}.2", "0010|0010": "Liver^Test", "0010|0020": "LITS117", "0020|0010": "1",
                "0020|0011": "3", "0020|0013": str(depth - k),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0020|0032": "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                "0028|1052": "0", "0028|1053": "1"}
        if slice_thickness:
            tags["0018|0050"] = f"{image.GetSpacing()[2]:.4f}"
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{depth - k:04d}.dcm"))
        writer.Execute(sl)
        sops[sop] = k
    return sops


@pytest.fixture(scope="module")
def liver_slices():
    """12 axial slices of the real LiTS CT (liver and tumour in them), int16 HU."""
    ct, _ = load_liver_ct()
    return sitk.Cast(ct[:, :, 70:82], sitk.sitkInt16)


def _labels_from_seg(seg, sops: dict[str, int], shape, values: dict[int, int]) -> np.ndarray:
    """The SEG's frames put back on the source grid: (k, y, x) label values (segment number -> `values`)."""
    out = np.zeros(shape, dtype=np.uint8)
    pixels = seg.pixel_array.reshape((-1,) + shape[1:])
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        out[sops[source]][frame > 0] = values[number]
    return out


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_dicom_seg_references_series_and_holds_the_label_map(tmp_path, liver_slices, oblique, capsys):
    import highdicom as hd
    import pydicom

    image = sitk.Image(liver_slices)
    if oblique:  # untilted: the slices step along their own (tilted) normal
        image.SetDirection(oblique_direction(20.0, "x"))
    sops = write_ct_series(image, tmp_path / "series", slice_thickness=not oblique)
    out, stats, unc = tmp_path / "out" / "seg.dcm", tmp_path / "stats.json", tmp_path / "unc.nii.gz"
    assert main(["segment", str(tmp_path / "series"), "-o", str(out), "--output-format", "dicom-seg", "--model",
                 str(DEMO), "--device", "cpu", "--statistics", str(stats), "--save-uncertainty", str(unc),
                 "--json-progress"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["segment", str(tmp_path / "series"), "-o", str(tmp_path / "labels.nii.gz"), "--model", str(DEMO),
                 "--device", "cpu", "--save-probabilities", str(tmp_path / "p.npz")]) == 0
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    label_array = sitk.GetArrayFromImage(labels)
    assert set(np.unique(label_array)) == {0, 1, 2}

    ds = pydicom.dcmread(out)
    source = pydicom.dcmread(next((tmp_path / "series").iterdir()), stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.PatientID) == (UID, f"{UID}.2", "LITS117")
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == f"{UID}.1"
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(sops)

    spec = read_spec(DEMO)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "tumour"]
    for segment, cls in zip(ds.SegmentSequence, spec.classes[1:]):
        term = cls.terminology
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == term["category"][1]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == term["type"][1]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert list(segment.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*cls.color).value)
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "MedDINOv3" and algorithm.AlgorithmVersion.startswith("demo-liver-ct ")
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
    positions = {k: np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) for k in sops.values()}
    for item in ds.PerFrameFunctionalGroupsSequence:  # each frame lies where its source slice lies
        k = sops[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient, positions[k], atol=1e-3)
    assert np.array_equal(_labels_from_seg(ds, sops, label_array.shape, {1: 1, 2: 2}), label_array)
    assert hd.seg.segread(out).get_segment_numbers() == [1, 2]

    # statistics and uncertainty of the same run, on the same grid
    table = json.loads(stats.read_text())
    assert [(s["name"], s["voxels"]) for s in table["segments"]] == [
        ("liver", int((label_array == 1).sum())), ("tumour", int((label_array == 2).sum()))]
    uncertainty = sitk.ReadImage(str(unc))
    assert same_geometry(uncertainty, labels) and uncertainty.GetPixelID() == sitk.sitkUInt8
    probabilities = np.load(tmp_path / "p.npz")["probabilities"]
    expected = np.rint(normalised_entropy(probabilities) * 100)
    assert np.abs(sitk.GetArrayFromImage(uncertainty) - expected).max() <= 1
    finished = next(e for e in events if e["event"] == "finished")
    assert finished["slice_confidence"] == table["slice_confidence"]
    assert len(finished["slice_confidence"]["confidence"]) == image.GetDepth()
    assert finished["statistics"] == str(stats) and finished["uncertainty"] == str(unc)


def test_batch_of_series_writes_one_seg_statistics_and_uncertainty_each(tmp_path, liver_slices, capsys):
    """A folder of series is a cohort: each case's statistics and uncertainty files are part of 'finished'."""
    for number, (name, first) in enumerate((("upper", 0), ("lower", 6))):
        write_ct_series(liver_slices[:, :, first:first + 4], tmp_path / "in" / name, uid=f"{UID}{number}")
    stats = tmp_path / "stats"
    argv = ["segment", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--output-format", "dicom-seg", "--model",
            str(DEMO), "--device", "cpu", "--statistics", str(stats), "--save-uncertainty", str(tmp_path / "unc")]
    assert main(argv) == 2  # the statistics folder must exist: refused before any work
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()
    stats.mkdir()
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cohort.csv", "lower.dcm", "upper.dcm"]
    assert sorted(p.name for p in stats.iterdir()) == ["lower.json", "upper.json"]
    assert sorted(p.name for p in (tmp_path / "unc").iterdir()) == ["lower.nii.gz", "upper.nii.gz"]
    assert json.loads((stats / "lower.json").read_text())["input"] == str(tmp_path / "in" / "lower")
    (stats / "lower.json").unlink()  # lower is not finished any more (its SEG exists: it fails without --overwrite)
    capsys.readouterr()
    assert main(argv) == 1
    assert "0 segmented, 1 skipped (already done), 1 failed" in capsys.readouterr().err


def test_dicom_seg_leaves_out_empty_classes_and_says_so(tmp_path):
    """Nothing above ~475 HU and no edge along the rows (the threshold model's vertical-gradient term): it finds no
    class 2, which is left out and named."""
    volume = np.full((4, 20, 20), -1000, dtype=np.int16)
    volume[:, :, 5:15] = 300
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.5, 1.5, 3.0))
    write_ct_series(image, tmp_path / "series")
    result = segment_file(tmp_path / "series", tmp_path / "seg.dcm", threshold_model(), device="cpu")
    assert result.stats["dicom_seg_omitted"] == ["tumour"]
    import pydicom

    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver"] and ds.NumberOfFrames == 4


def test_bad_inputs_one_line_nothing_written(tmp_path, capfd):
    volume = np.full((4, 20, 20), -1000, dtype=np.int16)
    volume[:, 5:15, 5:15] = 40
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.5, 1.5, 3.0))
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(nifti))
    write_dicom_series(image, tmp_path / "no_frame_of_reference")  # the shared helper writes no FrameOfReferenceUID
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "no_frame_of_reference"), "-o", str(out / "seg.dcm")], "no frame of reference UID",
         tmp_path / "no_frame_of_reference"),
        ([str(nifti), "-o", str(out / "seg.dcm")], "DICOM SEG output needs a DICOM series folder", nifti),
        ([str(nifti), "-o", str(out / "seg.nii.gz"), "--output-format", "dicom-seg"], "name the -o file", None),
        ([str(nifti), "-o", str(out / "seg.nii.gz"), "--statistics", str(tmp_path / "missing" / "s.json")],
         "does not exist", tmp_path / "missing"),
        ([str(nifti), "-o", str(out / "seg.nii.gz"), "--statistics", str(tmp_path / "s.txt")], ".json or .csv", None),
        ([str(nifti), "-o", str(out / "seg.nii.gz"), "--save-uncertainty", str(tmp_path / "u.npz")], "is an image",
         None),
    ]
    for argv, message, named in cases:
        rc = main(["segment", *argv, "--model", str(DEMO), "--device", "cpu"])
        err = capfd.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        if named is not None:
            assert str(named) in err
        assert not out.exists() and not (tmp_path / "missing").exists()
    # a series where the model finds nothing: a SEG needs a segment, so none is written (and it says why)
    volume[:, :, 5:15] = 60  # soft tissue without row edges: the threshold model finds nothing
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.5, 1.5, 3.0))
    write_ct_series(image, tmp_path / "air")
    with pytest.raises(InputError, match="no structure was found: a DICOM SEG needs at least one segment"):
        segment_file(tmp_path / "air", tmp_path / "air.dcm", threshold_model(), device="cpu",
                     statistics_path=tmp_path / "air.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["air", "ct.nii.gz", "no_frame_of_reference"]  # no file left


def test_statistics_against_numpy(tmp_path):
    """Two boxes with known voxel counts and intensities on an oblique, anisotropic grid; an empty third class."""
    rng = np.random.default_rng(3)
    values = rng.normal(40.0, 15.0, (12, 20, 24)).astype(np.float32)
    labels = np.zeros(values.shape, dtype=np.uint8)
    labels[2:8, 3:11, 4:14] = 1  # 6 x 8 x 10 = 480 voxels
    labels[9:11, 14:18, 15:22] = 3  # 2 x 4 x 7 = 56 voxels
    values[labels == 3] += 200.0
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-30.0, 12.0, 100.0))
    image.SetDirection(oblique_direction(15.0, "z"))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    classes = [CLASSES3[0], CLASSES3[1], ClassInfo(2, "spleen"), ClassInfo(3, "kidney")]
    records = structure_statistics(image, label_image, classes)

    assert [r["name"] for r in records] == ["liver", "spleen", "kidney"]
    empty = records[1]
    assert empty["voxels"] == 0 and empty["volume_ml"] == 0.0 and empty["mean"] is None
    for record, value, count in ((records[0], 1, 480), (records[2], 3, 56)):
        voxels = values[labels == value].astype(np.float64)
        assert record["voxels"] == count
        assert record["volume_ml"] == pytest.approx(count * 0.7 * 0.9 * 2.5 / 1000.0, abs=1e-4)
        assert record["mean"] == pytest.approx(voxels.mean(), rel=1e-6)
        assert record["std"] == pytest.approx(voxels.std(ddof=1), rel=1e-6)
        assert (record["min"], record["max"]) == pytest.approx((voxels.min(), voxels.max()))
        assert [record["p5"], record["p50"], record["p95"]] == pytest.approx(np.percentile(voxels, [5, 50, 95]))
        z, y, x = np.nonzero(labels == value)
        centre = image.TransformContinuousIndexToPhysicalPoint([float(x.mean()), float(y.mean()), float(z.mean())])
        np.testing.assert_allclose(record["centroid_lps_mm"], centre, atol=1e-3)
        assert record["bbox_start_ijk"] == [int(x.min()), int(y.min()), int(z.min())]
        assert record["bbox_size_ijk"] == [int(np.ptp(a)) + 1 for a in (x, y, z)]

    write_statistics(tmp_path / "s.csv", records)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [(r["name"], int(r["voxels"])) for r in rows] == [("liver", 480), ("spleen", 0), ("kidney", 56)]
    assert rows[0]["bbox_size_ijk"] == "10 8 6"
    with pytest.raises(FileExistsError):
        write_statistics(tmp_path / "s.csv", records)


def test_uncertainty_zero_where_certain_high_at_a_tie(tmp_path):
    """The threshold model's classes 0 and 1 tie at exactly 100 HU (logits 0 and 0, class 2 far below): normalised
    entropy ln 2 / ln 3 = 63 %. Air (-1000 HU) and bone (1500 HU) are certain: 0 %. The volume is stored with the
    body axis as the file's first axis, so the per-slice confidence runs along index axis 0."""
    volume = np.full((5, 16, 24), -1000, dtype=np.int16)  # (z, y, x) = numpy order; x will be the S axis
    volume[1:4, 4:12, 2:6] = 1500
    volume[1:4, 4:12, 14:20] = 100  # the tie, in S slices 14..19
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((2.0, 1.0, 1.0))
    image.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))  # index axis i (x) runs along S, j along L, k along P
    src = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(src))
    result = segment_file(src, tmp_path / "seg.nii.gz", threshold_model(), device="cpu",
                          uncertainty_path=tmp_path / "u.nii.gz")
    u = sitk.ReadImage(str(tmp_path / "u.nii.gz"))
    assert same_geometry(u, image)
    u = sitk.GetArrayFromImage(u)
    assert u.dtype == np.uint8 and u.max() <= 100
    assert (u[volume == -1000] == 0).mean() > 0.97 and u[2:3, 6:10, 3:5].max() == 0  # air, bone: certain
    assert abs(int(u[2, 8, 16]) - round(100 * np.log(2) / np.log(3))) <= 1
    confidence = result.stats["slice_confidence"]
    assert confidence["axis"] == 0 and len(confidence["confidence"]) == 24
    assert set(confidence["least_confident"][:6]) == set(range(14, 20))
    assert all(confidence["confidence"][x] == 1.0 for x in range(7, 13))  # air only
    assert result.probabilities is None  # only kept when --save-probabilities asks for them
