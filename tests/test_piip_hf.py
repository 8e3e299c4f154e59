"""PIIP as a transformers backbone (piip.hf): the official fixtures through from_official, every
detection/segmentation preset, the task models, save/load, initialisation and the recipe."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import official_fixture, tiny_config

import piip
import piip.hf as H
from piip.hf import tasks

ROOT = Path(__file__).resolve().parents[1]
DETECTION_FIXTURES = ["det_2branch_tiny.pt", "det_3branch_tiny.pt", "det_4branch_tiny.pt", "det_3branch_speedup_tiny.pt",
                      "det_convnext_3branch_tiny.pt", "det_hybrid_3branch_tiny.pt", "det_hybrid_cnn3_3branch_tiny.pt",
                      "det_convnext_baseline_tiny.pt"]
DET_SEG_PRESETS = [n for n in piip.list_models() if piip.get_config(n).extra.get("task") in ("detection", "segmentation")]


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _live(model):
    """Injector gains and offset projections start at 0, which cuts paths: make every path live."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(std=0.05)
    return model


# ----------------------------------------------------------------------------------- backbone

@pytest.mark.parametrize("name", DETECTION_FIXTURES)
def test_fixture_maps_through_from_official(name):
    """The official fixtures' pyramid through PIIPBackbone.from_official, in float64 against the
    official fp32 outputs; channels and strides as the config states them."""
    fx = official_fixture(name)
    model = H.PIIPBackbone.from_official(fx["config"], fx["state_dict"]).double().eval()
    img = fx["inputs"]["image"].double()
    with torch.no_grad():
        out = model(img)
    want = fx["outputs"]["features"]
    assert len(out.feature_maps) == len(want) == 4
    for i, (got, w) in enumerate(zip(out.feature_maps, want)):
        assert got.dtype == torch.float64 and got.shape == w.shape, f"level {i}"
        assert rel_err(got, w) < 1e-4, f"level {i}"
    assert model.channels == [w.shape[1] for w in want]
    assert [img.shape[-1] // s for s in model.config.strides] == [w.shape[-1] for w in want]


def test_fixture_comparison_has_teeth():
    fx = official_fixture("det_3branch_tiny.pt")
    sd = dict(fx["state_dict"])
    sd["w1"] = sd["w1"] + 0.5  # one merge weight off
    model = H.PIIPBackbone.from_official(fx["config"], sd).eval()
    with torch.no_grad():
        got = model(fx["inputs"]["image"]).feature_maps[2]
    assert rel_err(got, fx["outputs"]["features"][2]) > 1e-2


@pytest.mark.parametrize("name,levels", [("det_3branch_tiny.pt", [1, 2, 3]), ("det_3branch_tiny.pt", [2]),
                                         ("det_hybrid_3branch_tiny.pt", [1, 2, 3]),
                                         ("det_hybrid_cnn3_3branch_tiny.pt", [0, 3]),
                                         ("det_convnext_baseline_tiny.pt", [1, 2, 3])])
def test_out_indices_subsets(name, levels):
    """A subset of levels: the same maps; a simple FPN builds only their layers (the
    checkpoint's others are dropped), a regular FPN freezes the merges it does not return."""
    fx = official_fixture(name)
    model = H.PIIPBackbone.from_official(fx["config"], fx["state_dict"], out_indices=levels).eval()
    assert model.out_features == [f"level{i}" for i in levels]
    with torch.no_grad():
        out = model(fx["inputs"]["image"]).feature_maps
    for got, i in zip(out, levels, strict=True):
        assert rel_err(got, fx["outputs"]["features"][i]) < 1e-4
    p = model.piip
    if p.cfg.fpn == "simple" and p.cfg.output == "detection":
        assert (p.fpn1 is not None) == (0 in levels) and (p.fpn2 is not None) == (1 in levels)
        assert all(q.requires_grad for q in model.parameters())
    # Training the subset: every trainable parameter reaches the output (what DDP requires).
    _live(model).train()
    sum(m.square().mean() for m in model(fx["inputs"]["image"]).feature_maps).backward()
    assert [n for n, q in model.named_parameters() if q.requires_grad and q.grad is None] == []
    frozen = {n for n, q in model.named_parameters() if not q.requires_grad}
    assert {n for n in frozen if ".convnext.norm." in n} == {n for n, _ in model.named_parameters() if ".convnext.norm." in n}
    if p.cfg.fpn == "regular" and 0 not in levels:
        assert {n for n in frozen if "inter_merge.0." in n} == {n for n, _ in model.named_parameters() if "inter_merge.0." in n}


@pytest.mark.parametrize("name", DET_SEG_PRESETS)
def test_every_detection_and_segmentation_preset(name):
    cfg = H.PIIPBackboneConfig(preset=name)
    piip_cfg = piip.get_config(name)
    dino = name.startswith("dino_")
    assert cfg.out_indices == ([1, 2, 3] if dino else [0, 1, 2, 3])
    assert len(cfg.channels) == len(cfg.strides) == len(cfg.out_indices)
    assert cfg.strides == ([8, 16, 32] if dino else [4, 8, 16, 32])
    assert set(cfg.channels) <= {b.embed_dim for b in piip_cfg.branches} | set(piip_cfg.branches[0].stage_widths)
    assert H.PIIPBackboneConfig(preset=name, official=True).to_piip_config().branches[0].pad_before_qkv


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms",
                                  "mask_rcnn_convnext-t_vit-s_convnext-b_1024_672_448_regular-fpn",
                                  "mask_rcnn_convnext-base_1024_regular-fpn",
                                  "upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5"])
