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


def _check_against_float64(model, start, opt, history, params, stepped=None):
    """The stepped tensors (the parameters, or their masters) against _adamw64, all tensors
    of one (lr, weight decay) at once."""
    stepped = params if stepped is None else stepped
    lr_wd = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    by_group: dict = {}
    for i, p in enumerate(params):
        by_group.setdefault(lr_wd[id(p)], []).append(i)
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
    # From outside a plain AdamW over the model's parameters; the masters are inside.
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(map(id, model.parameters()))
    assert set(opt.masters) == set(model.parameters())
    assert all(m.dtype == torch.float32 for m in opt.masters.values())
    history = _run(model, opt, 3)
    stepped = [opt.masters[p] for p in model.parameters()]
    _check_against_float64(model, start, opt, history, list(model.parameters()), stepped)
    for p, m in zip(model.parameters(), stepped):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
        assert p.grad is None and m.grad is None
    state = opt.state[next(model.parameters())]
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
    plain, popt = setup(False)
    assert type(popt) is torch.optim.AdamW
    _run(plain, popt, 5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    worst_master = worst_plain = 0.0
    for i, (p, q, p0) in enumerate(zip(model.parameters(), plain.parameters(), start)):
        m = opt.masters[p]
        ref = _adamw64(p0, [h[i] for h in history], lr_of[id(p)], 0.0)
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
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert all(torch.equal(sa["state"][k][f], sb["state"][k][f]) for f in ("exp_avg", "exp_avg_sq", "step", "master"))
        assert sa["state"][k]["master"].dtype == sa["state"][k]["exp_avg"].dtype == torch.float32
    assert [g["param_names"] for g in sa["param_groups"]] == [g["param_names"] for g in sb["param_groups"]]
    k = next(iter(sa["state"]))
    bad = dict(sa, state={**sa["state"], k: {**sa["state"][k], "master": sa["state"][k]["master"][:1]}})
    with pytest.raises(ValueError, match="the master of parameter"):
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
        stepped = [getattr(opt, "masters", {}).get(p, p) for g in opt.param_groups for p in g["params"]]
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


# ---------------------------------------------------------------------------------------------
# Master weights kept in step with the parameters; clipping through either route


def _bf16_model(seed=0, n=2, official=False):
    torch.manual_seed(seed)
    cfg = tiny_config(n, "detection")
    return PIIP(piip.official_config(cfg) if official else cfg).to(torch.bfloat16)


def _set_grads(model, step, scale=1.0):
    for p, g in zip(model.parameters(), _grads(model, step)):
        p.grad = (g.float() * scale).to(p.dtype)


def _load_after(model, how, tmp_path):
    """Writes other weights into ``model`` the way ``how`` does; returns what was loaded."""
    donor = _bf16_model(1, official=how == "load_official_checkpoint")
    with torch.no_grad():
        for q in donor.parameters():
            q.add_(1.0)   # far from anything the optimizer has seen
    if how == "load_state_dict":
        model.load_state_dict(donor.state_dict())
    elif how == "load_pretrained_branch":
        piip.load_pretrained_branch(model, 0, donor.branches[0].state_dict(), verbose=False)
    elif how == "load_official_checkpoint":
        torch.save(piip.to_official_state_dict(donor), tmp_path / "official.pt")
        piip.load_official_checkpoint(model, str(tmp_path / "official.pt"))
    elif how == "ema_swap_data":        # an EMA swap that assigns param.data
        for p, q in zip(model.parameters(), donor.parameters()):
            p.data = q.detach().clone()
    elif how == "copy_into_params":     # an EMA swap that copies into the parameters
        with torch.no_grad():
            torch._foreach_copy_(list(model.parameters()), list(donor.parameters()))
    else:
        raise AssertionError(how)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("how", ["load_state_dict", "load_pretrained_branch", "load_official_checkpoint",
                                 "ema_swap_data", "copy_into_params"])
def test_weights_loaded_after_the_optimizer_survive_the_next_step(how, tmp_path):
    """Weights written after the optimizer exists (and after it has stepped) are what the next
    step starts from: the step moves them by at most a few learning rates, never back to the
    masters of before."""
    model = _bf16_model(official=how == "load_official_checkpoint")   # official checkpoints: the official form
    opt = build_optimizer(model, preset=SBL, lr=1e-3)
    _run(model, opt, 1)
    loaded = _load_after(model, how, tmp_path)
    _set_grads(model, 5)
    opt.step()
    lr = max(g["lr"] for g in opt.param_groups)
    for p, w in zip(model.parameters(), loaded):
        # Adam moves an element by at most a few lr in two steps; bf16 rounds to 2^-8 relative.
        bound = 4 * lr + 2.0 ** -8 * w.float().abs()
        assert ((p.float() - w.float()).abs() <= bound).all(), (how, (p.float() - w.float()).abs().max().item())


@pytest.mark.parametrize("order", ["model_first", "optimizer_first"])
def test_resuming_from_a_plain_adamw_checkpoint(order):
    """A checkpoint of plain bf16 AdamW (no masters in it) resumed into master-weight AdamW:
    the masters come from the loaded weights, in either loading order."""
    a = _bf16_model()
    plain = build_optimizer(a, preset=SBL, master_weights=False, lr=1e-3)
    _run(a, plain, 2)
    ck = {"model": a.state_dict(), "opt": plain.state_dict()}
    b = _bf16_model(1)
    opt = build_optimizer(b, preset=SBL, lr=1e-3)
    _run(b, opt, 1)    # masters of another history
    if order == "model_first":
        b.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
    else:
        opt.load_state_dict(ck["opt"])
        b.load_state_dict(ck["model"])
    _set_grads(b, 5)
    opt.step()
    lr = max(g["lr"] for g in opt.param_groups)
    for (n, p), w in zip(b.named_parameters(), ck["model"].values()):
        assert ((p.float() - w.float()).abs() <= 4 * lr + 2.0 ** -8 * w.float().abs()).all(), n


def test_add_param_group_gives_bf16_parameters_masters():
    """Parameters added with add_param_group get fp32 masters too: updates smaller than half a
    bf16 step (lr 3e-4 on weights in [0.5, 1), a steady gradient) accumulate, as for the groups
    the optimizer was built with, where bf16 arithmetic would lose every one of them."""
    model = _bf16_model()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.0)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    half = len(params) // 2
    opt = MasterWeightAdamW([{"params": params[:half]}], lr=3e-4, weight_decay=0.0)
    opt.add_param_group({"params": params[half:]})
    grads = _grads(model, 0)
    for _ in range(10):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad()
    for i in range(len(params)):
        ref = _adamw64(start[i], [grads[i]] * 10, 3e-4, 0.0)
        # The parameter is its master rounded: within half a bf16 step (2^-9 relative) of the
        # float64 AdamW, which has moved every element by about 3e-3, more than that.
        assert ((params[i].double() - ref).abs() <= 2.0 ** -9 * ref.abs()).all(), i
        assert opt.state[params[i]]["exp_avg"].dtype == torch.float32


