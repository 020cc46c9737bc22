"""Every checkpoint layout, generated with the upstream key names, loads and computes the same network."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meddinov3.checkpoints import (CheckpointError, ClassInfo, ModelNotAvailable, ModelSpec, UnknownModel, convert,
                                   describe, import_file, load_backbone, load_model, read_model, resolve,
                                   safe_torch_load, write_package)
from meddinov3.config import model_config
from meddinov3.model import build_model

from .reference_dinov3 import reference_backbone, reference_forward
from .upstream_layouts import write_meta_dinov3, write_nnunet_folder, write_official_pretrained

pytestmark = pytest.mark.slicer_python  # loading on Slicer 5.8: numpy 1.26 scalars of nnU-Net files

X = torch.randn(2, 1, 64, 48, generator=torch.Generator().manual_seed(11))


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("trainer,multiscale,qkv_bias,n_reg", [
    ("meddinov3_base_primus_multiscale_Trainer", True, False, 4),
    ("dinov3_base_primus_multiscale_Trainer", True, True, 0),
    ("dinov3_base_primus_Trainer", False, True, 0),
])
def test_nnunet_folder_loads_every_fold_and_matches_reference(tmp_path, trainer, multiscale, qkv_bias, n_reg):
    folder, weights = write_nnunet_folder(tmp_path, trainer=trainer, multiscale=multiscale, qkv_bias=qkv_bias,
                                          n_reg=n_reg)
    model = load_model(folder)
    spec = model.spec
    assert model.format == "nnunet" and spec.folds == ["0", "1"] and len(model.networks) == 2
    assert [(c.value, c.name) for c in spec.classes] == [(0, "background"), (1, "liver"), (2, "tumour")]
    assert spec.spacing == (0.8, 0.8) and spec.patch_size == (64, 64)
    assert spec.normalization == {"scheme": "ct", "mean": 99.4, "std": 36.5, "lower": -17.0, "upper": 198.0}
    assert spec.config.num_reg_tokens == n_reg and spec.config.qkv_bias == qkv_bias
    assert spec.config.feature_blocks == ((0, 1, 2, 3) if multiscale else (3,))
    for net, (enc, dec) in zip(model.networks, weights):
        with torch.no_grad():
            assert rel_l2(net(X), reference_forward(enc, dec, X, spec.config.feature_blocks, 2)) < 1e-4


def test_nnunet_2d_896_configuration_inherits_from_2d(tmp_path):
    folder, _ = write_nnunet_folder(tmp_path, configuration="2d_896", folds=(0,))
    spec = load_model(folder).spec
    assert spec.patch_size == (896, 896)
    assert spec.spacing == pytest.approx((0.8 * 512 / 896, 0.8 * 512 / 896))
    assert spec.normalization["scheme"] == "ct"


def test_nnunet_best_checkpoint_and_fold_selection(tmp_path):
    folder, weights = write_nnunet_folder(tmp_path, folds=(0, 3), checkpoint_name="checkpoint_best.pth")
    model = load_model(folder, folds=["3"])
    assert model.spec.folds == ["3"] and len(model.networks) == 1
    enc, dec = weights[1]
    with torch.no_grad():
        assert rel_l2(model.networks[0](X), reference_forward(enc, dec, X, (0, 1, 2, 3), 2)) < 1e-4
    with pytest.raises(CheckpointError, match="fold.*2"):
        load_model(folder, folds=["2"])


def _assert_backbone_matches_reference(cfg, backbone, enc):
    """The loaded backbone's feature maps equal the reference network's on the upstream weights."""
    net = build_model(cfg.replace(num_classes=2)).eval()
    net.backbone.load_state_dict(backbone, strict=True)
    x3 = X.repeat(1, 3, 1, 1)
    with torch.no_grad():
        ours = net.backbone.feature_maps(x3, cfg.feature_blocks)
    ref = reference_backbone(enc, x3, cfg.feature_blocks, 2)
    assert all(rel_l2(a, b) < 1e-4 for a, b in zip(ours, ref))


def test_official_pretrained_backbone_drops_heads_and_matches_reference(tmp_path):
    path = tmp_path / "model.pth"
    enc = write_official_pretrained(path)
    cfg, backbone, spec = load_backbone(path)
    assert spec.kind == "backbone" and cfg.num_reg_tokens == 4 and not cfg.qkv_bias
    assert not any(k.startswith(("dino_head", "ibot_head")) for k in backbone)
    _assert_backbone_matches_reference(cfg, backbone, enc)
    with pytest.raises(CheckpointError, match="backbone without a segmentation decoder"):
        load_model(path)


def test_meta_dinov3_checkpoint_masks_the_key_bias(tmp_path):
    path = tmp_path / "dinov3_vitb16_pretrain.pth"
    enc = write_meta_dinov3(path)
    cfg, backbone, _ = load_backbone(path)
    assert cfg.qkv_bias
    assert torch.count_nonzero(backbone["vit.blocks.0.attn.k_bias"]) == 0
    _assert_backbone_matches_reference(cfg, backbone, enc)


def test_convert_nnunet_folder_to_package_keeps_outputs(tmp_path):
    folder, _ = write_nnunet_folder(tmp_path / "results", folds=(0, 1), qkv_bias=True, n_reg=0,
                                    trainer="dinov3_base_primus_multiscale_Trainer")
    original = load_model(folder)
    out = convert(folder, tmp_path / "pkg")
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "meddinov3-model" and meta["weights"] == ["fold_0.safetensors", "fold_1.safetensors"]
    assert meta["provenance"]["source_format"] == "nnunet"
    package = load_model(out)
    assert package.format == "package" and package.spec.classes == original.spec.classes
    for a, b in zip(original.networks, package.networks):
        with torch.no_grad():
            assert torch.equal(a(X), b(X))  # k_bias and RoPE periods travel with the package
    with pytest.raises(FileExistsError):
        convert(folder, out)


def _tiny_package(path, num_classes=3):
    net = build_model(model_config("tiny", num_classes=num_classes, depth=2))
    spec = ModelSpec(name="tiny", config=net.config,
                     classes=[ClassInfo(0, "background"), ClassInfo(1, "liver", (221, 130, 101)), ClassInfo(2, "tumour")],
                     spacing=(1.0, 1.0), license="Apache-2.0")
    write_package(path, spec, [net.state_dict()])
    return net


def test_package_round_trip_and_float16_storage(tmp_path):
    net = _tiny_package(tmp_path / "pkg").eval()
    loaded = load_model(tmp_path / "pkg").networks[0]
    with torch.no_grad():
        assert torch.equal(net(X), loaded(X))
    spec = read_model(tmp_path / "pkg")[1]
    write_package(tmp_path / "half", spec, [net.state_dict()], dtype=torch.float16)
    half = load_model(tmp_path / "half").networks[0]
    assert half.decoder.head.weight.dtype == torch.float32
    with torch.no_grad():
        assert rel_l2(half(X), net(X)) < 5e-3
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "pkg" / "model.safetensors").stat().st_size


def test_missing_and_unexpected_weights_are_listed(tmp_path):
    net = _tiny_package(tmp_path / "pkg")
    spec = read_model(tmp_path / "pkg")[1]
    sd = net.state_dict()
    sd.pop("decoder.head.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    write_package(tmp_path / "bad", spec, [sd])
    with pytest.raises(CheckpointError, match=r"missing weights: decoder\.head\.bias.*unexpected weights: decoder\.extra\.weight"):
        load_model(tmp_path / "bad")


def test_unknown_upstream_keys_are_refused(tmp_path):
    folder, _ = write_nnunet_folder(tmp_path, folds=(0,))
    ckpt = safe_torch_load(folder / "fold_0" / "checkpoint_final.pth")
    ckpt["network_weights"]["dino_encoder.blocks.0.attn.mystery"] = torch.zeros(2)
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(CheckpointError, match=r"unexpected weights: backbone\.vit\.blocks\.0\.attn\.mystery"):
        load_model(folder)


def test_decoder_that_does_not_match_labels_is_refused(tmp_path):
    folder, _ = write_nnunet_folder(tmp_path, folds=(0,), num_classes=4)
    with pytest.raises(CheckpointError, match="4 channels.*3 labels"):
        load_model(folder)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    path = tmp_path / "checkpoint_final.pth"
    with open(path, "wb") as f:
        pickle.dump({"network_weights": {}, "payload": evil}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_torch_load(path)
    assert not marker.exists()
    torch.save({"teacher": {"x": evil}}, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_backbone(tmp_path / "model.pth")
    assert not marker.exists()


def test_numpy_scalar_path_of_the_other_numpy_major_version_is_allowed(tmp_path):
    """Files written with numpy 1.x name `numpy.core.multiarray.scalar`, with numpy 2 `numpy._core...`: rewrite the
    pickle to the other name (Slicer 5.8 has numpy 1.26; nnU-Net files come from either)."""
    folder, _ = write_nnunet_folder(tmp_path, folds=(0,))
    path = folder / "fold_0" / "checkpoint_final.pth"
    import zipfile
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        data = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    names_by_version = [b"numpy._core.multiarray", b"numpy.core.multiarray"]  # numpy 2, numpy 1
    written = 0 if int(np.__version__.split(".")[0]) >= 2 else 1
    assert names_by_version[written] in data[pkl]
    data[pkl] = data[pkl].replace(names_by_version[written], names_by_version[1 - written])
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, data[n])
    assert len(load_model(folder).networks) == 1


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "model.pth"
    write_official_pretrained(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.pth: not a readable PyTorch checkpoint"):
        load_backbone(path)



def test_junk_bytes_give_a_clear_error(tmp_path):
    """Whatever the bytes make the unpickler do (unknown opcode, memo KeyError for b"junk", IndexError...)."""
    from meddinov3.checkpoints.safe_load import safe_torch_load

    path = tmp_path / "junk.pth"
    blobs = [b"junk\n"] + [np.random.default_rng(seed).integers(0, 256, 2000, dtype=np.uint8).tobytes()
                           for seed in range(40)]
    for blob in blobs:
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match=r"junk\.pth: not a readable PyTorch checkpoint"):
            safe_torch_load(path)


def test_unknown_model_name():
    with pytest.raises(UnknownModel, match="no-such-model: unknown model"):
        resolve("no-such-model")


# --- hf: references, offline cache, manifest checksums, import ----------------------------------------------

def _fake_hf_cache(cache: Path, repo="ricklisz123/MedDINOv3-ViTB-16-CT-3M", filename="model.pth",
                   commit="0123456789abcdef0123456789abcdef01234567", payload: Path | None = None) -> Path:
    """The directory layout huggingface_hub itself writes (refs/<branch> -> snapshots/<commit>/<file>)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    target = snap / filename
    target.write_bytes(payload.read_bytes())
    return target


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    """A copy of the project's Resources with a manifest whose checksum the test controls."""
    import shutil
    from meddinov3.resources import resources_dir
    res = tmp_path / "Resources"
    shutil.copytree(resources_dir(), res)
    monkeypatch.setenv("MEDDINOV3_RESOURCES", str(res))

    def set_sha(sha):
        data = json.loads((res / "models.json").read_text())
        data["models"][0]["sha256"] = sha
        (res / "models.json").write_text(json.dumps(data))
    return set_sha


