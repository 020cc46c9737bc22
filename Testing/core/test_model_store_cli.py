"""`meddinov3 models|convert|info` on real upstream layouts: bad inputs are refused in one line, nothing is left
behind, a user's files are never replaced."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meddinov3.checkpoints import CheckpointError, convert, describe, import_file, read_model

from .upstream_layouts import write_meta_dinov3, write_nnunet_folder, write_official_pretrained

REPO = Path(__file__).resolve().parents[2]


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "meddinov3.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_import_refuses_junk_even_when_named_like_the_official_file(tmp_path):
    store = Path(os.environ["MEDDINOV3_HOME"])
    for name in ("junk.pth", "model.pth"):  # model.pth would become the official backbone's offline copy
        junk = tmp_path / name
        junk.write_bytes(b"not a checkpoint" * 20)
        with pytest.raises(CheckpointError, match=f"{name}: not a readable PyTorch checkpoint"):
            import_file(junk)
    (tmp_path / "volumes").mkdir()
    with pytest.raises(CheckpointError, match="neither a model package"):
        import_file(tmp_path / "volumes")
    assert not list((store / "models").glob("*")) if (store / "models").exists() else True
    assert not (store / "imports").exists()


def test_import_names_stay_inside_the_store_and_do_not_hide_manifest_models(tmp_path):
    store = Path(os.environ["MEDDINOV3_HOME"])
    meta = tmp_path / "dinov3_vits16.pth"
    write_meta_dinov3(meta)
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(CheckpointError, match="not usable as a model name"):
            import_file(meta, name=bad)
    with pytest.raises(CheckpointError, match="demo-liver-ct: the name of a model of the manifest"):
        import_file(meta, name="demo-liver-ct")
    assert not (store.parent / "escape").exists() and not (store / "models").exists()
    assert import_file(meta).name == "dinov3_vits16.pth"  # a good file under its own name still imports


def test_download_honours_offline_mode_without_touching_the_network(tmp_path):
    r = _cli(["models", "download", "meddinov3-vitb16-ct3m"],
             env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
                  "HF_ENDPOINT": "http://192.0.2.1:9"})  # a probe would hang on this address
    assert r.returncode == 2
    assert "offline mode is on" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_convert_overwrite_never_replaces_a_file_or_a_users_folder(tmp_path):
    pth = tmp_path / "model.pth"
    write_official_pretrained(pth)
    user_file = tmp_path / "notes"
    user_file.write_text("precious")
    user_dir = tmp_path / "results"
    user_dir.mkdir()
    (user_dir / "table.csv").write_text("a,b")
    for target in (user_file, user_dir):
        with pytest.raises(FileExistsError, match="not a model package"):
            convert(pth, target, overwrite=True)
    assert user_file.read_text() == "precious" and (user_dir / "table.csv").read_text() == "a,b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "notes", "results"]  # no .old-* left
    pkg = convert(pth, tmp_path / "pkg")
    assert convert(pth, pkg, overwrite=True) == pkg  # a package is replaced with --overwrite


def test_nnunet_folder_of_another_trainer_is_named(tmp_path):
    from .upstream_layouts import dataset_json, nnunet_checkpoint, plans_json

    folder = tmp_path / "Dataset117_Liver" / "nnUNetTrainer__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans_json()))
    (folder / "dataset.json").write_text(json.dumps(dataset_json()))
    ckpt = nnunet_checkpoint({}, {}, "nnUNetTrainer", plans_json(), 0)
    ckpt["network_weights"] = {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(32, 1, 3, 3),
                               "decoder.seg_layers.0.weight": torch.zeros(3, 32, 1, 1)}
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(CheckpointError, match="trainer nnUNetTrainer is not a MedDINOv3 / DINOv3 Primus trainer"):
        describe(folder)


def test_nnunet_folds_of_different_trainers_are_refused(tmp_path):
    folder, _ = write_nnunet_folder(tmp_path)
    path = folder / "fold_1" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["trainer_name"] = "dinov3_base_primus_multiscale_Trainer"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="fold 1 was trained with dinov3_base_primus_multiscale_Trainer"):
        read_model(folder)


@pytest.mark.parametrize("missing", ["plans.json", "dataset.json"])
def test_nnunet_folder_missing_json_names_it(tmp_path, missing):
    folder, _ = write_nnunet_folder(tmp_path, folds=(0,))
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=f"nnU-Net result folder without {missing}"):
        describe(folder)


def test_info_on_a_run_folder_points_to_its_package(tmp_path):
    pth = tmp_path / "model.pth"
    write_official_pretrained(pth)
    run = tmp_path / "run"
    run.mkdir()
    convert(pth, run / "backbone")
    with pytest.raises(CheckpointError, match="run folder; its model package is .*backbone"):
        describe(run)


def _manifest_with_checksum(tmp_path, monkeypatch) -> str:
    res = tmp_path / "Resources"
    res.mkdir()
    entry = {"name": "published", "kind": "backbone", "ref": "hf:org/repo/model.pth", "sha256": "ab" * 32}
    (res / "models.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("MEDDINOV3_RESOURCES", str(res))
    return entry["ref"]


def _hf_cache_file(cache: Path, payload: Path) -> Path:
    """huggingface_hub's cache layout: blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = cache / "models--org--repo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    blob = repo / "blobs" / "feedface"
    blob.write_bytes(payload.read_bytes())
    (repo / "refs" / "main").write_text(commit)
    link = repo / "snapshots" / commit / "model.pth"
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def test_download_with_wrong_sha256_is_refused_and_not_kept(tmp_path, monkeypatch):
    import huggingface_hub

    from meddinov3.checkpoints import hub

    ref = _manifest_with_checksum(tmp_path, monkeypatch)
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    payload = tmp_path / "payload.pth"
    write_official_pretrained(payload)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    real_download = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(_hf_cache_file(cache, payload)))
    with pytest.raises(CheckpointError, match="sha256 does not match the manifest entry .* it was deleted"):
        hub.resolve_hf(ref, offline=False)
    left = [p.name for p in cache.rglob("*") if p.is_file() or p.is_symlink()]
    assert left == ["main"]  # neither the snapshot link nor the blob is left
    # a file that was already in the cache is the user's to delete: refused, kept, and the message says so
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", real_download)
    _hf_cache_file(cache, payload)
    with pytest.raises(CheckpointError, match="Delete it and download again"):
        hub.resolve_hf(ref, offline=True)
    assert (cache / "models--org--repo" / "blobs" / "feedface").is_file()