def test_grad_scaler_with_fp16_weights():
    """GradScaler with fp16 parameters: scaler.step hands the scale to the optimizer, which
    unscales into the fp32 gradients of the masters (bit for bit what an fp32 AdamW fed the
    unscaled gradients computes), and skips a step with an inf, as the scaler asks."""
    torch.manual_seed(0)
    a = PIIP(tiny_config(2, "detection")).half()
    opt_a = build_optimizer(a, preset=SBL, lr=1e-3)
    b = PIIP(tiny_config(2, "detection"))
    b.load_state_dict(a.state_dict())   # the fp16 weights, in fp32
    opt_b = build_optimizer(b, preset=SBL, lr=1e-3)
    assert type(opt_b) is torch.optim.AdamW

    def loss_of(model, step):
        w = _grads(model, step)
        return sum((p.float() * g.float()).sum() for p, g in zip(model.parameters(), w)) * 1e-2

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for step in range(2):
        scale = scaler.get_scale()
        scaler.scale(loss_of(a, step)).backward()
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = p.grad.float() / scale
        scaler.step(opt_a)
        scaler.update()
        opt_a.zero_grad()
        opt_b.step()
        opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(opt_a.masters[p], q.detach()) and torch.equal(p, q.half())
    before = [p.detach().clone() for p in a.parameters()]
    state = {k: v.clone() for k, v in opt_a.state[next(a.parameters())].items()}
    scale = scaler.get_scale()
    scaler.scale(loss_of(a, 3) * float("inf")).backward()
    scaler.step(opt_a)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))   # skipped
    assert all(torch.equal(v, opt_a.state[next(a.parameters())][k]) for k, v in state.items())
    assert scaler.get_scale() == scale * 0.5
    # torch's unscale_ refuses fp16 gradients (the route to clipping with plain AdamW) ...
    scaler.scale(loss_of(a, 4)).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt_a)


