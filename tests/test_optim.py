"""The official training recipe (piip.optim): parameter groups against the official
constructors' own output (tests/data/official/param_groups.json), the recipe table against
the official configs, AdamW numerics against a float64 AdamW, bf16 weights with fp32
masters, checkpoints, FSDP and bad input."""
import datetime
import io
import json
import os
import re

import pytest
import torch
import torch.distributed as dist
from helpers import data_path, run_two_gloo_ranks, tiny_config
from torch import nn

import piip
from piip.models.piip import PIIP
from piip.optim import RECIPES, MasterWeightAdamW, build_optimizer, get_recipe, official_param_groups, profile_copies

SBL = "mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16"
TSB_DET = "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16"
TSB_CLS = "piip_3branch_tsb_368-192-128_cls_token_deit1"


def _fixture() -> dict:
    with open(data_path("official", "param_groups.json")) as f:
        return json.load(f)


FX = _fixture()


def _keys(entry) -> list[str]:
    path = data_path("official", entry["names_source"].split("tests/data/official/", 1)[1])
    return [line.split("\t")[0] for line in path.read_text().splitlines() if line and not line.startswith("#")]


def _expected(stem: str) -> dict[str, list]:
    """Official name -> [layer_id, lr_scale, weight_decay, lr] as the official code computed it,
    for the backbone names and the neck/head names of the fixture."""
    e = FX["lists"][stem]
    g = e["groups"]
    if "assign" in e:
        out = {e["prefix"] + k: g[a] for k, a in zip(_keys(e), e["assign"], strict=True)}
    else:
        out = {n: g[a] for n, a in e["names"].items()}
    out.update({n: g[a] for n, (_, a) in e["extra"].items()})
    return out


# ---------------------------------------------------------------------------------------------
# The official groups


@pytest.mark.parametrize("stem", [s for s, e in FX["lists"].items() if "overrides" not in e])
def test_official_param_groups_equal_the_official_constructors(stem):
    e = FX["lists"][stem]
    if "names_sha256" in e:  # the fixture is aligned with the committed key list
        import hashlib

        assert hashlib.sha256(data_path("official", "keys/" + stem + ".txt").read_bytes()).hexdigest() == e["names_sha256"]
    want = {n: v for n, v in _expected(stem).items() if n not in e["extra"]}
    got = official_param_groups(e["preset"])
    assert set(got) == set(want)
    bad = [n for n, v in want.items() if [got[n]["layer_id"], got[n]["lr_scale"], got[n]["weight_decay"]] != v[:3]]
    assert bad == [], f"{len(bad)} names differ, e.g. {bad[:3]}: {[got[n] for n in bad[:3]]} vs {[want[n] for n in bad[:3]]}"


def test_official_quirks_are_kept():
    """The fractional-stride truncation, decayed position embeddings and scalar merge weights,
    and the bare classification names, as the official constructors compute them."""
    h6b = official_param_groups("mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms")
    b1 = h6b["backbone.branch1.blocks.0.attn.qkv.weight"]
    b2 = h6b["backbone.branch2.blocks.0.attn.qkv.weight"]   # layer id 1.5, truncated into branch 1's group
    assert b2 == b1 and b1["layer_id"] == 1
    assert h6b["backbone.branch2.blocks.1.attn.qkv.weight"]["layer_id"] == 3
    sbl = official_param_groups(SBL)
    assert sbl["backbone.branch1.pos_embed"]["weight_decay"] == 0.05 and sbl["backbone.branch1.pos_embed"]["layer_id"] == 0
    assert sbl["backbone.w1"] == {"layer_id": 25, "lr_scale": 1.0, "weight_decay": 0.05}
    assert sbl["backbone.branch2.blocks.11.norm1.weight"]["layer_id"] == 24
    cls = official_param_groups(TSB_CLS)
    assert all(not n.startswith("backbone.") for n in cls)
    assert cls["branch1.blocks.0.norm1.bias"] == {"layer_id": 0, "lr_scale": 1, "weight_decay": 0.1}
    assert cls["interactions.0.interaction_units_12.branch1to2_injector.ca_gamma"]["lr_scale"] == 10.0


