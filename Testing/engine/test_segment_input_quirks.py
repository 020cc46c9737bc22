"""`meddinov3 segment` with real-world file quirks: gantry-tilted DICOM, sheared NIfTI headers, odd options."""

import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.cli.main import main
from meddinov3.phantom import make_phantom_ct, oblique_direction
from meddinov3.volumes import InputError, read_image
from Testing.helpers import make_package


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("model") / "pkg", spacing=(2.0, 2.0), seed=5)


@pytest.fixture(scope="module")
def ct():
    return sitk.Cast(make_phantom_ct((6, 24, 24), (3.0, 3.0, 5.0))[0], sitk.sitkInt16)


def write_series(image: sitk.Image, folder: Path, iop, step, uid="1.2.826.0.1.3680043.2.1125.7." + "7" * 10,
                 prefix="IM") -> Path:
    """A DICOM series (UID `uid`, files `prefix`NNNN.dcm) of `image`'s slices with ImageOrientationPatient `iop`
    (row, column cosines) and slice k at ImagePositionPatient origin + k * `step` (mm)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    origin = np.array(image.GetOrigin())
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        tags = {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0", "0020|0013": str(k + 1),
                "0020|0037": "\\".join(f"{v:.6f}" for v in iop),
                "0020|0032": "\\".join(f"{v:.4f}" for v in origin + k * np.asarray(step, float)),
                "0018|0050": f"{np.linalg.norm(step):.4f}", "0028|1052": "0", "0028|1053": "1",
                "0008|0018": f"{uid}.{k + 1}"}
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{k:04d}.dcm"))
        writer.Execute(sl)
    return folder


def test_gantry_tilted_dicom_is_refused_not_misplaced(tmp_path, ct, pkg, capfd):
    """A tilted gantry gives slices whose rows are tilted but whose positions step along the table: ITK stacks
    them along the slice normal instead (the last slice lands millimetres away from where the scanner put it),
    so the label map would not lie on the CT. It must be refused; an oblique but unsheared series still reads."""
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    tilted = write_series(ct, tmp_path / "tilted", (1, 0, 0, 0, c, s), (0, 0, 5.0))
    with pytest.raises(InputError, match="sheared \\(gantry tilt\\?\\)"):
        read_image(tilted)
    oblique = write_series(ct, tmp_path / "oblique", (1, 0, 0, 0, c, s), (0, -5.0 * s, 5.0 * c))
    image = read_image(oblique)
    np.testing.assert_allclose(image.GetSpacing(), (3.0, 3.0, 5.0), atol=1e-3)

    out = tmp_path / "out" / "seg.nii.gz"
    rc = main(["segment", str(tilted), "-o", str(out), "--model", str(pkg), "--device", "cpu"])
    err = capfd.readouterr().err
    assert rc == 2 and str(tilted) in err and "gantry tilt" in err and len(err.strip().splitlines()) == 1, err
    assert not out.parent.exists()


def test_sheared_nifti_header_is_one_line(tmp_path, ct, pkg, capfd):
    """ITK prints a warning on the process's stderr before its error for a sheared sform: only ours may show."""
    image = sitk.Image(ct)
    image.SetDirection(oblique_direction(30, "z"))
    src = tmp_path / "sheared.nii"
    sitk.WriteImage(image, str(src))
    header = bytearray(src.read_bytes())
    struct.pack_into("<h", header, 252, 0)  # qform_code 0: only the sform places the voxels
    row = list(struct.unpack_from("<4f", header, 296))
    row[2] += 0.3  # srow_y: shear
    struct.pack_into("<4f", header, 296, *row)
    src.write_bytes(bytes(header))
    out = tmp_path / "seg.nii.gz"
    rc = main(["segment", str(src), "-o", str(out), "--model", str(pkg), "--device", "cpu"])
    err = capfd.readouterr().err
    assert rc == 2 and str(src) in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("device", ["meta", "xla"])
