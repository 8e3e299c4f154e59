"""Model-level benchmark: one training step (forward + backward + AdamW) of a preset, our
path against the official path, with the same weights; with ``--ladder``, the official
recipe and then each speed-up added one at a time.

    python bench/bench_model.py                       # CPU: TSB classification, TSB detection at 1/4 resolution
    python bench/bench_model.py --config deit_sbl_1568_1120_672 --batch 2 --dtype bfloat16   # GPU default
    python bench/bench_model.py --config tsb_368 --batch 4 --checkpointing --steps 5
    python bench/bench_model.py --ladder              # the ladder (defaults as above, one case)
    python bench/bench_model.py --ladder --tiny --device cpu --steps 1 --warmup 1   # a dry run in seconds

Paths (piip.PIIP.set_execution):
  ours       fused deform_cross_attn in every interaction injector (our fastest backend) and
             the fused branch_merge
  official   what the official code runs: grid reference points, offsets and a softmax, then
             multi-scale deformable attention in fp32 (the Deformable DETR CUDA kernel when
             bench_msda finds it built, as bench/gpu_check.sh does; else grid_sample), and
             the eager interpolate-and-sum merge

For each path: the median step time over ``--steps`` timed steps after warm-up; the share of
the step spent in deformable attention and merging (profiler, one step: the forward ranges
around each injector's attention and the merge's resize-and-sum, plus the backward of the
sampling and resize ops: our fused ops', or grid_sample's, the DETR kernel's and bilinear
interpolation's; device time on a GPU, CPU time on the CPU, over the step's wall time);
the peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the
tensors alive before the step plus the highest running total of the profiler's allocation
events during it, see piip.memory.measure_cpu_step). Rows go to bench/results/model_<device>
(JSON lines and markdown) with device, versions and commit.

The ladder (``--ladder``): copies of one model (same weights), each with its own optimizer,
timed in interleaved steps. Rows, each adding one thing to the row above:
  official         the official recipe: bf16 weights with fp32 masters in the optimizer on a
                   GPU (DeepSpeed ZeRO-1 bf16), fp32 on the CPU; AdamW with the preset's
                   official parameter groups, torch's default implementation
                   (piip.build_optimizer(model, preset, fused=None)); deformable attention in
                   fp32 (the Deformable DETR kernel when bench_msda.anchor_runner finds it,
                   else grid_sample); the eager merge (set_execution("official"))
  ours             our kernels: the fused interaction attention and branch merge
  fused_optimizer  torch's fused AdamW over the same groups (fused=True)
  exact_resize     position embeddings resized by two matmuls (set_pos_embed_resize("matmul"))
  compile          regional torch.compile of the blocks and interaction units (compile_blocks)
  cuda_graphs      the whole step (forward, backward, optimizer) captured in one CUDA graph
                   and replayed; needs CUDA (on the CPU only the dry run exercises its code,
                   with an eager stand-in for the graph, and the row is not timed)
Columns: step_ms (median), speedup over official, tflops (full-cost MACs of piip.flops x 3
x 2 FLOPs per step), peak_fraction (over the device's bf16 peak, measured by a large bf16
matmul or PIIP_BF16_PEAK_TFLOPS; empty on the CPU), gpu_busy (kernel time, overlaps
merged, over the median step), aten_ops (aten operator calls per step, nested ones
included), kernels (GPU launches per step: kernel and graph launch calls), copies and
copies_mb (aten::copy_ calls and bytes written, piip.optim.count_copies), peak_mem_mb (as
above; each rung's own), max_rel_diff and a note (why a row is skipped, a stand-in, a peak
above official's). All from one profiled step per row after the timed ones.
max_rel_diff: the rung against eager ``ours`` from the same weights, over the loss and every
gradient of one training step; per tensor max|a - b| / max|b| (tensors whose gradients are
below 1e-6 of the largest gradient are measured against that floor), the largest; the JSON
names the tensor (max_rel_diff_at). max_rel_diff_step2 (JSON only) is the same for a second
step, after one optimizer step: it includes the optimizer (the only place the fused one can
differ), and Adam's first update, lr * g / (|g| + eps), turns a rounding-level sign change of
a near-zero gradient into a full lr of difference, so it reads larger. The weights are moved first so that the model
computes something non-trivial: sampling offsets off pixel centres (a fresh model samples
exactly on them, where the location gradient is one-sided by convention and a last-bit
change of a coordinate flips it) and non-zero injector gains (at zero the attention gets no
gradient); stochastic depth is off in every row, so all rows compute the same function.
``--profile DIR`` writes the per-kind time table (GEMM, attention, our ops, casts/copies,
optimizer, norms, elementwise, other; device time on a GPU, operator self time on the CPU)
and each row's top operators. ``--json FILE`` writes the rows. Rows also go to
bench/results/model_ladder_<device>.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import budgeted, device_name, progress, report, sync  # noqa: E402

import piip  # noqa: E402
import piip.compile  # noqa: E402
import piip.flops  # noqa: E402
from piip.memory import allocation_peak, resident_bytes  # noqa: E402

# What counts as deformable attention and merging: in the forward, the model's named ranges
# around each injector's attention (projections, offsets, softmax, sampling) and around the
# resize-and-sum of the merge, the same for both paths; in the backward, the sampling and
# resize ops themselves (their surrounding small ops carry generic names).
FORWARD_RANGES = ("piip.interaction_attention", "piip.branch_merge")
BACKWARD_OPS = {
    "ours": ("piip::deform_cross_attn_backward", "piip::ms_deform_attn_backward", "piip::branch_merge_backward"),
    "official": ("aten::grid_sampler_2d_backward", "aten::upsample_bilinear2d_backward", "DetrKernelBackward"),
}
COLUMNS = ["config", "path", "device", "dtype", "batch", "scale", "side", "checkpointing", "step_ms", "speedup",
           "msda_share", "peak_mem_mb", "peak_mem_source"]


def default_cases(device: torch.device):
    """(preset substring or model entry, batch, scale, dtype) per device type."""
    upernet_512 = 512 / piip.get_config(UPERNET[UPERNET_TSB]).branches[-1].image_size
    if device.type == "cuda":
        return [("mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16", 2, 1.0, "bfloat16"),
                (UPERNET_TSB, 2, upernet_512, "bfloat16")]
    return [("piip_3branch_tsb_368-192-128_cls_token_deit1", 2, 1.0, "float32"),
            ("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", 1, 0.25, "float32"),
            (UPERNET_TSB, 2, upernet_512, "float32")]


TINY = "tiny"  # --tiny: a built-in 3-branch classification model for dry runs


def tiny_config() -> piip.PIIPConfig:
    """Widths 64/48/32, depth 2, two stages, on 32/48/64-pixel images with 3x3 position tables
    (the tests' tiny_config(3, "classification"))."""
    dims, sizes, heads = (64, 48, 32), (32, 48, 64), (4, 4, 4)
    branches = tuple(piip.BranchConfig(name=f"branch{i + 1}", embed_dim=dims[i], depth=2, num_heads=heads[i],
                                       image_size=sizes[i], interaction_indexes=((0, 0), (1, 1)), window_sizes=(None, None),
                                       cls_token=True, pos_embed_grid=(3, 3)) for i in range(3))
    return piip.PIIPConfig(branches=branches, output="classification", deform_num_heads=4, num_classes=5)


# Task models (transformers' UperNet around a PIIP detection backbone, piip.hf): the
# segmentation training step. Entry -> the backbone's preset (TINY: the tiny model as a
# detection backbone, for dry runs); the optimizer follows that preset's official recipe.
UPERNET_TSB, UPERNET_TINY = "upernet_tsb", "upernet_tiny"
UPERNET = {UPERNET_TSB: "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", UPERNET_TINY: TINY}


class UperNetPIIP(torch.nn.Module):
    """UperNetForSemanticSegmentation (transformers' default head: 512 wide, auxiliary head
    256, 150 classes) around a PIIP backbone, trained as the official segmentation recipe
    trains it: the backbone in the step's dtype, the heads in fp32 (``to()`` keeps them
    there; PIIPBackbone returns fp32 maps to them). ``forward(img)`` returns UperNet's loss
    (decode + 0.4 x auxiliary cross-entropy) on a 3-class label map derived from the image;
    the PIIP methods the benchmark calls act on the backbone's PIIP. The ladder's TFLOP/s
    count the backbone's MACs only (piip.flops), not the heads'."""

    def __init__(self, cfg: piip.PIIPConfig):
        super().__init__()
        from transformers import UperNetForSemanticSegmentation

        from piip.hf import PIIPBackboneConfig, tasks

        self.model = UperNetForSemanticSegmentation(tasks.upernet_config(PIIPBackboneConfig(piip_config=cfg), num_labels=150))

    @property
    def piip(self) -> piip.PIIP:
        return self.model.backbone.piip

    def forward(self, img):
        labels = (img[:, 0] > 0).long() + (img[:, 1] > 0).long()
        return self.model(pixel_values=img.float(), labels=labels).loss

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        for head in (self.model.decode_head, self.model.auxiliary_head):
            head.float()
        return self

    def set_execution(self, *args, **kwargs):
        self.piip.set_execution(*args, **kwargs)

    def set_pos_embed_resize(self, *args, **kwargs):
        self.piip.set_pos_embed_resize(*args, **kwargs)

    def set_grad_checkpointing(self, *args, **kwargs):
        self.piip.set_grad_checkpointing(*args, **kwargs)

    def compile_blocks(self, **kwargs):
        return self.piip.compile_blocks(**kwargs)


def config_of(name: str) -> piip.PIIPConfig:
    """The (backbone's) PIIPConfig of a preset or model entry."""
    if name in UPERNET:
        cfg = config_of(UPERNET[name])
        if name == UPERNET_TINY:  # the tiny classification model as a detection backbone
            from dataclasses import replace

            cfg = cfg.replace(output="detection", branches=tuple(replace(b, cls_token=False) for b in cfg.branches))
        return cfg
    return tiny_config() if name == TINY else piip.get_config(name)


def recipe_of(name: str) -> str:
    """The preset whose official optimizer recipe a preset or model entry trains with."""
    if name == UPERNET_TINY:
        return UPERNET[UPERNET_TSB]
    return TINY_RECIPE if name == TINY else UPERNET.get(name, name)


def build(name: str) -> torch.nn.Module:
    if name in UPERNET:
        return UperNetPIIP(config_of(name))
    return piip.PIIP(tiny_config()) if name == TINY else piip.create_model(name)


def input_side(cfg, scale: float) -> int:
    """The last branch's resolution scaled, rounded to a multiple of the patch size."""
    p = cfg.branches[-1].patch_size
    return max(p, int(round(cfg.branches[-1].image_size * scale / p)) * p)


def loss_of(out, labels):
    if torch.is_tensor(out) and out.dim() == 0:  # a model entry that computes its own loss (UperNetPIIP)
        return out
    if isinstance(out, list):  # detection pyramid: a loss that reaches every level
        return sum(o.float().square().mean() for o in out)
    return torch.nn.functional.cross_entropy(out.float(), labels)


def official_msda(device):
    """The attention the official code runs: (runner, label). The Deformable DETR kernel if
    built (or its labelled stand-in under PIIP_ANCHOR_STANDIN=1), else (None, grid_sample).
    The official module casts around the kernel: it always computes in fp32."""
    from bench_msda import anchor_for

    kernel = anchor_for(device)
    if kernel is None:
        return None, "grid_sample (our reference backend)"
    label = kernel.label
    if kernel.standin and "stand-in" not in label:
        label += " (a stand-in built from our reference, not the anchor)"
    return kernel, label


def fp32_msda(fn):
    """``fn`` (default: ms_deform_attn on the reference backend, grid_sample) in fp32, the
    result back in the value's dtype: what the official MSDeformAttn does around its core."""
    from piip_kernels import ms_deform_attn

    fn = fn or (lambda *a: ms_deform_attn(*a, backend="reference"))

    def run(value, shapes, starts, loc, weights):
        return fn(value.float(), shapes, starts, loc.float(), weights.float()).to(value.dtype)

    return run


def profile_step(step, device, baseline_bytes: int, path: str):
    """One profiled step: (share of its time in sampling and merging, CPU peak bytes)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts, profile_memory=device.type == "cpu") as prof:
        step()
        sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    names = FORWARD_RANGES + BACKWARD_OPS[path]
    spent = 0.0
    for evt in prof.key_averages():
        if evt.key in names:
            spent += (getattr(evt, "device_time_total", 0) or 0) if device.type == "cuda" else evt.cpu_time_total
    peak = baseline_bytes + allocation_peak(prof) if device.type == "cpu" else None
    return spent / wall_us, peak


def run_case(name: str, batch: int, scale: float, dtype: torch.dtype, device, checkpointing: bool, steps: int,
             warmup: int, paths) -> list[dict]:
    """Both paths on copies of one model (same weights), each with its own AdamW. The timed
    steps alternate between the paths, so a drift of the machine (clocks, other load) falls
    on both alike; the median per path is reported."""
    import copy

    cfg = config_of(name)
    side = input_side(cfg, scale)
    torch.manual_seed(0)
    base_model = build(name)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(batch, 3, side, side, generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    runs = {}
    for i, path in enumerate(paths):
        model = (base_model if i == len(paths) - 1 else copy.deepcopy(base_model)).to(device)
        msda, msda_name = official_msda(device) if path == "official" else (None, "")
        model.set_execution(path, msda=fp32_msda(msda) if path == "official" else None)
        model.set_grad_checkpointing(checkpointing)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, opt=opt):
            with autocast:
                loss = loss_of(model(img), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        runs[path] = (model, opt, step, msda_name)
        progress(f"  {name} [{path}{': ' + msda_name if msda_name else ''}] batch {batch} side {side} {str(dtype)[6:]}"
                 f"{' checkpointing' if checkpointing else ''}")
        for _ in range(warmup):
            step()
    times = {p: [] for p in paths}
    peak_gpu = {}
    for _ in range(steps):
        for path in paths:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            runs[path][2]()
            sync(device)
            times[path].append((time.perf_counter() - t0) * 1e3)
            if device.type == "cuda":
                peak_gpu[path] = max(peak_gpu.get(path, 0), torch.cuda.max_memory_allocated(device))
    rows = []
    for path in paths:
        model, opt, step, msda_name = runs[path]
        base = resident_bytes(model, opt) + img.numel() * img.element_size()
        share, peak_cpu = profile_step(step, device, base, path)
        # On a GPU the other path's copy is resident too: its parameters and states are
        # subtracted so the figure is one path's own.
        other = sum(resident_bytes(m, o) for p2, (m, o, _, _) in runs.items() if p2 != path)
        peak = peak_gpu[path] - other if device.type == "cuda" else peak_cpu
        rows.append({"config": name, "path": path, "device": device_name(device), "dtype": str(dtype)[6:], "batch": batch,
                     "scale": scale, "side": side, "checkpointing": checkpointing, "step_ms": statistics.median(times[path]),
                     "step_ms_all": times[path], "msda_share": share, "peak_mem_mb": peak / 2 ** 20,
                     "peak_mem_source": "torch.cuda.max_memory_allocated (less the other path's model copy)"
                     if device.type == "cuda" else "tensors before the step + profiler allocation events (CPU)",
                     "official_attention": msda_name if path == "official" else None})
    by_path = {r["path"]: r for r in rows}
    if "ours" in by_path and "official" in by_path:
        by_path["ours"]["speedup"] = by_path["official"]["step_ms"] / by_path["ours"]["step_ms"]
    return rows


# ---------------------------------------------------------------------------------------------
# The ladder

RUNGS = ("official", "ours", "fused_optimizer", "exact_resize", "compile", "cuda_graphs")
LADDER_COLUMNS = ["path", "step_ms", "speedup", "tflops", "peak_fraction", "gpu_busy", "aten_ops", "kernels", "copies",
                  "copies_mb", "peak_mem_mb", "max_rel_diff", "note"]
KINDS = ("GEMM", "attention", "our ops", "casts/copies", "optimizer", "norms", "elementwise", "other")
# The optimizer recipe of --tiny (a classification model like the TSB classifier).
TINY_RECIPE = "piip_3branch_tsb_368-192-128_cls_token_deit1"
# Runtime calls that start work on the GPU (kernels, or a whole graph).
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaLaunchCooperativeKernel", "cudaLaunchCooperativeKernelMultiDevice")
MEM_NOTE = {  # why a rung may hold more memory than the row above it (said when > 5 % over official)
    "compile": "compiled graphs save their own choice of activations for the backward",
    "cuda_graphs": "the graph keeps its own memory pool and static inputs, outputs and gradients alive between steps",
    "exact_resize": "the interpolation matrices and one more intermediate per resize",
}


class _Stop(Exception):
    """A SIGTERM (gpu_check.sh's timeout) arrived while a rung was being set up."""


class _Budget:
    """Stops the ladder politely: on SIGTERM (rows measured so far are still written) or when
    ``budget_s`` has passed: rungs not yet set up are skipped, timing stops after one step."""

    def __init__(self, budget_s: float | None):
        import signal

        self.start, self.budget_s, self.stopped, self.interruptible = time.monotonic(), budget_s, False, False
        self._old = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_):
        self.stopped = True
        if self.interruptible:
            raise _Stop()

    def over(self, fraction: float = 1.0) -> bool:
        late = self.budget_s is not None and time.monotonic() - self.start > fraction * self.budget_s
        return self.stopped or late

    def close(self):
        import signal

        signal.signal(signal.SIGTERM, self._old)


def move_offsets_off_pixel_centres(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights on which the rows' differences mean something: sampling offsets moved off pixel
    centres (bias by 0.1-0.4 pixel in a random direction, and a per-query part), non-zero
    attention logits weights and injector gains (at zero the attention gets no gradient)."""
    from piip_kernels import MSDeformAttn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MSDeformAttn):
                b = m.sampling_offsets.bias
                shift = (torch.rand(b.shape, generator=g) * 0.3 + 0.1) * torch.sign(torch.rand(b.shape, generator=g) - 0.5)
                b.add_(shift.to(b))
                for lin in (m.sampling_offsets, m.attention_weights):
                    w = lin.weight
                    w.copy_((torch.randn(w.shape, generator=g) * 0.3 / w.shape[1] ** 0.5).to(w))
        for n, p in model.named_parameters():
            if n.endswith(("ca_gamma", "cffn_gamma")):
                p.copy_((torch.rand(p.shape, generator=g) * 0.1 + 0.05).to(p))


def resized_tables(cfg, side: int) -> int:
    """How many ViT/CLIP position tables are resized at input side ``side`` (branch i sees the
    image scaled by image_size_i / image_size_N, sides floored)."""
    last = cfg.branches[-1]
    n = 0
    for b in cfg.branches:
        if b.kind in ("vit", "clip"):
            live = int(side * b.image_size / last.image_size) // b.patch_size
            n += tuple(b.pos_embed_grid) != (live, live)
    return n


def no_drop_path(model: torch.nn.Module) -> None:
    from piip.layers import DropPath

    for m in model.modules():
        if isinstance(m, DropPath):
            m.p = 0.0


class _StandInGraph:
    """The interface of torch.cuda.CUDAGraph on any device, for the CPU dry run: ``capture``
    records the callable, ``replay`` calls it. It lets the graph rung's code (static buffers,
    warm-up, capture, replay, reading results) run without CUDA; nothing is timed with it."""

    def __init__(self):
        self.fn = None

    def capture(self, fn):
        self.fn = fn
        fn()

    def replay(self):
        self.fn()


class Runner:
    """One rung: its model copy, optimizer and step. ``step()`` is a whole training step;
    ``observed_step()`` one step that returns (loss, gradients) as they were before the
    optimizer stepped."""

    def __init__(self, name, model, opt, img, labels, device):
        self.name, self.model, self.opt, self.img, self.labels, self.device = name, model, opt, img, labels, device
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.graph = None
        self.note = []

    def fwd_bwd(self):
        loss = loss_of(self.model(self.img), self.labels)
        loss.backward()
        return loss

    def _eager_step(self):
        loss = self.fwd_bwd()
        self.opt.step()
        return loss

    def step(self):
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss
        loss = self._eager_step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def observed_step(self):
        if self.graph is not None:
            self.graph.replay()  # the captured backward writes fresh gradients, then the optimizer steps
            return self.static_loss.detach().clone(), [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        loss = self.fwd_bwd()
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach(), grads

    def capture(self, real: bool) -> None:
        """The whole step in one graph (torch.cuda.CUDAGraph when ``real``, else the stand-in):
        warm-up on a side stream, capture from zeroed gradients (the backward then allocates
        them in the graph's pool and every replay rewrites them), weights and optimizer state
        restored to their values before the warm-up, so the first replay is the rung's first
        step. The image and labels are the static inputs (a training loop copies each batch in)."""
        saved = [p.detach().clone() for p in self.params]
        saved_state = {k: {n: (t.detach().clone() if torch.is_tensor(t) else t) for n, t in v.items()}
                       for k, v in self.opt.state.items()}
        saved_masters = [m.detach().clone() for _, m in getattr(self.opt, "_pairs", [])]
        if real:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._eager_step()
                    self.opt.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_loss = self._eager_step()
        else:
            self._eager_step()
            self.opt.zero_grad(set_to_none=True)
            graph = _StandInGraph()

            def body():
                # A replay rewrites the gradients the capture allocated; eagerly that is a
                # backward from no gradients.
                self.opt.zero_grad(set_to_none=True)
                self.static_loss = self._eager_step()

            graph.capture(body)
        # Back to the weights and optimizer state of before the warm-up (in place: the graph
        # reads these very tensors).
        with torch.no_grad():
            for p, v in zip(self.params, saved):
                p.copy_(v)
            for (_, m), v in zip(getattr(self.opt, "_pairs", []), saved_masters):
                m.copy_(v)
            for k, st in self.opt.state.items():
                # States created by the warm-up go back to what a fresh AdamW starts from:
                # step 0 and zero moments.
                for n, t in st.items():
                    if torch.is_tensor(t):
                        old = saved_state.get(k, {}).get(n)
                        t.copy_(old) if old is not None else t.zero_()
        self.graph = graph


def _rel_diffs(got, ref, names) -> tuple[float, str]:
    """Largest per-tensor max|a - b| / max|b| over (loss, gradients) pairs (see the module
    docstring), and which tensor it was."""
    floor = 1e-6 * max((r.abs().max().item() for r in ref[1] if r is not None), default=0.0)
    worst = (abs(got[0].item() - ref[0].item()) / max(abs(ref[0].item()), 1e-30), "loss")
    for a, b, n in zip(got[1], ref[1], names):
        if (a is None) != (b is None):
            return float("inf"), f"gradient of {n} present in one run only"
        if a is not None:
            d = (a.double() - b.double()).abs().max().item()
            worst = max(worst, (d / max(b.abs().max().item(), floor, 1e-30), f"gradient of {n}"))
    return worst


def make_optimizer(model, preset: str, fused, capturable: bool):
    kw = {"capturable": True} if capturable else {}
    return piip.build_optimizer(model, preset, fused=fused, **kw)


def _bf16_peak_tflops(device) -> tuple[float | None, str]:
    """The device's bf16 peak: PIIP_BF16_PEAK_TFLOPS, else measured (an 8192^3 bf16 matmul,
    median of CUDA-event timings); None on the CPU."""
    env = os.environ.get("PIIP_BF16_PEAK_TFLOPS")
    if env:
        return float(env), "PIIP_BF16_PEAK_TFLOPS"
    if device.type != "cuda":
        return None, "no bf16 peak on the CPU"
    from common import time_ms

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, warmup=5, reps=20)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12, "measured: 8192^3 bf16 matmul"


def _kind_of(name: str, under_optimizer: bool) -> str:
    """One of KINDS for an operator (CPU) or kernel (GPU) name."""
    n = name.lower()
    if under_optimizer or "adam" in n or "optimizer.step" in n or "multi_tensor_apply" in n or "_foreach_" in n:
        return "optimizer"
    if any(k in n for k in ("piip", "dca", "msda", "branch_merge", "deformable", "detrkernel", "grid_sampler", "merge_")):
        return "our ops"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "xmma", "cublas", "nvjet", "::mm", "addmm", "bmm", "matmul", "linear",
                            "mkldnn")) or ("conv" in n and "convert" not in n):
        return "GEMM"
    if any(k in n for k in ("copy", "memcpy", "memset", "_to_copy", "aten::to", "clone", "contiguous", "cast", "convert")):
        return "casts/copies"
    if any(k in n for k in ("layer_norm", "layernorm", "group_norm", "groupnorm", "rms_norm", "rmsnorm", "gammabeta",
                            "rowwisemoments", "computefusedparams")):
        return "norms"
    if any(k in n for k in ("elementwise", "vectorized", "triton_poi", "triton_per", "triton_red", "reduce_kernel",
                            "compiledfunction", "compiled", "cpp_fused", "aten::")):
        return "elementwise"
    return "other"


def _under_optimizer(evt) -> bool:
    p = evt.cpu_parent
    while p is not None:
        if p.name.startswith("Optimizer."):
            return True
        p = p.cpu_parent
    return False


def _profile_rung(runner: Runner, device) -> dict:
    """One profiled step: aten calls, launches, copies, GPU busy time, per-kind times (ms),
    the CPU's allocation peak, and the top operators as text."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from piip.optim import count_copies

    cpu = device.type == "cpu"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts, record_shapes=True, profile_memory=cpu) as prof:
        runner.step()
        sync(device)
    events = list(prof.events())
    host = [e for e in events if e.device_type == DeviceType.CPU]
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    kinds = dict.fromkeys(KINDS, 0.0)
    if gpu:
        for e in gpu:
            kinds[_kind_of(e.name, False)] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else 0.0
    else:
        for e in host:
            if e.name.startswith(("aten::", "piip", "DetrKernel", "CompiledFunction", "Optimizer.", "cpp_fused")) or \
                    "Compiled" in e.name:
                kinds[_kind_of(e.name, _under_optimizer(e))] += e.self_cpu_time_total / 1e3
    spans = sorted((e.time_range.start, e.time_range.end) for e in gpu)
    busy_us, end = 0.0, float("-inf")
    for a, b in spans:  # union of kernel intervals
        if b > end:
            busy_us += b - max(a, end)
            end = b
    copies = count_copies(prof)
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    return {"aten_ops": sum(1 for e in host if e.name.startswith("aten::")),
            "kernels": sum(1 for e in host if e.name in LAUNCHES) if device.type == "cuda" else None,
            "copies": copies.count, "copies_mb": copies.bytes / 2 ** 20, "busy_ms": busy_us / 1e3 if gpu else None,
            "kinds_ms": kinds, "cpu_peak_bytes": allocation_peak(prof) if cpu else None,
            "top": prof.key_averages().table(sort_by=sort, row_limit=25)}


