"""piip-kernels: fast, faithful kernels for Parameter-Inverted Image Pyramid networks.

Ops (each with a plain-PyTorch reference and compiled backends):
  ms_deform_attn     multi-scale deformable attention (Deformable DETR / ViT-Adapter / PIIP)
  deform_cross_attn  PIIP's interaction cross-attention from raw offsets and logits, fused
  branch_merge       bilinear resize of several branch maps and their weighted sum, fused

Modules:
  MSDeformAttn     drop-in replacement of the Deformable DETR module (same parameter names)
  compat           the Deformable DETR / mmcv entry points (``piip_kernels.compat.MSDeformAttnFunction``),
                   the compiled-extension stand-in (``compat.install_extensions()``) and mmcv's switch
  hf               ``hf.use_in_transformers``: transformers' deformable detectors

Integrations (each returns a handle: ``.remove()``, ``.swapped``, a context manager):
  use_in_ultralytics  Ultralytics' RT-DETR
  use_in_rfdetr       RF-DETR
  use_in_rtdetrv2     the authors' RT-DETRv2, D-FINE and DEIM code

Set ``PIIP_KERNELS_BACKEND=reference|cpu|cuda|triton`` to force a backend;
``backend_report()`` prints which backends can run here and why not.
"""
from . import compat, ops  # noqa: F401  (ops registers the torch.library ops)
from .backends import backend_report
from .dca import deform_cross_attn, deform_cross_attn_reference
from .integrations.rfdetr import use_in_rfdetr
from .integrations.rtdetrv2 import use_in_rtdetrv2
from .integrations.ultralytics import use_in_ultralytics
from .merge import branch_merge, branch_merge_reference
from .msda import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference

__version__ = "0.1.0"
__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "deform_cross_attn", "deform_cross_attn_reference",
           "branch_merge", "branch_merge_reference", "MSDeformAttn", "compat", "backend_report", "__version__",
           "use_in_ultralytics", "use_in_rfdetr", "use_in_rtdetrv2"]
