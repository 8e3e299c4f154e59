"""Released PIIP segmentation checkpoints (mmseg UperNet), whole, in transformers' UperNet.

An official checkpoint holds an mmseg ``EncoderDecoder``: ``backbone.*`` (the PIIP, official
names), ``decode_head.*`` (``UPerHead``) and ``auxiliary_head.*`` (``FCNHead``). mmseg's heads
and transformers' ``UperNetHead`` / ``UperNetFCNHead`` are the same computation with the same
module tree (PPM branches, bottleneck, lateral and FPN convs, FPN bottleneck; FCN convs),
so the key map is a rename:

  ==================================  ==============================================
  mmseg                               transformers UperNetForSemanticSegmentation
  ==================================  ==============================================
  ``backbone.<official name>``        ``backbone.piip.<ours>`` (``piip.official`` names;
                                      the scalars ``w1..wN`` fill ``merge_weights``)
  ``*.conv_seg.{weight,bias}``        ``*.classifier.{weight,bias}``
  ``<ConvModule>.conv.weight``        ``<ConvModule>.conv.weight``
  ``<ConvModule>.bn.<tensor>``        ``<ConvModule>.batch_norm.<tensor>``
  ==================================  ==============================================

Two differences remain, neither in the weights: mmseg's heads apply ``Dropout2d(0.1)``
before ``conv_seg`` in training (transformers' have none), and the official heads run in
fp32 whatever the backbone's dtype (``PIIPBackbone`` returns maps in the image's dtype, so
fp32 images give the same). ``tests/test_piip_hf_mmseg.py`` checks the computation against
a plain-PyTorch mmseg UperNet written from mmseg's published structure.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from ..models.keys import check_state_dict
from .backbone import PIIPBackbone, official_backbone_config

# mmcv ConvModule names its norm after the norm type ("bn" for BN / SyncBN).
_CONV_MODULE_BN = re.compile(r"^((?:decode_head|auxiliary_head)\..+)\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def upernet_head_key(key: str) -> str:
    """An mmseg ``decode_head.*`` / ``auxiliary_head.*`` key -> transformers' UperNet key."""
    if not key.startswith(("decode_head.", "auxiliary_head.")):
        raise KeyError(f"not an mmseg UperNet head key: {key!r}")
    key = re.sub(r"^(decode_head|auxiliary_head)\.conv_seg\.", r"\1.classifier.", key)
    return _CONV_MODULE_BN.sub(r"\1.batch_norm.\2", key)


def mmseg_state_dict(checkpoint) -> dict[str, Tensor]:
    """The state dict of an mmseg checkpoint: a path or a loaded dict, under ``state_dict``,
    ``model`` or ``module`` (DeepSpeed) or bare."""
    obj = torch.load(checkpoint, map_location="cpu", weights_only=True) if not isinstance(checkpoint, dict) else checkpoint
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError("the checkpoint holds no state dict")
    return obj


def _backbone_of(model) -> PIIPBackbone:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, PIIPBackbone):
        raise TypeError(f"expected a UperNetForSemanticSegmentation with a PIIPBackbone, got {type(model).__name__} "
                        f"with backbone {type(backbone).__name__}")
    return backbone


def load_mmseg_upernet(model, checkpoint) -> None:
    """Load a whole official mmseg UperNet checkpoint (path or state dict) into a
    ``UperNetForSemanticSegmentation`` whose backbone is a :class:`PIIPBackbone` (official
    form, see :func:`upernet_from_mmseg`). Every key on both sides is checked: an unused,
    missing or mis-shaped key is an error listing them all."""
    backbone = _backbone_of(model)
    sd = mmseg_state_dict(checkpoint)
    backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    head_sd = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    # One report for the heads (the backbone's loader reports its own keys the same way).
    ours = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    renamed = {}
    for k, v in head_sd.items():
        try:
            renamed[upernet_head_key(k)] = v
        except KeyError:
            renamed[k] = v  # reported as unused below
    check_state_dict("mmseg UperNet heads", ours, renamed)
    if not backbone_sd:
        raise ValueError("the checkpoint has no backbone.* keys")
    backbone.load_official_state_dict(backbone_sd)
    model.load_state_dict(renamed, strict=False)  # the heads: every key checked above


def upernet_from_mmseg(backbone, checkpoint, **upernet_overrides):
    """Build ``UperNetForSemanticSegmentation`` for an official mmseg checkpoint and load it whole.

    ``backbone``: a preset name (``upernet_*``: the paper's head, :data:`piip.hf.tasks.PAPER_UPERNET`),
    a :class:`PIIPBackboneConfig`, a ``PIIPConfig`` or a neutral config dict; its official
    form is built. ``upernet_overrides`` go to ``UperNetConfig`` (head width, classes, ...)
    and must match the checkpoint's shapes.
    """
    from transformers import UperNetForSemanticSegmentation

    from .tasks import upernet_config

    model = UperNetForSemanticSegmentation(upernet_config(official_backbone_config(backbone), **upernet_overrides))
    load_mmseg_upernet(model, checkpoint)
    return model