def test_full_size_presets_on_meta(name):
    """Full size on the meta device: the maps have the stated channels and strides."""
    cfg = H.PIIPBackboneConfig(preset=name, official=True)
    with torch.device("meta"):
        out = H.PIIPBackbone(cfg)(torch.empty(1, 3, 256, 192)).feature_maps
    assert [tuple(o.shape[1:]) for o in out] == [(c, 256 // s, 192 // s) for c, s in zip(cfg.channels, cfg.strides)]


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="needs preset=<name>"):
        H.PIIPBackboneConfig()
    with pytest.raises(ValueError, match="output 'classification'"):
        H.PIIPBackboneConfig(preset="piip_3branch_tsb_368-192-128_cls_token_deit1")
    with pytest.raises(ValueError, match="output 'llava'"):
        H.PIIPBackboneConfig(preset="piip-llava_clip-bl_512-256_7B")
    with pytest.raises(KeyError, match="unknown PIIP preset"):
        H.PIIPBackboneConfig(preset="mask_rcnn_deit_tsb")
    with pytest.raises(ValueError, match="disagree"):
        H.PIIPBackboneConfig(preset="mask_rcnn_deit_vit_b_fpn_1x_coco_bs16",
                             piip_config=piip.get_config("mask_rcnn_deit_vit_l_fpn_1x_coco_bs16"))
    with pytest.raises(ValueError, match="out_indices must be"):
        H.PIIPBackboneConfig(piip_config=tiny_config(2), out_indices=[3, 1])
    with pytest.raises(ValueError, match="unknown fields"):
        H.PIIPBackboneConfig(piip_config={**H.piip_config_to_dict(tiny_config(2)), "fpn_level": [1]})
    with pytest.raises(ValueError, match="RT-DETR reads 3 backbone levels"):
        tasks.rt_detr_config(H.PIIPBackboneConfig(piip_config=tiny_config(2)))
    with pytest.raises(ValueError, match=r"UperNet reads 4 backbone levels.*out_indices=\[0, 1, 2, 3\]"):
        tasks.upernet_config(H.PIIPBackboneConfig(piip_config=tiny_config(2), out_indices=[1, 2, 3]))


def test_bad_images_raise_clearly():
    model = H.PIIPBackbone(H.PIIPBackboneConfig(piip_config=tiny_config(2)))
    with pytest.raises(ValueError, match=r"image size \(64, 72\) is not a multiple of 16.*multiples of 32"):
        model(torch.zeros(1, 3, 64, 72))
    with pytest.raises(ValueError, match="no attentions"):
        model(torch.zeros(1, 3, 64, 64), output_attentions=True)


def test_auto_classes_and_dict_configs():
    from transformers import AutoBackbone, AutoConfig, UperNetConfig

    cfg = H.PIIPBackboneConfig(piip_config=tiny_config(2), out_features=["level1", "level3"])
    assert cfg.out_indices == [1, 3] and cfg.stage_names == ["level0", "level1", "level2", "level3"]
    model = AutoBackbone.from_config(cfg)
    assert isinstance(model, H.PIIPBackbone) and model.channels == [64, 64]
    assert isinstance(AutoConfig.for_model("piip", piip_config=tiny_config(2)), H.PIIPBackboneConfig)
    # A task config given the backbone as a plain dict (as in a config.json).
    upernet = UperNetConfig(backbone_config={"model_type": "piip", "piip_config": H.piip_config_to_dict(tiny_config(2))})
    assert isinstance(upernet.backbone_config, H.PIIPBackboneConfig)
    assert upernet.backbone_config.out_indices == [0, 1, 2, 3]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model(x, output_hidden_states=True)
    assert [tuple(m.shape) for m in maps.feature_maps] == [(1, 64, 8, 8), (1, 64, 2, 2)]
    assert [tuple(h.shape) for h in maps.hidden_states] == [(1, 64, 2, 2), (1, 48, 4, 4)]  # each branch's final map
    legacy = model(x, return_dict=False)
    assert isinstance(legacy, tuple) and len(legacy[0]) == 2


def test_bf16_backbone_under_fp32_heads():
    """The official recipe's precision: bf16 backbone, fp32 heads and images."""
    model = H.PIIPBackbone(H.PIIPBackboneConfig(piip_config=tiny_config(2))).to(torch.bfloat16)
    maps = model(torch.randn(2, 3, 64, 64)).feature_maps
    assert all(m.dtype == torch.float32 for m in maps)
    assert all(m.dtype == torch.bfloat16 for m in model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)).feature_maps)


