"""Loading weights as a newcomer does: official checkpoints into any model form, wrappers and
the meta device; plain backbone checkpoints into one branch; and the errors on the way."""
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from torch import nn

import piip
from piip.models import presets
from piip.official import load_official_state_dict, official_config, to_official_state_dict


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _clean(cfg):
    """The clean form of a config (padding after qkv), as the presets build it."""
    return cfg.replace(branches=tuple(replace(b, pad_before_qkv=False) for b in cfg.branches))


def _released(cfg, seed=0):
    """An official-form model with non-zero qkv biases and gains, as released weights have."""
    torch.manual_seed(seed)
    model = piip.PIIP(official_config(cfg)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("qkv.bias", "ca_gamma", "cffn_gamma")):
                p.normal_(0, 0.5)
    return model


def _outputs(model, img):
    with torch.no_grad():
        out = model.eval()(img)
    return out if isinstance(out, list) else [out]


def _max_rel(a, b):
    return max(rel_err(x, y) for x, y in zip(a, b))


IMG = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_preset(monkeypatch):
    """A tiny preset in the clean form, registered under a name as create_model builds it."""
    name = "tiny_test_tsb_96_64_48"
    monkeypatch.setitem(presets.PRESETS, name, _clean(tiny_config(3)).replace(name=name))
    return name


# ------------------------------------------------------------------ official weights, any form

@pytest.mark.parametrize("how", ["checkpoint_file", "checkpoint_dict", "state_dict", "from_official_config"])
def test_official_weights_into_the_clean_form_compute_the_official_model(tmp_path, how):
    """Released weights into a model built in the clean form (padding after qkv): the loaders
    switch it to the official form, so it computes what the official model computes."""
    src = _released(tiny_config(3))
    sd = to_official_state_dict(src)
    want = _outputs(src, IMG)
    clean = _clean(tiny_config(3))
    if how == "checkpoint_file":
        torch.save({"state_dict": sd}, tmp_path / "ckpt.pth")
        model = piip.load_official_checkpoint(piip.PIIP(clean), str(tmp_path / "ckpt.pth"))
    elif how == "checkpoint_dict":
        model = piip.load_official_checkpoint(piip.PIIP(clean), {"model": sd})
    elif how == "state_dict":
        model = piip.PIIP(clean)
        load_official_state_dict(model, sd)
    else:
        model = piip.from_official(clean, sd)
    assert all(b.pad_before_qkv for b in model.cfg.branches)
    assert _max_rel(_outputs(model, IMG), want) < 1e-5


def test_official_form_false_keeps_the_clean_form_and_it_differs():
    """The opt-out keeps the model as built; with released-like biases its outputs are far from
    the official model's, which is why the default switches."""
    src = _released(tiny_config(3))
    model = piip.PIIP(_clean(tiny_config(3)))
    load_official_state_dict(model, to_official_state_dict(src), official_form=False)
    assert not any(b.pad_before_qkv for b in model.cfg.branches)
    assert _max_rel(_outputs(model, IMG), _outputs(src, IMG)) > 1e-2


def test_official_classification_form_reads_patch_token_zero():
    cfg = tiny_config(3, "classification")
    src = _released(cfg)
    model = piip.PIIP(cfg)  # head_reads_first_patch=False: the paper's form
    load_official_state_dict(model, to_official_state_dict(src))
    assert model.cfg.head_reads_first_patch
    assert _max_rel(_outputs(model, IMG), _outputs(src, IMG)) < 1e-5


def test_a_form_with_other_parameters_is_refused_clearly():
    """The 4-branch detectors' official branch 4 is built from branch 3's definition: a model of
    the paper's branch 4 cannot hold those weights, and the error says what to build instead."""
    src = _released(tiny_config(4))
    model = piip.PIIP(tiny_config(4))
    with pytest.raises(ValueError, match=r"branch 4 embed_dim.*official_config"):
        load_official_state_dict(model, to_official_state_dict(src))


# ------------------------------------------------------------------ wrappers (issue 27)

class Backbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = piip.PIIP(cfg)


