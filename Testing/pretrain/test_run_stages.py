"""Units of the pretraining run's stages that the end-to-end runs (test_pretrain_run.py) do not reach alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from meddinov3.pretrain import loop
from meddinov3.pretrain.loop import PretrainConfig, PretrainError


@pytest.mark.parametrize("batch, world, expected", [(8, 2, 4), (2, 1, 2), (6, 4, "not divisible by the 4"),
                                                    (4, 4, "at least 2 images per step")])
def test_per_rank_batch_splits_the_step_or_says_why_not(batch, world, expected):
    cfg = PretrainConfig(batch_size=batch)
    if isinstance(expected, int):
        assert loop._per_rank_batch(cfg, world) == expected
    else:
        with pytest.raises(PretrainError, match=expected):
            loop._per_rank_batch(cfg, world)


def test_resume_position_takes_the_checkpoint_and_keeps_the_smaller_micro_batch(monkeypatch, tmp_path):
    restored = []
    monkeypatch.setattr(loop, "load_optimizer",
                        lambda meta, optimizer, state: restored.append(("optimizer", state)) or True)
    monkeypatch.setattr(loop, "set_rng_states", lambda state: restored.append(("rng", state)))
    run = SimpleNamespace(log=lambda message: None)
    checkpoint = {"optimizer": "O", "rng": "R", "step": 6, "micro_batch": 2, "collapse": {"count": 1, "warned": None}}
    parts = SimpleNamespace(cfg=PretrainConfig(micro_batch=4), per_rank=8, meta=None, optimizer=None,
                            latest=tmp_path / "latest.pt", resumed=checkpoint)
    start = loop._resume_position(run, parts)
    assert (start.step, start.micro, start.collapse) == (6, 2, {"count": 1, "warned": None})
    assert restored == [("optimizer", "O"), ("rng", "R")]
    assert parts.resumed is None  # the whole-model copy is not held while the micro-batch is measured
    fresh = loop._resume_position(run, SimpleNamespace(cfg=PretrainConfig(), per_rank=8, resumed=None))
    assert (fresh.step, fresh.micro, fresh.collapse) == (0, 8, {"count": 0, "warned": None})