def test_grad_scaler_with_fp16_weights_and_the_recipes_clipping():
    """... so with fp16 weights the optimizer clips: after unscaling, the fp32 gradients, bit
    for bit as an fp32 AdamW that clips the same gradients over the same groups."""
    torch.manual_seed(0)
    a = PIIP(tiny_config(2, "detection")).half()
    opt_a = build_optimizer(a, preset=SBL, lr=1e-3, grad_clip_max_norm=0.1)
    b = PIIP(tiny_config(2, "detection"))
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, preset=SBL, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for step in range(2):
        w = _grads(a, step)
        scale = scaler.get_scale()
        scaler.scale(sum((p.float() * g.float()).sum() for p, g in zip(a.parameters(), w))).backward()
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = p.grad.float() / scale
        scaler.step(opt_a)
        scaler.update()
        opt_a.zero_grad()
        norm = torch.nn.utils.clip_grad_norm_([q for g in opt_b.param_groups for q in g["params"]], 0.1)
        assert norm > 10   # clipped hard
        opt_b.step()
        opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(opt_a.masters[p], q.detach())


def test_the_recipes_clipping_needs_the_optimizer_also_for_fp32_weights():
    """A recipe that clips (DINO) gets MasterWeightAdamW without masters for fp32 weights, and
    records the norm for a trainer; grad_clip_max_norm=None gives torch's AdamW."""
    model = PIIP(tiny_config(3, "detection"))
    dino = "dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms"
    opt = build_optimizer(model, preset=dino)
    assert type(opt) is MasterWeightAdamW and opt.masters == {} and opt.grad_clip_max_norm == 0.1
    assert type(build_optimizer(model, preset=dino, grad_clip_max_norm=None)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="grad_clip_max_norm must be positive"):
        build_optimizer(model, preset=dino, grad_clip_max_norm=0)


def _clip_reference(start, history, lrs, wd, max_norm):
    """float64 AdamW with clipping of the global gradient norm, per tensor lists."""
    ps = [s.double() for s in start]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t, gs in enumerate(history, 1):
        gs = [g.double() for g in gs]
        if max_norm is not None:
            norm = torch.sqrt(sum((g * g).sum() for g in gs))
            coef = min(1.0, max_norm / (norm.item() + 1e-6))
            gs = [g * coef for g in gs]
        for i, g in enumerate(gs):
            ps[i] = ps[i] * (1 - lrs[i] * wd[i])
            ms[i] = 0.9 * ms[i] + 0.1 * g
            vs[i] = 0.999 * vs[i] + 0.001 * g * g
            ps[i] = ps[i] - lrs[i] * (ms[i] / (1 - 0.9 ** t)) / ((vs[i] / (1 - 0.999 ** t)).sqrt() + 1e-8)
    return ps


