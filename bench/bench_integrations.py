"""Our deformable attention inside the detectors people train, against each one's own path:
one training step, the speed-up, and the op's own time and share of the step.

    python bench/bench_integrations.py                                  # GPU if present, else CPU
    python bench/bench_integrations.py --device cpu --wait-idle 900     # the committed CPU rows (a shared machine)
    python bench/bench_integrations.py --cases encoder_stack --steps 3
    python bench/bench_integrations.py --tiny --device cpu              # tiny sizes: a dry run (saved only under $PIIP_RESULTS_DIR)

Cases (random weights; no downloads):
  encoder_stack  Deformable DETR's encoder: 6 layers, d_model 256, 8 heads, 4 levels x 4 points,
                 FFN 1024, the levels of an 800x1066 image (100x134 ... 13x17: 17821 queries);
                 forward + backward. Its attention runs through Deformable DETR's interface
                 (an autograd Function calling ``MSDA.ms_deform_attn_forward`` / ``_backward``)
                 on our stand-in (``compat.install_extensions``) against the pure-PyTorch core
                 those repositories fall back to (``ms_deform_attn_core_pytorch``: per-level
                 grid_sample, which our reference is) and, on a GPU, the compiled Deformable DETR
                 op (bench_msda.anchor_for; in the dry run a stand-in built from our reference,
                 labelled as such).
  rtdetr_l       Ultralytics RT-DETR-l (rtdetr-l.yaml) training step (forward, backward, AdamW)
                 at 640x640: ``use_in_ultralytics`` against Ultralytics' grid_sample.
  rfdetr         An RF-DETR-base-sized decoder (rfdetr's Transformer: d_model 256, 3 layers, 16
                 cross-attention heads, 2 points, 300 queries x 13 groups, one 40x40 level: the
                 backbone needs downloaded weights and is left out) training step:
                 ``use_in_rfdetr`` against RF-DETR's own core.
A package that is not installed is skipped with one line (CI's second environment has both).

The timed steps alternate between the paths (a round: one step of each, each path's switch
held only around its own step), right after one warm-up step per path; the median is kept.
``--wait-idle S`` (a shared CPU) waits for an idle machine before each case and runs a round
again when other processes took more than 5% of the CPUs during it (``rounds_redone``);
``others_cpu`` is the largest such share among the kept rounds.

The op's own time: the deformable-attention calls of one step are recorded (their inputs),
then each path's implementation runs all of them, forward and backward, in the same
alternating rounds: ``op_ms`` per step, ``op_share`` = op_ms / step_ms, ``op_speedup`` over
the package's own. Targets (printed, not asserted): the encoder stack at least 2x forward +
backward on the CPU; for RT-DETR-l and RF-DETR, where the op is a small share, the step never
slower and the op itself at least 2x faster. On a GPU, ``bit_identical``: two RT-DETR-l steps
from one state under ``torch.use_deterministic_algorithms`` (what Ultralytics'
``deterministic=True`` sets) give bit-identical gradients. Rows go to
bench/results/integrations_<device> with device, versions and commit.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hf import interleaved_rounds, protocol_arguments, wait_idle  # noqa: E402
from common import budgeted, device_name, progress, report  # noqa: E402

import piip_kernels  # noqa: E402
from piip_kernels import _swap, compat  # noqa: E402
from piip_kernels.msda.reference import ms_deform_attn_reference  # noqa: E402

COLUMNS = ["case", "path", "implementation", "size", "batch", "step_ms", "speedup", "op_ms", "op_share", "op_speedup",
           "bit_identical", "others_cpu", "target", "note"]
CASES = ("encoder_stack", "rtdetr_l", "rfdetr")
THEIRS = "own path"  # the package's (or repository's) own path, the baseline of every case


# ---------------------------------------------------------------------------------------------
# Deformable DETR's encoder, its attention through the compiled extension's interface

class EncoderLayer(nn.Module):
    """Deformable DETR's encoder layer (post-norm, ReLU FFN, dropout off): multi-scale
    deformable self-attention over every position of every level, ``core(value [N, S, M, D],
    shapes, starts, locations [N, S, M, L, P, 2], weights [N, S, M, L, P]) -> [N, S, M*D]``."""

    def __init__(self, core, d_model=256, heads=8, levels=4, points=4, ffn=1024):
        super().__init__()
        self.core, self.heads, self.levels, self.points = core, heads, levels, points
        self.sampling_offsets = nn.Linear(d_model, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d_model, heads * levels * points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Linear(ffn, d_model))
        with torch.no_grad():  # offsets of a few pixels, as a trained model has
            self.sampling_offsets.weight.normal_(0, 0.01)
            self.sampling_offsets.bias.uniform_(-2, 2)

    def forward(self, src, pos, reference_points, shapes, starts):
        N, S, C = src.shape
        query = src + pos
        value = self.value_proj(src).view(N, S, self.heads, -1)
        offsets = self.sampling_offsets(query).view(N, S, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(N, S, self.heads, -1).softmax(-1)
        weights = weights.view(N, S, self.heads, self.levels, self.points)
        normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(src.dtype)
        loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        src = self.norm1(src + self.output_proj(self.core(value, shapes, starts, loc, weights)))
        return self.norm2(src + self.ffn(src))


def level_sizes(height: int, width: int, levels: int = 4) -> list[tuple[int, int]]:
    """A ResNet's feature sizes at strides 8, 16, 32 and 64 (each halving rounds up)."""
    sizes, h, w = [], height, width
    for stride in range(1, 7):
        h, w = (h + 1) // 2, (w + 1) // 2
        if stride >= 3:
            sizes.append((h, w))
    return sizes[:levels]


