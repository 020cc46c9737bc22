"""GPU checks: run only where CUDA exists (skipped on CPU CI; `benchmarks/gpu_check.sh` runs them on a GPU machine).

Nothing is mocked: the real engine and the real training prefetch path on the device, compared with the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_demo_model_on_cuda_matches_cpu():
    """bf16 autocast on the GPU gives (nearly) the CPU's labels with the shipped model: on the real liver CT, or
    on the phantom CT where the GPU machine lacks the liver CT package."""
    from meddinov3.checkpoints import load_model
    from meddinov3.engine import segment_image
    from meddinov3.phantom import load_liver_ct, make_phantom_ct

    try:
        image, _ = load_liver_ct()
    except FileNotFoundError:
        image, _ = make_phantom_ct((64, 128, 128), spacing=(1.0, 1.0, 1.0), seed=0)
    cpu = sitk.GetArrayFromImage(segment_image(image, load_model("demo-liver-ct", device="cpu"), device="cpu").labels)
    result = segment_image(image, load_model("demo-liver-ct", device="cuda"), device="cuda")
    gpu = sitk.GetArrayFromImage(result.labels)
    assert result.stats["device"].startswith("cuda")
    assert (gpu == cpu).mean() > 0.99


def test_prefetcher_on_cuda_delivers_the_sampled_batches():
    """Pinned host batches copied on the side stream arrive intact on the device, in step order."""
    from meddinov3.data.prefetch import Prefetcher
    from meddinov3.data.sampler import PatchSampler
    from Testing.train._datasets import cached_cases

    sampler = PatchSampler(cached_cases(), (32, 48), 4, fg_fraction=0.33, seed=1)
    with Prefetcher(sampler.sample, 0, "cuda", depth=2) as batches:
        for step in range(6):
            x, y = batches.get(step)
            imgs, labs = sampler.sample(step)
            assert x.is_cuda and y.is_cuda
            assert np.array_equal(x.cpu().numpy(), imgs) and np.array_equal(y.cpu().numpy(), labs)


def test_training_on_cuda_reports_its_gpu_memory(tmp_path):
    """A short bf16 run on the GPU finishes, and its status carries the peak memory the Slicer module shows."""
    import io
    import json

    from meddinov3.train import TrainConfig, train
    from Testing.train._datasets import phantom_dataset

    data = phantom_dataset(tmp_path / "data")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), size="tiny", model={"depth": 1}, steps=3,
                      batch_size=2, val_fraction=0, cache_dir=str(tmp_path / "cache"), patch_size=[32, 32],
                      log_every=1, device="cuda")
    status = train(cfg, json_progress=True, stream=io.StringIO())
    assert status["state"] == "finished"
    saved = json.loads((tmp_path / "run" / "status.json").read_text())
    assert saved["metrics"]["gpu_memory_gb"] > 0
