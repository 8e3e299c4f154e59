"""Model configuration as data: one dataclass per branch, one for the whole model."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class BranchConfig:
    """One ViT branch.

    ``image_size`` is the side this branch sees (the paper's resolution); branch 1 is the
    largest model on the smallest image. ``window_sizes`` has one entry per block: None
    for global attention, else the window side. ``interaction_indexes`` splits the blocks
    into stages: stage s runs blocks ``start..end`` (inclusive).
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

    def __post_init__(self):
        if not self.window_sizes:
            object.__setattr__(self, "window_sizes", (None,) * self.depth)
        if len(self.window_sizes) != self.depth:
            raise ValueError(f"{self.name}: {len(self.window_sizes)} window sizes for depth {self.depth}")
        covered = [b for s, e in self.interaction_indexes for b in range(s, e + 1)]
        if self.interaction_indexes and covered != list(range(self.depth)):
            raise ValueError(f"{self.name}: interaction_indexes {self.interaction_indexes} must cover blocks 0..{self.depth - 1} in order")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.name}: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.cls_token and any(w is not None for w in self.window_sizes):
            raise ValueError(f"{self.name}: a cls token cannot go through window attention")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


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
      - "features": the per-branch token maps, no head.
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
    interaction_drop_path: float = 0.0
    fpn_levels: tuple[int, ...] = (0, 1, 2, 3)
    head_reads_first_patch: bool = False  # official classification quirk: heads read patch token 0
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.branches:
            raise ValueError("PIIPConfig needs at least one branch")
        if self.output not in ("detection", "classification", "classification_merged", "features"):
            raise ValueError(f"unknown output {self.output!r}")
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
