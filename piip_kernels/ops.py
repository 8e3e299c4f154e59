"""Every public op of piip_kernels in one place: schema, fake kernel, autograd
and FLOP formula.

The ops take the backend name as their last argument so that one schema
serves every compiled backend; the user-facing functions (``piip_kernels.ms_deform_attn``
and friends) check inputs, choose the backend and call these ops. The
``reference`` backend never comes here: it is plain PyTorch and differentiates
through ordinary ops.

Ops:
  piip::ms_deform_attn(value [N,S,M,D], spatial_shapes [L,2], level_start_index [L],
                       sampling_locations [N,Lq,M,L,P,2], attention_weights [N,Lq,M,L,P],
                       backend, deterministic=False) -> [N, Lq, M*D]
  piip::ms_deform_attn_backward(grad_output [N,Lq,M*D], <the five inputs>, backend)
                       -> (grad_value, grad_sampling_locations, grad_attention_weights)
  piip::deform_cross_attn(value [N,Hv*Wv,M,D], offsets [N,Hq*Wq,M,P,2], logits [N,Hq*Wq,M,P],
                       value_hw [2], query_hw [2], backend) -> [N, Hq*Wq, M*D]
  piip::deform_cross_attn_backward(grad_output, <the five inputs>, backend)
                       -> (grad_value, grad_offsets, grad_logits)
  piip::branch_merge(features [N,C,H_i,W_i] x B, weights [B], out_size [2], align_corners,
                       backend) -> [N, C, Ho, Wo]
  piip::branch_merge_backward(grad_output, features, weights, align_corners, backend)
                       -> (grad_features, grad_weights)

FLOP formulas count multiply-accumulates (MACs) in ``*_macs`` (the convention of
fvcore and the PIIP paper); ``torch.utils.flop_counter`` wants FLOPs, registered
as 2 x MACs.

Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``): torch.library takes
backward formulas only, and a dual input would reach an op as its primal with its tangent
dropped. The public functions therefore take the tangents off their inputs
(:func:`split_duals`), call themselves on the primals and attach the tangent of their op's
formula (``*_tangent`` in the api.py files; the ops are linear in values and weights, so it
is mostly the op applied to tangents). Reverse mode over those tangents works. What would
drop a tangent raises instead: nested forward mode (a jvp of a jvp), and dual inputs of the
ops themselves or of their backward formulas (forward over reverse).
"""
from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

# --- forward-mode AD -----------------------------------------------------------------


def split_duals(tensors) -> tuple[list, list] | None:
    """(primals, tangents) of ``tensors`` under forward-mode AD (tangent None where a tensor
    has none), or None when no tensor has a tangent, the usual case: then it costs a few
    comparisons. Refuses nested forward-mode transforms (see _forward_transforms)."""
    if torch.compiler.is_compiling():  # traced inputs carry no tangent
        return None
    if _forward_transforms() > 1:
        raise NotImplementedError(
            "piip ops do not support nested forward-mode AD (torch.func.jvp of jvp, jacfwd of jacfwd): the inner "
            "transform cannot see the outer one's tangents, which would be dropped. First-order jvp / jacfwd / "
            "torch.autograd.forward_ad work, and reverse mode over them (torch.autograd.grad of a tangent).")
    unpacked = [fwAD.unpack_dual(t) for t in tensors]
    if all(u.tangent is None for u in unpacked):
        return None
    return [u.primal for u in unpacked], [u.tangent for u in unpacked]


def _forward_transforms() -> int:
    """How many torch.func forward-mode transforms (jvp, jacfwd) are active. Under two, the
    inner one's code sees only its own tangents: the outer tangents of what it passes to an
    op would be lost, since the op has no forward formula that the outer transform could use."""
    stack = torch._C._functorch.get_interpreter_stack()
    return 0 if not stack else sum(ci.key() == torch._C._functorch.TransformType.Jvp for ci in stack)


def with_tangent(primal: Tensor, tangent: Tensor) -> Tensor:
    """``primal`` carrying ``tangent`` at the current forward-AD level."""
    return fwAD.make_dual(primal, tangent.to(primal.dtype))


