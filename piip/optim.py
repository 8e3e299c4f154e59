"""The official training recipe: parameter groups, AdamW, and bf16 weights with fp32 masters.

The official code builds its optimizer in two ways (OpenGVLab/PIIP at 7a8eceb):
  - detection and segmentation (mmcv configs): AdamW through a layer-wise learning-rate-decay
    constructor (``CustomLayerDecayOptimizerConstructorMMDet``, identical for mmseg as
    ``CustomLayerDecayOptimizerConstructor``), run by DeepSpeed ZeRO-1 in bf16: the backbone's
    weights are bf16, neck and heads fp32, and the optimizer steps fp32 master copies;
  - classification (``classification/main.py`` via ``slurm_train.sh``): timm's AdamW over two
    groups, the pretrained branches at the base rate and everything else ("from scratch") at
    ``--from_scratch_lr_ratio`` times it; fp32 weights under fp16 autocast.

:func:`official_param_groups` reproduces what those constructors compute, quirks included,
on the official parameter names; :func:`build_optimizer` builds the AdamW for a model;
:class:`MasterWeightAdamW` is the bf16-weights-with-fp32-masters scheme; :func:`profile_copies`
counts the copies and casts of one training step.

The quirks kept (each is what the official code computes, not what it may have meant):
  - layer ids: patch/position embeddings 0, block i of branch 1 ``i + 1``, of branch k > 1
    ``(i + 1) * skip_stride[k - 2]``; everything else (interactions, merges, pyramid, neck,
    heads, ConvNeXt and CLIP branches, whose names match no rule) ``num_layers + 1``, where the
    scale is 1;
  - groups are keyed by ``"layer_%d" % layer_id``: a fractional id (skip stride 1.5 in the H6B
    configs) is truncated, and the group's scale is that of its first member in parameter order
    (branch 2's block 0, id 1.5, gets branch 1's block-0 scale);
  - no weight decay for 1-D tensors and names ending in ``.bias``; the exemption for
    ``pos_embed``/``cls_token`` compares the bare name, which never matches the ``backbone.``
    names the constructor sees, so position embeddings are decayed; the scalar merge weights
    (``w1``.., 0-D) are decayed too;
  - classification: one weight decay for every parameter (biases and norms included), because
    main.py hands timm explicit groups, which bypasses timm's no-decay filter.
"""
from __future__ import annotations

import inspect
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# The recipe of every official config (transcribed from the configs; tests/test_optim.py checks
# every field against what the official code reads, tests/data/official/param_groups.json).


@dataclass(frozen=True)
class Recipe:
    """One official config's optimizer. ``rule``: "layer_decay" (mmcv layer-decay constructor),
    "default" (mmcv's default constructor: one group) or "classification" (main.py's groups).
    ``skip_stride`` keeps the config's form (a list, a bare number, or None: absent)."""

    task: str
    rule: str
    lr: float
    weight_decay: float
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    num_layers: int | None = None
    layer_decay_rate: float | None = None
    skip_stride: object = None
    lr_ratio: float = 1.0
    grad_clip_max_norm: float | None = None
    precision: str = "bf16_master"     # "bf16_master" (DeepSpeed ZeRO-1 bf16) | "fp16_autocast"
    notes: tuple = field(default=(), compare=False)


RECIPES: dict[str, Recipe] = {}


def _add(names, **kw):
    for n in names.split():
        RECIPES[n] = Recipe(**kw)


_MM = dict(task="detection", rule="layer_decay", weight_decay=0.05)
_add("mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16 mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16_speedup "
     "mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16 mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16 "
     "mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16 mask_rcnn_deit_sbl_1568_896_672_fpn_1x_coco_bs16 "
     "mask_rcnn_dinov2_sbl_1568_1120_672_fpn_1x_coco_bs16 mask_rcnn_mae_sbl_1568_1120_672_fpn_1x_coco_bs16",
     lr=1e-4, num_layers=24, layer_decay_rate=0.85, skip_stride=[2, 2], **_MM)
_add("dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms",
     lr=2e-4, num_layers=24, layer_decay_rate=0.85, skip_stride=[2, 2], grad_clip_max_norm=0.1, **_MM)
_add("mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16 mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16 "
     "mask_rcnn_deit_tsb_1568_896_448_fpn_1x_coco_bs16",
     lr=1e-4, num_layers=12, layer_decay_rate=0.85, skip_stride=[1, 1], **_MM)
_add("mask_rcnn_deit_tsbl_1344_896_672_448_fpn_1x_coco_bs16 mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16 "
     "mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16",
     lr=1e-4, num_layers=24, layer_decay_rate=0.85, skip_stride=[2, 2, 2], **_MM)
# The H6B/LH6B strides are written 48/32 and 48/24 in the configs.
_add("mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms_speedup",
     lr=1e-4, num_layers=48, layer_decay_rate=0.85, skip_stride=[1.5], **_MM)
_add("dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms",
     lr=2e-4, num_layers=48, layer_decay_rate=0.85, skip_stride=[1.5], grad_clip_max_norm=0.1, **_MM)
