"""`meddinov3 segment` end to end: real liver CT, .seg.nrrd, probabilities, batch folders, DICOM, bad inputs."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.cli.main import main
from meddinov3.phantom import load_liver_ct, make_phantom_ct
from meddinov3.volumes import same_geometry
from Testing.helpers import make_package, write_dicom_series

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("model") / "pkg", spacing=(2.0, 2.0), seed=5)


def run_cli(*args):
    exe = Path(sys.executable).parent / "meddinov3"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "meddinov3.cli"]
    return subprocess.run(cmd + ["segment", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_liver_ct_end_to_end(tmp_path, pkg):
    import slicerio

    image, _ = load_liver_ct()
    # store it with another axis order to exercise reorientation through the files too
    src = tmp_path / "liver.nrrd"
    sitk.WriteImage(sitk.PermuteAxes(image, [2, 0, 1]), str(src))
    out, npz = tmp_path / "liver.seg.nrrd", tmp_path / "probs.npz"
    r = run_cli(src, "-o", out, "--model", pkg, "--fast", "--save-probabilities", npz, "--json-progress",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "started" and "progress" in names and "finished" in names
    fin = next(e for e in events if e["event"] == "finished")
    assert fin["output"] == str(out)
    prog = [e for e in events if e["event"] == "progress" and e["stage"] == "segmenting"]
    assert prog[-1]["done"] == prog[-1]["total"] == 128 and "eta_s" in prog[-1]

    ref = sitk.ReadImage(str(src))
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["liver", "tumour"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2]
    np.testing.assert_allclose(seg["segments"][0]["color"], np.array([221, 130, 101]) / 255, atol=1e-3)
    assert seg["segments"][0]["terminology"]["type"][1] == "10200004"
    labels = sitk.ReadImage(str(out))
    assert same_geometry(labels, ref)

    data = np.load(npz)
    p = data["probabilities"]
    assert p.dtype == np.float16 and p.shape == (3,) + sitk.GetArrayViewFromImage(ref).shape
    assert list(data["labels"]) == ["background", "liver", "tumour"] and list(data["values"]) == [0, 1, 2]
    np.testing.assert_allclose(p.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert (p.argmax(0) == sitk.GetArrayFromImage(labels)).mean() > 0.999

    again = run_cli(src, "-o", out, "--model", pkg, "--device", "cpu")
    assert again.returncode != 0 and "already exists" in again.stderr and str(out) in again.stderr


def test_batch_folder_and_dicom(tmp_path, pkg, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    a, _ = make_phantom_ct((6, 40, 40), (3.0, 3.0, 5.0), seed=1)
    b, _ = make_phantom_ct((5, 32, 48), (2.0, 2.5, 4.0), seed=2)
    sitk.WriteImage(a, str(inp / "a.nii.gz"))
    sitk.WriteImage(b, str(inp / "b.mha"))
    write_dicom_series(a, inp / "series1")
    out = tmp_path / "out"
    assert main(["segment", str(inp), "-o", str(out), "--model", str(pkg), "--device", "cpu",
                 "--keep-largest", "--fill-holes"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "cohort.csv", "series1.nii.gz"]
    assert same_geometry(sitk.ReadImage(str(out / "b.nii.gz")), b)
    dicom_seg = sitk.ReadImage(str(out / "series1.nii.gz"))
    assert same_geometry(dicom_seg, a)
    # batch .seg.nrrd and one probabilities file per input, each on its input's grid
    import slicerio

    segs, probs = tmp_path / "segs", tmp_path / "probs"
    assert main(["segment", str(inp / "a.nii.gz"), str(inp / "b.mha"), "-o", str(segs), "--model", str(pkg),
                 "--device", "cpu", "--output-format", "seg.nrrd", "--save-probabilities", str(probs)]) == 0
    assert sorted(p.name for p in segs.iterdir()) == ["a.seg.nrrd", "b.seg.nrrd", "cohort.csv"]
    assert [s["name"] for s in slicerio.read_segmentation(str(segs / "b.seg.nrrd"))["segments"]]
    assert sorted(p.name for p in probs.iterdir()) == ["a.npz", "b.npz"]
    assert np.load(probs / "b.npz")["probabilities"].shape[1:] == sitk.GetArrayViewFromImage(b).shape
    before = {p.name: p.stat().st_mtime_ns for p in segs.glob("*.seg.nrrd")}
    capsys.readouterr()
    assert main(["segment", str(inp / "a.nii.gz"), str(inp / "b.mha"), "-o", str(segs), "--model", str(pkg),
                 "--device", "cpu", "--output-format", "seg.nrrd"]) == 0  # a cohort skips what is done
    assert "0 segmented, 2 skipped" in capsys.readouterr().err
    assert {n: (segs / n).stat().st_mtime_ns for n in before} == before  # existing outputs are never replaced
    # a DICOM folder alone is one input
    single = tmp_path / "single.nrrd"
    assert main(["segment", str(inp / "series1"), "-o", str(single), "--model", str(pkg), "--device", "cpu",
                 "--keep-largest", "--fill-holes"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(single))), sitk.GetArrayFromImage(dicom_seg))


def _bad_inputs(tmp: Path) -> dict:
    import pydicom.data

    good, _ = make_phantom_ct((6, 24, 24), (3.0, 3.0, 5.0))
    cases = {"2D": (Path(pydicom.data.get_testdata_file("CT_small.dcm")), "2D image")}
    vec = sitk.Compose(good, good)
    sitk.WriteImage(vec, str(tmp / "vector.nrrd"))
    cases["vector"] = (tmp / "vector.nrrd", "components")
    four = sitk.JoinSeries([good, good])
    sitk.WriteImage(four, str(tmp / "four.nii.gz"))
    cases["4D"] = (tmp / "four.nii.gz", "4D image")
    arr = sitk.GetArrayFromImage(good).astype(np.float32)
    arr[2, 3, 4] = np.nan
    nan = sitk.GetImageFromArray(arr)
    nan.CopyInformation(good)
    sitk.WriteImage(nan, str(tmp / "nan.mha"))
    cases["nan"] = (tmp / "nan.mha", "NaN")
    norm = sitk.GetImageFromArray(np.linspace(0, 1, arr.size).reshape(arr.shape).astype(np.float32))
    norm.CopyInformation(good)
    sitk.WriteImage(norm, str(tmp / "normalised.nii.gz"))
    cases["not HU"] = (tmp / "normalised.nii.gz", "Hounsfield")
    sitk.WriteImage(good, str(tmp / "whole.nii.gz"))
    data = (tmp / "whole.nii.gz").read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp / "truncated.nii.gz", "unreadable")
    (tmp / "garbage.nrrd").write_bytes(b"this is not an image\n" * 10)
    cases["garbage"] = (tmp / "garbage.nrrd", "unreadable")
    (tmp / "zero.raw").write_bytes(np.zeros(6 * 24 * 24, np.int16).tobytes())
    for name, spacing, problem in (("zero", "0 3 5", "spacing"), ("huge", "3 3 80", "spacing"),
                                   ("in metres", "0.001 0.001 0.005", "spacing (0.001, 0.001, 0.005)")):
        mhd = tmp / f"{name.replace(' ', '_')}.mhd"
        mhd.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = 24 24 6\nElementSpacing = {spacing}\n"
                       "ElementType = MET_SHORT\nElementDataFile = zero.raw\n")
        cases[f"spacing {name}"] = (mhd, problem)
    big_fov = make_phantom_ct((6, 48, 48), (45.0, 45.0, 5.0))[0]
    sitk.WriteImage(big_fov, str(tmp / "fov.nii.gz"))
    cases["field of view"] = (tmp / "fov.nii.gz", "field of view 2160 x 2160 x 30 mm")
    for suffix in (".nii", ".nii.gz"):  # ITK's NIfTI reader turns NaN/inf into 0: read from the file itself
        nan_nii = tmp / f"nan{suffix}"
        sitk.WriteImage(nan, str(nan_nii))
        cases[f"NaN {suffix}"] = (nan_nii, "contains 1 NaN")
    arr[0, 0, :3] = [np.inf, -np.inf, np.nan]
    inf = sitk.GetImageFromArray(arr.astype(np.float64))
    inf.CopyInformation(good)
    sitk.WriteImage(inf, str(tmp / "inf.nii"))
    cases["inf float64 .nii"] = (tmp / "inf.nii", "contains 4 NaN or infinite")
    sitk.WriteImage(good, str(tmp / "whole.nii"))
    data = (tmp / "whole.nii").read_bytes()
    (tmp / "half.nii").write_bytes(data[: len(data) // 2])
    cases["truncated .nii"] = (tmp / "half.nii", f"truncated image file (the header announces {6 * 24 * 24 * 2} bytes")
    (tmp / "header_only.nii").write_bytes(data[:352])
    cases["header-only .nii"] = (tmp / "header_only.nii", "truncated")
    sitk.WriteImage(good, str(tmp / "whole.mha"))
    data = (tmp / "whole.mha").read_bytes()
    (tmp / "half.mha").write_bytes(data[: len(data) - 100])
    cases["truncated .mha"] = (tmp / "half.mha", f"the file holds {6 * 24 * 24 * 2 - 100}")
    sitk.WriteImage(good, str(tmp / "packed.mha"), useCompression=True)
    data = (tmp / "packed.mha").read_bytes()
    (tmp / "half_packed.mha").write_bytes(data[: len(data) - 100])
    cases["truncated compressed .mha"] = (tmp / "half_packed.mha", "bytes of compressed voxel data")
    gap = write_dicom_series(good, tmp / "dicom_gap")
    (gap / "slice_003.dcm").unlink()
    cases["DICOM missing slice"] = (gap, "unevenly spaced: 10 mm between slices 3 and 4")
    (tmp / "big.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 20000 20000 4000\n"
                                 "ElementSpacing = 0.05 0.05 0.05\nElementType = MET_SHORT\nElementDataFile = big.raw\n")
    (tmp / "big.raw").write_bytes(b"\0" * 16)
    cases["too large"] = (tmp / "big.mhd", "memory")
    (tmp / "empty.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 0 24 6\nElementSpacing = 1 1 1\n"
                                   "ElementType = MET_SHORT\nElementDataFile = empty.raw\n")
    (tmp / "empty.raw").write_bytes(b"")
    cases["empty"] = (tmp / "empty.mhd", "")
    cases["missing"] = (tmp / "nope.nii.gz", "no such file")
    return cases


def _nifti_bytes(version: int, order: str, data: np.ndarray, slope: float = 0.0) -> bytes:
    """A minimal single-file NIfTI-1/NIfTI-2 image (only the fields that locate and decode the voxels)."""
    import struct

    codes = {np.dtype("f4"): 16, np.dtype("f8"): 64, np.dtype("i2"): 4}
    code, bitpix = codes[data.dtype.newbyteorder("=")], data.dtype.itemsize * 8
    dim = [data.ndim, *data.shape[::-1]] + [1] * (7 - data.ndim)
    if version == 1:
        head = bytearray(352)
        struct.pack_into(order + "i", head, 0, 348)
        struct.pack_into(order + "8h", head, 40, *dim)
        struct.pack_into(order + "2h", head, 70, code, bitpix)
        struct.pack_into(order + "3f", head, 108, 352.0, slope, 0.0)
        head[344:348] = b"n+1\0"
    else:
        head = bytearray(544)
        struct.pack_into(order + "i", head, 0, 540)
        head[4:12] = b"n+2\0\r\n\x1a\n"
        struct.pack_into(order + "2h", head, 12, code, bitpix)
        struct.pack_into(order + "8q", head, 16, *dim)
        struct.pack_into(order + "q2d", head, 168, 544, slope, 0.0)
    return bytes(head) + data.astype(data.dtype.newbyteorder(order)).tobytes()


@pytest.mark.parametrize("version,order", [(1, "<"), (1, ">"), (2, "<"), (2, ">")])
def test_nifti_data_check_reads_both_versions_and_byte_orders(tmp_path, version, order):
    from meddinov3.volumes import InputError, check_nifti_data

    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3], data[3, 4, 5] = np.nan, -np.inf
    bad = tmp_path / "bad.nii"
    bad.write_bytes(_nifti_bytes(version, order, data))
    with pytest.raises(InputError, match="contains 2 NaN or infinite"):
        check_nifti_data(bad, chunk_bytes=16)  # tiny chunks: the count adds up across them
    good = tmp_path / "good.nii.gz"
    good.write_bytes(gzip.compress(_nifti_bytes(version, order, np.nan_to_num(data, neginf=0).astype(np.float64))))
    check_nifti_data(good, chunk_bytes=16)
    scaled = tmp_path / "scaled.nii"  # integer voxels times an infinite scl_slope: every voxel is infinite
    scaled.write_bytes(_nifti_bytes(version, order, np.ones((4, 5, 6), np.int16), slope=np.inf))
    with pytest.raises(InputError, match="contains 120 NaN"):
        check_nifti_data(scaled)
    (tmp_path / "half.nii").write_bytes(_nifti_bytes(version, order, data)[:-10])
    with pytest.raises(InputError, match=f"announces {data.nbytes} bytes of voxel data, the file holds "
                                         f"{data.nbytes - 10}"):
        check_nifti_data(tmp_path / "half.nii")


def test_bad_inputs_fail_cleanly(tmp_path, pkg, capfd):
    """capfd: also what ITK itself prints on the process's stderr."""
    src = tmp_path / "src"
    src.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, (path, words) in _bad_inputs(src).items():
        out = out_dir / "seg.nii.gz"
        rc = main(["segment", str(path), "-o", str(out), "--model", str(pkg), "--device", "cpu"])
        err = capfd.readouterr().err
        assert rc != 0, name
        assert str(path) in err and words in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert list(out_dir.iterdir()) == [], name