@pytest.mark.parametrize("route", ["optimizer_params", "model_params", "recipe", "model_params+recipe"])
def test_clipping_clips_what_the_step_applies(route):
    """Gradient clipping through the optimizer's parameters (mmengine's OptimWrapper), through
    model.parameters() (transformers' Trainer), by the recipe (grad_clip_max_norm, inside
    step()) or by both at one norm: bf16 weights with fp32 masters follow a float64 AdamW with
    clipping, and not one without (a large first gradient is clipped, the second is not)."""
    model = _bf16_model()
    max_norm = 1.0
    kw = {"grad_clip_max_norm": max_norm} if "recipe" in route else {}
    # One learning rate and no weight decay, so the float64 reference needs no groups.
    opt = build_optimizer(model, preset=SBL, lr=1e-2, layer_decay_rate=1.0, weight_decay=0.0, **kw)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    history = []
    for step, scale in enumerate((100.0, 0.01)):
        _set_grads(model, step, scale)
        history.append([p.grad.clone() for p in params])
        if route == "optimizer_params":
            norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)
        elif route.startswith("model_params"):
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if route != "recipe":
            want = torch.sqrt(sum((g.double() ** 2).sum() for g in history[-1]))
            assert abs(norm.item() - want.item()) <= 1e-2 * want.item(), (norm, want)
        opt.step()
        opt.zero_grad()
    lrs, wds = [1e-2] * len(params), [0.0] * len(params)
    clipped = _clip_reference(start, history, lrs, wds, max_norm)
    free = _clip_reference(start, history, lrs, wds, None)
    far = 0
    for p, c, f in zip(params, clipped, free):
        # bf16 parameter: the master rounded (half a bf16 step) of an update whose gradients
        # were rounded to bf16 after clipping (relative 2^-8 of at most ~3 lr per step).
        bound = 2.0 ** -8 * c.abs() + 2 * 2.0 ** -7 * 3 * max(lrs)
        assert ((p.double() - c).abs() <= bound).all(), route
        far += int(((f - c).abs() > 2 * bound).any())
    assert far > len(params) // 2   # the unclipped run is far from the clipped one


def _fp32_twin(model, preset=SBL, **kw):
    """An fp32 copy of a bf16 model (the same values) with plain AdamW over the same groups."""
    twin = PIIP(model.cfg)
    twin.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    opt = build_optimizer(twin, preset=preset, master_weights=False, **kw)
    assert type(opt) is torch.optim.AdamW
    return twin, opt


@pytest.mark.parametrize("set_to_none", [True, False])
def test_masters_step_as_an_fp32_adamw_in_any_order(set_to_none):
    """zero_grad with or without set_to_none, parameters without a gradient in some steps, an
    lr scheduler and a step hook: the masters are bit for bit an fp32 AdamW over the same
    fp32 gradients, and the hook runs once per step, after the write-back."""
    model = _bf16_model()
    opt = build_optimizer(model, preset=SBL, lr=1e-2)
    twin, topt = _fp32_twin(model, lr=1e-2)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s) for o in (opt, topt)]
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])   # torch now wraps AdamW.step with the hooks too
    seen = []
    opt.register_step_post_hook(lambda o, *_: seen.append(torch.equal(next(model.parameters()).float(),
                                                                      o.masters[next(model.parameters())].bfloat16().float())))
    params, tparams = list(model.parameters()), list(twin.parameters())
    for step in range(4):
        grads = _grads(model, step)
        for i, (p, q, g) in enumerate(zip(params, tparams, grads)):
            if step == 1 and i % 3 == 0:
                continue   # no gradient this step (or a zero one, without set_to_none)
            p.grad, q.grad = g.clone(), g.float()
        for o, s in zip((opt, topt), scheds):
            o.step()
            o.zero_grad(set_to_none=set_to_none)
            s.step()
    assert seen == [True] * 4
    for p, q in zip(params, tparams):
        assert torch.equal(opt.masters[p], q.detach()) and torch.equal(p, q.detach().bfloat16())
        assert (p.grad is None) == set_to_none


