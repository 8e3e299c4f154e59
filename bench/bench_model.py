"""Model-level benchmark: one training step (forward + backward + AdamW) of a preset, our
path against the official path, with the same weights.

    python bench/bench_model.py                       # CPU: TSB classification, TSB detection at 1/4 resolution,
                                                      # UperNet around the TSB detection backbone at 512 px (CASES)
    python bench/bench_model.py --config deit_sbl_1568_1120_672 --batch 2 --dtype bfloat16   # GPU default
    python bench/bench_model.py --config tsb_368 --batch 4 --checkpointing --steps 5
    python bench/bench_model.py --tiny --device cpu --steps 1 --warmup 1   # a dry run in seconds
    python bench/bench_model.py --ladder ...          # the training ladder: python bench/ladder.py ...

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

The training ladder (the official recipe, then each speed-up added in turn) has its own
module, bench/ladder.py; ``bench_model.py --ladder ...`` runs it with the same options.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakMemory, budgeted, device_name, progress, protocol_arguments, report, sync, timed_rounds  # noqa: E402

import piip  # noqa: E402
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
           "msda_share", "peak_mem_mb", "peak_mem_source", "others_cpu"]

TINY = "tiny"  # --tiny: a built-in 3-branch classification model for dry runs
# The optimizer recipe of --tiny (a classification model like the TSB classifier).
TINY_RECIPE = "piip_3branch_tsb_368-192-128_cls_token_deit1"


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


# The models, as data. CASES: what runs by default per device type, (preset or model
# entry, batch, input scale, dtype); the ladder takes each list's first. BUILT_IN: models
# that are not presets, name -> config. A model is added by a line in each (a task model
# around a PIIP backbone: an entry in UPERNET, or a table like it).
_UPERNET_512 = 512 / piip.get_config(UPERNET[UPERNET_TSB]).branches[-1].image_size  # a 512-pixel input
CASES = {
    "cuda": [("mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16", 2, 1.0, "bfloat16"),
             (UPERNET_TSB, 2, _UPERNET_512, "bfloat16")],
    "cpu": [("piip_3branch_tsb_368-192-128_cls_token_deit1", 2, 1.0, "float32"),
            ("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", 1, 0.25, "float32"),
            (UPERNET_TSB, 2, _UPERNET_512, "float32")],
}
BUILT_IN = {TINY: tiny_config}


def default_cases(device: torch.device):
    """(preset substring or model entry, batch, scale, dtype) per device type."""
    return CASES["cuda" if device.type == "cuda" else "cpu"]


def config_of(name: str) -> piip.PIIPConfig:
    """The (backbone's) PIIPConfig of a preset or model entry."""
    if name in UPERNET:
        cfg = config_of(UPERNET[name])
        if name == UPERNET_TINY:  # the tiny classification model as a detection backbone
            from dataclasses import replace

            cfg = cfg.replace(output="detection", branches=tuple(replace(b, cls_token=False) for b in cfg.branches))
        return cfg
    return BUILT_IN[name]() if name in BUILT_IN else piip.get_config(name)


def recipe_of(name: str) -> str:
    """The preset whose official optimizer recipe a preset or model entry trains with."""
    if name == UPERNET_TINY:
        return UPERNET[UPERNET_TSB]
    return TINY_RECIPE if name == TINY else UPERNET.get(name, name)


def build(name: str) -> torch.nn.Module:
    if name in UPERNET:
        return UperNetPIIP(config_of(name))
    return piip.PIIP(BUILT_IN[name]()) if name in BUILT_IN else piip.create_model(name)


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
             warmup: int, paths, wait_s: float = 0.0) -> list[dict]:
    """Both paths on copies of one model (same weights), each with its own AdamW. The timed
    steps alternate between the paths, so a drift of the machine (clocks, other load) falls
    on both alike, after ``warmup`` rounds right before them; the median per path is
    reported. ``wait_s``: on a shared machine, rounds disturbed by other processes are run
    again (common.timed_rounds)."""
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
    peak_gpu = PeakMemory(device)
    rounds = timed_rounds({p: runs[p][2] for p in paths}, steps, device, wait_s, name, around=peak_gpu, warmup=warmup)
    times = rounds.times
    rows = []
    for path in paths:
        model, opt, step, msda_name = runs[path]
        base = resident_bytes(model, opt) + img.numel() * img.element_size()
        share, peak_cpu = profile_step(step, device, base, path)
        # On a GPU the other path's copy is resident too: its parameters and states are
        # subtracted so the figure is one path's own.
        other = sum(resident_bytes(m, o) for p2, (m, o, _, _) in runs.items() if p2 != path)
        peak = peak_gpu.peaks[path] - other if device.type == "cuda" else peak_cpu
        rows.append({"config": name, "path": path, "device": device_name(device), "dtype": str(dtype)[6:], "batch": batch,
                     "scale": scale, "side": side, "checkpointing": checkpointing, "step_ms": statistics.median(times[path]),
                     "step_ms_all": times[path], "msda_share": share, "peak_mem_mb": peak / 2 ** 20,
                     "peak_mem_source": "torch.cuda.max_memory_allocated (less the other path's model copy)"
                     if device.type == "cuda" else "tensors before the step + profiler allocation events (CPU)",
                     "official_attention": msda_name if path == "official" else None, "others_cpu": rounds.others_cpu,
                     "rounds_redone": rounds.redone})
    by_path = {r["path"]: r for r in rows}
    if "ours" in by_path and "official" in by_path:
        by_path["ours"]["speedup"] = by_path["official"]["step_ms"] / by_path["ours"]["step_ms"]
    return rows


