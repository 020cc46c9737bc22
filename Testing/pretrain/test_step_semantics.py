"""Pretraining keeps the step's batch semantics whatever the micro-batch, and processes back off together.

Real LiTS liver CT slices, a tiny ViT and small crops on the CPU. Stochastic depth is off in these runs: its random
block drops are drawn per forward, so they differ between a split and an unsplit step by construction.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from Testing.pretrain.test_pretrain_run import ENV, REPO, _own_home, _run, _tiny_args, _torchrun, liver  # noqa: F401

STEP_KEYS = ("loss", "dino", "ibot", "koleo", "teacher_entropy", "prototype_usage", "teacher_feature_std")


def _steps(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def _same_steps(a: list[dict], b: list[dict], tol: float = 2e-4) -> None:
    assert len(a) == len(b) >= 2
    for ra, rb in zip(a, b):
        for k in STEP_KEYS:
            assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])


@pytest.fixture(scope="module")
def whole_batch(liver):
    root, _, vol = liver
    out = root / "whole-8"
    _run(vol, out, steps=2, batch_size=8, probe_every=0, warmup_steps=0)
    return out


def test_first_steps_do_not_depend_on_the_micro_batch(liver, whole_batch):
    """Sinkhorn targets, KoLeo and the collapse statistics over the step's 8 images, not per micro-batch: the same
    losses at micro-batch 2 and 1 as with the whole batch, at step 1 (values) and step 2 (no lr warm-up: so the
    first step's update, KoLeo's gradient included, was the whole batch's too)."""
    root, _, vol = liver
    whole = _steps(whole_batch)
    for micro in (2, 1):
        out = root / f"micro-{micro}"
        _run(vol, out, steps=2, batch_size=8, probe_every=0, warmup_steps=0, micro_batch=micro)
        split = _steps(out)
        assert {r["micro_batch"] for r in split} == {micro}
        _same_steps(whole, split)


def test_two_processes_do_not_depend_on_the_micro_batch(liver):
    """The same with 2 gloo processes (4 images each): whole per-process batch vs micro-batch 1."""
    root, _, vol = liver
    runs = []
    for micro in ("null", "1"):
        out = root / f"ddp-micro-{micro}"
        args = _tiny_args(vol, out, 2, "warmup_steps=0", f"micro_batch={micro}")
        args[args.index("--batch-size") + 1] = "8"
        r = subprocess.run(_torchrun(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(_steps(out))
    _same_steps(*runs)


OOM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from meddinov3.pretrain.loop import PretrainConfig, pretrain

    calls = {"all_reduce": 0}
    plain_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        return plain_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    rank = int(os.environ["RANK"])

    def out_of_memory_once_on_rank_1(meta):
        # no GPU here: the out-of-memory that a CUDA allocation would raise is simulated, once, in rank 1's student
        backbone = meta.student["backbone"]
        plain = backbone.forward_features
        state = {"raised": False}

        def forward_features(x, masks=None):
            if rank == 1 and not state["raised"] and x.shape[0] > 2 and torch.is_grad_enabled():
                state["raised"] = True
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return plain(x, masks)

        backbone.forward_features = forward_features

    cfg = PretrainConfig.from_dict(json.loads(sys.argv[1]))
    status = pretrain(cfg, hooks={"meta": out_of_memory_once_on_rank_1})
    # one file per rank: two ranks printing to torchrun's shared stdout can interleave on one line
    Path(cfg.out, f"all_reduce_rank{rank}.json").write_text(
        json.dumps({"rank": rank, "all_reduce": calls["all_reduce"]}))
""")


def test_out_of_memory_on_one_process_halves_the_micro_batch_on_both(liver, tmp_path):
    """Rank 1 runs out of memory in its first student pass: both ranks halve together (no hang, the same number of
    all-reduce calls, the same weights) and the run finishes."""
    root, _, vol = liver
    script = tmp_path / "oom_rank.py"
    script.write_text(OOM_SCRIPT)
    out = root / "ddp-oom"
    cfg = {"size": "tiny", "model": {"depth": 2, "patch_size": 8}, "data": str(vol), "out": str(out),
           "head": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32}, "global_size": 64, "local_size": 32,
           "n_local": 2, "batch_size": 8, "steps": 2, "probe_every": 0, "log_every": 1, "device": "cpu",
           "micro_batch": 4}  # set: the automatic sizing's probe would meet the simulated out-of-memory first
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(cfg)]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"all_reduce_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [x["rank"] for x in ranks] == [0, 1]
    assert ranks[0]["all_reduce"] == ranks[1]["all_reduce"]
    assert [s["micro_batch"] for s in _steps(out)] == [2, 2]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished"
    a, b = status["rank_checksums"]
    assert a == b and np.isfinite(a)
