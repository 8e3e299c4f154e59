"""``use_in_ultralytics(model=None)``: our multi-scale deformable attention in Ultralytics'
RT-DETR.

``ultralytics.nn.modules.transformer.MSDeformAttn.forward`` calls the module-level name
``multi_scale_deformable_attn_pytorch`` (imported there from ``ultralytics.nn.modules.utils``
and looked up at call time), a ``grid_sample`` loop on every device, with

- ``value``: [N, S, M, D];
- ``value_shapes``: a list of (H_l, W_l) pairs;
- ``sampling_locations``: [N, Lq, M, L*P, 2] (current releases fold levels and points into
  one axis, level-major) or [N, Lq, M, L, P, 2] (older releases);
- ``attention_weights``: [N, Lq, M, L*P] or [N, Lq, M, L, P]; returns [N, Lq, M*D].

Without a model, the name is swapped in every loaded module that binds Ultralytics' function
(``transformer`` and ``utils``), so every model of the process runs ours. With a model, each
of its ``MSDeformAttn`` instances gets a ``forward`` of its own: Ultralytics' code over a copy
of its module's globals in which the name is ours (other models keep grid_sample; the copy is
taken at the swap, so later changes to that module's other globals do not reach it).

Export and tracing (ONNX, TorchScript, CoreML, ``torch.export``) keep Ultralytics' code. Our
backward is deterministic on the CPU, and on a GPU under ``torch.use_deterministic_algorithms``
(which Ultralytics' ``deterministic=True`` turns on), where grid_sample's backward is not.
"""
from __future__ import annotations

from torch import Tensor, nn

from piip_kernels import _swap
from piip_kernels.integrations._common import exporting, level_tensors, swap_function_by_name, torch_module, unfold_points
from piip_kernels.msda.api import ms_deform_attn

OWNER = "use_in_ultralytics"
MODULE = "ultralytics.nn.modules.transformer"
NAME = "multi_scale_deformable_attn_pytorch"


def multi_scale_deformable_attn(value: Tensor, value_spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor,
                                *, theirs) -> Tensor:
    """Ultralytics' ``multi_scale_deformable_attn_pytorch`` (layouts in the module docstring)
    on ``piip_kernels.ms_deform_attn``; ``theirs`` runs during export and tracing."""
    if exporting():
        return theirs(value, value_spatial_shapes, sampling_locations, attention_weights)
    spatial, starts = level_tensors(value_spatial_shapes, value.device)
    loc, weights = unfold_points(sampling_locations, attention_weights, spatial.shape[0])
    return ms_deform_attn(value, spatial, starts, loc, weights)


def use_in_ultralytics(model: nn.Module | None = None) -> _swap.Handle:
    """Makes Ultralytics' RT-DETR run our multi-scale deformable attention.

    Args:
        model: an Ultralytics model (``ultralytics.RTDETR``, its ``.model``, or any module
            holding ``MSDeformAttn`` instances) to switch; None: every model of the process,
            built before or after, until ``remove()``.

    Returns:
        A handle of piip_kernels' swap mechanism: ``swapped`` counts what it holds ("function
        by name" without a model, "layer" per attention module with one), ``remove()`` (or
        leaving a ``with`` block) puts Ultralytics' code back once no other handle holds it.

    Outputs and gradients equal Ultralytics' to floating-point rounding; fp32, and fp16 or
    bf16 under autocast, on CPU and CUDA, also under ``torch.compile``.
    """
    if model is not None:
        model = torch_module(OWNER, model, "an Ultralytics model")
    return swap_function_by_name(OWNER, MODULE, "MSDeformAttn", NAME, multi_scale_deformable_attn, model)
