"""``use_in_rfdetr(model=None)``: our multi-scale deformable attention in RF-DETR (the
``rfdetr`` package; ``inference-models`` carries the same code).

``rfdetr.models.ops.modules.ms_deform_attn.MSDeformAttn.forward`` calls the module-level name
``ms_deform_attn_core_pytorch`` (a gather-based bilinear sampler), with

- ``value``: [N, M, D, S] (heads first, positions last);
- ``value_spatial_shapes``: an [L, 2] tensor, and optionally ``value_spatial_shapes_hw``, the
  same as a list of (H_l, W_l) pairs (read first: no host read of a GPU tensor);
- ``sampling_locations``: [N, Lq, M, L, P, 2], or [N, Lq, M, L*P, 2] in its export mode;
- ``attention_weights``: [N, Lq, M, L*P]; returns [N, Lq, M*D].

Without a model, the name is swapped in every loaded module that binds RF-DETR's function,
so every model of the process runs ours. With a model, each of its ``MSDeformAttn``
instances gets a ``forward`` of its own: RF-DETR's code over a copy of its module's globals
in which the name is ours (the copy is taken at the swap).

Export and tracing keep RF-DETR's code: ``torch.onnx`` export, ``torch.jit`` tracing,
``torch.export``, and the modules put in export mode (``MSDeformAttn.export()``, which
passes rank-5 locations). RF-DETR trains under bf16 autocast by default: ours takes bf16
values beside fp32 locations and accumulates in fp32.
"""
from __future__ import annotations

from torch import Tensor, nn

from piip_kernels import _swap
from piip_kernels.integrations._common import exporting, level_tensors, swap_function_by_name, torch_module, unfold_points
from piip_kernels.msda.api import ms_deform_attn

OWNER = "use_in_rfdetr"
MODULE = "rfdetr.models.ops.modules.ms_deform_attn"
NAME = "ms_deform_attn_core_pytorch"


def ms_deform_attn_core(value: Tensor, value_spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor,
                        value_spatial_shapes_hw=None, *, theirs) -> Tensor:
    """RF-DETR's ``ms_deform_attn_core_pytorch`` (layouts in the module docstring) on
    ``piip_kernels.ms_deform_attn``; ``theirs`` runs during export, tracing and in export
    mode (rank-5 locations)."""
    if exporting() or sampling_locations.dim() == 5:
        return theirs(value, value_spatial_shapes, sampling_locations, attention_weights,
                      value_spatial_shapes_hw=value_spatial_shapes_hw)
    shapes = value_spatial_shapes_hw if value_spatial_shapes_hw is not None else value_spatial_shapes
    spatial, starts = level_tensors(shapes, value.device)
    loc, weights = unfold_points(sampling_locations, attention_weights, spatial.shape[0])
    return ms_deform_attn(value.permute(0, 3, 1, 2), spatial, starts, loc, weights)  # [N, M, D, S] -> [N, S, M, D]


def use_in_rfdetr(model: nn.Module | None = None) -> _swap.Handle:
    """Makes RF-DETR run our multi-scale deformable attention.

    Args:
        model: an RF-DETR model (``rfdetr.RFDETRBase()`` and the like, whose torch module is
            reached through ``.model.model``, or any module holding ``MSDeformAttn``
            instances) to switch; None: every model of the process, built before or after,
            until ``remove()``.

    Returns:
        A handle of piip_kernels' swap mechanism: ``swapped`` counts what it holds ("function
        by name" without a model, "layer" per attention module with one), ``remove()`` (or
        leaving a ``with`` block) puts RF-DETR's code back once no other handle holds it.

    Outputs and gradients equal RF-DETR's to floating-point rounding; fp32, and fp16 or bf16
    under autocast, on CPU and CUDA.
    """
    if model is not None:
        model = torch_module(OWNER, model, "an RF-DETR model")
    return swap_function_by_name(OWNER, MODULE, "MSDeformAttn", NAME, ms_deform_attn_core, model)
