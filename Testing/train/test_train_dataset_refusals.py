"""Real-world dataset and option variants that must be refused with one clear message (or read correctly)."""

from __future__ import annotations

import json
import shutil

import pytest

from meddinov3.data import DatasetError, check_dataset, load_dataset
from meddinov3.train import TrainConfig, TrainError

from ._datasets import phantom_dataset


@pytest.fixture()
def ds_folder(tmp_path):
    return phantom_dataset(tmp_path / "ds", n=2, shape=(6, 32, 32))


def _pairs_csv(ds_folder, path, header="image,label", sep=","):
    rows = "".join(f"imagesTr/case{i}_0000.nii.gz{sep}labelsTr/case{i}.nii.gz\n" for i in range(2))
    return header + "\n" + rows


def test_csv_written_by_excel_with_a_byte_order_mark(ds_folder):
    path = ds_folder / "list.csv"
    labels = json.loads((ds_folder / "dataset.json").read_text())["labels"]
    path.write_text(_pairs_csv(ds_folder, path), encoding="utf-8-sig")
    (ds_folder / "list.csv.labels.json").write_text(json.dumps(labels))
    ds = load_dataset(path)
    assert [c.name for c in ds.cases] == ["case0", "case1"]


def test_tsv_list_is_split_on_tabs_and_header_spaces_are_ignored(ds_folder):
    labels = json.loads((ds_folder / "dataset.json").read_text())["labels"]
    (ds_folder / "labels.json").write_text(json.dumps(labels))
    tsv = ds_folder / "list.tsv"
    tsv.write_text(_pairs_csv(ds_folder, tsv, header="image\tlabel", sep="\t"))
    assert [c.image.name for c in load_dataset(tsv).cases] == ["case0_0000.nii.gz", "case1_0000.nii.gz"]
    csv = ds_folder / "spaced.csv"
    csv.write_text(_pairs_csv(ds_folder, csv, header="image, label", sep=", "))
    ds = load_dataset(csv)
    assert ds.cases[1].label == ds_folder / "labelsTr" / "case1.nii.gz"  # relative to the list's folder


def test_csv_sidecar_labels_that_are_not_an_object(ds_folder):
    csv = ds_folder / "list.csv"
    csv.write_text(_pairs_csv(ds_folder, csv))
    (ds_folder / "list.csv.labels.json").write_text(json.dumps(["background", "liver"]))
    with pytest.raises(DatasetError, match=r"list.csv.labels.json: expected the label names as an object"):
        load_dataset(csv)


