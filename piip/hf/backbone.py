"""PIIP as a transformers backbone: :class:`PIIPBackboneConfig` and :class:`PIIPBackbone`.

The backbone's stages are the four pyramid levels of a detection/segmentation PIIP,
``level0`` .. ``level3`` at 4x, 2x, 1x and 0.5x of branch N's grid (strides 4/8/16/32 of
the image for patch-16 branches and ConvNeXt stems). ``out_indices`` / ``out_features``
pick the levels a head reads; with the simple feature pyramid only those levels' layers are
built, as ``PIIPConfig.fpn_levels`` does.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, fields

import torch
from torch import Tensor
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from ..models.config import BranchConfig, PIIPConfig
from ..models.piip import PIIP
from ..models.presets import get_config
from ..official import config_from_neutral, load_official_state_dict, official_config, official_names

log = logging.getLogger(__name__)

LEVELS = ("level0", "level1", "level2", "level3")
# The pyramid layers of the simple FPN that belong to one level only (official names).
_LEVEL_LAYERS = {0: "fpn1.", 1: "fpn2."}


# ---------------------------------------------------------------------------------------------
# PIIPConfig <-> plain dict (the config.json form)

def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def piip_config_to_dict(cfg: PIIPConfig) -> dict:
    """A PIIPConfig as JSON-ready data (lists for tuples)."""
    return asdict(cfg)


def piip_config_from_dict(d: dict) -> PIIPConfig:
    """The inverse of :func:`piip_config_to_dict`; unknown fields are an error naming them."""
    def build(cls, data: dict, what: str):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"PIIPBackboneConfig: {what} has unknown fields {unknown} (known: {sorted(names)})")
        return cls(**{k: (v if k == "extra" else _tuples(v)) for k, v in data.items()})

    branches = tuple(build(BranchConfig, dict(b), f"branch {i + 1}") for i, b in enumerate(d.get("branches") or ()))
    return build(PIIPConfig, {**d, "branches": branches}, "piip_config")


def _levels_of(cfg: PIIPConfig) -> tuple[list[int], list[int]]:
    """(channels, strides relative to the input image) of the four pyramid levels."""
    b1, last = cfg.branches[0], cfg.branches[-1]
    if cfg.output == "stages":
        ends = [b1.stage_ends()[s] for s in cfg.out_indexes]
        return [b1.layer_widths[e] for e in ends], [b1.layer_strides[e] for e in ends]
    p = last.patch_size if last.kind != "convnext" else last.layer_strides[last.stage_ends()[-1]]
    if cfg.fpn == "simple":
        return [b1.embed_dim] * 4, [p // 4, p // 2, p, 2 * p]
    stages = (*cfg.out_indexes, cfg.num_stages - 1)
    channels = [b1.layer_widths[b1.stage_ends()[s]] for s in stages]
    strides = [last.layer_strides[last.stage_ends()[s]] for s in stages]
    if len(set(strides)) != 4:  # a ViT branch N: deconvolved and pooled from one grid
        strides = [p // 4, p // 2, p, 2 * p]
    return channels, strides


def resolve_piip_config(preset: str | None, piip_config, official: bool) -> PIIPConfig:
    """The PIIPConfig a backbone config describes: ``piip_config`` (a PIIPConfig, its dict form,
    or a neutral config dict of the official fixtures) or the preset's; the official form
    (:func:`piip.official.official_config`) when ``official``."""
    if piip_config is None and preset is None:
        raise ValueError("PIIPBackboneConfig needs preset=<name> (see piip.list_models()) or piip_config=<PIIPConfig>")
    if piip_config is None:
        cfg = get_config(preset)
    elif isinstance(piip_config, PIIPConfig):
        cfg = piip_config
    elif isinstance(piip_config, dict) and "model" in piip_config:  # the official fixtures' neutral form
        cfg = config_from_neutral(piip_config)
    elif isinstance(piip_config, dict):
        cfg = piip_config_from_dict(piip_config)
    else:
        raise TypeError(f"PIIPBackboneConfig: piip_config must be a PIIPConfig or a dict, got {type(piip_config).__name__}")
    if preset is not None and cfg.name and cfg.name != preset:
        raise ValueError(f"PIIPBackboneConfig: preset {preset!r} and piip_config (of {cfg.name!r}) disagree; give one")
    if cfg.output not in ("detection", "stages"):
        raise ValueError(f"PIIPBackbone needs a detection or segmentation PIIP (output 'detection', or 'stages' for the "
                         f"ConvNeXt baseline); {cfg.name or 'this config'} has output {cfg.output!r}")
    if cfg.output == "stages" and len(cfg.out_indexes) != 4:
        raise ValueError(f"PIIPBackbone: a 'stages' backbone must return 4 stages, {cfg.name or 'this config'} "
                         f"returns {len(cfg.out_indexes)}")
    if official:
        cfg = official_config(cfg)
    # The levels to build follow out_indices; the DINO backbones' unused 4x level is not built.
    extra = {k: v for k, v in cfg.extra.items() if k != "build_all_fpn"}
    return cfg.replace(extra=extra)


class PIIPBackboneConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""A PIIP detection/segmentation backbone for transformers' task models.

    Args:
        preset: a detection or segmentation preset name (``piip.list_models()``), or
        piip_config: a :class:`piip.PIIPConfig` (or its dict form, or a neutral config dict of
            the official fixtures). Stored as a dict in ``config.json``.
        official: build the official form of the model (:func:`piip.official.official_config`),
            which released checkpoints need; ``PIIPBackbone.from_official`` sets it.
        out_indices / out_features: the pyramid levels returned (``stage_names``:
            ``level0``..``level3`` at 4x, 2x, 1x, 0.5x of branch N's grid). Default: the
            config's ``fpn_levels`` with the simple FPN (1, 2, 3 for the DINO presets), else all.

    ``channels`` and ``strides`` list each returned level's width and stride.
    """

    model_type = "piip"

    preset: str | None = None
    piip_config: dict | None = None
    official: bool = False
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        cfg = resolve_piip_config(self.preset, self.piip_config, self.official)
        self.piip_config = piip_config_to_dict(cfg)
        self.stage_names = list(LEVELS)
        out_indices, out_features = kwargs.pop("out_indices", None), kwargs.pop("out_features", None)
        if out_indices is None and out_features is None:
            out_indices = list(cfg.fpn_levels) if cfg.output == "detection" and cfg.fpn == "simple" else [0, 1, 2, 3]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__post_init__(**kwargs)

    def to_piip_config(self) -> PIIPConfig:
        """The PIIPConfig of the model to build: only the requested levels of a simple FPN."""
        cfg = piip_config_from_dict(self.piip_config)
        if cfg.output == "detection" and cfg.fpn == "simple":
            cfg = cfg.replace(fpn_levels=tuple(sorted(self.out_indices)))
        return cfg

    @property
    def channels(self) -> list[int]:
        ch, _ = _levels_of(piip_config_from_dict(self.piip_config))
        return [ch[i] for i in self.out_indices]

    @property
    def strides(self) -> list[int]:
        _, st = _levels_of(piip_config_from_dict(self.piip_config))
        return [st[i] for i in self.out_indices]