_add("mask_rcnn_internvit_lh6b_1536_1024_512_fpn_1x_coco_bs32_ms",
     lr=2e-4, num_layers=48, layer_decay_rate=0.85, skip_stride=[1.5, 2.0], **_MM)
_add("dino_4scale_internvit_lh6b_1536_1024_512_fpn_2x_coco_bs32_ms",
     lr=2e-4, num_layers=48, layer_decay_rate=0.85, skip_stride=[1.5, 2.0], grad_clip_max_norm=0.1, **_MM)
# Single-branch baselines (no skip_stride).
_add("mask_rcnn_deit_vit_b_fpn_1x_coco_bs16", lr=1e-4, num_layers=12, layer_decay_rate=0.95, **_MM)
_add("mask_rcnn_deit_vit_l_fpn_1x_coco_bs16", lr=1e-4, num_layers=24, layer_decay_rate=0.95, **_MM)
_add("mask_rcnn_internvit_6b_fpn_1x_coco_bs16_ms", lr=1e-4, num_layers=48, layer_decay_rate=0.95, **_MM)
_add("mask_rcnn_convnext-base_1024_regular-fpn", task="detection", rule="default", lr=1e-4, weight_decay=0.05)
# ConvNeXt / hybrid detectors: the ConvNeXt parameters match no layer rule (scale 1).
_add("mask_rcnn_convnext-tsb_1024_672_448_regular-fpn mask_rcnn_convnext-t_vit-s_vit-b_1024_672_448_regular-fpn "
     "mask_rcnn_convnext-t_convnext-s_vit-b_1024_672_448_regular-fpn mask_rcnn_convnext-t_vit-s_convnext-b_1024_672_448_regular-fpn",
     lr=2e-4, num_layers=12, layer_decay_rate=0.8, skip_stride=[1, 3], **_MM)
_add("mask_rcnn_vit-t_convnext-s_vit-b_1024_672_448_regular-fpn mask_rcnn_vit-t_convnext-s_convnext-b_1024_672_448_regular-fpn "
     "mask_rcnn_vit-t_vit-s_convnext-b_1024_672_448_regular-fpn",
     lr=2e-4, num_layers=12, layer_decay_rate=0.8, skip_stride=[1, 1], **_MM)
# Segmentation (mmseg's copy of the constructor; the stride is a bare number there).
_add("upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5 upernet_internvit_h6b_256_512_80k_ade20k_bs16_lr4e-5 "
     "upernet_internvit_h6b_384_512_80k_ade20k_bs16_lr4e-5 upernet_internvit_h6b_512_512_80k_ade20k_bs16_lr4e-5",
     task="segmentation", rule="layer_decay", lr=4e-5, weight_decay=0.05, num_layers=48, layer_decay_rate=0.95,
     skip_stride=1.5)
_add("upernet_internvit_6b_512_80k_ade20k_bs16_lr4e-5", task="segmentation", rule="layer_decay", lr=4e-5,
     weight_decay=0.05, num_layers=48, layer_decay_rate=0.95)
# Classification: slurm_train.sh's command (--lr 3e-5 --unscale-lr --weight-decay 0.1
# --from_scratch_lr_ratio 10; timm's AdamW with torch's default betas and eps 1e-8).
_add("piip_3branch_sbl_320-160-96_cls_token_augreg piip_3branch_sbl_384-192-128_cls_token_augreg "
     "piip_3branch_tsb_368-192-128_cls_token_deit1",
     task="classification", rule="classification", lr=3e-5, weight_decay=0.1, lr_ratio=10.0, precision="fp16_autocast",
     notes=("main.py also keeps a model EMA (decay 0.99996) by default; not part of the optimizer",))

# Recipe fields a caller may override; everything else goes to torch.optim.AdamW.
_RECIPE_KEYS = ("lr", "betas", "eps", "weight_decay", "num_layers", "layer_decay_rate", "skip_stride", "lr_ratio",
                "grad_clip_max_norm")


def get_recipe(preset: str) -> Recipe:
    """The official optimizer recipe of a preset (:class:`Recipe`); a clear error for presets
    the official code does not train with one of these constructors."""
    from .models.presets import ALIASES, PAPER_ONLY, PRESETS

    if preset in RECIPES:
        return RECIPES[preset]
    if preset in PAPER_ONLY:
        raise ValueError(f"{preset!r} is a paper-only preset: no official config, so no official training recipe")
    if preset in PRESETS or preset in ALIASES:
        cfg = PRESETS[ALIASES[preset][0]] if preset in ALIASES else PRESETS[preset]
        if cfg.output == "llava":
            raise ValueError(f"{preset!r}: PIIP-LLaVA trains with the LLaVA trainer, not with one of the official "
                             "mmcv/timm constructors; no recipe is provided")
        raise ValueError(f"no official optimizer recipe recorded for preset {preset!r}")
    import difflib

    close = difflib.get_close_matches(preset, RECIPES, n=3, cutoff=0.3)
    raise KeyError(f"unknown PIIP preset {preset!r}" + (f"; did you mean {close}?" if close else "; see piip.list_models()"))