def _device_peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _device_peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_ladder(name: str, batch: int, scale: float, dtype: torch.dtype, device, steps: int, warmup: int,
               rungs=RUNGS, compile_backend: str = "inductor", profile_dir: str | None = None,
               budget_s: float | None = None) -> list[dict]:
    """The ladder's rows (see the module docstring), one per rung in ``rungs``."""
    import copy

    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown or "ours" not in rungs:
        raise SystemExit(f"--rungs: {unknown or 'ours'} {'unknown' if unknown else 'is needed (the reference of max_rel_diff)'}; "
                         f"choose from {RUNGS}")
    budget = _Budget(budget_s)
    cfg = config_of(name)
    preset = recipe_of(name)
    side = input_side(cfg, scale)
    low = dtype != torch.float32
    if low and device.type != "cuda":
        progress(f"  note: {str(dtype)[6:]} weights on the CPU (the official recipe is fp32 there)")
    torch.manual_seed(0)
    base = build(name)
    no_drop_path(base)
    move_offsets_off_pixel_centres(base)
    base.train()
    g = torch.Generator().manual_seed(1)
    img = torch.randn(batch, 3, side, side, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    msda, msda_name = official_msda(device)
    macs = piip.flops.full_cost(cfg, side)["macs"] * batch
    peak_tflops, peak_source = _bf16_peak_tflops(device)
    progress(f"ladder: {name} batch {batch} side {side} {str(dtype)[6:]} on {device_name(device)}; "
             f"{3 * 2 * macs / 1e12:.3f} TFLOP per step; bf16 peak: "
             f"{f'{peak_tflops:.0f} TFLOP/s ({peak_source})' if peak_tflops else peak_source}")
    rows = {r: {"path": r, "note": []} for r in rungs}
    runners: dict[str, Runner] = {}
    reference = None
    compiled_summary = None
    for i, rung in enumerate(RUNGS):
        if rung not in rungs:
            continue
        # What this rung runs: every selected rung's addition up to it (official: none).
        has = {r for r in RUNGS[1:i + 1] if r in rungs}
        note = rows[rung]["note"]
        if budget.over(0.75):
            note.append("skipped: " + ("SIGTERM" if budget.stopped else f"budget of {budget_s:.0f} s") + " reached before its setup")
            continue
        if rung == "cuda_graphs" and device.type != "cuda" and name not in (TINY, UPERNET_TINY):
            note.append("needs CUDA: skipped (the --tiny dry run exercises its code on the CPU)")
            continue
        t0 = time.monotonic()
        budget.interruptible = True
        try:
            model = copy.deepcopy(base).to(device=device, dtype=dtype)
            if rung == "official":
                model.set_execution("official", msda=fp32_msda(msda))
                note.append(f"attention in fp32 through {msda_name}")
            else:
                model.set_execution("ours")
            if "exact_resize" in has:
                model.set_pos_embed_resize("matmul")
                if rung == "exact_resize" and not resized_tables(cfg, side):
                    note.append("no effect here: every position table already has its branch's live grid")
            if "compile" in has:
                problem = piip.compile.compile_problem(compile_backend, device.type)
                if problem:
                    if rung == "compile":
                        note.append(f"skipped: {problem}")
                        continue
                    note.append(f"without compile ({problem})")
                else:
                    compiled_summary = model.compile_blocks(backend=compile_backend)
                    if rung == "compile":
                        note.append(f"{compile_backend}: {sum(compiled_summary['regions'].values())} regions, "
                                    f"{compiled_summary['static_signatures']} signatures")
            graphs = rung == "cuda_graphs"
            try:
                opt = make_optimizer(model, preset, True if "fused_optimizer" in has else None,
                                     capturable=graphs and device.type == "cuda")
            except (ValueError, TypeError) as err:
                note.append(f"skipped: {err}")
                continue
            runner = Runner(rung, model, opt, img, labels, device)
            if graphs:
                if device.type == "cuda":
                    runner.capture(real=True)
                else:
                    runner.capture(real=False)
                    note.append("needs CUDA: not timed; its capture and replay code ran with an eager stand-in "
                                "(max_rel_diff from that)")
            # The check from the common starting weights, then the warm-up. Observations are
            # compared as soon as eager ours has run, and dropped (each is two sets of gradients).
            obs = [runner.observed_step() for _ in range(2)]
            if rung == "ours":
                reference = obs
            runners[rung] = runner
            rows[rung]["_obs"] = obs
            for r2, row2 in rows.items():
                if reference is not None and row2.get("_obs") is not None:
                    (d1, at1), (d2, at2) = (_rel_diffs(o, ref, runner.names) for o, ref in zip(row2.pop("_obs"), reference))
                    row2.update(max_rel_diff=d1, max_rel_diff_at=at1, max_rel_diff_step2=d2, max_rel_diff_step2_at=at2)
            del obs
            for _ in range(warmup):
                runner.step()
            sync(device)
        except _Stop:
            note.append("skipped: SIGTERM during its setup")
            continue
        except Exception as err:  # noqa: BLE001 - one rung failing must not lose the others
            note.append(f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
            progress(f"  [{rung}] failed: {type(err).__name__}: {err}")
            continue
        finally:
            budget.interruptible = False
        progress(f"  [{rung}] set up, checked and warmed up in {time.monotonic() - t0:.1f} s")
    reference = base = None  # free the starting copy and the reference gradients before timing
    for row in rows.values():
        row.pop("_obs", None)  # eager ours did not run: nothing to compare with
    # Interleaved timed steps.
    timed = [r for r in runners if not (r == "cuda_graphs" and device.type != "cuda")]
    times = {r: [] for r in timed}
    peaks = {}
    for k in range(steps if timed else 0):
        if k > 0 and budget.over():
            progress(f"  timing stopped after {k} steps: " + ("SIGTERM" if budget.stopped else "budget"))
            break
        for r in timed:
            _device_peak_reset(device)
            sync(device)
            t0 = time.perf_counter()
            runners[r].step()
            sync(device)
            times[r].append((time.perf_counter() - t0) * 1e3)
            if device.type == "cuda":
                peaks[r] = max(peaks.get(r, 0), _device_peak(device))
    # One profiled step per rung.
    kinds = {}
    for r, runner in runners.items():
        row = rows[r]
        if r in times and times[r]:
            row["step_ms"] = statistics.median(times[r])
            row["step_ms_all"] = times[r]
            row["tflops"] = 6 * macs / (row["step_ms"] * 1e-3) / 1e12
            if peak_tflops:
                row["peak_fraction"] = row["tflops"] / peak_tflops
        if r not in times:
            continue  # the CPU's stand-in graph: nothing of it is a measurement
        if budget.over():
            row["note"].append("not profiled: " + ("SIGTERM" if budget.stopped else "budget"))
            continue
        prof = _profile_rung(runner, device)
        kinds[r] = prof["kinds_ms"]
        row.update({k: prof[k] for k in ("aten_ops", "kernels", "copies", "copies_mb")})
        if prof["busy_ms"] is not None and row.get("step_ms"):
            row["gpu_busy"] = min(1.0, prof["busy_ms"] / row["step_ms"])
        if device.type == "cuda" and r in peaks:
            # The other rungs' copies are resident too: their weights and states are subtracted.
            other = sum(resident_bytes(o.model, o.opt) for o2, o in runners.items() if o2 != r)
            row["peak_mem_mb"] = (peaks[r] - other) / 2 ** 20
        elif prof["cpu_peak_bytes"] is not None and r in times:
            base_bytes = resident_bytes(runner.model, runner.opt) + img.numel() * img.element_size()
            row["peak_mem_mb"] = (base_bytes + prof["cpu_peak_bytes"]) / 2 ** 20
        if profile_dir:
            os.makedirs(profile_dir, exist_ok=True)
            with open(os.path.join(profile_dir, f"top_ops_{r}.txt"), "w") as f:
                f.write(f"{name} batch {batch} side {side} {str(dtype)[6:]} [{r}]: one profiled step\n{prof['top']}\n")
    budget.close()
    out = [rows[r] for r in rungs]
    off = rows.get("official", {})
    for row in out:
        if off.get("step_ms") and row.get("step_ms"):
            row["speedup"] = off["step_ms"] / row["step_ms"]
        if off.get("peak_mem_mb") and row.get("peak_mem_mb") and row["path"] != "official":
            over = row["peak_mem_mb"] / off["peak_mem_mb"] - 1
            if over > 0.05:
                row["note"].append(f"peak {100 * over:+.0f}% over official: {MEM_NOTE.get(row['path'], 'not explained')}")
        row.update({"config": name, "device": device_name(device), "dtype": str(dtype)[6:], "batch": batch, "scale": scale,
                    "side": side, "flop_per_step": 6 * macs, "peak_tflops": peak_tflops, "peak_tflops_source": peak_source,
                    "peak_mem_source": "torch.cuda.max_memory_allocated less the other rows' weights and states"
                    if device.type == "cuda" else "tensors before the step + profiler allocation events (CPU)",
                    "note": "; ".join(row["note"])})
        for c in LADDER_COLUMNS:
            row.setdefault(c, None)  # every row carries every column (None: not measured here)
    if profile_dir and kinds:
        _write_kinds(profile_dir, device, name, kinds, {r: rows[r].get("step_ms") for r in kinds})
    return out


def _write_kinds(folder: str, device, name: str, kinds: dict, step_ms: dict) -> None:
    """Per-kind time of one profiled step per rung (ms), as markdown and JSON."""
    import json

    what = "GPU kernel time" if device.type == "cuda" else "operator self time on the CPU"
    head = ["path"] + list(KINDS) + ["sum", "step_ms"]
    body = [[r] + [f"{v[k]:.1f}" for k in KINDS] + [f"{sum(v.values()):.1f}", f"{step_ms[r]:.1f}" if step_ms[r] else ""]
            for r, v in kinds.items()]
    from common import render_grid

    text = (f"# Time per kind, one profiled step ({what}, ms): {name} on {device_name(device)}\n\n"
            + "\n".join(render_grid(head, body, markdown=True)) + "\n\n"
            "Kinds by operator / kernel name (bench_model._kind_of): 'our ops' is the deformable attention and merge "
            "(ours, or the official rows' grid_sample / Deformable DETR kernel); 'optimizer' everything under "
            "Optimizer.step; compiled regions' fused code counts as elementwise on the CPU.\n")
    with open(os.path.join(folder, f"ladder_kinds_{device.type}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(folder, f"ladder_kinds_{device.type}.json"), "w") as f:
        json.dump({"config": name, "unit": "ms", "what": what, "kinds": kinds, "step_ms": step_ms}, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", action="append", default=[], help="preset (or unique substring); repeatable")
    ap.add_argument("--tiny", action="store_true", help="a tiny built-in 3-branch model (dry runs); replaces --config")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default per case)")
    ap.add_argument("--scale", type=float, default=None, help="input resolution scale (default per case)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="two paths: autocast dtype; ladder: the weights' dtype (default per case)")
    ap.add_argument("--checkpointing", action="store_true", help="two paths only")
    ap.add_argument("--paths", nargs="+", default=["ours", "official"], choices=["ours", "official"])
    ap.add_argument("--ladder", action="store_true", help="the official recipe, then each speed-up added in turn")
    ap.add_argument("--rungs", nargs="+", default=list(RUNGS), help=f"ladder rows (default all: {' '.join(RUNGS)})")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compile rungs (default inductor; aot_eager with --tiny, which "
                         "generates no code, so a dry run stays within seconds)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--profile", default=None, metavar="DIR", help="ladder: per-kind time table and top operators per row")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on the CPU, 10 on a GPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new cases (ladder: rows) after this many seconds; SIGTERM does the same")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    cases = default_cases(device)
    if args.tiny:
        if args.config:
            ap.error("--tiny replaces --config")
        cases = [(TINY, 2, 1.0, "float32")]
    elif args.config:
        names = piip.list_models(include_paper_only=True) + list(UPERNET)
        cases = []
        for c in args.config:
            match = [n for n in names if c == n] or [n for n in names if c in n]
            if len(match) != 1:
                ap.error(f"--config {c!r} matches {len(match)} presets: {match[:5]}")
            d = next((d for d in default_cases(device) if d[0] == match[0]), default_cases(device)[0])
            cases.append((match[0], d[1], d[2], d[3]))
    elif args.ladder:
        cases = cases[:1]
    cases = [(n, args.batch or b, args.scale if args.scale is not None else s, args.dtype or d) for n, b, s, d in cases]
    steps = args.steps or (10 if device.type == "cuda" else 5)
    progress(f"device: {device_name(device)}")
    rows = []
    # Tiny rows are saved only where a dry run sends its results (PIIP_RESULTS_DIR), never to bench/results.
    save = not args.no_save and (not args.tiny or bool(os.environ.get("PIIP_RESULTS_DIR")))
    if args.ladder:
        backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
        for name, batch, scale, dtype in cases:
            rows += run_ladder(name, batch, scale, getattr(torch, dtype), device, steps, args.warmup, args.rungs, backend,
                               args.profile, args.budget_s)
        report("model_ladder", device, rows, ["config"] + LADDER_COLUMNS if len(cases) > 1 else LADDER_COLUMNS, save)
    else:
        for name, batch, scale, dtype in budgeted(cases, args.budget_s, "cases"):
            rows += run_case(name, batch, scale, getattr(torch, dtype), device, args.checkpointing, steps, args.warmup,
                             args.paths)
        report("model", device, rows, COLUMNS, save)
    if args.json:
        import json

        from common import environment

        with open(args.json, "w") as f:
            json.dump({"env": {**environment(), "device": device_name(device)}, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