def test_unknown_model_and_bad_options(tmp_path, capsys):
    image, _ = make_phantom_ct((6, 24, 24), (3.0, 3.0, 5.0))
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(src))
    rc = main(["segment", str(src), "-o", str(tmp_path / "o.nii.gz"), "--model", "no-such-model-xyz",
               "--json-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "no-such-model-xyz" in captured.err and "unknown model" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["event"] == "failed"
    rc = main(["segment", str(src), "-o", str(tmp_path / "o.txt"), "--model", "x"])
    assert rc == 2 and "unsupported output" in capsys.readouterr().err
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())


def test_output_paths_are_checked_before_the_model_is_even_loaded(tmp_path, capsys):
    """Every case names the user's path and the reason in one line; `--model` does not exist, so reaching the
    model (let alone inference) would give another error."""
    image, _ = make_phantom_ct((6, 24, 24), (3.0, 3.0, 5.0))
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(src))
    ct_bytes = src.read_bytes()
    (tmp_path / "b.nrrd").write_bytes(b"")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        ([src, "-o", "/proc/seg.nii.gz"], "/proc/seg.nii.gz: cannot create a file in /proc ("),
        ([src, "-o", tmp_path / "o.nii.gz", "--save-probabilities", "/proc/p.npz"],
         "/proc/p.npz: cannot create a file in /proc"),
        ([src, "-o", tmp_path / "a_file" / "seg.nii.gz"], "a_file is a file, not a folder"),
        ([src, "-o", src, "--overwrite"], f"{src}: is the input {src} itself"),
        ([tmp_path, "-o", tmp_path, "--overwrite"], f"{src}: is the input {src} itself"),  # batch into its own folder
        ([src, tmp_path / "b.nrrd", "-o", tmp_path / "multi.nii.gz"],
         "multi.nii.gz: several inputs, or a folder of them, need -o to be a folder, not a file name"),
        ([src, "-o", tmp_path / "folder"], "folder: is a folder; a folder -o needs several inputs"),
    ]
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        cases.append(([src, "-o", tmp_path / "ro" / "seg.nii.gz"], "ro/seg.nii.gz: cannot create a file in"))
    for args, message in cases:
        rc = main(["segment", *map(str, args), "--model", "no-such-model-xyz", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert src.read_bytes() == ct_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "b.nrrd", "ct.nii.gz", "folder"]


def test_closed_pipe_is_not_a_traceback():
    """`meddinov3 models list --json | head -1`: the reader goes away before the output is written."""
    exe = Path(sys.executable).parent / "meddinov3"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "meddinov3.cli"]
    p = subprocess.Popen(cmd + ["models", "list", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1 and err == ""


def test_upper_case_suffix_and_negative_roi(tmp_path, pkg):
    image, _ = make_phantom_ct((6, 24, 24), (3.0, 3.0, 5.0))
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(src))
    out = tmp_path / "UP.NII.GZ"
    assert main(["segment", str(src), "-o", str(out), "--model", str(pkg), "--device", "cpu",
                 "--roi", "-5,-5,-5,500,500,500"]) == 0
    assert same_geometry(sitk.ReadImage(str(out)), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UP.NII.GZ", "ct.nii.gz"]


def test_demo_model_segments_reoriented_liver_ct(tmp_path):
    """The trained demo package (Resources/demo-liver-ct) finds the liver in a permuted, flipped copy of the CT."""
    from meddinov3.resources import resources_dir
    from meddinov3.volumes import reoriented

    demo = resources_dir() / "demo-liver-ct"
    assert (demo / "model.json").is_file(), f"{demo}: the committed demo model package is missing"
    image, labels = load_liver_ct()
    src = tmp_path / "liver_lps_permuted.nii.gz"
    sitk.WriteImage(reoriented(image, (2, 0, 1), (True, False, True)), str(src))
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(src), "-o", str(out), "--model", str(demo), "--device", "cpu"]) == 0
    seg = sitk.Resample(sitk.ReadImage(str(out)), labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    pred, ref = sitk.GetArrayFromImage(seg) == 1, sitk.GetArrayFromImage(labels) == 1
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert dice > 0.8, dice


@pytest.mark.parametrize("module", ["meddinov3.cli", "meddinov3.cli.main"])
def test_module_entry_points_report_a_verbs_error(tmp_path, module):
    """`python -m meddinov3.cli` (the Slicer modules) and `python -m meddinov3.cli.main` (torchrun's `-m`, issue 20's
    cohort command): a verb's CommandError is its one-line error and exit code 2, not a traceback. main.py run as
    `__main__` is a second copy of that module: the verbs' CommandError must still be the class it catches."""
    existing = tmp_path / "summary.json"
    existing.write_text("{}")
    command = ["evaluate", str(tmp_path), str(tmp_path), "-o", str(existing)]
    r = subprocess.run([sys.executable, "-m", module, *command], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"meddinov3 evaluate: error: {existing}: output already exists (pass --overwrite to replace it)"], r.stderr
    assert existing.read_text() == "{}"