class PIIPBackbone(BackboneMixin, PreTrainedModel):
    """The PIIP model (one submodule, ``self.piip``) behind transformers' backbone API:
    ``forward(pixel_values)`` -> ``BackboneOutput(feature_maps=(...))``, one map
    [B, channels[i], H / strides[i], W / strides[i]] per requested level (sizes floored).

    The image is cast to the backbone's dtype and the maps come back in the image's dtype,
    so a bf16 backbone under fp32 heads (the official recipe) needs no casts around it.
    ``output_hidden_states=True`` adds each branch's final token map [B, C_i, H_i, W_i].
    """

    config: PIIPBackboneConfig
    config_class = PIIPBackboneConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    has_attentions = False
    supports_gradient_checkpointing = True

    def __init__(self, config: PIIPBackboneConfig, backend: str | None = None):
        super().__init__(config)
        self.piip = _BackbonePIIP(config.to_piip_config(), backend, self._follow_piip_config)
        # PIIP initialises itself: the initialisation pass of post_init() must leave it alone.
        # Built on the meta device (from_pretrained) it holds no values yet, and _init_weights
        # gives whatever loading leaves missing PIIP's own initialisation.
        self._piip_initialised = not any(t.is_meta for t in self.piip.parameters())
        self._reference = None
        self.num_features = _levels_of(config.to_piip_config())[0]
        self._freeze_unused()
        self.post_init()

    def _follow_piip_config(self, cfg: PIIPConfig) -> None:
        """The PIIP's config was replaced (piip.use_official_form switches a model to the
        official form when official weights are loaded into it): the backbone's config, which
        save_pretrained writes (a task model's backbone_config is the same object), must
        describe the model the weights are used in."""
        levels = piip_config_from_dict(self.config.piip_config).fpn_levels  # the model's follow out_indices
        self.config.piip_config = piip_config_to_dict(cfg.replace(fpn_levels=levels))
        self.config.official = official_config(cfg).branches == cfg.branches

    @property
    def gradient_checkpointing(self) -> bool:
        return self.piip.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        # transformers' (activation|gradient)_checkpointing_enable sets this attribute on every module.
        self.piip.set_grad_checkpointing(bool(enable))

    def _freeze_unused(self) -> None:
        """Freeze what cannot reach the returned maps, so that every trainable parameter gets a
        gradient (DDP needs that; the optimizers skip frozen parameters, as the official
        constructors skip parameters without gradients):
          - a regular-FPN model merges after fixed stages and each merge feeds one level: the
            layers of levels not returned stay (the official weight layout has them), frozen;
          - ConvNeXt's final norm, which the official code builds and never applies."""
        cfg, keep = self.piip.cfg, set(self.config.out_indices)
        for branch in self.piip.branches:
            if hasattr(branch, "convnext"):
                branch.convnext.norm.requires_grad_(False)
        if cfg.output != "detection" or cfg.fpn != "regular":
            return
        for level in range(3):
            if level in keep:
                continue
            self.piip.inter_merge[level].requires_grad_(False)
            if not self.piip.pyramid_native and level in _LEVEL_LAYERS:
                getattr(self.piip, _LEVEL_LAYERS[level].rstrip(".")).requires_grad_(False)

    def _initialize_weights(self, module, is_custom_code: bool = False) -> None:
        """transformers' initialisation pass, called for every module of the backbone, children
        first (also inside a task model). Right after construction PIIP has initialised itself
        and nothing is done; otherwise each module goes to :meth:`_init_weights`, which looks
        at its tensors one by one (transformers' shortcut for custom code would skip a module
        whose own tensors are loaded, and with it the modules that hold no tensors)."""
        try:
            if self._piip_initialised:
                module._is_hf_initialized = True
            else:
                super()._initialize_weights(module, is_custom_code=False)
        finally:
            if module is self:  # the end of the pass
                self._piip_initialised = False
                self._reference = None

    def _init_weights(self, module) -> None:
        """PIIP's own initialisation for each tensor of ``module`` that transformers has not
        loaded (no ``_is_hf_initialized`` flag): copied from a fresh PIIP of the same config,
        built on the CPU once per pass and only when some tensor needs it."""
        pending = [(n, t) for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
                   if not getattr(t, "_is_hf_initialized", False)]
        if module is self or not pending:
            return
        if self._reference is None:
            log.info("PIIPBackbone: initialising the tensors that were not loaded as PIIP initialises them")
            with torch.device("cpu"):
                fresh = PIIP(self.piip.cfg)
            self._reference = {"modules": {id(m): n for n, m in self.named_modules()},
                               "tensors": {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}}
        prefix = self._reference["modules"][id(module)]
        for name, t in pending:
            key = f"{prefix}.{name}".removeprefix("piip.")
            init.copy_(t, self._reference["tensors"][key].to(t.dtype))

    def forward(self, pixel_values: Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None, **kwargs) -> BackboneOutput:
        """pixel_values [B, 3, H, W] (H, W multiples of branch N's patch size) -> BackboneOutput."""
        if output_attentions:
            raise ValueError("PIIPBackbone returns no attentions (output_attentions=True)")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        self._check_size(pixel_values)
        dtype = next(self.piip.parameters()).dtype
        feats = self.piip.forward_features(pixel_values.to(dtype))
        levels = self.piip.forward_head(feats)
        if self.piip.cfg.output == "detection" and self.piip.cfg.fpn == "simple":
            built = self.piip.cfg.fpn_levels  # exactly the requested levels, in order
            maps = [levels[built.index(i)] for i in self.config.out_indices]
        else:
            maps = [levels[i] for i in self.config.out_indices]
        maps = tuple(m.to(pixel_values.dtype) for m in maps)
        hidden = tuple(m.to(pixel_values.dtype) for m in PIIP.maps(feats["tokens"], feats["hw"])) if output_hidden_states else None
        if not return_dict:
            return (maps,) + ((hidden,) if hidden is not None else ())
        return BackboneOutput(feature_maps=maps, hidden_states=hidden)

    def _check_size(self, pixel_values: Tensor) -> None:
        p = self.piip.cfg.branches[-1].patch_size
        if pixel_values.dim() == 4 and (pixel_values.shape[-2] % p or pixel_values.shape[-1] % p):
            raise ValueError(
                f"PIIPBackbone: image size {tuple(pixel_values.shape[-2:])} is not a multiple of {p} (branch "
                f"{len(self.piip.cfg.branches)}'s patch size); pad or resize to multiples of {2 * p} (all levels "
                f"aligned), e.g. the image processor's pad_size / size_divisor")

    # ------------------------------------------------------------------ official checkpoints
    @classmethod
    def from_official(cls, config, state_dict: dict[str, Tensor], backend: str | None = None, **config_kwargs) -> "PIIPBackbone":
        """Build the official form of a model and load an official state dict, as
        :func:`piip.from_official` does (every key checked).

        ``config``: a :class:`PIIPBackboneConfig` (its official form is built), a preset name,
        a :class:`piip.PIIPConfig` or a neutral config dict of the official fixtures;
        ``config_kwargs`` (``out_indices``, ...) go to :class:`PIIPBackboneConfig`. Keys of
        pyramid layers that ``out_indices`` leaves unbuilt (``fpn1.*``, ``fpn2.*``) are
        dropped with a log line; every other key must match.
        """
        model = cls(official_backbone_config(config, **config_kwargs), backend=backend)
        model.load_official_state_dict(state_dict)
        return model

    def load_official_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load an official (backbone-relative) state dict into ``self.piip``, checked key by key;
        the keys of unbuilt pyramid layers are dropped (logged)."""
        names = official_names(self.piip)
        unbuilt = tuple(pre for level, pre in _LEVEL_LAYERS.items()
                        if not any(k.startswith(pre) for k in names) and any(k.startswith(pre) for k in state_dict))
        if unbuilt:
            log.info("PIIPBackbone: not loading %s* (out_indices %s leave those pyramid layers unbuilt)",
                     "*, ".join(unbuilt), self.config.out_indices)
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(unbuilt)}
        load_official_state_dict(self.piip, state_dict)


class _BackbonePIIP(PIIP):
    """The PIIP of a :class:`PIIPBackbone`: it calls ``on_config(cfg)`` whenever its ``cfg`` is
    replaced after construction, so that the backbone's config can follow."""

    def __init__(self, cfg: PIIPConfig, backend: str | None, on_config):
        super().__init__(cfg, backend=backend)
        self._on_config = on_config

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "cfg" and "_on_config" in self.__dict__:
            self._on_config(value)


def official_backbone_config(config, **config_kwargs) -> PIIPBackboneConfig:
    """The official form (what released checkpoints need) of ``config``: a
    :class:`PIIPBackboneConfig`, a preset name, a ``PIIPConfig`` or a neutral config dict of the
    official fixtures; ``config_kwargs`` (``out_indices``, ...) go to :class:`PIIPBackboneConfig`."""
    if isinstance(config, PIIPBackboneConfig):
        if config_kwargs:
            raise TypeError(f"give {sorted(config_kwargs)} in the PIIPBackboneConfig itself")
        d = {k: v for k, v in config.to_dict().items() if k != "model_type"}
        return PIIPBackboneConfig(**{**d, "official": True})
    if isinstance(config, str):
        return PIIPBackboneConfig(preset=config, official=True, **config_kwargs)
    return PIIPBackboneConfig(piip_config=config, official=True, **config_kwargs)