def test_device_other_than_cpu_cuda_mps_is_a_one_line_error(tmp_path, ct, pkg, capfd, device):
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct, str(src))
    rc = main(["segment", str(src), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(pkg), "--device", device])
    err = capfd.readouterr().err
    assert rc == 2 and f"--device {device}" in err and "cpu, cuda" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_inverted_roi_says_so(tmp_path, ct, pkg, capfd):
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct, str(src))
    rc = main(["segment", str(src), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(pkg), "--device", "cpu",
               "--roi", "20,20,4,2,2,1"])
    err = capfd.readouterr().err
    assert rc == 2 and "is empty" in err and "overlap" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_folder_with_one_image_and_a_file_output(tmp_path, ct, capsys):
    """A folder of images is a batch even when it holds one: the error says why -o must be a folder."""
    (tmp_path / "scans").mkdir()
    sitk.WriteImage(ct, str(tmp_path / "scans" / "a.nii.gz"))
    rc = main(["segment", str(tmp_path / "scans"), "-o", str(tmp_path / "a_seg.nii.gz"), "--model", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "or a folder of them" in err, err


def test_upper_case_metaimage_and_plain_nifti_named_gz_are_read(tmp_path, ct):
    """Suffixes are matched case-insensitively (CT.MHA, CT.MHD as some PACS exports name them), and a NIfTI named
    .nii.gz that is not gzipped (ITK reads it) is checked as what it is, not refused as a broken gzip stream."""
    sitk.WriteImage(ct, str(tmp_path / "a.mha"))
    (tmp_path / "a.mha").rename(tmp_path / "CT.MHA")
    sitk.WriteImage(ct, str(tmp_path / "b.mhd"))
    (tmp_path / "b.mhd").rename(tmp_path / "CT2.MHD")  # its ElementDataFile b.raw stays as named
    sitk.WriteImage(ct, str(tmp_path / "plain.nii"))
    (tmp_path / "plain.nii").rename(tmp_path / "plain.nii.gz")
    for name in ("CT.MHA", "CT2.MHD", "plain.nii.gz"):
        image = read_image(tmp_path / name)
        assert image.GetSize() == ct.GetSize(), name
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(ct)), name
    data = (tmp_path / "plain.nii.gz").read_bytes()
    (tmp_path / "half.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated image file \\(the header announces"):
        read_image(tmp_path / "half.nii.gz")


def test_folder_with_several_dicom_series(tmp_path, ct):
    """A scout or dose report beside the CT is smaller: the CT is read. Two series of the same size (two kernels,
    two phases) are refused rather than one picked at random."""
    axial, uid = (1, 0, 0, 0, 1, 0), "1.2.826.0.1.3680043.2.1125.8."
    folder = write_series(ct, tmp_path / "study", axial, (0, 0, 5.0), uid=uid + "1", prefix="CT")
    write_series(ct[:, :, :2], folder, axial, (0, 0, 5.0), uid=uid + "2", prefix="SC")
    assert read_image(folder).GetSize() == ct.GetSize()
    write_series(ct, folder, axial, (0, 0, 5.0), uid=uid + "3", prefix="BONE")
    with pytest.raises(InputError, match=f"holds 3 DICOM series, 2 of them with 6 files each .*{uid}1.*{uid}3"):
        read_image(folder)


def test_batch_folder_skips_earlier_seg_nrrd_results(tmp_path, ct, pkg, capsys):
    """Rerunning a batch on a folder that holds its own .seg.nrrd results (and cohort.csv) segments the scans only."""
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(ct, str(scans / "a.nrrd"))
    for _ in range(2):
        rc = main(["segment", str(scans), "-o", str(scans), "--model", str(pkg), "--device", "cpu", "--output-format",
                   "seg.nrrd", "--overwrite"])
        assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in scans.iterdir()) == ["a.nrrd", "a.seg.nrrd", "cohort.csv"]


def test_repeated_fold_runs_once():
    from meddinov3.options import SegmentOptions

    assert SegmentOptions.from_argv(["--folds", "0, 0,1,0"]).folds == ("0", "1")


def test_failed_probabilities_write_keeps_both_previous_outputs(tmp_path, ct, pkg, monkeypatch):
    """--overwrite with --save-probabilities: if the probabilities cannot be written (a full disk, simulated by
    making numpy's writer fail, which is the one thing mocked here), the previous label map and probabilities stay
    as they were, and no temporary file is left."""
    import errno

    from meddinov3.engine import outputs
    from meddinov3.engine.pipeline import segment_file

    src, out, npz = tmp_path / "ct.nrrd", tmp_path / "seg.nii.gz", tmp_path / "p.npz"
    sitk.WriteImage(ct, str(src))
    segment_file(src, out, str(pkg), probabilities_path=npz, device="cpu")
    before = {p.name: p.read_bytes() for p in (out, npz)}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.np, "savez_compressed", full_disk)
    with pytest.raises(OSError, match="No space left"):
        segment_file(src, out, str(pkg), probabilities_path=npz, device="cpu", overwrite=True)
    assert {p.name: p.read_bytes() for p in (out, npz)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd", "p.npz", "seg.nii.gz"]
