"""Task configs around a PIIP backbone: the fields each transformers head needs from it.

Every function takes a :class:`~piip.hf.PIIPBackboneConfig` (or a preset name) and keyword
overrides for the task config, and fills in what follows from the backbone: channels,
strides and the number of levels. Nothing here is needed to use the backbone; the same
configs can be written by hand (the README shows how).
"""
from __future__ import annotations

from transformers import DeformableDetrConfig, DFineConfig, Mask2FormerConfig, RTDetrConfig, UperNetConfig

from .backbone import PIIPBackboneConfig

# The official PIIP UperNet (mmseg's upernet_r50 base, as overridden by the PIIP configs
# upernet_internvit_*_ade20k): 1536-wide decode and auxiliary heads, the auxiliary head on
# the third level, 150 ADE20K classes, auxiliary loss weight 0.4, label 255 ignored.
PAPER_UPERNET = dict(hidden_size=1536, auxiliary_channels=1536, pool_scales=[1, 2, 3, 6], auxiliary_num_convs=1,
                     auxiliary_concat_input=False, auxiliary_loss_weight=0.4, loss_ignore_index=255, num_labels=150)


def _backbone(backbone, **kw) -> PIIPBackboneConfig:
    if isinstance(backbone, PIIPBackboneConfig):
        if kw:
            raise TypeError(f"give {sorted(kw)} in the PIIPBackboneConfig itself")
        return backbone
    if isinstance(backbone, str):
        return PIIPBackboneConfig(preset=backbone, **kw)
    raise TypeError(f"backbone must be a PIIPBackboneConfig or a preset name, got {type(backbone).__name__}")


def _levels(bb: PIIPBackboneConfig, n: int, head: str) -> None:
    if len(bb.out_indices) != n:
        raise ValueError(f"{head} reads {n} backbone levels; the backbone returns {bb.out_features} "
                         f"(pass out_indices={list(range(4 - n, 4))} to PIIPBackboneConfig)")


def upernet_config(backbone, **overrides) -> UperNetConfig:
    """UperNet on all four levels. For the ``upernet_*`` presets the head is the paper's
    (:data:`PAPER_UPERNET`); other backbones get transformers' defaults. The auxiliary FCN
    head reads the third level, whose width it is given."""
    bb = _backbone(backbone)
    _levels(bb, 4, "UperNet")
    paper = PAPER_UPERNET if (bb.preset or "").startswith("upernet_") else {}
    return UperNetConfig(**{"backbone_config": bb, "auxiliary_in_channels": bb.channels[2], **paper, **overrides})


def mask2former_config(backbone, **overrides) -> Mask2FormerConfig:
    """Mask2Former on all four levels: the pixel decoder's deformable encoder reads the last
    three, the mask features come from the first; ``feature_strides`` are the backbone's."""
    bb = _backbone(backbone)
    _levels(bb, 4, "Mask2Former")
    return Mask2FormerConfig(**{"backbone_config": bb, "feature_strides": bb.strides, **overrides})


def deformable_detr_config(backbone, **overrides) -> DeformableDetrConfig:
    """Deformable DETR with two-stage proposals and iterative box refinement (the closest
    transformers has to the paper's DINO): the backbone's levels plus extra stride-2 levels
    made by the head, four in all (DINO's 4-scale neck on the DINO presets' levels 1-3)."""
    bb = _backbone(backbone)
    kw = {"backbone_config": bb, "two_stage": True, "with_box_refine": True, "num_feature_levels": max(4, len(bb.channels))}
    return DeformableDetrConfig(**{**kw, **overrides})


def _rt_detr_family(cls, head: str, backbone, overrides: dict):
    bb = _backbone(backbone)
    n = len(bb.channels)
    if n != 3:
        raise ValueError(f"{head} reads 3 backbone levels (strides 8/16/32); the backbone returns "
                         f"{bb.out_features} (pass out_indices=[1, 2, 3] to PIIPBackboneConfig)")
    hidden = overrides.get("encoder_hidden_dim", cls.__dataclass_fields__["encoder_hidden_dim"].default)
    kw = {"backbone_config": bb, "encoder_in_channels": bb.channels, "feat_strides": bb.strides,
          "decoder_in_channels": [hidden] * n, "num_feature_levels": n}
    return cls(**{**kw, **overrides})


def rt_detr_config(backbone, **overrides) -> RTDetrConfig:
    """RT-DETR on three levels (strides 8/16/32): ``encoder_in_channels`` and ``feat_strides``
    from the backbone, the decoder reading the hybrid encoder's width."""
    return _rt_detr_family(RTDetrConfig, "RT-DETR", backbone, overrides)


def d_fine_config(backbone, **overrides) -> DFineConfig:
    """D-FINE on three levels, filled in as :func:`rt_detr_config`."""
    return _rt_detr_family(DFineConfig, "D-FINE", backbone, overrides)
