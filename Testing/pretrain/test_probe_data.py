"""The dense probe's data: a labelled dataset the user names (`pretrain --probe-data`), the liver CT by default.

Slices are chosen alike from any `train --data` layout (canonical orientation, every class foreground, fit and score
on different cases), the run records which data it probed on, and an unusable dataset is a one-line error naming it
before the slice index is built.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddinov3.pretrain.data import PretrainDataError
from meddinov3.pretrain.probe import LIVER, DenseProbe, probe_slices, select_slices
from Testing.train._datasets import phantom_dataset, run_cli

TINY = {"size": "tiny", "model": {"depth": 1, "patch_size": 8},
        "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, "global_size": 32, "local_size": 16,
        "n_local": 2, "batch_size": 4, "steps": 2, "probe_every": 1, "probe_size": 32, "log_every": 1,
        "device": "cpu"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """An nnU-Net raw dataset of three phantom CTs (five labelled classes)."""
    return phantom_dataset(tmp_path_factory.mktemp("probe") / "Dataset001_Phantom", n=3)


def test_several_cases_fit_on_the_first_half_and_score_on_the_rest(phantoms):
    chosen = probe_slices(str(phantoms))
    assert chosen.info["source"] == str(phantoms) and chosen.info["cases"] == ["case0", "case1", "case2"]
    assert chosen.n_fit == chosen.info["fit_slices"] and len(chosen.images) == chosen.n_fit + chosen.info["eval_slices"]
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(phantoms / "labelsTr" / f"case{i}.nii.gz"))) for i in range(3)]
    # every chosen slice is one of its case's (fit: cases 0 and 1; score: case 2) with foreground > 1/10
    owner = [next(i for i, lab in enumerate(labels) if any(np.array_equal(s, z) for z in lab)) for s in chosen.labels]
    assert set(owner[:chosen.n_fit]) <= {0, 1} and set(owner[chosen.n_fit:]) == {2}
    assert all((s > 0).mean() >= 0.1 for s in chosen.labels)
    assert any(len(np.unique(s)) > 2 for s in chosen.labels)  # several classes, all foreground for the probe
    assert all(s.base is None for s in chosen.images + chosen.labels)  # copies: the volumes are not kept alive
    probe = DenseProbe.from_slices(chosen, size=32)
    assert probe.x.shape == (len(chosen.images), 1, 32, 32) and probe.info["size"] == 32


def test_a_case_in_another_orientation_gives_the_same_canonical_slices(phantoms, tmp_path):
    """The probe sees slices as the pretraining index does (canonical S, P, L), whatever the file's orientation."""
    flipped = tmp_path / "flipped.json"
    cases = []
    for i in range(3):
        image = sitk.ReadImage(str(phantoms / "imagesTr" / f"case{i}_0000.nii.gz"))
        label = sitk.ReadImage(str(phantoms / "labelsTr" / f"case{i}.nii.gz"))
        for name, im in (("image", image), ("label", label)):
            out = sitk.Flip(im, [True, True, False], flipAboutOrigin=False)  # same voxels in space, R-A index order
            sitk.WriteImage(out, str(tmp_path / f"case{i}_{name}.nii.gz"))
        cases.append({"image": f"case{i}_image.nii.gz", "label": f"case{i}_label.nii.gz", "name": f"case{i}"})
    labels = json.loads((phantoms / "dataset.json").read_text())["labels"]
    flipped.write_text(json.dumps({"labels": labels, "cases": cases}))
    assert sitk.ReadImage(str(tmp_path / "case0_image.nii.gz")).GetDirection()[0] == -1
    a, b = probe_slices(str(phantoms)), probe_slices(str(flipped))
    assert a.n_fit == b.n_fit and len(a.images) == len(b.images)
    for x, y in zip(a.images + a.labels, b.images + b.labels):
        np.testing.assert_array_equal(x, y)


