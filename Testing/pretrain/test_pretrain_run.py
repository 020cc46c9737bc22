"""End-to-end pretraining on the real LiTS liver CT slices (tiny ViT, small heads and crops, CPU).

Stages 1-3 reduce their loss, the collapse detector fires on a collapsed backbone and not on the normal run,
kill -9 + --resume continues at the same step, 2-process DDP and FSDP (gloo) ranks agree, an FSDP checkpoint
resumes under FSDP and in one process, and the exported backbone fine-tunes through `meddinov3 train --base RUN_DIR`.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

TINY = {"size": "tiny", "model": {"depth": 2, "patch_size": 8},
        "head": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "nlayers": 3},
        "global_size": 64, "local_size": 32, "n_local": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
        "teacher_temp_warmup_steps": 4, "log_every": 1, "seed": 0,
        # what these few-step runs were tuned for: unscaled lr, no stochastic depth, prototypes frozen throughout
        "lr_scaling": "none", "drop_path_rate": 0.0, "freeze_last_layer_steps": 1250}
SETS = ['model={"depth": 2, "patch_size": 8}', 'head={"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32}',
        "global_size=64", "local_size=32", "n_local=2", "lr=1e-3", "warmup_steps=2", "log_every=1", "probe_every=0",
        'lr_scaling="none"', "drop_path_rate=0.0", "freeze_last_layer_steps=1250"]


@pytest.fixture(scope="module", autouse=True)
def _own_home(tmp_path_factory):
    """The runs' default slice-shard store (MEDDINOV3_HOME/cache) in a temporary folder, here and in children."""
    home = str(tmp_path_factory.mktemp("meddinov3-home"))
    saved = os.environ.get("MEDDINOV3_HOME")
    os.environ["MEDDINOV3_HOME"] = ENV["MEDDINOV3_HOME"] = home
    yield home
    ENV.pop("MEDDINOV3_HOME")
    if saved is None:
        os.environ.pop("MEDDINOV3_HOME")
    else:
        os.environ["MEDDINOV3_HOME"] = saved


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def _run(data, out, resume=False, hooks=None, **over):
    from meddinov3.pretrain.loop import PretrainConfig, pretrain

    cfg = PretrainConfig.from_dict({**TINY, "data": str(data), "out": str(out), "device": "cpu", **over})
    stream = io.StringIO()
    status = pretrain(cfg, resume=resume, json_progress=True, stream=stream, hooks=hooks)
    return status, _events(stream.getvalue())


def _losses(out: Path) -> list[float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "step"]


def _cli(args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "meddinov3.cli", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kw)


