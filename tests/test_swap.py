"""piip_kernels._swap: the one swap mechanism of every integration. Handles are removed in
every order; an install that fails puts back what it changed; swapped objects are held
weakly; a target changed by other code after the swap is left to that code."""
import gc
import itertools
import logging
import types
import weakref

import pytest

from piip_kernels import _swap


def theirs(x):
    return ("theirs", x)


def ours(x):
    return ("ours", x)


class Layer:
    def forward(self, x):
        return theirs(x)


def targets():
    """Fresh places of each kind: a module's global, an instance attribute absent before,
    an instance attribute present before, a class attribute."""
    module = types.ModuleType("library")
    module.core = theirs
    layer = Layer()
    layer.core = theirs
    cls = type("Decorated", (Layer,), {})
    return module, layer, cls


def swap_all(handle, module, layer, cls):
    _swap.swap(handle, vars(module), "core", ours, kind="function by name", what="library.core", item=True)
    _swap.swap(handle, layer, "forward", ours, kind="layer", what="Layer.forward")
    _swap.swap(handle, layer, "core", ours, kind="bound function", what="Layer.core")
    _swap.swap(handle, cls, "forward", ours, kind="class", what="Decorated.forward")


def state(module, layer, cls):
    return (module.core, layer.__dict__.get("forward", "absent"), layer.core, cls.__dict__.get("forward", "absent"))


ORIGINAL = (theirs, "absent", theirs, "absent")
OURS = (ours, ours, ours, ours)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_handles_removed_in_any_order(order):
    places = targets()
    handles = [_swap.Handle(f"h{i}") for i in range(3)]
    try:
        for h in handles:
            swap_all(h, *places)
        assert handles[0].already == 0 and handles[1].already == handles[2].already == 4
        assert all(h.swapped == {"function by name": 1, "layer": 1, "bound function": 1, "class": 1} for h in handles)
        for n, i in enumerate(order):
            assert state(*places) == OURS, f"before removing handle {i} ({n} removed)"
            handles[i].remove()
            assert not handles[i].swapped
        assert state(*places) == ORIGINAL
        assert all(_swap.held(obj, name, item) is None
                   for obj, name, item in ((vars(places[0]), "core", True), (places[1], "forward", False), (places[2], "forward", False)))
    finally:
        for h in handles:
            h.remove()


def test_remove_twice_and_context_manager():
    module, layer, cls = targets()
    with _swap.Handle("a") as a:
        swap_all(a, module, layer, cls)
        b = _swap.Handle("b")
        swap_all(b, module, layer, cls)
        b.remove()
        b.remove()  # a second remove() gives back nothing more
        assert state(module, layer, cls) == OURS
    assert state(module, layer, cls) == ORIGINAL


@pytest.mark.parametrize("joined", [False, True])
def test_a_failed_install_puts_back_only_its_own_holds(joined):
    """all_or_nothing: an error midway gives back what the block took; a swap held by another
    handle stays held by it (and ours) when the block joined it and then failed."""
    module, layer, cls = targets()
    other = _swap.Handle("other")
    try:
        if joined:
            _swap.swap(other, vars(module), "core", ours, kind="function by name", what="library.core", item=True)
        handle = _swap.Handle("failing")
        with pytest.raises(ValueError, match="midway"):
            with _swap.all_or_nothing(handle):
                swap_all(handle, module, layer, cls)
                handle.found_ours()
                raise ValueError("midway")
        assert handle.taken() == 0 and not handle.swapped and handle.already == 0
        assert state(module, layer, cls) == ((ours,) if joined else (theirs,)) + ORIGINAL[1:]
        if joined:
            assert _swap.held(vars(module), "core", item=True).count == 1
    finally:
        other.remove()
    assert state(module, layer, cls) == ORIGINAL


def test_another_implementation_is_refused():
    module, _, _ = targets()
    with _swap.Handle("first") as first:
        _swap.swap(first, vars(module), "core", ours, kind="f", what="library.core", item=True, impl="kernel A")
        second = _swap.Handle("second")
        with pytest.raises(RuntimeError, match="library.core already runs another implementation"):
            _swap.swap(second, vars(module), "core", ours, kind="f", what="library.core", item=True, impl="kernel B")
        assert second.taken() == 0 and _swap.held(vars(module), "core", item=True).count == 1


def test_swapped_objects_are_held_weakly():
    """A handle (a switch for every model built afterwards) does not keep a swapped object
    alive; its death forgets the swap, and remove() then has nothing to put back."""
    layer = Layer()
    ref = weakref.ref(layer)
    handle = _swap.Handle("switch")
    # A bound method refers back to the object: the swap keeps a predicate, not the value.
    _swap.swap(handle, layer, "forward", types.MethodType(lambda self, x: ours(x), layer), kind="layer", what="Layer.forward",
               ours=lambda current: isinstance(current, types.MethodType))
    assert handle.swapped == {"layer": 1}
    del layer
    gc.collect()
    assert ref() is None and not handle.swapped
    handle.remove()


def test_a_target_changed_by_other_code_is_left_to_it(monkeypatch, caplog):
    monkeypatch.setattr(_swap, "_logged", set())
    module, _, _ = targets()
    handle = _swap.Handle("h")
    _swap.swap(handle, vars(module), "core", ours, kind="f", what="library.core", item=True)

    def someone_elses(x):
        return x

    module.core = someone_elses
    with caplog.at_level(logging.WARNING, logger="piip_kernels"):
        handle.remove()
    assert module.core is someone_elses
    assert any("library.core was changed by other code" in r.getMessage() for r in caplog.records)


def test_a_handle_holds_a_target_once():
    """A handle that meets a target it holds already (a switch enabling a model and then the
    model around it) does not hold it twice: one remove() of another handle cannot leave it
    stranded, and the counts say what is held."""
    module, _, _ = targets()
    a, b = _swap.Handle("a"), _swap.Handle("b")
    for _ in range(3):
        _swap.swap(a, vars(module), "core", ours, kind="f", what="library.core", item=True)
    assert a.swapped == {"f": 1} and _swap.held(vars(module), "core", item=True).count == 1
    _swap.swap(b, vars(module), "core", ours, kind="f", what="library.core", item=True)
    a.remove()
    assert module.core is ours
    b.remove()
    assert module.core is theirs