def test_json_list_with_a_null_path_or_a_name_that_is_a_path(ds_folder):
    labels = json.loads((ds_folder / "dataset.json").read_text())["labels"]
    path = ds_folder / "list.json"
    path.write_text(json.dumps({"labels": labels, "cases": [{"image": None, "label": "labelsTr/case0.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"list.json: case #1: 'image' must be a file path"):
        load_dataset(path)
    path.write_text(json.dumps({"labels": labels, "cases": [
        {"image": "imagesTr/case0_0000.nii.gz", "label": "labelsTr/case0.nii.gz", "name": "a/b"}]}))
    with pytest.raises(DatasetError, match=r"list.json: case name 'a/b'"):
        load_dataset(path)


def test_nnunet_label_without_image_stray_channel_and_num_training(ds_folder):
    img = ds_folder / "imagesTr" / "case1_0000.nii.gz"
    shutil.copy(img, ds_folder / "imagesTr" / "case1_0001.nii.gz")
    with pytest.raises(DatasetError, match=r"case 'case1': .*case1_0001.nii.gz.*one channel"):
        load_dataset(ds_folder)
    (ds_folder / "imagesTr" / "case1_0001.nii.gz").unlink()
    img.unlink()
    with pytest.raises(DatasetError, match=r"case 'case1': label .*case1.nii.gz has no image .*case1_0000.nii.gz"):
        load_dataset(ds_folder)
    (ds_folder / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"dataset.json: numTraining is 2 but imagesTr holds 1 case"):
        load_dataset(ds_folder)


def test_no_foreground_anywhere_names_the_dataset(ds_folder):
    import SimpleITK as sitk
    from meddinov3.data.cache import build_cache

    for p in (ds_folder / "labelsTr").glob("*.nii.gz"):
        lab = sitk.ReadImage(str(p))
        sitk.WriteImage(lab * 0, str(p))
    ds = load_dataset(ds_folder)
    check_dataset(ds)
    with pytest.raises(DatasetError, match=rf"{ds_folder}: no foreground voxels"):
        build_cache(ds, ds_folder.parent / "cache")


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps"), ({"steps": -1}, "steps"), ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
    ({"steps": "two"}, "steps"), ({"val_fraction": 1.0}, "val_fraction"), ({"val_fraction": 1.5}, "val_fraction"),
    ({"val_fraction": -0.5}, "val_fraction"), ({"val_cases": "case0"}, "val_cases"),
])
def test_impossible_step_batch_and_validation_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({**TrainConfig().to_dict(), **options})


def test_unknown_device_is_a_train_error(ds_folder, tmp_path):
    from meddinov3.train import train

    cfg = TrainConfig(data=str(ds_folder), out=str(tmp_path / "run"), size="tiny", steps=1, device="cuda:77")
    with pytest.raises(TrainError, match="--device cuda:77"):
        train(cfg)
    cfg = TrainConfig(data=str(ds_folder), out=str(tmp_path / "run"), size="tiny", steps=1, device="gpu")
    with pytest.raises(TrainError, match="--device gpu"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_unknown_device_is_a_pretrain_error(ds_folder, tmp_path):
    """`pretrain` shares the device check (distributed.init -> engine.resolve_device)."""
    from meddinov3.pretrain.loop import PretrainConfig, PretrainError, pretrain

    for device in ("cuda:77", "gpu"):
        cfg = PretrainConfig(data=str(ds_folder / "imagesTr"), out=str(tmp_path / "run"), size="tiny", steps=1,
                             device=device)
        with pytest.raises(PretrainError, match=f"--device {device}"):
            pretrain(cfg)
    assert not (tmp_path / "run").exists()


def test_dataset_json_names_its_folder(ds_folder):
    ds = load_dataset(ds_folder / "dataset.json")
    assert ds.format == "nnunet" and ds.source == str(ds_folder) and len(ds.cases) == 2


def test_a_declared_class_absent_from_every_training_case_is_warned(ds_folder, tmp_path, caplog):
    import logging

    from meddinov3.train import train

    meta = json.loads((ds_folder / "dataset.json").read_text())
    meta["labels"]["pancreas"] = len(meta["labels"])
    (ds_folder / "dataset.json").write_text(json.dumps(meta))
    info = check_dataset(load_dataset(ds_folder))
    assert meta["labels"]["pancreas"] not in info["case0"]["values"] and 1 in info["case0"]["values"]
    cfg = TrainConfig(data=str(ds_folder), out=str(tmp_path / "run"), size="tiny", model={"depth": 1}, steps=1,
                      batch_size=1, val_fraction=0, patch_size=[32, 32], device="cpu",
                      cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="meddinov3"):  # the command line prints it as
        train(cfg)  # "[meddinov3 train] WARNING: label(s) ..." (Testing/core/test_logging.py)
    assert ("meddinov3.train.loop", logging.WARNING, "label(s) 'pancreas' (6) have no voxels in any training case") \
        in caplog.record_tuples


def test_unknown_validation_case_lists_the_cases(ds_folder):
    from meddinov3.train import split_cases

    ds = load_dataset(ds_folder)
    with pytest.raises(TrainError, match=r"\['nope'\] are not in the dataset \(cases: case0, case1\)$"):
        split_cases(ds, TrainConfig(val_cases=["nope"]))