def test_state_dicts_across_optimizer_kinds(tmp_path):
    """Master-weight AdamW -> plain AdamW -> master-weight AdamW, through torch.save: each
    resumes the other's moments; masters saved right after loading weights are those
    weights; a master that no longer rounds to the loaded weights is not taken."""
    a = _bf16_model()
    opt_a = build_optimizer(a, preset=SBL, lr=1e-3)
    _run(a, opt_a, 2)
    torch.save(opt_a.state_dict(), tmp_path / "mw.pt")
    b, opt_b = _fp32_twin(a, lr=1e-3)   # plain fp32 AdamW takes the fp32 moments (and ignores the masters)
    opt_b.load_state_dict(torch.load(tmp_path / "mw.pt", weights_only=True))
    st_a, st_b = opt_a.state[next(a.parameters())], opt_b.state[next(b.parameters())]
    assert torch.equal(st_a["exp_avg"], st_b["exp_avg"]) and st_b["exp_avg"].dtype == torch.float32
    _run(b, opt_b, 1)
    # ... and back: the plain optimizer's moments, the fp32 weights rounded to bf16
    c = _bf16_model(1)
    opt_c = build_optimizer(c, preset=SBL, lr=1e-3)
    c.load_state_dict(b.state_dict())
    sd = opt_b.state_dict()
    opt_c.load_state_dict(sd)
    # The plain optimizer carried the masters it loaded from opt_a, a step behind its weights:
    # saved right after loading (before any step), each master is the carried one where that
    # still rounds to the loaded weight, the loaded weight elsewhere.
    saved = opt_c.state_dict()
    changed = 0
    for i, p in enumerate(p for g in opt_c.param_groups for p in g["params"]):   # state_dict's numbering
        stale = sd["state"][i]["master"].float()
        want = torch.where(stale.bfloat16() == p, stale, p.float())
        assert torch.equal(saved["state"][i]["master"], want) and torch.equal(want.bfloat16(), p)
        changed += int(not torch.equal(want, stale))
    assert changed > len(saved["state"]) // 2


@pytest.mark.parametrize("order", ["model_first", "optimizer_first"])
def test_a_bf16_checkpoint_resumed_in_fp32_continues_from_the_masters(order):
    """A bf16 run's checkpoint (bf16 weights, fp32 masters) resumed with fp32 weights: the step
    starts from the masters, not from their bf16 rounding, in either loading order, and no stale
    master is left in the optimizer's state (an fp32 copy of every weight, never updated)."""
    import copy

    a = _bf16_model()
    opt_a = build_optimizer(a, preset=SBL, lr=1e-3)
    _run(a, opt_a, 2)
    ck = copy.deepcopy({"model": a.state_dict(), "opt": opt_a.state_dict()})
    masters = [opt_a.masters[p].clone() for p in a.parameters()]
    b = PIIP(a.cfg)   # fp32
    opt_b = build_optimizer(b, preset=SBL, master_weights=True, lr=1e-3)
    if order == "model_first":
        b.load_state_dict(ck["model"])
        opt_b.load_state_dict(ck["opt"])
    else:
        opt_b.load_state_dict(ck["opt"])
        b.load_state_dict(ck["model"])
    for g in opt_b.param_groups:
        g["lr"] = 0.0   # the step moves nothing: what it starts from is what remains
    _set_grads(b, 5)
    opt_b.step()
    differ = 0
    for (n, p), m in zip(b.named_parameters(), masters):
        assert torch.equal(p, m), n
        assert "master" not in opt_b.state[p], n
        differ += int(not torch.equal(m, m.bfloat16().float()))
    assert differ > 0   # the masters hold more than their bf16 rounding
    assert all("master" not in s for s in opt_b.state_dict()["state"].values())


def test_a_copied_or_pickled_optimizer_keeps_its_masters():
    """copy.deepcopy and torch.save of the optimizer object (with its model) keep the masters,
    their link to the (copied) parameters, and the clipping norm."""
    import copy

    model = _bf16_model()
    opt = build_optimizer(model, preset=SBL, lr=1e-3, grad_clip_max_norm=1.0)
    _run(model, opt, 1)
    buf = io.BytesIO()
    torch.save({"model": model, "opt": opt}, buf)
    buf.seek(0)
    copies = [copy.deepcopy({"model": model, "opt": opt}), torch.load(buf, weights_only=False)]
    _run(model, opt, 1)
    for c in copies:
        assert c["opt"].grad_clip_max_norm == 1.0 and set(c["opt"].masters) == set(c["model"].parameters())
        _run(c["model"], c["opt"], 1)
        for p, q in zip(model.parameters(), c["model"].parameters()):
            assert torch.equal(opt.masters[p], c["opt"].masters[q]) and torch.equal(p, q)


