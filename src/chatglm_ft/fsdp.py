"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) for `chatglm-ft train --fsdp`.

Under torchrun with N processes every GLMBlock becomes one FSDP unit, and the root (the whole
model) takes what is left: word embeddings, final LayerNorm and lm_head. Parameters, gradients and
AdamW state are DTensors cut along dim 0 into N shards, so each GPU keeps about 1/N of the
full-fine-tuning state (float32 weights + gradients + two AdamW moments: 16 bytes per parameter);
a block's full weights exist only while it runs forward or backward.

Checkpoints keep the single-process layout, so they resume with or without FSDP and with any
number of processes: the weights are gathered into full tensors on rank 0 (CPU) and written as
`model/` or `adapter/`; the optimizer state is gathered with `torch.distributed.checkpoint.state_dict`
and renumbered into the layout of `optimizer.state_dict()`. The price: rank 0 holds the full weights
and AdamW state in host memory while it writes (about 75 GB for full fine-tuning at 6.2 B parameters).

A model trained in memory under FSDP stays sharded afterwards (its parameters are DTensors).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

__all__ = ["shard", "full_weights", "full_optimizer_state", "load_full_weights", "load_full_optimizer_state"]


def shard(trained: nn.Module, layers: nn.ModuleList, *, device: torch.device, amp: torch.dtype | None) -> None:
    """Shard `trained` (the model, or the PeftModel around it) in place over all processes.

    Build the optimizer afterwards: fully_shard replaces every parameter with a sharded one. The
    model may sit on the CPU: each unit's shard moves to `device` as it is sharded, so the full
    model never has to fit on one GPU. `amp` (the autocast dtype, None on CPU) becomes the
    all-gather / compute dtype of the weights; gradients are reduced in float32 into float32 shards.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
    for i, layer in enumerate(layers):
        # the last block's weights are needed again at once by backward: keep them gathered
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    from .ptuning import prefix_encoder_of

    prefix = prefix_encoder_of(trained)
    if prefix is not None:  # P-Tuning: the trained float32 prefix is its own unit, computed in float32 as THUDM does
        fully_shard(prefix, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    fully_shard(trained, mesh=mesh, mp_policy=policy)


# -- saving: full tensors on rank 0, in the single-process layout ------------------------------------
def full_weights(trained: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full CPU tensors named as `trained.state_dict()` names them, on rank 0 ({} elsewhere).

    A collective: every process calls it. `trainable_only` (LoRA) gathers the adapter, not the frozen base.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(trained, options=options)


def full_optimizer_state(trained: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """`optimizer.state_dict()` as one process would write it (full tensors, parameters numbered
    in param_groups order), on rank 0; None elsewhere. A collective: every process calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(trained, optimizer, options=options)  # state keyed by parameter name
    if dist.get_rank() != 0:
        return None
    index = parameter_index(optimizer)
    params = dict(trained.named_parameters(remove_duplicate=False))
    local = optimizer.state_dict()  # param_groups: hyperparameters and numbering, no tensors to gather
    return {"state": {index[id(params[name])]: value for name, value in by_name["state"].items()},
            "param_groups": local["param_groups"]}


# -- loading: full tensors on every rank, each keeps its shard ---------------------------------------
def load_full_weights(trained: nn.Module, weights: dict[str, torch.Tensor], *, strict: bool) -> None:
    """Copy full tensors (named as in `trained.state_dict()`, present on every rank) into the shards."""
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(trained, weights, options=options)


def load_full_optimizer_state(trained: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what `full_optimizer_state` (or a single process's `optimizer.state_dict()`) wrote."""
    index = parameter_index(optimizer)
    names = {}
    for name, param in trained.named_parameters():
        if id(param) in index:
            names[index[id(param)]] = name
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                         for group in state["param_groups"]],
    }
    set_optimizer_state_dict(trained, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def parameter_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its number in `optimizer.state_dict()` (consecutive over param_groups)."""
    return {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