def forward_mode(fn, tangent_fn, args: tuple, positions: tuple, **kw) -> Tensor | None:
    """For a public function ``fn(*args, **kw)`` whose tensors at ``positions`` may be dual:
    None when none carries a tangent (fn goes on as usual), else fn on the primals, carrying
    ``tangent_fn(*primal args, *tangents at positions, **kw)``."""
    duals = split_duals([args[i] for i in positions])
    if duals is None:
        return None
    args = list(args)
    for i, primal in zip(positions, duals[0]):
        args[i] = primal
    return with_tangent(fn(*args, **kw), tangent_fn(*args, *duals[1], **kw))


def refuse_duals(what: str, tensors) -> None:
    """Raises where a tangent would otherwise be dropped silently."""
    if split_duals(tensors) is not None:
        raise NotImplementedError(
            f"{what} has no forward-mode AD formula of its own: call the public function "
            "(piip_kernels.ms_deform_attn, deform_cross_attn or branch_merge), which gives tangents. Forward over "
            "reverse (a jvp of a gradient) is not supported; reverse over forward (torch.autograd.grad of a "
            "tangent) is.")

# --- kernels of the compiled and Triton backends ------------------------------


def _private_op(name: str):
    """The private op ``torch.ops.piip_C.<name>`` (tests replace this lookup with a recorder)."""
    from . import _ext  # noqa: F401  (loads the piip_C registrations)

    return getattr(torch.ops.piip_C, name)


def _kernels(prefix: str, backend: str):
    """(forward, backward) callables ``piip_C::<prefix>_forward/_backward`` of a compiled backend."""
    if backend in ("cpu", "cuda"):
        return _private_op(prefix + "_forward"), _private_op(prefix + "_backward")
    raise RuntimeError(f"{prefix}: no compiled kernels for backend {backend!r}")


def _variant(op: str, backend: str, tensor: Tensor, sizes) -> tuple:
    """The trailing ``variant`` argument of a private op: the tuned table's choice
    (piip_kernels/tuned) on the CUDA backend; nothing (the op's default, 0) elsewhere, so the
    CPU path never reads a table. ``sizes(tuned)``: the call's shape-class sizes."""
    if backend != "cuda":
        return ()
    from . import tuned

    return (tuned.choose(op, tensor, **sizes(tuned)),)


def _msda_kernels(backend: str, deterministic: bool = False):
    """(forward, backward) of ms_deform_attn for a backend, both taking (..., value, shapes,
    starts, loc, attn). The CPU backward is always deterministic; the GPU ones scatter with
    atomics unless ``deterministic``. On CUDA each call passes the tuned kernel variant."""
    if backend == "triton":
        from .msda import triton as tk

        return tk.msda_forward, functools.partial(tk.msda_backward, deterministic=deterministic)
    forward, backward = _kernels("msda", backend)
    backward_op = "msda_backward"
    if backend == "cuda" and deterministic:
        backward_op = "msda_backward_deterministic"
        backward = _private_op(backward_op)

    def fwd(value, shapes, starts, loc, attn):
        sizes = lambda t: t.msda_sizes(value.shape, loc.shape)  # noqa: E731
        return forward(value, shapes, starts, loc, attn, *_variant("msda_forward", backend, value, sizes))

    def bwd(grad_output, value, shapes, starts, loc, attn):
        sizes = lambda t: t.msda_sizes(value.shape, loc.shape)  # noqa: E731
        return backward(grad_output, value, shapes, starts, loc, attn, *_variant(backward_op, backend, value, sizes))

    return fwd, bwd


# --- multi-scale deformable attention --------------------------------------


def msda_macs(value_shape, sampling_locations_shape) -> int:
    """Forward MACs: per query, head, level and point, 4 bilinear corners plus the
    attention weight, on each of the D channels."""
    N, _, M, D = value_shape
    _, Lq, _, L, P, _ = sampling_locations_shape
    return 5 * N * Lq * M * L * P * D


def msda_backward_macs(value_shape, sampling_locations_shape) -> int:
    """Backward MACs: per point and channel, 4 corner dot products with grad_output
    (for the location and weight gradients) and 4 corner scatters into grad_value."""
    N, _, M, D = value_shape
    _, Lq, _, L, P, _ = sampling_locations_shape
    return 8 * N * Lq * M * L * P * D


@torch.library.custom_op("piip::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
    deterministic: bool = False,
) -> Tensor:
    refuse_duals("piip::ms_deform_attn", (value, sampling_locations, attention_weights))
    forward, _ = _msda_kernels(backend)
    return forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend, deterministic=False):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.custom_op("piip::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _msda_kernels(backend, deterministic)
    return backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend, deterministic=False):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _msda_setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend, deterministic = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend, ctx.deterministic = backend, deterministic


