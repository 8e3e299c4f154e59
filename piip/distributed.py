"""Sharded training of PIIP models with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("nccl")                       # torchrun --nproc-per-node 8 train.py
    model = piip.create_model("mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms")
    piip.distributed.apply_fsdp(model, init_device_mesh("cuda", (dist.get_world_size(),)),
                                param_dtype=torch.bfloat16, checkpointing=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # after apply_fsdp: the parameters are shards

Units: every transformer block and every interaction unit is its own FSDP unit (its
parameters are gathered just before it runs and freed after), the root keeps the rest
(patch and position embeddings, merge, pyramid, heads). Parameters, gradients and
optimizer states stay sharded in fp32; with ``param_dtype=torch.bfloat16`` the gathered
parameters and the computation are bf16 and gradients are reduced in fp32. The interaction
units' deformable attention then runs in the parameters' dtype (bf16 with fp32
accumulation in our kernels); without FSDP it runs in fp32, as the official code does.
bench/memory.py plans the memory of exactly these units; DDP needs nothing from here
(``torch.nn.parallel.DistributedDataParallel(model)`` works as for any module).

A task model holding the PIIP (heads beside it): shard the PIIP, make the task model the
root, then build the optimizer on the task model (fp32 shards are their own masters; bf16
shards, from a model cast to bf16 before sharding, get fp32 masters per shard)::

    piip.distributed.apply_fsdp(task.backbone.piip, mesh, param_dtype=torch.bfloat16)
    fully_shard(task, mesh=mesh)
    opt = piip.build_optimizer(task)
"""
from __future__ import annotations

import torch
from torch import nn

from .memory import fsdp_units


def apply_fsdp(model: nn.Module, mesh=None, param_dtype: torch.dtype | None = torch.bfloat16,
               reduce_dtype: torch.dtype | None = torch.float32, checkpointing: bool = False,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shards ``model`` (a :class:`piip.PIIP`) in place with FSDP2 and returns it.

    Args:
        mesh: a 1-D DeviceMesh (default: all ranks of the default process group, on the
            current device type).
        param_dtype: dtype of the gathered parameters and of the computation (None: the
            parameters' own, fp32). reduce_dtype: dtype of the gradient reduce-scatter.
        checkpointing: recompute every block and interaction unit in the backward pass.
        reshard_after_forward: free gathered parameters after each unit's forward (ZeRO-3
            behaviour); False keeps them until the backward (ZeRO-2-like, more memory).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not hasattr(model, "set_grad_checkpointing"):
        raise TypeError(f"apply_fsdp expects a piip.PIIP model, got {type(model).__name__}")
    # Checked before anything changes: on error the model is left as it was.
    if mesh is None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("apply_fsdp: no process group; call torch.distributed.init_process_group(...) first "
                           "(e.g. in a script launched with torchrun), or pass mesh=init_device_mesh(...)")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if mesh is not None:
        kw["mesh"] = mesh
    for unit in fsdp_units(model):
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    model.set_grad_checkpointing(checkpointing)
    return model
