"""Loading the official PIIP code's checkpoints (OpenGVLab/PIIP) with a checked key mapping.

Our parameter names are systematic (``branches.0.blocks.3.attn.qkv.weight``); the official
ones depend on the branch class (``gamma_1`` for DeiT, ``ls1.gamma`` for InternViT) and the
branch count (``interaction_units_23``). :func:`official_key` maps one to the other, and
the loaders refuse to load unless every key on both sides is used and every shape agrees.

Official behaviours that a clean model would not choose are options of our config,
which :func:`official_config` sets:
  - ``BranchConfig.pad_before_qkv`` (window padding before the qkv projection);
  - ``PIIPConfig.head_reads_first_patch`` (classification heads read patch token 0);
  - the 4-branch detection code builds branch 4 from branch 3's definition
    (:func:`official_config` with ``official_branch4_from_branch3=True``);
  - the DINO SBL and LH6B backbones build the 4x pyramid level although DINO never uses it;
  - images are resized by scale factor with floored sizes, position embeddings are
    resized bicubically from the stored grid, and the speedup/6B configs use the tanh GELU
    (these are data in the config, or the only behaviour of the model).
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import Tensor

from .models.config import BranchConfig, PIIPConfig, convnext_stage_groups
from .models.convnext import convnext_official_key
from .models.keys import check_state_dict
from .models.piip import PIIP

_UNIT_RE = re.compile(r"^interactions\.(\d+)\.(\d+)\.(to_a_proj|to_b_proj|to_a|to_b)\.(.*)$")
_BRANCH_RE = re.compile(r"^branches\.(\d+)\.(.*)$")
_INJ = {"to_a_proj": "branch2to1_proj", "to_b_proj": "branch1to2_proj",
        "to_a": "branch2to1_injector", "to_b": "branch1to2_injector"}
# PIIP-LLaVA checkpoints: where the encoder and the projector sit in the whole LLaVA model.
LLAVA_ENCODER_PREFIX = "model.vision_tower.vision_tower."
LLAVA_PROJECTOR_PREFIX = "model.mm_projector."


def _branch_key(i: int, rest: str, cfg: PIIPConfig) -> str:
    b = cfg.branches[i]
    # The single-branch ConvNeXt baseline is the wrapper itself: no "branch1." level.
    head = "" if cfg.output == "stages" else f"branch{i + 1}."
    if b.kind == "convnext":
        name = convnext_official_key(rest[len("convnext."):], b.family)
        if b.family == "timm":  # PIIP-LLaVA's patched timm block stores the layer scale as "weight"
            name = re.sub(r"^(stages\.\d+\.blocks\.\d+)\.gamma$", r"\1.weight", name)
        return head + "convnext_model." + name
    if b.kind == "clip":
        return head + "clip_model." + rest[len("clip."):]
    if rest.startswith("patch_embed."):
        rest = "patch_embed.proj." + rest[len("patch_embed."):]
    rest = re.sub(r"^(blocks\.\d+\.)ls([12])$", (r"\1gamma_\2" if b.family == "deit" else r"\1ls\2.gamma"), rest)
    return head + rest


def official_key(key: str, cfg: PIIPConfig) -> str:
    """Our parameter name -> the official one (the merge weights map to one scalar each, see
    :func:`official_names`). PIIP-LLaVA names carry the LLaVA model's module paths."""
    llava = cfg.output == "llava"
    m = _BRANCH_RE.match(key)
    if m:
        name = _branch_key(int(m.group(1)), m.group(2), cfg)
        return LLAVA_ENCODER_PREFIX + name if llava else name
    m = _UNIT_RE.match(key)
    if m:
        s, u, part, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        rest = rest.replace("ffn.dwconv.", "ffn.dwconv.dwconv.")
        if llava:  # the LLaVA code names the injector gains *_weight
            rest = re.sub(r"^(ca|cffn)_gamma$", r"\1_weight", rest)
        name = f"interactions.{s}.interaction_units_{u + 1}{u + 2}.{_INJ[part]}.{rest}"
        return LLAVA_ENCODER_PREFIX + name if llava else name
    m = re.match(r"^merge\.(\d+)\.(.*)$", key)
    if m:
        return f"merge_branch{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.match(r"^inter_merge\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        return f"intermediate_merging_{cfg.out_indexes[int(m.group(1))]}_branch{int(m.group(2)) + 1}.{m.group(3)}"
    m = re.match(r"^projector\.branches\.(\d+)\.(fc1|norm|fc2)\.(.*)$", key)
    if m:
        gn = cfg.projector_norm == "gn"
        index = {"fc1": 1, "norm": 3, "fc2": 6 if gn else 5}[m.group(2)]
        return f"{LLAVA_PROJECTOR_PREFIX}branch{int(m.group(1)) + 1}.{index}.{m.group(3)}"
    if key.startswith(("fpn1.", "fpn2.", "cls_norm.", "cls_head.")):
        return key
    raise KeyError(f"no official name for parameter {key!r}")