def test_one_case_is_split_along_its_slices_with_a_gap():
    lab = np.zeros((30, 10, 10), np.uint8)
    lab[5:25, :, :5] = 1  # slices 5..24 half foreground
    img = np.where(lab > 0, 60.0, -1000.0).astype(np.float32) + np.arange(30, dtype=np.float32)[:, None, None]
    chosen = select_slices(iter([(img, lab)]), 1, n_fit=3, n_eval=3, gap=4)
    z = [int(s[0, 9] + 1000) for s in chosen.images]  # the slice index, read back from the image
    fit, ev = z[:chosen.n_fit], z[chosen.n_fit:]
    assert fit == [5, 8, 12] and ev == [17, 20, 24]  # fit below the middle, score above, 4 slices apart


def test_the_default_is_the_liver_ct_as_before():
    """The offline default chooses the same liver slices as the probe did before it took any dataset."""
    from meddinov3.phantom import load_liver_ct

    probe = DenseProbe.liver()
    assert probe.info["source"] == LIVER and probe.info["cases"] == ["liver117"]
    image, labels = load_liver_ct()
    img, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    z = np.flatnonzero((lab > 0).reshape(lab.shape[0], -1).mean(axis=1) >= 0.1)
    cut = len(z) // 2
    fit_z, eval_z = z[:cut - 2], z[cut + 2:]
    keep = np.concatenate([np.unique(fit_z[np.linspace(0, len(fit_z) - 1, 8).astype(int)]),
                           np.unique(eval_z[np.linspace(0, len(eval_z) - 1, 8).astype(int)])])
    before = DenseProbe(img[keep], lab[keep], probe.fit_idx, probe.eval_idx, size=128)
    assert len(probe.fit_idx) == 8 and len(probe.eval_idx) == 8
    assert torch.equal(probe.x, before.x) and torch.equal(probe.fg, before.fg)


@pytest.mark.parametrize("case", ["missing", "no dataset.json", "no foreground", "a case without its label"])
def test_unusable_probe_data_is_an_error_naming_it(case, phantoms, tmp_path):
    folder = tmp_path / "probe_set"
    if case == "no dataset.json":
        folder.mkdir()
    elif case == "no foreground":
        phantom_dataset(folder, n=2)
        for lab in (folder / "labelsTr").iterdir():
            im = sitk.ReadImage(str(lab))
            sitk.WriteImage(sitk.Cast(im * 0, im.GetPixelID()), str(lab))
    elif case == "a case without its label":
        phantom_dataset(folder, n=2)
        (folder / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(PretrainDataError) as e:
        probe_slices(str(folder))
    assert str(e.value).startswith(f"--probe-data {folder}: ") and "\n" not in str(e.value)


def test_the_run_records_its_probe_data(phantoms, tmp_path, monkeypatch):
    from meddinov3.pretrain.loop import PretrainConfig, pretrain

    monkeypatch.chdir(phantoms.parent)  # a relative --probe-data is recorded absolute (resume from elsewhere)
    out = tmp_path / "run"
    cfg = PretrainConfig.from_dict({**TINY, "data": str(phantoms / "imagesTr"), "out": str(out),
                                    "probe_data": phantoms.name, "cache_dir": str(tmp_path / "cache")})
    status = pretrain(cfg, json_progress=True, stream=io.StringIO())
    assert status["state"] == "finished"
    saved = json.loads((out / "config.json").read_text())
    assert saved["pretrain"]["probe_data"] == str(phantoms)
    assert saved["resolved"]["probe"]["source"] == str(phantoms)
    assert saved["resolved"]["probe"]["cases"] == ["case0", "case1", "case2"]
    probes = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [0, 1, 2] and all(r["data"] == str(phantoms) for r in probes)


def test_cli_refuses_unusable_probe_data_before_indexing(phantoms, tmp_path):
    out, bad = tmp_path / "run", tmp_path / "not_a_dataset"
    bad.mkdir()
    r = run_cli(["pretrain", "--data", str(phantoms / "imagesTr"), "--out", str(out), "--probe-data", str(bad),
                 "--size", "tiny", "--steps", "2", "--batch-size", "4", "--device", "cpu"], timeout=120,
                env_extra={"MEDDINOV3_HOME": str(tmp_path / "home")})
    assert r.returncode != 0
    assert f"--probe-data {bad}: {bad}: folder has no dataset.json" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (out / "slices" / "index.npy").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
