"""Multi-scale deformable attention."""
from .api import ms_deform_attn
from .module import MSDeformAttn
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "MSDeformAttn"]
