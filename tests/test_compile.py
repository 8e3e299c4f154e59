"""The fastest-step options of piip.PIIP: regional torch.compile (piip.compile) against eager
(loss and every gradient), its recompile bound, and the interaction projections in the
autocast dtype; and the three ops compiled whole on the reference backend."""
import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import piip
from piip.compile import REGION_TYPES, TensorRateDropPath, _swap_drop_paths, compile_blocks, compile_problem, regions
from piip.layers import Block

import piip_kernels

from helpers import dca_grads, dca_inputs, merge_grads, merge_inputs, msda_inputs, run_with_grads, tiny_config


def _img(model, batch=2, seed=0):
    side = model.cfg.branches[-1].image_size
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _loss(out):
    if isinstance(out, list):
        return sum(o.float().square().mean() for o in out)
    return out.float().square().mean()


def _loss_and_grads(model, img):
    model.zero_grad(set_to_none=True)
    loss = _loss(model(img))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _make(cfg, seed=0):
    torch.manual_seed(seed)
    model = piip.PIIP(cfg)
    # Non-zero injector gains, so the attention parameters get gradients to compare.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("ca_gamma", "cffn_gamma")):
                p.uniform_(0.05, 0.15)
    return model


def _assert_same(got, want, rtol):
    loss, grads = got
    loss_ref, grads_ref = want
    assert grads.keys() == grads_ref.keys()
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=0)
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for n, g in grads.items():
        err = (g - grads_ref[n]).abs().max().item()
        assert err <= rtol * grads_ref[n].abs().max().item() + 1e-7 * scale, f"{n}: {err:.3e}"


@pytest.mark.slow
def test_inductor_regions_equal_eager():
    """inductor (generated C++ kernels) on a tiny single-branch model: loss and every gradient
    within 1e-4 relative (fused reductions round differently)."""
    torch._dynamo.reset()
    if compile_problem("inductor", "cpu"):
        pytest.skip(compile_problem("inductor", "cpu"))
    model = _make(tiny_config(1, output="classification"))
    compiled = copy.deepcopy(model)
    compiled.compile_blocks(backend="inductor")
    img = _img(model)
    _assert_same(_loss_and_grads(compiled, img), _loss_and_grads(model, img), rtol=1e-4)


def _signatures(model, img) -> set:
    """The distinct shape signatures the regions see in one eager training step, recorded by
    forward hooks: region type, parameter shapes, window size, training flag, and the shapes
    and integer arguments of the call."""
    seen, hooks = set(), []

    def hook(mod, args):
        params = tuple(tuple(p.shape) for p in mod.parameters())
        call = tuple(tuple(a.shape) if torch.is_tensor(a) else a for a in args)
        window = mod.attn.window_size if isinstance(mod, Block) else None
        seen.add((type(mod).__name__, params, window, mod.training, call))

    for m in regions(model):
        hooks.append(m.register_forward_pre_hook(hook))
    _loss(model(img)).backward()
    for h in hooks:
        h.remove()
    return seen


def test_regional_compile_equals_eager_once_per_signature():
    """A tiny 3-branch detector with a stochastic-depth schedule and window blocks, compiled
    with aot_eager (dynamo capture and AOT autograd, eager kernels):
      - loss and every gradient equal eager to fp32 rounding over two training steps (the
        eager twin uses the same tensor-rate drop path, so both draw the same masks);
      - exactly one graph per distinct signature. Naively every block would be a new graph
        (its own drop-path rate is a constant to dynamo), and past dynamo's limit of 8 per
        function the rest would silently run eager; here: a window and a global block per
        branch, one per pair of branches for the units, nothing more in the second step,
        and one more per signature for evaluation."""
    torch._dynamo.reset()
    cfg = tiny_config(3, output="detection")
    cfg = dataclasses.replace(cfg, branches=tuple(
        dataclasses.replace(b, depth=4, drop_path_rate=0.3, window_sizes=(2, None, 2, None),
                            interaction_indexes=((0, 1), (2, 3))) for b in cfg.branches), interaction_drop_path=0.2)
    model = _make(cfg)
    img = _img(model)
    expected = _signatures(model, img)
    assert len(expected) == 3 * 2 + 2
    assert _swap_drop_paths(regions(model)) == 3 * 4 + 4 * 2  # one per block, one per injector
    compiled = copy.deepcopy(model)
    counters.clear()
    summary = compile_blocks(compiled, backend="aot_eager")
    assert summary["static_signatures"] == len(expected) and summary["recompile_limit"] >= 2 * len(expected)
    assert summary["regions"] == {"Block": 12, "InteractionUnit": 4}
    for step in range(2):
        torch.manual_seed(step)
        want = _loss_and_grads(model, img)
        torch.manual_seed(step)
        _assert_same(_loss_and_grads(compiled, img), want, rtol=1e-5)
        with torch.no_grad():  # one plain SGD step on both, so step 2 sees new weights
            for p, q in zip(model.parameters(), compiled.parameters()):
                if p.grad is not None:
                    p.sub_(1e-2 * p.grad)
                    q.sub_(1e-2 * q.grad)
    assert counters["stats"]["unique_graphs"] == len(expected)
    assert not counters["graph_break"], dict(counters["graph_break"])
    compiled.eval()
    with torch.no_grad():
        compiled(img)
    assert counters["stats"]["unique_graphs"] == 2 * len(expected)


