"""CLIP's vision transformer (piip.models.clip) against transformers and the official key lists."""
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import data_path

from piip.models.clip import CLIPVisionTransformer

PREFIX = "model.vision_tower.vision_tower.{}.clip_model."


def _key_list(branch):
    prefix = PREFIX.format(branch)
    keys = {}
    for line in data_path("official", "keys/llava_clip-bl_512-448_7B.txt").read_text().splitlines():
        if line.startswith(prefix):
            k, shape = line.split("\t")
            keys[k[len(prefix):]] = tuple(json.loads(shape))
    return keys


@pytest.mark.parametrize("branch,args", [("branch1", (1024, 24, 16, 16, 336)), ("branch2", (768, 12, 12, 16, 224))])
def test_full_size_key_lists(branch, args):
    """CLIP-L (patch 16, 336) and CLIP-B/16 (224) of PIIP-LLaVA CLIP-BL: names and shapes."""
    with torch.device("meta"):
        model = CLIPVisionTransformer(*args)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _key_list(branch)


def test_equals_transformers_clip_vision_model():
    """Bit for bit the last hidden state of transformers' CLIPVisionModel with the same
    weights (a test-only reference)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, image_size=48, patch_size=8)).eval()
    sd = hf.state_dict()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    ours = CLIPVisionTransformer.from_state_dict(sd, prefix=prefix, heads=4).eval()
    img = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(ours(img), hf(pixel_values=img, output_hidden_states=True).hidden_states[-1])


def test_position_table_resized_in_fp32_with_the_class_slot_kept():
    torch.manual_seed(0)
    model = CLIPVisionTransformer(16, 1, 2, patch=8, image_size=32)  # stored grid 4x4
    table = model.embeddings.position_embedding.weight.detach()
    got = model.embeddings.position_table((3, 5)).detach()
    want = F.interpolate(table[1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2), size=(3, 5), mode="bicubic",
                         align_corners=False).flatten(2).transpose(1, 2)[0]
    assert got.shape == (16, 16) and torch.equal(got[0], table[0]) and torch.equal(got[1:], want)
    tokens, hw = model.embed(torch.randn(1, 3, 24, 40))
    assert hw == (3, 5) and tokens.shape == (1, 16, 16)


def test_gradients_and_bad_input():
    model = CLIPVisionTransformer(16, 2, 2, patch=8, image_size=32)
    model(torch.randn(2, 3, 32, 48)).square().mean().backward()
    assert sorted(n for n, p in model.named_parameters() if p.grad is None) == ["post_layernorm.bias", "post_layernorm.weight"]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(1, 1, 32, 32))