# ---------------------------------------------------------------------------------------------
# The official rules, on official names (with the "backbone." prefix for detection/segmentation)

_EMBED_EXACT = re.compile(r"backbone\.(?:branch[1-4]\.)?(?:cls_token|mask_token|pos_embed|visual_embed)")
_EMBED_PREFIX = re.compile(r"backbone\.(?:branch[1-4]\.)?(?:patch_embed|visual_embed)")
_BLOCKS = re.compile(r"backbone\.(?:branch([1-4])\.)?(?:blocks|layers)")


def vit_layer_id(name: str, num_max_layer: int, skip_stride=1):
    """The layer id the official layer-decay constructors give ``name`` (an int, or a float
    for fractional skip strides). ``num_max_layer`` is the config's num_layers + 2."""
    strides = skip_stride if isinstance(skip_stride, list) else [skip_stride]
    name = name.replace("cb_modules.0.", "").replace("cb_modules.1.", "").replace("levels.", "layers.")
    if _EMBED_EXACT.fullmatch(name) or _EMBED_PREFIX.match(name):
        return 0
    m = _BLOCKS.match(name)
    if m:
        branch = int(m.group(1) or 0)
        block = int(name.split(".")[3 if branch else 2])
        # Branch 1 (and a single-branch backbone) is not strided; branch k uses stride k - 2.
        return block + 1 if branch <= 1 else (block + 1) * strides[branch - 2]
    return num_max_layer - 1


def _no_decay(name: str, ndim: int) -> bool:
    # The bare-name exemption never matches a prefixed name (see the module docstring).
    return ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")


_SCRATCH_KEEP = ("branch1.", "branch2.", "branch3.", "branch4.", "blocks", "patch_embed", "pos_embed", "cls_token")


class _Assigner:
    """Assigns official names to groups in parameter order, as the constructors do:
    ``assign(name, ndim) -> (group key, {"layer_id", "lr_scale", "weight_decay"})``."""

    def __init__(self, recipe: Recipe):
        self.r = recipe
        self.scales: dict = {}  # group key -> scale, set by the group's first member

    def assign(self, name: str, ndim: int, outside: bool = False):
        """``outside``: a parameter outside the backbone (a task model's neck or head), which the
        constructors give the last layer id (layer decay: scale 1) or the from-scratch ratio
        (classification), whatever its name; its name still decides its weight decay."""
        r = self.r
        if r.rule == "classification":
            if r.lr_ratio != 1.0:
                ratio = r.lr_ratio if outside or not name.startswith(_SCRATCH_KEEP) else 1
                return ("ratio", ratio), {"layer_id": 0, "lr_scale": ratio, "weight_decay": r.weight_decay}
            # Ratio 1: main.py hands timm the model, and timm exempts 1-D tensors and biases
            # (the official PIIP classifier defines no no_weight_decay()).
            decay = not (ndim == 1 or name.endswith(".bias"))
            return ("ratio", 1, decay), {"layer_id": 0, "lr_scale": 1, "weight_decay": r.weight_decay if decay else 0.0}
        if r.rule == "default":
            return ("all",), {"layer_id": 0, "lr_scale": 1.0, "weight_decay": r.weight_decay}
        num_layers = r.num_layers + 2
        skip = r.skip_stride if r.skip_stride is not None else 1
        decay = not _no_decay(name, ndim)
        raw = num_layers - 1 if outside else vit_layer_id(name, num_layers, skip)
        key = (int("%d" % raw), decay)
        if key not in self.scales:
            self.scales[key] = r.layer_decay_rate ** (num_layers - raw - 1)
        return key, {"layer_id": key[0], "lr_scale": self.scales[key], "weight_decay": r.weight_decay if decay else 0.0}


def _official_prefix(recipe: Recipe) -> str:
    return "" if recipe.task == "classification" else "backbone."


@lru_cache(maxsize=8)
def _official_groups_cached(preset: str):
    from .models.presets import build_model, get_config
    from .official import official_config, official_names

    recipe = get_recipe(preset)

    with torch.device("meta"):
        model = build_model(official_config(get_config(preset)))
    sd = model.state_dict()
    prefix = _official_prefix(recipe)
    a = _Assigner(recipe)
    return tuple((prefix + on, a.assign(prefix + on, sd[k].dim() - len(i or ()))[1])
                 for on, (k, i) in official_names(model).items())


