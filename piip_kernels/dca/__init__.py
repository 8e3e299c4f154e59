"""Fused deformable cross-attention of PIIP's interaction units."""
from .api import deform_cross_attn
from .reference import deform_cross_attn_reference, grid_reference_points

__all__ = ["deform_cross_attn", "deform_cross_attn_reference", "grid_reference_points"]
