"""Building blocks of PIIP models, one idea per file."""
from .attention import Attention
from .block import Block, DropPath, Mlp, linspace_rates
from .interaction import ConvFFN, Injector, InteractionUnit, grid_reference_points
from .norm import RMSNorm, make_norm
from .projector import BranchMLPProjector
from .resize import resize_2d, resize_grid_tokens

__all__ = [
    "Attention", "Block", "DropPath", "Mlp", "linspace_rates", "ConvFFN", "Injector", "InteractionUnit",
    "grid_reference_points", "RMSNorm", "make_norm", "BranchMLPProjector", "resize_2d", "resize_grid_tokens",
]
