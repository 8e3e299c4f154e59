"""FLOP formulas and the paper-convention counter."""
import json
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import data_path, msda_inputs, paper_configs, tiny_config

import piip
from piip.flops import counting_config, flop_count_analysis, full_cost, paper_cost
from piip_kernels import ms_deform_attn

ROOT = Path(__file__).resolve().parents[1]


def test_msda_formula_by_hand():
    from torch.utils.flop_counter import FlopCounterMode

    inp = msda_inputs([(4, 5), (2, 3)], N=2, Lq=7, M=3, D=6, P=2)
    with FlopCounterMode(display=False) as fc:
        ms_deform_attn(*inp)
    # per (image, query, head, level, point): 4 corner multiply-adds + 1 weight, on D channels
    assert fc.get_total_flops() == 2 * (2 * 7 * 3 * 2 * 2 * 6 * 5)


def test_sdpa_handle_by_hand():
    q = torch.randn(2, 3, 10, 8)
    k = torch.randn(2, 3, 12, 8)
    v = torch.randn(2, 3, 12, 4)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    fa = flop_count_analysis(M(), (q, k, v))
    assert fa.total() == 2 * 3 * 10 * 12 * 8 + 2 * 3 * 10 * 12 * 4


def test_fvcore_and_flop_counter_mode_agree_on_tiny_piip():
    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(3)).eval()
    img = torch.randn(1, 3, 96, 96)
    fa = flop_count_analysis(model, (img,))
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    fa.tracer_warnings("none")
    fc = full_cost(model, side=96)
    assert fa.total() == fc["macs"]
    assert fa.by_operator()["deform_cross_attn"] == fc["by_op"]["piip.deform_cross_attn"] > 0
    assert fa.by_operator()["branch_merge"] == fc["by_op"]["piip.branch_merge"] > 0
    with torch.device("meta"):
        meta = piip.PIIP(tiny_config(3))
    assert full_cost(meta, side=96)["macs"] == fc["macs"]


def test_full_cost_restores_the_callers_modes():
    """Training runs call full_cost: each submodule keeps its train/eval mode (drop path stays
    on), also when the count fails."""
    model = piip.PIIP(tiny_config(3)).train()
    model.branches[0].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    full_cost(model, side=96)
    assert {n: m.training for n, m in model.named_modules()} == modes
    with pytest.raises(ValueError, match="multiple of the patch size"):
        full_cost(model, side=97)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_paper_convention_on_tiny_model_by_hand():
    """One-branch classification model: every hooked layer and analytic term written out."""
    from piip import BranchConfig, PIIPConfig

    C, n, D = 32, 4 * 4, 2
    cfg = PIIPConfig(branches=(BranchConfig(name="b", embed_dim=C, depth=D, num_heads=4, image_size=64,
                                            interaction_indexes=(), pos_embed_grid=(4, 4)),), output="classification")
    r = paper_cost(cfg)
    blocks = D * (12 * n * C * C + 2 * 2 * n * C)      # qkv, proj, fc1, fc2; two LayerNorms
    patch = n * C * (3 * 16 * 16 + 1)                   # conv with bias
    final = 2 * n * C + C * 1000                        # final LayerNorm, head on one token
    attention = D * 2 * n * n * C                       # analytic q.k^T and attn.v
    assert r["hooks"] == blocks + patch + final
    assert r["analytic"] == attention
    assert r["params"] == 768 * C + C + n * C + D * (12 * C * C + 13 * C + 2 * C) + 2 * C + 1000 * C + 1000


def test_worked_examples_exact():
    """The convention note's worked examples, to the multiply-accumulate."""
    cls = paper_cost("piip_3branch_tsb_368-192-128_cls_token_deit1")
    assert (cls["params"], cls["macs"], cls["analytic"]) == (144_031_416, 17_427_520_704, 1_618_822_656)
    det = paper_cost("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16")
    assert (det["params"], det["macs"]) == (148_774_891, 453_253_935_360)
    assert det["breakdown"]["merge_and_head"] == 2_909_194_752


HETERO = {c["name"]: c for c in json.loads(data_path("paper", "configs_hetero.json").read_text())["configs"]}


def _script_measurement(c):
    return c.get("measured_get_flops_det") or c["measured_get_flops_llava"]