def test_recipes_equal_the_official_configs():
    configs = FX["configs"]
    official = [n for n in piip.list_models() if piip.get_config(n).output != "llava"]
    assert sorted(RECIPES) == sorted(official)   # every official preset has a recipe, nothing else
    for name, r in RECIPES.items():
        c = configs[name]
        assert (r.lr, r.weight_decay, r.grad_clip_max_norm) == (c["lr"], c["weight_decay"], c["grad_clip_max_norm"]), name
        if r.task == "classification":
            assert (r.rule, r.lr_ratio, r.eps, r.precision) == ("classification", c["lr_ratio"], c["eps"], "fp16_autocast")
            continue
        rule = {"CustomLayerDecayOptimizerConstructorMMDet": "layer_decay", "CustomLayerDecayOptimizerConstructor": "layer_decay",
                "DefaultOptimizerConstructor": "default"}[c["constructor"]]
        assert (r.rule, list(r.betas), r.num_layers, r.layer_decay_rate) == (rule, c["betas"], c["num_layers"], c["layer_decay_rate"]), name
        assert r.skip_stride == c["skip_stride"] and type(r.skip_stride) is type(c["skip_stride"]), name
        assert c["deepspeed_config"] == "zero_configs/adam_zero1_bf16.json" and r.precision == "bf16_master", name
    # torch's AdamW defaults that the official optimizers ran with
    for e in FX["lists"].values():
        r = get_recipe(e["preset"])
        assert (list(r.betas), r.eps) == (e["optimizer"]["betas"], e["optimizer"]["eps"])


def test_hetero_config_notes_agree_with_the_recipes():
    """bench/data/paper/configs_hetero.json describes the optimizer in words; same numbers."""
    with open(data_path("paper", "configs_hetero.json")) as f:
        rows = [c for c in json.load(f)["configs"] if c.get("optimizer")]
    assert len(rows) == 8
    for c in rows:
        r, text = get_recipe(c["name"]), c["optimizer"]
        assert float(re.search(r"lr ([\d.e-]+)", text).group(1)) == r.lr
        assert float(re.search(r"wd ([\d.]+)", text).group(1)) == r.weight_decay
        m = re.search(r"num_layers=(\d+), layer_decay_rate=([\d.]+), skip_stride=(\[[^\]]*\])", text)
        if m:
            assert (int(m.group(1)), float(m.group(2)), json.loads(m.group(3))) == (r.num_layers, r.layer_decay_rate, r.skip_stride)
        else:
            assert r.rule == "default"


@pytest.mark.parametrize("preset,error,match", [
    ("no_such_preset", KeyError, "unknown PIIP preset"),
    ("piip-llava_clip-bl_512-448_13B", ValueError, "LLaVA"),
    ("vit_b_224_scratch", ValueError, "paper-only"),
])
def test_presets_without_a_recipe_are_refused(preset, error, match):
    with pytest.raises(error, match=match):
        official_param_groups(preset)


# ---------------------------------------------------------------------------------------------
# build_optimizer: groups


def _put(root: nn.Module, name: str, p: nn.Parameter):
    *path, leaf = name.split(".")
    m = root
    for part in path:
        if not hasattr(m, part):
            m.add_module(part, nn.Module())
        m = getattr(m, part)
    m.register_parameter(leaf, p)


class _Detector(nn.Module):
    """A PIIP as ``backbone`` plus the fixture's neck/head names (small tensors of the same rank)."""

    def __init__(self, backbone, extra: dict):
        super().__init__()
        self.backbone = backbone
        for name, (shape, _) in extra.items():
            _put(self, name, nn.Parameter(torch.zeros([2] * len(shape))))


def _assert_groups(opt, want):
    seen = 0
    for g in opt.param_groups:
        for n in g["param_names"]:
            w = want[n]
            assert [g["layer_id"], g["lr_scale"], g["weight_decay"], g["lr"]] == w, (n, g["group_name"], w)
            seen += 1
    return seen


