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

The lookups go by transformers' names, not by a list of model families, so a new model
that reaches the op one of these ways is covered too. Whatever does not match what we
implement (a changed signature, the "discrete" sampling method) stays on transformers'
code, with one log line.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from collections import Counter
from pathlib import Path
from types import MethodType

from torch import nn

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
_MISSING = object()


def kernel_repo_path() -> Path:
    """The kernel repository in this package (``metadata.json`` and the ``layers`` module),
    for ``kernels.LocalLayerRepository``, ``LOCAL_KERNELS`` or ``transformers.KernelConfig``."""
    return Path(__file__).resolve().parent


class Handle:
    """What :func:`use_in_transformers` changed; ``remove()`` puts it back (also as a
    context manager, on leaving the ``with`` block).

    Attributes:
        swapped: how many of each kind now run ours: "layer", "bound function",
            "function by name" (a family's module-level function), "kernel_config"
            (transformers models whose kernel setup now maps our layer), "new models"
            (the switch for models built afterwards).
        already: how many were ours already (a second call on the same model, a family
            function rebound by another handle, a model built under the switch).
    """

    def __init__(self):
        self.swapped: Counter = Counter()
        self.already = 0
        self._undo: list = []

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"Handle(swapped={dict(self.swapped)}, already={self.already})"


def _set(handle: Handle, obj, attr: str, value) -> None:
    """obj.attr = value, undone by handle.remove() (an attribute absent before is deleted
    again). The undo holds obj weakly: the switch for new models must not keep every
    model it touched alive."""
    previous = obj.__dict__.get(attr, _MISSING)
    setattr(obj, attr, value)
    ref = weakref.ref(obj)

    def undo():
        target = ref()
        if target is None:
            return
        if previous is _MISSING:
            target.__dict__.pop(attr, None)
        else:
            setattr(target, attr, previous)

    handle._undo.append(undo)


