"""One-pass merging of branch feature maps (bilinear resize and weighted sum)."""
from .api import branch_merge
from .reference import branch_merge_reference

__all__ = ["branch_merge", "branch_merge_reference"]