def case_arguments(ap: argparse.ArgumentParser, dtype_help: str) -> None:
    """The options of the model benchmarks (this one and bench/ladder.py): device, cases, steps, output."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", action="append", default=[], help="preset (or unique substring); repeatable")
    ap.add_argument("--tiny", action="store_true", help="a tiny built-in 3-branch model (dry runs); replaces --config")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default per case)")
    ap.add_argument("--scale", type=float, default=None, help="input resolution scale (default per case)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help=dtype_help)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on the CPU, 10 on a GPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds (a step of each path) right before the timed ones")
    protocol_arguments(ap, "before the warm-up (ladder: and each profiled step)", "new cases (ladder: rows)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")


def cases_of(ap: argparse.ArgumentParser, args, device: torch.device, first_only: bool = False):
    """The (name, batch, scale, dtype) cases the options ask for, and the number of timed steps.
    ``first_only``: without --config, only the device's first default case."""
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
    elif first_only:
        cases = cases[:1]
    cases = [(n, args.batch or b, args.scale if args.scale is not None else s, args.dtype or d) for n, b, s, d in cases]
    return cases, args.steps or (10 if device.type == "cuda" else 5)


def write_json(path: str, device: torch.device, rows: list[dict]) -> None:
    import json

    from common import environment

    with open(path, "w") as f:
        json.dump({"env": {**environment(), "device": device_name(device)}, "rows": rows}, f, indent=1, default=str)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ladder" in argv:  # the ladder's own module, with the same options
        import ladder

        return ladder.main([a for a in argv if a != "--ladder"])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    case_arguments(ap, "autocast dtype (default per case)")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--paths", nargs="+", default=["ours", "official"], choices=["ours", "official"])
    ap.add_argument("--ladder", action="store_true", help="the training ladder: python bench/ladder.py (see its --help)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cases, steps = cases_of(ap, args, device)
    progress(f"device: {device_name(device)}")
    rows = []
    for name, batch, scale, dtype in budgeted(cases, args.budget_s, "cases"):
        rows += run_case(name, batch, scale, getattr(torch, dtype), device, args.checkpointing, steps, args.warmup,
                         args.paths, args.wait_idle)
    # Tiny rows are saved only where a dry run sends its results (PIIP_RESULTS_DIR), never to bench/results.
    report("model", device, rows, COLUMNS, not args.no_save and (not args.tiny or bool(os.environ.get("PIIP_RESULTS_DIR"))))
    if args.json:
        write_json(args.json, device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
