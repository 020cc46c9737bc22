"""`--batch-size auto` on CUDA keeps a default ViT-B run within the 4 GiB VRAM budget.

CUDA cannot exist on the CI machine, so its three memory queries are replaced by an 80 GB GPU's answers
(mocked: the only thing here that is not real).
"""

import torch

from meddinov3.config import model_config
from meddinov3.engine.inference import auto_batch_size

GIB = 2**30


def _h100(monkeypatch, free=79 * GIB):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_default_budget_caps_vit_b_at_512px(monkeypatch):
    _h100(monkeypatch)
    monkeypatch.delenv("MEDDINOV3_MAX_VRAM_GB", raising=False)
    cfg = model_config("base", num_classes=16)
    batch = auto_batch_size(torch.device("cuda"), cfg, (512, 512))
    # measured on an H100: ~0.6 GiB of peak memory per 512 px slice in the batch, ~0.4 GiB of weights
    assert 1 <= batch and 0.4 + 0.6 * batch <= 4.0


def test_budget_can_be_raised_and_free_memory_still_limits(monkeypatch):
    _h100(monkeypatch)
    cfg = model_config("base", num_classes=16)
    monkeypatch.setenv("MEDDINOV3_MAX_VRAM_GB", "80")
    assert auto_batch_size(torch.device("cuda"), cfg, (512, 512)) == 64
    _h100(monkeypatch, free=6 * GIB)
    small_gpu = auto_batch_size(torch.device("cuda"), cfg, (512, 512))
    assert 1 <= small_gpu < 8


def test_smaller_tiles_get_larger_batches(monkeypatch):
    _h100(monkeypatch)
    monkeypatch.delenv("MEDDINOV3_MAX_VRAM_GB", raising=False)
    cfg = model_config("base", num_classes=16)
    assert auto_batch_size(torch.device("cuda"), cfg, (256, 256)) > auto_batch_size(torch.device("cuda"), cfg, (512, 512))