def test_writes_the_version_counter_misses_need_sync_masters():
    """In-place writes through param.data are invisible to the version counter: sync_masters()
    re-reads every parameter, keeping the fp32 bits of masters that still round to it. A
    parameter moved to another shape or device is refused, naming what changed."""
    model = _bf16_model()
    opt = build_optimizer(model, preset=SBL, lr=1e-3)
    _run(model, opt, 1)
    params = list(model.parameters())
    before = {p: opt.masters[p].clone() for p in params}
    for p in params[::2]:
        p.data.copy_(p.data * 2 + 1)   # e.g. an EMA library's copy_to()
    opt.sync_masters()
    for i, p in enumerate(params):
        # Elementwise: the master stays where it still rounds to the parameter.
        want = torch.where(before[p].bfloat16() == p, before[p], p.float())
        assert torch.equal(opt.masters[p], want)
        assert i % 2 == 1 or (want != before[p]).float().mean() > 0.9
    params[0].data = torch.zeros(3, dtype=torch.bfloat16)
    _set_grads(model, 1)
    params[0].grad = None
    with pytest.raises(RuntimeError, match=r"is now \(3,\).*build the optimizer after moving or resizing"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# The recipe inside a task model (a PIIP at any prefix, heads beside it)


class _TaskModel(nn.Module):
    """A segmenter laid out as transformers lays one out: a head registered before the
    backbone, the PIIP two levels down (``backbone.body.piip``), and parameters outside the
    PIIP whose names the backbone rules would match (``backbone.blocks.0``,
    ``backbone.pos_embed``, a bare ``pos_embed``)."""

    def __init__(self, piip_model, width=64):
        super().__init__()
        self.decode_head = nn.Conv2d(width, 3, 1)
        self.backbone = nn.Module()
        self.backbone.body = nn.Module()
        self.backbone.body.piip = piip_model
        self.backbone.blocks = nn.ModuleList([nn.Linear(width, width)])
        self.backbone.pos_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, width, 1, 1))

    def forward(self, x):
        maps = self.backbone.body.piip(x)
        f = maps[0]   # [B, C, H, W]
        t = self.backbone.blocks[0](f.flatten(2).transpose(1, 2) + self.backbone.pos_embed)
        # The other levels join too, so that every PIIP parameter gets a gradient.
        return self.decode_head(f + t.transpose(1, 2).reshape(f.shape) + self.pos_embed) + sum(m.mean() for m in maps[1:])


# The official rule for names outside the backbone (SBL: 24 layers): the last layer id, scale 1;
# decayed unless 1-D, named *.bias or one of the bare names the official exemption compares.
_OUTSIDE_SBL = {"decode_head.weight": [25, 1.0, 0.05, 1e-4], "decode_head.bias": [25, 1.0, 0.0, 1e-4],
                "backbone.blocks.0.weight": [25, 1.0, 0.05, 1e-4], "backbone.blocks.0.bias": [25, 1.0, 0.0, 1e-4],
                "backbone.pos_embed": [25, 1.0, 0.05, 1e-4], "pos_embed": [25, 1.0, 0.0, 1e-4]}


def test_task_model_groups_equal_a_bare_piips():
    """The PIIP inside a task model gets the official constructor's groups under its official
    names (relative to the PIIP), exactly as a bare PIIP; the other parameters follow the rule
    for names outside the backbone, whatever their names look like; wrappers are looked through."""
    torch.manual_seed(0)
    task = _TaskModel(PIIP(tiny_config(3, "detection")))
    opt = build_optimizer(task, preset=SBL)
    want = {**_expected("det_sbl_1568-1120-672"), **_OUTSIDE_SBL}
    assert _assert_groups(opt, want) == len(list(task.parameters()))
    bare = build_optimizer(task.backbone.body.piip, preset=SBL)
    of = lambda o: {id(p): (g["lr"], g["weight_decay"], g["layer_id"]) for g in o.param_groups for p in g["params"]}  # noqa: E731
    piip_part = {k: v for k, v in of(opt).items() if k in of(bare)}
    assert piip_part == of(bare)
    groups = official_param_groups(task, SBL)
    assert groups == official_param_groups(torch.compile(task), SBL)
    assert {n: [v["layer_id"], v["lr_scale"], v["weight_decay"]] for n, v in groups.items()} == \
        {n: w[:3] for n, w in want.items() if n in groups}
    assert set(_OUTSIDE_SBL) <= set(groups)


