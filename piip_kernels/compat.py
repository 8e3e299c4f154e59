"""Our op where code expects Deformable DETR's or mmcv's entry points.

One changed import line (Deformable DETR / ViT-Adapter / DINO, mmcv / mmdet)::

    # from models.ops.functions import MSDeformAttnFunction
    from piip_kernels.compat import MSDeformAttnFunction
    # from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch
    from piip_kernels.compat import multi_scale_deformable_attn_pytorch

No changed line, for the repositories that import a compiled extension (Deformable DETR,
DINO, DN-DETR, Mask2Former, MaskDINO, OneFormer, ViT-Adapter and their forks:
``import MultiScaleDeformableAttention as MSDA``; GroundingDINO: ``from groundingdino import
_C``)::

    piip_kernels.compat.install_extensions()   # in-process, before their models are imported
    python -m piip_kernels.extension_hook install   # or once per environment: no build, no edit

Both give them :func:`ms_deform_attn_forward` and :func:`ms_deform_attn_backward`, the
compiled extension's interface, on the CPU as well as on a GPU.

mmcv 2.x (``MultiScaleDeformableAttention`` has no bf16 and no CPU kernel)::

    piip_kernels.compat.use_in_mmcv()

Every switch here that returns a handle goes through piip_kernels' one swap mechanism
(``piip_kernels._swap``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch
from torch import Tensor

from . import _swap, backends
from .msda.api import BACKENDS, OP, check_inputs, check_levels, ms_deform_attn
from .msda.module import MSDeformAttn
from .msda.reference import ms_deform_attn_reference
from .ops import ms_deform_attn_backward_op

__all__ = ["MSDeformAttn", "MSDeformAttnFunction", "multi_scale_deformable_attn_pytorch", "ms_deform_attn_core_pytorch",
           "ms_deform_attn_forward", "ms_deform_attn_backward", "install_extensions", "use_in_mmcv"]


class MSDeformAttnFunction:
    """Stand-in for Deformable DETR's ``MSDeformAttnFunction`` and mmcv's
    ``MultiScaleDeformableAttnFunction`` (which has no bf16, mmcv issue 2878): only ``apply``
    is used by callers, in any float dtype, on any device."""

    @staticmethod
    def apply(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights, im2col_step=64):
        """Same signature as Deformable DETR; ``im2col_step`` is accepted and ignored
        (our kernels have no batch-chunking restriction). Returns [N, Lq, M*D]."""
        return ms_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights)


def _level_starts(spatial_shapes: Tensor) -> Tensor:
    sizes = spatial_shapes.long().prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def multi_scale_deformable_attn_pytorch(value: Tensor, value_spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """mmcv's signature: value [bs, num_keys, num_heads, dims], shapes [L, 2],
    locations [bs, num_queries, num_heads, L, P, 2], weights [bs, num_queries, num_heads, L, P]
    -> [bs, num_queries, num_heads * dims]. Runs the fastest available backend."""
    if not isinstance(value_spatial_shapes, Tensor):
        value_spatial_shapes = torch.as_tensor(value_spatial_shapes, dtype=torch.long, device=value.device)
    return ms_deform_attn(value, value_spatial_shapes, _level_starts(value_spatial_shapes), sampling_locations, attention_weights)


# Deformable DETR's name for the same function.
ms_deform_attn_core_pytorch = multi_scale_deformable_attn_pytorch


# ---------------------------------------------------------------------------------------------
# The compiled extension's interface (Deformable DETR's ``MultiScaleDeformableAttention``,
# GroundingDINO's ``groundingdino._C``)

def ms_deform_attn_forward(value: Tensor, value_spatial_shapes: Tensor, value_level_start_index: Tensor,
                           sampling_locations: Tensor, attention_weights: Tensor, im2col_step: int = 64) -> Tensor:
    """The compiled extension's forward: value [N, S, M, D], shapes [L, 2], starts [L],
    locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P] -> [N, Lq, M*D]. Any device
    and float dtype; ``im2col_step`` (their batch chunking) is accepted and not needed."""
    return ms_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights)


def ms_deform_attn_backward(value: Tensor, value_spatial_shapes: Tensor, value_level_start_index: Tensor,
                            sampling_locations: Tensor, attention_weights: Tensor, grad_output: Tensor,
                            im2col_step: int = 64) -> list[Tensor]:
    """The compiled extension's backward: the forward's inputs and grad_output [N, Lq, M*D]
    -> [grad_value, grad_sampling_locations, grad_attention_weights], each in its input's
    dtype. Runs our backward kernel directly (the forward is not run again); deterministic
    under ``torch.use_deterministic_algorithms``."""
    inputs = (value, sampling_locations, attention_weights)
    value, shapes, starts, loc, weights = check_inputs(value, value_spatial_shapes, value_level_start_index,
                                                       sampling_locations, attention_weights)
    if shapes.device.type == "cpu":
        check_levels(shapes, starts, value.shape[1])
    backend = backends.select(OP, BACKENDS, value.device, value.dtype, None)
    if backend == "reference":
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
            out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
            grads = torch.autograd.grad(out, leaves, grad_output.to(out.dtype))
    else:
        grads = ms_deform_attn_backward_op(grad_output.to(value.dtype).contiguous(), value, shapes, starts, loc, weights,
                                           backend, torch.are_deterministic_algorithms_enabled())
    return [g.to(t.dtype) for g, t in zip(grads, inputs)]


# The extension names served: Deformable DETR's (and its descendants'), GroundingDINO's.
EXTENSIONS = ("MultiScaleDeformableAttention", "groundingdino._C")


def fill_extension_module(module: types.ModuleType) -> types.ModuleType:
    """Makes ``module`` our stand-in for a compiled extension (also the no-edit route's loader)."""
    module.__doc__ = ("piip_kernels' stand-in for a compiled multi-scale deformable attention extension "
                      "(piip_kernels.compat.ms_deform_attn_forward / ms_deform_attn_backward)")
    module.ms_deform_attn_forward = ms_deform_attn_forward
    module.ms_deform_attn_backward = ms_deform_attn_backward
    module.__piip_kernels_stand_in__ = True
    return module


def is_stand_in(module) -> bool:
    return getattr(module, "__piip_kernels_stand_in__", False) is True


def _importable_parent(name: str):
    """The package above ``name`` (imported), or None if it is not installed."""
    parent = name.rpartition(".")[0]
    if not parent:
        return None
    try:
        if importlib.util.find_spec(parent) is None:
            return False
    except (ImportError, ValueError):
        return False
    return importlib.import_module(parent)


def install_extensions() -> _swap.Handle:
    """Registers our stand-in for the compiled extensions of the deformable-detector
    repositories, in this process: ``MultiScaleDeformableAttention`` always,
    ``groundingdino._C`` where ``groundingdino`` is importable.

    ``import MultiScaleDeformableAttention as MSDA`` then gives :func:`ms_deform_attn_forward`
    and :func:`ms_deform_attn_backward`, with no build. Modules that imported a compiled
    extension already have their name for it swapped too (so a built extension that
    works only on a GPU is replaced everywhere).

    Returns:
        A handle: ``swapped["extension"]`` counts the names registered, ``remove()`` puts
        back what was there (nothing, or the compiled extension).
    """
    handle = _swap.Handle("install_extensions")
    with _swap.all_or_nothing(handle):
        for name in EXTENSIONS:
            parent = _importable_parent(name)
            if parent is False:
                continue
            current, held = sys.modules.get(name), _swap.held(sys.modules, name, item=True)
            if held is None and is_stand_in(current):
                handle.found_ours()  # loaded through the no-edit route
                continue
            compiled = current if held is None else held.original  # what was there before any handle's swap
            ours = fill_extension_module(types.ModuleType(name))
            if not _swap.swap(handle, sys.modules, name, ours, kind="extension", what=f"sys.modules[{name!r}]", item=True):
                ours = sys.modules[name]  # joined another handle's stand-in
            if parent is not None:
                child = name.rpartition(".")[2]
                _swap.swap(handle, vars(parent), child, ours, kind="extension", what=f"{parent.__name__}.{child}", item=True)
            if compiled not in (None, _swap.MISSING) and not is_stand_in(compiled):  # a compiled one, imported already
                _swap.swap_references(handle, compiled, ours, kind="import site", skip={parent.__name__} if parent else ())
    return handle


# ---------------------------------------------------------------------------------------------
# mmcv 2.x

MMCV_MODULE = "mmcv.ops.multi_scale_deform_attn"


def use_in_mmcv() -> _swap.Handle:
    """Makes mmcv 2.x's ``MultiScaleDeformableAttention`` (and everything that imported its
    functions: mmcv.ops, mmdet's layers) run our op: ``multi_scale_deformable_attn_pytorch``
    (its CPU path) and ``MultiScaleDeformableAttnFunction`` (its CUDA path) are swapped
    wherever a loaded module binds them. fp32, fp16 and bf16 (mmcv's CUDA op has no bf16)
    on CPU and CUDA.

    mmcv-lite has no ``mmcv.ops``: there is nothing to swap, and mmdet, which imports many
    other compiled mmcv ops, does not import at all; with mmcv-lite, use
    ``piip_kernels.MSDeformAttn`` or :func:`multi_scale_deformable_attn_pytorch` in your
    own modules.

    Returns:
        A handle (``remove()`` puts mmcv's functions back).
    """
    try:
        module = importlib.import_module(MMCV_MODULE)
    except ImportError as err:
        raise ImportError(f"use_in_mmcv: {MMCV_MODULE} does not import ({err}); mmcv-lite has no mmcv.ops, and "
                          "mmcv's compiled ops must load for it to import") from err
    handle = _swap.Handle("use_in_mmcv")
    with _swap.all_or_nothing(handle):
        for name, ours in (("multi_scale_deformable_attn_pytorch", multi_scale_deformable_attn_pytorch),
                           ("MultiScaleDeformableAttnFunction", MSDeformAttnFunction)):
            held = _swap.held(vars(module), name, item=True)  # swapped by another handle: mmcv's is the original
            theirs = held.original if held is not None else vars(module).get(name)
            if theirs is not None and theirs is not ours:
                _swap.swap_references(handle, theirs, ours, kind=name)
    return handle