def test_hf_reference_resolves_from_local_cache_offline(tmp_path, monkeypatch, manifest):
    from meddinov3.checkpoints.hub import sha256_of
    payload = tmp_path / "payload.pth"
    enc = write_official_pretrained(payload)
    manifest(sha256_of(payload))
    cache = tmp_path / "hf-cache"
    target = _fake_hf_cache(cache, payload=payload)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = "hf:ricklisz123/MedDINOv3-ViTB-16-CT-3M/model.pth"
    assert resolve(ref).resolve() == target.resolve()
    assert resolve("meddinov3-vitb16-ct3m").resolve() == target.resolve()  # manifest name
    pinned = resolve(ref + "@0123456789abcdef0123456789abcdef01234567")
    assert pinned.resolve() == target.resolve()
    cfg, backbone, _ = load_backbone(ref)
    assert torch.equal(backbone["vit.cls_token"], enc["cls_token"])
    with pytest.raises(ModelNotAvailable, match="not in the local cache and offline mode is on.*models import"):
        resolve(ref + "@fedcba9876543210fedcba9876543210fedcba98")


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch, manifest):
    payload = tmp_path / "payload.pth"
    write_official_pretrained(payload)
    manifest("0" * 64)
    cache = tmp_path / "hf-cache"
    _fake_hf_cache(cache, payload=payload)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        resolve("hf:ricklisz123/MedDINOv3-ViTB-16-CT-3M/model.pth")