def encoder_reference_points(shapes: list[tuple[int, int]], device) -> torch.Tensor:
    """Deformable DETR's encoder reference points: every pixel centre of every level,
    normalised, repeated over the levels: [1, S, L, 2]."""
    points = []
    for h, w in shapes:
        y, x = torch.meshgrid(torch.arange(h, device=device) + 0.5, torch.arange(w, device=device) + 0.5, indexing="ij")
        points.append(torch.stack([x.flatten() / w, y.flatten() / h], -1))
    return torch.cat(points)[None, :, None].expand(-1, -1, len(shapes), -1)


def stand_in_core():
    """Deformable DETR's MSDeformAttnFunction on the extension it imports: our stand-in."""
    from bench_msda import _anchor_function

    with compat.install_extensions():
        import MultiScaleDeformableAttention as MSDA  # noqa: N814  (as the repositories name it)
    return _anchor_function(MSDA)


def encoder_stack(device, tiny: bool, batch: int):
    """Paths: {name: (label, core)}, and the builder of one model per core with its inputs."""
    from bench_msda import anchor_for

    d_model, layers, size = (32, 2, (96, 128)) if tiny else (256, 6, (800, 1066))
    shapes = level_sizes(*size)
    spatial = torch.tensor(shapes, device=device)
    starts = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    S = int(spatial.prod(1).sum())
    g = torch.Generator().manual_seed(1)
    src = torch.randn(batch, S, d_model, generator=g).to(device)
    pos = torch.randn(batch, S, d_model, generator=g).to(device)
    ref = encoder_reference_points(shapes, device).expand(batch, -1, -1, -1)
    paths = {"ours": ("stand-in (MSDA interface, piip_kernels)", stand_in_core()),
             THEIRS: ("ms_deform_attn_core_pytorch (grid_sample)", ms_deform_attn_reference)}
    anchor = anchor_for(device)
    if anchor is not None:
        paths["detr kernel"] = (anchor.label + (" (stand-in)" if anchor.standin else ""), anchor)

    def build(core):
        torch.manual_seed(0)
        model = nn.ModuleList(EncoderLayer(core, d_model, heads=8) for _ in range(layers)).to(device).train()

        def loss():
            x = src
            for layer in model:
                x = layer(x, pos, ref, spatial, starts)
            return x.square().mean()
        return model, loss

    return paths, build, f"{size[0]}x{size[1]} ({S} queries)"


# ---------------------------------------------------------------------------------------------
# The packages: their model, its loss, the function name their attention calls

def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def rtdetr_l(device, tiny: bool, batch: int):
    from ultralytics.nn.tasks import RTDETRDetectionModel

    from piip_kernels.integrations import ultralytics as ours

    side = 64 if tiny else 640
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)

    def build():
        torch.manual_seed(0)
        model = RTDETRDetectionModel("rtdetr-l.yaml", verbose=False).to(device).train()
        return model, lambda: output_loss(model(x))

    return build, ours, ours.multi_scale_deformable_attn, piip_kernels.use_in_ultralytics, f"{side}x{side}"


