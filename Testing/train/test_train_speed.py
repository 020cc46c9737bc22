"""The speed options change no numbers: batch prefetch (a background thread) and torch.compile of the step."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from meddinov3.checkpoints.package import read_spec, read_weights
from meddinov3.data.prefetch import Prefetcher
from meddinov3.data.sampler import PatchSampler
from meddinov3.train import TrainConfig, train
from meddinov3.train.checkpoint import load_state
from meddinov3.runs import read_metrics

from ._datasets import cached_cases, phantom_dataset


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "meddinov3-prefetch"]


def test_prefetched_batches_equal_direct_sampling():
    sampler = PatchSampler(cached_cases(), (32, 48), 4, fg_fraction=0.33, seed=1)
    for depth in (2, 0):
        for start in (0, 5):  # 5: the first step after --resume from a step-5 checkpoint
            with Prefetcher(sampler.sample, start, "cpu", depth) as batches:
                for step in range(start, start + 8):
                    x, y = batches.get(step)
                    imgs, labs = sampler.sample(step)
                    assert np.array_equal(x.numpy(), imgs) and np.array_equal(y.numpy(), labs), (depth, step)
    assert not prefetch_threads()


def test_prefetcher_stops_cleanly_and_reraises_worker_errors():
    sampler = PatchSampler(cached_cases(), (32, 48), 2, seed=0)
    batches = Prefetcher(sampler.sample, 0, "cpu", depth=2)
    batches.get(0)
    time.sleep(0.3)  # the worker fills the queue and waits on it
    batches.close()
    batches.close()
    assert not prefetch_threads()

    def sample(step):
        if step == 3:
            raise ValueError("slice cache unreadable at step 3")
        return sampler.sample(step)

    with Prefetcher(sample, 0, "cpu") as batches:
        for step in range(3):
            batches.get(step)
        with pytest.raises(ValueError, match="slice cache unreadable at step 3"):
            batches.get(3)
    assert not prefetch_threads()
    with Prefetcher(sampler.sample, 0, "cpu") as batches, pytest.raises(RuntimeError, match="in order"):
        batches.get(1)
    assert not prefetch_threads()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return phantom_dataset(tmp_path_factory.mktemp("phantom") / "ds", n=2, shape=(6, 48, 48))


def _run(phantom, folder, **options) -> tuple[list[float], dict, Path]:
    """3 steps with the default augmentations: (loss per step, final weights, exported package). The run folder has
    the same name every time (it names the package)."""
    out = folder / "run"
    cfg = TrainConfig(data=str(phantom), out=str(out), size="tiny", model={"depth": 1}, steps=3, batch_size=2,
                      val_fraction=0, cache_dir=str(phantom.parent / "cache"), patch_size=[32, 32], log_every=1,
                      device="cpu", **options)
    status = train(cfg, json_progress=True, stream=io.StringIO())
    assert status["state"] == "finished" and status["step"] == 3
    assert not prefetch_threads()
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    return losses, load_state(out / "checkpoints" / "latest.pt")["model"], out / "model"


@pytest.fixture(scope="module")
def eager_run(phantom, tmp_path_factory):
    return _run(phantom, tmp_path_factory.mktemp("eager"), prefetch=True)


def test_prefetch_on_and_off_train_identically(phantom, eager_run, tmp_path):
    losses, weights, _ = _run(phantom, tmp_path, prefetch=False)
    assert losses == eager_run[0]
    for k, v in eager_run[1].items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.slow  # compiling the forward + backward on a CPU takes 1-3 min
def test_compile_trains_the_same_and_saves_plain_weights(phantom, eager_run, tmp_path_factory):
    losses, weights, package = _run(phantom, tmp_path_factory.mktemp("compiled"), compile=True)
    np.testing.assert_allclose(losses, eager_run[0], rtol=1e-4)
    assert list(weights) == list(eager_run[1])  # the network's own keys: no "_orig_mod." prefix
    for k, v in eager_run[1].items():
        torch.testing.assert_close(weights[k], v, rtol=1e-3, atol=1e-4, msg=k)
    # the exported package is the one an eager run writes: model.json up to its creation time, the same tensors
    specs = [json.loads((p / "model.json").read_text()) for p in (package, eager_run[2])]
    for spec in specs:
        spec["provenance"].pop("created")
    assert specs[0] == specs[1]
    exported = [{k: (v.dtype, v.shape) for k, v in read_weights(p, read_spec(p))[0].items()}
                for p in (package, eager_run[2])]
    assert exported[0] == exported[1]
