"""A whole official mmseg UperNet checkpoint in transformers' UperNet (piip.hf.mmseg).

The reference is a plain-PyTorch mmseg ``EncoderDecoder`` written here from mmseg's published
structure (mmseg 0.x ``UPerHead``, ``PPM``, ``FCNHead``, ``BaseDecodeHead.cls_seg`` and mmcv's
``ConvModule``: conv without bias, BN, ReLU), with mmseg's module names, so that its state
dict is a checkpoint in the official key layout. The backbone is the official tiny fixture.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import official_fixture
from torch import nn

import piip
from piip.hf.mmseg import load_mmseg_upernet, upernet_from_mmseg, upernet_head_key

CLASSES, CHANNELS, AUX_CHANNELS = 5, 16, 8


class ConvModule(nn.Module):
    def __init__(self, cin, cout, k, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class UPerHead(nn.Module):
    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1))
                                         for s in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs):
        x = inputs[-1]
        psp = [x] + [F.interpolate(m(x), size=x.shape[2:], mode="bilinear", align_corners=False) for m in self.psp_modules]
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear",
                                                              align_corners=False)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
        outs = [outs[0]] + [F.interpolate(o, size=outs[0].shape[2:], mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))


class FCNHead(nn.Module):
    def __init__(self, in_channels, channels, num_classes, in_index=2):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs):
        return self.conv_seg(self.dropout(self.convs(inputs[self.in_index])))


class EncoderDecoder(nn.Module):
    def __init__(self, backbone, width):
        super().__init__()
        self.backbone = backbone
        self.decode_head = UPerHead([width] * 4, CHANNELS, CLASSES)
        self.auxiliary_head = FCNHead(width, AUX_CHANNELS, CLASSES)

    def forward(self, img):
        feats = self.backbone(img)
        up = lambda t: F.interpolate(t, size=img.shape[2:], mode="bilinear", align_corners=False)  # noqa: E731
        return up(self.decode_head(feats)), up(self.auxiliary_head(feats))


@pytest.fixture(scope="module")
def official():
    """(neutral config, image, the mmseg model, its checkpoint in the official key layout)."""
    fx = official_fixture("det_2branch_tiny.pt")
    torch.manual_seed(0)
    mm = EncoderDecoder(piip.from_official(fx["config"], fx["state_dict"]), width=32)
    with torch.no_grad():  # BN statistics away from their defaults, so a wrong map shows
        for m in mm.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
                m.num_batches_tracked.fill_(7)
    heads = {k: v for k, v in mm.state_dict().items() if not k.startswith("backbone.")}
    ckpt = {"meta": {"CLASSES": list(range(CLASSES))},
            "state_dict": {**{f"backbone.{k}": v for k, v in fx["state_dict"].items()}, **heads}}
    return fx["config"], fx["inputs"]["image"], mm, ckpt


def _upernet(config, ckpt, tmp_path):
    path = tmp_path / "upernet_piip.pth"
    torch.save(ckpt, path)
    return upernet_from_mmseg(config, str(path), hidden_size=CHANNELS, auxiliary_channels=AUX_CHANNELS, num_labels=CLASSES)


def test_key_map():
    assert upernet_head_key("decode_head.conv_seg.weight") == "decode_head.classifier.weight"
    assert upernet_head_key("auxiliary_head.conv_seg.bias") == "auxiliary_head.classifier.bias"
    assert upernet_head_key("decode_head.psp_modules.3.1.bn.running_var") == "decode_head.psp_modules.3.1.batch_norm.running_var"
    assert upernet_head_key("decode_head.lateral_convs.0.conv.weight") == "decode_head.lateral_convs.0.conv.weight"
    assert upernet_head_key("auxiliary_head.convs.0.bn.num_batches_tracked") == "auxiliary_head.convs.0.batch_norm.num_batches_tracked"
    with pytest.raises(KeyError, match="not an mmseg UperNet head key"):
        upernet_head_key("backbone.w1")


def test_whole_checkpoint_same_computation_float64(official, tmp_path):
    config, img, mm, ckpt = official
    model = _upernet(config, ckpt, tmp_path)
    assert len(model.state_dict()) == len(mm.state_dict())  # mm's backbone is our PIIP: one tensor per tensor
    model, mm = model.double().eval(), mm.double().eval()
    x = img.double().repeat(2, 1, 1, 1)
    labels = torch.randint(0, CLASSES, (2, *x.shape[2:]))
    labels[:, :5] = 255  # ignored, as mmseg's reduce_zero_label leaves ADE20K's "other"
    with torch.no_grad():
        want, want_aux = mm(x)
        out = model(pixel_values=x, labels=labels)
        feats = model.backbone(x).feature_maps
        got_aux = F.interpolate(model.auxiliary_head(feats), size=x.shape[2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.logits, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_aux, want_aux, rtol=1e-10, atol=1e-10)
    # mmseg's losses: CrossEntropy(decode) + 0.4 CrossEntropy(auxiliary), label 255 ignored.
    want_loss = F.cross_entropy(want, labels, ignore_index=255) + 0.4 * F.cross_entropy(want_aux, labels, ignore_index=255)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-10, atol=1e-10)


def test_comparison_has_teeth(official, tmp_path):
    """A checkpoint whose BN statistics were not carried over gives different logits."""
    config, img, mm, ckpt = official
    model = _upernet(config, ckpt, tmp_path).double().eval()
    with torch.no_grad():
        model.decode_head.fpn_bottleneck.batch_norm.reset_running_stats()
        got = model(pixel_values=img.double()).logits
        want, _ = mm.double().eval()(img.double())
    assert (got - want).abs().max() > 1e-3


def test_every_key_checked(official, tmp_path):
    config, _, _, ckpt = official
    extra = {**ckpt["state_dict"], "decode_head.conv_extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unused checkpoint keys: decode_head.conv_extra.weight"):
        _upernet(config, {"state_dict": extra}, tmp_path)
    missing = {k: v for k, v in ckpt["state_dict"].items() if k != "auxiliary_head.convs.0.bn.running_mean"}
    with pytest.raises(ValueError, match=r"missing from checkpoint: auxiliary_head.convs.0.batch_norm.running_mean"):
        _upernet(config, {"state_dict": missing}, tmp_path)
    no_backbone_key = {k: v for k, v in ckpt["state_dict"].items() if k != "backbone.w1"}
    with pytest.raises(ValueError, match=r"missing from checkpoint: w1"):
        _upernet(config, {"state_dict": no_backbone_key}, tmp_path)
    with pytest.raises(ValueError, match="shape mismatches"):
        _upernet(config, {"state_dict": {**ckpt["state_dict"], "decode_head.conv_seg.bias": torch.zeros(3)}}, tmp_path)


def test_rejects_a_task_model_without_a_piip_backbone():
    other = nn.Module()
    other.backbone = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="with a PIIPBackbone, got Module with backbone Linear"):
        load_mmseg_upernet(other, {"x": torch.zeros(1)})