def official_param_groups(preset_or_model, preset: str | None = None) -> dict[str, dict]:
    """Name -> ``{"layer_id": int, "lr_scale": float, "weight_decay": float}`` as the official
    constructor assigns them.

    Given a preset name: every parameter of the preset's official model, under its official
    name. Given a model (a :class:`piip.PIIP`, or a task model holding one at any prefix, e.g. a
    segmenter whose ``backbone`` wraps the PIIP; DDP / DataParallel / ``torch.compile`` wrappers
    are looked through) and optionally the preset (default: the PIIP's own): its trainable
    parameters, as :func:`build_optimizer` groups them. The PIIP's parameters get exactly the
    groups of a bare PIIP, under their official names (relative to the PIIP); every other
    parameter is outside the backbone, under its name in the model: the last layer id and scale
    1 (classification: the from-scratch ratio), decayed unless 1-D or named ``*.bias``.

    Detection and segmentation names carry the ``backbone.`` prefix the constructor sees;
    classification names are bare. Classification has no layer ids (``layer_id`` is 0) and
    ``lr_scale`` is 1 for the pretrained branches and the lr ratio (10) for the rest.
    """
    if isinstance(preset_or_model, str):
        if preset is not None:
            raise TypeError("official_param_groups: pass a preset name or a model (with preset=), not two presets")
        get_recipe(preset_or_model)  # a clear error before building anything
        return {n: dict(v) for n, v in _official_groups_cached(preset_or_model)}
    if not isinstance(preset_or_model, nn.Module):
        raise TypeError(f"official_param_groups: expected a preset name or an nn.Module, got {type(preset_or_model).__name__}")
    model = _unwrap(preset_or_model)
    out: dict[str, dict] = {}
    who = "official_param_groups"
    for names, _, _, v in _named_groups(model, _recipe_for(model, preset, {}, who), who):
        for n in names:
            if n in out:
                raise ValueError(f"official_param_groups: two parameters are named {n!r} (a parameter outside the PIIP "
                                 "has an official PIIP name)")
            out[n] = dict(v)
    return out


# ---------------------------------------------------------------------------------------------
# The optimizer


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers: the names the rules see."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _find_piip(model: nn.Module, who: str = "build_optimizer"):
    """The PIIP in ``model`` (or ``model`` itself). PIIPs whose parameters are all frozen (a
    teacher) are not trained, so they are left out; two trained PIIPs are refused."""
    from .models.piip import PIIP

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PIIP)]
    if not found:
        raise TypeError(f"{who}: no piip.PIIP inside {type(model).__name__}")
    trained = [(n, m) for n, m in found if any(p.requires_grad for p in m.parameters())]
    if len(trained) > 1:
        where = ", ".join(repr(n or "<the model itself>") for n, _ in trained)
        raise ValueError(f"{who}: {type(model).__name__} holds {len(trained)} trainable PIIP models (at {where}); the "
                         "official recipe has one backbone: build one optimizer per PIIP, or freeze the ones not trained")
    return (trained or found)[0][1]


def _recipe_for(model: nn.Module, preset: str | None, overrides: dict, who: str) -> Recipe:
    preset = preset or _find_piip(model, who).cfg.name
    if not preset:
        raise ValueError(f"{who}: the model records no preset name (it was not built by piip.create_model); "
                         "pass preset=<official config name>")
    return replace(get_recipe(preset), **overrides)


def _named_groups(model: nn.Module, recipe: Recipe, who: str = "build_optimizer"):
    """(names the rule saw, parameter, group key, group values) for every trainable parameter,
    in parameter order: the PIIP's parameters under their official names (several for a
    tensor that holds several official parameters, the merge-weight vectors), the rest
    under their own names in ``model``, as parameters outside the backbone (neck and heads)."""
    from .official import official_names

    piip_model = _find_piip(model, who)
    prefix = _official_prefix(recipe)
    ours = dict(piip_model.named_parameters())
    official_of: dict[str, list] = {}
    for on, (k, i) in official_names(piip_model).items():
        if k in ours:  # parameters only (buffers have official names too)
            official_of.setdefault(k, []).append((prefix + on, ours[k].dim() - len(i or ())))
    piip_ids = {id(p): k for k, p in ours.items()}
    a = _Assigner(recipe)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen weights, as the constructors skip them
        if id(p) in piip_ids:
            k = piip_ids[id(p)]
            found = [(on, *a.assign(on, nd)) for on, nd in official_of[k]]
            # A tensor holding several official parameters (the merge-weight vector) must have
            # one group for all of them; the official rules never split one.
            if len({key for _, key, _ in found}) != 1:
                raise ValueError(f"parameter {k!r} holds official parameters of different groups: {[f[0] for f in found]}")
            out.append(([on for on, _, _ in found], p, found[0][1], found[0][2]))
        else:
            out.append(([name], p, *a.assign(name, p.dim(), outside=True)))
    return out


def _check_options(options: dict) -> tuple[dict, dict]:
    recipe_kw = {k: options.pop(k) for k in _RECIPE_KEYS if k in options}
    torch_params = inspect.signature(torch.optim.AdamW).parameters
    unknown = [k for k in options if k not in torch_params or k in ("params", "fused")]
    if unknown:
        extra = sorted(k for k in torch_params if k not in ("params", "lr", "betas", "eps", "weight_decay", "fused"))
        raise TypeError(f"build_optimizer: unknown option(s) {unknown}; recipe options: {list(_RECIPE_KEYS)}; "
                        f"torch.optim.AdamW options in torch {torch.__version__}: {extra}")
    return recipe_kw, options


