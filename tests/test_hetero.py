"""ConvNeXt, hybrid (ConvNeXt + ViT) and PIIP-LLaVA models: the official fixtures, the
full-size key lists and parameter counts, training-mode behaviour and bad input."""
import json
from dataclasses import replace

import pytest
import torch
from helpers import data_path, official_fixture

import piip
from piip.models.llava import PIIPLLaVA, preprocess
from piip.official import config_from_neutral, load_official_state_dict, official_config, to_official_state_dict

DET = ["det_convnext_3branch_tiny.pt", "det_hybrid_3branch_tiny.pt", "det_hybrid_cnn3_3branch_tiny.pt"]
LLAVA = ["llava_clip2branch_tiny.pt", "llava_convnext_mix_tiny.pt"]
# The parameters the official models keep only so that checkpoints load and counts match:
# transformers ConvNeXt's final LayerNorm, timm ConvNeXt's head, CLIP's post_layernorm.
UNUSED = ("convnext.norm.", "convnext.head_fc.", "clip.post_layernorm.")


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _load(name):
    fx = official_fixture(name)
    return fx, piip.from_official(fx["config"], fx["state_dict"]).eval()


@pytest.mark.parametrize("name", DET)
def test_detection_fixture_reproduced(name):
    fx, model = _load(name)
    img, out = fx["inputs"]["image"], fx["outputs"]
    with torch.no_grad():
        feats = model.forward_features(img)
        result = model.forward_head(feats)
    assert feats["hw"] == [tuple(hw) for hw in out["hw_after_interaction"][-1]]
    for got, want in zip(feats["tokens"], out["tokens_after_interaction"][-1]):
        assert got.shape == want.shape and rel_err(got, want) < 1e-4
    assert len(result) == 4
    for got, want in zip(result, out["features"]):
        assert got.shape == want.shape and rel_err(got, want) < 1e-4


def test_convnext_baseline_fixture_through_from_official():
    """The single-branch baseline: the four raw stage outputs (strides 4/8/16/32)."""
    fx, model = _load("det_convnext_baseline_tiny.pt")
    assert model.cfg.output == "stages"
    with torch.no_grad():
        outs = model(fx["inputs"]["image"])
    assert [tuple(o.shape) for o in outs] == [tuple(s) for s in fx["config"]["outputs_shapes"]]
    for got, want in zip(outs, fx["outputs"]["features"]):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("name", LLAVA)
