"""The memory planner (piip.memory, bench/memory.py) against measured CPU steps."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

import piip
from piip.memory import LiveBytes, measure_cpu_step, plan_memory
from piip.models.piip import PIIP

ROOT = Path(__file__).resolve().parents[1]


def test_live_bytes_on_a_known_chain():
    """w (leaf, 4 MB) -> y = 2w -> z = exp(y) -> u = z * y -> sum, backward: y, z and u are
    alive together (12 MB) before the sum; views of untracked storage count nothing."""
    w = torch.randn(1_000_000, requires_grad=True)
    with LiveBytes() as lb:
        wt = w.view(1000, 1000).t()  # a view of the leaf: no new storage
        y = w * 2
        z = y.exp()
        u = z * y
        del wt
    assert lb.peak == 3 * 4_000_000 and lb.current == 3 * 4_000_000
    del u
    assert lb.current == 2 * 4_000_000  # u's storage went with its last tensor


def _measured(cfg, batch, side, dtype, checkpointing):
    torch.manual_seed(0)
    model = PIIP(cfg)
    model.set_grad_checkpointing(checkpointing)
    return measure_cpu_step(model, torch.randn(batch, 3, side, side), dtype)["total"]


@pytest.mark.parametrize("n,output,batch,side,dtype,ckpt", [
    (2, "classification", 8, 128, torch.float32, False),
    (3, "classification_merged", 4, 192, torch.float32, False),
    (3, "classification_merged", 4, 192, torch.float32, True),
    (3, "classification", 4, 192, torch.bfloat16, False),
    (3, "detection", 4, 192, torch.float32, False),
])
def test_plan_within_ten_percent_of_a_measured_tiny_step(n, output, batch, side, dtype, ckpt):
    cfg = tiny_config(n, output)
    plan = plan_memory(cfg, batch=batch, side=side, dtype=dtype, checkpointing=ckpt)
    measured = _measured(cfg, batch, side, dtype, ckpt)
    assert abs(plan["total"] / measured - 1) < 0.10, (plan["total"], measured)


@pytest.mark.slow
def test_plan_within_ten_percent_on_a_full_size_preset():
    """The TSB classification preset (144M parameters) at its resolution, batch 1, fp32:
    parameters, gradients and AdamW states dominate (2.2 GB)."""
    name = "piip_3branch_tsb_368-192-128_cls_token_deit1"
    plan = plan_memory(name, batch=1, dtype=torch.float32)
    measured = _measured(piip.get_config(name), 1, 368, torch.float32, False)
    assert abs(plan["total"] / measured - 1) < 0.10, (plan["total"], measured)
    assert plan["parameters"] == pytest.approx(144.03e6 * 4, rel=0.01)
    assert plan["optimizer_states"] == pytest.approx(2 * plan["gradients"], rel=0.01)


def test_checkpointing_and_sharding_shrink_the_plan():
    cfg = tiny_config(3, "detection")
    base = plan_memory(cfg, batch=4, side=192, dtype=torch.float32)
    ckpt = plan_memory(cfg, batch=4, side=192, dtype=torch.float32, checkpointing=True)
    sharded = plan_memory(cfg, batch=4, side=192, dtype=torch.float32, world_size=8)
    assert ckpt["activations"] < 0.6 * base["activations"]
    for k in ("parameters", "gradients", "optimizer_states"):
        assert sharded[k] == pytest.approx(base[k] / 8)
    assert sharded["fsdp_unsharded"] > 0 and base["fsdp_unsharded"] == 0
    assert sharded["activations"] == base["activations"]
    assert sharded["total"] < base["total"]


def test_memory_script(tmp_path):
    out = tmp_path / "plan.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--config", "tsb_368", "--world-size", "1", "8",
                          "--json", str(out), "--quiet"], capture_output=True, text=True, check=True)
    assert "piip_3branch_tsb_368-192-128_cls_token_deit1" in res.stdout and "fits 80.0 GiB" in res.stdout
    import json

    rows = json.loads(out.read_text())
    assert [r["world_size"] for r in rows] == [1, 8] and rows[1]["total"] < rows[0]["total"]


@pytest.mark.parametrize("args,match", [(["--batch", "0"], "--batch"), (["--world-size", "0"], "--world-size"),
                                        (["--side", "-16"], "--side"), (["--gpu-gib", "0"], "--gpu-gib")])
def test_memory_script_rejects_non_positive_sizes(args, match):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--config", "tsb_368", "--quiet", *args],
                         capture_output=True, text=True)
    assert res.returncode == 2 and match in res.stderr and "must be positive" in res.stderr and "Traceback" not in res.stderr