@pytest.mark.parametrize("stem,output,task_prefix,overrides", [
    ("det_sbl_1568-1120-672", "detection", "backbone.", {}),
    ("cls_tsb_368-192-128", "classification", "", {}),
    ("cls_tsb_368-192-128@lr_ratio=1", "classification", "", {"lr_ratio": 1.0}),
])
def test_build_optimizer_groups_equal_the_official_ones(stem, output, task_prefix, overrides):
    """A small PIIP (its names are a subset of the preset's) inside a detector with the official
    neck/head names: every group's lr, weight decay and scale are what the official code gives."""
    e = FX["lists"][stem]
    torch.manual_seed(0)
    model = _Detector(PIIP(tiny_config(3, output)), e["extra"])
    model.backbone.branches[0].blocks[0].norm1.weight.requires_grad_(False)   # frozen: left out
    opt = build_optimizer(model, preset=e["preset"], **overrides)
    assert type(opt) is torch.optim.AdamW
    n = _assert_groups(opt, _expected(stem))
    assert n == sum(p.requires_grad for p in model.parameters()) == len(list(model.parameters())) - 1
    assert all(n.startswith(task_prefix) or n in e["extra"] for g in opt.param_groups for n in g["param_names"])
    assert (opt.defaults["betas"], opt.defaults["eps"]) == (tuple(e["optimizer"]["betas"]), e["optimizer"]["eps"])


def test_build_optimizer_takes_the_preset_of_a_full_size_model():
    with torch.device("meta"):
        model = piip.create_model(TSB_DET)
    opt = build_optimizer(model)
    assert _assert_groups(opt, _expected("det_tsb_1568-1120-672")) == len(list(model.parameters()))


def test_overrides_change_the_recipe():
    model = PIIP(tiny_config(3, "detection"))
    opt = build_optimizer(model, preset=SBL, lr=1e-3, layer_decay_rate=0.5, betas=(0.8, 0.9), amsgrad=True)
    g = next(g for g in opt.param_groups if "backbone.branch1.blocks.1.attn.qkv.weight" in g["param_names"])
    assert g["lr_scale"] == 0.5 ** (26 - 2 - 1) and g["lr"] == g["lr_scale"] * 1e-3
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["amsgrad"] is True


# ---------------------------------------------------------------------------------------------
# Numerics: one and several AdamW steps against a float64 AdamW