def test_gradient_checkpointing_switch():
    torch.manual_seed(0)
    model = _live(H.PIIPBackbone(H.PIIPBackboneConfig(piip_config=tiny_config(2))))
    x = torch.randn(2, 3, 64, 64)
    sum(m.sum() for m in model(x).feature_maps).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True  # what transformers' gradient_checkpointing_enable sets on every module
    assert model.piip.grad_checkpointing and all(b.grad_checkpointing for b in model.piip.branches)
    sum(m.sum() for m in model(x).feature_maps).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- initialisation

def test_construction_keeps_piip_initialisation():
    """post_init() leaves PIIP's own initialisation as it is: the same seed gives the same
    tensors as a bare PIIP (transformers' default would redraw every Linear and convolution
    with std 0.02, the deformable attention's ring of sampling offsets included)."""
    cfg = H.PIIPBackboneConfig(piip_config=tiny_config(3))
    torch.manual_seed(3)
    ours = H.PIIPBackbone(cfg).piip.state_dict()
    torch.manual_seed(3)
    bare = piip.PIIP(cfg.to_piip_config()).state_dict()
    assert ours.keys() == bare.keys() and all(torch.equal(ours[k], bare[k]) for k in bare)


def _drop_keys(directory, pattern):
    from safetensors.torch import load_file, save_file

    f = Path(directory) / "model.safetensors"
    sd = load_file(f)
    dropped = sorted(k for k in sd if pattern(k))
    assert dropped
    save_file({k: v for k, v in sd.items() if k not in dropped}, f, metadata={"format": "pt"})
    return dropped


def _check_piip_init(sd, dropped, cfg):
    fresh = piip.PIIP(cfg).state_dict()
    for k in dropped:
        v = sd[k]
        assert torch.isfinite(v).all(), k
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("ls1", "ls2"):
            assert torch.all(v == cfg.branches[0].layer_scale), k
        elif leaf == "ca_gamma":
            assert torch.all(v == 0), k
        elif k.endswith("sampling_offsets.bias"):  # the deformable attention's ring of offsets
            ring = fresh[k.split("piip.", 1)[1]]
            assert ring.abs().max() > 0 and torch.equal(v, ring), k
        elif "norm" in k and leaf == "weight":
            assert torch.all(v == 1), k
        else:  # trunc_normal(std=0.02) weights and position tables
            assert 0.015 < v.float().std() < 0.025, (k, v.float().std())