class TaskModel(nn.Module):
    """A head around a backbone wrapper, as a transformers task model holds one."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = nn.Sequential(Backbone(cfg))
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("wrapper", [Backbone, TaskModel])
def test_loaders_accept_a_module_holding_one_piip(tmp_path, wrapper):
    src = _released(tiny_config(3))
    sd = to_official_state_dict(src)
    torch.save({"state_dict": {"backbone." + k: v for k, v in sd.items()}}, tmp_path / "mmdet.pth")
    for load in (lambda w: piip.load_official_checkpoint(w, str(tmp_path / "mmdet.pth")),
                 lambda w: load_official_state_dict(w, sd)):
        torch.manual_seed(5)
        w = wrapper(_clean(tiny_config(3)))
        head = [p.clone() for n, p in w.named_parameters() if n.startswith("head")]
        out = load(w)
        inner = next(m for m in w.modules() if isinstance(m, piip.PIIP))
        assert out is None or out is w
        assert _max_rel(_outputs(inner, IMG), _outputs(src, IMG)) < 1e-5
        assert all(torch.equal(a, b) for a, b in zip(head, [p for n, p in w.named_parameters() if n.startswith("head")]))


def test_pretrained_branch_into_a_wrapper():
    w = TaskModel(tiny_config(3))
    inner = w.backbone[0].model
    sd = _vit_ckpt(inner.branches[0])
    report = piip.load_pretrained_branch(w, 0, sd, verbose=False)
    assert report["missing"] == []
    torch.testing.assert_close(inner.branches[0].blocks[0].attn.qkv.weight.detach(), sd["blocks.0.attn.qkv.weight"])


def test_a_module_with_no_or_two_piip_models_is_refused():
    sd = to_official_state_dict(piip.PIIP(tiny_config(3)))
    with pytest.raises(TypeError, match="no piip.PIIP model"):
        load_official_state_dict(nn.Linear(2, 2), sd)
    two = nn.ModuleDict({"a": piip.PIIP(tiny_config(3)), "b": piip.PIIP(tiny_config(3))})
    with pytest.raises(ValueError, match=r"2 piip.PIIP models \(a, b\)"):
        piip.load_official_checkpoint(two, sd)
    with pytest.raises(TypeError, match="preset name, a PIIPConfig or an nn.Module"):
        piip.load_official_checkpoint(3, sd)
    with pytest.raises(TypeError, match="file path or a state dict"):
        piip.load_official_checkpoint(piip.PIIP(tiny_config(3)), [sd])


def test_from_official_errors_say_what_it_takes(tiny_preset):
    sd = to_official_state_dict(piip.PIIP(tiny_config(3)))
    with pytest.raises(KeyError, match="unknown PIIP preset 'tiny_test_tsb'.*did you mean"):
        piip.from_official("tiny_test_tsb", sd)
    with pytest.raises(ValueError, match="without a 'model' entry; pass a preset name"):
        piip.from_official({"branches": []}, sd)
    with pytest.raises(TypeError, match="config must be a preset name"):
        piip.from_official(None, sd)
    with pytest.raises(TypeError, match="use piip.load_official_checkpoint"):
        piip.from_official(tiny_preset, "ckpt.pth")


# ------------------------------------------------------------------ memory-light loading

def test_meta_model_is_filled_by_loading(tmp_path):
    """A model built on the meta device takes the checkpoint's tensors (assign), in a dtype."""
    src = _released(tiny_config(3))
    torch.save(to_official_state_dict(src), tmp_path / "ckpt.pth")
    with torch.device("meta"):
        model = piip.PIIP(official_config(tiny_config(3)))
    piip.load_official_checkpoint(model, str(tmp_path / "ckpt.pth"))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert _max_rel(_outputs(model, IMG), _outputs(src, IMG)) < 1e-5
    model = piip.load_official_checkpoint(official_config(tiny_config(3)), str(tmp_path / "ckpt.pth"), dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert _max_rel(_outputs(model, IMG.double()), _outputs(src, IMG)) < 1e-5


def test_a_model_left_on_meta_is_an_error_naming_the_parameters():
    """A branch built on the meta device takes a plain checkpoint's tensors; one the checkpoint
    leaves unfilled is an error that names what is still there, not 1,694 warnings."""
    with torch.device("meta"):
        model = piip.PIIP(tiny_config(3))
    sd = _vit_ckpt(model.branches[0])
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].double()
    piip.load_pretrained_branch(model, 0, sd, verbose=False)
    assert not any(p.is_meta for p in model.branches[0].parameters())
    qkv = model.branches[0].blocks[0].attn.qkv.weight
    assert qkv.dtype == torch.float32 and qkv.data_ptr() != sd["blocks.0.attn.qkv.weight"].data_ptr()
    torch.testing.assert_close(qkv.detach(), sd["blocks.0.attn.qkv.weight"].float())
    with torch.device("meta"):
        model = piip.PIIP(tiny_config(3))
    del sd["blocks.1.attn.qkv.weight"]
    with pytest.raises(RuntimeError, match=r"1 parameter\(s\).*still on the meta device.*blocks\.1\.attn\.qkv\.weight"):
        piip.load_pretrained_branch(model, 0, sd, verbose=False, allow_partial=True)


