"""Behavioural tests for the pretraining head, losses and schedules (CPU, seconds)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddinov3.pretrain.heads import DINOHead
from meddinov3.pretrain.losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp
from meddinov3.pretrain.schedules import cosine_schedule


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


# ---------------------------------------------------------------- head
def test_head_logits_are_cosines_and_prototype_scale_is_irrelevant():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=50, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    x = torch.randn(7, 32) * 10
    out = head(x)
    assert out.shape == (7, 50)
    assert out.abs().max() <= 1.0 + 1e-5
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(50, 1) * 5 + 0.1)  # rescale each prototype row
    torch.testing.assert_close(head(x), out)
    assert not any("weight_g" in n or "weight_v" in n for n, _ in head.named_parameters())


def test_head_single_layer_and_token_shapes():
    head = DINOHead(8, out_dim=12, bottleneck_dim=4, nlayers=1)
    assert head(torch.randn(2, 5, 8)).shape == (2, 5, 12)


# ---------------------------------------------------------------- DINO
def test_dino_loss_minimal_when_student_matches_teacher():
    torch.manual_seed(0)
    loss_fn = DINOLoss(out_dim=64, student_temp=0.1)
    teacher = [F.softmax(torch.randn(16, 64) / 0.3, -1) for _ in range(2)]
    # student logits whose tempered softmax equals the *other* view's teacher distribution
    matched = [0.1 * teacher[1].log(), 0.1 * teacher[0].log()]
    loss = loss_fn(matched, teacher)
    expected = (_entropy(teacher[0]) + _entropy(teacher[1])) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    random_student = [torch.randn(16, 64) for _ in range(2)]
    assert loss_fn(random_student, teacher) > loss + 0.5


def test_dino_loss_pairs_skip_same_view_and_average():
    torch.manual_seed(1)
    loss_fn = DINOLoss(out_dim=10, student_temp=0.1)
    t = [F.softmax(torch.randn(4, 10), -1) for _ in range(2)]
    s = [torch.randn(4, 10) for _ in range(5)]  # 2 global + 3 local

    def ce(si, ti):
        return -(ti * F.log_softmax(si / 0.1, -1)).sum(-1).mean()

    pairs = [ce(s[i], t[j]) for i in range(5) for j in range(2) if i != j]
    assert len(pairs) == 8
    torch.testing.assert_close(loss_fn(s, t), torch.stack(pairs).mean())


def test_centering_removes_a_constant_collapse():
    loss_fn = DINOLoss(out_dim=32, center_momentum=0.9)
    collapsed = torch.zeros(8, 32)
    collapsed[:, 3] = 5.0  # every sample votes for prototype 3
    before = loss_fn.softmax_center_teacher(collapsed, teacher_temp=0.04)
    assert before[:, 3].min() > 0.99
    for _ in range(200):
        loss_fn.update_center(collapsed)
    after = loss_fn.softmax_center_teacher(collapsed, teacher_temp=0.04)
    torch.testing.assert_close(after, torch.full_like(after, 1 / 32), atol=1e-3, rtol=0)
    # the centre is the EMA: one step from zero moves it by (1 - momentum) * batch mean
    fresh = DINOLoss(out_dim=32)
    fresh.update_center(collapsed)
    torch.testing.assert_close(fresh.center[0, 3], torch.tensor(0.5))


def test_sinkhorn_balances_prototypes_and_samples():
    torch.manual_seed(0)
    # cosine logits, as the head produces, with one dominant prototype
    logits = F.normalize(torch.randn(64, 8), dim=-1) @ F.normalize(torch.randn(16, 8), dim=-1).t()
    logits[:, 0] += 0.5
    assert F.softmax(logits / 0.07, -1).sum(0)[0] > 5 * 64 / 16  # plain softmax: far from balanced
    loss_fn = DINOLoss(out_dim=16)
    q3 = loss_fn.sinkhorn_knopp_teacher(logits, teacher_temp=0.07)  # the default 3 iterations
    assert q3.sum(0).max() < 2 * 64 / 16
    q = loss_fn.sinkhorn_knopp_teacher(logits, teacher_temp=0.07, n_iterations=10)
    assert q.shape == (64, 16)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64), atol=1e-4, rtol=0)  # each sample sums to 1
    torch.testing.assert_close(q.sum(0), torch.full((16,), 64 / 16), rtol=0.1, atol=0)  # equal mass


def test_sinkhorn_is_stable_for_large_logits():
    # a large common offset would overflow exp() without the max subtraction
    q = sinkhorn_knopp(torch.rand(8, 5) * 2 - 1 + 1000.0, temp=0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(8), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- iBOT
def _ibot_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, k = 3, 10, 8
    s = torch.randn(b, n, k, generator=g)
    t = F.softmax(torch.randn(b, n, k, generator=g) / 0.2, -1)
    masks = torch.zeros(b, n, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, 3:9] = True  # image 2 unmasked
    return s, t, masks


def test_ibot_ignores_unmasked_patches():
    s, t, masks = _ibot_inputs()
    loss_fn = iBOTPatchLoss(patch_out_dim=8)
    base = loss_fn(s, t, masks)
    s2, t2 = s.clone(), t.clone()
    s2[~masks] = torch.randn(int((~masks).sum()), 8) * 50
    t2[~masks] = F.softmax(torch.randn(int((~masks).sum()), 8), -1)
    torch.testing.assert_close(loss_fn(s2, t2, masks), base)
    s3 = s.clone()
    s3[masks] += torch.randn(int(masks.sum()), 8) * 5
    assert not torch.allclose(loss_fn(s3, t, masks), base)
    # the gathered form gives the same value
    torch.testing.assert_close(loss_fn.forward_masked(s[masks], t[masks], masks), base)


def test_ibot_weights_each_image_equally():
    s, t, masks = _ibot_inputs()
    loss_fn = iBOTPatchLoss(patch_out_dim=8, student_temp=0.1)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)  # (B, N)
    per_image = [ce[i][masks[i]].mean() for i in range(2)]  # images with masks
    expected = (per_image[0] + per_image[1]) / 3  # divided by the batch size
    torch.testing.assert_close(loss_fn(s, t, masks), expected)
    # padded inputs: n_masked_patches drops the tail
    sm, tm = s[masks], t[masks]
    padded = loss_fn.forward_masked(torch.cat([sm, torch.randn(4, 8)]), torch.cat([tm, tm[:4]]),
                                    masks, n_masked_patches=sm.shape[0],
                                    masks_weight=torch.cat([torch.full((2,), 0.5), torch.full((6,), 1 / 6),
                                                            torch.ones(4)]))
    torch.testing.assert_close(padded, expected)


def test_ibot_centering_and_sinkhorn():
    loss_fn = iBOTPatchLoss(patch_out_dim=6)
    tokens = torch.zeros(2, 5, 6)
    tokens[..., 1] = 4.0
    for _ in range(200):
        loss_fn.update_center(tokens)
    p = loss_fn.softmax_center_teacher(tokens, 0.04)
    torch.testing.assert_close(p, torch.full_like(p, 1 / 6), atol=1e-3, rtol=0)
    q = loss_fn.sinkhorn_knopp_teacher(torch.rand(30, 6) * 2 - 1, 0.07, n_masked_patches=30, n_iterations=10)
    torch.testing.assert_close(q.sum(1), torch.ones(30), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((6,), 5.0), rtol=0.1, atol=0)


# ---------------------------------------------------------------- KoLeo
def test_koleo_prefers_spread_points_and_handles_duplicates():
    torch.manual_seed(0)
    koleo = KoLeoLoss()
    spread = torch.eye(8)  # orthogonal: nearest-neighbour distance sqrt(2)
    clustered = torch.ones(8, 8) + 0.01 * torch.randn(8, 8)
    assert koleo(spread) < koleo(clustered)
    torch.testing.assert_close(koleo(spread), torch.tensor(-math.log(math.sqrt(2))), atol=1e-5, rtol=0)
    # scale-invariant (features are L2-normalised first)
    torch.testing.assert_close(koleo(spread * 7), koleo(spread))
    dup = torch.randn(4, 16).repeat(2, 1).requires_grad_(True)
    val = koleo(dup)
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(dup.grad).all()


def test_koleo_gradient_spreads_points():
    torch.manual_seed(0)
    x = (torch.ones(16, 4) + 0.1 * torch.randn(16, 4)).requires_grad_(True)
    koleo = KoLeoLoss()
    opt = torch.optim.SGD([x], lr=0.05)
    start = koleo(x).item()
    for _ in range(30):
        opt.zero_grad()
        koleo(x).backward()
        opt.step()
    assert koleo(x).item() < start - 0.5


# ---------------------------------------------------------------- Gram
def test_gram_zero_for_identical_and_scale_invariant():
    torch.manual_seed(0)
    feats = torch.randn(2, 12, 16)
    gram = GramLoss(apply_norm=True)
    assert gram(feats, feats).item() == pytest.approx(0.0, abs=1e-7)
    scaled = feats * (torch.rand(2, 12, 1) * 10 + 0.1)  # per-token scaling
    assert gram(scaled, feats).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.randn(2, 12, 16)
    assert gram(other, feats).item() > 1e-3
    # without normalisation scaling does matter
    assert GramLoss(apply_norm=False)(scaled, feats).item() > 1e-2


def test_gram_matches_manual_and_only_student_gets_gradients():
    torch.manual_seed(0)
    s = torch.randn(2, 6, 8, requires_grad=True)
    t = torch.randn(2, 6, 8, requires_grad=True)
    loss = GramLoss()(s, t)
    sn, tn = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    manual = ((sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    # batch-level Gram: a (B*N) x (B*N) matrix, differs from per-image
    assert not torch.allclose(GramLoss(img_level=False)(s, t), loss)
    # remove_neg: negative similarities no longer count
    assert GramLoss(remove_neg=True)(s, t) <= loss


# ---------------------------------------------------------------- schedules
def test_cosine_schedule_endpoints_and_warmup():
    s = cosine_schedule(1e-3, 1e-6, total_iters=100, warmup_iters=10, start_warmup=0.0)
    assert s.shape == (100,)
    assert s[0] == 0.0
    assert s[10] == pytest.approx(1e-3)
    assert s[-1] == pytest.approx(1e-6)
    assert np.all(np.diff(s[:11]) > 0) and np.all(np.diff(s[10:]) <= 0)
    assert s.max() == pytest.approx(1e-3)
    mom = cosine_schedule(0.992, 1.0, 50)
    assert mom[0] == pytest.approx(0.992) and mom[-1] == pytest.approx(1.0)
    temp = cosine_schedule(0.07, 0.07, 40, warmup_iters=30, start_warmup=0.04)
    assert temp[0] == pytest.approx(0.04) and np.allclose(temp[30:], 0.07)
    assert np.all(np.diff(temp[:31]) > 0)
    short = cosine_schedule(1.0, 0.0, 5, warmup_iters=10)  # a run shorter than its warm-up stops in it
    assert short == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    half = cosine_schedule(0.5, 0.5, 20, warmup_iters=10, start_warmup=1.0, warmup_shape="cosine")
    assert half[0] == 1.0 and half[5] == pytest.approx(0.75) and half[10:] == pytest.approx([0.5] * 10)
    assert np.all(np.diff(half[:11]) < 0)
    with pytest.raises(ValueError, match="warmup_shape"):
        cosine_schedule(1.0, 0.0, 5, warmup_shape="step")


# ---------------------------------------------------------------- end to end
def test_tiny_dino_koleo_training_reduces_loss():
    """Student MLP + head, EMA teacher, Sinkhorn targets, DINO + 0.1 KoLeo, 50 steps.

    In self-distillation the raw loss is not monotone: the targets move, and the teacher
    entropy (a floor the student cannot go below) rises as the collapsed random-init teacher
    is de-collapsed. So the check is on the part the student controls: the divergence
    (DINO loss - teacher entropy) must fall, KoLeo must fall (features spread), and the
    trained student must score a lower total loss than the untrained one against the same
    final teacher targets on held-out vectors. A sign error or a broken gradient fails it.
    (Checked over seeds 0-5. It tests the mechanics, not representation quality: on random
    vectors the toy teacher drifts towards high-entropy outputs within 50 steps.)
    """
    torch.manual_seed(0)
    dim, k, steps = 16, 32, 50
    student = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    s_head = DINOHead(32, out_dim=k, hidden_dim=32, bottleneck_dim=16)
    teacher, t_head = copy.deepcopy(student), copy.deepcopy(s_head)
    initial_student, initial_head = copy.deepcopy(student), copy.deepcopy(s_head)
    for p in list(teacher.parameters()) + list(t_head.parameters()):
        p.requires_grad_(False)
    dino, koleo = DINOLoss(out_dim=k, student_temp=0.1), KoLeoLoss()
    params = list(student.parameters()) + list(s_head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    mom = cosine_schedule(0.99, 1.0, steps)
    temp = cosine_schedule(0.04, 0.04, steps)
    data = torch.randn(256, dim)
    g = torch.Generator().manual_seed(0)

    def two_views(x: torch.Tensor) -> list[torch.Tensor]:
        return [x + 0.1 * torch.randn(x.shape, generator=g) for _ in range(2)]

    def total_loss(net, head, views, t_probs):
        feats = [net(v) for v in views]
        return dino([head(f) for f in feats], t_probs) + 0.1 * sum(koleo(f) for f in feats) / 2

    divergence, koleo_values = [], []
    for it in range(steps):
        views = two_views(data[torch.randint(0, 256, (64,), generator=g)])
        with torch.no_grad():
            t_probs = [dino.sinkhorn_knopp_teacher(t_head(teacher(v)), float(temp[it])) for v in views]
        feats = [student(v) for v in views]
        d = dino([s_head(f) for f in feats], t_probs)
        kl = sum(koleo(f) for f in feats) / 2
        loss = d + 0.1 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for ps, pt in zip(params, list(teacher.parameters()) + list(t_head.parameters())):
                pt.mul_(mom[it]).add_(ps.detach(), alpha=1 - mom[it])
        assert math.isfinite(loss.item())
        divergence.append(d.item() - float(sum(_entropy(p) for p in t_probs) / 2))
        koleo_values.append(kl.item())
    assert np.mean(divergence[-10:]) < 0.5 * np.mean(divergence[:5]), divergence
    assert np.mean(koleo_values[-10:]) < np.mean(koleo_values[:5]) - 0.05, koleo_values
    with torch.no_grad():
        views = two_views(torch.randn(128, dim, generator=g))
        t_probs = [dino.sinkhorn_knopp_teacher(t_head(teacher(v)), 0.04) for v in views]
        trained = total_loss(student, s_head, views, t_probs)
        untrained = total_loss(initial_student, initial_head, views, t_probs)
    assert trained < untrained - 1.0, (trained, untrained)