@pytest.mark.parametrize("preset", [SBL, TSB_CLS])
def test_task_model_at_full_size_has_the_presets_official_groups(preset):
    """A full-size preset (on the meta device) inside a task model: official_param_groups of
    the task model holds every entry of official_param_groups(preset), unchanged."""
    with torch.device("meta"):
        task = _TaskModel(piip.create_model(preset))
    got = official_param_groups(task)   # the preset the PIIP records
    want = official_param_groups(preset)
    assert {n: got[n] for n in want} == want
    outside = {n: v for n, v in got.items() if n not in want}
    assert sorted(outside) == sorted(_OUTSIDE_SBL)
    if preset == TSB_CLS:   # classification: everything outside the branches learns at the ratio
        assert all(v["lr_scale"] == 10.0 and v["weight_decay"] == 0.1 for v in outside.values())


def test_two_trainable_piips_are_refused_a_frozen_one_is_left_out():
    torch.manual_seed(0)
    task = _TaskModel(PIIP(tiny_config(2, "detection")))
    task.teacher = PIIP(tiny_config(2, "detection"))
    with pytest.raises(ValueError, match=r"2 trainable PIIP models \(at 'backbone.body.piip', 'teacher'\)"):
        build_optimizer(task, preset=SBL)
    with pytest.raises(ValueError, match="2 trainable PIIP models"):
        official_param_groups(task, SBL)
    task.teacher.requires_grad_(False)
    opt = build_optimizer(task, preset=SBL)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for n, p in task.named_parameters() if not n.startswith("teacher.")}


def test_a_bf16_task_model_trains_with_masters():
    """A bf16 task model: every trainable parameter (heads included) gets a master and a
    gradient, the step moves the masters (the layer-decayed updates, down to 1.7e-6, are below
    a bf16 step: most parameters do not move yet) and the parameters are them rounded."""
    torch.manual_seed(0)
    task = _TaskModel(PIIP(tiny_config(2, "detection"))).to(torch.bfloat16)
    opt = build_optimizer(task, preset=SBL, lr=1e-3)
    assert set(opt.masters) == set(task.parameters())
    before = [p.detach().clone() for p in task.parameters()]
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    loss = task(x).float().square().mean()
    loss.backward()
    assert all(p.grad is not None for p in task.parameters())
    # Zero-initialised gains give some tensors zero gradients (and zero weights: no decay either).
    live = [bool(p.grad.any()) for p in task.parameters()]
    opt.step()
    moved = [not torch.equal(opt.masters[p], b.float()) for p, b in zip(task.parameters(), before)]
    assert [m for m, g in zip(moved, live) if g] == [True] * sum(live) and sum(live) > 0.5 * len(live)
    assert all(torch.equal(p, opt.masters[p].bfloat16()) for p in task.parameters())


# ---------------------------------------------------------------------------------------------
# A bf16 task model under FSDP2 and DDP (two gloo ranks): weights loaded after the optimizer,
# clipping through the optimizer's parameters, masters in torch's distributed checkpoint


_TASK_STEPS, _TASK_BATCH, _CLIP = 3, 4, 0.5


def _task_model():
    torch.manual_seed(0)
    return _TaskModel(PIIP(tiny_config(2, "detection"))).to(torch.bfloat16)


def _task_donor() -> dict:
    """Other weights, far from the model's (loaded after the optimizer's first step)."""
    return {k: v + 1 for k, v in _task_model().state_dict().items()}


def _train_task(model, opt, load, rank=0, world=1):
    """_TASK_STEPS steps on slices of a global batch, the donor's weights loaded before step 1,
    clipping over the optimizer's parameters (mmengine's OptimWrapper). Returns the losses and
    the global gradient norms clip_grad_norm_ saw."""
    losses, norms = [], []
    for step in range(_TASK_STEPS):
        if step == 1:
            load(_task_donor())
        x = torch.randn(_TASK_BATCH, 3, 48, 48, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        per = _TASK_BATCH // world
        loss = model(x[rank * per:(rank + 1) * per]).float().square().mean()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], _CLIP))
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms])


