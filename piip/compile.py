"""Regional ``torch.compile`` of a PIIP model: each repeated block and each interaction unit.

A PIIP step is thousands of small operator calls (layer norms, bias adds, GELUs, residual
adds around every GEMM), so it is launch-bound on a GPU and dispatch-bound on a CPU.
Compiling the repeated pieces fuses those calls; compiling them one by one, rather than the
whole model, keeps compile time proportional to the number of *distinct* pieces: all blocks
of a branch share one compiled graph, and so do the interaction units between the same pair
of branches.

    summary = piip.compile.compile_blocks(model)            # or model.compile_blocks()
    problem = piip.compile.compile_problem("inductor", "cpu")  # None, or why nothing compiles here

What is compiled (``REGION_TYPES``): ViT ``Block``, ``ConvNeXtBlock``, ``CLIPLayer`` and
``InteractionUnit``. Stems, downsampling layers, merges and heads run once per step and stay
eager. Our custom ops trace as single graph nodes (their fake kernels are registered), so
every region compiles as one graph (``fullgraph=True`` by default: a graph break is an error).

Recompiles: dynamo keeps compiled graphs per function and guards on shapes, dtypes and the
constants a forward reads. With ``dynamic=False`` there is exactly one graph per distinct
*signature*: region type, parameter shapes, the static settings it reads (window size, layer
scale present, training flag) and input shapes. Two things would otherwise multiply them:
  - stochastic depth: each block reads its own drop-path rate, a Python float dynamo treats
    as a constant, so every block of a schedule would compile separately (and past dynamo's
    limit of 8 per function fall back to eager silently). ``compile_blocks`` gives the
    regions' ``DropPath`` modules their rate as a tensor buffer instead (same distribution,
    same expectation; one graph per branch);
  - the recompile limit itself: it is raised to twice the number of static signatures
    (training and evaluation), so no region falls back to eager at one input resolution.
Each further input resolution compiles each signature once more (pass ``dynamic=None`` to
let dynamo generalise sizes instead, for multi-scale training).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .layers.block import Block, DropPath
from .layers.convnext import ConvNeXtBlock
from .layers.interaction import InteractionUnit
from .models.clip import CLIPLayer

REGION_TYPES = (Block, ConvNeXtBlock, CLIPLayer, InteractionUnit)


class TensorRateDropPath(DropPath):
    """``DropPath`` whose rate is a (non-persistent) 0-d buffer, so compiled code reads it as
    an input instead of specialising on it. Identity when not training; in training, each
    sample's residual branch is kept with probability 1 - rate and scaled by 1 / (1 - rate)
    (a rate of 0 keeps everything and scales by 1: exactly the input)."""

    def __init__(self, p: float = 0.0):
        super().__init__(p)
        self.register_buffer("rate", torch.tensor(float(p)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = (1.0 - self.rate).to(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = (torch.rand(shape, device=x.device, dtype=torch.float32) < keep).to(x.dtype)
        return x * mask / keep


def regions(model: nn.Module) -> list[nn.Module]:
    """The modules ``compile_blocks`` compiles, in model order (none nested in another)."""
    out, inside = [], set()
    for m in model.modules():
        if isinstance(m, REGION_TYPES) and id(m) not in inside:
            out.append(m)
            inside.update(id(s) for s in m.modules())
    return out


def _static_signature(m: nn.Module) -> tuple:
    """What distinguishes two regions' compiled graphs besides input shapes: the type, every
    parameter's shape and dtype, and the settings the forward reads."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())
    attn = getattr(m, "attn", None)
    window = getattr(attn, "window_size", None) if isinstance(m, Block) else None
    return (type(m).__name__, params, window)


def _swap_drop_paths(regs: list[nn.Module]) -> int:
    """Gives every DropPath inside the regions a tensor rate when the regions use more than
    one rate (otherwise a float rate is a single constant and costs no recompiles)."""
    paths = [(parent, name, child) for r in regs for parent in r.modules() for name, child in parent.named_children()
             if type(child) is DropPath]
    if len({c.p for _, _, c in paths}) <= 1:
        return 0
    for parent, name, child in paths:
        new = TensorRateDropPath(child.p)
        new.train(child.training)
        ref = next(parent.parameters(), None)
        if ref is not None:
            new.rate = new.rate.to(ref.device)
        setattr(parent, name, new)
    return len(paths)


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = False,
                   fullgraph: bool = True, options: dict | None = None) -> dict:
    """Compiles every region of ``model`` in place (``nn.Module.compile``) and returns a
    summary: {"backend", "regions": {type name: count}, "static_signatures", "recompile_limit",
    "drop_paths_with_tensor_rate"}. Compilation happens at the first call of each region;
    ``compile_problem`` says beforehand whether ``backend`` works on this machine.

    Args are those of ``torch.compile``: ``mode="reduce-overhead"`` adds CUDA graphs per
    region on a GPU (fixed shapes only); ``dynamic=False`` (default) compiles one graph per
    input shape, the fastest for fixed-size training.
    """
    import torch._dynamo.config as dynamo_config

    regs = regions(model)
    if not regs:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no block or interaction unit to compile")
    swapped = _swap_drop_paths(regs)
    n_static = len({_static_signature(r) for r in regs})
    # Dynamo's per-function limit; each static signature compiles once per training flag.
    limit = max(dynamo_config.recompile_limit, 2 * n_static)
    dynamo_config.recompile_limit = limit
    counts: dict[str, int] = {}
    for r in regs:
        r.compile(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph, options=options)
        counts[type(r).__name__] = counts.get(type(r).__name__, 0) + 1
    return {"backend": backend, "mode": mode, "regions": counts, "static_signatures": n_static,
            "recompile_limit": limit, "drop_paths_with_tensor_rate": swapped}


@functools.lru_cache(maxsize=None)
def compile_problem(backend: str = "inductor", device: str = "cpu") -> str | None:
    """None when ``torch.compile(backend=...)`` compiles and runs a small function with its
    backward on ``device`` here; else why not, in one line (no C++ compiler for inductor on
    the CPU, no Triton for a GPU, an unknown backend...). Cached per (backend, device)."""
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"

        def probe(x):
            return torch.nn.functional.gelu(x * 2.0 + 1.0).sum()

        fn = torch.compile(probe, backend=backend, dynamic=False, fullgraph=True)
        x = torch.randn(8, 8, device=dev, requires_grad=True)
        fn(x).backward()
        if not torch.isfinite(x.grad).all():
            return "the compiled probe gave a non-finite gradient"
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "this backend does not work here"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"torch.compile(backend={backend!r}) fails on {device}: {type(err).__name__}: {first[:200]}"