def _fused_reasons(tensors) -> list[str]:
    """Why torch's fused AdamW cannot step these tensors (empty: it can)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return [f"torch {torch.__version__} has no fused AdamW (torch >= 2.0 on CUDA, >= 2.4 on the CPU)"]
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cuda"}
    reasons = []
    for t in tensors:
        if t.device.type not in devices:
            reasons.append(f"a parameter on {t.device.type!r} (torch's fused AdamW supports {sorted(devices)})")
        elif not t.is_floating_point():
            reasons.append(f"a {t.dtype} parameter (fused AdamW needs floating point)")
    return sorted(set(reasons))


def build_optimizer(model: nn.Module, preset: str | None = None, fused: bool | None = None,
                    master_weights: bool | None = None, **overrides) -> torch.optim.Optimizer:
    """AdamW with the official parameter groups and hyperparameters of ``preset``.

    Args:
        model: a :class:`piip.PIIP`, or any module holding one at any prefix (a detector or
            segmenter with neck and heads, e.g. a transformers task model whose ``backbone``
            wraps the PIIP; DDP / DataParallel / ``torch.compile`` wrappers are looked through):
            the PIIP's parameters get exactly the groups of a bare PIIP, under their official
            names; every other parameter follows the official rule for names outside the
            backbone, under its own name (see :func:`official_param_groups`). Frozen parameters
            are left out; a module with two trainable PIIPs is refused. Works on models sharded
            by FSDP2 (``piip.distributed.apply_fsdp``, ``fully_shard``) and inside DDP.
        preset: the recipe to follow; None takes the PIIP's preset (``cfg.name``, which
            ``piip.create_model`` records).
        fused: None: torch's default AdamW implementation (what the official code runs);
            True: torch's fused AdamW (CUDA, and the CPU from torch 2.4); it raises, naming the
            reason, where torch cannot fuse (never a silent fallback); False: not fused.
        master_weights: the DeepSpeed ZeRO-1 bf16 scheme, :class:`MasterWeightAdamW`: bf16/fp16
            parameters get fp32 master copies that the optimizer steps, with their gradients cast
            to fp32, and the result is written back. None: on when any trainable parameter is
            bf16/fp16. fp32 parameters are their own masters, so under ``apply_fsdp`` (fp32 shards)
            nothing is copied. False with bf16 parameters: plain AdamW on the bf16 tensors.
        **overrides: recipe fields (lr, betas, eps, weight_decay, num_layers, layer_decay_rate,
            skip_stride, lr_ratio, grad_clip_max_norm) and other torch.optim.AdamW options
            (amsgrad, foreach, ...).

    Gradient clipping: the recipe's ``grad_clip_max_norm`` (0.1 in the DINO configs) is applied
    by the optimizer, inside ``step()``, to the global 2-norm of the fp32 gradients, so a trainer
    that clips too (transformers' ``max_grad_norm``, mmengine's ``clip_grad``) changes nothing at
    the same norm; ``grad_clip_max_norm=None`` turns it off for a trainer that clips itself, and
    ``opt.grad_clip_max_norm`` tells such a trainer the recipe's value. The optimizer is then a
    :class:`MasterWeightAdamW` (with ``master_weights=False`` it steps the parameters as they
    are); without masters and clipping it is a plain ``torch.optim.AdamW``.

    Every group carries ``lr_scale``, ``layer_id``, ``group_name`` and ``param_names`` besides
    torch's keys; its ``lr`` is ``lr_scale * lr`` as in the official constructors.
    """
    model = _unwrap(model)
    recipe_kw, torch_kw = _check_options(dict(overrides))
    recipe = _recipe_for(model, preset, recipe_kw, "build_optimizer")
    groups: dict = {}
    for (name, *_), p, key, v in _named_groups(model, recipe):
        g = groups.get(key)
        if g is None:
            if recipe.rule == "classification":
                gname = f"lr_ratio_{v['lr_scale']:g}" + ("" if len(key) == 2 else "_decay" if key[2] else "_no_decay")
            elif recipe.rule == "default":
                gname = "all"
            else:
                gname = "layer_%d_%s" % (v["layer_id"], "decay" if key[1] else "no_decay")
            g = groups[key] = {"params": [], "param_names": [], "lr": v["lr_scale"] * recipe.lr,
                               "weight_decay": v["weight_decay"], "lr_scale": v["lr_scale"],
                               "layer_id": v["layer_id"], "group_name": gname}
        g["params"].append(p)
        g["param_names"].append(name)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    params = [p for g in groups.values() for p in g["params"]]
    low = [p for p in params if p.dtype in LOW_PRECISION]
    if master_weights is None:
        master_weights = bool(low)
    kw = dict(lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps, weight_decay=recipe.weight_decay, **torch_kw)
    if fused is not None:
        if fused:
            # With master weights the fused kernel steps fp32 masters on the parameters' devices.
            reasons = _fused_reasons(params)
            if reasons:
                raise ValueError("build_optimizer(fused=True): torch's fused AdamW cannot run here: " + "; ".join(reasons))
        kw["fused"] = bool(fused)
    if master_weights or recipe.grad_clip_max_norm is not None:
        return MasterWeightAdamW(list(groups.values()), master_weights=master_weights,
                                 grad_clip_max_norm=recipe.grad_clip_max_norm, **kw)
    return torch.optim.AdamW(list(groups.values()), **kw)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2 parameters), any other tensor itself."""
    return getattr(t, "_local_tensor", t)