def _parameters(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _is_transformers_function(obj, name: str) -> bool:
    return inspect.isfunction(obj) and obj.__name__ == name and (obj.__module__ or "").startswith("transformers.")


def _ours_function(obj):
    """The name of transformers' function that ``obj`` (one of ours with its keywords
    bound) stands in for, or None."""
    if isinstance(obj, functools.partial):
        for name, (ours, _) in FUNCTIONS.items():
            if obj.func is ours:
                return name
    return None


def _is_our_forward(obj) -> bool:
    fn = getattr(obj, "__func__", obj)
    return fn is MultiScaleDeformableAttention.forward or getattr(fn, "func", None) is _layer_forward_with


def _installed_msda(obj):
    """The ``msda=`` that one of ours was installed with (None: our kernel)."""
    fn = getattr(obj, "__func__", obj)
    return getattr(fn, "keywords", {}).get("msda")


def _already(handle: Handle, obj, msda, what: str) -> None:
    """Counts one of ours found in place; a different core installed by a handle still
    held is an error rather than a silent keep."""
    if _installed_msda(obj) is not msda:
        raise RuntimeError(f"use_in_transformers: {what} already runs another implementation (msda=) installed by "
                           "a handle still held; remove() it first")
    handle.already += 1


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


# Module-level functions rebound in transformers' modules: (id of the module's globals,
# name) -> [handles holding it, transformers' function, the globals]. The last holder's
# remove() puts transformers' function back.
_rebound: dict = {}


def _rebind(handle: Handle, scope: dict, name: str, theirs, msda) -> None:
    key = (id(scope), name)
    entry = _rebound.get(key)
    if entry is None:
        scope[name] = _ours_for(name, theirs, msda)
        entry = _rebound[key] = [0, theirs, scope]
        handle.swapped["function by name"] += 1
    else:
        _already(handle, scope[name], msda, f"{scope.get('__name__')}.{name}")
    entry[0] += 1

    def undo():
        entry[0] -= 1
        if entry[0] == 0:
            scope[name] = entry[1]
            del _rebound[key]

    handle._undo.append(undo)


def _swap_module(module: nn.Module, handle: Handle, msda) -> bool:
    """Swaps whatever of ``module`` reaches the op; True if it is a decorated layer."""
    cls = type(module)
    # 1. the decorated module
    if getattr(cls, "kernel_layer_name", None) == LAYER_NAME:
        current = module.__dict__.get("forward")
        if current is not None and _is_our_forward(current):
            _already(handle, current, msda, f"{cls.__qualname__}.forward")
        elif not _signature_differs(cls.forward, _parameters(MultiScaleDeformableAttention.forward),
                                    f"{cls.__module__}.{cls.__qualname__}.forward"):
            forward = MultiScaleDeformableAttention.forward if msda is None else functools.partial(_layer_forward_with, msda=msda)
            _set(handle, module, "forward", MethodType(forward, module))
            handle.swapped["layer"] += 1
        return True
    # 2. a function bound to an attribute (D-FINE, DEIMv2)
    for attr, value in list(vars(module).items()):
        if _ours_function(value):
            _already(handle, value, msda, f"{cls.__qualname__}.{attr}")
            continue
        for name, (_, params) in FUNCTIONS.items():
            if _is_transformers_function(value, name) and not _signature_differs(value, params, f"{value.__module__}.{name}"):
                _set(handle, module, attr, _ours_for(name, value, msda))
                handle.swapped["bound function"] += 1
    # 3. a module-level function called by name from forward (RT-DETRv2, Mask2Former, OneFormer)
    forward = cls.forward
    if inspect.isfunction(forward):
        for name, (_, params) in FUNCTIONS.items():
            if name not in forward.__code__.co_names:
                continue
            scope = forward.__globals__
            current = scope.get(name)
            if _ours_function(current) == name and (id(scope), name) in _rebound:
                _rebind(handle, scope, name, _rebound[(id(scope), name)][1], msda)
            elif _is_transformers_function(current, name) and not _signature_differs(current, params, f"{current.__module__}.{name}"):
                _rebind(handle, scope, name, current, msda)
    return False


def _map_ours_in_kernel_config(model: nn.Module, handle: Handle) -> None:
    """Enters our layer in the ``kernel_config`` of ``model`` (a transformers model), so
    transformers' re-kernelization on ``.train()`` / ``.eval()`` installs ours again."""
    from transformers import KernelConfig
    from transformers.utils.import_utils import is_kernels_available

    if not is_kernels_available():  # then transformers never re-kernelizes: the swap stays
        return
    from kernels import LocalLayerRepository

    repo = LocalLayerRepository(repo_path=kernel_repo_path(), layer_name=LAYER_NAME)
    entry = dict.fromkeys(KERNEL_DEVICES, repo)
    if model.kernel_config is not None and model.kernel_config.kernel_mapping.get(LAYER_NAME) == entry:
        handle.already += 1
        return
    if model.kernel_config is None:
        _set(handle, model, "kernel_config", KernelConfig(kernel_mapping={LAYER_NAME: entry}))
    else:
        _set(handle, model.kernel_config, "kernel_mapping", {**model.kernel_config.kernel_mapping, LAYER_NAME: entry})
    handle.swapped["kernel_config"] += 1


def enable(model: nn.Module, msda=None, handle: Handle | None = None, quiet: bool = False) -> Handle:
    """Swaps every deformable attention of ``model`` for ours (see the module docstring),
    recording what it changed in ``handle`` (a new one by default)."""
    handle = Handle() if handle is None else handle
    before = sum(handle.swapped.values()) + handle.already
    undone = len(handle._undo)
    holders = []  # transformers models (with a kernel_config) above a decorated layer
    stack = [(model, [])]
    try:
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
    except BaseException:  # all or nothing: put back what this call changed
        for undo in reversed(handle._undo[undone:]):
            undo()
        del handle._undo[undone:]
        raise
    if not quiet and sum(handle.swapped.values()) + handle.already == before:
        logger.warning(f"piip_kernels.hf: found no multi-scale deformable attention in {type(model).__name__}")
    return handle


# The switch for models built afterwards: PreTrainedModel.post_init (the last step of every
# transformers model's __init__) is wrapped to call enable() on the new model, recording into
# the switch's handle. One switch at a time.
_switch: dict = {"handle": None}


def enable_for_new_models() -> Handle:
    from transformers import PreTrainedModel

    if _switch["handle"] is not None:
        raise RuntimeError("use_in_transformers(): the switch for new models is already on; remove() its handle first")
    handle = Handle()
    original = PreTrainedModel.__dict__["post_init"]

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        enable(self, handle=handle, quiet=True)
        return result

    def undo():  # recorded first, so it runs last: the models built meanwhile are put back first
        PreTrainedModel.post_init = original
        _switch["handle"] = None

    handle._undo.append(undo)
    PreTrainedModel.post_init = post_init
    _switch["handle"] = handle
    handle.swapped["new models"] = 1
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
