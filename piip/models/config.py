"""Model configuration as data: one dataclass per branch, one for the whole model."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class BranchConfig:
    """One branch: a sequence of layers, each with a known output width and stride.

    ``kind`` selects the layer family:
      - "vit": DeiT / InternViT-class blocks (``family`` "deit" | "internvit" picks the
        official key names); every layer keeps width ``embed_dim`` at stride ``patch_size``;
      - "convnext": ConvNeXt (``stage_depths``, ``stage_widths``); its layers are the official
        flattened list [stage-0 blocks, stage-1 downsampling layer, stage-1 blocks, ...], so
        width and stride change inside the list (``layer_widths``, ``layer_strides``);
        ``family`` "hf" | "timm" picks the official key layout (transformers ConvNextModel
        for detection, timm for PIIP-LLaVA), ``head_hidden`` the unused MLP-head width of
        timm's ``convnext_large_mlp``;
      - "clip": CLIP's vision transformer with transformers' names (class token carried
        beside the patch tokens when ``cls_token``; ``pos_embed_grid`` is the stored table).

    ``image_size`` is the side this branch sees (the paper's resolution); branch 1 is the
    largest model on the smallest image. ``window_sizes`` (ViT) has one entry per block:
    None for global attention, else the window side. ``interaction_indexes`` splits the
    layers into stages: stage s runs layers ``start..end`` (inclusive).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    image_size: int
    interaction_indexes: tuple[tuple[int, int], ...]
    window_sizes: tuple[int | None, ...] = ()
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm: str = "layernorm"            # "layernorm" | "rmsnorm"
    qk_norm: str = "none"              # "none" | "rmsnorm"
    layer_scale: float | None = 1.0    # None: no ls1/ls2 parameters
    mlp_act: str = "gelu"              # "gelu" | "gelu_tanh"
    patch_size: int = 16
    pos_embed_grid: tuple[int, int] = (14, 14)
    pos_embed_cls_slot: bool = False   # a leading, unused slot (InternViT-class checkpoints)
    cls_token: bool = False
    family: str = "deit"               # "deit" | "internvit": official key names and class quirks
    pad_before_qkv: bool = True        # window padding order, see layers.Attention
    drop_path_rate: float = 0.0
    kind: str = "vit"                  # "vit" | "convnext" | "clip"
    stage_depths: tuple[int, ...] = ()   # convnext
    stage_widths: tuple[int, ...] = ()   # convnext
    head_hidden: int | None = None     # convnext (timm MLP head, stored but unused)

    def __post_init__(self):
        if self.kind not in ("vit", "convnext", "clip"):
            raise ValueError(f"{self.name}: unknown branch kind {self.kind!r}")
        if self.kind == "convnext":
            if not self.stage_depths or len(self.stage_depths) != len(self.stage_widths):
                raise ValueError(f"{self.name}: a convnext branch needs stage_depths and stage_widths of one length")
            n_layers = sum(self.stage_depths) + len(self.stage_depths) - 1
            if self.depth != n_layers or self.embed_dim != self.stage_widths[-1]:
                raise ValueError(f"{self.name}: convnext depth must be {n_layers} (flattened layers) and embed_dim "
                                 f"{self.stage_widths[-1]}, got {self.depth} and {self.embed_dim}")
        if not self.window_sizes:
            object.__setattr__(self, "window_sizes", (None,) * self.depth)
        if len(self.window_sizes) != self.depth:
            raise ValueError(f"{self.name}: {len(self.window_sizes)} window sizes for depth {self.depth}")
        covered = [b for s, e in self.interaction_indexes for b in range(s, e + 1)]
        if self.interaction_indexes and covered != list(range(self.depth)):
            raise ValueError(f"{self.name}: interaction_indexes {self.interaction_indexes} must cover blocks 0..{self.depth - 1} in order")
        if self.kind != "convnext" and self.embed_dim % self.num_heads:
            raise ValueError(f"{self.name}: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.cls_token and any(w is not None for w in self.window_sizes):
            raise ValueError(f"{self.name}: a cls token cannot go through window attention")

    @classmethod
    def convnext(cls, name: str, depths, widths, image_size: int, interaction_indexes, family: str = "hf",
                 **kw) -> "BranchConfig":
        """A ConvNeXt branch: ``depth`` is the flattened layer count and ``embed_dim`` the last
        width; stem stride 4 and layer scale 1e-6 unless given."""
        kw.setdefault("layer_scale", 1e-6)
        kw.setdefault("patch_size", 4)
        return cls(name=name, kind="convnext", family=family, embed_dim=widths[-1], depth=sum(depths) + len(depths) - 1,
                   num_heads=1, image_size=image_size, interaction_indexes=tuple(tuple(g) for g in interaction_indexes),
                   stage_depths=tuple(depths), stage_widths=tuple(widths), **kw)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """Output width of every layer."""
        if self.kind != "convnext":
            return (self.embed_dim,) * self.depth
        out = []
        for s, (d, w) in enumerate(zip(self.stage_depths, self.stage_widths)):
            out += [w] * (d + (s > 0))
        return tuple(out)

    @property
    def layer_strides(self) -> tuple[int, ...]:
        """Output stride of every layer relative to the branch's image (the official
        ``downsample_ratios``)."""
        if self.kind != "convnext":
            return (self.patch_size,) * self.depth
        out = []
        for s, d in enumerate(self.stage_depths):
            out += [self.patch_size * 2 ** s] * (d + (s > 0))
        return tuple(out)

    def stage_ends(self) -> list[int]:
        """The last layer of every stage (the whole branch when it has no interactions)."""
        return [e for _, e in self.interaction_indexes] or [self.depth - 1]


def convnext_stage_groups(depths) -> tuple[tuple[int, int], ...]:
    """The flattened layers (first, last) of each native ConvNeXt stage; stage s > 0 starts
    with its downsampling layer."""
    groups, start = [], 0
    for s, d in enumerate(depths):
        end = start + d - (s == 0)
        groups.append((start, end))
        start = end + 1
    return tuple(groups)


@dataclass(frozen=True)
class PIIPConfig:
    """A whole PIIP model (N >= 1 branches; one branch means a plain ViT baseline).

    ``output``:
      - "detection": per-branch conv merge to branch 1's width, weighted sum on the
        finest grid, simple feature pyramid (``fpn_levels`` selects which of the
        4x/2x/1x/0.5x maps are returned; DINO uses (1, 2, 3)).
      - "classification": one head per branch, logits averaged.
      - "classification_merged": the official classification model with a merged head
        (GroupNorm/Linear per branch, weighted sum, LayerNorm, mean, one head); this is
        the model the paper's FLOP and parameter columns are counted on.
      - "features": the per-branch token maps, no head;
      - "stages": a single-branch backbone's map after each stage (the ConvNeXt baseline:
        the four raw stage outputs at strides 4/8/16/32, in fp32);
      - "llava": the PIIP-LLaVA vision encoder plus its two-branch MLP projector
        (:class:`piip.models.llava.PIIPLLaVA`): tokens [B, H_N*W_N, projector_dim].

    ``fpn`` (detection): "simple" merges once after the last stage (conv-GN-ReLU x2 per
    branch) and builds the simple feature pyramid from the merged map; "regular" merges
    after every stage in ``out_indexes`` and after the last one (branch 1: GN-ReLU, the
    others conv-GN-ReLU to branch 1's current width, all on branch N's current grid), and
    the four merged maps feed the pyramid: as they are when branch N's strides already
    differ between them (a CNN branch N), else through deconvolutions / max-pooling (the
    official "ViT regular FPN").
    """

    branches: tuple[BranchConfig, ...]
    output: str = "detection"
    num_classes: int = 1000
    deform_num_heads: int = 16
    n_points: int = 4
    deform_ratio: float = 0.5
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    interaction_proj: bool = True
    interaction_norm: str = "layernorm"   # "layernorm" | "none"
    interaction_drop_path: float = 0.0    # the CFFN drop-path rate of every injector (constant, as officially)
    fpn_levels: tuple[int, ...] = (0, 1, 2, 3)
    head_reads_first_patch: bool = False  # official classification quirk: heads read patch token 0
    fpn: str = "simple"                   # "simple" | "regular" (see above)
    out_indexes: tuple[int, ...] = ()     # stages whose merged map feeds the regular FPN / "stages" output
    projector_dim: int = 4096             # llava: the language model's width
    projector_norm: str = "gn"            # llava: "gn" | "ln"
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.branches:
            raise ValueError("PIIPConfig needs at least one branch")
        if self.output not in ("detection", "classification", "classification_merged", "features", "stages", "llava"):
            raise ValueError(f"unknown output {self.output!r}")
        if self.fpn not in ("simple", "regular"):
            raise ValueError(f"unknown fpn {self.fpn!r}")
        if any(not 0 <= i < self.num_stages for i in self.out_indexes) or list(self.out_indexes) != sorted(set(self.out_indexes)):
            raise ValueError(f"out_indexes {self.out_indexes} must be increasing stage indexes below {self.num_stages}")
        if self.output == "detection" and self.fpn == "regular" and len(self.out_indexes) != 3:
            raise ValueError(f"the regular FPN merges after 3 stages plus the last one; out_indexes={self.out_indexes}")
        if self.output == "stages" and (len(self.branches) != 1 or not self.out_indexes):
            raise ValueError("output 'stages' needs one branch and the out_indexes of its stages")
        if self.output == "llava" and len(self.branches) < 2:
            raise ValueError("output 'llava' needs at least two branches")
        n = {len(b.interaction_indexes) for b in self.branches}
        if len(self.branches) > 1 and len(n) != 1:
            raise ValueError(f"every branch needs the same number of stages, got {sorted(n)}")
        sizes = [b.image_size for b in self.branches]
        if sizes != sorted(sizes):
            raise ValueError(f"branch image sizes must grow from branch 1 to branch N, got {sizes}")

    @property
    def num_stages(self) -> int:
        return len(self.branches[0].interaction_indexes) if self.branches[0].interaction_indexes else 1

    def replace(self, **kw) -> "PIIPConfig":
        return replace(self, **kw)

    def replace_branch(self, i: int, **kw) -> "PIIPConfig":
        branches = list(self.branches)
        branches[i] = replace(branches[i], **kw)
        return replace(self, branches=tuple(branches))