def _task_worker(rank, world, init_file, result_file, kind):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    full = StateDictOptions(full_state_dict=True)

    def build():
        task = _task_model()
        if kind == "fsdp":
            mesh = init_device_mesh("cpu", (world,))
            piip.distributed.apply_fsdp(task.backbone.body.piip, mesh, param_dtype=None)   # bf16 shards
            fully_shard(task, mesh=mesh)   # the root: heads and wrapper parameters
            model = task
        else:
            model = torch.nn.parallel.DistributedDataParallel(task)
        return task, model, build_optimizer(model, preset=SBL, lr=1e-3)

    task, model, opt = build()
    load = (lambda sd: set_model_state_dict(model, sd, options=full)) if kind == "fsdp" else task.load_state_dict
    groups = {n: [g["lr"], g["weight_decay"]] for g in opt.param_groups for n in g["param_names"]}
    losses, norms = _train_task(model, opt, load, rank, world)
    gathered = [torch.zeros_like(losses) for _ in range(world)]
    dist.all_gather(gathered, losses)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()) for n, p in task.named_parameters()}
    osd = get_optimizer_state_dict(model, opt, options=full)   # torch's distributed checkpoint: FQN -> state
    masters = {n: s["master"] for n, s in osd["state"].items()}
    # ... and back into a fresh model and optimizer, model first: the masters, not the weights rounded.
    msd = get_model_state_dict(model, options=full)
    _, model2, opt2 = build()
    set_model_state_dict(model2, msd, options=full)
    set_optimizer_state_dict(model2, opt2, osd, options=full)
    resumed = {n: s["master"] for n, s in get_optimizer_state_dict(model2, opt2, options=full)["state"].items()}
    if rank == 0:
        torch.save({"type": type(opt).__name__, "groups": groups, "losses": torch.stack(gathered), "norms": norms,
                    "kinds": sorted({type(p).__name__ for p in task.parameters()}), "params": params,
                    "masters": masters, "resumed": resumed}, result_file)
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_a_bf16_task_model_trains_sharded_or_replicated(tmp_path, kind):
    """FSDP2 (bf16 shards, the PIIP's units and the task model's root) and DDP: the groups of
    the unwrapped single-process model; clipping over the optimizer's parameters sees the
    global gradient norm; the donor's weights loaded after the first step survive; the
    masters (in torch's distributed checkpoint) and parameters follow single-process training,
    and the checkpoint resumes into a fresh model and optimizer with the masters bit for bit."""
    got = run_two_gloo_ranks(_task_worker, tmp_path, kind, what=f"{kind} task-model workers")
    task = _task_model()
    opt = build_optimizer(task, preset=SBL, lr=1e-3)
    assert got["type"] == type(opt).__name__ == "MasterWeightAdamW"
    assert got["kinds"] == (["DTensor"] if kind == "fsdp" else ["Parameter"])
    assert got["groups"] == {n: [g["lr"], g["weight_decay"]] for g in opt.param_groups for n in g["param_names"]}
    losses, norms = _train_task(task, opt, task.load_state_dict)
    torch.testing.assert_close(got["losses"].mean(0), losses, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got["norms"].float(), norms.float(), rtol=2e-2, atol=0)
    assert (norms > _CLIP).all()   # every step clipped
    assert got["resumed"].keys() == got["masters"].keys() and len(got["masters"]) == len(list(task.parameters()))
    assert all(torch.equal(got["resumed"][n], m) for n, m in got["masters"].items())
    assert sum(not torch.equal(m, got["params"][n].float()) for n, m in got["masters"].items()) > len(got["masters"]) // 2
    lr = max(g["lr"] for g in opt.param_groups)
    donor = _task_donor()
    for n, p in task.named_parameters():
        # Gradients summed in another order differ in their last bf16 bits; Adam may turn a
        # near-zero one into up to lr of update per step. A stale master would be 1 away.
        bound = 2 * lr * _TASK_STEPS + 2.0 ** -8 * p.detach().float().abs()
        assert ((p.detach().float() - donor[n].float()).abs() <= bound).all(), n   # the loaded weights survived
        assert ((got["masters"][n].float() - opt.masters[p]).abs() <= bound).all(), n
        assert ((got["params"][n].float() - p.detach().float()).abs() <= bound).all(), n