def test_llava_fixture_reproduced(name):
    fx, model = _load(name)
    assert isinstance(model, PIIPLLaVA)
    out = fx["outputs"]
    # The official preprocessing reproduces the reference pixel_values from the raw image.
    raw = fx["inputs"]["image_uint8"]
    pixels = model.preprocess(raw[0] if isinstance(raw, list) else raw)
    torch.testing.assert_close(pixels, fx["inputs"]["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        x1, x2 = model.forward_features(pixels)
        tokens = model.forward_head([x1, x2])
        feats = piip.PIIP.forward_features(model, pixels)
    assert rel_err(x1, out["encoder_x1"]) < 1e-4 and x1.shape == out["encoder_x1"].shape
    assert rel_err(x2, out["encoder_x2"]) < 1e-4 and x2.shape == out["encoder_x2"].shape
    assert tokens.shape == out["projector_output"].shape and rel_err(tokens, out["projector_output"]) < 1e-4
    torch.testing.assert_close(model(pixels), tokens, rtol=0, atol=0)
    # The class token travels beside the CLIP patch tokens and comes out as the official one.
    assert rel_err(feats["cls"][0], out["cls_after_interaction"][-1][0]) < 1e-4


def test_fixture_comparisons_have_teeth():
    """Wrong semantics move the outputs far beyond the tolerance: branch 1 on a 72-pixel
    instead of a 64-pixel image, and CLIP without its class token."""
    fx = official_fixture("det_convnext_3branch_tiny.pt")
    cfg = config_from_neutral(fx["config"]).replace_branch(0, image_size=72)
    wrong = piip.from_official(cfg, fx["state_dict"]).eval()
    with torch.no_grad():
        got = wrong(fx["inputs"]["image"])
    assert rel_err(got[2], fx["outputs"]["features"][2]) > 1e-2
    fx = official_fixture("llava_clip2branch_tiny.pt")
    cfg = config_from_neutral(fx["config"])
    cfg = cfg.replace(branches=tuple(replace(b, cls_token=False) for b in cfg.branches))
    wrong = piip.from_official(cfg, fx["state_dict"]).eval()
    with torch.no_grad():
        got = wrong(fx["inputs"]["pixel_values"])
    assert rel_err(got, fx["outputs"]["projector_output"]) > 1e-2


# ---------------------------------------------------------------------------- full size

HETERO = json.loads(data_path("paper", "configs_hetero.json").read_text())["configs"]
KEY_LISTS = ["det_convnext-base_baseline_1024", "det_convnext-tsb_1024-672-448", "det_convnext-t_vit-s_vit-b_1024-672-448",
             "det_vit-t_vit-s_convnext-b_1024-672-448", "llava_clip-bl_512-448_7B", "llava_convnext-b_1024-336_7B",
             "llava_convnext-l_1024-336_7B"]


def _meta_model(name):
    with torch.device("meta"):
        return piip.build_model(official_config(piip.get_config(name)))


@pytest.mark.parametrize("stem", KEY_LISTS)
def test_full_size_key_lists(stem):
    lines = data_path("official", f"keys/{stem}.txt").read_text().splitlines()
    path = lines[0].split(":", 1)[1].split()[0]
    name = next(c["name"] for c in HETERO if c["config_path"] == path)
    keys = {k: tuple(json.loads(s)) for k, s in (ln.split("\t") for ln in lines if ln and not ln.startswith("#"))}
    ours = {k: tuple(v.shape) for k, v in to_official_state_dict(_meta_model(name)).items()}
    assert sorted(set(ours) ^ set(keys)) == []
    assert ours == keys
    total = int(lines[3].split(" tensors, ")[1].split(" parameters")[0])
    assert sum(torch.Size(s).numel() for s in ours.values()) == total


@pytest.mark.parametrize("cfg", HETERO, ids=lambda c: c["name"])
def test_every_config_is_a_preset_with_the_official_parameter_count(cfg):
    assert cfg["name"] in piip.list_models()
    model = _meta_model(cfg["name"])
    measured = cfg.get("measured_get_flops_det") or cfg["measured_get_flops_llava"]
    sd = to_official_state_dict(model)
    encoder = sum(v.numel() for k, v in sd.items() if not k.startswith("model.mm_projector."))
    assert encoder == measured["params_exact"]
    if "projector" in cfg:
        assert sum(p.numel() for p in model.projector.parameters()) == cfg["projector"]["params_exact"]
    for b, ob in zip(model.cfg.branches, cfg["branches"]):
        if "interaction_indexes" in ob:
            assert [list(g) for g in b.interaction_indexes] == ob["interaction_indexes"]
        if "downsample_ratios" in ob:
            assert list(b.layer_strides) == ob["downsample_ratios"]


# ---------------------------------------------------------------------------- training

def _tiny(name):
    fx = official_fixture(name)
    cfg = config_from_neutral(fx["config"])
    img = fx["inputs"]["image"] if "image" in fx["inputs"] else fx["inputs"]["pixel_values"]
    return cfg, img


@pytest.mark.parametrize("name", DET + LLAVA)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    cfg, img = _tiny(name)
    torch.manual_seed(0)
    model = piip.build_model(cfg)
    with torch.no_grad():  # injector gains and offset / weight projections start at 0: make every path live
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    model.eval()  # drop path off: a dropped residual branch would get no gradient by chance
    out = model(img.repeat(2, 1, 1, 1))
    loss = sum(o.float().square().mean() for o in out) if isinstance(out, list) else out.square().mean()
    loss.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    assert no_grad == sorted(n for n, _ in model.named_parameters() if any(u in n for u in UNUSED))
    assert no_grad, "the official unused norms are kept"


@pytest.mark.parametrize("name", ["det_hybrid_cnn3_3branch_tiny.pt", "llava_convnext_mix_tiny.pt"])
def test_gradient_checkpointing_and_bf16_autocast_match(name):
    fx = official_fixture(name)
    img = fx["inputs"]["image"] if "image" in fx["inputs"] else fx["inputs"]["pixel_values"]
    model = piip.from_official(fx["config"], fx["state_dict"]).train()  # drop paths of the fixtures are off below
    for m in model.modules():
        if hasattr(m, "p"):
            m.p = 0.0

    def run():
        model.zero_grad()
        out = model(img)
        out = torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out.flatten()
        out.float().square().sum().backward()
        return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run()
    model.set_grad_checkpointing(True)
    ck_out, ck_grads = run()
    model.set_grad_checkpointing(False)
    torch.testing.assert_close(ck_out, ref_out, rtol=1e-5, atol=1e-6)
    assert ck_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(ck_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf_out, _ = run()
    assert rel_err(bf_out, ref_out) < 5e-2


@pytest.mark.parametrize("name,shape,match", [
    ("det_hybrid_cnn3_3branch_tiny.pt", (1, 3, 72, 94), "multiple of the patch size 4"),
    ("det_hybrid_3branch_tiny.pt", (1, 3, 80, 88), "multiple of the patch size 16"),
    ("det_convnext_3branch_tiny.pt", (1, 4, 80, 80), r"\[B, 3, H, W\]"),
    ("det_convnext_3branch_tiny.pt", (1, 3, 32, 32), "below its total stride"),
    ("llava_convnext_mix_tiny.pt", (1, 1, 96, 96), r"\[B, 3, H, W\]"),
])
def test_bad_input_raises(name, shape, match):
    fx, model = _load(name)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape))


# ---------------------------------------------------------------------------- loading

def test_whole_llava_checkpoint_and_stock_timm_names(tmp_path):
    """A whole LLaVA state dict: only the encoder and projector keys are taken, and stock timm's
    ``gamma`` layer-scale name loads as well as the patched ``weight``."""
    fx = official_fixture("llava_convnext_mix_tiny.pt")
    sd = {k.replace("blocks.0.weight", "blocks.0.gamma"): v for k, v in fx["state_dict"].items()}
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)   # the language model
    sd["lm_head.weight"] = torch.zeros(4, 4)
    model = piip.build_model(config_from_neutral(fx["config"])).eval()
    load_official_state_dict(model, sd)
    with torch.no_grad():
        assert rel_err(model(fx["inputs"]["pixel_values"]), fx["outputs"]["projector_output"]) < 1e-4
    del sd["model.mm_projector.branch1.1.weight"]
    with pytest.raises(ValueError, match="missing from checkpoint: model.mm_projector.branch1.1.weight"):
        load_official_state_dict(model, sd)