def _published_cost(name):
    """(flops_G, params_M, measured) the paper or the official script gives for a preset. The
    ConvNeXt/hybrid and LLaVA rows: the README figure (no #Param), except the two 13B rows
    whose README repeats the 7B figure: the script's measurement there."""
    if name in HETERO:
        m = _script_measurement(HETERO[name])
        readme = HETERO[name]["readme"]["flops_G"]
        return (readme if int(m["flops_G"]) == int(readme) else m["flops_G"]), m["params_M"], m
    paper = paper_configs()[name]
    readme = paper.get("readme") or {}
    measured = paper.get("measured_get_flops") or {}
    return readme.get("flops_G") or measured.get("flops_G"), readme.get("params_M") or measured.get("params_M"), measured


COSTED = [n for n in piip.list_models() if _published_cost(n)[0] is not None]


def test_presets_without_a_published_cost_are_the_known_ones():
    """Only these presets lack a published #FLOPs (the README and the official script give
    none: DINO configs and the LH6B 3-branch detector); every other preset is checked
    against its figure below."""
    assert sorted(set(piip.list_models()) - set(COSTED)) == [
        "dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms",
        "dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms",
        "dino_4scale_internvit_lh6b_1536_1024_512_fpn_2x_coco_bs32_ms",
        "mask_rcnn_internvit_lh6b_1536_1024_512_fpn_1x_coco_bs32_ms",
    ]


@pytest.mark.parametrize("name", COSTED)
def test_every_preset_within_half_a_percent_of_the_paper(name):
    flops, params, measured = _published_cost(name)
    r = paper_cost(name)
    assert abs(r["macs"] / 1e9 / flops - 1) < 0.005
    if params is not None:
        assert abs(r["params"] / 1e6 / params - 1) < 0.005
    if measured.get("flops_G") is not None:
        # The official script prints one decimal: we reproduce it exactly.
        assert round(r["macs"] / 1e9, 1) == measured["flops_G"]


@pytest.mark.parametrize("name", sorted(HETERO))
def test_script_counted_rows_exact(name):
    """ConvNeXt/hybrid detectors and PIIP-LLaVA encoders: parameters, hooks, analytic terms
    and total equal the official scripts' own measurements to the multiply-accumulate."""
    m = _script_measurement(HETERO[name])
    r = paper_cost(name)
    assert (r["params"], r["macs"], r["hooks"]) == (m["params_exact"], m["flops_exact"], m["breakdown"]["hooks"])
    attention = m["breakdown"].get("window_self_attention") or m["breakdown"].get("clip_self_attention") or {}
    assert r["analytic"] == sum(attention.values()) + m["breakdown"]["deformable"]
    for branch, v in attention.items():
        assert r["breakdown"][branch] >= v


def test_counting_form_differs_from_the_real_backbone():
    name = "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16"
    ccfg = counting_config(piip.get_config(name))
    assert ccfg.output == "classification_merged"
    assert ccfg.branches[0].pos_embed_grid == (42, 42)
    real = full_cost(name)
    assert real["breakdown"]["merge"] > 100e9  # the 3x3 conv merge the paper's column leaves out


def test_flops_script_json(tmp_path):
    out = tmp_path / "rows.json"
    md = tmp_path / "t.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "flops.py"), "--config", "tsb_368", "--config", "tsb_1568_1120",
                          "--json", str(out), "--markdown", str(md), "--quiet"], capture_output=True, text=True, check=True)
    rows = json.loads(out.read_text())
    assert {r["config"] for r in rows} == {"piip_3branch_tsb_368-192-128_cls_token_deit1",
                                           "mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16"}
    for r in rows:
        for key, typ in (("config", str), ("params_m", float), ("flops_g_paper", float), ("paper_params_m", float),
                         ("paper_flops_g", float), ("flops_g_full", float), ("breakdown", dict)):
            assert isinstance(r[key], typ), key
        assert set(r["breakdown"]) >= {"branch1", "branch2", "branch3", "interactions", "merge"}
        assert abs(sum(r["breakdown"].values()) - r["flops_g_full"]) < 0.1
        assert all(r["breakdown"][f"branch{i}"] > 0 for i in (1, 2, 3)) and r["breakdown"]["interactions"] > 0
    assert "453.3" in res.stdout and "| config |" in md.read_text()
    # Both parameter counts, each labelled: the paper's (the counted classification form) and
    # the model create_model builds (TSB: 148.8M against 175.0M).
    tsb = next(r for r in rows if r["config"].startswith("mask_rcnn"))
    assert (tsb["params_m"], tsb["params_m_built"]) == (148.8, 175.0)
    head = next(line for line in md.read_text().splitlines() if line.startswith("| config |"))
    assert "#Param paper count (M)" in head and "#Param built (M)" in head and "| 175.0 |" in md.read_text()
    # The published results travel with the rows and into the tables.
    by_name = {r["config"]: r for r in rows}
    assert by_name["mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16"]["metrics"] == {"box_ap": 46.5, "mask_ap": 41.3}
    assert by_name["piip_3branch_tsb_368-192-128_cls_token_deit1"]["metrics"] == {"top1": 82.1}
    assert all("7a8eceb" in r["metrics_source"] for r in rows)
    assert "box 46.5 / mask 41.3" in md.read_text() and "top-1 82.1" in res.stdout


