"""Optimiser state in checkpoints: each parameter's AdamW moments are found by name, whatever the grouping."""

from __future__ import annotations

import torch

from meddinov3.config import model_config
from meddinov3.pretrain.loop import PretrainConfig, make_optimizer
from meddinov3.pretrain.meta_arch import HeadConfig, SSLMetaArch
from meddinov3.pretrain.parallel import full_state, load_optimizer


def _meta() -> SSLMetaArch:
    torch.manual_seed(0)
    return SSLMetaArch(model_config("tiny", 1, depth=2, patch_size=8), HeadConfig(out_dim=64, hidden_dim=32,
                                                                                  bottleneck_dim=16))


def _stepped(meta: SSLMetaArch, optimizer: torch.optim.Optimizer) -> None:
    for p in meta.student.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # as at a resume (torch's loader initialises state only without grads)


def _moments(meta: SSLMetaArch, optimizer: torch.optim.Optimizer) -> dict:
    return {n: optimizer.state[p]["exp_avg"].clone() for n, p in meta.student.named_parameters() if p in optimizer.state}


def test_moments_follow_their_parameter_into_another_grouping():
    """Saved under layer-wise decay (one group per layer), loaded into an optimiser with two groups: every
    parameter gets its own moments (by id alone they would land on other parameters, or fail on shapes)."""
    meta = _meta()
    saving = make_optimizer(meta, PretrainConfig())
    _stepped(meta, saving)
    _, state = full_state(meta, saving)
    assert state["names"][0] in dict(meta.student.named_parameters())
    loading = make_optimizer(meta, PretrainConfig(layer_decay=1.0, patch_embed_lr=1.0))
    assert len(loading.param_groups) < len(saving.param_groups)
    assert load_optimizer(meta, loading, state)
    expected, got = _moments(meta, saving), _moments(meta, loading)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
    # the groups (and their lr multipliers) are the loading optimiser's own
    assert {g["lr_multiplier"] for g in loading.param_groups} == {1.0}


def test_a_checkpoint_without_names_loads_only_when_its_layout_matches():
    """Checkpoints written before the names were recorded: same grouping -> loaded in order; another grouping ->
    refused (False, nothing loaded) rather than moments given to the wrong parameters."""
    meta = _meta()
    saving = make_optimizer(meta, PretrainConfig(layer_decay=1.0, patch_embed_lr=1.0))  # the old two groups
    _stepped(meta, saving)
    _, state = full_state(meta, saving)
    del state["names"]
    same = make_optimizer(meta, PretrainConfig(layer_decay=1.0, patch_embed_lr=1.0))
    assert load_optimizer(meta, same, state)
    expected, got = _moments(meta, saving), _moments(meta, same)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    regrouped = make_optimizer(meta, PretrainConfig())
    assert not load_optimizer(meta, regrouped, state)
    assert not regrouped.state
