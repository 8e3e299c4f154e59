"""The tuned dispatch table: which kernel variant each CUDA private op runs.

The CUDA kernels of the private ops (``torch.ops.piip_C.msda_forward``, ``msda_backward``,
``msda_backward_deterministic``, ``merge_forward``, ``merge_backward``) come in variants,
named in piip_kernels/variants.py. ``bench/sweep.py`` times every variant on a GPU and writes
the fastest per (op, dtype, shape class) into ``piip_kernels/tuned/<arch>.json`` (arch
"sm_90" for compute capability 9.0); :func:`choose` reads it at run time. Only the "cuda"
backend consults the table (piip_kernels/ops.py): the CPU kernels have one variant, and the
Triton kernels none.

Table format::

    {"arch": "sm_90", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0",
     "commit": "abc1234", "date": "...", "source": "bench/results/sweep_h100.md",
     "entries": [{"op": "msda_backward", "dtype": "bfloat16", "shape_class": "D<=32,rows>=2^17",
                  "variant": "atomic", "margin": 0.12}, ...]}

``margin`` (informative) is how much faster the chosen variant was than variant 0 (0.12:
12 %). A (op, dtype, shape class) without an entry runs variant 0, and so does every call on
an arch without a table. A table that names an op or a variant that variants.py does not
have, a dtype or a shape class that does not exist, or one key twice, raises ValueError when
it loads: a stale table is an error, never a silent fallback.

Environment: ``PIIP_KERNELS_TUNED=<path to a json>`` uses that table instead of the packaged
ones, for every arch (the sweep's output, tests); ``PIIP_KERNELS_TUNED=off`` runs variant 0
everywhere.

Shape classes (:func:`shape_class`) are a small deterministic function of an op's sizes;
bench/sweep.py classifies its cases with the same function:

- msda ops (value [N, S, M, D], sampling locations [N, Lq, M, L, P, 2]): the head dim D in
  {<=8, <=32, >32} (how many lanes serve a row: one vector of 8 bf16 covers D 8, a warp of
  them D 256) x the rows N * Lq * M in {<2^17, >=2^17} (2^17 rows of 16 heads are a PIIP
  interaction call at batch 2 and about 4k queries: below it a launch fills an H100's 132 SMs
  only a few times over, above it the grid is many waves deep). Classes like "D<=8,rows<2^17".
- merge ops (maps [N, C, H_b, W_b] merged into [N, C, Ho, Wo]): the output elements
  N * C * Ho * Wo in {<2^22, <2^25, >=2^25} (up to 16 MB, about an L2, of fp32; up to 128 MB;
  more). Classes like "out<2^25".
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..variants import VARIANTS

HERE = Path(__file__).resolve().parent
DTYPES = ("float32", "float64", "float16", "bfloat16")

_MSDA_D = ((8, "D<=8"), (32, "D<=32"), (None, "D>32"))
_MSDA_ROWS = ((1 << 17, "rows<2^17"), (None, "rows>=2^17"))
_MERGE_OUT = ((1 << 22, "out<2^22"), (1 << 25, "out<2^25"), (None, "out>=2^25"))


def _bucket(x: int, buckets, strict: bool) -> str:
    for bound, name in buckets:
        if bound is None or (x < bound if strict else x <= bound):
            return name
    raise AssertionError("the last bucket is open")


def shape_classes(op: str) -> tuple[str, ...]:
    """Every shape class of private op ``op``."""
    if op.startswith("msda"):
        return tuple(f"{d},{r}" for _, d in _MSDA_D for _, r in _MSDA_ROWS)
    if op.startswith("merge"):
        return tuple(name for _, name in _MERGE_OUT)
    raise KeyError(f"no compiled op {op!r} has kernel variants; known: {sorted(VARIANTS)}")


def shape_class(op: str, **sizes: int) -> str:
    """The shape class of a call of private op ``op``: msda ops take ``D`` (head dim) and
    ``rows`` (N * Lq * M); merge ops take ``out`` (N * C * Ho * Wo). See the module docstring."""
    if op not in VARIANTS:
        raise KeyError(f"no compiled op {op!r} has kernel variants; known: {sorted(VARIANTS)}")
    if op.startswith("msda"):
        return f"{_bucket(sizes['D'], _MSDA_D, strict=False)},{_bucket(sizes['rows'], _MSDA_ROWS, strict=True)}"
    return _bucket(sizes["out"], _MERGE_OUT, strict=True)


def msda_sizes(value_shape, loc_shape) -> dict:
    """shape_class's sizes of an msda call: value [N, S, M, D], loc [N, Lq, M, L, P, 2]."""
    N, _, M, D = value_shape
    return {"D": int(D), "rows": int(N) * int(loc_shape[1]) * int(M)}