def test_missing_keys_get_piip_initialisation(tmp_path):
    """from_pretrained builds on the meta device: a key the checkpoint lacks must get PIIP's
    initialisation, not the empty memory it is given (nor transformers' default)."""
    cfg = H.PIIPBackboneConfig(piip_config=tiny_config(3))
    model = H.PIIPBackbone(cfg)
    model.save_pretrained(tmp_path)
    dropped = _drop_keys(tmp_path, lambda k: k.endswith(("blocks.0.ls1", "blocks.1.norm1.weight", "to_a.ca_gamma",
                                                         "attn.qkv.weight", "pos_embed", "0.0.to_b.attn.sampling_offsets.bias")))
    loaded = H.PIIPBackbone.from_pretrained(tmp_path)
    sd, want = loaded.state_dict(), model.state_dict()
    _check_piip_init(sd, dropped, cfg.to_piip_config())
    assert all(torch.equal(sd[k], want[k]) for k in want if k not in dropped)


def test_missing_backbone_keys_inside_a_task_model(tmp_path):
    from transformers import UperNetForSemanticSegmentation

    bb = H.PIIPBackboneConfig(piip_config=tiny_config(2))
    model = UperNetForSemanticSegmentation(tasks.upernet_config(bb, hidden_size=16, auxiliary_channels=8, num_labels=3))
    model.save_pretrained(tmp_path)
    dropped = _drop_keys(tmp_path, lambda k: k.startswith("backbone.") and k.endswith(("ls2", "mlp.fc1.weight")))
    loaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path)
    _check_piip_init(loaded.state_dict(), dropped, bb.to_piip_config())
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items() if k not in dropped)


# --------------------------------------------------------------------------------- task models

def _labels(kind, dtype):
    if kind == "upernet":
        return {"labels": torch.randint(0, 5, (2, 64, 64))}
    if kind == "mask2former":
        g = torch.Generator().manual_seed(0)
        return {"class_labels": [torch.tensor([1, 3]), torch.tensor([2])],
                "mask_labels": [torch.rand(2, 64, 64, generator=g).round().to(dtype),
                                torch.rand(1, 64, 64, generator=g).round().to(dtype)]}
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]]), torch.tensor([[0.4, 0.4, 0.3, 0.3]])]
    return {"labels": [{"class_labels": torch.tensor([1, 2]), "boxes": boxes[0].to(dtype)},
                       {"class_labels": torch.tensor([3]), "boxes": boxes[1].to(dtype)}]}


def _task_model(kind):
    """A tiny task model around a tiny 3-branch PIIP."""
    from transformers import (DeformableDetrForObjectDetection, DFineForObjectDetection, Mask2FormerForUniversalSegmentation,
                              RTDetrForObjectDetection, UperNetForSemanticSegmentation)

    four = H.PIIPBackboneConfig(piip_config=tiny_config(3))
    three = H.PIIPBackboneConfig(piip_config=tiny_config(3), out_indices=[1, 2, 3])
    detr = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
                num_labels=5, encoder_attention_heads=4, decoder_attention_heads=4)
    rt = dict(detr, encoder_hidden_dim=32, num_denoising=4)
    build = {
        "upernet": lambda: UperNetForSemanticSegmentation(tasks.upernet_config(four, hidden_size=32, auxiliary_channels=16,
                                                                               num_labels=5)),
        "mask2former": lambda: Mask2FormerForUniversalSegmentation(tasks.mask2former_config(
            four, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, dim_feedforward=64,
            encoder_layers=1, decoder_layers=2, num_queries=10, num_labels=5, num_attention_heads=4, train_num_points=64)),
        "deformable_detr": lambda: DeformableDetrForObjectDetection(tasks.deformable_detr_config(three, two_stage_num_proposals=10,
                                                                                                 **detr)),
        "rt_detr": lambda: RTDetrForObjectDetection(tasks.rt_detr_config(three, **rt)),
        "d_fine": lambda: DFineForObjectDetection(tasks.d_fine_config(three, **rt)),
    }
    return build[kind]()


def _msda_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "piip::ms_deform_attn")


@pytest.mark.parametrize("kind", ["upernet", "mask2former", "deformable_detr", "rt_detr", "d_fine"])
def test_task_model_trains_a_step(kind):
    """Each head around PIIP: with our deformable attention in the head (use_in_transformers)
    its outputs equal transformers' in float64, and one training step on our kernel reaches
    every backbone parameter. (The loss is not compared in float64: Mask2Former's matcher
    samples fp32 points, which fails on float64 masks.)"""
    from piip_kernels.hf import use_in_transformers

    torch.manual_seed(0)
    model = _live(_task_model(kind))
    backbone = next(m for m in model.modules() if isinstance(m, H.PIIPBackbone))
    x = torch.randn(2, 3, 64, 64)

    def outputs():
        with torch.no_grad():
            out = model.double().eval()(pixel_values=x.double())
        return [v for v in out.values() if torch.is_tensor(v)]

    want, theirs = _msda_calls(outputs)
    handle = use_in_transformers(model)
    try:
        got, ours = _msda_calls(outputs)
        assert ours > theirs or kind == "upernet"  # UperNet has no deformable attention
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        model.float().train()
        model(pixel_values=x, **_labels(kind, torch.float32)).loss.backward()
    finally:
        handle.remove()
    no_grad = [n for n, p in backbone.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []
    head = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and not n.startswith("backbone")]
    assert len(head) < len(list(model.parameters())) // 2, head  # the head trains too (some branches are train-only)


