"""``use_in_rtdetrv2(model)``: our multi-scale deformable attention in the authors' RT-DETRv2,
D-FINE and DEIM code (and the packages built on it, such as lightly-train and libreyolo).

Their attention module binds its core in ``__init__``::

    self.ms_deformable_attn_core = functools.partial(deformable_attention_core_func_v2, method=self.method)

and calls it as ``self.ms_deformable_attn_core(value, value_spatial_shapes,
sampling_locations, attention_weights, self.num_points_list)``, with

- ``value``: [N, S, M, D] (RT-DETRv2), or a sequence of per-level views [N, M, D, H_l*W_l]
  (D-FINE and DEIM split it once per decoder);
- ``value_spatial_shapes``: L pairs (H_l, W_l), a list or an [L, 2] tensor;
- ``sampling_locations``: [N, Lq, M, sum(P_l), 2], the points of level 0 first;
- ``attention_weights``: [N, Lq, M, sum(P_l)];
- ``num_points_list``: P_l per level; returns [N, Lq, M*D].

So the swap is per instance: every attribute holding a ``functools.partial`` of a function
with exactly these parameters becomes ours, with the same ``method``. The "discrete" method
(nearest pixel), export and tracing stay on their code. The function is found by its
parameters, not by its module, so a fork that keeps the signature is covered too.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from piip_kernels import _swap
from piip_kernels.hf.functions import multi_scale_deformable_attention_v2
from piip_kernels.integrations._common import exporting

OWNER = "use_in_rtdetrv2"
PARAMETERS = ("value", "value_spatial_shapes", "sampling_locations", "attention_weights", "num_points_list", "method")


def _values(value) -> Tensor:
    """[N, S, M, D] from their value: the tensor itself, or the per-level views
    [N, M, D, H_l*W_l] concatenated (one copy: the op reads one tensor)."""
    if isinstance(value, Tensor):
        return value
    return torch.cat(list(value), dim=-1).permute(0, 3, 1, 2)


def deformable_attention_core_v2(value, value_spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor,
                                 num_points_list, *, method: str = "default", theirs) -> Tensor:
    """Their ``deformable_attention_core_func_v2`` (arguments in the module docstring) on
    ``piip_kernels.ms_deform_attn``; ``theirs`` (their bound core) runs the "discrete"
    method and export. Returns [N, Lq, M*D]."""
    if method != "default" or exporting():
        return theirs(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list)
    return multi_scale_deformable_attention_v2(_values(value), value_spatial_shapes, sampling_locations, attention_weights,
                                               num_points_list)


def _is_their_core(obj) -> bool:
    if not isinstance(obj, functools.partial) or obj.func is deformable_attention_core_v2:
        return False
    try:
        return tuple(inspect.signature(obj.func).parameters) == PARAMETERS and not obj.args
    except (TypeError, ValueError):
        return False


def _is_ours(obj) -> bool:
    obj = obj.fn if isinstance(obj, _swap.HeldCall) else obj  # a swap that follows copies
    return isinstance(obj, functools.partial) and obj.func is deformable_attention_core_v2


def use_in_rtdetrv2(model: nn.Module) -> _swap.Handle:
    """Makes an RT-DETRv2, D-FINE or DEIM model (the authors' code) run our multi-scale
    deformable attention.

    Args:
        model: the model, or any module holding their attention modules.

    Returns:
        A handle of piip_kernels' swap mechanism: ``swapped["bound core"]`` counts the
        attention modules now on ours, ``remove()`` (or leaving a ``with`` block) puts
        their core back once no other handle holds it.

    Their "discrete" sampling method, ONNX export and tracing keep their code. Outputs and
    gradients equal theirs to floating-point rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{OWNER}: model must be a torch.nn.Module, got {type(model).__name__}")
    handle = _swap.Handle(OWNER)
    with _swap.all_or_nothing(handle):
        for module in model.modules():
            for attr, value in list(vars(module).items()):
                what = f"{type(module).__qualname__}.{attr}"
                held = _swap.held(module, attr)
                if held is not None:  # ours, or another integration's swap of this attribute
                    if held.kind == "bound core":
                        _swap.swap(handle, module, attr, None, kind="bound core", what=what)
                elif _is_ours(value):
                    handle.found_ours()
                elif _is_their_core(value):
                    method = value.keywords.get("method", "default")
                    ours = functools.partial(deformable_attention_core_v2, method=method, theirs=value)
                    # follow: a deep copy of the model is held by this handle too; a pickle carries theirs.
                    _swap.swap(handle, module, attr, ours, kind="bound core", what=what, follow=True)
    if handle.taken() == 0:
        _swap.log_once(f"{OWNER}: found no RT-DETRv2-style deformable attention core in {type(model).__name__} "
                       f"(a functools.partial of a function taking {', '.join(PARAMETERS)})")
    return handle