def test_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch):
    """No route to the Hub (here: a closed local port as its endpoint) is found out by one connection attempt;
    huggingface_hub itself would retry for many seconds."""
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for var in ("HF_HUB_OFFLINE", "MEDDINOV3_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    started = time.perf_counter()
    with pytest.raises(ModelNotAvailable, match="not in the local cache and the Hub cannot be reached"):
        resolve("hf:someone/not-cached/model.safetensors")
    assert time.perf_counter() - started < 5


def test_models_import_makes_the_manifest_model_available_offline(tmp_path, monkeypatch, manifest):
    from meddinov3.checkpoints.hub import sha256_of
    payload = tmp_path / "downloaded-elsewhere.pth"
    write_official_pretrained(payload)
    manifest(sha256_of(payload))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable):
        resolve("meddinov3-vitb16-ct3m")
    stored = import_file(payload)
    assert resolve("meddinov3-vitb16-ct3m") == stored
    cfg, _, _ = load_backbone("meddinov3-vitb16-ct3m")
    assert cfg.embed_dim == 96


def test_models_import_of_a_package_lists_it_by_name(tmp_path):
    _tiny_package(tmp_path / "pkg")
    dest = import_file(tmp_path / "pkg", name="my-liver")
    assert resolve("my-liver") == dest
    assert load_model("my-liver").spec.name == "tiny"
    with pytest.raises(FileExistsError):
        import_file(tmp_path / "pkg", name="my-liver")