def test_load_by_name_builds_on_meta_and_does_not_copy(tiny_preset, tmp_path):
    """By name: the official form, built on the meta device, filled from a memory-mapped file; a
    dtype and device apply per tensor."""
    src = _released(tiny_config(3))
    torch.save({"model": to_official_state_dict(src)}, tmp_path / "ckpt.pth")
    model = piip.load_official_checkpoint(tiny_preset, str(tmp_path / "ckpt.pth"), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cfg.branches[0].pad_before_qkv
    assert _max_rel(_outputs(model, IMG), _outputs(src, IMG)) < 5e-2
    model = piip.load_official_checkpoint(tiny_preset, to_official_state_dict(src))  # a state dict, by name
    assert _max_rel(_outputs(model, IMG), _outputs(src, IMG)) < 1e-5


def test_a_given_state_dict_is_not_aliased(tiny_preset):
    """from_official / a state dict passed in: the model gets copies, so training it leaves the
    caller's tensors alone."""
    sd = to_official_state_dict(_released(tiny_config(3)))
    before = {k: v.clone() for k, v in sd.items()}
    for model in (piip.from_official(tiny_preset, sd), piip.load_official_checkpoint(tiny_preset, sd)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        assert all(torch.equal(sd[k], before[k]) for k in sd)


_RSS_SCRIPT = r"""
import resource, sys, torch, piip
from piip import BranchConfig, PIIPConfig
cfg = PIIPConfig(branches=(BranchConfig(name="b", embed_dim=1024, depth=8, num_heads=16, image_size=64,
                                        interaction_indexes=()),), output="features")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = piip.load_official_checkpoint(cfg, sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024)
"""


def test_peak_memory_of_a_load_by_config_is_about_one_copy(tmp_path):
    """About 400 MB of weights: building on meta and assigning memory-mapped tensors adds at most
    about one copy to the peak resident memory (building the fp32 model and then loading the file
    in full added two)."""
    from piip import BranchConfig, PIIPConfig

    cfg = PIIPConfig(branches=(BranchConfig(name="b", embed_dim=1024, depth=8, num_heads=16, image_size=64,
                                            interaction_indexes=()),), output="features")
    with torch.device("meta"):
        meta = piip.PIIP(official_config(cfg))
    sd = {k: torch.full(v.shape, 0.01) for k, v in to_official_state_dict(meta).items()}
    size = sum(v.numel() * 4 for v in sd.values())
    torch.save(sd, tmp_path / "big.pth")
    del sd
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big.pth")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    added = int(res.stdout.split()[-1])
    assert added < 1.25 * size, f"peak grew by {added / size:.2f} checkpoint sizes"


# ------------------------------------------------------------------ plain backbone checkpoints

def _vit_ckpt(branch, prefix=""):
    """A timm-named ViT checkpoint for every parameter of a ViT branch, plus a head."""
    sd = {}
    for k, v in branch.state_dict().items():
        k = k.replace("patch_embed.", "patch_embed.proj.")
        k = k.replace(".ls1", ".gamma_1").replace(".ls2", ".gamma_2")
        sd[prefix + k] = torch.randn(v.shape)
    sd[prefix + "head.weight"] = torch.zeros(1000, branch.cfg.embed_dim)
    return sd


def _convnext_model(depths):
    from piip import BranchConfig, PIIPConfig
    from piip.models.config import convnext_stage_groups

    b = BranchConfig.convnext("backbone", depths, (32, 32, 32, 32), 64, convnext_stage_groups(depths))
    return piip.PIIP(PIIPConfig(branches=(b,), output="stages", out_indexes=(0, 1, 2, 3)))


def _timm_convnext(model):
    from piip.models.convnext import convnext_official_key

    b = model.branches[0]
    return {convnext_official_key(k[len("convnext."):], "timm"): torch.randn_like(v) for k, v in b.state_dict().items()}


def test_full_vit_checkpoint_loads_and_reports():
    model = piip.PIIP(tiny_config(3))
    sd = _vit_ckpt(model.branches[1])
    sd["pos_embed"] = torch.randn(1, 1 + 16, 48)  # a 4x4 grid with a class slot: resized to 3x3
    sd["cls_token"] = torch.randn(1, 1, 48)
    report = piip.load_pretrained_branch(model, 1, sd, verbose=False)
    assert report["missing"] == [] and report["unexpected"] == []
    assert set(report["ignored"]) == {"head.weight", "cls_token"}
    assert report["resized"] == {"pos_embed": [(1, 17, 48), (1, 9, 48)]}
    assert len(report["loaded"]) == len(model.branches[1].state_dict())
    torch.testing.assert_close(model.branches[1].blocks[1].ls2.detach(), sd["blocks.1.gamma_2"])


def test_ddp_prefix_is_stripped():
    model = piip.PIIP(tiny_config(3))
    sd = _vit_ckpt(model.branches[0], prefix="module.")
    report = piip.load_pretrained_branch(model, 0, {"model": sd}, verbose=False)
    assert report["missing"] == [] and report["unexpected"] == [] and report["ignored"] == ["head.weight"]
    torch.testing.assert_close(model.branches[0].blocks[0].attn.qkv.weight.detach(), sd["module.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("case", ["empty", "convnext_into_vit", "partial_vit", "convnext_s_into_t", "vit_into_convnext"])
def test_partial_loads_are_refused(case):
    """Each of these used to "load" and leave the branch (partly) random."""
    model = piip.PIIP(tiny_config(3))
    index = 0
    if case == "empty":
        sd, match = {}, "empty"
    elif case == "convnext_into_vit":
        sd, match = _timm_convnext(_convnext_model((1, 1, 3, 1))), "missing"
    elif case == "partial_vit":
        sd = _vit_ckpt(model.branches[0])
        del sd["blocks.1.attn.qkv.weight"]
        match = r"(?s)1 missing.*blocks\.1\.attn\.qkv\.weight"
    elif case == "convnext_s_into_t":
        model, sd, match = _convnext_model((1, 1, 3, 1)), _timm_convnext(_convnext_model((1, 1, 5, 1))), r"(?s)unexpected.*stages\.2\.blocks\.3"
    else:
        model, sd, match = _convnext_model((1, 1, 3, 1)), _vit_ckpt(piip.PIIP(tiny_config(3)).branches[0]), "no 'stem.0.weight'"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as e:
        piip.load_pretrained_branch(model, index, sd, verbose=False)
    if case not in ("vit_into_convnext", "empty"):
        assert "allow_partial=True" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "nothing is loaded on refusal"


def test_allow_partial_loads_and_reports_under_verbose_false(caplog):
    model = piip.PIIP(tiny_config(3))
    sd = _vit_ckpt(model.branches[0])
    del sd["blocks.1.attn.qkv.weight"]
    sd["blocks.7.attn.qkv.weight"] = torch.zeros(1)
    with caplog.at_level(logging.INFO, logger="piip"):
        report = piip.load_pretrained_branch(model, 0, sd, verbose=False, allow_partial=True)
    assert report["missing"] == ["blocks.1.attn.qkv.weight"] and report["unexpected"] == ["blocks.7.attn.qkv.weight"]
    assert "blocks.0.attn.qkv.weight" in report["loaded"]
    assert any("branch 1" in r.getMessage() and "1 missing" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(model.branches[0].blocks[0].attn.qkv.weight.detach(), sd["blocks.0.attn.qkv.weight"])
