"""CUDA out-of-memory back-off, simulated on the CPU: the micro-batch halves and the step count is unchanged."""

from __future__ import annotations

import io
import json

import torch

from meddinov3.model.network import MedDINOv3
from meddinov3.train import TrainConfig, train

from ._datasets import phantom_dataset


def test_oom_halves_micro_batch_and_continues(tmp_path, monkeypatch):
    ds = phantom_dataset(tmp_path / "ds", n=2, shape=(6, 32, 32))
    real_forward = MedDINOv3.forward

    def forward(self, x):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, x)

    monkeypatch.setattr(MedDINOv3, "forward", forward)
    cfg = TrainConfig(data=str(ds), out=str(tmp_path / "run"), size="tiny", model={"depth": 1}, steps=3,
                      batch_size=4, val_fraction=0, cache_dir=str(tmp_path / "cache"), log_every=1,
                      patch_size=[32, 32], device="cpu")
    stream = io.StringIO()
    status = train(cfg, json_progress=True, stream=stream)
    evs = [json.loads(x) for x in stream.getvalue().splitlines()]
    ooms = [e for e in evs if e["event"] == "oom"]
    assert [e["micro_batch"] for e in ooms] == [2, 1] and ooms[-1]["accumulation"] == 4
    assert status["state"] == "finished" and status["step"] == 3
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batch"] for r in steps if r["kind"] == "step"] == [1, 1, 1]