# --- names: manifest entries without a checksum, imported files, registered models --------------------------

BACKBONE, BACKBONE_REF = "meddinov3-vitb16-ct3m", "hf:ricklisz123/MedDINOv3-ViTB-16-CT-3M/model.pth"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty huggingface_hub cache: only imported files can resolve an hf: reference."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_file_named_like_an_unverified_entry_becomes_its_offline_copy(tmp_path, manifest, offline_hub):
    from meddinov3.pretrain.loop import OFFICIAL_BASE
    manifest(None)  # the published file could not be hashed yet
    download = tmp_path / "downloads" / "model.pth"
    download.parent.mkdir()
    enc = write_official_pretrained(download)
    with pytest.raises(ModelNotAvailable):
        resolve(BACKBONE, offline=True)
    stored = import_file(download)
    assert resolve(BACKBONE, offline=True) == stored == resolve(BACKBONE_REF, offline=True)
    fmt, spec, _, path = read_model(BACKBONE, offline=True)
    assert fmt == "meddinov3-pretrained" and path == stored and spec.kind == "backbone"
    assert describe(BACKBONE, offline=True)["format"] == "meddinov3-pretrained"
    _, backbone, _ = load_backbone(OFFICIAL_BASE, offline=True)  # what `pretrain` without --base starts from
    assert torch.equal(backbone["vit.cls_token"], enc["cls_token"])
    assert not (tmp_path / "meddinov3-home" / "models").exists()


def test_renamed_download_is_the_entry_named_and_own_model_pth_stays_own(tmp_path, manifest, offline_hub):
    manifest(None)
    write_official_pretrained(tmp_path / "downloaded.pth")
    write_meta_dinov3(tmp_path / "model.pth", seed=1)
    own = import_file(tmp_path / "model.pth", name="my-pretrain")  # a common file name, not the official file
    assert resolve("my-pretrain") == own
    with pytest.raises(ModelNotAvailable):
        resolve(BACKBONE, offline=True)
    renamed = import_file(tmp_path / "downloaded.pth", name=BACKBONE)
    assert resolve(BACKBONE, offline=True) == renamed
    assert describe(BACKBONE, offline=True)["format"] == "meddinov3-pretrained"


def test_file_named_like_a_checksummed_entry_with_other_content_is_refused(tmp_path, manifest, offline_hub):
    manifest("0" * 64)
    write_official_pretrained(tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=rf"model\.pth: named as the file of manifest model {BACKBONE} .* "
                                              "not the published one; the file is corrupt or a different one"):
        import_file(tmp_path / "model.pth")
    home = tmp_path / "meddinov3-home"
    assert not (home / "models").exists() and not [p for p in home.rglob("*") if p.is_file()]