def rfdetr(device, tiny: bool, batch: int):
    from rfdetr.models.transformer import Transformer

    from piip_kernels.integrations import rfdetr as ours

    d_model, heads, queries, groups, side = (32, 4, 20, 2, 10) if tiny else (256, 16, 300, 13, 40)
    g = torch.Generator().manual_seed(1)
    src = torch.randn(batch, d_model, side, side, generator=g).to(device)
    pos = torch.randn(batch, d_model, side, side, generator=g).to(device)
    mask = torch.zeros(batch, side, side, dtype=torch.bool, device=device)

    def build():
        torch.manual_seed(0)
        model = Transformer(d_model=d_model, sa_nhead=8 if not tiny else 4, ca_nhead=heads, num_queries=queries,
                            num_decoder_layers=3, dim_feedforward=2048 if not tiny else 64, return_intermediate_dec=True,
                            group_detr=groups, two_stage=False, num_feature_levels=1, dec_n_points=2,
                            lite_refpoint_refine=True, bbox_reparam=True).to(device).train()
        refs = nn.Parameter(torch.rand(queries * groups, 4, device=device) * 0.5)
        feats = nn.Parameter(torch.randn(queries * groups, d_model, device=device))
        model.register_parameter("refpoint_embed", refs)
        model.register_parameter("query_feat", feats)
        return model, lambda: output_loss(model([src], [mask], [pos], refs, feats))

    return build, ours, ours.ms_deform_attn_core, piip_kernels.use_in_rfdetr, f"1 level {side}x{side}, {queries}x{groups} queries"


def output_loss(out) -> torch.Tensor:
    """The mean square of every floating tensor of a model's output (no targets: matching
    would add nothing to what is compared)."""
    def tensors(o):
        if isinstance(o, torch.Tensor):
            return [o] if o.is_floating_point() and o.requires_grad else []
        if isinstance(o, (list, tuple)):
            return [t for i in o for t in tensors(i)]
        if isinstance(o, dict):
            return [t for i in o.values() for t in tensors(i)]
        return []
    return sum(t.float().square().mean() for t in tensors(out))


# ---------------------------------------------------------------------------------------------
# Steps, op calls and timing

def training_step(model, loss, optimizer):
    def step():
        value = loss()
        value.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return step


@contextlib.contextmanager
def recording(scope: dict, name: str, calls: list):
    """Records the inputs of every call of ``scope[name]`` (a library's deformable attention
    function, swapped through piip_kernels._swap for the block) into ``calls``."""
    theirs = scope[name]

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return theirs(*args, **kwargs)

    with _swap.Handle("bench recording") as handle:
        _swap.swap_references(handle, theirs, record, kind="recording")
        yield


def op_runner(fn, calls, device):
    """One step's deformable-attention calls through ``fn``, forward and backward, on detached
    copies of the recorded inputs (gradients into the floating tensors)."""
    prepared = []
    g = torch.Generator().manual_seed(2)
    for args, kwargs in calls:
        leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.no_grad():
            out = fn(*leaves, **kwargs)
        prepared.append((leaves, kwargs, torch.randn(out.shape, generator=g).to(device, out.dtype)))

    def run():
        for leaves, kwargs, grad in prepared:
            for t in leaves:
                if isinstance(t, torch.Tensor):
                    t.grad = None
            fn(*leaves, **kwargs).backward(grad)
    return run


def bit_identical(build, switch, device) -> bool:
    """Two forward+backward passes from one state under deterministic algorithms: identical
    gradients, bit for bit."""
    model, loss = build()
    grads = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with switch(model):
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                loss().backward()
                grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    finally:
        torch.use_deterministic_algorithms(False)
    return all(torch.equal(a, b) for a, b in zip(*grads))


def time_paths(name, paths, steps, device, wait_s):
    """(median ms per path, the kept rounds' largest share of other processes, rounds redone)."""
    times, busy, redone = interleaved_rounds(paths, steps, device, wait_s, name)
    others = max((b for b in busy if b is not None), default=None)
    return {p: statistics.median(t) for p, t in times.items()}, others, redone


