"""``use_in_transformers``: find every multi-scale deformable attention in a transformers
model and make it run ours.

transformers 5.x reaches the op three ways, and each is swapped where it is looked up:

1. a ``MultiScaleDeformableAttention`` module decorated for the `kernels` library
   (Deformable DETR, RT-DETR v1, Grounding DINO, MM Grounding DINO, OmDet-Turbo, LW-DETR,
   RF-DETR, PP-DocLayout): the instance's ``forward`` becomes our layer's, as the
   `kernels` library itself sets it. ``.train()`` / ``.eval()`` of a model that uses
   kernels (``from_pretrained`` turns them on) re-run transformers' kernel setup from the
   model's ``kernel_config``, so ours is entered there too (CPU and CUDA), over
   transformers' default mapping, which would otherwise put back its own code or the
   Deformable DETR kernel downloaded from the hub;
2. a function bound to an attribute in ``__init__`` (D-FINE and DEIMv2 bind
   ``multi_scale_deformable_attention_v2`` as ``ms_deformable_attn_core``): the
   attribute is replaced, for this instance;
3. a module-level function called by name from a module's ``forward`` (RT-DETRv2:
   ``multi_scale_deformable_attention_v2``; Mask2Former, OneFormer:
   ``multi_scale_deformable_attention``): the name is rebound in transformers' module, so
   every model of that family in the process runs ours while a handle holds it (the
   name is looked up at call time and nothing tells it which model calls; rebinding it
   per instance, over a copy of the module's globals, breaks ``torch.compile``'s guards,
   which read globals from the module itself). The last ``remove()`` puts it back.

Every swap goes through piip_kernels' one swap mechanism (``piip_kernels._swap``): each
place is held by every handle that asked for it and goes back to transformers' code when
the last of them is removed, in any order; a call that stops on an error puts back what it
had swapped.

The lookups go by transformers' names, not by a list of model families, so a new model
that reaches the op one of these ways is covered too. Whatever does not match what we
implement (a changed signature, the "discrete" sampling method) stays on transformers'
code, with one log line.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from types import MethodType

from torch import nn

from piip_kernels import _swap
from piip_kernels.hf import functions
from piip_kernels.hf.functions import log_once, logger
from piip_kernels.hf.layers import MultiScaleDeformableAttention

LAYER_NAME = "MultiScaleDeformableAttention"
# transformers' function name -> (ours, the parameters both take, in order)
FUNCTIONS = {
    "multi_scale_deformable_attention": (
        functions.multi_scale_deformable_attention,
        ("value", "value_spatial_shapes", "sampling_locations", "attention_weights")),
    "multi_scale_deformable_attention_v2": (
        functions.multi_scale_deformable_attention_v2,
        ("value", "value_spatial_shapes", "sampling_locations", "attention_weights", "num_points_list", "method")),
}
# The `kernels` library device types our layer is registered for in a model's kernel_config.
KERNEL_DEVICES = ("cpu", "cuda")
OWNER = "use_in_transformers"


def kernel_repo_path() -> Path:
    """The kernel repository in this package (``metadata.json`` and the ``layers`` module),
    for ``kernels.LocalLayerRepository``, ``LOCAL_KERNELS`` or ``transformers.KernelConfig``."""
    return Path(__file__).resolve().parent


class Handle(_swap.Handle):
    """What :func:`use_in_transformers` swapped (piip_kernels' shared swap mechanism):
    ``remove()`` gives it back (also as a context manager, on leaving the ``with`` block).
    Each swapped place is counted across handles and goes back to transformers' code only
    when the last handle holding it is removed, in any order.

    Attributes:
        swapped: what this handle holds, by kind: "layer", "bound function", "function by
            name" (a family's module-level function), "kernel_config" (transformers models
            whose kernel setup maps our layer), "new models" (the switch for models built
            afterwards).
        already: how many of those were ours already (held by another handle: a second
            call on the same model, a family function, a model built under the switch),
            plus layers found running ours with no handle's swap (not held).
    """

    def __init__(self):
        super().__init__(OWNER)


def _parameters(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _is_transformers_function(obj, name: str) -> bool:
    return inspect.isfunction(obj) and obj.__name__ == name and (obj.__module__ or "").startswith("transformers.")


def _ours_function(obj):
    """The name of transformers' function that ``obj`` (one of ours with its keywords
    bound) stands in for, or None."""
    obj = obj.fn if isinstance(obj, _swap.HeldCall) else obj
    if isinstance(obj, functools.partial):
        for name, (ours, _) in FUNCTIONS.items():
            if obj.func is ours:
                return name
    return None


def _is_our_forward(obj) -> bool:
    obj = obj.fn if isinstance(obj, _swap.HeldCall) else obj
    fn = getattr(obj, "__func__", obj)
    return fn is MultiScaleDeformableAttention.forward or getattr(fn, "func", None) is _layer_forward_with


def _layer_forward_with(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                        sampling_locations, attention_weights, im2col_step, *, msda):
    """Our layer's forward with another core (``msda=``: benchmarks of other kernels)."""
    return msda(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _ours_for(name: str, theirs, msda):
    """Our function in place of transformers' ``name`` (theirs stays the fallback of v2's
    "discrete" method)."""
    ours, _ = FUNCTIONS[name]
    keywords = {"msda": msda} if msda is not None else {}
    if name.endswith("_v2"):
        keywords["fallback"] = theirs
    return functools.partial(ours, **keywords)


def _signature_differs(theirs, expected: tuple[str, ...], what: str) -> bool:
    if _parameters(theirs) == expected:
        return False
    log_once(f"piip_kernels.hf: {what}{inspect.signature(theirs)} is not the signature ours implements; "
             "it stays on transformers' code")
    return True


def _layer(module: nn.Module, handle: Handle, msda) -> None:
    """A decorated layer: the instance's ``forward`` becomes our layer's."""
    cls = type(module)
    what = f"{cls.__module__}.{cls.__qualname__}.forward"
    current = module.__dict__.get("forward")
    if _swap.held(module, "forward") is None:
        if current is not None and _is_our_forward(current) and msda is None:
            handle.found_ours()  # kernelized to our layer by the kernels library itself
            return
        if _signature_differs(cls.forward, _parameters(MultiScaleDeformableAttention.forward), what):
            return
    forward = MultiScaleDeformableAttention.forward if msda is None else functools.partial(_layer_forward_with, msda=msda)
    # The bound method refers back to the module: the swap keeps a predicate, not the value.
    _swap.swap(handle, module, "forward", MethodType(forward, module), kind="layer", what=what, impl=msda,
               ours=_is_our_forward, follow=True)


def _bound_functions(module: nn.Module, handle: Handle, msda) -> None:
    """Functions bound to an attribute in ``__init__`` (D-FINE, DEIMv2)."""
    for attr, value in list(vars(module).items()):
        what = f"{type(module).__qualname__}.{attr}"
        held = _swap.held(module, attr)
        if held is not None:  # ours, or another swap of this module (its kernel_config, ...)
            if held.kind == "bound function":
                _swap.swap(handle, module, attr, None, kind="bound function", what=what, impl=msda)
        elif _ours_function(value):
            handle.found_ours()
        else:
            for name, (_, params) in FUNCTIONS.items():
                if _is_transformers_function(value, name) and not _signature_differs(value, params, f"{value.__module__}.{name}"):
                    _swap.swap(handle, module, attr, _ours_for(name, value, msda), kind="bound function", what=what, impl=msda,
                               follow=True)


def _functions_by_name(module: nn.Module, handle: Handle, msda) -> None:
    """A module-level function called by name from ``forward`` (RT-DETRv2, Mask2Former,
    OneFormer): rebound in transformers' module, for the whole family."""
    forward = type(module).forward
    if not inspect.isfunction(forward):
        return
    scope = forward.__globals__
    for name, (_, params) in FUNCTIONS.items():
        if name not in forward.__code__.co_names:
            continue
        current = scope.get(name)
        what = f"{scope.get('__name__')}.{name}"
        if _swap.held(scope, name, item=True) is not None:
            _swap.swap(handle, scope, name, None, kind="function by name", what=what, impl=msda, item=True)
        elif _ours_function(current) == name:
            handle.found_ours()
        elif _is_transformers_function(current, name) and not _signature_differs(current, params, f"{current.__module__}.{name}"):
            _swap.swap(handle, scope, name, _ours_for(name, current, msda), kind="function by name", what=what, impl=msda,
                       item=True)


def _swap_module(module: nn.Module, handle: Handle, msda) -> bool:
    """Swaps whatever of ``module`` reaches the op; True if it is a decorated layer."""
    if getattr(type(module), "kernel_layer_name", None) == LAYER_NAME:
        _layer(module, handle, msda)
        return True
    _bound_functions(module, handle, msda)
    _functions_by_name(module, handle, msda)
    return False


def _map_ours_in_kernel_config(model: nn.Module, handle: Handle) -> None:
    """Enters our layer in the ``kernel_config`` of ``model`` (a transformers model), so
    transformers' re-kernelization on ``.train()`` / ``.eval()`` installs ours again."""
    from transformers import KernelConfig
    from transformers.utils.import_utils import is_kernels_available

    if not is_kernels_available():  # then transformers never re-kernelizes: the swap stays
        return
    from kernels import LocalLayerRepository

    config = model.kernel_config
    what = f"{type(model).__name__}.kernel_config"
    if _swap.held(model, "kernel_config") is not None:
        _swap.swap(handle, model, "kernel_config", None, kind="kernel_config", what=what)
    elif config is not None and _swap.held(config, "kernel_mapping") is not None:
        _swap.swap(handle, config, "kernel_mapping", None, kind="kernel_config", what=what)
    else:
        entry = dict.fromkeys(KERNEL_DEVICES, LocalLayerRepository(repo_path=kernel_repo_path(), layer_name=LAYER_NAME))
        if config is None:
            _swap.swap(handle, model, "kernel_config", KernelConfig(kernel_mapping={LAYER_NAME: entry}), kind="kernel_config",
                       what=what, follow=True)
        elif config.kernel_mapping.get(LAYER_NAME) == entry:
            handle.found_ours()
        else:
            _swap.swap(handle, config, "kernel_mapping", {**config.kernel_mapping, LAYER_NAME: entry}, kind="kernel_config",
                       what=what, follow=True)


def enable(model: nn.Module, msda=None, handle: Handle | None = None, quiet: bool = False) -> Handle:
    """Swaps every deformable attention of ``model`` for ours (see the module docstring),
    recording what it holds in ``handle`` (a new one by default); all or nothing."""
    handle = Handle() if handle is None else handle
    before = handle.taken()
    holders = []  # transformers models (with a kernel_config) above a decorated layer
    stack = [(model, [])]
    with _swap.all_or_nothing(handle):
        while stack:  # depth first, keeping the transformers models above each module
            module, above = stack.pop()
            if hasattr(module, "kernel_config") and hasattr(module, "set_use_kernels"):
                above = above + [module]
            if _swap_module(module, handle, msda):
                holders += [m for m in above if not any(m is h for h in holders)]
            stack += [(child, above) for child in module.children()]
        if msda is None:
            for holder in holders:
                _map_ours_in_kernel_config(holder, handle)
    if not quiet and handle.taken() == before:
        logger.warning(f"piip_kernels.hf: found no multi-scale deformable attention in {type(model).__name__}")
    return handle


def enable_for_new_models() -> Handle:
    """The switch for models built afterwards: PreTrainedModel.post_init (the last step of
    every transformers model's ``__init__``) is wrapped to call enable() on the new model,
    recording into the switch's handle. One switch at a time. Its own hold is taken first,
    so ``remove()`` gives back the models built meanwhile before it."""
    from transformers import PreTrainedModel

    if _swap.held(PreTrainedModel, "post_init") is not None:
        raise RuntimeError("use_in_transformers(): the switch for new models is already on; remove() its handle first")
    handle = Handle()
    original = PreTrainedModel.__dict__["post_init"]

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        enable(self, handle=handle, quiet=True)
        return result

    _swap.swap(handle, PreTrainedModel, "post_init", post_init, kind="new models", what="transformers.PreTrainedModel.post_init")
    return handle


def use_in_transformers(model: nn.Module | None = None, *, msda=None) -> Handle:
    """Makes transformers' deformable detectors run our multi-scale deformable attention.

    Args:
        model: a model (or any module holding transformers' deformable attention) to
            switch now; None: every transformers model built afterwards (the end of its
            ``__init__`` switches it), until ``remove()``.
        msda: the core to run instead of ``piip_kernels.ms_deform_attn``, as
            ``msda(value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights) -> [N, Lq, M*D]`` (benchmarks time other kernels this way;
            only with a model, and without the ``kernel_config`` entry, which names our layer).

    Returns:
        A :class:`Handle`: ``swapped`` counts what changed, ``remove()`` puts it back
        (for None: also in the models built meanwhile).

    RT-DETRv2, Mask2Former and OneFormer call a module-level function by name: it is
    rebound for the whole family while a handle holds it (see the module docstring).
    Outputs and gradients equal transformers' to floating-point rounding; the "discrete"
    sampling method (RT-DETRv2, D-FINE, DEIMv2) stays on transformers' code.
    """
    if model is None:
        if msda is not None:
            raise ValueError("use_in_transformers: msda= needs a model (the switch for new models always installs ours)")
        return enable_for_new_models()
    if not isinstance(model, nn.Module):
        raise TypeError(f"use_in_transformers: model must be a torch.nn.Module or None, got {type(model).__name__}")
    return enable(model, msda=msda)
