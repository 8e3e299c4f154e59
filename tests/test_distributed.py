"""FSDP2 sharding (piip.distributed.apply_fsdp) on the CPU with two gloo ranks: the same
losses and parameters as single-process training of the same model on the same data."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from helpers import run_two_gloo_ranks, tiny_config

import piip
from piip.models.piip import PIIP

STEPS, BATCH, SIDE = 3, 4, 96


def _images(step):
    return torch.randn(BATCH, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1000 + step))


def _loss(out):
    return sum(o.float().square().mean() for o in (out if isinstance(out, list) else [out]))


def _train(model, rank=0, world=1):
    """SGD steps with momentum; each rank takes its slice of the global batch, and FSDP
    averages the gradients over ranks, so every rank's loss is its slice's and the update is
    the global one. (SGD rather than Adam: Adam divides by the gradient's running magnitude,
    so the last-bit differences of a sum in another order become visible on near-zero
    gradients, about 2 % of a step after three steps.)"""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    losses = []
    for step in range(STEPS):
        per = BATCH // world
        loss = _loss(model(_images(step)[rank * per:(rank + 1) * per]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def _model(output):
    torch.manual_seed(0)
    model = PIIP(tiny_config(3, output))
    # Non-zero interaction gains, so the interaction units take part in the comparison.
    for n, p in model.named_parameters():
        if n.endswith(("ca_gamma", "cffn_gamma")):
            p.data.fill_(0.3)
    return model


def _worker(rank, world, init_file, result_file, output, param_dtype, checkpointing):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    model = _model(output)
    piip.distributed.apply_fsdp(model, init_device_mesh("cpu", (world,)), param_dtype=param_dtype, checkpointing=checkpointing)
    sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
    losses = torch.stack(_train(model, rank, world))
    gathered = [torch.zeros_like(losses) for _ in range(world)]
    dist.all_gather(gathered, losses)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # DTensor shards -> whole
    if rank == 0:
        torch.save({"losses": torch.stack(gathered), "params": full, "types": sharded}, result_file)
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can hang the interpreter's teardown on this VM; the work is saved


def _run_two_ranks(tmp_path, *args):
    return run_two_gloo_ranks(_worker, tmp_path, *args, what="FSDP workers")


@pytest.mark.parametrize("output,checkpointing", [("detection", False), ("classification_merged", True)])
def test_fsdp_matches_single_process(tmp_path, output, checkpointing):
    got = _run_two_ranks(tmp_path, output, None, checkpointing)
    assert set(got["types"].values()) == {"DTensor"}  # every parameter is sharded
    single = _model(output)
    single.set_grad_checkpointing(checkpointing)
    want_losses = torch.stack(_train(single))
    # Each rank's loss is that of its half of the batch; their mean is the full batch's.
    torch.testing.assert_close(got["losses"].mean(0), want_losses, rtol=1e-5, atol=1e-6)
    for n, p in single.named_parameters():
        torch.testing.assert_close(got["params"][n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
    start = _model(output)
    moved = [n for n, p in start.named_parameters() if not torch.allclose(p, got["params"][n])]
    assert len(moved) > 0.5 * len(list(start.parameters()))  # training moved the model


def test_fsdp_bf16_mixed_precision_trains(tmp_path):
    """bf16 gathered parameters with fp32 reduction: finite losses that go down, fp32 shards."""
    got = _run_two_ranks(tmp_path, "detection", torch.bfloat16, True)
    losses = got["losses"].mean(0)
    assert torch.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in got["params"].values())


def test_apply_fsdp_rejects_other_modules():
    with pytest.raises(TypeError, match="piip.PIIP"):
        piip.distributed.apply_fsdp(torch.nn.Linear(2, 2))


def test_fsdp_units_are_blocks_and_interaction_units():
    from piip.layers import Block, InteractionUnit

    model = PIIP(tiny_config(3))
    units = piip.memory.fsdp_units(model)
    assert sum(isinstance(u, Block) for u in units) == 6 and sum(isinstance(u, InteractionUnit) for u in units) == 4


def test_apply_fsdp_without_a_process_group_says_what_to_do_and_changes_nothing():
    model = PIIP(tiny_config(3))
    with pytest.raises(RuntimeError, match=r"init_process_group.*or pass mesh="):
        piip.distributed.apply_fsdp(model, checkpointing=True)
    assert not model.grad_checkpointing and not any(b.grad_checkpointing for b in model.branches)
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())
