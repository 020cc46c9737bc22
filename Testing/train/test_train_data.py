"""Dataset formats and the up-front checks: every bad case is refused with a message naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.data import DatasetError, check_dataset, load_dataset
from meddinov3.data.cache import SliceCache, build_cache

from ._datasets import phantom_dataset


@pytest.fixture()
def ds_folder(tmp_path):
    return phantom_dataset(tmp_path / "ds", n=2, shape=(6, 32, 32))


def test_nnunet_folder_reads_and_checks(ds_folder):
    ds = load_dataset(ds_folder)
    assert [c.name for c in ds.cases] == ["case0", "case1"] and ds.labels["liver"] == 1
    info = check_dataset(ds)
    assert info["case0"]["foreground_voxels"] > 0


def test_json_and_csv_lists(ds_folder, tmp_path):
    labels = json.loads((ds_folder / "dataset.json").read_text())["labels"]
    cases = [{"image": str(ds_folder / "imagesTr" / f"case{i}_0000.nii.gz"),
              "label": str(ds_folder / "labelsTr" / f"case{i}.nii.gz"), "name": f"c{i}"} for i in range(2)]
    jl = tmp_path / "list.json"
    jl.write_text(json.dumps({"labels": labels, "cases": cases}))
    ds = load_dataset(jl)
    assert [c.name for c in ds.cases] == ["c0", "c1"]
    csv = tmp_path / "list.csv"
    header = "# labels: " + ", ".join(f"{k}={v}" for k, v in labels.items())
    csv.write_text(header + "\nimage,label\n" + "".join(f"{c['image']},{c['label']}\n" for c in cases))
    ds = load_dataset(csv)
    assert [c.name for c in ds.cases] == ["case0", "case1"] and ds.labels == labels
    csv2 = tmp_path / "list2.csv"
    csv2.write_text("image,label,name\n" + "".join(f"{c['image']},{c['label']},{c['name']}\n" for c in cases))
    (tmp_path / "list2.csv.labels.json").write_text(json.dumps(labels))
    assert load_dataset(csv2).labels == labels
    csv3 = tmp_path / "nolabels.csv"
    csv3.write_text("image,label\n")
    with pytest.raises(DatasetError, match="label names"):
        load_dataset(csv3)


def test_missing_label_file(ds_folder):
    (ds_folder / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case 'case1'.*label file .* is missing"):
        check_dataset(load_dataset(ds_folder))


def test_geometry_mismatch(ds_folder):
    path = ds_folder / "labelsTr" / "case0.nii.gz"
    lab = sitk.ReadImage(str(path))
    lab.SetSpacing((9.0, 9.0, 9.0))
    sitk.WriteImage(lab, str(path))
    with pytest.raises(DatasetError, match=r"case 'case0'.*geometry does not match"):
        check_dataset(load_dataset(ds_folder))


def test_undeclared_label_value(ds_folder):
    path = ds_folder / "labelsTr" / "case1.nii.gz"
    lab = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 9
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    sitk.WriteImage(out, str(path))
    with pytest.raises(DatasetError, match=r"case 'case1'.*label value\(s\) \[9\]"):
        check_dataset(load_dataset(ds_folder))


def test_unreadable_image(ds_folder):
    (ds_folder / "imagesTr" / "case0_0000.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DatasetError, match=r"case 'case0'.*unreadable"):
        check_dataset(load_dataset(ds_folder))


def test_bad_labels_declaration(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"liver": 1}}))
    with pytest.raises(DatasetError, match="background"):
        load_dataset(tmp_path)


def test_cache_is_built_once_and_matches_spacing(ds_folder, tmp_path):
    ds = load_dataset(ds_folder)
    folder = build_cache(ds, tmp_path / "cache")
    cache = SliceCache(folder)
    # median in-plane spacing of 3.0 and 3.2 mm; CT normalisation from the foreground
    assert cache.spacing == pytest.approx((3.1, 3.1))
    assert cache.normalization["scheme"] == "ct" and cache.normalization["lower"] < cache.normalization["upper"]
    assert isinstance(cache.cases[0].image, np.memmap)
    mtime = (folder / "index.json").stat().st_mtime_ns
    assert build_cache(ds, tmp_path / "cache") == folder
    assert (folder / "index.json").stat().st_mtime_ns == mtime
    assert set(np.unique(cache.cases[0].label)) <= set(ds.labels.values())


def test_label_direction_mismatch_names_the_direction(ds_folder):
    path = ds_folder / "labelsTr" / "case0.nii.gz"
    lab = sitk.ReadImage(str(path))
    lab.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(lab, str(path))
    with pytest.raises(DatasetError, match=r"case 'case0'.*geometry does not match") as e:
        check_dataset(load_dataset(ds_folder))
    message = str(e.value)
    assert "direction: image (1.0, 0.0, 0.0," in message and "label (0.0, 1.0, 0.0," in message
    assert "size" not in message and "origin" not in message  # only what differs


def test_csv_row_without_a_label_names_the_row(ds_folder, tmp_path):
    image = ds_folder / "imagesTr" / "case0_0000.nii.gz"
    csv = tmp_path / "list.csv"
    csv.write_text(f"# labels: background=0, liver=1\nimage,label,name\n{image},{image},ok\n{image}\n")
    with pytest.raises(DatasetError, match=r"list.csv: row 2 after the header needs both an image and a label"):
        load_dataset(csv)


def test_empty_case_list_says_the_dataset_has_no_cases(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "cases": []}))
    with pytest.raises(DatasetError, match=r"list.json: the dataset has no cases"):
        load_dataset(path)


def test_dataset_paths_are_absolute(ds_folder, monkeypatch):
    monkeypatch.chdir(ds_folder.parent)
    ds = load_dataset(ds_folder.name)
    assert ds.source == str(ds_folder)
    assert all(c.image.is_absolute() and c.label.is_absolute() for c in ds.cases)
    assert all(Path(c["image"]).is_absolute() for c in ds.summary()["cases"])
