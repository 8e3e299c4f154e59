"""piip_kernels.hf: our multi-scale deformable attention inside transformers' detectors.

Every deformable detector family the installed transformers ships is built from a tiny
random config (no downloads), in float64, with its sampling offsets moved off pixel
centres (a fresh model samples exactly on them, where the location gradient is one-sided
by convention). With our kernel, its outputs, the output of every deformable attention
block and every parameter gradient must equal transformers' default path, in train and
eval mode and after switching back, while our op runs and grid_sample does not.
transformers, and the `kernels` library it brings, are test-only dependencies.
"""
import contextlib
import copy
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is these tests' reference (requirements-dev.txt)")

import piip_kernels.hf as hf  # noqa: E402
from piip_kernels import _swap  # noqa: E402
from piip_kernels.hf.install import LAYER_NAME  # noqa: E402

from helpers import assert_derived_close  # noqa: E402
from integration_helpers import OUR_OP, CountOps, assert_runs, assert_same, move_offsets_off_centres  # noqa: E402
from integration_helpers import one_thread  # noqa: E402,F401  (an autouse fixture: small models run on one thread)

SIDE = 64  # input images are SIDE x SIDE


def kernels_usable() -> bool:
    from transformers.utils.import_utils import is_kernels_available

    return is_kernels_available()


# ---------------------------------------------------------------------------------------------
# Tiny configs, one per family (no downloads; no timm, no pretrained backbone)

def _classes(*names):
    """transformers' classes by name; a family this transformers does not ship is skipped
    with the reason shown."""
    missing = [n for n in names if not hasattr(transformers, n)]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} ships no {', '.join(missing)}")
    return [getattr(transformers, n) for n in names]


def _resnet(out_indices=(2, 3, 4), widths=(8, 16, 16, 16)):
    (Config,) = _classes("RTDetrResNetConfig")
    return Config(embedding_size=8, hidden_sizes=list(widths), depths=[1, 1, 1, 1], layer_type="basic", out_indices=list(out_indices))


def _swin(out_indices=(2, 3, 4)):
    (Config,) = _classes("SwinConfig")
    return Config(image_size=SIDE, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                  out_indices=list(out_indices), drop_path_rate=0.0)


def _bert():
    (Config,) = _classes("BertConfig")
    return Config(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# RT-DETR-style detectors: hybrid encoder, deformable decoder (one layer, two heads).
_RTDETR = dict(encoder_hidden_dim=16, encoder_in_channels=[16, 16, 16], encoder_ffn_dim=16, encoder_attention_heads=2, d_model=16,
               num_queries=6, decoder_in_channels=[16, 16, 16], decoder_ffn_dim=16, decoder_layers=1, decoder_attention_heads=2,
               decoder_n_points=2, tie_word_embeddings=False)
# DINO-style detectors with a text tower.
_DINO = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=2,
             decoder_attention_heads=2, num_queries=6, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, max_text_len=8,
             dropout=0.0, fusion_droppath=0.0, tie_word_embeddings=False)