def _mark(p: torch.Tensor) -> tuple:
    """What changes when a parameter is written outside the optimizer: its version counter
    (in-place writes: ``load_state_dict``, ``copy_``, ``_foreach_copy_``) and its storage
    (``param.data = ...``, ``torch.utils.swap_tensors``), and its dtype."""
    return p._version, _local(p).data_ptr(), p.dtype


def _adamw_step(opt: torch.optim.AdamW) -> None:
    # torch wraps an optimizer class's step() with the step hooks once an instance exists;
    # MasterWeightAdamW.step has run them already, so call AdamW's own step without them.
    step = torch.optim.AdamW.step
    (step.__wrapped__ if getattr(step, "hooked", False) else step)(opt)


def _rekey(state, mapping: dict):
    out = defaultdict(dict)
    for k, v in state.items():
        out[mapping.get(k, k) if isinstance(k, torch.Tensor) else k] = v
    return out


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW stepping fp32 master copies of bf16/fp16 parameters (the DeepSpeed ZeRO-1 bf16
    scheme, on one device or per FSDP2 shard): each step casts the parameters' gradients to
    fp32, steps the masters (torch's AdamW, any implementation: default, foreach or fused) and
    writes the masters back rounded to the parameters' dtype. fp32 parameters are their own
    masters (no copy); ``master_weights=False`` makes every parameter its own master.

    From outside it is a plain AdamW over the model's parameters: ``param_groups`` hold the
    parameters (so clipping over the optimizer's parameters, as mmengine's ``OptimWrapper``
    does, and over ``model.parameters()``, as transformers' ``Trainer`` does, clip the same
    gradients, the ones the step applies), ``state`` is keyed by them (fp32 moments), and
    ``add_param_group`` gives new bf16/fp16 parameters masters.

    The parameters are authoritative: a parameter written outside ``step()`` (``load_state_dict``,
    ``piip.load_pretrained_branch``, ``piip.load_official_checkpoint``, an EMA swap that
    assigns ``param.data`` or copies into the parameter) is seen by its version counter or its
    storage at the next ``step()`` or ``state_dict()``, and its master re-reads it: elementwise,
    the master keeps its fp32 bits where it still rounds to the parameter and takes the
    parameter's value elsewhere. Writes that no version counter records (in place through
    ``param.data``, e.g. ``param.data.copy_(x)``) are not seen: call :meth:`sync_masters` after them.

    ``grad_clip_max_norm``: clip the global 2-norm of the fp32 gradients inside ``step()``
    (after any clipping the caller did; clipping twice at one norm is clipping once), as the
    official recipes that clip do (:func:`build_optimizer` passes the recipe's value).

    GradScaler (``torch.amp.GradScaler``) works with fp16 weights: ``scaler.step(opt)`` hands
    the scale to this optimizer, which unscales the fp32 gradients and skips the step when the
    scaler found an inf or NaN. ``scaler.unscale_(opt)`` refuses fp16 gradients (torch's
    "Attempting to unscale FP16 gradients"): with fp16 weights, clip with ``grad_clip_max_norm``.

    ``state_dict()`` is torch's, with each stepped parameter's master in its state under
    ``"master"``; ``load_state_dict`` accepts it and plain AdamW checkpoints (masters then come
    from the parameters), in either order with the model's own ``load_state_dict``. A saved
    master is kept where it rounds to the parameter. A bf16 run's checkpoint loaded where the
    parameter is fp32 now (resumed without bf16): the parameter takes the saved master at the
    next ``step()`` where the master rounds to it (the model's bf16 weights), so training goes on
    from the fp32 values, and the entry is not kept. A plain torch AdamW loads such a checkpoint
    too, but keeps every ``"master"`` in its state (an fp32 copy of each weight, never updated,
    saved again) and steps the rounded weights: build with ``master_weights=True`` to resume one.
    """

    def __init__(self, params, *args, master_weights: bool = True, grad_clip_max_norm: float | None = None, **kw):
        if grad_clip_max_norm is not None and not grad_clip_max_norm > 0:
            raise ValueError(f"MasterWeightAdamW: grad_clip_max_norm must be positive or None, got {grad_clip_max_norm!r}")
        self.master_weights = bool(master_weights)
        self.grad_clip_max_norm = grad_clip_max_norm
        self._masters: dict = {}   # low-precision parameter -> its fp32 master
        self._seen: dict = {}      # parameter -> _mark at the last write-back or check
        self._pending: dict = {}   # fp32 parameter -> a loaded master, taken at the next step()
        super().__init__(params, *args, **kw)   # calls add_param_group for each group
        self._step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf

    def __getstate__(self):
        # torch pickles only defaults, state and groups; the masters and options go along.
        return {**super().__getstate__(), "master_weights": self.master_weights, "_masters": self._masters,
                "grad_clip_max_norm": self.grad_clip_max_norm, "_step_supports_amp_scaling": True,
                "_pending": self._pending}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_pending", {})
        self._seen = dict.fromkeys(self._masters)   # checked against the parameters at the next step

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if self.master_weights:
            for p in self.param_groups[-1]["params"]:
                if p.dtype in LOW_PRECISION:
                    self._masters[p] = p.detach().float()
                    self._seen[p] = _mark(p)

    @property
    def masters(self) -> dict:
        """Parameter -> its fp32 master, for the bf16/fp16 parameters."""
        return dict(self._masters)

    @property
    def _pairs(self) -> list:
        return list(self._masters.items())

    @torch.no_grad()
    def sync_masters(self, changed_only: bool = False) -> None:
        """Re-read the parameters into the masters: every parameter (after a write that no
        version counter records, such as ``param.data.copy_(x)``), or with ``changed_only``
        those whose version or storage changed since the optimizer last wrote them (what
        ``step()`` and ``state_dict()`` do). Where a master still rounds to its parameter it
        keeps its fp32 bits, elsewhere it takes the parameter's value."""
        for p, m in self._masters.items():
            if changed_only and _mark(p) == self._seen[p]:
                continue
            if p.shape != m.shape or p.device != m.device:
                raise RuntimeError(f"MasterWeightAdamW: a parameter of shape {tuple(m.shape)} on {m.device} is now "
                                   f"{tuple(p.shape)} on {p.device}: build the optimizer after moving or resizing the model")
            lp, lm = _local(p), _local(m)
            lm.copy_(torch.where(lm.to(lp.dtype) == lp, lm, lp))
            self._seen[p] = _mark(p)

    @contextmanager
    def _on_masters(self):
        """torch's AdamW sees the masters in place of the parameters (groups and state)."""
        if not self._masters:
            yield
            return
        outer = [g["params"] for g in self.param_groups]
        for g in self.param_groups:
            g["params"] = [self._masters.get(p, p) for p in g["params"]]
        self.state = _rekey(self.state, self._masters)
        try:
            yield
        finally:
            # load_state_dict replaces the group dicts: restore by position.
            for g, ps in zip(self.param_groups, outer):
                g["params"] = ps
            self.state = _rekey(self.state, {m: p for p, m in self._masters.items()})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by GradScaler.step for optimizers that handle the scale themselves.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return loss   # an inf or NaN gradient: skip the step, as torch's fused AdamW does
        self._take_pending()
        self.sync_masters(changed_only=True)
        pairs = [(p, m) for p, m in self._masters.items() if p.grad is not None]
        if pairs:
            grads32 = [torch.empty_like(m) for _, m in pairs]
            # bf16 -> fp32, one multi-tensor call (on the shards: DTensor has no _foreach_copy_)
            torch._foreach_copy_([_local(g) for g in grads32], [_local(p.grad) for p, _ in pairs])
            for (_, m), g in zip(pairs, grads32):
                m.grad = g
        stepped = [m for _, m in pairs] + [p for g in self.param_groups for p in g["params"]
                                           if p.grad is not None and p not in self._masters]
        try:
            if grad_scale is not None:
                for device, grads in _by_device([t.grad for t in stepped]).items():
                    torch._foreach_div_(grads, grad_scale.to(device))
            if self.grad_clip_max_norm is not None and stepped:
                torch.nn.utils.clip_grad_norm_(stepped, self.grad_clip_max_norm)
            if grad_scale is not None or found_inf is not None:
                self.grad_scale = self.found_inf = None   # handled: torch's AdamW must not apply them again
            with self._on_masters():
                _adamw_step(self)
        finally:
            if grad_scale is not None or found_inf is not None:
                self.grad_scale, self.found_inf = grad_scale, found_inf   # GradScaler deletes them
            for _, m in pairs:
                m.grad = None   # the fp32 gradients live only during the step
        if pairs:
            torch._foreach_copy_([_local(p) for p, _ in pairs], [_local(m) for _, m in pairs])   # fp32 -> bf16, rounded
            for p, _ in pairs:
                self._seen[p] = _mark(p)
        return loss

    @torch.no_grad()
    def _take_pending(self) -> None:
        """fp32 parameters take the masters loaded for them (a bf16 checkpoint) where the master
        rounds to the parameter, i.e. where the parameter holds the checkpoint's bf16/fp16 weight."""
        for p, v in self._pending.items():
            lp, lv = _local(p), _local(v)
            if lp.shape != lv.shape or not lp.is_floating_point():
                continue
            rounds = torch.zeros_like(lp, dtype=torch.bool)
            for dtype in LOW_PRECISION:
                rounds |= lv.to(dtype).to(lp.dtype) == lp
            lp.copy_(torch.where(rounds, lv.to(lp.dtype), lp))
        self._pending.clear()

    def state_dict(self):
        self.sync_masters(changed_only=True)
        sd = super().state_dict()
        order = (p for g in self.param_groups for p in g["params"])
        for i, p in zip((i for g in sd["param_groups"] for i in g["params"]), order):
            m = self._masters.get(p)
            # Only stepped parameters have state; a master differs from its parameter only
            # after a step.
            if m is None:
                m = self._pending.get(p)   # loaded, not yet taken: saved again as it was
            if m is not None and i in sd["state"]:
                sd["state"][i] = {**sd["state"][i], "master": m}
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        saved, state = {}, {}
        for i, s in state_dict["state"].items():
            s = dict(s)
            if "master" in s:
                saved[i] = s.pop("master")
            if s:
                state[i] = s
        state_dict["state"] = state
        # Loaded onto the masters, so torch casts the moments to fp32, not to the parameters' dtype.
        with self._on_masters():
            super().load_state_dict(state_dict)
        params = (p for g in self.param_groups for p in g["params"])
        self._pending.clear()
        with torch.no_grad():
            for i, p in zip((i for g in state_dict["param_groups"] for i in g["params"]), params):
                m = self._masters.get(p)
                if m is None:
                    v = saved.get(i)
                    if v is not None and p.dtype not in LOW_PRECISION and tuple(v.shape) == tuple(p.shape):
                        # A bf16 run's master for a parameter that is fp32 now: taken at the next step
                        # (the model's weights may be loaded after the optimizer's).
                        self._pending[p] = v.to(p.device, torch.float32)
                    continue
                v = saved.get(i)
                if v is None:
                    _local(m).copy_(_local(p))   # a plain AdamW checkpoint: the parameter's value
                    self._seen[p] = _mark(p)
                    continue
                if tuple(v.shape) != tuple(m.shape):
                    raise ValueError(f"MasterWeightAdamW.load_state_dict: the master of parameter {i} has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(m.shape)}")
                m.copy_(v)
                # Kept only where it rounds to the parameter, checked at the next step (the model's
                # weights may be loaded after the optimizer's).
                self._seen[p] = None


def _by_device(tensors) -> dict:
    out: dict = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Counting copies and casts


_ITEMSIZE = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4, "short int": 2,
             "signed char": 1, "unsigned char": 1, "bool": 1, "c10::complex<float>": 8, "c10::complex<double>": 16,
             "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}


@dataclass
class CopyCount:
    """Copies in one profiled call. ``count``: ``aten::copy_`` calls (every copy or cast that
    materialises a tensor ends in one: ``.to``, ``.float()``, ``clone``, ``contiguous``, and the
    per-tensor loop of ``_foreach_copy_``) plus multi-tensor ``aten::_foreach_copy_`` calls that
    ran as one kernel; ``bytes``: bytes written by the ``copy_`` calls (the profiler does not
    record the shapes of a multi-tensor call: where ``_foreach_copy_`` runs as one kernel, as it
    may on a GPU, :class:`MasterWeightAdamW`'s casts write 6 bytes per bf16 parameter element
    that are not in ``bytes``); ``casts`` and ``cast_bytes``: the subset that changes dtype.
    ``n, b = profile_copies(fn)`` unpacks (count, bytes)."""

    count: int = 0
    bytes: int = 0
    casts: int = 0
    cast_bytes: int = 0
    by_dtype: dict = field(default_factory=dict)   # "src->dst" (profiler dtype names) -> [count, bytes]

    def __iter__(self):
        return iter((self.count, self.bytes))


def count_copies(prof) -> CopyCount:
    """:class:`CopyCount` from a finished ``torch.profiler.profile(record_shapes=True)``."""
    out = CopyCount()
    events = list(prof.events())
    for e in events:
        if e.name == "aten::_foreach_copy_":
            # Its per-tensor fallback shows up as copy_ children, counted below.
            if not any(c.name == "aten::copy_" for c in e.cpu_children):
                out.count += 1
            continue
        if e.name != "aten::copy_":
            continue
        shapes, dtypes = e.input_shapes or [], getattr(e, "input_dtypes", None) or []
        dst = dtypes[0] if dtypes else "?"
        src = dtypes[1] if len(dtypes) > 1 else dst
        n = 1
        for s in (shapes[0] if shapes else []):
            n *= s
        b = n * _ITEMSIZE.get(dst, 0)
        out.count += 1
        out.bytes += b
        if src != dst:
            out.casts += 1
            out.cast_bytes += b
        tally = out.by_dtype.setdefault(f"{src}->{dst}", [0, 0])
        tally[0] += 1
        tally[1] += b
    return out


def profile_copies(step_fn, *args, **kwargs) -> CopyCount:
    """Runs ``step_fn(*args, **kwargs)`` once under the profiler and counts its copies and
    casts (:class:`CopyCount`). Run a warm-up step first: a first step also counts one-time
    work (optimizer state creation, compilation)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=True) as prof:
        step_fn(*args, **kwargs)
    return count_copies(prof)
