"""PIIP in Hugging Face transformers: a registered backbone for its task models.

Importing this module registers the model type ``"piip"`` with ``AutoConfig`` and
``AutoBackbone``, so ``UperNetConfig(backbone_config=PIIPBackboneConfig(preset=...))`` (or a
dict with ``"model_type": "piip"``) builds a PIIP inside UperNet, Mask2Former, Deformable
DETR, RT-DETR or D-FINE. ``piip`` itself never imports transformers; this module does.
"""
from transformers import AutoBackbone, AutoConfig

from .backbone import PIIPBackbone, PIIPBackboneConfig, official_backbone_config, piip_config_from_dict, piip_config_to_dict

AutoConfig.register(PIIPBackboneConfig.model_type, PIIPBackboneConfig, exist_ok=True)
AutoBackbone.register(PIIPBackboneConfig, PIIPBackbone, exist_ok=True)

__all__ = ["PIIPBackbone", "PIIPBackboneConfig", "official_backbone_config", "piip_config_from_dict", "piip_config_to_dict"]
