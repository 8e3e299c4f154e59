"""What the integrations share besides the swap mechanism (``piip_kernels._swap``): when to
keep a library's own code, how a library's shapes become our index tensors, and one
instance's ``forward`` with a module-level name of its own."""
from __future__ import annotations

import functools
import importlib
import types

import torch
from torch import Tensor, nn

from piip_kernels import _swap

from piip_kernels.hf.functions import level_tensors  # noqa: F401  (re-exported: list or tensor of (H, W) -> index tensors)


def exporting() -> bool:
    """Whether the model is being exported or traced (ONNX, TorchScript tracing,
    ``torch.export``): the library's own code runs then, so the exported graph holds only
    standard operators that the library's deployment tools know."""
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting())


def unfold_points(locations: Tensor, weights: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Locations [N, Lq, M, L*P, 2] and weights [N, Lq, M, L*P] (levels and points folded
    into one axis, level-major) as our op's [N, Lq, M, L, P, 2] and [N, Lq, M, L, P]; the
    unfolded layout passes through. Views, no copy."""
    if locations.dim() == 5:
        N, Lq, M, LP, _ = locations.shape
        if LP % levels:
            raise ValueError(f"sampling_locations has {LP} points per head, not a multiple of the {levels} levels")
        locations = locations.view(N, Lq, M, levels, LP // levels, 2)
    if weights.dim() == 4:
        N, Lq, M, LP = weights.shape
        weights = weights.view(N, Lq, M, levels, LP // levels)
    return locations, weights


# (id of a module's globals, name, id of the value) -> (the globals, the value, the copy);
# the first two are kept so that the ids stay theirs.
_scopes: dict = {}


def _scope(globals_: dict, name: str, value) -> dict:
    key = (id(globals_), name, id(value))
    if key not in _scopes:
        _scopes[key] = (globals_, value, {**globals_, name: value})
    return _scopes[key][2]


def forward_calling(cls_forward: types.FunctionType, name: str, value):
    """``cls_forward`` with the module-level ``name`` it looks up bound to ``value``: the same
    code over a copy of its module's globals (one copy per module, name and value, shared by
    every instance). For one model's instances, where rebinding the name in the library's
    module would switch every model of the process."""
    scope = _scope(cls_forward.__globals__, name, value)
    forward = types.FunctionType(cls_forward.__code__, scope, cls_forward.__name__, cls_forward.__defaults__,
                                 cls_forward.__closure__)
    forward.__kwdefaults__ = cls_forward.__kwdefaults__
    forward.__qualname__ = cls_forward.__qualname__
    forward.__wrapped_by_piip__ = (cls_forward, name, value)
    return forward


@functools.lru_cache(maxsize=None)
def _ours(core, theirs):
    # One partial per (core, their function): every swap of the same name shares it, so
    # the per-instance copies of a module's globals are shared too.
    return functools.partial(core, theirs=theirs)


def _is_forward_calling(name: str):
    def check(current) -> bool:
        fn = getattr(current, "__func__", None)
        return getattr(fn, "__wrapped_by_piip__", (None, None, None))[1] == name
    return check


def swap_function_by_name(owner: str, module_name: str, class_name: str, name: str, core, model: nn.Module | None
                          ) -> _swap.Handle:
    """The integrations whose attention module's ``forward`` calls a module-level function
    ``name`` of ``module_name`` (Ultralytics, RF-DETR): ``core(..., theirs=<their function>)``
    in its place. ``model`` None: the name, in every loaded module that binds their function
    (every model of the process); a module: a ``forward`` of its own (:func:`forward_calling`)
    for each of its ``class_name`` instances (kind "layer")."""
    library = importlib.import_module(module_name)
    scope = vars(library)
    held = _swap.held(scope, name, item=True)
    theirs = held.original if held is not None else scope[name]  # theirs, also where a handle swapped it
    ours = _ours(core, theirs)
    handle = _swap.Handle(owner)
    with _swap.all_or_nothing(handle):
        if model is None:
            _swap.swap_references(handle, theirs, ours, kind="function by name")
            return handle
        is_ours = _is_forward_calling(name)
        for module in model.modules():
            if not isinstance(module, getattr(library, class_name)):
                continue
            what = f"{type(module).__qualname__}.forward"
            if _swap.held(module, "forward") is None and is_ours(module.__dict__.get("forward")):
                handle.found_ours()
                continue
            forward = forward_calling(type(module).forward, name, ours)
            # The bound method refers back to the module: the swap keeps a predicate, not the value.
            # Not `follow` (as the transformers and RT-DETRv2 swaps are): torch.compile cannot
            # build guards through a wrapper around a forward with globals of its own.
            _swap.swap(handle, module, "forward", forward.__get__(module), kind="layer", what=what, ours=is_ours)
    if handle.taken() == 0:
        _swap.log_once(f"{owner}: found no {module_name}.{class_name} in {type(model).__name__}")
    return handle


def torch_module(owner: str, model, kind: str) -> nn.Module:
    """The nn.Module inside a library's model object (``ultralytics.RTDETR(...).model``,
    ``rfdetr.RFDETRBase().model.model``), or the module itself."""
    found = model
    for _ in range(3):
        if isinstance(found, nn.Module):
            return found
        found = getattr(found, "model", None)
    raise TypeError(f"{owner}: model must be a torch.nn.Module, {kind} or None, got {type(model).__name__}")