def _adamw64(p0, grads, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    b1, b2 = betas
    for t, g in enumerate(grads, 1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return p


def _grads(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in model.parameters()]


def _run(model, opt, steps):
    history = []
    for s in range(steps):
        gs = _grads(model, s)
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        history.append(gs)
        opt.step()
        opt.zero_grad()
    return history


def _check_against_float64(model, start, opt, history, stepped):
    """The stepped tensors against _adamw64, all tensors of one (lr, weight decay) at once."""
    lr_wd = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    by_group: dict = {}
    for i, (p0, m) in enumerate(zip(start, stepped)):
        by_group.setdefault(lr_wd[id(m)], []).append(i)
    for (lr, wd), idx in by_group.items():
        flat = lambda ts: torch.cat([ts[i].reshape(-1).double() for i in idx])  # noqa: E731
        ref = _adamw64(flat(start), [flat(h) for h in history], lr, wd)
        got = flat([m.detach() for m in stepped])
        # fp32 arithmetic against float64: a few fp32 roundings of the parameter and of the
        # update (at most about lr in size) per step
        bound = 8 * 2.0 ** -24 * len(history) * (ref.abs() + lr)
        err = (got - ref).abs()
        assert (err <= bound).all(), f"group lr={lr}: error {err.max().item():.3e}, bound {bound[err.argmax()].item():.3e}"


@pytest.mark.parametrize("fused", [None, True])
def test_fp32_steps_equal_a_float64_adamw(fused):
    torch.manual_seed(0)
    model = PIIP(tiny_config(3, "detection"))
    start = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, preset=SBL, fused=fused, lr=1e-2)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is (True if fused else None)
    history = _run(model, opt, 3)
    _check_against_float64(model, start, opt, history, list(model.parameters()))


@pytest.mark.parametrize("fused", [None, True])
def test_bf16_weights_step_fp32_masters(fused):
    """bf16 parameters: the fp32 masters follow a float64 AdamW fed the bf16 gradients, and the
    parameters are the masters rounded to bf16."""
    torch.manual_seed(0)
    model = PIIP(tiny_config(3, "detection")).to(torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, preset=SBL, fused=fused, lr=1e-2)
    assert isinstance(opt, MasterWeightAdamW)
    masters = [m for g in opt.param_groups for m in g["params"]]
    assert all(m.dtype == torch.float32 for m in masters)
    assert sorted(map(id, opt.model_params)) == sorted(map(id, model.parameters()))
    history = _run(model, opt, 3)
    by_model = dict(zip(map(id, opt.model_params), masters))
    stepped = [by_model[id(p)] for p in model.parameters()]
    _check_against_float64(model, start, opt, history, stepped)
    for p, m in zip(model.parameters(), stepped):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
        assert p.grad is None and m.grad is None
    state = opt.state[stepped[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_masters_keep_updates_that_bf16_loses():
    """Small updates (lr 1e-4 on weights near 1) vanish in bf16 arithmetic but accumulate in
    the fp32 masters, which track the float64 AdamW."""
    def setup(master):
        torch.manual_seed(0)
        model = PIIP(tiny_config(2, "detection")).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(0.5, 1.0)
        return model, build_optimizer(model, preset=SBL, master_weights=master, lr=1e-4, weight_decay=0.0)

    model, opt = setup(True)
    start = [p.detach().clone() for p in model.parameters()]
    history = _run(model, opt, 5)
    masters = dict(zip(map(id, opt.model_params), [m for g in opt.param_groups for m in g["params"]]))
    plain, popt = setup(False)
    assert type(popt) is torch.optim.AdamW
    _run(plain, popt, 5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    worst_master = worst_plain = 0.0
    for i, (p, q, p0) in enumerate(zip(model.parameters(), plain.parameters(), start)):
        m = masters[id(p)]
        ref = _adamw64(p0, [h[i] for h in history], lr_of[id(m)], 0.0)
        worst_master = max(worst_master, (m.double() - ref).abs().max().item())
        worst_plain = max(worst_plain, (q.double() - ref).abs().max().item())
    assert worst_master < 1e-6 and worst_plain > 2e-4, (worst_master, worst_plain)


def test_state_dict_round_trip():
    """Save after two steps, load into a fresh model and optimizer, step: bit-identical to
    continuing (masters, moments and bf16 parameters), also through torch.save/load."""
    def make(seed):
        torch.manual_seed(seed)
        model = PIIP(tiny_config(3, "detection")).to(torch.bfloat16)
        return model, build_optimizer(model, preset=SBL, lr=1e-2)

    a, opt_a = make(0)
    _run(a, opt_a, 2)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    gs = _grads(a, 7)
    for p, g in zip(a.parameters(), gs):
        p.grad = g.clone()
    opt_a.step()

    b, opt_b = make(1)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    b.load_state_dict(ck["model"])
    opt_b.load_state_dict(ck["opt"])
    for p, g in zip(b.parameters(), gs):
        p.grad = g.clone()
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert all(torch.equal(x, y) for x, y in zip(sa["master_weights"], sb["master_weights"]))
    for k in sa["state"]:
        assert all(torch.equal(sa["state"][k][f], sb["state"][k][f]) for f in ("exp_avg", "exp_avg_sq", "step"))
    assert [g["param_names"] for g in sa["param_groups"]] == [g["param_names"] for g in sb["param_groups"]]
    bad = dict(sa, master_weights=sa["master_weights"][:-1])
    with pytest.raises(ValueError, match="master weights"):
        opt_b.load_state_dict(bad)


def test_a_training_step_in_each_precision_mode():
    """bf16 weights with fp32 masters, and fp32 weights under bf16 autocast (plain AdamW):
    real forward/backward steps give finite losses and move the weights."""
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    for mode in ("bf16_master", "fp32_autocast"):
        torch.manual_seed(0)
        model = PIIP(tiny_config(2, "detection"))
        if mode == "bf16_master":
            model = model.to(torch.bfloat16)
        opt = build_optimizer(model, preset=SBL, lr=1e-3)
        assert isinstance(opt, MasterWeightAdamW) == (mode == "bf16_master")
        # What the optimizer steps: the fp32 masters, or the fp32 parameters themselves.
        stepped = [m for g in opt.param_groups for m in g["params"]]
        start = [m.detach().clone() for m in stepped]
        with torch.autocast("cpu", torch.bfloat16, enabled=mode == "fp32_autocast"):
            loss = sum(o.float().square().mean() for o in model(x.to(next(model.parameters()).dtype)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
        assert all(m.dtype == torch.float32 for m in stepped)
        moved = sum(not torch.equal(m, s) for m, s in zip(stepped, start))
        assert moved > 0.5 * len(start), mode
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_profile_copies_counts_the_master_weight_casts():
    """One master-weight step casts each bf16 gradient to fp32 and writes each master back:
    exactly one cast each way per bf16 parameter, with their bytes."""
    torch.manual_seed(0)
    model = PIIP(tiny_config(3, "detection")).to(torch.bfloat16)
    opt = build_optimizer(model, preset=SBL)
    for p, g in zip(model.parameters(), _grads(model, 0)):
        p.grad = g
    c = profile_copies(opt.step)
    n = len(list(model.parameters()))
    elems = sum(p.numel() for p in model.parameters())
    assert c.by_dtype["c10::BFloat16->float"] == [n, 4 * elems]
    assert c.by_dtype["float->c10::BFloat16"] == [n, 2 * elems]
    count, nbytes = c
    assert count >= 2 * n and nbytes >= 6 * elems and c.casts <= count


def test_profile_copies_counts_bytes_and_casts():
    x, y = torch.ones(3, 4, dtype=torch.bfloat16), torch.ones(5, 7)

    def fn():
        x.float()
        y.clone()

    c = profile_copies(fn)
    assert (c.count, c.bytes, c.casts, c.cast_bytes) == (2, 48 + 140, 1, 48)
    assert tuple(c) == (2, 188)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_refused_clearly(monkeypatch):
    model = PIIP(tiny_config(3, "detection"))
    with pytest.raises(ValueError, match="records no preset"):
        build_optimizer(model)
    with pytest.raises(TypeError, match="no piip.PIIP"):
        build_optimizer(nn.Linear(2, 2), preset=SBL)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['lr_decay'\]"):
        build_optimizer(model, preset=SBL, lr_decay=0.9)
    with pytest.raises(KeyError, match="unknown PIIP preset"):
        build_optimizer(model, preset="mask_rcnn_deit_sbl")
    with torch.device("meta"):
        meta_model = PIIP(tiny_config(3, "detection"))
    with pytest.raises(ValueError, match="fused AdamW cannot run here.*'meta'"):
        build_optimizer(meta_model, preset=SBL, fused=True)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, preset=SBL)

    class OldAdamW(torch.optim.AdamW):   # a torch without fused/foreach options
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
            super().__init__(params, lr, betas, eps, weight_decay, amsgrad)

    monkeypatch.setattr(torch.optim, "AdamW", OldAdamW)
    fresh = PIIP(tiny_config(3, "detection"))
    with pytest.raises(ValueError, match="has no fused AdamW"):
        build_optimizer(fresh, preset=SBL, fused=True)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['foreach'\]"):
        build_optimizer(fresh, preset=SBL, foreach=True)


# ---------------------------------------------------------------------------------------------
# FSDP2 (two gloo ranks): the fp32 shards are the masters, nothing is copied


def _fsdp_worker(rank, world, init_file, result_file):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = PIIP(tiny_config(3, "detection"))
    piip.distributed.apply_fsdp(model, init_device_mesh("cpu", (world,)), param_dtype=torch.bfloat16)
    forced = build_optimizer(model, preset=SBL, master_weights=True)
    opt = build_optimizer(model, preset=SBL, lr=1e-3)
    groups = {n: [g["lr"], g["weight_decay"]] for g in opt.param_groups for n in g["param_names"]}
    losses = []
    for step in range(2):
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(step))
        loss = sum(o.float().square().mean() for o in model(x))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"type": type(opt).__name__, "forced_pairs": len(forced._pairs), "groups": groups,
                    "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                    "kinds": sorted({type(p).__name__ for p in model.parameters()}),
                    "losses": torch.stack(losses), "params": full}, result_file)
    dist.destroy_process_group()
    os._exit(0)


def test_fsdp_shards_are_the_master_weights(tmp_path):
    got = run_two_gloo_ranks(_fsdp_worker, tmp_path, what="FSDP optimizer workers")
    assert got["type"] == "AdamW" and got["forced_pairs"] == 0   # fp32 shards: no second copy
    assert got["dtypes"] == ["torch.float32"] and got["kinds"] == ["DTensor"]
    torch.manual_seed(0)
    single = PIIP(tiny_config(3, "detection"))
    want = {n: [g["lr"], g["weight_decay"]] for g in build_optimizer(single, preset=SBL, lr=1e-3).param_groups
            for n in g["param_names"]}
    assert got["groups"] == want
    assert torch.isfinite(got["losses"]).all()
    moved = sum(not torch.equal(p, got["params"][n]) for n, p in single.named_parameters())
    assert moved > 0.5 * len(want)
