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

import logging
import os
import re
import zipfile
from dataclasses import fields, replace

import torch
from torch import Tensor, nn

from .layers.attention import Attention
from .models.config import BranchConfig, PIIPConfig, convnext_stage_groups
from .models.convnext import convnext_official_key
from .models.keys import check_materialized, check_state_dict, strip_ddp_prefix
from .models.piip import PIIP, find_piip

log = logging.getLogger("piip")

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


def load_official_state_dict(model: nn.Module, state_dict: dict[str, Tensor], *, official_form: bool = True,
                             dtype: torch.dtype | None = None, device=None, copy: bool = True) -> None:
    """Fill ``model`` from an official state dict; raise listing every unused, missing or
    mis-shaped key. A whole PIIP-LLaVA checkpoint may be given: only its encoder and
    projector keys are taken.

    ``model`` is a :class:`PIIP` or any module holding exactly one (a backbone wrapper, a task
    model): the weights go into that one. Released weights were trained in the official form,
    so by default the model is switched to it first (:func:`use_official_form`: window padding
    before qkv, classification heads on patch token 0; no parameter changes), and a model whose
    official form has other parameters is refused with what to build instead.
    ``official_form=False`` keeps the model as built: it then computes another function of the
    same weights (0.25-0.33 relative off the official outputs with released qkv biases).

    A model on the meta device (``with torch.device("meta"):``) takes the tensors themselves
    (``load_state_dict(assign=True)``; copies when ``copy``), each cast to ``dtype`` (default:
    the parameter's own) and moved to ``device``, so no second copy of the weights is made;
    a materialised model is filled in place and then moved with ``.to(device, dtype)`` when
    either is given. Anything left on the meta device is an error naming it.
    """
    target = find_piip(model, "load_official_state_dict")
    form = _official_form_of(target) if official_form else target.cfg
    if target.cfg.output == "llava":
        # Stock timm names the ConvNeXt layer scale "gamma"; the official checkpoints "weight".
        state_dict = {re.sub(r"(convnext_model\.stages\.\d+\.blocks\.\d+)\.gamma$", r"\1.weight", k): v
                      for k, v in state_dict.items() if k.startswith((LLAVA_ENCODER_PREFIX, LLAVA_PROJECTOR_PREFIX))}
    ours = target.state_dict()
    names = official_names(target)
    check_state_dict("official state dict", {ok: ours[k].shape if i is None else ours[k][i].shape
                                             for ok, (k, i) in names.items()}, state_dict)
    _switch_form(target, form)  # after every check: a refused load leaves the model as it was
    assign = any(t.is_meta for t in ours.values())

    def place(v: Tensor, like: Tensor) -> Tensor:
        if not assign:
            return v
        want = (dtype or like.dtype) if v.is_floating_point() else v.dtype
        return v.to(device=device or v.device, dtype=want, copy=copy)

    new = {}
    for ok, (k, i) in names.items():
        v = place(state_dict[ok], ours[k])
        if i is None:
            new[k] = v
        else:  # one official scalar per branch of a merge-weight vector
            if k not in new:
                new[k] = torch.empty(ours[k].shape, dtype=v.dtype, device=v.device)
            new[k][i] = v
    target.load_state_dict(new, strict=True, assign=assign)
    check_materialized(target, "load_official_state_dict")
    if not assign and (dtype is not None or device is not None):
        target.to(device=device, dtype=dtype)


# BranchConfig / PIIPConfig fields of the official form that hold no parameters: a model
# built without them computes another function of the same weights, and loading switches them.
# Any other difference (branch 4 of the 4-branch detectors, the DINO backbones' extra level)
# changes the parameters, and loading refuses.
_BEHAVIOUR_FIELDS = ("pad_before_qkv", "head_reads_first_patch")


def _parameter_differences(have: PIIPConfig, want: PIIPConfig) -> list[str]:
    out = []
    for i, (a, b) in enumerate(zip(have.branches, want.branches)):
        out += [f"branch {i + 1} {f.name}: {getattr(a, f.name)!r} here, {getattr(b, f.name)!r} officially"
                for f in fields(BranchConfig) if f.name not in _BEHAVIOUR_FIELDS and getattr(a, f.name) != getattr(b, f.name)]
    if bool(have.extra.get("build_all_fpn")) != bool(want.extra.get("build_all_fpn")):
        out.append("the official backbone builds the unused 4x pyramid level")
    return out


def use_official_form(model: nn.Module) -> bool:
    """Switch a PIIP model (or the one inside ``model``) in place to the form the official code
    builds, where that changes no parameter: window padding before qkv in every ViT block,
    classification heads reading patch token 0 (see :func:`official_config`). Returns whether
    anything changed. Raises ValueError when the official form has other parameters (the
    4-branch detectors' branch 4, the DINO backbones' extra pyramid level), naming them."""
    target = find_piip(model, "use_official_form")
    return _switch_form(target, _official_form_of(target))


def _official_form_of(model: PIIP) -> PIIPConfig:
    want = official_config(model.cfg)
    diff = _parameter_differences(model.cfg, want)
    if diff:
        raise ValueError("official weights need the official form of this model, which is defined otherwise: " + "; ".join(diff)
                         + ". Build that form with piip.build_model(piip.official_config(cfg)), or load by preset name "
                           "(piip.load_official_checkpoint(name, path)), which builds it.")
    return want


