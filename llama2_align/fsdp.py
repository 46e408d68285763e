"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the stages that train: how a model is sharded, gathered for a
rollout, and gathered whole for the final save.

A stage shards when its config says ``sharding: fsdp`` and it runs under torchrun (:func:`enabled`; a process group
is up, even of one process: the GPU check runs FSDP at world size 1).
SFT and the reward models shard through the HF Trainer (accelerate's FSDP2 plugin, :func:`trainer_arguments`); PPO
shards its own models (:func:`shard`):

- one FSDP unit per ``LlamaDecoderLayer``, then the transformers model itself (embeddings, final norm, head) as the
  root; parameters become ``DTensor`` shards along dim 0, gradients are reduce-scattered (averaged over the ranks)
  by FSDP, so :func:`llama2_align.dist.average_gradients` leaves them alone, and ``clip_grad_norm_`` on DTensor
  gradients computes the norm over every shard;
- under LoRA the base is sharded once, adapters included in each layer's unit (FSDP2 in torch 2.13 gathers mixed
  dtypes, bf16 base and float32 adapters, in one unit); the reference, the policy with its adapters disabled, runs
  on the same shards;
- a rollout decodes token by token: :func:`gathered` all-gathers the policy once before it and frees the gathered
  weights after it, instead of one all-gather per layer per decode step;
- every forward of a sharded model is a collective, so every rank must run the same number of them: the stages
  give each rank the same number of batches, and the decoder runs in lockstep (``generation.decode_steps`` stops
  when every rank's rows have finished).

The root is the transformers model (under a PEFT wrapper, its base model): every path into the model goes through
its ``forward`` (the PEFT wrapper's forward, the rollout engine's direct call, the reference with adapters off, the
value model's forward), so the root's hooks always run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import dist

DECODER_LAYER = "LlamaDecoderLayer"


def enabled(config) -> bool:
    """The stage runs sharded: ``sharding: fsdp`` under torchrun (a process group is up). In a plain process there
    is nothing to shard over and the model stays whole."""
    return getattr(config, "sharding", "ddp") == "fsdp" and dist.is_distributed()


def describe(config) -> str:
    """How the stage's model is spread over the processes, for its provenance: ``fsdp xN``, ``ddp xN`` or ``none``."""
    world = dist.world_size()
    return f"fsdp x{world}" if enabled(config) else f"ddp x{world}" if world > 1 else "none"


def build_device(config) -> str:
    """Where a stage builds its models: on the CPU when they will be sharded (each rank then holds only its shards
    on its GPU; the full weights pass through host memory once per rank), else on this rank's device. The stage
    resolves the dtype against this rank's device, not the CPU (``device.resolve_dtype``: bf16 on CUDA)."""
    return "cpu" if enabled(config) else "auto"


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def is_sharded(model: nn.Module) -> bool:
    """Whether any part of ``model`` is an FSDP2 unit."""
    FSDPModule, _ = _fsdp()
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    from .device import resolve_device

    return init_device_mesh(resolve_device("auto").type, (dist.world_size(),))


def shard(model: nn.Module, mesh=None) -> nn.Module:
    """Shard ``model`` in place with FSDP2, one unit per decoder layer and the transformers model as the root (see
    the module docstring); returns it. The parameters move to the mesh's device (this rank's GPU, or the CPU)."""
    from .model import unwrap

    _, fully_shard = _fsdp()
    mesh = mesh or _mesh()
    root = unwrap(model)
    layers = [m for m in root.modules() if type(m).__name__ == DECODER_LAYER]
    if not layers:
        raise ValueError(f"{type(root).__name__}: no {DECODER_LAYER} to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(root, mesh=mesh)
    return model


def units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of ``model``, outermost first."""
    FSDPModule, _ = _fsdp()
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the whole of a sharded model's weights on every rank inside the block (one all-gather per unit when it
    starts; forwards inside it communicate nothing), and free them when it ends. A no-op for an unsharded model.
    Costs the full model's memory on each rank while it lasts: what a rollout trades for not gathering every layer
    at every decode step."""
    mods = units(model)
    if not mods:
        yield model
        return
    inner = mods[1:]  # the root keeps its own policy (FSDP leaves the root unsharded after forward)
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    handles = [m.unshard(async_op=True) for m in mods]
    for h in handles:
        if h is not None:
            h.wait()
    try:
        yield model
    finally:
        for m in inner:
            m.set_reshard_after_forward(True, recurse=False)
        for m in mods:
            m.reshard()


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, gathered onto rank 0's CPU (a collective: every rank calls it; the
    other ranks get an empty dict). ``trainable_only`` leaves frozen parameters out (a LoRA base)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))


def save_final(model: nn.Module, out_dir: str | Path, tokenizer=None, *, dtype: torch.dtype | None = None,
               **save_kwargs) -> Path:
    """:func:`llama2_align.model.save_model` for a model that may be sharded. Every rank calls it: a sharded model's
    weights are gathered onto rank 0 (only the adapters and other trainable tensors under LoRA), which writes a
    plain HF safetensors directory; a full model's floating tensors are written in ``dtype`` when given (the
    Trainer's FSDP keeps float32 master weights under bf16 mixed precision)."""
    from .model import is_peft, save_model

    state = None
    if is_sharded(model):
        state = full_state_dict(model, trainable_only=is_peft(model))
        if dtype is not None and not is_peft(model):
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if dist.is_main():
        save_model(model, out_dir, tokenizer, state_dict=state, **save_kwargs)
    dist.barrier()
    return Path(out_dir)


def trainer_arguments() -> dict:
    """The HF Trainer's FSDP2 arguments (accelerate's FSDP plugin): full sharding, one unit per decoder layer. Its
    checkpoints are written by :class:`llama2_align.stages.training.AtomicCheckpoints` (DCP, no pickle), not by
    the plugin."""
    return {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": [DECODER_LAYER],
                                          "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}}