def test_every_published_result_with_a_preset_reaches_the_rows():
    """Every released configuration in results.json that has a preset gets its metrics; two
    LLaVA names share another config file (get_config resolves them); the BEiT and
    Uni-Perceiver branches have no preset (no such branch family here)."""
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "flops.py")
    flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flops)
    results = flops.published_results()
    with_preset = [n for n in results if n in piip.list_models()]
    assert len(with_preset) == 42
    missing = sorted(set(results) - set(piip.list_models()))
    aliases = ["piip-llava-plus_convnext-l_clip-l_1024-336_7B", "piip-llava_clip-bl_512-448_13B"]
    assert all(n in aliases or n == "mask_rcnn_beit_sbl_1568_1120_672_fpn_1x_coco_bs16" or "uniperceiver" in n
               for n in missing), missing
    assert piip.get_config(aliases[1]).projector_dim == 5120 and piip.get_config(aliases[0]).name == aliases[0]
    assert results["dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms"]["metrics"] == {"box_ap": 60.0}
    assert flops.format_metrics({"box_ap": 60.0}) == "box 60" and flops.format_metrics(None) == "—"


def test_flops_script_plot(tmp_path):
    """--plot DIR draws the accuracy figures of the tasks present and #Param against #FLOPs."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "flops.py"), "--config", "tsb_1568_1120", "--config", "vit_b",
                          "--config", "tsb_368", "--plot", str(tmp_path / "fig"), "--quiet"], capture_output=True, text=True, check=True)
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == ["accuracy_classification.png", "accuracy_detection.png", "params_vs_flops.png"], res.stderr
    for p in (tmp_path / "fig").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_series():
    """Series of the figures: families by name, DINO left out, the ConvNeXt detectors and LLaVA
    encoders as rows of their own series, the Table VIII classification baselines."""
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "flops.py")
    flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flops)
    assert flops.family("mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16", 4) == "PIIP-TSBL"
    assert flops.family("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", 3) == "PIIP-TSB"
    assert flops.family("mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms", 2) == "PIIP-H6B"
    assert flops.family("mask_rcnn_convnext-t_vit-s_vit-b_1024_672_448_regular-fpn", 3) == "PIIP with ConvNeXt branches"
    assert flops.family("mask_rcnn_convnext-base_1024_regular-fpn", 1) == "single-branch baselines"
    assert flops.family("piip-llava_convnext-b_clip-l_1024-336_7B", 2) == "PIIP-LLaVA encoders"
    rows = [{"config": "dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms", "task": "detection", "resolutions": "1024/768",
             "flops_g_paper": 1.0, "params_m": 1.0, "metrics": {"box_ap": 60.0}},
            {"config": "mask_rcnn_convnext-t_vit-s_vit-b_1024_672_448_regular-fpn", "task": "detection",
             "resolutions": "1024/672/448", "flops_g_paper": 373.3, "params_m": 190.1, "metrics": {"box_ap": 47.1}}]
    pts = flops.figure_points(rows, flops.published_results())
    assert not any(p["config"].startswith("dino_") for p in pts)
    hybrids = [p for p in pts if p["family"] == "PIIP with ConvNeXt branches"]
    assert [(p["flops_g"], p["metrics"]["box_ap"]) for p in hybrids] == [(373.3, 47.1)]
    assert {p["config"] for p in pts if p["task"] == "classification"} == {"deit_b_224", "vit_l_224_augreg"}


def test_flops_script_rejects_unknown_config():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "flops.py"), "--config", "no_such_model", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "no preset matches" in res.stderr