def official_names(model: PIIP) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """Official name -> (our state-dict key, index into it or None). Our merge-weight vectors
    are one official scalar per branch: ``w1..wN`` and ``intermediate_merging_{s}_w{j}``."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "merge_weights":
            out.update({f"w{i + 1}": (k, (i,)) for i in range(v.shape[0])})
        elif k == "inter_merge_weights":
            for r, s in enumerate(model.cfg.out_indexes):
                out.update({f"intermediate_merging_{s}_w{j + 1}": (k, (r, j)) for j in range(v.shape[1])})
        else:
            out[official_key(k, model.cfg)] = (k, None)
    return out


def to_official_state_dict(model: PIIP) -> dict[str, Tensor]:
    """Our state dict under the official names (what an official checkpoint holds)."""
    sd = model.state_dict()
    return {ok: (sd[k] if i is None else sd[k][i]) for ok, (k, i) in official_names(model).items()}


def load_official_state_dict(model: PIIP, state_dict: dict[str, Tensor]) -> None:
    """Fill ``model`` from an official state dict; raise listing every unused, missing or
    mis-shaped key. A whole PIIP-LLaVA checkpoint may be given: only its encoder and
    projector keys are taken."""
    ours = model.state_dict()
    target = official_names(model)
    if model.cfg.output == "llava":
        # Stock timm names the ConvNeXt layer scale "gamma"; the official checkpoints "weight".
        state_dict = {re.sub(r"(convnext_model\.stages\.\d+\.blocks\.\d+)\.gamma$", r"\1.weight", k): v
                      for k, v in state_dict.items() if k.startswith((LLAVA_ENCODER_PREFIX, LLAVA_PROJECTOR_PREFIX))}
    check_state_dict("official state dict", {ok: ours[k].shape if i is None else ours[k][i].shape
                                             for ok, (k, i) in target.items()}, state_dict)
    new = {k: v.clone() if k in ("merge_weights", "inter_merge_weights") else None for k, v in ours.items()}
    for ok, (k, i) in target.items():
        if i is None:
            new[k] = state_dict[ok]
        else:
            new[k][i] = state_dict[ok]
    model.load_state_dict(new, strict=True)


# ---------------------------------------------------------------------------------------------
# The neutral config dicts of the official fixtures -> PIIPConfig


def _norm_kind(s: str) -> str:
    s = str(s).lower()
    if s.startswith("rmsnorm"):
        return "rmsnorm"
    if s.startswith("none"):
        return "none"
    return "layernorm"


def _branch_from_neutral(b: dict, i: int) -> BranchConfig:
    fam = "deit" if str(b["family"]).startswith("deit") else "internvit"
    ls = b.get("layer_scale") or {}
    pe = b["pos_embed"]
    cls = b.get("cls_token")
    qk = b.get("qk_norm")
    return BranchConfig(
        name=b["name"], embed_dim=b["embed_dim"], depth=b["depth"], num_heads=b["num_heads"],
        image_size=b.get("nominal_image_size", b.get("image_size")),
        interaction_indexes=tuple(tuple(x) for x in b["interaction_indexes"]),
        window_sizes=tuple(w if a else None for a, w in zip(b["window_attn"], b["window_size"])),
        mlp_ratio=b["mlp_ratio"], qkv_bias=b["qkv_bias"], norm=_norm_kind(b["norm"]),
        qk_norm="rmsnorm" if qk else "none",
        layer_scale=ls.get("official_init", 1.0) if ls.get("present") else None,
        mlp_act="gelu_tanh" if "tanh" in b.get("mlp_activation", "") else "gelu",
        patch_size=b["patch_size"], pos_embed_grid=tuple(pe["stored_grid_hw"]),
        pos_embed_cls_slot=bool(pe["has_leading_cls_slot"]),
        cls_token=bool(cls.get("present")) if isinstance(cls, dict) else bool(cls),
        family=fam, pad_before_qkv=True)


def _convnext_from_neutral(name: str, image_size: int, groups, depths, widths, layout: str, *, ratios=None,
                           **kw) -> BranchConfig:
    b = BranchConfig.convnext(name, depths, widths, image_size, groups, layout, **kw)
    if ratios is not None and tuple(ratios) != b.layer_strides:
        raise ValueError(f"{name}: official downsample_ratios {list(ratios)} differ from the layer strides {list(b.layer_strides)}")
    return b


def _interaction_kw(it: dict) -> dict:
    return dict(deform_num_heads=it["deform_num_heads"], n_points=it["n_points"], deform_ratio=it["deform_ratio"],
                with_cffn=it["with_cffn"], cffn_ratio=it["cffn_ratio"], interaction_proj=it.get("interaction_proj", True),
                interaction_norm=_norm_kind(it.get("interaction_norm", "layernorm")))


def _llava_from_neutral(config: dict) -> PIIPConfig:
    kw = config["official_kwargs"]
    bb, pre = kw["backbone"], config["from_pretrained_configs"]
    branches = []
    for i in (1, 2):
        b = bb[f"branch{i}"]
        groups = tuple(tuple(g) for g in b["interaction_indexes"])
        if b.get("model_type", "clip_hf") == "clip_hf":
            c = pre["clip"][b["pretrained"]]
            if c.get("hidden_act", "quick_gelu") != "quick_gelu":
                raise ValueError(f"branch{i}: only quick-GELU CLIP towers are supported, got {c['hidden_act']}")
            g = c["image_size"] // b.get("pretrain_patch_size", c["patch_size"])
            branches.append(BranchConfig(
                name=f"branch{i}", kind="clip", family="hf", embed_dim=c["hidden_size"], depth=c["num_hidden_layers"],
                num_heads=c["num_attention_heads"], mlp_ratio=c["intermediate_size"] / c["hidden_size"],
                image_size=b["img_size"], interaction_indexes=groups, patch_size=b.get("patch_size", c["patch_size"]),
                pos_embed_grid=(g, g), cls_token=bool(b.get("use_cls_token", False))))
        else:
            t = pre["timm"][b["pretrained"]]
            branches.append(_convnext_from_neutral(f"branch{i}", b["img_size"], groups, t["depths"], t["dims"], "timm",
                                                   head_hidden=t.get("head_hidden_size"), ratios=b.get("downsample_ratios")))
    proj = kw["projector"]
    if proj.get("type", "separate_2branch_v1") != "separate_2branch_v1" or proj.get("out_shape"):
        raise ValueError(f"unsupported projector {proj}")
    return PIIPConfig(branches=tuple(branches), output="llava", projector_dim=kw["llm_hidden_size"],
                      projector_norm=proj["norm"], interaction_drop_path=bb.get("interaction_drop_path_rate", 0.0),
                      name=config.get("model", ""), **_interaction_kw(config["interaction"]))


def config_from_neutral(config: dict) -> PIIPConfig:
    """The neutral config dict stored with the official fixtures -> PIIPConfig (official quirks on)."""
    model = config["model"]
    if model == "piip_llava_vision_encoder_and_projector":
        return _llava_from_neutral(config)
    kw = config.get("official_kwargs", {})
    if model == "convnext_single_branch_detection_backbone":
        h = config["hf_config"]
        d = h["depths"]
        b = _convnext_from_neutral("backbone", kw.get("real_size", config["input_shape"][-1]), convnext_stage_groups(d), d,
                                   h["hidden_sizes"], "hf", layer_scale=h["layer_scale_init_value"], patch_size=h["patch_size"])
        return PIIPConfig(branches=(b,), output="stages", out_indexes=tuple(range(len(d))), name=model)
    branches = []
    for i, b in enumerate(config["branches"]):
        if b["family"] == "convnext":
            h, ok = b["hf_config"], kw[f"branch{i + 1}"]
            branches.append(_convnext_from_neutral(
                b["name"], b["nominal_image_size"], ok["interaction_indexes"], h["depths"], h["hidden_sizes"], "hf",
                layer_scale=h["layer_scale_init_value"], patch_size=h["patch_size"], ratios=ok.get("downsample_ratios")))
        else:
            branches.append(_branch_from_neutral(b, i))
    classification = model == "piip_classification"
    regular = kw.get("with_simple_fpn", True) is False
    return PIIPConfig(
        branches=tuple(branches),
        output="classification" if classification else "detection",
        num_classes=config.get("num_classes", 1000),
        fpn="regular" if regular else "simple",
        out_indexes=tuple(kw["out_interaction_indexes"]) if regular else (),
        head_reads_first_patch=classification, name=model, **_interaction_kw(config["interaction"]))


def official_config(cfg: PIIPConfig, official_branch4_from_branch3: bool = True) -> PIIPConfig:
    """A preset as the official code builds it: window padding before qkv, classification
    heads on patch token 0, and (4-branch detection) branch 4 built from branch 3's definition,
    keeping only its image size and stage split."""
    branches = [replace(b, pad_before_qkv=True) for b in cfg.branches]
    if official_branch4_from_branch3 and len(branches) == 4 and cfg.output == "detection":
        b3, b4 = branches[2], branches[3]
        branches[3] = replace(b3, name=b4.name, image_size=b4.image_size, interaction_indexes=b4.interaction_indexes)
    extra = dict(cfg.extra)
    if extra.get("official_all_fpn"):
        extra["build_all_fpn"] = True  # two official DINO backbones build the unused 4x level too
    return replace(cfg, branches=tuple(branches), head_reads_first_patch=cfg.output == "classification", extra=extra)


def from_official(config, state_dict: dict[str, Tensor], backend: str | None = None) -> PIIP:
    """Build a model from a neutral config dict (as stored with the official fixtures) or a
    PIIPConfig, and load an official state dict into it (checked: see load_official_state_dict)."""
    from .models.presets import build_model

    cfg = config if isinstance(config, PIIPConfig) else config_from_neutral(config)
    model = build_model(cfg, backend=backend)
    load_official_state_dict(model, state_dict)
    return model


def _unwrap_checkpoint(obj) -> dict[str, Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError("checkpoint holds no state dict")
    if any(k.startswith("backbone.") for k in obj):
        obj = {k[len("backbone."):]: v for k, v in obj.items() if k.startswith("backbone.")}
    return obj


def load_official_checkpoint(name_or_model, path: str, backend: str | None = None) -> PIIP:
    """Build the official form of a preset (or take a model) and load an official checkpoint file.

    Handles files that store the model under ``state_dict`` or ``model``, mmdet checkpoints
    whose backbone keys start with ``backbone.`` (the neck and heads are ignored), and whole
    PIIP-LLaVA checkpoints (only the vision tower and projector keys are taken).
    """
    from .models.presets import get_config

    from .models.presets import build_model

    if isinstance(name_or_model, PIIP):
        model = name_or_model
    else:
        model = build_model(official_config(get_config(name_or_model)), backend=backend)
    sd = _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    load_official_state_dict(model, sd)
    return model