def run_case(name: str, device, tiny: bool, batch: int, steps: int, wait_s: float, determinism: bool) -> list[dict]:
    progress(f"{name}: building")
    deterministic = None
    if name == "encoder_stack":
        paths, build_with, size = encoder_stack(device, tiny, batch)
        runs = {}
        for path, (label, core) in paths.items():
            model, loss = build_with(core)
            runs[path] = (label, training_step(model, loss, None), contextlib.nullcontext)
        calls = []  # the op's calls, recorded on a model whose core is the pure-PyTorch one

        def record(*args):
            calls.append((args, {}))
            return ms_deform_attn_reference(*args)

        build_with(record)[1]().backward()
        ops = {path: core for path, (_, core) in paths.items()}
        note, target = "forward + backward (no optimizer)", "ours >= 2x"
    else:
        build, module, core, use_in, size = (rtdetr_l if name == "rtdetr_l" else rfdetr)(device, tiny, batch)
        library = importlib.import_module(module.MODULE)
        theirs = vars(library)[module.NAME]
        runs = {}
        package = {"rtdetr_l": "Ultralytics (grid_sample)", "rfdetr": "RF-DETR's core (grid_sample)"}[name]
        for path, label in (("ours", f"{use_in.__name__} (piip_kernels)"), (THEIRS, package)):
            model, loss = build()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            switch = (lambda m=model: use_in(m)) if path == "ours" else contextlib.nullcontext
            runs[path] = (label, training_step(model, loss, optimizer), switch)
        calls = []
        with recording(vars(library), module.NAME, calls):
            build()[1]().backward()
        ops = {"ours": functools.partial(core, theirs=theirs), THEIRS: theirs}
        note = "training step (forward, backward, AdamW); deformable attention in the decoder only"
        target = "step never slower, op >= 2x"
        if determinism:
            deterministic = {"ours": bit_identical(build, use_in, device),
                             THEIRS: bit_identical(build, lambda m: contextlib.nullcontext(), device)}
    progress(f"{name} {size}: one warm-up step per path, then {steps} timed rounds")
    for label, step, switch in runs.values():
        with switch():
            step()
    step_ms, others, redone = time_paths(name, {p: (s, sw) for p, (_, s, sw) in runs.items()}, steps, device, wait_s)
    progress(f"{name}: the op alone ({len(calls)} calls per step)")
    runners = {p: (op_runner(fn, calls, device), contextlib.nullcontext) for p, fn in ops.items()}
    for run, _ in runners.values():
        run()
    op_ms, op_others, op_redone = time_paths(f"{name} op", runners, steps, device, wait_s)
    rows = []
    for path, (label, _, _) in runs.items():
        row = {"case": name, "path": path, "implementation": label, "size": size, "batch": batch, "device": device_name(device),
               "step_ms": step_ms[path], "op_ms": op_ms[path], "op_share": op_ms[path] / step_ms[path],
               "others_cpu": max((o for o in (others, op_others) if o is not None), default=None),
               "rounds_redone": redone + op_redone, "note": note, "tiny": tiny}
        if path != THEIRS:
            row["speedup"] = step_ms[THEIRS] / step_ms[path]
            row["op_speedup"] = op_ms[THEIRS] / op_ms[path]
            if path == "ours":
                met = row["speedup"] >= 2 if name == "encoder_stack" else row["speedup"] >= 1 and row["op_speedup"] >= 2
                row["target"] = f"{target}: {'met' if met else 'missed'}"
        if path == "detr kernel" and "stand-in" in label:
            row["note"] += "; stand-in built from our reference, not the Deformable DETR kernel"
        if deterministic is not None:
            row["bit_identical"] = deterministic[path]
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 1 on the CPU, 2 on a GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds per case (default 3 on the CPU, 6 on a GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, one thread: a dry run (nothing saved)")
    ap.add_argument("--determinism", action=argparse.BooleanOptionalAction, default=None,
                    help="check bit-identical repeated steps (default: on a GPU)")
    protocol_arguments(ap, "before each case")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.tiny:
        torch.set_num_threads(1)  # tiny models spend their time starting OpenMP teams
    batch = args.batch or (2 if gpu else 1)
    steps = args.steps or (1 if args.tiny else 6 if gpu else 3)
    determinism = gpu if args.determinism is None else args.determinism
    needs = {"rtdetr_l": "ultralytics", "rfdetr": "rfdetr"}
    progress(f"device: {device_name(device)}")
    rows = []
    for name in budgeted(args.cases, args.budget_s, "cases"):
        if name in needs and not _installed(needs[name]):
            progress(f"{name}: {needs[name]} is not installed here: skipped")
            continue
        if args.wait_idle:
            wait_idle(args.wait_idle)
        rows += run_case(name, device, args.tiny, batch, steps, args.wait_idle, determinism)
    # Tiny rows are saved only where a dry run sends its results (PIIP_RESULTS_DIR), never to bench/results.
    report("integrations", device, rows, COLUMNS, not args.no_save and (not args.tiny or bool(os.environ.get("PIIP_RESULTS_DIR"))))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
