"""The separable resize (piip.layers.resize) against F.interpolate: every preset's
position-embedding shape, awkward sizes, forward and backward, fp32 and fp64."""
import pytest
import torch
import torch.nn.functional as F

import piip
from piip.layers.resize import interpolation_matrices, reference_matrix, resize_2d, resize_grid_tokens


def _preset_shapes():
    """(stored grid, live grid) of every ViT/CLIP branch of every preset at its resolution
    whose position embedding is resized (unique)."""
    shapes = set()
    for name in piip.list_models(include_paper_only=True):
        cfg = piip.get_config(name)
        last = cfg.branches[-1]
        for b in cfg.branches:
            if b.kind not in ("vit", "clip"):
                continue
            # Branch images are the input scaled by image_size / last.image_size, sides floored.
            side = int(last.image_size * b.image_size / last.image_size)
            live = (side // b.patch_size,) * 2
            if tuple(b.pos_embed_grid) != live:
                shapes.add((tuple(b.pos_embed_grid), live))
    return sorted(shapes)


PRESET_SHAPES = _preset_shapes()


def _torch_tokens(tokens, grid, size, mode="bicubic", align_corners=False):
    """The branches' original form: tokens -> map -> F.interpolate -> tokens."""
    B, _, C = tokens.shape
    m = tokens.reshape(B, *grid, C).permute(0, 3, 1, 2)
    return F.interpolate(m, size=size, mode=mode, align_corners=align_corners).flatten(2).transpose(1, 2)


def _fwd_bwd(fn, tokens, grad_out):
    x = tokens.detach().clone().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y, x, grad_out.to(y.dtype))
    return y.detach(), g


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_the_preset_shapes_are_collected():
    # Detection presets upsample the 14x14 DeiT table to their high-resolution grids.
    assert ((14, 14), (98, 98)) in PRESET_SHAPES and len(PRESET_SHAPES) >= 10


@pytest.mark.parametrize("grid,size", PRESET_SHAPES, ids=[f"{g[0]}to{s[0]}" for g, s in PRESET_SHAPES])
def test_every_preset_position_embedding_shape(grid, size):
    """fp32: the forward equals F.interpolate's to 1e-6 of the largest value; the backward is
    no farther from the fp64 gradient than F.interpolate's own fp32 backward (twice, plus 2e-7:
    torch's bicubic backward accumulates in its own order, up to ~1.4e-6 from the fp64 one at
    these sizes). fp64: both equal F.interpolate's to 1e-12."""
    g = torch.Generator().manual_seed(grid[0] * 1000 + size[0])
    tokens = 0.02 * torch.randn(1, grid[0] * grid[1], 24, generator=g, dtype=torch.float64)
    grad_out = torch.randn(1, size[0] * size[1], 24, generator=g, dtype=torch.float64)
    ours = lambda t: resize_grid_tokens(t, grid, size)  # noqa: E731
    theirs = lambda t: _torch_tokens(t, grid, size)  # noqa: E731
    y64, g64 = _fwd_bwd(theirs, tokens, grad_out)
    o64, og64 = _fwd_bwd(ours, tokens, grad_out)
    assert _rel(o64, y64) < 1e-12 and _rel(og64, g64) < 1e-12
    y32, g32 = _fwd_bwd(theirs, tokens.float(), grad_out)
    o32, og32 = _fwd_bwd(ours, tokens.float(), grad_out)
    assert o32.dtype == og32.dtype == torch.float32
    assert _rel(o32, y32) <= 1e-6, f"forward differs from F.interpolate by {_rel(o32, y32):.2e}"
    torch_err, our_err = _rel(g32, g64), _rel(og32, g64)
    assert our_err <= 2 * torch_err + 2e-7, f"backward {our_err:.2e} from fp64, F.interpolate's {torch_err:.2e}"