# ---------------------------------------------------------------------------- save and load

_FRESH = """
import sys, torch
import piip.hf  # the only import that registers "piip"
from transformers import {cls}
model = {cls}.from_pretrained(sys.argv[1]).eval()
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    out = {call}
torch.save(out, sys.argv[3])
assert "transformers" in sys.modules and type(model).__name__ == "{cls}"
"""


@pytest.mark.parametrize("task", [False, True])
def test_save_pretrained_round_trip_in_a_fresh_process(tmp_path, task):
    from transformers import UperNetForSemanticSegmentation

    torch.manual_seed(0)
    bb = H.PIIPBackboneConfig(piip_config=tiny_config(2), out_indices=[0, 1, 2, 3])
    if task:
        model = _live(UperNetForSemanticSegmentation(tasks.upernet_config(bb, hidden_size=16, auxiliary_channels=8,
                                                                          num_labels=3)))
        cls, call = "UperNetForSemanticSegmentation", "model(pixel_values=x).logits"
    else:
        model = _live(H.PIIPBackbone(bb))
        cls, call = "AutoBackbone", "torch.cat([m.flatten() for m in model(x).feature_maps])"
    model.eval().save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (saved["backbone_config"] if task else saved)["model_type"] == "piip"
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = model(pixel_values=x).logits if task else torch.cat([m.flatten() for m in model(x).feature_maps])
    script = _FRESH.format(cls="PIIPBackbone" if not task else cls, call=call)
    if not task:
        script = script.replace("from transformers import PIIPBackbone", "from piip.hf import PIIPBackbone")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # Equal to rounding: the same weights, but a fresh process may order a convolution's sums differently.
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), want, rtol=1e-5, atol=1e-6)


def test_a_bf16_backbone_under_fp32_heads_reloads_exactly_as_the_readme_says(tmp_path):
    """transformers' save_pretrained records one dtype (bf16, the backbone's) and from_pretrained
    builds the whole model in it, rounding the fp32 heads; the README's way back (load in fp32,
    then the backbone to bf16) gives every tensor its dtype and value again."""
    from transformers import UperNetForSemanticSegmentation

    torch.manual_seed(0)
    bb = H.PIIPBackboneConfig(piip_config=tiny_config(2), out_indices=[0, 1, 2, 3])
    model = _live(UperNetForSemanticSegmentation(tasks.upernet_config(bb, hidden_size=16, auxiliary_channels=8,
                                                                      num_labels=3)))
    model.backbone.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    want = model.state_dict()
    plain = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "model").state_dict()
    assert any(want[k].dtype == torch.float32 and plain[k].dtype == torch.bfloat16 for k in want), "nothing to document"
    back = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "model", dtype=torch.float32)
    back.backbone.to(torch.bfloat16)
    got = back.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# ---------------------------------------------------------------------- the official recipe

def test_optimizer_groups_inside_a_task_model_match_official():
    """piip.build_optimizer on a whole UperNet (full size, meta device): the backbone's
    parameters get exactly the official layer-decay groups of the preset, the heads the
    official rule for names outside the backbone (the last layer id, scale 1; no decay for
    1-D tensors and biases)."""
    from transformers import UperNetForSemanticSegmentation

    name = "upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5"
    with torch.device("meta"):
        model = UperNetForSemanticSegmentation(tasks.upernet_config(name))
    opt = piip.build_optimizer(model, preset=name)
    official = piip.official_param_groups(name)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    seen, heads = set(), 0
    for g in opt.param_groups:
        for pname, p in zip(g["param_names"], g["params"]):
            got = {"layer_id": g["layer_id"], "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"]}
            if id(p) in backbone_ids:
                assert got == official[pname], pname
                seen.add(pname)
            else:
                heads += 1
                assert pname.startswith(("decode_head.", "auxiliary_head.")), pname
                assert got["lr_scale"] == 1.0 and got["layer_id"] == 48 + 1
                assert got["weight_decay"] == (0.0 if p.dim() == 1 or pname.endswith(".bias") else 0.05), pname
    scalars = {n for n in official if n.startswith("backbone.w")}  # the merge weights: one tensor holds them all
    assert seen | scalars == set(official) and heads == sum(1 for n, _ in model.named_parameters() if not n.startswith("backbone."))