def test_compile_blocks_gives_drop_paths_a_tensor_rate():
    """Only where the regions use more than one rate (a single float rate is one constant)."""
    model = piip.PIIP(tiny_config(2))
    assert _swap_drop_paths(regions(model)) == 0
    cfg = dataclasses.replace(tiny_config(2), branches=tuple(dataclasses.replace(b, drop_path_rate=0.2)
                                                             for b in tiny_config(2).branches))
    model = piip.PIIP(cfg)
    assert _swap_drop_paths(regions(model)) == 2 * 2 + 2 * 2
    assert all(isinstance(m, TensorRateDropPath) for r in regions(model) for m in r.modules()
               if "DropPath" in type(m).__name__)


def test_tensor_rate_drop_path():
    x = torch.randn(4000, 3, 5)
    dp = TensorRateDropPath(0.25)
    kept = (dp(x) != 0).all(-1).all(-1).float().mean().item()
    assert abs(kept - 0.75) < 0.05                                    # each sample kept with 1 - rate
    torch.testing.assert_close(dp(x).mean(0), x.mean(0), atol=0.15, rtol=0)  # expectation preserved
    assert torch.equal(TensorRateDropPath(0.0)(x), x)                 # rate 0: exactly the input
    dp.eval()
    assert dp(x) is x
    assert "rate" not in dp.state_dict()


def test_compile_problem_and_bad_input():
    assert compile_problem("aot_eager", "cpu") is None
    msg = compile_problem("no_such_backend", "cpu")
    assert msg and "no_such_backend" in msg
    if not torch.cuda.is_available():
        assert compile_problem("inductor", "cuda") == "CUDA is not available"
    with pytest.raises(ValueError, match="no block or interaction unit"):
        compile_blocks(torch.nn.Linear(2, 2))
    assert len(REGION_TYPES) == 4


def test_interaction_projections_in_the_autocast_dtype():
    """projection_dtype "autocast": under bf16 autocast the value and output projections run
    in bf16, offsets and logits stay fp32, and the result stays within bf16 rounding of the
    faithful path (both paths: fused and official); without autocast nothing changes."""
    model = _make(tiny_config(2, output="detection"))
    img = _img(model, batch=1)
    ref = [o.detach() for o in model(img)]
    seen = {}
    inj = model.interactions[0][0].to_a
    hooks = [getattr(inj.attn, n).register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o.dtype) and None)
             for n in ("value_proj", "sampling_offsets", "attention_weights", "output_proj")]
    with pytest.raises(ValueError, match="must be one of"):
        model.set_interaction_projections("bf16")
    model.set_interaction_projections("autocast")
    for a, b in zip(model(img), ref):   # no autocast: identical
        assert torch.equal(a, b)
    for path in ("ours", "official"):
        model.set_execution(path)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(img)
        assert seen == {"value_proj": torch.bfloat16, "sampling_offsets": torch.float32,
                        "attention_weights": torch.float32, "output_proj": torch.bfloat16}
        model.set_interaction_projections("param")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            faithful = model(img)
        model.set_interaction_projections("autocast")
        for a, b, r in zip(low, faithful, ref):
            # Both bf16 runs are within a few bf16 roundings of the fp32 output.
            scale = r.abs().max()
            assert ((a.float() - r).abs().max() / scale) < 5e-2 and ((b.float() - r).abs().max() / scale) < 5e-2
    for h in hooks:
        h.remove()


def _compiled_ops_equal_eager(compiler):
    """The three public ops, compiled with fullgraph=True, forward and backward, against eager."""
    def msda(*a):
        return piip_kernels.ms_deform_attn(*a).sin()

    def dca(v, hw, o, lg, qhw):
        return piip_kernels.deform_cross_attn(v, hw, o, lg, qhw).sin()

    def merge(f, w, s, a):
        return piip_kernels.branch_merge(f, w, s, align_corners=a).sin()

    for shapes in ([(6, 5), (3, 2)], [(7, 5), (1, 1), (3, 3)]):  # a second level layout: no stale guard
        inputs = msda_inputs(shapes, Lq=6, M=2, D=4, P=2)
        want, grad_out = run_with_grads(msda, inputs)
        got, _ = run_with_grads(torch.compile(msda, fullgraph=True, backend=compiler), inputs, grad_out)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    inputs = dca_inputs()
    want, grad_out = dca_grads(dca, inputs, (5, 7), (3, 4))
    got, _ = dca_grads(torch.compile(dca, fullgraph=True, backend=compiler), inputs, (5, 7), (3, 4), grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    feats, weights = merge_inputs([(3, 3), (4, 5), (6, 6)])
    want, grad_out = merge_grads(merge, feats, weights, (6, 6), True)
    got, _ = merge_grads(torch.compile(merge, fullgraph=True, backend=compiler), feats, weights, (6, 6), True, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_reference_backend_compiles_with_fullgraph(monkeypatch, compiler):
    """The reference backend is what runs where the extension is not built; its level sizes
    are tensor values, which inductor must not guard on (GuardOnDataDependentSymNode)."""
    if compile_problem(compiler, "cpu"):
        pytest.skip(compile_problem(compiler, "cpu"))
    monkeypatch.setenv("PIIP_KERNELS_BACKEND", "reference")
    torch._dynamo.reset()
    _compiled_ops_equal_eager(compiler)
