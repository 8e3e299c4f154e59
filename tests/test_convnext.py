"""ConvNeXt (piip.models.convnext): the official baseline fixture, both official key layouts,
and the full-size key lists."""
import json
import re

import pytest
import torch
from helpers import data_path, official_fixture

from piip.models.convnext import (CONVNEXT_SIZES, ConvNeXt, convnext_from_official, convnext_official_key,
                                  load_convnext_state_dict)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_official_baseline_fixture():
    """ConvNextHFWrapper(single_branch=True): the four raw stage outputs and the stem output."""
    fx = official_fixture("det_convnext_baseline_tiny.pt")
    model = convnext_from_official(fx["state_dict"]).eval()
    assert model.depths == (2, 2, 3, 2) and model.dims == (16, 32, 48, 64)
    img = fx["inputs"]["image"]
    with torch.no_grad():
        outs = model(img)
        stem = model.stem(img)
    assert len(outs) == 4
    for got, want in zip(outs, fx["outputs"]["features"]):
        assert got.shape == want.shape and rel_err(got, want) < 1e-4
    assert rel_err(stem, fx["outputs"]["embeddings"]) < 1e-4


def test_fixture_comparison_can_fail():
    """The check has teeth: the block norm's eps or a missing layer scale move the outputs."""
    fx = official_fixture("det_convnext_baseline_tiny.pt")
    model = convnext_from_official(fx["state_dict"]).eval()
    with torch.no_grad():
        model.stages[1].blocks[0].gamma.mul_(0.0)
        got = model(fx["inputs"]["image"])
    assert rel_err(got[3], fx["outputs"]["features"][3]) > 1e-3


def _key_list(stem, prefix):
    keys = {}
    for line in data_path("official", f"keys/{stem}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            k, shape = line.split("\t")
            if k.startswith(prefix):
                keys[k[len(prefix):]] = tuple(json.loads(shape))
    return keys


def _official_keys(model, layout):
    return {convnext_official_key(k, layout): tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_hf_key_list():
    """The ConvNeXt-B detection baseline: 342 tensors, 87,566,464 parameters, HF names."""
    with torch.device("meta"):
        model = ConvNeXt.from_size("B")
    want = _key_list("det_convnext-base_baseline_1024", "convnext_model.")
    assert _official_keys(model, "hf") == want
    assert sum(p.numel() for p in model.parameters()) == 87_566_464


def test_full_size_timm_key_list():
    """The timm ConvNeXt-B of PIIP-LLaVA (layer scale stored as blocks.J.weight)."""
    want = _key_list("llava_convnext-b_1024-336_7B", "model.vision_tower.vision_tower.branch2.convnext_model.")
    want = {re.sub(r"^(stages\.\d+\.blocks\.\d+)\.weight$", r"\1.gamma", k): v for k, v in want.items()}
    with torch.device("meta"):
        model = ConvNeXt.from_size("B")
    assert _official_keys(model, "timm") == want


@pytest.mark.parametrize("layout", ["hf", "timm"])
def test_round_trip_both_layouts(layout):
    torch.manual_seed(0)
    a = ConvNeXt((1, 1, 2, 1), (8, 16, 24, 32)).eval()
    sd = {"backbone." + convnext_official_key(k, layout): v for k, v in a.state_dict().items()}
    if layout == "timm":  # the released LLaVA spelling of the layer scale
        sd = {re.sub(r"\.gamma$", ".weight", k): v for k, v in sd.items()}
    b = convnext_from_official(sd, prefix="backbone.").eval()
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for x, y in zip(a(img), b(img)):
            assert torch.equal(x, y)
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    bad["backbone.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 unused, 1 missing"):
        load_convnext_state_dict(ConvNeXt((1, 1, 2, 1), (8, 16, 24, 32)), bad, layout, prefix="backbone.")


def test_sizes_gradients_and_bad_input():
    assert {s: sum(d) for s, (d, _) in CONVNEXT_SIZES.items()} == {"T": 18, "S": 36, "B": 36, "L": 36}
    model = ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32))
    outs = model(torch.randn(1, 3, 72, 100))
    assert [tuple(o.shape[-2:]) for o in outs] == [(18, 25), (9, 12), (4, 6), (2, 3)]  # odd sides floor
    sum(o.square().mean() for o in outs).backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == ["norm.bias", "norm.weight"]  # the final norm the official code never applies
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="below 32"):
        model(torch.randn(1, 3, 16, 64))
    assert [n for n, _ in model.layers()][:3] == ["stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0"]


def test_equals_transformers_convnext():
    """Bit for bit the stage outputs of transformers' ConvNextModel with the same weights
    (a test-only reference; the package does not depend on transformers)."""
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    hf = ConvNextModel(ConvNextConfig(depths=[1, 2, 1, 1], hidden_sizes=[8, 16, 24, 32], layer_scale_init_value=0.5)).eval()
    ours = convnext_from_official({"convnext_model." + k: v for k, v in hf.state_dict().items()}).eval()
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = hf(img, output_hidden_states=True).hidden_states[1:]
        for got, want in zip(ours(img), ref):
            assert torch.equal(got, want)