AWKWARD = [((1, 1), (5, 7)), ((5, 7), (1, 1)), ((3, 2), (2, 3)), ((7, 5), (13, 2)), ((37, 11), (11, 37)),
           ((2, 2), (97, 3)), ((16, 16), (16, 16)), ((4, 6), (8, 12))]


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_awkward_sizes_both_modes(mode, align_corners):
    for grid, size in AWKWARD:
        g = torch.Generator().manual_seed(sum(grid) + sum(size))
        x = torch.randn(2, 3, *grid, generator=g, dtype=torch.float64)
        grad_out = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
        for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
            ref = lambda t: F.interpolate(t, size=size, mode=mode, align_corners=align_corners)  # noqa: E731
            ours = lambda t: resize_2d(t, size, mode, align_corners)  # noqa: E731
            y, gy = _fwd_bwd(ref, x.to(dt), grad_out)
            o, go = _fwd_bwd(ours, x.to(dt), grad_out)
            assert o.shape == y.shape and o.dtype == dt
            assert _rel(o, y) <= tol, (grid, size, dt, _rel(o, y))
            assert _rel(go, gy) <= (tol if dt == torch.float64 else 2e-6), (grid, size, dt, _rel(go, gy))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_read_matrices_follow_pytorchs_formulas(mode):
    """The matrices read from F.interpolate equal the formulas of PyTorch's source written out
    (reference_matrix): exactly in fp64 up to rounding, and in fp32 within the rounding of the
    source coordinate (a multiply-add fused or not moves it by one ulp of the input size)."""
    for n_in, n_out in ((14, 98), (24, 42), (32, 70), (21, 28), (5, 3), (1, 4), (37, 98)):
        for align_corners in (False, True):
            fwd, bwd = interpolation_matrices(n_in, n_out, mode, align_corners, torch.float64, "cpu")
            ref = reference_matrix(n_in, n_out, mode, align_corners, dtype=torch.float64)
            assert (fwd - ref).abs().max() < 1e-13 and (bwd - ref).abs().max() < 1e-13
            fwd, bwd = interpolation_matrices(n_in, n_out, mode, align_corners, torch.float32, "cpu")
            ref = reference_matrix(n_in, n_out, mode, align_corners, dtype=torch.float32)
            bound = 4 * torch.finfo(torch.float32).eps * n_in
            assert (fwd - ref).abs().max() <= bound and (bwd - ref).abs().max() <= bound
            # Rows sum to one: interpolation reproduces constants.
            assert torch.allclose(ref.sum(1), torch.ones(n_out, dtype=torch.float32), atol=1e-6)


def test_scale_factor_form_of_the_reference():
    """With a scale factor F.interpolate maps output to input pixels by 1 / scale, not in / out."""
    x = torch.randn(1, 1, 7, 1, dtype=torch.float64)
    y = F.interpolate(x, scale_factor=(1.7, 1.0), mode="bicubic", align_corners=False)
    W = reference_matrix(7, y.shape[2], "bicubic", scale=1.7)
    torch.testing.assert_close(W @ x[0, 0, :, 0], y[0, 0, :, 0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(reference_matrix(7, y.shape[2], "bicubic"), W)


def test_matrices_are_cached_and_bad_input_is_clear():
    a = interpolation_matrices(14, 42, "bicubic", False, torch.float32, "cpu")
    assert interpolation_matrices(14, 42, "bicubic", False, torch.float32, "cpu")[0] is a[0]
    with pytest.raises(ValueError, match="mode must be one of"):
        reference_matrix(3, 4, "nearest")
    with pytest.raises(ValueError, match="sizes must be positive"):
        interpolation_matrices(0, 4)
    with pytest.raises(ValueError, match="do not form the 3x3 grid"):
        resize_grid_tokens(torch.zeros(1, 8, 2), (3, 3), (4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        resize_grid_tokens(torch.zeros(1, 9, 2, dtype=torch.long), (3, 3), (4, 4))


def test_models_resize_by_matmul_like_interpolate():
    """A ViT branch and a CLIP branch with pos_embed_resize="matmul": outputs and every
    gradient equal the default path to fp32 rounding; bad names are refused."""
    from piip.models.clip import CLIPVisionTransformer

    torch.manual_seed(0)
    cfg = piip.PIIPConfig(branches=(piip.BranchConfig(name="b", embed_dim=32, depth=1, num_heads=2, image_size=96, interaction_indexes=(),
                                                      pos_embed_grid=(3, 5)),), output="features")
    vit = piip.PIIP(cfg)
    clip = CLIPVisionTransformer(16, 1, 2, patch=8, image_size=32)
    for model, run, set_matmul in (
            (vit, lambda m, x: m(x)["tokens"][0], lambda m: m.set_pos_embed_resize("matmul")),
            (clip, lambda m, x: m(x), lambda m: setattr(m.embeddings, "pos_embed_resize", "matmul"))):
        img = torch.randn(2, 3, 48, 80)
        results = []
        for matmul in (False, True):
            if matmul:
                set_matmul(model)
            model.zero_grad()
            out = run(model, img)
            out.square().mean().backward()
            results.append([out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
        # Gradients that are zero up to rounding (e.g. a constant shift before a norm) are
        # compared against the largest gradient's scale.
        scale = max(t.abs().max().item() for t in results[0][1:])
        for a, b in zip(*results):
            assert (b - a).abs().max().item() <= 1e-5 * a.abs().max().item() + 1e-7 * scale
    with pytest.raises(ValueError, match="'interpolate' or 'matmul'"):
        vit.set_pos_embed_resize("bilinear")
