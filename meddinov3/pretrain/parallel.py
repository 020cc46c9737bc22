"""FSDP2 sharding of the meta-architecture, and full (unsharded) state dicts whatever the parallelism.

``shard(meta, ...)`` applies ``torch.distributed.fsdp.fully_shard`` to the student, the EMA teacher and the Gram
teacher alike: each transformer block is one unit, then each backbone (the patch embedding, tokens and final norm:
what the blocks leave) and each head. The teacher is sharded exactly like the student (same modules, same mesh), so
every parameter of both is a DTensor with the same ``Shard(0)`` placement: the EMA update
(``SSLMetaArch.update_teacher``) runs on the local shards with no communication, and neither teacher is ever
held whole outside one unit's forward, which keeps each rank at about 1 / world of the three networks' memory
(an unsharded teacher would hold a full copy of the model on every rank, the very cost FSDP exists to remove).
The frozen teachers reshard after every forward (there is no backward to keep their parameters for).

``full_state(meta, optimizer)`` gathers the model and optimiser state as full CPU tensors on rank 0, in the layout
``meta.state_dict()`` / ``optimizer.state_dict()`` have without FSDP, so checkpoints are interchangeable between
single-process, DDP and FSDP runs; ``load_optimizer`` puts such a state back into a sharded or plain optimiser.
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from .meta_arch import SSLMetaArch


def _shard_backbone(backbone, mesh, mp, reshard_after_forward) -> None:
    for blk in backbone.vit.blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(backbone, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # the meta-architecture calls forward_features, not forward: FSDP must gather around it too
    register_fsdp_forward_method(backbone, "forward_features")


def shard(meta: SSLMetaArch, device: torch.device, world: int, param_dtype: torch.dtype | None = None) -> None:
    """Shard ``meta``'s student, teacher and Gram teacher in place over ``world`` ranks (call on every rank).

    ``param_dtype``: compute dtype of the gathered parameters (bf16 mixed precision); the shards, the optimiser
    state and the gradient reduction stay fp32.
    """
    # forward_features returns slices of one token tensor; FSDP warns that an in-place op on such a view would skip
    # its pre-backward hook, and neither the losses nor the probe modify them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for part, frozen in ((meta.student, False), (meta.teacher, True)):
        # None: FSDP's default (the units called first keep their parameters until the backward needs them)
        raf = True if frozen else None
        _shard_backbone(part["backbone"], mesh, mp, raf)
        for name in ("dino_head", "ibot_head"):
            fully_shard(part[name], mesh=mesh, mp_policy=mp, reshard_after_forward=raf)
    if meta.gram_teacher is not None:
        _shard_backbone(meta.gram_teacher, mesh, mp, True)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _param_names(meta: SSLMetaArch, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names (relative to the student) of the optimiser's parameters, in ``optimizer.state_dict()`` id order."""
    names = {p: n for n, p in meta.student.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]


def full_state(meta: SSLMetaArch, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimiser state): full CPU tensors on rank 0, empty dicts on the other ranks.

    A collective under torch.distributed: every rank calls it. The optimiser state is keyed by parameter id like
    ``optimizer.state_dict()``, with ``names``: each id's parameter name (so a later version that groups the
    parameters differently still finds each one's moments).
    """
    model = get_model_state_dict(meta, options=_FULL)
    optim = get_optimizer_state_dict(meta.student, optimizer, options=_FULL)
    if not optim:
        return model, optim
    names = _param_names(meta, optimizer)
    ids = {n: i for i, n in enumerate(names)}
    return model, {"state": {ids[n]: s for n, s in optim["state"].items()},
                   "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in optim["param_groups"]],
                   "names": names}


def _saved_names(state: dict, optimizer: torch.optim.Optimizer, names: list[str], shapes: dict) -> list[str] | None:
    """Parameter name of each saved id: recorded in the state, or (a checkpoint written before the names were)
    the current order when the groups have the same sizes and every moment the same shape; None: unknown."""
    if "names" in state:
        return list(state["names"])
    if [len(g["params"]) for g in state["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        return None
    for i, moments in state["state"].items():
        if any(torch.is_tensor(v) and v.ndim and tuple(v.shape) != shapes[names[i]] for v in moments.values()):
            return None
    return names


def load_optimizer(meta: SSLMetaArch, optimizer: torch.optim.Optimizer, state: dict) -> bool:
    """Load an ``optimizer.state_dict()``-layout state (every rank holds it whole) into a sharded or plain
    optimiser; call on every rank. Each parameter gets its own moments by name, in this optimiser's groups (their
    lr multipliers are this version's); False, and nothing loaded, when the state cannot be matched to the
    parameters (a checkpoint from a version that grouped them differently and did not record names).

    Parameters that have never had a gradient (the prototypes during ``freeze_last_layer_steps``) have no saved
    state; they are loaded with a zero state (torch 2.8, the newest on Slicer 5.8's Python 3.9, requires one for
    every trainable parameter) that is dropped again: the optimiser continues exactly as the one that saved it.
    """
    names = _param_names(meta, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    shapes = {n: tuple(p.shape) for n, p in meta.student.named_parameters()}
    saved_names = _saved_names(state, optimizer, names, shapes)
    if saved_names is None:
        return False
    saved = {saved_names[i]: s for i, s in state["state"].items() if saved_names[i] in shapes}
    template = next(iter(saved.values()), None)
    stateless = [(name, param) for name, param in zip(names, params) if name not in saved]
    filled = {name: {key: torch.zeros(param.shape if v.ndim else (), dtype=v.dtype) if torch.is_tensor(v) else v
                     for key, v in template.items()} for name, param in stateless} if template else {}
    groups, start = [], 0
    for g in optimizer.param_groups:
        settings = {k: v for k, v in g.items() if k != "params"}
        groups.append({**settings, "params": names[start:start + len(g["params"])]})
        start += len(g["params"])
    set_optimizer_state_dict(meta.student, optimizer, {"state": {**saved, **filled}, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    for _, param in stateless:
        optimizer.state.pop(param, None)
    return True