def _torchrun(args: list[str]) -> list[str]:
    """`meddinov3 <args>` as 2 CPU processes under torchrun (gloo), on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "meddinov3.cli", *args]


def _tiny_args(vol, out, steps: int, *sets: str) -> list[str]:
    """`pretrain` arguments of the tiny CPU run (SETS plus ``sets``)."""
    return ["pretrain", "--data", str(vol), "--out", str(out), "--size", "tiny", "--steps", str(steps),
            "--batch-size", "4", "--device", "cpu", "--json-progress", "--set", *SETS, *sets]


@pytest.fixture(scope="module")
def liver(tmp_path_factory):
    """The demo training half of the liver CT as one NIfTI volume, and a dataset with both halves."""
    from Testing.train._datasets import liver_dataset

    root = tmp_path_factory.mktemp("pretrain")
    ds = liver_dataset(root / "dataset")
    return root, ds, ds / "imagesTr" / "liver117_train_0000.nii.gz"


@pytest.fixture(scope="module")
def stage1(liver):
    root, _, vol = liver
    out = root / "stage1"
    status, ev = _run(vol, out, steps=8, checkpoint_every=4, probe_every=4, keep_every=4)
    return out, status, ev


def test_stage1_writes_run_and_reduces_loss(stage1):
    out, status, ev = stage1
    for name in ("config.json", "checkpoints/latest.pt", "metrics.jsonl", "curves.png", "status.json",
                 "backbone/model.json", "slices/index.npy"):
        assert (out / name).exists(), name
    assert status["state"] == "finished" and status["step"] == 8
    names = [e["event"] for e in ev]
    assert names[0] == "started" and names[-1] == "finished"
    assert {"step", "probe", "checkpoint"} <= set(names)
    assert "collapse_warning" not in names and status.get("collapse") is None
    step = next(e for e in ev if e["event"] == "step")
    for k in ("loss", "dino", "ibot", "koleo", "lr", "images_per_s", "teacher_entropy", "teacher_feature_std"):
        assert k in step
    losses = _losses(out)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["model"]["depth"] == 2 and cfg["resolved"]["global_size"] == 64
    probes = [e for e in ev if e["event"] == "probe"]
    assert 0.0 <= probes[-1]["probe_accuracy"] <= 1.0


def test_exported_backbone_loads_as_teacher(stage1):
    from meddinov3.checkpoints import load_backbone

    out, _, _ = stage1
    mcfg, sd, spec = load_backbone(out)
    assert spec.kind == "backbone" and mcfg.depth == 2
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    t = state["meta"]["teacher.backbone.vit.patch_embed.proj.weight"]
    assert torch.equal(sd["vit.patch_embed.proj.weight"], t)


def test_stage2_gram_and_stage3_highres_reduce_loss(stage1, liver):
    root, _, vol = liver
    out2 = root / "stage2"
    status, ev = _run(vol, out2, base=str(stage1[0]), stage=2, steps=6, size=None, lr=5e-4, local_weight_steps=4)
    assert status["state"] == "finished"
    # the DINO local-crop weight goes from 1 to 0.5 along a half cosine (here over 4 steps), step by step
    weights = [e["local_weight"] for e in ev if e["event"] == "step"]
    assert weights == pytest.approx([1.0, 0.5 + 0.25 * (1 + math.cos(math.pi / 4)), 0.75,
                                     0.5 + 0.25 * (1 + math.cos(3 * math.pi / 4)), 0.5, 0.5])
    step = next(e for e in ev if e["event"] == "step")
    assert "gram" in step and step["gram"] >= 0
    # stage 2 starts where DINOv3's Gram stage starts, not with stage 1's warm-ups
    assert step["teacher_temp"] == pytest.approx(0.07) and step["momentum"] == pytest.approx(0.999)
    assert json.loads((out2 / "config.json").read_text())["pretrain"]["loss_weights"]["gram"] == 2.0
    started = ev[0]
    assert started["base"]["kind"] == "pretrain-run"
    losses = _losses(out2)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

    # the volumes were read once: both runs index the same shards of the shared store, neither holds a copy
    index1 = json.loads((stage1[0] / "slices" / "index.json").read_text())["volumes"]
    index2 = json.loads((out2 / "slices" / "index.json").read_text())["volumes"]
    assert [v["shard"] for v in index2] == [v["shard"] for v in index1]
    assert Path(index2[0]["shard"]).is_file() and Path(index2[0]["shard"]).parent != out2 / "slices"
    assert sorted(p.name for p in (out2 / "slices").iterdir()) == ["index.json", "index.npy"]

    out3 = root / "stage3"
    status, ev = _run(vol, out3, base=str(out2), stage=3, steps=5, size=None, lr=5e-4, highres_scale=0.125)
    assert status["state"] == "finished"
    # DINOv3's high-resolution mix (global 512/768, local 112..336, Gram 1.5x) scaled by 1/8, one pair per step
    resolved = json.loads((out3 / "config.json").read_text())["resolved"]
    assert resolved["resolutions"] == [[64, 16, 0.3, 96], [96, 16, 0.3, 144], [96, 24, 0.3, 144], [96, 32, 0.05, 144],
                                       [96, 40, 0.05, 144]]
    assert {e["global_size"] for e in ev if e["event"] == "step"} == {64, 96}
    step = next(e for e in ev if e["event"] == "step")
    assert "gram" in step and step["teacher_temp"] == pytest.approx(0.07) and step["momentum"] == pytest.approx(0.999)
    losses = _losses(out3)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_gram_teacher_from_a_kept_snapshot_at_twice_the_resolution(stage1, liver):
    """Stage 1 keeps checkpoints/step_NNNNNNN.pt; stage 2 takes its Gram teacher from such an earlier snapshot (not
    from the teacher at the stage's start), sees clean crops at 2x the global size, and refreshes it from the EMA
    teacher as configured."""
    root, _, vol = liver
    kept = stage1[0] / "checkpoints"
    assert sorted(p.name for p in kept.glob("step_*.pt")) == ["step_0000004.pt", "step_0000008.pt"]
    snapshot, latest = (torch.load(kept / name, weights_only=False) for name in ("step_0000004.pt", "latest.pt"))
    assert snapshot["step"] == 4 and latest["step"] == 8
    out = root / "stage2-snapshot"
    status, _ = _run(vol, out, base=str(stage1[0]), stage=2, steps=2, size=None,
                     gram_teacher=str(kept / "step_0000004.pt"))
    assert status["state"] == "finished"
    gram = {k[len("gram_teacher."):]: v for k, v in _meta(out)["meta"].items() if k.startswith("gram_teacher.")}
    prefix = "teacher.backbone."
    teacher_at = {k[len(prefix):]: v for k, v in snapshot["meta"].items() if k.startswith(prefix)}
    assert gram.keys() == teacher_at.keys()
    assert all(torch.equal(gram[k], teacher_at[k]) for k in gram)
    assert any(not torch.equal(gram[k], latest["meta"]["teacher.backbone." + k]) for k in gram)
    assert json.loads((out / "config.json").read_text())["resolved"]["gram_size"] == 128

    refreshes = []

    def count_refreshes(meta):
        plain = meta.refresh_gram
        meta.refresh_gram = lambda: (refreshes.append(1), plain())

    _run(vol, root / "stage2-refresh", base=str(stage1[0]), stage=2, steps=3, size=None, gram_refresh_every=1,
         gram_max_refreshes=2, hooks={"meta": count_refreshes})
    assert len(refreshes) == 2


def test_next_stage_takes_over_the_base_runs_heads(stage1, liver):
    """`pretrain --base STAGE1_RUN --stage 2` with no head option continues with stage 1's (non-default) heads;
    asking for other heads is a one-line error."""
    root, _, vol = liver
    common = ["pretrain", "--data", str(vol), "--base", str(stage1[0]), "--stage", "2", "--steps", "2",
              "--batch-size", "4", "--device", "cpu", "--json-progress", "--set", "global_size=64",
              "local_size=32", "n_local=2", "probe_every=0"]
    r = _cli([*common[:3], "--out", str(root / "stage2-heads"), *common[3:]])
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((root / "stage2-heads" / "config.json").read_text())["pretrain"]["head"]
    assert saved == TINY["head"]
    r = _cli([*common[:3], "--out", str(root / "stage2-other"), *common[3:], 'head={"out_dim": 128}'])
    assert r.returncode == 2
    assert "its heads" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_collapse_detector_fires_on_constant_backbone(liver):
    root, _, vol = liver

    def collapse(meta):
        for part in (meta.student, meta.teacher):
            bb = part["backbone"]
            orig = bb.forward_features
            bb.forward_features = lambda x, masks=None, _o=orig: _o(torch.zeros_like(x), masks)

    status, ev = _run(vol, root / "collapsed", hooks={"meta": collapse}, steps=4, collapse_patience=2,
                      centering="none", teacher_temp=1e-3, warmup_teacher_temp=1e-3)
    warn = [e for e in ev if e["event"] == "collapse_warning"]
    assert warn and warn[0]["step"] == 2 and warn[0]["teacher_feature_std"] < 1e-6
    assert status["collapse"]["step"] == 2
    assert json.loads((root / "collapsed" / "status.json").read_text())["collapse"]["step"] == 2


@pytest.mark.slicer_python
def test_kill9_then_resume_continues_at_same_step(liver):
    root, _, vol = liver
    out = root / "killed"
    args = _tiny_args(vol, out, 6, "checkpoint_every=2")
    p = subprocess.Popen([sys.executable, "-m", "meddinov3.cli", *args], cwd=REPO, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    ckpt_step = None
    for line in p.stdout:
        e = json.loads(line)
        if e["event"] == "checkpoint" and e["step"] >= 4:
            ckpt_step = e["step"]
            os.kill(p.pid, signal.SIGKILL)
            break
        assert time.time() < deadline
    p.wait(timeout=30)
    assert ckpt_step is not None
    from meddinov3.runs import RunStatus, run_state

    assert run_state(RunStatus.read(out)) == "killed"  # status.json says "running" with the dead pid
    r = _cli(["pretrain", "--out", str(out), "--resume", "--json-progress", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"the pretrain process (pid {p.pid}) was killed at step" in r.stderr and "resuming" in r.stderr
    ev = _events(r.stdout)
    started = ev[0]
    assert started["event"] == "started" and started["resumed"] and started["step"] >= ckpt_step
    steps = [e["step"] for e in ev if e["event"] == "step"]
    assert steps[0] == started["step"] + 1 and steps[-1] == 6
    recs = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs == list(range(1, 7))
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def _sigterm_after_first_step(cmd: list[str]) -> tuple[int, str, str]:
    """Run `cmd` (JSON progress on stdout), send SIGTERM at its first step event: (exit code, rest of stdout,
    stderr)."""
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if json.loads(line)["event"] == "step":
            p.send_signal(signal.SIGTERM)
            break
    rest, err = p.communicate(timeout=120)
    return p.returncode, rest, err


def test_sigterm_saves_and_exits_zero_then_resumes_without_the_volumes(liver):
    root, _, vol = liver
    own = root / "sigterm-data" / vol.name
    own.parent.mkdir()
    shutil.copy(vol, own)
    out = root / "sigterm"
    args = _tiny_args(own, out, 12, "checkpoint_every=100")
    code, rest, _ = _sigterm_after_first_step([sys.executable, "-m", "meddinov3.cli", *args])
    assert code == 0
    assert any(e["event"] == "stopped" for e in _events(rest))
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "stopped" and (out / "checkpoints" / "latest.pt").exists()
    own.unlink()  # the index holds the slices: resuming must not need the volumes again
    r = _cli(["pretrain", "--out", str(out), "--resume", "--json-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert _events(r.stdout)[-1]["event"] == "finished"


FSDP_STEPS = 4


@pytest.fixture(scope="module")
def ddp(liver):
    """A finished 2-process DDP run of FSDP_STEPS steps: (run folder, events)."""
    root, _, vol = liver
    out = root / "ddp"
    r = subprocess.run(_torchrun(_tiny_args(vol, out, FSDP_STEPS)), cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, _events(r.stdout)


def test_ddp_two_cpu_processes_agree(ddp):
    out, ev = ddp
    fin = next(e for e in ev if e["event"] == "finished")
    a, b = fin["rank_checksums"]
    assert a == b
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2 and cfg["resolved"]["per_rank_batch"] == 2
    assert cfg["resolved"]["parallel"] == "ddp"


@pytest.fixture(scope="module")
def fsdp_stopped(liver):
    """A 2-process FSDP run of the same config stopped (SIGTERM to torchrun, forwarded to both ranks) after its
    first step, and a copy of it: (run folder, copy, step of its checkpoint)."""
    root, _, vol = liver
    out = root / "fsdp"
    _, rest, err = _sigterm_after_first_step(_torchrun(_tiny_args(vol, out, FSDP_STEPS, "parallel=fsdp")))
    stopped = next((e for e in _events(rest) if e["event"] == "stopped"), None)
    assert stopped is not None, err[-3000:]
    assert 1 <= stopped["step"] < FSDP_STEPS
    shutil.copytree(out, root / "fsdp_copy")
    return out, root / "fsdp_copy", stopped["step"]


def _meta(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)


def test_fsdp_two_cpu_processes_resume_and_match_ddp(fsdp_stopped, ddp):
    out, _, at = fsdp_stopped
    assert _meta(out)["step"] == at
    r = subprocess.run(_torchrun(["pretrain", "--out", str(out), "--resume", "--json-progress", "--device", "cpu"]),
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = _events(r.stdout)
    assert ev[0]["event"] == "started" and ev[0]["resumed"] and ev[0]["step"] == at
    assert [e["step"] for e in ev if e["event"] == "step"] == list(range(at + 1, FSDP_STEPS + 1))
    fin = next(e for e in ev if e["event"] == "finished")
    a, b = fin["rank_checksums"]  # sums of the gathered (full) student weights on each rank
    assert a == b and np.isfinite(a)
    assert all(np.isfinite(x) for x in _losses(out))
    assert (out / "backbone" / "model.json").exists()
    assert json.loads((out / "config.json").read_text())["resolved"]["parallel"] == "fsdp"
    # same file layout as DDP (full tensors, optimiser state keyed by parameter id) ...
    f, d = _meta(out), _meta(ddp[0])
    assert f["meta"].keys() == d["meta"].keys() and f["optimizer"]["state"].keys() == d["optimizer"]["state"].keys()
    assert [g["params"] for g in f["optimizer"]["param_groups"]] == [g["params"] for g in d["optimizer"]["param_groups"]]
    # ... and the same weights: stopped + resumed FSDP vs an uninterrupted DDP run from the same seed
    diff = max(float((f["meta"][k] - d["meta"][k]).abs().max()) for k in d["meta"])
    assert diff < 1e-4, diff


def test_fsdp_checkpoint_resumes_in_one_process(fsdp_stopped):
    from meddinov3.pretrain.loop import PretrainConfig, pretrain

    _, out, at = fsdp_stopped
    stream = io.StringIO()
    status = pretrain(PretrainConfig(out=str(out), device="cpu"), resume=True, json_progress=True, stream=stream)
    ev = _events(stream.getvalue())
    assert ev[0]["resumed"] and ev[0]["step"] == at and ev[0]["world_size"] == 1
    assert status["state"] == "finished" and status["step"] == FSDP_STEPS
    assert [e["step"] for e in ev if e["event"] == "step"] == list(range(at + 1, FSDP_STEPS + 1))
    assert all(np.isfinite(x) for x in _losses(out))


def test_exported_backbone_finetunes_with_train(stage1, liver, tmp_path):
    root, ds, _ = liver
    r = _cli(["train", "--data", str(ds), "--out", str(tmp_path / "ft"), "--base", str(stage1[0]), "--steps", "2",
              "--steps-per-epoch", "2", "--batch-size", "2", "--val-cases", "liver117_heldout", "--device", "cpu",
              "--set", f"cache_dir={json.dumps(str(tmp_path / 'cache'))}", 'augment={"enabled": false}',
              "patch_size=[64, 64]"], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["resolved"]["base"]["base_kind"] == "backbone"
    assert (tmp_path / "ft" / "model" / "model.json").exists()


def test_collapse_check_flags_uniform_targets_once_prototypes_train():
    """Uniform teacher targets (entropy ~ log K) are expected while the prototypes are frozen; afterwards they are
    the fixed point in which the DINO term teaches nothing, and the monitor says so once."""
    from meddinov3.pretrain.loop import PretrainConfig, collapse_check

    cfg = PretrainConfig(head={"out_dim": 1024}, warmup_steps=10, freeze_last_layer_steps=20, collapse_patience=3)
    uniform = {"teacher_feature_std": 0.7, "prototype_usage": 0.99, "teacher_entropy": math.log(1024) - 1e-4}
    healthy = dict(uniform, teacher_entropy=0.95 * math.log(1024))
    state = {"count": 0}
    assert [collapse_check(uniform, state, cfg, s) for s in range(1, 21)] == [None] * 20  # frozen prototypes
    reasons = [collapse_check(uniform, state, cfg, s) for s in range(21, 26)]
    assert reasons[:2] == [None, None] and "uniform teacher targets" in reasons[2] and reasons[3:] == [None, None]
    state = {"count": 0}
    assert all(collapse_check(healthy, state, cfg, s) is None for s in range(1, 40))


def test_resume_of_a_finished_run_does_nothing_and_refuses_changed_options(stage1):
    out = stage1[0]
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = _cli(["pretrain", "--out", str(out), "--resume", "--json-progress", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    ev = _events(r.stdout)
    assert len(ev) == 1 and ev[0]["event"] == "finished" and ev[0]["already_finished"] and ev[0]["step"] == 8
    r = _cli(["pretrain", "--out", str(out), "--resume", "--steps", "16"])
    assert r.returncode == 2
    assert "--resume continues the saved configuration" in r.stderr and "steps 16 (saved: 8)" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files


def test_bad_base_and_foreign_folder_are_refused_before_indexing(liver, tmp_path):
    _, _, vol = liver
    run = tmp_path / "run"
    r = _cli([*_tiny_args(vol, run, 2), "--base", str(tmp_path / "missing.pth")])
    error = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "missing.pth: unknown model" in error and error.count("missing.pth") == 1
    assert not (run / "slices").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = _cli(_tiny_args(vol, other, 2))
    assert r.returncode == 2 and f"{other}: not empty (notes.txt)" in r.stderr
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
