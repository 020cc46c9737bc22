"""Small datasets for the training tests: phantom CTs and the real LiTS liver CT, in the formats train reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]


def phantom_dataset(folder: Path, n: int = 3, shape=(10, 48, 48)) -> Path:
    from meddinov3.phantom import PHANTOM_LABELS, make_phantom_ct

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, lab = make_phantom_ct(shape=shape, spacing=(3.0 + 0.2 * i, 3.0 + 0.2 * i, 5.0), seed=i)
        sitk.WriteImage(img, str(folder / "imagesTr" / f"case{i}_0000.nii.gz"))
        sitk.WriteImage(lab, str(folder / "labelsTr" / f"case{i}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": PHANTOM_LABELS, "numTraining": n, "file_ending": ".nii.gz"}))
    return folder


def cached_cases():
    """Two in-memory slice-cache cases (5 x 40 x 36, one foreground blob, air -3) for sampler tests."""
    from meddinov3.data.cache import CachedCase

    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        img = rng.normal(size=(5, 40, 36)).astype(np.float16)
        lab = np.zeros((5, 40, 36), np.uint8)
        lab[2, 10:14, 20:24] = 1
        out.append(CachedCase(f"c{i}", img, lab, {1: np.argwhere(lab == 1).astype(np.int32)}, -3.0))
    return out


def liver_dataset(folder: Path) -> Path:
    """The demo export with its held-out half in imagesTr/labelsTr as case `liver117_heldout`.

    The pipeline tests need a validation case on real CT; the demo model itself never reads that half.
    """
    from meddinov3.cli.demo import export_dataset

    return export_dataset(folder, heldout_as_validation=True)


def tiny_args(cache: Path, depth: int = 1) -> list[str]:
    return ["--size", "tiny", "--set", f'model={{"depth": {depth}}}', f"cache_dir={json.dumps(str(cache))}"]


def run_cli(args: list[str], timeout: float = 300, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "meddinov3.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def popen_cli(args: list[str], env_extra: dict | None = None, cwd: Path = REPO) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "meddinov3.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]
