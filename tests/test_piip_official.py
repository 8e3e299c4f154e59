"""The model package against the official implementation: fixtures and full-size key lists."""
import json
from dataclasses import replace

import pytest
import torch
from helpers import data_path, official_fixture, paper_configs, tiny_config

import piip
from piip.official import load_official_state_dict, official_config, to_official_state_dict

FIXTURES = ["det_2branch_tiny.pt", "det_3branch_tiny.pt", "det_4branch_tiny.pt", "det_3branch_speedup_tiny.pt",
            "cls_3branch_tiny.pt", "cls_3branch_augreg_tiny.pt"]
KEY_LISTS = ["cls_sbl_320-160-96", "cls_sbl_384-192-128", "cls_tsb_368-192-128", "det_augreg_sbl_1568-1120-672",
             "det_augreg_sbl_1568-1120-672_speedup", "det_h6b_1024-512", "det_h6b_1024-512_speedup",
             "det_sbl_1568-1120-672", "det_tsb_1568-1120-672", "det_tsbl_1792-1568-1120-448"]


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_reproduced(name):
    fx = official_fixture(name)
    model = piip.from_official(fx["config"], fx["state_dict"]).eval()
    img = fx["inputs"]["image"]
    out = fx["outputs"]
    with torch.no_grad():
        for got, want in zip(model.branch_images(img)[:-1], out["resized_images"][:-1]):
            assert got.shape == want.shape and rel_err(got, want) < 1e-6
        feats = model.forward_features(img)
        result = model.forward_head(feats)
    last = out["stage_tokens"][-1]
    for b, (got, want) in enumerate(zip(feats["tokens"], last)):
        assert rel_err(got, want) < 1e-4, f"branch {b + 1} tokens after the last stage"
    if isinstance(result, list):
        assert len(result) == len(out["features"])
        for got, want in zip(result, out["features"]):
            assert got.shape == want.shape and rel_err(got, want) < 1e-4
    else:
        assert result.shape == out["logits"].shape and rel_err(result, out["logits"]) < 1e-4


def test_fixture_semantics_matter():
    """The comparison can fail: the paper-form options (padding after qkv), kept with
    official_form=False, move the windowed fixture's outputs far beyond the tolerance."""
    fx = official_fixture("det_3branch_tiny.pt")
    cfg = piip.official.config_from_neutral(fx["config"])
    cfg = cfg.replace(branches=tuple(replace(b, pad_before_qkv=False) for b in cfg.branches))
    model = piip.from_official(cfg, fx["state_dict"], official_form=False).eval()
    with torch.no_grad():
        got = model(fx["inputs"]["image"])
    assert rel_err(got[2], fx["outputs"]["features"][2]) > 1e-2


def _key_list(stem):
    path = data_path("official", f"keys/{stem}.txt")
    header, keys = [], {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            header.append(line)
        elif line.strip():
            k, shape = line.split("\t")
            keys[k] = tuple(json.loads(shape))
    return header, keys


@pytest.mark.parametrize("stem", KEY_LISTS)
def test_full_size_keys_match_official(stem):
    header, keys = _key_list(stem)
    config_path = header[0].split(":", 1)[1].strip()
    by_path = {c["config_path"]: n for n, c in paper_configs().items()}
    name = by_path[config_path]
    with torch.device("meta"):
        model = piip.PIIP(official_config(piip.get_config(name)))
    ours = {k: tuple(v.shape) for k, v in to_official_state_dict(model).items()}
    assert set(ours) == set(keys), (sorted(set(ours) - set(keys))[:5], sorted(set(keys) - set(ours))[:5])
    assert ours == keys
    total = int(header[2].split(" tensors, ")[1].split(" parameters")[0])
    assert sum(p.numel() for p in model.parameters()) == total


def test_bad_state_dict_lists_every_problem():
    model = piip.PIIP(tiny_config(3))
    sd = to_official_state_dict(model)
    sd.pop("branch2.blocks.0.attn.qkv.weight")
    sd["branch1.blocks.0.gamma_3"] = torch.zeros(3)
    sd["w2"] = torch.zeros(2)
    with pytest.raises(ValueError) as e:
        load_official_state_dict(model, sd)
    msg = str(e.value)
    assert "branch2.blocks.0.attn.qkv.weight" in msg and "branch1.blocks.0.gamma_3" in msg and "w2" in msg


def test_load_official_checkpoint_unwraps_mmdet_files(tmp_path):
    torch.manual_seed(0)
    src = piip.PIIP(tiny_config(3)).eval()
    sd = {"backbone." + k: v for k, v in to_official_state_dict(src).items()}
    sd["neck.lateral.weight"] = torch.zeros(1)
    torch.save({"meta": {}, "state_dict": sd}, tmp_path / "ckpt.pth")
    dst = piip.load_official_checkpoint(piip.PIIP(tiny_config(3)), str(tmp_path / "ckpt.pth")).eval()
    img = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(src(img), dst(img)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_official_branch4_is_built_from_branch3():
    cfg = official_config(piip.get_config("mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16"))
    b3, b4 = cfg.branches[2], cfg.branches[3]
    assert b4.embed_dim == b3.embed_dim == 384 and b4.image_size == 1792
    paper = piip.get_config("mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16")
    assert paper.branches[3].embed_dim == 192


def test_load_pretrained_branch(tmp_path):
    model = piip.PIIP(tiny_config(3))
    C = 48
    ckpt = {"cls_token": torch.randn(1, 1, C), "pos_embed": torch.randn(1, 1 + 16, C),
            "patch_embed.proj.weight": torch.randn(C, 3, 14, 14), "patch_embed.proj.bias": torch.randn(C),
            "blocks.0.gamma_1": torch.randn(C), "blocks.0.attn.qkv.weight": torch.randn(3 * C, C),
            "head.weight": torch.randn(1000, C)}
    torch.save({"model": ckpt}, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="allow_partial=True"):
        piip.load_pretrained_branch(model, 1, str(tmp_path / "vit.pth"), verbose=False)
    report = piip.load_pretrained_branch(model, 1, str(tmp_path / "vit.pth"), verbose=False, allow_partial=True)
    b = model.branches[1]
    assert report["ignored"] == ["cls_token", "head.weight"] and report["unexpected"] == []
    assert "blocks.1.attn.qkv.weight" in report["missing"]
    assert report["resized"] == {"pos_embed": [(1, 17, C), (1, 9, C)], "patch_embed.weight": [(C, 3, 14, 14), (C, 3, 16, 16)]}
    torch.testing.assert_close(b.blocks[0].ls1.detach(), ckpt["blocks.0.gamma_1"])
    torch.testing.assert_close(b.blocks[0].attn.qkv.weight.detach(), ckpt["blocks.0.attn.qkv.weight"])
    assert b.pos_embed.shape == (1, 9, C) and b.patch_embed.weight.shape == (C, 3, 16, 16)
