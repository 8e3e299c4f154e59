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

from .models.config import BranchConfig, PIIPConfig
from .models.piip import PIIP

_UNIT_RE = re.compile(r"^interactions\.(\d+)\.(\d+)\.(to_a_proj|to_b_proj|to_a|to_b)\.(.*)$")
_BRANCH_RE = re.compile(r"^branches\.(\d+)\.(.*)$")
_INJ = {"to_a_proj": "branch2to1_proj", "to_b_proj": "branch1to2_proj",
        "to_a": "branch2to1_injector", "to_b": "branch1to2_injector"}


def official_key(key: str, cfg: PIIPConfig) -> str:
    """Our parameter name -> the official one (``merge_weights`` maps to ``w1``..``wN`` separately)."""
    m = _BRANCH_RE.match(key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        fam = cfg.branches[i].family
        if rest.startswith("patch_embed."):
            rest = "patch_embed.proj." + rest[len("patch_embed."):]
        rest = re.sub(r"^(blocks\.\d+\.)ls([12])$", (r"\1gamma_\2" if fam == "deit" else r"\1ls\2.gamma"), rest)
        return f"branch{i + 1}.{rest}"
    m = _UNIT_RE.match(key)
    if m:
        s, u, part, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        rest = rest.replace("ffn.dwconv.", "ffn.dwconv.dwconv.")
        return f"interactions.{s}.interaction_units_{u + 1}{u + 2}.{_INJ[part]}.{rest}"
    m = re.match(r"^merge\.(\d+)\.(.*)$", key)
    if m:
        return f"merge_branch{int(m.group(1)) + 1}.{m.group(2)}"
    if key.startswith(("fpn1.", "fpn2.", "cls_norm.", "cls_head.")):
        return key
    raise KeyError(f"no official name for parameter {key!r}")


def to_official_state_dict(model: PIIP) -> dict[str, Tensor]:
    """Our state dict under the official names (what an official checkpoint holds)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "merge_weights":
            for i in range(v.shape[0]):
                out[f"w{i + 1}"] = v[i]
        else:
            out[official_key(k, model.cfg)] = v
    return out


def load_official_state_dict(model: PIIP, state_dict: dict[str, Tensor]) -> None:
    """Fill ``model`` from an official state dict; raise listing every unused, missing or
    mis-shaped key."""
    ours = model.state_dict()
    target: dict[str, tuple[str, int | None]] = {}
    for k, v in ours.items():
        if k == "merge_weights":
            for i in range(v.shape[0]):
                target[f"w{i + 1}"] = (k, i)
        else:
            target[official_key(k, model.cfg)] = (k, None)
    unused = sorted(set(state_dict) - set(target))
    missing = sorted(set(target) - set(state_dict))
    wrong = []
    for ok, (k, i) in target.items():
        if ok in state_dict:
            want = ours[k].shape if i is None else ours[k][i].shape
            if tuple(state_dict[ok].shape) != tuple(want):
                wrong.append(f"{ok}: checkpoint {tuple(state_dict[ok].shape)} vs model {tuple(want)}")
    if unused or missing or wrong:
        lines = [f"official state dict does not match the model ({len(unused)} unused, {len(missing)} missing, {len(wrong)} mis-shaped)"]
        for title, items in (("unused checkpoint keys", unused), ("missing from checkpoint", missing), ("shape mismatches", wrong)):
            if items:
                lines.append(f"  {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))
    new = {}
    for ok, (k, i) in target.items():
        if i is None:
            new[k] = state_dict[ok]
    new["merge_weights"] = torch.stack([state_dict[f"w{i + 1}"] for i in range(len(model.cfg.branches))]) \
        if "merge_weights" in ours else None
    if new["merge_weights"] is None:
        del new["merge_weights"]
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


def config_from_neutral(config: dict) -> PIIPConfig:
    """The neutral config dict stored with the official fixtures -> PIIPConfig (official quirks on)."""
    branches = tuple(_branch_from_neutral(b, i) for i, b in enumerate(config["branches"]))
    it = config["interaction"]
    classification = config["model"] == "piip_classification"
    return PIIPConfig(
        branches=branches,
        output="classification" if classification else "detection",
        num_classes=config.get("num_classes", 1000),
        deform_num_heads=it["deform_num_heads"], n_points=it["n_points"], deform_ratio=it["deform_ratio"],
        with_cffn=it["with_cffn"], cffn_ratio=it["cffn_ratio"], interaction_proj=it["interaction_proj"],
        interaction_norm=_norm_kind(it["interaction_norm"]),
        head_reads_first_patch=classification, name=config.get("model", ""))


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
    cfg = config if isinstance(config, PIIPConfig) else config_from_neutral(config)
    model = PIIP(cfg, backend=backend)
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

    Handles files that store the model under ``state_dict`` or ``model`` and mmdet
    checkpoints whose backbone keys start with ``backbone.`` (the neck and heads are ignored).
    """
    from .models.presets import get_config

    if isinstance(name_or_model, PIIP):
        model = name_or_model
    else:
        model = PIIP(official_config(get_config(name_or_model)), backend=backend)
    sd = _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    load_official_state_dict(model, sd)
    return model
