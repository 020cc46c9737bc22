"""DINOv3's recipe per stage: schedules where each stage starts, lr scaling, optimiser groups, prototype count."""

from __future__ import annotations

import math

import pytest
import torch

from meddinov3.config import model_config
from meddinov3.model.backbone import set_drop_path
from meddinov3.pretrain.loop import PretrainConfig, collapse_check, make_optimizer
from meddinov3.pretrain.losses import sinkhorn_knopp
from meddinov3.pretrain.meta_arch import HeadConfig, SSLMetaArch
from meddinov3.pretrain.recipe import (entropy_floor, lr_scale, prototype_warning, prototypes_for_batch,
                                       step_schedules)


def _resolved(**over) -> PretrainConfig:
    return PretrainConfig.from_dict({"steps": 300, "batch_size": 64, **over}).with_stage_defaults()


def test_stage_1_warms_up_from_dinov3_defaults():
    cfg = _resolved(stage=1)
    s = step_schedules(cfg)
    assert s["lr"][0] == 0.0 and s["lr"][30] == pytest.approx(1e-3) and s["lr"][-1] == pytest.approx(1e-6)
    assert s["teacher_temp"][0] == pytest.approx(0.04) and s["teacher_temp"][90] == pytest.approx(0.07)
    assert s["momentum"][0] == pytest.approx(0.992) and s["momentum"][-1] == pytest.approx(1.0)
    assert s["weight_decay"][-1] == pytest.approx(0.4)
    assert cfg.freeze_last_layer_steps == 1250 and "gram" not in cfg.loss_weights


def test_stages_2_and_3_do_not_rerun_stage_1s_schedules():
    """Stage 2 starts as DINOv3's Gram stage does (its warm-ups long over): constant lr 3e-5, teacher temperature
    0.07, momentum 0.999, prototypes trainable, Gram weight 2; stage 3 raises lr from 0 to 1.25e-5 over its first
    third, Gram weight 1.5."""
    s2 = _resolved(stage=2, base="x")
    sched = step_schedules(s2)
    assert sched["lr"][0] == pytest.approx(3e-5) and sched["lr"][-1] == pytest.approx(3e-5)
    assert sched["teacher_temp"] == pytest.approx([0.07] * 300) and sched["momentum"] == pytest.approx([0.999] * 300)
    assert s2.freeze_last_layer_steps == 0 and s2.loss_weights["gram"] == 2.0 and s2.local_loss_weight == 0.5
    # the local-crop weight goes from 1 to 0.5 along a half cosine over the stage's first 1000 steps (DINOv3's
    # dino.local_loss_weight_schedule); a 300-step stage stops on the way
    assert sched["local_weight"][0] == 1.0 and sched["local_weight"][299] == pytest.approx(
        0.75 + 0.25 * math.cos(math.pi * 299 / 1000))
    long = step_schedules(_resolved(stage=2, base="x", steps=3000))["local_weight"]
    assert long[500] == pytest.approx(0.75) and long[1000:] == pytest.approx([0.5] * 2000)
    assert step_schedules(_resolved(stage=1))["local_weight"] == pytest.approx([1.0] * 300)
    s3 = _resolved(stage=3, base="x")
    sched = step_schedules(s3)
    assert sched["lr"][0] == 0.0 and sched["lr"][100] == pytest.approx(1.25e-5)
    assert sched["lr"][-1] == pytest.approx(1.25e-5)
    # along a half cosine (DINOv3's schedules.lr: peak 0, end 1.25e-5, cosine_epochs 10 of 30), not a line
    assert sched["lr"][50] == pytest.approx(0.5 * 1.25e-5) and sched["lr"][25] == pytest.approx(
        1.25e-5 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert sched["local_weight"] == pytest.approx([0.5] * 300)
    assert sched["teacher_temp"][0] == pytest.approx(0.07) and sched["momentum"][0] == pytest.approx(0.999)
    assert s3.freeze_last_layer_steps == 0 and s3.loss_weights["gram"] == 1.5 and s3.local_loss_weight == 0.5
    assert _resolved(stage=1).local_loss_weight == 1.0
    # what the user sets wins
    mine = _resolved(stage=2, base="x", lr=1e-4, momentum=0.99, loss_weights={"dino": 1.0, "gram": 0.5})
    assert step_schedules(mine)["lr"][0] == pytest.approx(1e-4) and mine.momentum == 0.99
    assert mine.loss_weights["gram"] == 0.5


def test_lr_scales_with_the_global_batch_as_dinov3():
    assert lr_scale("sqrt_wrt_1024", 64) == pytest.approx(1.0)
    assert lr_scale("sqrt_wrt_1024", 1024) == pytest.approx(4.0)
    assert lr_scale("linear_wrt_256", 512) == pytest.approx(2.0) and lr_scale("none", 7) == 1.0
    assert step_schedules(_resolved(stage=2, base="x", batch_size=1024))["lr"][0] == pytest.approx(1.2e-4)
    with pytest.raises(ValueError, match="lr_scaling"):
        PretrainConfig.from_dict({"lr_scaling": "cubic"})


def _tiny_meta(depth=3) -> SSLMetaArch:
    mcfg = model_config("tiny", 1, depth=depth, patch_size=8)
    return SSLMetaArch(mcfg, HeadConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16))


