"""Training-memory planning: the peak memory of one training step, without allocating it.

:func:`plan_memory` runs forward + backward of a model whose tensors are fake
(``FakeTensorMode``: shapes, dtypes and strides, no storage) under :class:`LiveBytes`, which
follows every storage's lifetime (torch's ``MemTracker`` does the same by category, but its
per-module snapshots take a minute on a full-size preset), and counts parameters, gradients
and AdamW states from the model. It reports per rank:

  parameters, gradients, optimizer states   sharded by the FSDP world size (FSDP2 keeps
                                            fp32 shards of all three)
  activations                               everything else alive at the backward's peak:
                                            saved activations, temporaries, the input, and
                                            the largest convolution's working copies
  fsdp_unsharded                            FSDP2's working set: a unit's parameters
                                            all-gathered in the compute dtype, with the
                                            next unit prefetched, and one unit's unsharded
                                            fp32 gradient before its reduce-scatter
  total                                     the larger of the backward peak and the
                                            optimizer-step peak

What it does not model: the caching allocator's fragmentation and reserved-but-free
blocks, cuBLAS/cuDNN workspaces and other memory that kernels allocate inside themselves
beyond one convolution's working copies (on the CPU, for example, the contiguous copy of
its input that a transposed convolution keeps for the backward), NCCL buffers, the CUDA context (about
0.5 GB per GPU), and the activations of the detector head or neck, which are not part of
this package. :func:`measure_cpu_step` measures a real CPU step with the profiler's
allocation events, which the tests compare with the plan.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .models.config import PIIPConfig
from .models.piip import PIIP
from .models.presets import get_config


@dataclass
class StepSpec:
    """One training step: batch, image side (the last branch's), autocast dtype, checkpointing."""

    batch: int = 1
    side: int | None = None
    dtype: torch.dtype = torch.float32
    checkpointing: bool = False


def _loss(out) -> torch.Tensor:
    """A loss touching every output (detection: every pyramid level)."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum(o.float().mean() for o in outs)


def _autocast(dtype: torch.dtype, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def fsdp_units(model: PIIP) -> list[nn.Module]:
    """The modules FSDP2 shards as units (piip.distributed.apply_fsdp uses the same list):
    every transformer block (ViT, CLIP), ConvNeXt block and interaction unit; the root holds the rest."""
    from .layers import Block, InteractionUnit
    from .layers.convnext import ConvNeXtBlock
    from .models.clip import CLIPLayer

    return [m for m in model.modules() if isinstance(m, (Block, CLIPLayer, ConvNeXtBlock, InteractionUnit))]


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive, and their peak.

    Every output of every operator is followed by storage: a new storage adds its size, a
    view of a tracked one adds a reference, a view of an untracked one (a parameter, the
    input) adds nothing, and a storage counts as freed when the last tensor object referring
    to it is gone (torch keeps a tensor object alive while autograd
    still holds its storage). Storages are told apart by their C++ object, so this works on
    fake tensors too. ``created_before_peak(t)`` says whether t's storage existed at the peak.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}   # storage key -> [tensor refs, bytes, creation number]
        self.current = self.peak = 0
        self.count = self.peak_count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage is a view or an in-place result: it allocates
        # nothing (and a view of a parameter must not count the parameter).
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set) -> None:
        st = t.untyped_storage()
        key = st._cdata
        entry = self.live.get(key)
        if entry is None and key in inputs:
            return  # a view of storage that existed before the tracking began
        if entry is None:
            self.count += 1
            entry = self.live[key] = [0, st.nbytes(), self.count]
            self.current += entry[1]
            if self.current > self.peak:
                self.peak, self.peak_count = self.current, self.count
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.current -= entry[1]
                del self.live[key]

    def created_before_peak(self, t: torch.Tensor) -> bool:
        entry = self.live.get(t.untyped_storage()._cdata)
        return entry is not None and entry[2] <= self.peak_count


_TRACKED: dict = {}


def _tracked_fwd_bwd(cfg: PIIPConfig, spec: StepSpec):
    """Peak bytes of everything forward + backward create (fake tensors), the part of it that
    is gradients, and the model (meta tensors) for the analytic parts. Cached per config and
    step, so plans for several world sizes track once."""
    key = (repr(cfg), repr(spec))
    if key not in _TRACKED:
        _TRACKED.clear()  # one entry: a plan sweep asks for the same step several times in a row
        _TRACKED[key] = _track(cfg, spec)
    return _TRACKED[key]


def _track(cfg: PIIPConfig, spec: StepSpec):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .models.presets import build_model

    side = spec.side or cfg.branches[-1].image_size
    with torch.device("meta"):
        meta = build_model(cfg)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = meta.to_empty(device="cpu")
        model.set_grad_checkpointing(spec.checkpointing)
        img = torch.empty(spec.batch, 3, side, side)
        conv_ws = [0]

        def conv_hook(mod, inp, out):
            conv_ws[0] = max(conv_ws[0], sum(t.numel() * t.element_size() for t in (inp[0], out, mod.weight)))

        hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        with LiveBytes() as tracker:
            with _autocast(spec.dtype):
                loss = _loss(model(img))
            loss.backward()
            del loss
        for h in hooks:
            h.remove()
        grads_at_peak = sum(p.grad.untyped_storage().nbytes() for p in model.parameters()
                            if p.grad is not None and tracker.created_before_peak(p.grad))
    return {"peak": tracker.peak, "gradients_at_peak": grads_at_peak, "conv_workspace": conv_ws[0]}, meta


def plan_memory(cfg_or_name, batch: int = 1, side: int | None = None, dtype: torch.dtype | str = torch.bfloat16,
                checkpointing: bool = False, world_size: int = 1) -> dict:
    """Peak training memory per rank in bytes, by category (see the module docstring).

    ``dtype``: the autocast dtype (fp32 means no autocast); under FSDP (world_size > 1) it is
    also the compute dtype of the all-gathered parameters, gradients reduce in fp32.
    Parameters, gradients and AdamW states (exp_avg, exp_avg_sq and a step scalar per
    parameter, all fp32) are counted from the model; forward + backward are tracked.
    """
    cfg = get_config(cfg_or_name) if isinstance(cfg_or_name, str) else cfg_or_name
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    fb, meta = _tracked_fwd_bwd(cfg, StepSpec(batch, side, dtype, checkpointing))
    W = world_size
    trainable = [p for p in meta.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in meta.parameters()) + sum(b.numel() * b.element_size() for b in meta.buffers())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    opt_states = sum(2 * p.numel() * 4 + 4 for p in trainable)
    # AdamW (for-each-parameter form) holds temporaries of about two of the largest parameter.
    opt_temp = 2 * max((p.numel() * 4 for p in trainable), default=0)
    # Everything but the gradients that forward + backward had created at their peak, plus
    # the largest convolution's working copies: convolution kernels (oneDNN on the CPU,
    # cuDNN's workspace on a GPU) hold reordered copies of input, output and weight inside
    # the call, invisible to any tracking above the kernel.
    grads_at_bwd_peak = fb["gradients_at_peak"]
    acts = fb["peak"] - grads_at_bwd_peak + fb["conv_workspace"]
    unsharded = 0
    if W > 1:
        units = fsdp_units(meta)
        unit_numel = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
        root_numel = sum(p.numel() for p in meta.parameters()) - sum(sum(p.numel() for p in u.parameters()) for u in units)
        elem = torch.finfo(dtype).bits // 8
        # Two units gathered (the current and the prefetched one) in the compute dtype, one
        # unit's gradient unsharded in fp32 before its reduce-scatter; the root's
        # parameters stay gathered for the whole step.
        unsharded = 2 * unit_numel * elem + unit_numel * 4 + root_numel * elem
    bwd_peak = (params + grads_at_bwd_peak + opt_states) / W + acts + unsharded
    opt_peak = (params + grads + opt_states) / W + opt_temp
    total = max(bwd_peak, opt_peak)
    return {"config": cfg.name, "batch": batch, "side": side or cfg.branches[-1].image_size, "dtype": str(dtype)[6:],
            "checkpointing": checkpointing, "world_size": W,
            "parameters": params / W, "gradients": grads / W, "optimizer_states": opt_states / W,
            "activations": acts, "fsdp_unsharded": unsharded, "total": total,
            "peak_phase": "backward" if bwd_peak >= opt_peak else "optimizer step"}


def train_step(model: nn.Module, img: torch.Tensor, opt, dtype: torch.dtype = torch.float32) -> None:
    """One step as the plans assume it: forward under autocast (unless fp32), the loss over
    every output, backward, the optimizer step, gradients set to None."""
    with _autocast(dtype, img.device.type):
        loss = _loss(model(img))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_cpu_step(model: nn.Module, img: torch.Tensor, dtype: torch.dtype = torch.float32, opt=None) -> dict:
    """Measured peak memory of one real CPU training step (bytes), for checking plans:
    the tensors alive before the step (parameters, buffers, optimizer states, after one warm-up
    step that creates them) plus the highest running total of the profiler's allocation events
    during forward, backward and the AdamW step."""
    from torch.profiler import ProfilerActivity, profile

    opt = opt or torch.optim.AdamW(model.parameters(), foreach=False)
    train_step(model, img, opt, dtype)
    base = resident_bytes(model, opt) + img.numel() * img.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, img, opt, dtype)
    peak = allocation_peak(prof)
    return {"before_step": base, "step_peak_over_base": peak, "total": base + peak}


def resident_bytes(model: nn.Module, opt=None) -> int:
    """Bytes of a model's parameters and buffers and of an optimizer's state tensors."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if opt is not None:
        total += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return total


def allocation_peak(prof) -> int:
    """The highest running total of the allocation events a ``profile(profile_memory=True)``
    recorded (bytes above what was allocated when it started)."""
    allocs = []

    def walk(node):
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak
