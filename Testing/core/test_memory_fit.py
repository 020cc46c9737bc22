"""Jobs size their micro-batch to the memory they have: measured on real allocations, enforced by a real limit.

The limit is the kernel's: the child lowers its own RLIMIT_DATA (private writable memory) to what it uses after its
imports plus a fixed room, then runs `meddinov3 pretrain` through the command line. Past the limit an allocation
fails, as it would when the host runs out (where the OOM killer ends the process without a word).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from meddinov3.memory import BatchDoesNotFit, choose_micro_batch, measure_image_cost

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20

LIMITED = """
import resource, sys
import meddinov3.pretrain.loop  # the heavy imports (torch, timm) belong to the baseline
from meddinov3.cli.main import main
from meddinov3.memory import proc_status
limit = proc_status("VmData") + int(float(sys.argv[1]) * 2**30)
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""
# a small ViT on 128 px crops with 8 local crops: each image costs ~50 MiB in the student's forward and backward,
# while the whole-step teacher targets (Sinkhorn over 1024 prototypes) stay small
TINY = ['model={"depth": 4, "patch_size": 8}', 'head={"out_dim": 1024, "hidden_dim": 64, "bottleneck_dim": 32}',
        "global_size=128", "local_size=64", "n_local=8", "probe_every=0", "log_every=1",
        "mask_probability=1.0", "mask_ratio=[0.5, 0.5]"]  # every image masked as much as the probe assumes


ROOM_GB = 0.8  # the whole batch of 32 needs ~1.5 GiB in one forward; a few images at a time fit


def _allocate(k: int) -> None:
    """Touch k x 64 MiB (a real, page-faulted allocation), then free it."""
    x = torch.ones(k * 16 * MIB)  # float32: 4 bytes each
    del x


def test_measured_cost_per_image_matches_the_allocation():
    per_image, fixed = measure_image_cost(_allocate, torch.device("cpu"))
    assert 62 * MIB <= per_image <= 70 * MIB and fixed <= 8 * MIB


def test_a_batch_that_cannot_fit_is_one_line_with_the_numbers():
    with pytest.raises(BatchDoesNotFit) as e:
        choose_micro_batch(4, _allocate, torch.device("cpu"), pending_bytes=2**50, configured=None,
                           what="batch_size 4")
    message = str(e.value)
    assert "\n" not in message and "batch_size 4 cannot fit" in message and "GiB per image" in message
    fit = choose_micro_batch(4, _allocate, torch.device("cpu"), pending_bytes=0, configured=None, what="batch_size 4")
    assert fit.micro_batch == 4 and fit.accumulation == 1 and 0.05 < fit.per_image_gb < 0.08


def _pretrain_limited(tmp_path: Path, room_gb: float, *sets: str) -> tuple[subprocess.CompletedProcess, dict]:
    from meddinov3.phantom import make_phantom_ct

    volume = tmp_path / "ct.nii.gz"
    if not volume.exists():
        sitk.WriteImage(make_phantom_ct(shape=(6, 64, 64), spacing=(1.0, 1.0, 3.0), seed=0)[0], str(volume))
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDDINOV3_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(room_gb), "pretrain", "--data", str(volume), "--out",
                           str(out), "--size", "tiny", "--steps", "1", "--batch-size", "32", "--device", "cpu",
                           "--set", *TINY, *sets], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads((out / "status.json").read_text())


def test_pretrain_under_an_enforced_memory_limit_fits_its_micro_batch(tmp_path):
    """Under ROOM_GB of room the whole batch of 32 cannot run in one forward: given as the micro-batch it
    fails; chosen automatically, the run measures, accumulates and finishes."""
    proc, status = _pretrain_limited(tmp_path, ROOM_GB)
    assert proc.returncode == 0, proc.stderr[-2000:]
    batch = status["batch"]
    assert status["state"] == "finished" and 1 <= batch["micro_batch"] < 32
    assert batch["accumulation"] == -(-32 // batch["micro_batch"]) and "RLIMIT_DATA" in batch["reason"]
    config = json.loads((tmp_path / "run0" / "config.json").read_text())
    assert config["resolved"]["batch"] == batch

    proc, status = _pretrain_limited(tmp_path, ROOM_GB, "micro_batch=32")
    assert proc.returncode != 0 and status["state"] == "failed"
    assert "memory" in status["error"].lower()


def test_whole_step_teacher_targets_that_cannot_fit_are_one_line(tmp_path):
    """Sinkhorn runs over all of a step's teacher outputs whatever the micro-batch (the step's batch semantics), so
    65536 prototypes over 32 images' masked patches (~2 GiB) cannot fit in ROOM_GB at any micro-batch: one line
    before any step, not an out-of-memory crash in the first step."""
    big_head = 'head={"out_dim": 65536, "hidden_dim": 64, "bottleneck_dim": 32}'
    proc, status = _pretrain_limited(tmp_path, ROOM_GB, big_head)
    assert proc.returncode != 0 and status["state"] == "failed"
    assert "covers the whole batch" in status["error"] and "\n" not in status["error"]
    assert "Traceback" not in proc.stderr
