"""End-to-end runs through the CLI: a short real run on the LiTS liver CT, SIGTERM, kill -9 + --resume, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ._datasets import REPO, events, liver_dataset, phantom_dataset, popen_cli, run_cli, tiny_args


POSTPROCESSING = [{"step": "largest_component", "labels": [1, 2], "opening_mm": 2.0}]


@pytest.fixture(scope="module")
def liver_run(tmp_path_factory):
    """One short real run on the liver CT: train on the demo training half, validate on the other half."""
    root = tmp_path_factory.mktemp("liver")
    ds = liver_dataset(root / "dataset")
    out = root / "run"
    r = run_cli(["train", "--data", str(ds), "--out", str(out), "--steps", "12", "--steps-per-epoch", "6",
                 "--batch-size", "4", "--val-cases", "liver117_heldout", "--json-progress",
                 *tiny_args(root / "cache", depth=2), "--set", 'model={"depth": 2, "patch_size": 8}',
                 "checkpoint_every=6", "log_every=1", "lr_decoder=2e-3", "lr_backbone=1e-3",
                 'augment={"enabled": false}', f"postprocessing={json.dumps(POSTPROCESSING)}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, ds, events(r.stdout)


def test_run_writes_every_file(liver_run):
    out, _, _ = liver_run
    for name in ("config.json", "checkpoints/latest.pt", "checkpoints/best.pt", "metrics.jsonl", "curves.png",
                 "model/model.json", "model/model.safetensors", "status.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["steps"] == 12 and cfg["train"]["seed"] == 0
    assert cfg["resolved"]["spacing"] == [1.0, 1.0] and cfg["resolved"]["normalization"]["scheme"] == "ct"
    assert {"torch", "timm", "meddinov3"} <= set(cfg["versions"])
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == status["total"] == 12
    spec = json.loads((out / "model" / "model.json").read_text())
    assert [c["name"] for c in spec["classes"]] == ["background", "liver", "tumour"]
    assert spec["classes"][1].get("color") and spec["spacing"] == [1.0, 1.0]
    assert spec["patch_size"] == [128, 64]  # default: the training half's axial slice size (rows y, columns x)
    assert spec["normalization"]["scheme"] == "ct" and spec["provenance"]["validation_cases"] == ["liver117_heldout"]


def test_loss_goes_down_and_progress_lines_parse(liver_run):
    _, _, evs = liver_run
    kinds = [e["event"] for e in evs]
    for k in ("started", "step", "epoch", "validation", "checkpoint", "finished"):
        assert k in kinds, k
    losses = [e["loss"] for e in evs if e["event"] == "step"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    val = [e for e in evs if e["event"] == "validation"]
    assert set(val[-1]["dice"]) == {"liver", "tumour"}
    assert all(0 <= v <= 1 for v in val[-1]["dice"].values())
    step = next(e for e in evs if e["event"] == "step")
    assert {"loss", "lr", "images_per_s"} <= set(step)


def test_package_segments_through_engine(liver_run):
    import SimpleITK as sitk

    from meddinov3.checkpoints import load_model
    from meddinov3.engine import segment_image

    out, ds, _ = liver_run
    image = sitk.ReadImage(str(ds / "imagesTr" / "liver117_heldout_0000.nii.gz"))
    model = load_model(out / "model")
    assert model.spec.postprocessing == POSTPROCESSING  # --set postprocessing reaches the package
    result = segment_image(image, model, device="cpu")
    assert result.labels.GetSize() == image.GetSize()
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels))) <= {0, 1, 2}


def test_continue_from_package_keeps_decoder(liver_run, tmp_path):
    out, ds, _ = liver_run
    r = run_cli(["train", "--data", str(ds), "--out", str(tmp_path / "again"), "--base", str(out), "--steps", "1",
                 "--batch-size", "2", "--val-cases", "liver117_heldout", "--set",
                 f"cache_dir={json.dumps(str(tmp_path / 'cache'))}", 'augment={"enabled": false}'], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["resolved"]["base"]["decoder"] == "kept"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return phantom_dataset(tmp_path_factory.mktemp("phantom") / "ds", n=3, shape=(8, 48, 48))


def _wait_for(proc: subprocess.Popen, predicate, timeout: float = 240) -> list[dict]:
    seen = []
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(json.loads(line))
        if predicate(seen[-1]):
            return seen
    proc.kill()
    raise AssertionError(f"event not seen; got {[e['event'] for e in seen]}; stderr: {proc.stderr.read()[-2000:]}")


def _common(phantom, tmp_path, steps: int) -> list[str]:
    return ["--data", str(phantom), "--steps", str(steps), "--batch-size", "2", "--val-fraction", "0",
            "--json-progress", *tiny_args(tmp_path / "cache"), "--set", "checkpoint_every=3", "log_every=1",
            "patch_size=[32, 32]"]


@pytest.mark.slicer_python
def test_kill9_then_resume_gives_same_step_count(phantom, tmp_path):
    out = tmp_path / "run"
    # started with relative paths, resumed from another working directory (config.json stores them absolute)
    args = _common(phantom, tmp_path, 12)
    args[1] = os.path.relpath(phantom, tmp_path)
    proc = popen_cli(["train", "--out", "run", *args], cwd=tmp_path)
    _wait_for(proc, lambda e: e["event"] == "checkpoint" and e["step"] >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["data"] == str(phantom) and saved["train"]["out"] == str(out)
    assert saved["data"]["cases"][0]["image"] == str(phantom / "imagesTr" / "case0_0000.nii.gz")

    # status.json still says "running" with the dead pid: every reader says "killed" and how to continue
    raw = json.loads((out / "status.json").read_text())
    assert raw["state"] == "running" and raw["pid"] == proc.pid and raw["pgid"] == os.getpgid(0)
    r = run_cli(["info", str(out)], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["state"] == "killed" and report["step"] >= 3 and report["model"] is None
    for text in (report["message"], r.stderr):
        assert f"pid {proc.pid}) was killed at step" in text and f"meddinov3 train --out {out} --resume" in text
    r = run_cli(["train", "--out", str(out), *_common(phantom, tmp_path, 12)], timeout=120)
    assert r.returncode == 2 and "already holds a run that was killed at step" in r.stderr, r.stderr[-2000:]

    r = run_cli(["train", "--out", str(out), "--resume", "--json-progress"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "was killed at step" in r.stderr and "resuming" in r.stderr
    evs = events(r.stdout)
    started = next(e for e in evs if e["event"] == "started")
    assert started["resumed"] and started["step"] >= 3
    finished = next(e for e in evs if e["event"] == "finished")
    assert finished["step"] == 12
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "step"]
    assert steps == list(range(1, 13))  # nothing lost, nothing counted twice

    # a finished run: --resume does nothing; other options are refused, not ignored
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = run_cli(["train", "--out", str(out), "--resume", "--json-progress"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert events(r.stdout) == [{**events(r.stdout)[0], "event": "finished", "already_finished": True, "step": 12}]
    r = run_cli(["train", "--out", str(out), "--resume", "--steps", "24", "--device", "cpu"], timeout=120)
    assert r.returncode == 2
    assert "--resume continues the saved configuration" in r.stderr and "steps 24 (saved: 12)" in r.stderr
    assert f"--base {out}" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files


def test_resume_continues_the_same_trajectory(phantom, tmp_path):
    """An interrupted + resumed run ends with the weights of an uninterrupted one (sampler/RNG/optimiser restored)."""
    import torch

    ref = tmp_path / "ref"
    r = run_cli(["train", "--out", str(ref), *_common(phantom, tmp_path, 6)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cut = tmp_path / "cut"
    args = _common(phantom, tmp_path, 6)
    proc = popen_cli(["train", "--out", str(cut), *args])
    _wait_for(proc, lambda e: e["event"] == "checkpoint" and e["step"] == 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert run_cli(["train", "--out", str(cut), "--resume"], timeout=300).returncode == 0
    a = torch.load(ref / "checkpoints" / "latest.pt", weights_only=False)["model"]
    b = torch.load(cut / "checkpoints" / "latest.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sigterm_saves_and_exits_cleanly(phantom, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "ds"
    shutil.copytree(phantom, data)
    args = _common(data, tmp_path, 500)
    proc = popen_cli(["train", "--out", str(out), *args])
    seen = _wait_for(proc, lambda e: e["event"] == "step" and e["step"] >= 2)
    started = next(e for e in seen if e["event"] == "started")
    assert "no validation cases" in started["warning"] and "no best checkpoint" in started["warning"]
    # a second process into the same run folder is refused and leaves its status alone
    for second in (["--resume"], args):
        r = run_cli(["train", "--out", str(out), *second], timeout=120)
        assert r.returncode == 2
        assert f"another process (pid {proc.pid}) is running this run" in r.stderr
        assert json.loads((out / "status.json").read_text())["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    evs = events(stdout)
    stopped = next(e for e in evs if e["event"] == "stopped")
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == stopped["step"] < 500
    import torch
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["step"] == stopped["step"]
    # stopped before any validation: the current weights are a usable package already
    spec = json.loads((out / "model" / "model.json").read_text())
    assert spec["provenance"]["trained_steps"] == stopped["step"] and spec["provenance"]["total_steps"] == 500
    # a resume that fails before training starts leaves the run stopped (and resumable)
    data.rename(tmp_path / "moved")
    r = run_cli(["train", "--out", str(out), "--resume"], timeout=120)
    assert r.returncode == 2 and "no such dataset folder" in r.stderr
    assert json.loads((out / "status.json").read_text()) == status


def test_sigterm_during_start_up_stops_cleanly(tmp_path):
    """SIGTERM while the slice cache is built: state "stopped", exit 0, no temporary cache folder, restartable."""
    data = phantom_dataset(tmp_path / "ds", n=2, shape=(48, 192, 192))
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train", "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "2", "--val-fraction",
            "0", *tiny_args(cache), "--set", "patch_size=[32, 32]"]
    proc = popen_cli(args)
    for line in proc.stderr:
        if "preprocessing" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 0
    assert not (out / "checkpoints").exists()  # stopped in the start-up, before the loop
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    r = run_cli(args, timeout=300)  # the same command starts again in that folder
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def test_new_run_into_a_foreign_folder_is_refused(phantom, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "important.txt").write_text("keep me")
    r = run_cli(["train", "--out", str(out), *_common(phantom, tmp_path, 2)], timeout=120)
    assert r.returncode == 2 and f"{out}: not empty (model)" in r.stderr
    assert sorted(p.name for p in out.rglob("*")) == ["important.txt", "model"]


def test_bad_base_is_refused_before_caching(phantom, tmp_path):
    r = run_cli(["train", "--data", str(phantom), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--base", str(tmp_path / "missing.pth"), *tiny_args(tmp_path / "cache")], timeout=120)
    assert r.returncode == 2 and "missing.pth: unknown model" in r.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_bad_dataset_is_refused_by_the_cli(phantom, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(phantom, bad)
    (bad / "labelsTr" / "case2.nii.gz").unlink()
    r = run_cli(["train", "--data", str(bad), "--out", str(tmp_path / "run"), "--steps", "1", "--json-progress",
                 *tiny_args(tmp_path / "cache")], timeout=120)
    assert r.returncode == 2
    assert "case 'case2'" in r.stderr and "missing" in r.stderr
    failed = [e for e in events(r.stdout) if e["event"] == "failed"]
    assert failed and "case2" in failed[0]["message"]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_bad_postprocessing_config_is_refused(phantom, tmp_path):
    r = run_cli(["train", "--data", str(phantom), "--out", str(tmp_path / "run"), "--steps", "1",
                 *tiny_args(tmp_path / "cache"), "--set", 'postprocessing=[{"step": "largest_component", "labels": [9]}]'],
                timeout=120)
    assert r.returncode == 2
    assert "postprocessing step 0" in r.stderr and "labels" in r.stderr
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # refused before caching


def test_ddp_two_cpu_processes_agree(phantom, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "meddinov3.cli", "train", "--out", str(out), *_common(phantom, tmp_path, 4), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    finished = next(e for e in events(r.stdout) if e["event"] == "finished")
    a, b = finished["rank_checksums"]
    assert a == pytest.approx(b, rel=0, abs=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2 and cfg["resolved"]["per_rank_batch"] == 1