def _text_ids():
    ids = torch.tensor([[1, 7, 9, 3, 2]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def deformable_detr():
    Config, Model, ResNet = _classes("DeformableDetrConfig", "DeformableDetrForObjectDetection", "ResNetConfig")
    backbone = ResNet(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                      out_features=["stage2", "stage3", "stage4"])
    return Model(Config(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
                        num_queries=6, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, dropout=0.0,
                        tie_word_embeddings=False)), {}


def rt_detr():
    Config, Model = _classes("RTDetrConfig", "RTDetrForObjectDetection")
    return Model(Config(backbone_config=_resnet(), **_RTDETR)), {}


def rt_detr_v2(method="default"):
    Config, Model = _classes("RTDetrV2Config", "RTDetrV2ForObjectDetection")
    return Model(Config(backbone_config=_resnet(), decoder_method=method, **_RTDETR)), {}


def d_fine(points=(2, 3, 1), method="default"):
    Config, Model = _classes("DFineConfig", "DFineForObjectDetection")
    return Model(Config(backbone_config=_resnet(), decoder_method=method, **{**_RTDETR, "decoder_n_points": list(points)})), {}


def deimv2(points=(2, 3, 1), method="default"):
    Config, Model = _classes("Deimv2Config", "Deimv2ForObjectDetection")
    return Model(Config(backbone_config=_resnet(), decoder_method=method, **{**_RTDETR, "decoder_n_points": list(points)})), {}


def grounding_dino():
    Config, Model = _classes("GroundingDinoConfig", "GroundingDinoForObjectDetection")
    return Model(Config(backbone_config=_swin(), text_config=_bert(), **_DINO)), _text_ids()


def mm_grounding_dino():
    Config, Model = _classes("MMGroundingDinoConfig", "MMGroundingDinoForObjectDetection")
    return Model(Config(backbone_config=_swin(), text_config=_bert(), **_DINO)), _text_ids()


def omdet_turbo():
    Config, Model = _classes("OmDetTurboConfig", "OmDetTurboForObjectDetection")
    # The text width must equal class_embed_dim, which must differ from the decoder width
    # (transformers builds the task projection only then, and uses it always).
    text = {"model_type": "clip_text_model", "vocab_size": 40, "hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "max_position_embeddings": 8, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = Config(text_config=text, backbone_config=_swin(), use_timm_backbone=False, apply_layernorm_after_vision_backbone=False,
                    image_size=SIDE, encoder_in_channels=[16, 32, 64], num_queries=6, encoder_layers=1, encoder_projection_indices=[2],
                    encoder_attention_heads=2, decoder_num_heads=2, decoder_num_layers=1, decoder_num_points=2, num_feature_levels=3,
                    encoder_dim_feedforward=16, task_encoder_hidden_dim=16, decoder_dim_feedforward=16, class_embed_dim=24,
                    text_projection_in_dim=24, text_projection_out_dim=24, encoder_hidden_dim=16, decoder_hidden_dim=16,
                    vision_features_channels=[16, 16, 16])
    g = torch.Generator().manual_seed(3)
    classes, length = 3, 4
    inputs = {"classes_input_ids": torch.randint(2, 40, (classes, length), generator=g),
              "classes_attention_mask": torch.ones(classes, length, dtype=torch.long),
              "tasks_input_ids": torch.randint(2, 40, (1, length), generator=g),
              "tasks_attention_mask": torch.ones(1, length, dtype=torch.long), "classes_structure": torch.tensor([classes])}
    return Model(config), inputs


def lw_detr():
    Config, Backbone, Model = _classes("LwDetrConfig", "LwDetrViTConfig", "LwDetrForObjectDetection")
    backbone = Backbone(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, window_block_indices=[0], out_indices=[1, 2],
                        num_windows=4, image_size=SIDE, pretrain_image_size=SIDE)
    return Model(Config(backbone_config=backbone, d_model=32, projector_scale_factors=[0.5, 2.0], decoder_ffn_dim=16, decoder_layers=1,
                        decoder_self_attention_heads=2, decoder_cross_attention_heads=2, decoder_n_points=2, num_queries=6,
                        group_detr=2, c2f_num_blocks=1, tie_word_embeddings=False)), {}


def rf_detr():
    Config, Backbone, Model = _classes("RfDetrConfig", "RfDetrDinov2Config", "RfDetrForObjectDetection")
    backbone = Backbone(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, out_features=["stage1", "stage2"], image_size=56,
                        num_windows=1)
    return Model(Config(backbone_config=backbone, d_model=32, decoder_ffn_dim=16, decoder_layers=1, decoder_self_attention_heads=2,
                        decoder_cross_attention_heads=2, decoder_n_points=2, num_queries=6, group_detr=2, c2f_num_blocks=1,
                        dropout=0.0, tie_word_embeddings=False)), {}


def pp_doclayout_v2():
    Config, Model = _classes("PPDocLayoutV2Config", "PPDocLayoutV2ForObjectDetection")
    reading_order = {"hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 16, "num_hidden_layers": 1,
                     "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, "coordinate_size": 4, "shape_size": 4,
                     "max_position_embeddings": 40, "global_pointer_head_size": 8, "num_classes": 2}
    return Model(Config(backbone_config=_resnet(), reading_order_config=reading_order, num_labels=2, class_thresholds=[0.5, 0.5],
                        class_order=[0, 1], num_denoising=0, **_RTDETR)), {}


def pp_doclayout_v3():
    Config, Model = _classes("PPDocLayoutV3Config", "PPDocLayoutV3ForObjectDetection")
    return Model(Config(backbone_config=_resnet(out_indices=(1, 2, 3, 4)), x4_feat_dim=8, mask_feature_channels=[16, 16],
                        num_prototypes=4, global_pointer_head_size=8, gp_dropout_value=0.0, num_denoising=0, **_RTDETR)), {}


def pp_doclayout_v4():
    Config, Model = _classes("PPDocLayoutV4Config", "PPDocLayoutV4ForObjectDetection")
    rtdetr = {k: v for k, v in _RTDETR.items() if k != "d_model"}  # V4 names it hidden_size
    return Model(Config(backbone_config=_resnet(), hidden_size=16, global_pointer_head_size=8, gp_dropout_value=0.0, num_denoising=0,
                        **rtdetr)), {}


def mask2former():
    # The bare model: the segmentation head's loss needs scipy, and the pixel decoder (the
    # deformable part) is all here.
    Config, Model = _classes("Mask2FormerConfig", "Mask2FormerModel")
    return Model(Config(backbone_config=_swin((1, 2, 3, 4)), feature_size=32, mask_feature_size=32, hidden_dim=32,
                        encoder_feedforward_dim=16, encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=16,
                        num_queries=6, num_labels=3, use_auxiliary_loss=False)), {}


def oneformer():
    Config, Model = _classes("OneFormerConfig", "OneFormerModel")
    config = Config(backbone_config=_swin((1, 2, 3, 4)), num_queries=6, num_labels=3, task_seq_len=6, text_encoder_width=32,
                    text_encoder_context_length=6, text_encoder_num_layers=1, text_encoder_vocab_size=40, text_encoder_n_ctx=2,
                    conv_dim=32, mask_dim=32, hidden_dim=32, encoder_feedforward_dim=16, encoder_layers=1, decoder_layers=2,
                    num_attention_heads=2, dropout=0.0, dim_feedforward=16, query_dec_layers=1, use_auxiliary_loss=False,
                    output_auxiliary_logits=False)
    return Model(config), {"task_inputs": torch.randint(2, 40, (1, 6), generator=torch.Generator().manual_seed(4))}


FAMILIES = {f.__name__: f for f in (deformable_detr, rt_detr, rt_detr_v2, d_fine, deimv2, grounding_dino, mm_grounding_dino,
                                    omdet_turbo, lw_detr, rf_detr, pp_doclayout_v2, pp_doclayout_v3, pp_doclayout_v4,
                                    mask2former, oneformer)}


# ---------------------------------------------------------------------------------------------
# Running a model: outputs, block outputs, gradients, and which sampling op ran

def blocks(model):
    """The deformable attention blocks: the modules that own the sampling-offset projection."""
    return [m for m in model.modules() if isinstance(getattr(m, "sampling_offsets", None), nn.Linear)]


def build(family, **kw):
    """The family's tiny model in float64, offsets moved off pixel centres, and its inputs."""
    torch.manual_seed(0)
    model, extra = FAMILIES[family](**kw)
    model = model.double()
    assert blocks(model), f"{family}: no deformable attention block (sampling_offsets) found"
    move_offsets_off_centres(model)
    g = torch.Generator().manual_seed(2)
    return model, {"pixel_values": torch.randn(1, 3, SIDE, SIDE, generator=g, dtype=torch.float64), **extra}


def float_tensors(out):
    """The floating-point tensors of a model output, in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in float_tensors(item)]
    return []


def loss_of(tensors):
    # Masked entries (-inf logits) carry no gradient; every output reaches the loss.
    return sum(t.masked_fill(~t.isfinite(), 0).square().mean() for t in tensors if t.requires_grad)


def run(model, inputs, train: bool, count: bool = True):
    """One forward (and, in train mode, backward) pass: outputs, gradients, and with
    ``count`` the block outputs and the operators that ran (``count=False`` under
    torch.compile, which does not compile while a dispatch mode is active, and would
    trace the hooks)."""
    model.train(train)
    for m in model.modules():  # OmDet-Turbo caches text embeddings, with their graph, across calls
        for v in vars(m).values():
            if isinstance(getattr(v, "cache", None), dict):
                v.cache.clear()
    block_outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: block_outputs.append(out[0] if isinstance(out, tuple) else out))
             for m in blocks(model)] if count else []
    model.zero_grad(set_to_none=True)
    try:
        ops = CountOps()
        with ops if count else contextlib.nullcontext():
            outputs = float_tensors(model(**inputs))
            if train:
                loss_of(outputs).backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"outputs": [t.detach() for t in outputs], "blocks": [t.detach() for t in block_outputs], "grads": grads,
            "ops": ops.counts}


def assert_equal_runs(got, want, what: str):
    assert_same(got["outputs"], want["outputs"], f"{what} outputs")
    assert_same(got["blocks"], want["blocks"], f"{what} deformable attention blocks")
    assert got["grads"].keys() == want["grads"].keys(), f"{what}: gradients of different parameters"
    names = list(want["grads"])
    assert_same([got["grads"][n] for n in names], [want["grads"][n] for n in names], f"{what} gradient", names)


# ---------------------------------------------------------------------------------------------
# Every family: the same numbers as transformers' default path

@pytest.mark.parametrize("family", FAMILIES)
def test_family_equals_transformers(family):
    model, inputs = build(family)
    if kernels_usable():
        # As from_pretrained leaves a model: its mode switches re-run transformers' kernel
        # setup, which would put back transformers' own forward.
        model.set_use_kernels(True)
    # A copy before any step (a train step moves BatchNorm's running statistics), then
    # transformers' path first: for RT-DETRv2, Mask2Former and OneFormer ours rebinds the
    # family's module-level function while the handle is held.
    ours = copy.deepcopy(model)
    want = {train: run(model, inputs, train) for train in (True, False)}
    for train, result in want.items():
        assert_runs(result, ours=False, what=f"{family} default, train={train}")
    with hf.use_in_transformers(ours) as handle:
        assert sum(handle.swapped.values()) > 0, handle
        for step, train in enumerate((True, False, True)):  # train, eval, and train again after the switch
            got = run(ours, inputs, train)
            what = f"{family} ours, step {step} (train={train})"
            assert_runs(got, ours=True, what=what)
            assert_equal_runs(got, want[train], what)
    # remove() puts transformers' path back
    assert_runs(run(ours, inputs, False), ours=False, what=f"{family} after remove()")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_attention_compiles(family):
    """Every deformable attention block compiles whole (fullgraph) with ours, forward and
    backward (AOT autograd), and gives transformers' eager numbers."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, inputs = build(family)
    ours = copy.deepcopy(model)
    want = run(model, inputs, True, count=False)
    with hf.use_in_transformers(ours):
        counters = []
        for block in blocks(ours):
            counters.append(CompileCounterWithBackend("aot_eager"))
            block.compile(backend=counters[-1], fullgraph=True, dynamic=False)
        got = run(ours, inputs, True, count=False)
    assert_equal_runs(got, want, f"{family} compiled")
    targets = [str(node.target) for c in counters for g in c.graphs for node in g.graph.nodes]
    assert all(c.frame_count >= 1 for c in counters), f"{family}: a block was not compiled"
    assert any("piip.ms_deform_attn" in t for t in targets), f"{family}: our op is not in the compiled graphs"
    assert not any("grid_sampler" in t for t in targets)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deformable_detr", "mask2former"])
def test_whole_model_compiles(family):
    """The whole model under torch.compile (one decorated-layer family, one whose function
    is rebound by name): transformers' eager numbers."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, inputs = build(family)
    ours = copy.deepcopy(model)
    want = run(model, inputs, False, count=False)
    with hf.use_in_transformers(ours):
        counter = CompileCounterWithBackend("aot_eager")
        ours.compile(backend=counter, dynamic=False)
        got = run(ours, inputs, False, count=False)
    assert_same(got["outputs"], want["outputs"], f"{family} compiled outputs")
    assert any("piip.ms_deform_attn" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


# ---------------------------------------------------------------------------------------------
# The switch itself

def release_in_turn(model, inputs, released, holder, what):
    """``released.remove()`` while ``holder`` still holds ours: the model still runs ours
    (also after the mode switches that re-kernelize) and refuses another core; after
    ``holder.remove()`` it runs transformers' code again."""
    released.remove()
    assert not released.swapped and holder.swapped, (released, holder)
    for train in (False, True):
        assert_runs(run(model, inputs, train), ours=True, what=f"{what}: after the first remove(), train={train}")
    with pytest.raises(RuntimeError, match="another implementation"):
        hf.use_in_transformers(model, msda=lambda *args: None)
    holder.remove()
    assert_runs(run(model, inputs, False), ours=False, what=f"{what}: after the last remove()")


def _kernels_on(model):
    if kernels_usable():  # as from_pretrained leaves a model: .train()/.eval() re-kernelize
        model.set_use_kernels(True)
    return model


# Each way a handle takes hold: (family, whether the second handle is on a copy of the model)
HOLDS = {"layers and kernel_config": ("deformable_detr", False), "bound function": ("d_fine", False),
         "family function, one model": ("mask2former", False), "family function, two models": ("mask2former", True)}


@pytest.mark.parametrize("first_out", ["first taken", "last taken"])
@pytest.mark.parametrize("hold", HOLDS)
def test_two_handles_removed_in_either_order(hold, first_out):
    """Two handles on the same swaps: each holds them; whichever is removed first, the model
    keeps running ours until the other one is removed."""
    family, on_a_copy = HOLDS[hold]
    model, inputs = build(family)
    _kernels_on(model)
    other = copy.deepcopy(model) if on_a_copy else model
    handles = []
    try:
        handles.append(hf.use_in_transformers(model))
        handles.append(hf.use_in_transformers(other))
        first, second = handles
        assert sum(first.swapped.values()) > 0 and first.already == 0, first
        if not on_a_copy:
            assert second.swapped == first.swapped and second.already == sum(first.swapped.values()), (first, second)
        released, holder = handles if first_out == "first taken" else handles[::-1]
        release_in_turn(model, inputs, released, holder, f"{hold}, {first_out} removed first")
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("first_out", ["switch", "model's handle"])
def test_switch_then_a_model_handle_in_either_order(first_out):
    """The switch for new models, then a handle on a model built under it: removing either
    one first leaves the model on ours."""
    handles = []
    try:
        handles.append(hf.use_in_transformers())
        model, inputs = build("d_fine")
        _kernels_on(model)
        handles.append(hf.use_in_transformers(model))
        switch, own = handles
        assert own.swapped["bound function"] == 1 and own.already == sum(own.swapped.values()), own
        released, holder = handles if first_out == "switch" else handles[::-1]
        release_in_turn(model, inputs, released, holder, f"{first_out} removed first")
    finally:
        for handle in handles:
            handle.remove()


def test_a_failed_switch_changes_nothing():
    """A switch that stops on an error (another core already installed on the second layer)
    puts back what it had changed on the way."""
    model, inputs = build("deformable_detr")
    layers = [m for m in model.modules() if getattr(type(m), "kernel_layer_name", None) == LAYER_NAME]
    for taken, other in ((layers[0], layers[1]), (layers[1], layers[0])):  # whichever the walk meets first
        with hf.use_in_transformers(taken, msda=lambda *args: None):
            with pytest.raises(RuntimeError, match="another implementation"):
                hf.use_in_transformers(model)
            assert "forward" not in other.__dict__ and model.kernel_config is None


def test_family_function_is_held_until_the_last_handle():
    """A rebound family function stays ours while any handle holds it, and only then goes back."""
    from transformers.models.mask2former import modeling_mask2former

    theirs = modeling_mask2former.multi_scale_deformable_attention
    a, inputs = build("mask2former")
    b = copy.deepcopy(a)
    handles = []
    try:
        handles.append(hf.use_in_transformers(a))
        handles.append(hf.use_in_transformers(b))
        first, second = handles
        assert first.swapped["function by name"] == 1 and second.swapped["function by name"] == 1 and second.already == 1
        release_in_turn(a, inputs, first, second, "Mask2Former held by a second handle")
    finally:
        for handle in handles:
            handle.remove()
    assert modeling_mask2former.multi_scale_deformable_attention is theirs


# Deep copies (an EMA, a frozen teacher) and pickles of a swapped model. Kernels on, and a
# mode switch (to eval: the models are built in train mode) before copying: transformers then
# re-kernelizes the decorated layers from the model's kernel_config, so they hold a plain bound
# method of our layer, not the swapped value (test_deep_copy_compiles copies the swapped value).
COPIED = ["deformable_detr", "d_fine"]


def _swapped(family):
    """The family's model (kernels on) whose train steps leave its eval numbers as they
    are (BatchNorm's running statistics frozen), its inputs, and transformers' eval run."""
    model, inputs = build(family)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    want = {train: run(copy.deepcopy(model), inputs, train, count=False) for train in (False,)}
    _kernels_on(model)
    return model, inputs, want


def _runs(model, inputs, ours, what, want=None):
    for train in (True, False):  # the mode switches re-kernelize (kernels on)
        got = run(model, inputs, train)
        assert_runs(got, ours=ours, what=f"{what}, train={train}")
    if want is not None:
        assert_same(got["outputs"], want["outputs"], f"{what} outputs")


@pytest.mark.parametrize("first_out", ["original's handle", "copy's handle"])
@pytest.mark.parametrize("family", COPIED)
def test_deep_copy_is_held_by_the_handle(family, first_out):
    """A deep copy of a swapped model runs ours and is held by the same handle: remove()
    puts transformers' code back in the original and in the copy. A later handle on the copy
    really holds it: whichever is removed first, the copy stays ours until the other is."""
    model, inputs, want = _swapped(family)
    handles = [hf.use_in_transformers(model)]
    try:
        model.eval()
        twin = copy.deepcopy(model)
        _runs(twin, inputs, True, f"{family} copy", want[False])
        handles.append(hf.use_in_transformers(twin))
        on_copy = handles[1]
        assert sum(on_copy.swapped.values()) > 0 and on_copy.already == sum(on_copy.swapped.values()), on_copy
        released, holder = handles if first_out == "original's handle" else handles[::-1]
        released.remove()
        _runs(twin, inputs, True, f"{family} copy, {first_out} removed")
        _runs(model, inputs, released is on_copy, f"{family} original, {first_out} removed")
        holder.remove()
        _runs(twin, inputs, False, f"{family} copy after both remove()", want[False])
        _runs(model, inputs, False, f"{family} original after both remove()", want[False])
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", COPIED)
def test_copies_of_copies_and_two_handles(family):
    """Two handles on a model, a copy, a copy of the copy: each copy is held by both, and
    goes back to transformers' code with the original when the last handle is removed."""
    model, inputs, want = _swapped(family)
    first, second = hf.use_in_transformers(model), hf.use_in_transformers(model)
    try:
        model.eval()
        alone = sum(first.swapped.values())
        twin = copy.deepcopy(model)
        grandchild = copy.deepcopy(twin)
        # the copies' places are held too, by both handles
        assert first.swapped == second.swapped and sum(first.swapped.values()) == 3 * alone, (first, second)
        first.remove()
        for m, what in ((model, "original"), (twin, "copy"), (grandchild, "copy of the copy")):
            _runs(m, inputs, True, f"{family} {what} after the first remove()")
        second.remove()
        for m, what in ((model, "original"), (twin, "copy"), (grandchild, "copy of the copy")):
            _runs(m, inputs, False, f"{family} {what} after the last remove()", want[False])
    finally:
        first.remove()
        second.remove()


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("family", COPIED)
def test_pickled_model_comes_back_on_transformers(family, how):
    """No handle can hold a model in another process: a swapped model pickles as
    transformers' own (its kernel_config too), and use_in_transformers on it works."""
    import io
    import pickle

    model, inputs, want = _swapped(family)
    with hf.use_in_transformers(model) as handle:
        model.eval()
        assert (model.kernel_config is not None) == (kernels_usable() and family == "deformable_detr"), model.kernel_config
        if how == "pickle":
            loaded = pickle.loads(pickle.dumps(model))
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
        assert sum(handle.swapped.values()) > 0
        _runs(model, inputs, True, f"{family} swapped original")
    assert model.kernel_config is None and loaded.kernel_config is None  # given back; pickled as it was
    _runs(loaded, inputs, False, f"{family} unpickled", want[False])
    with hf.use_in_transformers(loaded) as again:
        assert sum(again.swapped.values()) > 0 and again.already == 0, again
        _runs(loaded, inputs, True, f"{family} unpickled, swapped again", want[False])
    _runs(loaded, inputs, False, f"{family} unpickled, after remove()", want[False])


@pytest.mark.parametrize("family", COPIED)
def test_deep_copy_compiles(family):
    """The attention blocks of a swapped model and of its deep copy compile whole
    (fullgraph) with our op."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, inputs = build(family)
    want = run(copy.deepcopy(model), inputs, True, count=False)
    with hf.use_in_transformers(model):
        twin = copy.deepcopy(model)
        for m in (model, twin):
            counters = []
            for block in blocks(m):
                counters.append(CompileCounterWithBackend("aot_eager"))
                block.compile(backend=counters[-1], fullgraph=True, dynamic=False)
            got = run(m, inputs, True, count=False)
            assert_equal_runs(got, want, f"{family} compiled{' copy' if m is twin else ''}")
            targets = [str(node.target) for c in counters for g in c.graphs for node in g.graph.nodes]
            assert all(c.frame_count >= 1 for c in counters)
            assert any("piip.ms_deform_attn" in t for t in targets) and not any("grid_sampler" in t for t in targets)


def test_switch_for_new_models():
    handle = hf.use_in_transformers()
    try:
        with pytest.raises(RuntimeError, match="already on"):
            hf.use_in_transformers()
        built = {family: build(family) for family in ("deformable_detr", "d_fine", "mask2former")}
        for family, (model, inputs) in built.items():
            assert_runs(run(model, inputs, True), ours=True, what=f"{family} built under the switch")
        assert handle.swapped["layer"] == 2 and handle.swapped["bound function"] == 1 and handle.swapped["function by name"] == 1
    finally:
        handle.remove()
    for family, (model, inputs) in built.items():  # put back, and new models are transformers' own
        assert_runs(run(model, inputs, False), ours=False, what=f"{family} after remove()")
    model, inputs = build("rt_detr")
    assert_runs(run(model, inputs, False), ours=False, what="rt_detr built after remove()")


def test_switch_for_new_models_from_pretrained(tmp_path):
    """from_pretrained under the switch (kernels on, as it leaves them): ours, also after
    the mode switches that re-kernelize."""
    model, inputs = build("deformable_detr")
    model.save_pretrained(tmp_path)
    with hf.use_in_transformers():
        loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64)
        assert loaded.use_kernels == kernels_usable()
        for train in (False, True, False):
            assert_runs(run(loaded, inputs, train), ours=True, what=f"from_pretrained under the switch, train={train}")
    assert_runs(run(loaded, inputs, False), ours=False, what="from_pretrained after remove()")


def test_kernels_library_installed():
    """Says so (as a skip with its reason) when the `kernels` library is missing."""
    pytest.importorskip("kernels", reason="the kernels library is missing: the kernel-repository routes and the "
                                          "re-kernelization on .train()/.eval() go untested (transformers installs it)")
    assert kernels_usable(), "kernels is installed but transformers does not accept its version"


# ---------------------------------------------------------------------------------------------
# The kernel repository, through the `kernels` library's three routes

@pytest.fixture
def kernels_lib():
    return pytest.importorskip("kernels", reason="the kernels library (installed with transformers) is missing")


def _kernelize_msda(model, mapping, kernels_lib):
    with kernels_lib.use_kernel_mapping(mapping, inherit_mapping=False):
        for m in model.modules():
            if getattr(type(m), "kernel_layer_name", None) == LAYER_NAME:
                kernels_lib.kernelize(m, mode=kernels_lib.Mode.TRAINING, device="cpu")


def test_local_layer_repository(kernels_lib):
    """The kernels library loads our layer and accepts it (no constructor, no members but
    forward and the two flags, transformers' signature: checked when it kernelizes)."""
    repo = kernels_lib.LocalLayerRepository(repo_path=hf.kernel_repo_path(), layer_name=LAYER_NAME)
    assert repo.load() is hf.MultiScaleDeformableAttention
    assert hf.MultiScaleDeformableAttention.has_backward and hf.MultiScaleDeformableAttention.can_torch_compile
    model, inputs = build("rt_detr")
    want = run(model, inputs, True)
    _kernelize_msda(model, {LAYER_NAME: {"cpu": repo}}, kernels_lib)
    got = run(model, inputs, True)
    assert_runs(got, ours=True, what="kernelized from the local repository")
    assert_equal_runs(got, want, "kernelized from the local repository")


def test_local_kernels_override(kernels_lib, monkeypatch):
    """LOCAL_KERNELS puts our repository where transformers' default mapping names the hub
    kernel (kernels-community/deformable-detr, version 2): no download."""
    monkeypatch.setenv("LOCAL_KERNELS", f"kernels-community/deformable-detr={hf.kernel_repo_path()}")
    from transformers.integrations.hub_kernels import get_kernel_mapping_transformers

    hub_repo = get_kernel_mapping_transformers()[LAYER_NAME]["cuda"]
    assert hub_repo.load() is hf.MultiScaleDeformableAttention
    model, inputs = build("deformable_detr")
    _kernelize_msda(model, {LAYER_NAME: {"cpu": hub_repo}}, kernels_lib)
    assert_runs(run(model, inputs, False), ours=True, what="kernelized through LOCAL_KERNELS")


def test_kernel_config_use_local_kernel(kernels_lib, monkeypatch):
    """transformers.KernelConfig(..., use_local_kernel=True) accepts our repository for the
    model and maps it as a LocalLayerRepository that loads our layer. transformers builds
    that mapping only for accelerators (not "cpu"), so here the model's device reads as
    cuda for the mapping; the whole route runs in test_gpu_kernel_config."""
    import transformers.utils.kernel_config as kernel_config

    model, inputs = build("deformable_detr")
    config = transformers.KernelConfig({LAYER_NAME: f"{hf.kernel_repo_path()}:{LAYER_NAME}"}, use_local_kernel=True)
    config.sanitize_kernel_mapping(model)
    monkeypatch.setattr(kernel_config, "infer_device", lambda model: "cuda")
    config.create_compatible_mapping(model)
    (repo,) = config.kernel_mapping[LAYER_NAME]["cuda"].values()
    assert isinstance(repo, kernels_lib.LocalLayerRepository) and repo.load() is hf.MultiScaleDeformableAttention
    _kernelize_msda(model, {LAYER_NAME: {"cpu": repo}}, kernels_lib)
    assert_runs(run(model, inputs, False), ours=True, what="kernelized through KernelConfig's repository")


# ---------------------------------------------------------------------------------------------
# The functions, called directly: point counts, dtypes, bad input

def _v2_inputs(points, shapes=((5, 7), (3, 4), (2, 2)), N=2, Lq=6, M=2, D=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, sum(points), 2, generator=g, dtype=torch.float64) * 1.2 - 0.1  # some outside [0, 1]
    weights = torch.rand(N, Lq, M, sum(points), generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (value, loc, weights)], list(shapes)


def _with_grads(fn, tensors, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads], grad_out


def _theirs_v2():
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2

    return modeling_rt_detr_v2.multi_scale_deformable_attention_v2


@pytest.mark.parametrize("points", [(2, 2, 2), (3, 1, 2), (1, 4, 1)])
def test_v2_point_counts_equal_transformers(points):
    """Per-level point counts: padding to max(P_l) with zero weight leaves the output and
    the gradients of the real points (value, locations, weights) as transformers' are."""
    tensors, shapes = _v2_inputs(points)
    want, grad_out = _with_grads(lambda v, l, w: _theirs_v2()(v, shapes, l, w, list(points)), tensors)
    got, _ = _with_grads(lambda v, l, w: hf.multi_scale_deformable_attention_v2(v, shapes, l, w, list(points)), tensors, grad_out)
    assert_same(got, want, f"v2 with points {points} (out, grad value, grad locations, grad weights)")


def _entry_points():
    """(name, transformers' function, ours), each as fn(value, shapes list, locations, weights)
    on Deformable-DETR-shaped locations [N, Lq, M, L, P, 2]."""
    from transformers.models.deformable_detr import modeling_deformable_detr
    from transformers.models.mask2former import modeling_mask2former

    def layer(forward):
        module = modeling_deformable_detr.MultiScaleDeformableAttention()

        def call(value, shapes, loc, weights):
            spatial = torch.tensor(shapes)
            starts = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
            return forward(module, value, spatial, shapes, starts, loc, weights, 64)
        return call

    def v2(fn):
        def call(value, shapes, loc, weights):
            N, Lq, M, L, P, _ = loc.shape
            return fn(value, shapes, loc.flatten(3, 4), weights.flatten(3), [P] * L)
        return call

    return [("layer", layer(modeling_deformable_detr.MultiScaleDeformableAttention.forward), layer(hf.MultiScaleDeformableAttention.forward)),
            ("v1", modeling_mask2former.multi_scale_deformable_attention, hf.multi_scale_deformable_attention),
            ("v2", v2(_theirs_v2()), v2(hf.multi_scale_deformable_attention_v2))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_against_float64(dtype):
    """fp32/fp16/bf16 through each entry point: at most twice as far from the float64 truth
    as transformers' own path in the same dtype (output and every gradient)."""
    points = (2, 2, 2)
    tensors, shapes = _v2_inputs(points)
    value, loc, weights = tensors
    N, Lq, M, _, _ = loc.shape
    loc, weights = loc.view(N, Lq, M, 3, 2, 2), weights.view(N, Lq, M, 3, 2)
    for name, theirs, ours in _entry_points():
        truth, grad_out = _with_grads(lambda v, l, w: theirs(v, shapes, l, w), [value, loc, weights])
        low = [t.to(dtype) for t in (value, loc, weights)]
        ref, _ = _with_grads(lambda v, l, w: theirs(v, shapes, l, w), low, grad_out)
        got, _ = _with_grads(lambda v, l, w: ours(v, shapes, l, w), low, grad_out)
        for what, g, r, t in zip(("out", "grad value", "grad locations", "grad weights"), got, ref, truth):
            assert g.dtype == dtype, f"{name} {what}: {g.dtype}"
            assert_derived_close(f"{name} {what} {dtype}", g, r, t)


def test_discrete_method_stays_on_transformers(monkeypatch, caplog):
    monkeypatch.setattr(_swap, "_logged", set())
    theirs = _theirs_v2()
    tensors, shapes = _v2_inputs((2, 3, 1))
    want = theirs(*tensors[:1], shapes, *tensors[1:], [2, 3, 1], "discrete")
    with caplog.at_level(logging.WARNING, logger="piip_kernels.hf"):
        for _ in range(2):
            got = hf.multi_scale_deformable_attention_v2(tensors[0], shapes, *tensors[1:], [2, 3, 1], "discrete", fallback=theirs)
            assert torch.equal(got, want)
    lines = [r.getMessage() for r in caplog.records if "discrete" in r.getMessage()]
    assert len(lines) == 1 and "stays on transformers' own code" in lines[0], lines


def test_discrete_model_stays_on_transformers(monkeypatch, caplog):
    """D-FINE with decoder_method='discrete': transformers' numbers, its code, one log line."""
    monkeypatch.setattr(_swap, "_logged", set())
    model, inputs = build("d_fine", method="discrete")
    ours = copy.deepcopy(model)
    want = run(model, inputs, True)
    with caplog.at_level(logging.WARNING, logger="piip_kernels.hf"), hf.use_in_transformers(ours):
        got = run(ours, inputs, True)
        run(ours, inputs, True)
    assert got["ops"].get(OUR_OP, 0) == 0
    assert_equal_runs(got, want, "D-FINE discrete")
    assert len([r for r in caplog.records if "discrete" in r.getMessage()]) == 1


def test_bad_input_raises():
    v2 = hf.multi_scale_deformable_attention_v2
    (value, loc, weights), shapes = _v2_inputs((2, 3, 1))
    with pytest.raises(ValueError, match="sums to"):
        v2(value, shapes, loc, weights, [2, 2, 1])
    with pytest.raises(ValueError, match="one positive count per level"):
        v2(value, shapes, loc, weights, [3, 3])
    with pytest.raises(ValueError, match="attention_weights must be"):
        v2(value, shapes, loc, weights[..., :-1], [2, 3, 1])
    with pytest.raises(ValueError, match="method must be"):
        v2(value, shapes, loc, weights, [2, 3, 1], "nearest")
    with pytest.raises(ValueError, match="method must be"):  # "discrete" is transformers' code: without it, an error
        v2(value, shapes, loc, weights, [2, 3, 1], "discrete")
    with pytest.raises(ValueError, match="cover"):  # levels that do not tile value
        v2(value, [(5, 7), (3, 4), (2, 3)], loc, weights, [2, 3, 1])
    loc6 = torch.rand(2, 6, 3, 3, 2, 2, dtype=torch.float64)  # 3 heads against value's 2
    with pytest.raises(ValueError, match="sampling_locations"):
        hf.multi_scale_deformable_attention(value, shapes, loc6, torch.rand(2, 6, 3, 3, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hf.use_in_transformers("model")
    with pytest.raises(ValueError, match="needs a model"):
        hf.use_in_transformers(msda=lambda *a: None)


def test_a_changed_signature_stays_on_transformers(monkeypatch, caplog):
    """A decorated module whose forward is not the one our layer implements is left alone,
    with one log line."""
    from transformers.integrations import use_kernel_forward_from_hub

    monkeypatch.setattr(_swap, "_logged", set())

    @use_kernel_forward_from_hub(LAYER_NAME)
    class Changed(nn.Module):
        def forward(self, value, spatial_shapes, sampling_locations):
            return value

    module = nn.Sequential(Changed())
    with caplog.at_level(logging.WARNING, logger="piip_kernels.hf"):
        handle = hf.use_in_transformers(module)
    assert not handle.swapped and "forward" not in module[0].__dict__
    assert any("is not the signature ours implements" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# On a GPU (bench/gpu_check.sh): the transformers routes that only exist there, and dtypes

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")
@pytest.mark.parametrize("route", ["use_in_transformers", "kernel_config", "local_kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_routes(route, dtype, kernels_lib, monkeypatch, request):
    """On CUDA, through each route (transformers' KernelConfig and its default mapping with
    LOCAL_KERNELS map accelerators only): our op runs, in eval and train mode for the routes
    whose mapping covers both (KernelConfig maps the mode it was given), and the attention
    blocks are at most twice as far from float64 as transformers' path in the same dtype."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never download the hub kernel
    model64, inputs64 = build("deformable_detr")
    truth = run(model64, inputs64, False)["blocks"]
    model = copy.deepcopy(model64).to("cuda", dtype)
    inputs = {k: v.to("cuda", dtype) if v.is_floating_point() else v.cuda() for k, v in inputs64.items()}
    theirs = run(model, inputs, False)
    assert_runs(theirs, ours=False, what="transformers on CUDA")
    if route == "use_in_transformers":
        request.addfinalizer(hf.use_in_transformers(model).remove)  # given back however the test ends
        # Kernels on, as from_pretrained leaves them: every mode switch re-kernelizes, from the
        # model's kernel_config over transformers' mapping (whose hub kernel, offline, would
        # fail to load rather than fall back).
        model.set_use_kernels(True)
    elif route == "kernel_config":
        config = transformers.KernelConfig({LAYER_NAME: f"{hf.kernel_repo_path()}:{LAYER_NAME}"}, use_local_kernel=True)
        model.set_use_kernels(True, kernel_config=config)
    else:
        monkeypatch.setenv("LOCAL_KERNELS", f"kernels-community/deformable-detr={hf.kernel_repo_path()}")
        model.set_use_kernels(True)
    for train in ((False,) if route == "kernel_config" else (False, True, False)):
        assert_runs(run(model, inputs, train), ours=True, what=f"{route} on CUDA, train={train}")
    got = run(model, inputs, False)
    for g, r, t in zip(got["blocks"], theirs["blocks"], truth):
        assert_derived_close(f"{route} {dtype} block", g.float().cpu(), r.float().cpu(), t, floor=1e-5)