def _switch_form(model: PIIP, want: PIIPConfig) -> bool:
    if want == model.cfg and want.extra == model.cfg.extra:
        return False
    for branch, b in zip(model.branches, want.branches):
        branch.cfg = b
        for m in branch.modules():
            if isinstance(m, Attention):
                m.pad_before_qkv = b.pad_before_qkv
    model.cfg = want
    log.info("switched the model to the official form (window padding before qkv, heads on patch token 0), "
             "which the official weights were trained with")
    return True


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


def from_official(config, state_dict: dict[str, Tensor], backend: str | None = None, *, official_form: bool = True,
                  dtype: torch.dtype | None = None, device=None) -> PIIP:
    """Build a model and load an official state dict into it (checked: see
    :func:`load_official_state_dict`). ``config`` is a preset name, a :class:`PIIPConfig`, or a
    neutral config dict as stored with the official fixtures. The model is built in the official
    form (:func:`official_config`; ``official_form=False`` builds ``config`` as it is) on the meta
    device and takes copies of the state dict's tensors, in ``dtype`` (default fp32) on
    ``device``."""
    if isinstance(config, str):
        from .models.presets import get_config

        config = get_config(config)
    elif isinstance(config, dict):
        if "model" not in config:
            raise ValueError("from_official: config is a dict without a 'model' entry; pass a preset name, a PIIPConfig "
                             "(piip.get_config(name)) or a neutral config dict as stored with the official fixtures")
        config = config_from_neutral(config)
    elif not isinstance(config, PIIPConfig):
        raise TypeError(f"from_official: config must be a preset name, a PIIPConfig or a neutral config dict, "
                        f"got {type(config).__name__}")
    if not isinstance(state_dict, dict):
        raise TypeError(f"from_official: state_dict must be a dict of tensors, got {type(state_dict).__name__} "
                        "(for a checkpoint file use piip.load_official_checkpoint(name_or_model, path))")
    return load_official_checkpoint(config, state_dict, backend, official_form=official_form, dtype=dtype, device=device)


def _unwrap_checkpoint(obj) -> dict[str, Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError("checkpoint holds no state dict")
    obj = strip_ddp_prefix(obj)
    if any(k.startswith("backbone.") for k in obj):
        obj = {k[len("backbone."):]: v for k, v in obj.items() if k.startswith("backbone.")}
    return obj


def read_checkpoint(checkpoint, mmap: bool = True) -> dict:
    """A checkpoint file's contents (on the CPU, tensors only; memory-mapped when ``mmap`` and the
    file is in torch's zip format, so its tensors are read from disk as they are used), or a
    dict as it is."""
    if isinstance(checkpoint, dict):
        return checkpoint
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path or a state dict, got {type(checkpoint).__name__}")
    mmap = mmap and zipfile.is_zipfile(checkpoint)  # the legacy (pre-1.6) format cannot be mapped
    return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=mmap)


def load_official_checkpoint(model_or_name, checkpoint, backend: str | None = None, *, official_form: bool = True,
                             dtype: torch.dtype | None = None, device=None, mmap: bool = True):
    """Load an official checkpoint (a file path, or its contents as a dict) into a model.

    ``model_or_name``:
      - a preset name or a :class:`PIIPConfig`: its official form (:func:`official_config`) is
        built on the meta device and takes the checkpoint's tensors, read memory-mapped from the
        file, cast to ``dtype`` (default: fp32, as built) and moved to ``device`` one by one: the peak
        memory is about one copy of the weights, which the 6B presets need;
      - a :class:`PIIP`, or any module holding exactly one (a backbone wrapper such as
        ``piip.hf.PIIPBackbone``, a whole task model): that model is filled (switched to the
        official form first, see :func:`load_official_state_dict`); a model on the meta
        device is filled as above.

    Handles files that store the model under ``state_dict``, ``model`` or ``module``, DDP's
    ``module.`` prefix, mmdet checkpoints whose backbone keys start with ``backbone.`` (the
    neck and heads are ignored), and whole PIIP-LLaVA checkpoints (only the vision tower and
    projector keys are taken). Returns the built model, or the module passed in. A state dict
    passed in is copied, never shared with the model.
    """
    from .models.presets import build_model, get_config

    if isinstance(model_or_name, (str, PIIPConfig)):
        cfg = get_config(model_or_name) if isinstance(model_or_name, str) else model_or_name
        with torch.device("meta"):
            model = build_model(official_config(cfg) if official_form else cfg, backend=backend)
    elif isinstance(model_or_name, nn.Module):
        model = model_or_name
    else:
        raise TypeError(f"load_official_checkpoint: the first argument must be a preset name, a PIIPConfig or an nn.Module "
                        f"holding a piip.PIIP model, got {type(model_or_name).__name__}")
    sd = _unwrap_checkpoint(read_checkpoint(checkpoint, mmap))
    load_official_state_dict(model, sd, official_form=official_form, dtype=dtype, device=device,
                             copy=isinstance(checkpoint, dict))
    return model