def test_load_official_checkpoint_of_a_llava_preset(tmp_path):
    """A preset built in the official form and filled from a checkpoint file with LLaVA's prefixes."""
    cfg = piip.get_config("piip-llava_clip-bl_512-256_7B")
    small = cfg.replace(branches=tuple(replace(b, embed_dim=32, num_heads=2, depth=2, interaction_indexes=((0, 0), (1, 1)),
                                               window_sizes=(), image_size=b.image_size // 4) for b in cfg.branches), projector_dim=64)
    src = piip.build_model(small)
    torch.save({"state_dict": to_official_state_dict(src)}, tmp_path / "llava.bin")
    dst = piip.load_official_checkpoint(piip.build_model(small), str(tmp_path / "llava.bin"))
    img = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(dst(img), src.eval()(img))


def test_load_pretrained_convnext_and_clip_branches():
    """transformers ConvNeXt and CLIP and timm-named ConvNeXt checkpoints load into branches."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel

    from piip.models.convnext import convnext_official_key

    fx = official_fixture("det_hybrid_3branch_tiny.pt")
    model = piip.build_model(config_from_neutral(fx["config"]))
    b = model.branches[1]  # ConvNeXt-S-like
    hf = ConvNextModel(ConvNextConfig(depths=list(b.cfg.stage_depths), hidden_sizes=list(b.cfg.stage_widths)))
    sd = {"convnext." + k: v for k, v in hf.state_dict().items()}
    sd["classifier.weight"] = torch.zeros(10, b.cfg.embed_dim)
    report = piip.load_pretrained_branch(model, 1, sd, verbose=False)
    assert report["missing"] == [] and report["unexpected"] == [] and report["ignored"] == ["classifier.weight"]
    torch.testing.assert_close(b.convnext.stages[2].blocks[1].pwconv1.weight,
                               hf.encoder.stages[2].layers[1].pwconv1.weight)
    timm = {convnext_official_key(k[len("convnext."):], "timm"): torch.randn_like(v) for k, v in b.state_dict().items()}
    timm = {("visual.trunk." + k).replace(".gamma", ".weight"): v for k, v in timm.items()}
    report = piip.load_pretrained_branch(model, 1, timm, verbose=False)
    assert report["missing"] == []
    torch.testing.assert_close(b.convnext.stages[0].blocks[0].gamma, timm["visual.trunk.stages.0.blocks.0.weight"])

    fx = official_fixture("llava_clip2branch_tiny.pt")
    model = piip.build_model(config_from_neutral(fx["config"]))
    c = model.branches[0].cfg  # CLIP-L-like, patch 16, table 4x4
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=c.embed_dim, intermediate_size=4 * c.embed_dim,
                                          num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                                          patch_size=14, image_size=14 * 5))
    report = piip.load_pretrained_branch(model, 0, hf.state_dict(), verbose=False)
    assert report["missing"] == [] and report["unexpected"] == []
    emb = model.branches[0].clip.embeddings
    assert emb.patch_embedding.weight.shape[-1] == 16 and emb.position_embedding.weight.shape[0] == 17
    torch.testing.assert_close(emb.class_embedding, hf.state_dict()[next(k for k in hf.state_dict() if k.endswith("class_embedding"))])


@pytest.mark.parametrize("name", ["det_hybrid_cnn3_3branch_tiny.pt", "llava_convnext_mix_tiny.pt"])
def test_official_execution_path_equals_ours(name):
    """set_execution("official") (reference points, offsets, softmax, then MSDA on grid_sample,
    and the eager merge) computes what the fused path computes, also across CNN strides."""
    fx, model = _load(name)
    img = fx["inputs"]["image"] if "image" in fx["inputs"] else fx["inputs"]["pixel_values"]
    with torch.no_grad():
        ours = model(img)
        model.set_execution("official")
        theirs = model(img)
    for a, b in zip(ours if isinstance(ours, list) else [ours], theirs if isinstance(theirs, list) else [theirs]):
        assert rel_err(a, b) < 1e-5


def test_every_injector_gets_the_official_constant_drop_path_rate():
    """The official code passes interaction_drop_path_rate unchanged to every unit."""
    with torch.device("meta"):
        model = piip.build_model(piip.get_config("piip-llava_convnext-b_clip-l_1024-336_7B"))
    rates = {m.drop_path.p for m in model.modules() if hasattr(m, "drop_path") and hasattr(m, "ffn")}
    assert rates == {0.4}


def test_memory_planner_and_fsdp_units_cover_cnn_and_clip_branches():
    from piip.layers.convnext import ConvNeXtBlock
    from piip.memory import fsdp_units, plan_memory
    from piip.models.clip import CLIPLayer

    cfg, img = _tiny("llava_convnext_mix_tiny.pt")
    model = piip.build_model(cfg)
    units = fsdp_units(model)
    assert sum(isinstance(u, CLIPLayer) for u in units) == cfg.branches[0].depth
    assert sum(isinstance(u, ConvNeXtBlock) for u in units) == sum(cfg.branches[1].stage_depths)
    plan = plan_memory(cfg, batch=2, side=img.shape[-1], dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert plan["parameters"] == 4 * n and plan["activations"] > 0
