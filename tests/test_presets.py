"""Every preset against the paper's configuration list, and its parameter count."""
import json

import pytest
import torch
from helpers import data_path, paper_configs

import piip
from piip.flops import counting_config
from piip.models.presets import split_stages
from piip.official import official_config


def vit_configs():
    return {n: c for n, c in paper_configs().items()
            if all(b.get("implementation_class") in ("deit", "internvit") for b in c["branches"])}


def test_every_config_has_a_preset():
    """The ViT configs (configs.json) and the ConvNeXt/hybrid/LLaVA ones (configs_hetero.json,
    checked in test_hetero.py) are exactly the listed presets."""
    hetero = json.loads(data_path("paper", "configs_hetero.json").read_text())["configs"]
    assert sorted(list(vit_configs()) + [c["name"] for c in hetero]) == piip.list_models()


def _window_pattern(b):
    return "".join("G" if w is None else "W" for w in b.window_sizes)


@pytest.mark.parametrize("name", sorted(vit_configs()))
def test_preset_matches_paper_config(name):
    paper = vit_configs()[name]
    cfg = piip.get_config(name)
    assert len(cfg.branches) == len(paper["branches"])
    for ours, theirs in zip(cfg.branches, paper["branches"]):
        assert (ours.embed_dim, ours.depth, ours.num_heads, ours.image_size) == \
            (theirs["embed_dim"], theirs["depth"], theirs["num_heads"], theirs["resolution"])
        assert ours.qkv_bias == theirs["qkv_bias"]
        assert _window_pattern(ours) == theirs["window"]["pattern"]
        assert {w for w in ours.window_sizes if w} == ({theirs["window"]["window_size"]} if "W" in theirs["window"]["pattern"] else set())
        assert ours.norm == theirs["norm"].split("(")[0]
        assert (ours.qk_norm != "none") == theirs["qk_norm"]
        assert ours.layer_scale == (None if theirs["layer_scale_init"] is None else float(theirs["layer_scale_init"]))
        assert (ours.mlp_act == "gelu_tanh") == ("tanh" in theirs["mlp"])
        assert list(ours.pos_embed_grid) == theirs["pos_embed_stored_grid"]
        assert ours.pos_embed_cls_slot == theirs["pos_embed_has_leading_cls_slot"]
        assert ours.family == theirs["implementation_class"]
        assert ours.drop_path_rate == theirs["drop_path_rate"]
        assert [list(x) for x in ours.interaction_indexes] == (theirs.get("interaction_indexes") if len(cfg.branches) > 1 else [])
    if len(cfg.branches) > 1:
        it = paper["interaction"]
        assert (cfg.num_stages, cfg.n_points, cfg.deform_num_heads, cfg.deform_ratio, cfg.cffn_ratio) == \
            (it["num_interactions"], it["n_points"], it["deform_num_heads"], it["deform_ratio"], it["cffn_ratio"])
        assert cfg.interaction_proj == it["interaction_proj"]
        assert cfg.interaction_norm == it["interaction_norm"].split("(")[0]


@pytest.mark.parametrize("name", sorted(vit_configs()))
def test_parameter_counts_match_official(name):
    """Official detection backbone form: the exact count of the official code; the counting
    form (what the paper's #Param column counts): the official script's figure."""
    paper = vit_configs()[name]
    exact = (paper.get("measured_get_flops_det") or {}).get("params_exact")
    if exact is not None:
        with torch.device("meta"):
            model = piip.PIIP(official_config(piip.get_config(name)))
        assert sum(p.numel() for p in model.parameters()) == exact
    measured = (paper.get("measured_get_flops") or {}).get("params_M")
    if measured is not None:
        with torch.device("meta"):
            model = piip.PIIP(counting_config(piip.get_config(name)))
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == measured
    if exact is None and measured is None:
        pytest.skip("no official parameter count published for this configuration")


@pytest.mark.parametrize("depth,stages", [(12, 12), (24, 12), (32, 12), (48, 4), (24, 4), (7, 3)])
def test_split_stages(depth, stages):
    s = split_stages(depth, stages)
    assert len(s) == stages and s[0][0] == 0 and s[-1][1] == depth - 1
    sizes = [e - b + 1 for b, e in s]
    assert sizes == sorted(sizes) and max(sizes) - min(sizes) <= 1


def test_unknown_preset_suggests_names():
    with pytest.raises(KeyError, match="did you mean"):
        piip.create_model("mask_rcnn_deit_tsb_1568_1120_672")


def test_overrides():
    cfg = piip.get_config("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", drop_path_rate=0.0, num_classes=3)
    assert all(b.drop_path_rate == 0.0 for b in cfg.branches) and cfg.num_classes == 3


def test_create_model_on_a_device_and_dtype():
    model = piip.create_model("mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms", device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"} and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        piip.create_model("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", device="meta", dtype="bf16")
    with pytest.raises(ValueError, match="floating-point"):
        piip.create_model("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", device="meta", dtype=torch.int8)


def test_build_model_on_the_cpu_in_float64():
    from helpers import tiny_config

    model = piip.build_model(tiny_config(2), device="cpu", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model(torch.randn(1, 3, 48, 48, dtype=torch.float64))
    assert out[0].dtype == torch.float64


def test_list_models_paper_only_lists_the_paper_only_rows():
    from piip.models.presets import PAPER_ONLY

    assert piip.list_models(paper_only=True) == sorted(PAPER_ONLY)
    everything = piip.list_models(include_paper_only=True)
    assert set(everything) == set(piip.list_models()) | PAPER_ONLY and not set(piip.list_models()) & PAPER_ONLY
    assert piip.list_models("scratch", paper_only=True) == ["piip_3branch_b_512-256-128_scratch", "vit_b_224_scratch"]
