"""The kernel variants of each compiled op, by name, in the order of their number.

The private ops take ``variant`` (an int; 0 is the default) and the CUDA kernels of csrc/
compile every variant listed here: csrc/<op>/<op>_cuda.cuh states how many it has
(``k*Variants``), and tests/test_variants.py checks that the two agree. The tuned dispatch
table (piip_kernels/tuned/<arch>.json) names variants; piip_kernels.tuned turns a name into
its number here, and a name missing from this list is an error when the table loads. The
CPU kernels have only variant 0.
"""
from __future__ import annotations

# private op -> variant names; index = the number passed to the kernel.
VARIANTS: dict[str, tuple[str, ...]] = {
    "msda_forward": ("lanes", "point_major", "flat", "block128"),
    "msda_backward": ("atomic", "warp_aggregated", "shared_privatized"),
    "msda_backward_deterministic": ("fixed_point", "two_pass"),
    "merge_forward": ("pixel", "rows_vectorized"),
    "merge_backward": ("gather", "fused_branches"),
}


def variant_number(op: str, name: str) -> int:
    """The number of variant ``name`` of private op ``op``; a clear error for either unknown."""
    if op not in VARIANTS:
        raise KeyError(f"no compiled op {op!r} has kernel variants; known: {sorted(VARIANTS)}")
    names = VARIANTS[op]
    if name not in names:
        raise KeyError(f"{op} has no kernel variant {name!r}; it has {list(names)}")
    return names.index(name)