def _official_checkpoint(tmp_path, fx, prefix="backbone."):
    path = tmp_path / "official.pth"
    torch.save({"meta": {}, "state_dict": {prefix + k: v for k, v in fx["state_dict"].items()}}, path)
    return path


def test_load_official_checkpoint_into_a_backbone_and_a_task_model(tmp_path):
    """piip.load_official_checkpoint fills the one PIIP inside a PIIPBackbone or a task model
    (an mmdet/mmseg checkpoint: its ``backbone.*`` keys)."""
    from transformers import UperNetForSemanticSegmentation

    fx = official_fixture("det_3branch_tiny.pt")
    path = _official_checkpoint(tmp_path, fx)
    img = fx["inputs"]["image"]
    backbone = H.PIIPBackbone(H.official_backbone_config(fx["config"]))
    piip.load_official_checkpoint(backbone, str(path))
    upernet = UperNetForSemanticSegmentation(tasks.upernet_config(H.official_backbone_config(fx["config"]), hidden_size=16,
                                                                  auxiliary_channels=8, num_labels=3))
    piip.load_official_checkpoint(upernet, str(path))
    with torch.no_grad():
        for model in (backbone.eval(), upernet.backbone.eval()):
            for got, want in zip(model(img).feature_maps, fx["outputs"]["features"]):
                assert rel_err(got, want) < 1e-4


def test_bench_upernet_entry():
    """bench_model's UperNet entry: the PIIP methods reach the backbone, to(bf16) keeps the
    heads fp32 (the official recipe), and the step's loss is the same on both paths."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_model

    torch.manual_seed(0)
    model = bench_model.build(bench_model.UPERNET_TINY)
    bench_model.move_offsets_off_pixel_centres(model)
    x = torch.randn(2, 3, 64, 64)
    losses = {}
    for path in ("official", "ours"):
        model.set_execution(path)
        assert model.piip.eager_merge == (path == "official")
        torch.manual_seed(1)
        losses[path] = model(x)
    assert losses["ours"].dim() == 0
    torch.testing.assert_close(losses["ours"], losses["official"], rtol=1e-5, atol=0)
    model.to(torch.bfloat16)
    assert next(model.piip.parameters()).dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if "_head." in n} == {torch.float32}
    opt = piip.build_optimizer(model, preset=bench_model.recipe_of(bench_model.UPERNET_TINY))
    model(x.bfloat16()).backward()
    opt.step()


def test_official_weights_into_a_paper_form_backbone_save_the_official_form(tmp_path):
    """piip.load_official_checkpoint switches a backbone built in the paper form to the
    official form (window padding before qkv): its config follows, so that save_pretrained /
    from_pretrained rebuild the model the weights are used in, inside a task model too."""
    from transformers import UperNetForSemanticSegmentation

    fx = official_fixture("det_3branch_tiny.pt")
    paper = piip.official.config_from_neutral(fx["config"])
    paper = paper.replace(branches=tuple(dataclasses.replace(b, pad_before_qkv=False) for b in paper.branches))
    model = UperNetForSemanticSegmentation(tasks.upernet_config(H.PIIPBackboneConfig(piip_config=paper), hidden_size=16,
                                                                auxiliary_channels=8, num_labels=3))
    assert not model.config.backbone_config.official
    piip.load_official_checkpoint(model, _official_checkpoint(tmp_path, fx))
    assert model.config.backbone_config.official
    assert all(b["pad_before_qkv"] for b in model.config.backbone_config.piip_config["branches"])
    model.save_pretrained(tmp_path / "saved")
    loaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        for got, want in zip(loaded.backbone(fx["inputs"]["image"]).feature_maps, fx["outputs"]["features"]):
            assert rel_err(got, want) < 1e-4
