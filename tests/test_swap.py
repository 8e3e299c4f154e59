"""piip_kernels._swap: the one swap mechanism of every integration. Handles are removed in
every order; an install that fails puts back what it changed; swapped objects are held
weakly; a target changed by other code after the swap is left to that code."""
import copy
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


# ---------------------------------------------------------------------------------------------
# Followed places: deep copies are held by the same handles; pickles carry the original

class Model:
    """A model of the places a transformers model has: a layer (its own forward, swapped as a
    bound method), a bound function, a config (copied after the layer, as a model's
    kernel_config is copied after its modules)."""

    def __init__(self):
        self.layer = Layer()
        self.core = theirs
        self.config = {"layer": "theirs"}


def is_ours_forward(current):
    return getattr(getattr(current, "fn", current), "__func__", None) is ours_forward


def ours_forward(self, x):
    return ours(x)


def follow_all(handle, model):
    _swap.swap(handle, model.layer, "forward", types.MethodType(ours_forward, model.layer), kind="layer",
               what="Layer.forward", ours=is_ours_forward, follow=True)
    _swap.swap(handle, model, "core", ours, kind="bound function", what="Model.core", follow=True)
    _swap.swap(handle, model, "config", {"layer": "ours"}, kind="config", what="Model.config", follow=True)


def runs(model):
    """What each place runs now: ('ours'|'theirs') for the layer, the function, the config."""
    return model.layer.forward(0)[0], model.core(0)[0], model.config["layer"]


OURS3, THEIRS3 = ("ours",) * 3, ("theirs",) * 3


@pytest.mark.parametrize("first_out", ["original's", "copy's"])
@pytest.mark.parametrize("replaced", [False, True])
def test_a_deep_copy_is_held_by_the_same_handles(first_out, replaced):
    """A deep copy runs ours and is held by the original's handle; a second handle on the copy
    joins its places; whichever is removed first, the copy stays ours until the other is.
    ``replaced``: the layer's forward was set again by other code to ours, a plain bound
    method (transformers re-kernelizing), so only the config's copy can take its place."""
    model = Model()
    a = _swap.Handle("a")
    follow_all(a, model)
    if replaced:
        model.layer.forward = types.MethodType(ours_forward, model.layer)
    twin = copy.deepcopy(model)
    assert runs(twin) == OURS3 and a.swapped == {"layer": 2, "bound function": 2, "config": 2}
    b = _swap.Handle("b")
    follow_all(b, twin)
    assert b.swapped == {"layer": 1, "bound function": 1, "config": 1} and b.already == 3
    released, holder = (a, b) if first_out == "original's" else (b, a)
    released.remove()
    assert runs(twin) == OURS3 and runs(model) == (OURS3 if released is b else THEIRS3)
    holder.remove()
    assert runs(twin) == runs(model) == THEIRS3
    assert "forward" not in vars(twin.layer) and twin.config == {"layer": "theirs"} and twin.core is theirs


def test_copies_of_copies_and_two_handles():
    model = Model()
    a, b = _swap.Handle("a"), _swap.Handle("b")
    follow_all(a, model)
    follow_all(b, model)
    twin = copy.deepcopy(model)
    grandchild = copy.deepcopy(twin)
    assert a.swapped == b.swapped == {"layer": 3, "bound function": 3, "config": 3}
    assert a.already == 0 and b.already == 9
    for handle in (b, a):
        assert all(runs(m) == OURS3 for m in (model, twin, grandchild))
        handle.remove()
    assert all(runs(m) == THEIRS3 for m in (model, twin, grandchild))


def test_copies_are_held_weakly():
    model = Model()
    with _swap.Handle("a") as a:
        follow_all(a, model)
        twin = copy.deepcopy(model)
        ref = weakref.ref(twin.layer)
        del twin
        gc.collect()
        assert ref() is None and a.swapped == {"layer": 1, "bound function": 1, "config": 1}


def test_pickled_places_carry_the_original():
    """Pickled while held: the original (an attribute that was absent: the class's, as read
    then). Pickled after remove(), or a value pickled alone once given back: its plain value."""
    import pickle

    model = Model()
    with _swap.Handle("a") as a:
        follow_all(a, model)
        loaded = pickle.loads(pickle.dumps(model))
        value = model.config
    assert runs(loaded) == THEIRS3 and loaded.core is theirs and type(loaded.config) is dict
    assert _swap.held(loaded, "core") is None and _swap.held(loaded.layer, "forward") is None
    assert pickle.loads(pickle.dumps(value)) == {"layer": "ours"}
    with _swap.Handle("again") as again:
        follow_all(again, loaded)
        assert runs(loaded) == OURS3 and again.already == 0
    assert runs(loaded) == THEIRS3


def test_a_value_copied_alone_is_plain():
    """Deep-copied outside its object, a followed value is its plain value, held by nobody."""
    model = Model()
    with _swap.Handle("a") as a:
        follow_all(a, model)
        config = copy.deepcopy(model.config)
        assert type(config) is dict and config == {"layer": "ours"} and a.swapped["config"] == 1
