"""`--batch-size auto` uses the card it is given, keeps room for Slicer, holds on small cards, and on a CPU respects
the host memory left.

CUDA cannot exist on the CI machine, so its three memory queries are replaced by a GPU's answers (mocked: the only
thing here that is not real). Peak VRAM of a ViT-B 512 px run, measured on an H100 / H200 (benchmarks/RESULTS.md):
~0.4 GiB of weights plus ~0.6 GiB per slice in the batch.
"""

import resource

import pytest
import torch

from meddinov3.config import model_config
from meddinov3.engine.inference import auto_batch_size
from meddinov3.memory import proc_status

GIB = 2**30
WEIGHTS_GB, PER_SLICE_GB = 0.4, 0.6


def _gpu(monkeypatch, free, total=80 * GIB):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


@pytest.fixture
def vit_b():
    return model_config("base", num_classes=16)


def test_a_large_free_card_gets_the_largest_batch(monkeypatch, vit_b):
    monkeypatch.delenv("MEDDINOV3_MAX_VRAM_GB", raising=False)
    _gpu(monkeypatch, free=139 * GIB, total=141 * GIB)  # an H200
    assert auto_batch_size(torch.device("cuda"), vit_b, (512, 512)) == 64
    _gpu(monkeypatch, free=79 * GIB)  # an H100
    assert auto_batch_size(torch.device("cuda"), vit_b, (512, 512)) == 64


@pytest.mark.parametrize("free_gb", [3.5, 4, 6, 8])
def test_small_cards_fit_with_room_for_slicer(monkeypatch, vit_b, free_gb):
    """4-8 GB cards (weights already loaded: `free` is what is left): the batch's peak stays 1 GiB below the free
    memory, which Slicer's rendering keeps."""
    monkeypatch.delenv("MEDDINOV3_MAX_VRAM_GB", raising=False)
    _gpu(monkeypatch, free=int(free_gb * GIB), total=int((free_gb + 0.5) * GIB))
    batch = auto_batch_size(torch.device("cuda"), vit_b, (512, 512))
    assert batch >= 1 and (batch == 1 or PER_SLICE_GB * batch <= free_gb - 1.0)


def test_the_vram_budget_caps_the_run_also_when_only_that_much_is_free(monkeypatch, vit_b):
    monkeypatch.setenv("MEDDINOV3_MAX_VRAM_GB", "6")
    for free in (79 * GIB, 6 * GIB):
        _gpu(monkeypatch, free=free)
        batch = auto_batch_size(torch.device("cuda"), vit_b, (512, 512))
        assert 1 <= batch and WEIGHTS_GB + PER_SLICE_GB * batch <= 6.0
    monkeypatch.setenv("MEDDINOV3_MAX_VRAM_GB", "80")
    _gpu(monkeypatch, free=79 * GIB)
    assert auto_batch_size(torch.device("cuda"), vit_b, (512, 512)) == 64


def test_smaller_tiles_get_larger_batches(monkeypatch, vit_b):
    monkeypatch.delenv("MEDDINOV3_MAX_VRAM_GB", raising=False)
    _gpu(monkeypatch, free=8 * GIB)
    assert auto_batch_size(torch.device("cuda"), vit_b, (256, 256)) > auto_batch_size(torch.device("cuda"), vit_b,
                                                                                      (512, 512))


def test_cpu_batch_shrinks_to_the_host_memory_left(vit_b):
    """A real limit, not a mock: this process's RLIMIT_DATA lowered to leave 1.5 GiB, then 3.5 GiB of room (a
    512 px ViT-B slice needs ~1.3 GiB in float32 on a CPU)."""
    saved = resource.getrlimit(resource.RLIMIT_DATA)
    try:
        batches = []
        for room_gb in (1.5, 3.5):
            limit = proc_status("VmData") + int(room_gb * GIB)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, saved[1]))
            batches.append(auto_batch_size(torch.device("cpu"), vit_b, (512, 512)))
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, saved)
    assert batches == [1, 2]
    assert auto_batch_size(torch.device("cpu"), vit_b, (512, 512)) >= 2  # this machine has more room