def merge_sizes(feature_shape, out_hw) -> dict:
    """shape_class's sizes of a merge call: a map [N, C, H, W], the output grid (Ho, Wo)."""
    N, C = feature_shape[:2]
    return {"out": int(N) * int(C) * int(out_hw[0]) * int(out_hw[1])}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_archs: dict[int, str] = {}


def arch_of(device: torch.device) -> str:
    """"sm_90" for a device of compute capability 9.0 (asked once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _archs:
        major, minor = torch.cuda.get_device_capability(index)
        _archs[index] = f"sm_{major}{minor}"
    return _archs[index]


def validate(table: dict, source: str = "the table") -> dict[tuple[str, str, str], int]:
    """{(op, dtype, shape class): variant number} of a loaded table; ValueError for anything
    it names that does not exist (see the module docstring)."""
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise ValueError(f"{source}: a tuned table is a JSON object with a list 'entries'")
    out: dict[tuple[str, str, str], int] = {}
    for i, e in enumerate(table["entries"]):
        where = f"{source}, entry {i} ({e!r})"
        if not isinstance(e, dict) or not {"op", "dtype", "shape_class", "variant"} <= set(e):
            raise ValueError(f"{where}: an entry needs op, dtype, shape_class and variant")
        op, dtype, cls, name = e["op"], e["dtype"], e["shape_class"], e["variant"]
        if op not in VARIANTS:
            raise ValueError(f"{where}: unknown op {op!r}; ops with variants: {sorted(VARIANTS)}")
        if name not in VARIANTS[op]:
            raise ValueError(f"{where}: {op} has no variant {name!r} in piip_kernels/variants.py "
                             f"(it has {list(VARIANTS[op])}); rerun bench/sweep.py or fix the table")
        if dtype not in DTYPES:
            raise ValueError(f"{where}: unknown dtype {dtype!r}; one of {DTYPES}")
        if cls not in shape_classes(op):
            raise ValueError(f"{where}: {op} has no shape class {cls!r}; it has {list(shape_classes(op))}")
        if (op, dtype, cls) in out:
            raise ValueError(f"{where}: a second entry for ({op}, {dtype}, {cls})")
        out[(op, dtype, cls)] = VARIANTS[op].index(name)
    return out


def load(path: str | os.PathLike) -> dict[tuple[str, str, str], int]:
    """Reads and validates the table at ``path``."""
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
    return validate(table, str(path))


_cache: dict[tuple[str, str], dict] = {}


def table_for(arch: str) -> dict[tuple[str, str, str], int]:
    """The validated table for ``arch`` (empty where none is packaged or tuning is off),
    loaded once per (source, arch) and cached."""
    override = os.environ.get("PIIP_KERNELS_TUNED", "")
    if override.lower() == "off":
        return {}
    path = Path(override) if override else HERE / f"{arch}.json"
    key = (str(path), arch)
    if key not in _cache:
        if override and not path.is_file():
            raise FileNotFoundError(f"PIIP_KERNELS_TUNED={override}: no such file (a table's path, or 'off')")
        _cache[key] = load(path) if path.is_file() else {}
    return _cache[key]


def choose(op: str, tensor: torch.Tensor, **sizes: int) -> int:
    """The variant number private op ``op`` runs for a call on CUDA tensor ``tensor`` (its
    device's capability and its dtype) with ``sizes`` (see :func:`shape_class`); 0 where the
    table has no entry."""
    table = table_for(arch_of(tensor.device))
    if not table:
        return 0
    return table.get((op, dtype_name(tensor.dtype), shape_class(op, **sizes)), 0)


def clear_cache() -> None:
    """Forgets the loaded tables (tests; after a new table is written)."""
    _cache.clear()
