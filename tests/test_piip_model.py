"""Tiny PIIP models on the CPU: every task, gradients, checkpointing, autocast, compile, DDP."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from helpers import run_two_gloo_ranks, tiny_config

import piip


def _img(n, batch=2, seed=0):
    side = tiny_config(n).branches[-1].image_size
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _loss(out):
    return sum(o.float().pow(2).mean() for o in out) if isinstance(out, list) else out.float().pow(2).mean()


def _randomise_gains(model):
    # Zero-initialised gains would hide the interaction paths from the gradient check.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("ca_gamma", "cffn_gamma")):
                p.fill_(0.5)


@pytest.mark.parametrize("output", ["detection", "classification", "classification_merged"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_forward_backward_every_parameter_gets_a_gradient(n, output):
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(n, output)).train()
    _randomise_gains(model)
    out = model(_img(n))
    if output == "detection":
        side = tiny_config(n).branches[-1].image_size // 16
        assert [o.shape[-1] for o in out] == [4 * side, 2 * side, side, side // 2]
    else:
        assert out.shape == (2, 5)
    _loss(out).backward()
    # With cls-token heads the units after the last stage only update patch tokens, which
    # those heads never read (the official heads read patch token 0 and so use them).
    dead = f"interactions.{model.cfg.num_stages - 1}." if output == "classification" else None
    for name, p in model.named_parameters():
        if dead and name.startswith(dead):
            assert p.grad is None, f"{name} cannot reach a cls-token head"
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "interactions" in n_)


def test_official_classification_head_uses_every_parameter():
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(3, "classification", head_reads_first_patch=True))
    _randomise_gains(model)
    _loss(model(_img(3))).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_single_branch_baseline_runs():
    model = piip.PIIP(tiny_config(1, "classification"))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(3)).eval()
    _randomise_gains(model)
    img = _img(3)
    _loss(model(img)).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    _loss(model(img)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(3)).eval()
    _randomise_gains(model)
    img = _img(3)
    with torch.no_grad():
        ref = model(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(img)
    for a, b in zip(low, ref):
        assert torch.isfinite(a).all()
        assert ((a.float() - b).abs().max() / b.abs().max()).item() < 5e-2


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(2)).eval()
    img = _img(2, batch=1)
    with torch.no_grad():
        ref = model(img)
        # fullgraph: the custom ops, window padding and pyramid trace without breaks.
        got = torch.compile(model, backend="inductor", fullgraph=True)(img)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,match", [((1, 3, 90, 96), "multiple of the patch size"),
                                         ((1, 4, 96, 96), r"\[B, 3, H, W\]"),
                                         ((3, 96, 96), r"\[B, 3, H, W\]")])
def test_bad_input_raises(shape, match):
    model = piip.PIIP(tiny_config(3))
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        piip.PIIP(tiny_config(3).replace_branch(0, embed_dim=48))
    with pytest.raises(ValueError, match="grow"):
        tiny_config(3).replace_branch(0, image_size=200)


def test_freeze_and_no_weight_decay():
    model = piip.PIIP(tiny_config(3))
    model.freeze_branches([0])
    assert not any(p.requires_grad for p in model.branches[0].parameters())
    assert all(p.requires_grad for p in model.branches[1].parameters())
    nwd = model.no_weight_decay()
    assert "branches.0.pos_embed" in nwd and "merge_weights" in nwd
    assert not any(k.endswith("qkv.weight") for k in nwd)


def _ddp_worker(rank, world, init_file, result_file):
    # Loopback only: resolving the host's name or probing other interfaces can stall.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(2))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(2):
        img = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad()
        _loss(ddp(img)).backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(gathered, result_file)
    dist.destroy_process_group()
    # Interpreter teardown with gloo's threads sometimes never returns on this CPU
    # machine (the work above is done and saved): leave without it.
    os._exit(0)


def test_ddp_two_ranks_stay_identical(tmp_path):
    a, b = run_two_gloo_ranks(_ddp_worker, tmp_path, timeout_s=180, what="DDP workers")
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in piip.PIIP(tiny_config(2)).parameters()])
    assert torch.equal(a, b)
    assert not torch.equal(a, start)


@pytest.mark.parametrize("output", ["detection", "classification_merged"])
def test_official_execution_path_computes_the_same(output):
    """set_execution("official") (unfused attention on grid_sample, eager merge) gives the
    fused path's outputs and gradients with the same weights."""
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(3, output))
    for n, p in model.named_parameters():
        if n.endswith(("ca_gamma", "cffn_gamma")):
            p.data.fill_(0.5)  # the interactions must matter
    img = torch.randn(2, 3, 96, 96)
    runs = []
    for path in ("ours", "official"):
        model.set_execution(path)
        model.zero_grad()
        out = model(img)
        out = out if isinstance(out, list) else [out]
        sum(o.square().mean() for o in out).backward()
        runs.append(([o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = runs
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-3, atol=1e-5, msg=n)
    assert model.eager_merge and all(m.unfused_msda is not None for m in model.modules() if hasattr(m, "unfused_msda"))
    with pytest.raises(ValueError, match="ours"):
        model.set_execution("fast")


@pytest.mark.parametrize("output", ["detection", "classification"])
def test_bf16_model_takes_an_fp32_image_like_the_cnn_branches(output):
    """The ViT stem casts the image to its weights' dtype, as the ConvNeXt and CLIP stems do."""
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(3, output)).eval()
    img = _img(3, batch=1)
    with torch.no_grad():
        want = model(img)
        got = model.to(torch.bfloat16)(img)
    for g, w in zip(*(([got], [want]) if output != "detection" else (got, want))):
        assert g.dtype == torch.bfloat16
        assert ((g.float() - w).abs().max() / w.abs().max()).item() < 5e-2