def _msda_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    refuse_duals("the backward of piip::ms_deform_attn", (grad_output, value, sampling_locations, attention_weights))
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        ctx.backend, ctx.deterministic,
    )
    return grad_value, None, None, grad_loc, grad_attn, None, None


ms_deform_attn_op.register_autograd(_msda_backward, setup_context=_msda_setup_context)


@register_flop_formula(torch.ops.piip.ms_deform_attn)
def _(value_shape, spatial_shapes_shape, level_start_index_shape, loc_shape, *args, **kwargs) -> int:
    return 2 * msda_macs(value_shape, loc_shape)


@register_flop_formula(torch.ops.piip.ms_deform_attn_backward)
def _(grad_output_shape, value_shape, spatial_shapes_shape, level_start_index_shape, loc_shape, *args, **kwargs) -> int:
    return 2 * msda_backward_macs(value_shape, loc_shape)


# --- fused deformable cross-attention (PIIP interactions) --------------------------


def deform_cross_attn_macs(value_shape, offsets_shape) -> int:
    """Forward MACs: the one-level sampling of ms_deform_attn (4 corners + weight per
    point and channel); reference points, offset scaling and the softmax are O(points)."""
    N, _, M, D = value_shape
    _, Lq, _, P, _ = offsets_shape
    return 5 * N * Lq * M * P * D


def _dca_kernels(backend: str, deterministic: bool = False):
    """(forward, backward) of deform_cross_attn, both taking (..., value_hw, query_hw)."""
    if backend == "triton":
        from .dca import triton as tk

        return tk.dca_forward, functools.partial(tk.dca_backward, deterministic=deterministic)
    forward, backward = _kernels("dca", backend)
    return (lambda v, o, lg, vhw, qhw: forward(v, o, lg, *vhw, *qhw),
            lambda g, v, o, lg, vhw, qhw: backward(g, v, o, lg, *vhw, *qhw, deterministic))


@torch.library.custom_op("piip::deform_cross_attn", mutates_args=())
def deform_cross_attn_op(value: Tensor, offsets: Tensor, logits: Tensor, value_hw: list[int], query_hw: list[int],
                         backend: str, deterministic: bool = False) -> Tensor:
    refuse_duals("piip::deform_cross_attn", (value, offsets, logits))
    forward, _ = _dca_kernels(backend)
    return forward(value, offsets, logits, value_hw, query_hw)


@deform_cross_attn_op.register_fake
def _(value, offsets, logits, value_hw, query_hw, backend, deterministic=False):
    N, _, M, D = value.shape
    return value.new_empty(N, offsets.shape[1], M * D)