def test_imported_single_file_resolves_by_its_name_to_the_file(tmp_path):
    from meddinov3.cli.models import list_models
    write_meta_dinov3(tmp_path / "dinov3_vitb16_pretrain.pth")
    stored = import_file(tmp_path / "dinov3_vitb16_pretrain.pth", name="my-dinov3")
    assert stored.is_file() and stored.name == "dinov3_vitb16_pretrain.pth"
    assert resolve("my-dinov3") == stored
    assert describe("my-dinov3")["format"] == "dinov3-backbone"
    assert load_backbone("my-dinov3")[0].qkv_bias  # `train/pretrain --base my-dinov3`
    assert {"name": "my-dinov3", "source": "imported", "ref": str(stored)} in list_models()


def test_registered_model_resolves_by_its_listed_name_and_duplicates_are_refused(tmp_path):
    from meddinov3.checkpoints import register_model
    from meddinov3.cli.models import list_models
    _tiny_package(tmp_path / "runs" / "liver-v2" / "model")  # a training run's output: listed as its run, liver-v2
    _tiny_package(tmp_path / "runs" / "kidney")
    _tiny_package(tmp_path / "other" / "kidney")
    for folder in ("runs/liver-v2/model", "runs/kidney", "other/kidney"):
        register_model(tmp_path / folder)
    listed = {r["ref"]: r["name"] for r in list_models() if r["source"] == "registered"}
    liver = str((tmp_path / "runs" / "liver-v2" / "model").resolve())
    assert listed[liver] == "liver-v2"
    assert resolve("liver-v2") == Path(liver)
    assert describe("liver-v2")["format"] == "package"
    with pytest.raises(CheckpointError, match=r"kidney: several registered models have this name \(.*runs/kidney, "
                                              r".*other/kidney\); give the path"):
        resolve("kidney")


def test_cli_imports_the_backbone_for_offline_use_and_describes_it(tmp_path, manifest, offline_hub):
    """`meddinov3 models import FILE` then `meddinov3 info NAME`, as README tells offline users."""
    from meddinov3.checkpoints.hub import sha256_of
    manifest(None)
    write_official_pretrained(tmp_path / "model.pth")
    env = {"MEDDINOV3_HOME": str(tmp_path / "home")}  # the rest (manifest copy, offline hub) from os.environ
    result = _cli("models", "import", str(tmp_path / "model.pth"), env=env)
    assert result.returncode == 0, result.stderr
    assert f"the offline copy of {BACKBONE} ({BACKBONE_REF}), matched by file name" in result.stdout
    assert "could not be verified by checksum" in result.stdout
    assert f"sha256 {sha256_of(tmp_path / 'model.pth')}" in result.stdout
    result = _cli("info", BACKBONE, env=env)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "meddinov3-pretrained" and info["kind"] == "backbone"
    assert Path(info["path"]).is_relative_to(tmp_path / "home")


# --- `meddinov3 info` / `convert` on each layout -------------------------------------------------------------

def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "meddinov3.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_info_on_each_layout(tmp_path):
    folder, _ = write_nnunet_folder(tmp_path / "results", folds=(0, 1))
    write_official_pretrained(tmp_path / "model.pth")
    write_meta_dinov3(tmp_path / "meta.pth")
    _tiny_package(tmp_path / "pkg")
    expected = {folder: "nnunet", tmp_path / "model.pth": "meddinov3-pretrained",
                tmp_path / "meta.pth": "dinov3-backbone", tmp_path / "pkg": "package"}
    for path, fmt in expected.items():
        info = describe(path)
        assert info["format"] == fmt
        assert info["parameters"] > 0
    nn_info = describe(folder)
    assert nn_info["folds"] == ["0", "1"] and nn_info["patch_size"] == [64, 64]
    assert [c["name"] for c in nn_info["classes"]] == ["background", "liver", "tumour"]
    assert nn_info["architecture"]["feature_blocks"] == [0, 1, 2, 3]
    # the command line prints the same JSON
    result = _cli("info", str(folder), env={"MEDDINOV3_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["folds"] == ["0", "1"]


def test_cli_errors_are_one_line_with_exit_code(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    result = _cli("info", str(tmp_path / "junk.pth"), env={"MEDDINOV3_HOME": str(tmp_path / "home")})
    assert result.returncode == 2
    assert "junk.pth: not a readable PyTorch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli("convert", str(tmp_path / "junk.pth"), "-o", str(tmp_path / "out"),
                  env={"MEDDINOV3_HOME": str(tmp_path / "home")})
    assert result.returncode == 2 and not (tmp_path / "out").exists()
