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
_RECIPE_KEYS = ("lr", "betas", "eps", "weight_decay", "num_layers", "layer_decay_rate", "skip_stride", "lr_ratio")


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

    def assign(self, name: str, ndim: int):
        r = self.r
        if r.rule == "classification":
            if r.lr_ratio != 1.0:
                ratio = 1 if name.startswith(_SCRATCH_KEEP) else r.lr_ratio
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
        raw = vit_layer_id(name, num_layers, skip)
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


def official_param_groups(preset: str) -> dict[str, dict]:
    """Official parameter name -> ``{"layer_id": int, "lr_scale": float, "weight_decay": float}``
    for every parameter of the preset's official model, as the official constructor assigns them.

    Detection and segmentation names carry the ``backbone.`` prefix the constructor sees;
    classification names are bare. Classification has no layer ids (``layer_id`` is 0) and
    ``lr_scale`` is 1 for the pretrained branches and the lr ratio (10) for the rest.
    """
    get_recipe(preset)  # a clear error before building anything
    return {n: dict(v) for n, v in _official_groups_cached(preset)}


# ---------------------------------------------------------------------------------------------
# The optimizer


def _find_piip(model: nn.Module):
    from .models.piip import PIIP

    for m in model.modules():
        if isinstance(m, PIIP):
            return m
    raise TypeError(f"build_optimizer: no piip.PIIP inside {type(model).__name__}")


def _named_groups(model: nn.Module, recipe: Recipe):
    """(name the rule saw, parameter, group key, group values) for every trainable parameter,
    in parameter order: the PIIP's parameters under their official names, the rest under
    their own names in ``model`` (neck and heads, outside the backbone)."""
    from .official import official_names

    piip_model = _find_piip(model)
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
            out.append((found[0][0], p, found[0][1], found[0][2]))
        else:
            out.append((name, p, *a.assign(name, p.dim())))
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
        model: a :class:`piip.PIIP`, or any module containing one (a detector with neck and
            heads): the PIIP's parameters are grouped under their official names, every other
            parameter by the official rule for names outside the backbone, under its own name.
            Frozen parameters are left out. Works on a model sharded by ``piip.distributed.apply_fsdp``.
        preset: the recipe to follow; None takes the model's preset (``model.cfg.name``, which
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
            skip_stride, lr_ratio) and other torch.optim.AdamW options (amsgrad, foreach, ...).

    Every group carries ``lr_scale``, ``layer_id`` and ``group_name`` besides torch's keys; its
    ``lr`` is ``lr_scale * lr`` as in the official constructors.
    """
    piip_model = _find_piip(model)
    preset = preset or piip_model.cfg.name
    if not preset:
        raise ValueError("build_optimizer: the model records no preset name (it was not built by piip.create_model); "
                         "pass preset=<official config name>")
    recipe_kw, torch_kw = _check_options(dict(overrides))
    recipe = replace(get_recipe(preset), **recipe_kw)
    groups: dict = {}
    for name, p, key, v in _named_groups(model, recipe):
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
    cls = MasterWeightAdamW if master_weights else torch.optim.AdamW
    return cls(list(groups.values()), **kw)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW stepping fp32 master copies of bf16/fp16 parameters (the DeepSpeed ZeRO-1 bf16
    scheme, on one device or per shard): each step casts the parameters' gradients to fp32,
    steps the masters (torch's AdamW, any implementation: default, foreach or fused), and
    writes the masters back rounded to the parameters' dtype. fp32 parameters are their own
    masters (no copy).

    ``param_groups[i]["params"]`` hold the masters; the model's parameters are in
    ``model_params`` (same order). ``zero_grad`` clears the model's gradients. ``state_dict``
    adds the masters under ``"master_weights"``; ``load_state_dict`` restores them and writes
    them back to the parameters (a state dict without them keeps the current masters).
    """

    def __init__(self, params, **kw):
        groups = [dict(g) for g in params] if isinstance(params, (list, tuple)) and params and isinstance(params[0], dict) \
            else [{"params": list(params)}]
        self.model_params: list[torch.Tensor] = []
        for g in groups:
            masters = []
            for p in g["params"]:
                self.model_params.append(p)
                masters.append(p.detach().float() if p.dtype in LOW_PRECISION else p)
            g["params"] = masters
        super().__init__(groups, **kw)
        masters = [m for g in self.param_groups for m in g["params"]]
        self._pairs = [(p, m) for p, m in zip(self.model_params, masters) if m is not p]

    @torch.no_grad()
    def _grads_to_masters(self) -> None:
        have = [(p, m) for p, m in self._pairs if p.grad is not None]
        for p, m in self._pairs:
            m.grad = None
        if have:
            grads32 = [torch.empty_like(m) for _, m in have]
            torch._foreach_copy_(grads32, [p.grad for p, _ in have])   # bf16 -> fp32, one multi-tensor call
            for (_, m), g in zip(have, grads32):
                m.grad = g

    @torch.no_grad()
    def _masters_to_params(self) -> None:
        if self._pairs:
            torch._foreach_copy_([p for p, _ in self._pairs], [m for _, m in self._pairs])  # fp32 -> bf16, rounded

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._grads_to_masters()
        super().step()
        self._masters_to_params()
        for _, m in self._pairs:
            m.grad = None  # the fp32 gradients live only during the step
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, _ in self._pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        sd = super().state_dict()
        sd["master_weights"] = [m.detach().clone() for _, m in self._pairs]
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is None:
            return
        if len(masters) != len(self._pairs):
            raise ValueError(f"state dict holds {len(masters)} master weights, this optimizer has {len(self._pairs)}")
        with torch.no_grad():
            for (p, m), saved in zip(self._pairs, masters):
                if saved.shape != m.shape:
                    raise ValueError(f"master weight of shape {tuple(saved.shape)} for a parameter of shape {tuple(m.shape)}")
                m.copy_(saved)
            self._masters_to_params()


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