@torch.library.custom_op("piip::deform_cross_attn_backward", mutates_args=())
def deform_cross_attn_backward_op(grad_output: Tensor, value: Tensor, offsets: Tensor, logits: Tensor,
                                  value_hw: list[int], query_hw: list[int], backend: str,
                                  deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _dca_kernels(backend, deterministic)
    return backward(grad_output, value, offsets, logits, value_hw, query_hw)


@deform_cross_attn_backward_op.register_fake
def _(grad_output, value, offsets, logits, value_hw, query_hw, backend, deterministic=False):
    return torch.empty_like(value), torch.empty_like(offsets), torch.empty_like(logits)


def _dca_setup_context(ctx, inputs, output):
    value, offsets, logits, value_hw, query_hw, backend, deterministic = inputs
    ctx.save_for_backward(value, offsets, logits)
    ctx.hw, ctx.backend, ctx.deterministic = (value_hw, query_hw), backend, deterministic


def _dca_backward(ctx, grad_output):
    value, offsets, logits = ctx.saved_tensors
    refuse_duals("the backward of piip::deform_cross_attn", (grad_output, value, offsets, logits))
    gv, goff, glog = deform_cross_attn_backward_op(grad_output.contiguous(), value, offsets, logits, *ctx.hw,
                                                   ctx.backend, ctx.deterministic)
    return gv, goff, glog, None, None, None, None


deform_cross_attn_op.register_autograd(_dca_backward, setup_context=_dca_setup_context)


@register_flop_formula(torch.ops.piip.deform_cross_attn)
def _(value_shape, offsets_shape, *args, **kwargs) -> int:
    return 2 * deform_cross_attn_macs(value_shape, offsets_shape)


@register_flop_formula(torch.ops.piip.deform_cross_attn_backward)
def _(grad_output_shape, value_shape, offsets_shape, *args, **kwargs) -> int:
    return 2 * 8 * deform_cross_attn_macs(value_shape, offsets_shape) // 5


# --- branch merge ----------------------------------------------------------------


def branch_merge_macs(feature_shapes, out_size) -> int:
    """Forward MACs: per output element and branch, 4 bilinear taps plus the weight
    (only the weight for a branch already at the output size)."""
    N, C = feature_shapes[0][:2]
    Ho, Wo = out_size
    return sum((1 if tuple(s[2:]) == (Ho, Wo) else 5) * N * C * Ho * Wo for s in feature_shapes)


def branch_merge_out_dtype(features, weights) -> torch.dtype:
    """The merged map's dtype: the maps' dtype promoted with the weights' (fp32 weights
    give an fp32 map, as the official merge, which upsamples in fp32)."""
    return torch.promote_types(features[0].dtype, weights.dtype)


def _merge_kernels(backend: str):
    """(forward(features, weights, out_size, align_corners), backward(grad, features, weights, align_corners))."""
    if backend == "triton":
        from .merge import triton as tk

        return tk.merge_forward, tk.merge_backward
    forward, backward = _kernels("merge", backend)

    def fwd(f, w, size, ac):
        variant = _variant("merge_forward", backend, f[0], lambda t: t.merge_sizes(f[0].shape, size))
        return forward(f, w, size[0], size[1], ac, branch_merge_out_dtype(f, w), *variant)

    def bwd(grad_output, f, w, ac):
        sizes = lambda t: t.merge_sizes(grad_output.shape, grad_output.shape[2:])  # noqa: E731
        return backward(grad_output, f, w, ac, *_variant("merge_backward", backend, f[0], sizes))

    return fwd, bwd


@torch.library.custom_op("piip::branch_merge", mutates_args=())
def branch_merge_op(features: list[Tensor], weights: Tensor, out_size: list[int], align_corners: bool,
                    backend: str) -> Tensor:
    refuse_duals("piip::branch_merge", (*features, weights))
    forward, _ = _merge_kernels(backend)
    return forward(features, weights, out_size, align_corners)


@branch_merge_op.register_fake
def _(features, weights, out_size, align_corners, backend):
    N, C = features[0].shape[:2]
    return features[0].new_empty(N, C, out_size[0], out_size[1], dtype=branch_merge_out_dtype(features, weights))


@torch.library.custom_op("piip::branch_merge_backward", mutates_args=())
def branch_merge_backward_op(grad_output: Tensor, features: list[Tensor], weights: Tensor, align_corners: bool,
                             backend: str) -> tuple[list[Tensor], Tensor]:
    _, backward = _merge_kernels(backend)
    grads, grad_weights = backward(grad_output, features, weights, align_corners)
    return list(grads), grad_weights


@branch_merge_backward_op.register_fake
def _(grad_output, features, weights, align_corners, backend):
    return [torch.empty_like(f, memory_format=torch.contiguous_format) for f in features], torch.empty_like(weights)


def _merge_setup_context(ctx, inputs, output):
    features, weights, out_size, align_corners, backend = inputs
    ctx.save_for_backward(weights, *features)
    ctx.align_corners, ctx.backend = align_corners, backend


def _merge_backward(ctx, grad_output):
    weights, *features = ctx.saved_tensors
    refuse_duals("the backward of piip::branch_merge", (grad_output, weights, *features))
    grads, grad_weights = branch_merge_backward_op(grad_output.contiguous(), features, weights, ctx.align_corners, ctx.backend)
    return list(grads), grad_weights, None, None, None


branch_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)


@register_flop_formula(torch.ops.piip.branch_merge)
def _(feature_shapes, weights_shape, out_size, *args, **kwargs) -> int:
    return 2 * branch_merge_macs(feature_shapes, out_size)


@register_flop_formula(torch.ops.piip.branch_merge_backward)
def _(grad_output_shape, feature_shapes, *args, **kwargs) -> int:
    # Every tap is gathered once for the map gradient and once more for the weight's.
    return 2 * 2 * branch_merge_macs(feature_shapes, grad_output_shape[2:])