def test_layerwise_lr_decay_and_patch_embedding_multiplier():
    meta = _tiny_meta(depth=3)
    opt = make_optimizer(meta, PretrainConfig(layer_decay=0.9, patch_embed_lr=0.2))
    mult = {id(p): g["lr_multiplier"] for g in opt.param_groups for p in g["params"]}
    named = dict(meta.student.named_parameters())
    assert mult[id(named["backbone.vit.patch_embed.proj.weight"])] == pytest.approx(0.2 * 0.9 ** 4)
    assert mult[id(named["backbone.vit.cls_token"])] == pytest.approx(0.9 ** 4)
    assert mult[id(named["backbone.vit.blocks.0.attn.qkv.weight"])] == pytest.approx(0.9 ** 3)
    assert mult[id(named["backbone.vit.blocks.2.mlp.fc1.weight"])] == pytest.approx(0.9)
    assert mult[id(named["backbone.vit.norm.weight"])] == 1.0 and mult[id(named["dino_head.last_layer.weight"])] == 1.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(named["backbone.vit.blocks.0.norm1.weight"]) in no_decay
    assert id(named["backbone.vit.blocks.0.attn.qkv.weight"]) not in no_decay


def test_uniform_drop_path_in_every_student_block_only_in_training():
    meta = _tiny_meta(depth=3)
    set_drop_path(meta.student["backbone"].vit, 0.3)
    rates = [blk.drop_path1.drop_prob for blk in meta.student["backbone"].vit.blocks]
    assert rates == [0.3, 0.3, 0.3]
    meta.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(meta.teacher["backbone"].forward_features(x)["cls"],
                           meta.teacher["backbone"].forward_features(x)["cls"])
    assert PretrainConfig().drop_path_rate == 0.3


def test_prototypes_sized_to_the_batch_and_warned_otherwise():
    assert prototypes_for_batch(64) == 4096 and prototypes_for_batch(1024) == 65536
    assert prototypes_for_batch(4) == 256 and prototypes_for_batch(100) == 4096
    assert _resolved(stage=1).head["out_dim"] == 4096
    assert _resolved(stage=1, head={"out_dim": 1024}).head["out_dim"] == 1024
    warning = prototype_warning(65536, 64)
    assert warning and "log(K / 2B) = 6.24" in warning and "out_dim=4096" in warning
    assert prototype_warning(4096, 64) is None


def test_sinkhorn_entropy_floor_and_a_collapse_monitor_measured_from_it():
    """Equal mass per prototype: even one-hot teacher logits give targets no sharper than log(K / 2B). The uniform
    alarm is measured from that floor: the sharpest targets a batch allows are healthy, uniform ones are not."""
    k, batch = 4096, 16
    rows = 2 * batch
    logits = torch.full((rows, k), -1.0)
    logits[torch.arange(rows), torch.arange(rows)] = 1.0  # every image its own prototype: as sharp as can be
    q = sinkhorn_knopp(logits, 0.04)
    entropy = float(-(q * q.clamp_min(1e-12).log()).sum(1).mean())
    floor = entropy_floor(k, batch)
    assert floor == pytest.approx(math.log(128)) and entropy >= floor - 1e-3
    cfg = PretrainConfig(head={"out_dim": k}, batch_size=batch, warmup_steps=0, freeze_last_layer_steps=0,
                         collapse_patience=1)
    sharp = {"teacher_feature_std": 0.7, "prototype_usage": 0.9, "teacher_entropy": entropy}
    assert collapse_check(sharp, {"count": 0}, cfg, 5) is None
    uniform = dict(sharp, teacher_entropy=math.log(k) - 1e-4)
    assert "uniform teacher targets" in collapse_check(uniform, {"count": 0}, cfg, 5)


def test_gram_products_stay_fp32_under_bf16_autocast():
    """Patch similarities of a slightly perturbed teacher differ in the third decimal: bf16 Gram products would
    swamp the anchoring signal."""
    from meddinov3.pretrain.losses import GramLoss

    torch.manual_seed(0)
    student = torch.randn(2, 64, 32)
    teacher = student + 0.05 * torch.randn_like(student)
    ref = GramLoss()(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = GramLoss()(student, teacher)
    assert under.dtype == torch.float32 and torch.allclose(under, ref, rtol=1e-5), (float(under), float(ref))


def test_dino_local_crop_pairs_weighted_as_dinov3():
    """DINOv3: global_scale * mean(global pairs) + local_scale * w * mean(local pairs), scales = share of pairs."""
    from meddinov3.pretrain.losses import DINOLoss

    torch.manual_seed(0)
    students = [torch.randn(4, 16) for _ in range(2 + 3)]
    teachers = [torch.softmax(torch.randn(4, 16), -1) for _ in range(2)]
    loss = DINOLoss(16)

    def ce(s, t):
        return float(-(t * torch.log_softmax(s / 0.1, -1)).sum(-1).mean())

    global_pairs = [ce(students[i], teachers[1 - i]) for i in range(2)]
    local_pairs = [ce(students[i], t) for i in range(2, 5) for t in teachers]
    expected = (sum(global_pairs) + 0.5 * sum(local_pairs)) / 8
    assert float(loss(students, teachers, local_weight=0.5)) == pytest.approx(expected, rel=1e-5)
    assert float(loss(students, teachers)) == pytest.approx((sum(global_pairs) + sum(local_pairs)) / 8, rel=1e-5)
