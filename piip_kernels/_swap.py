"""The one swap mechanism every integration uses (transformers, Ultralytics, RF-DETR, the
RT-DETRv2 family, the compiled-extension stand-in, mmcv).

An integration finds the places where a library looks up its deformable attention (a
module-level name, an instance's ``forward``, a function bound to an attribute, a
``kernel_config`` entry, a ``sys.modules`` entry) and swaps each through :func:`swap`,
recording it in a :class:`Handle`:

- every swapped place (a *target*: an object's attribute or a mapping's item) is counted
  by target, across handles: a second handle that asks for the same swap holds it too;
- the original comes back only when the last handle holding it is removed, whatever the
  order in which the handles are removed;
- an install that stops on an error puts back what it had swapped (:func:`all_or_nothing`);
- a target's object is held weakly where it can be (a switch that swaps every model built
  afterwards must not keep those models alive).

So a fix to handles fixes every integration.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import weakref
from collections import Counter

logger = logging.getLogger("piip_kernels")
_logged: set[str] = set()
MISSING = object()  # the value of an attribute or item that was absent before the swap
_lock = threading.RLock()


def log_once(message: str, log: logging.Logger | None = None) -> None:
    """One warning per distinct message for the life of the process."""
    if message not in _logged:
        _logged.add(message)
        (log or logger).warning(message)


class Target:
    """One swapped place: ``obj.name`` (an attribute; absent before: deleted again) or
    ``obj[name]`` (``item``: a dict such as a module's globals or ``sys.modules``), with
    the original value, the number of holds on it and what identifies the implementation
    swapped in (``impl``: a second swap of the same target must ask for the same one)."""

    __slots__ = ("key", "name", "item", "original", "impl", "kind", "what", "count", "_obj", "_value", "_ours",
                 "__weakref__")

    def __init__(self, obj, name: str, item: bool, original, impl, kind: str, what: str, value, ours):
        self.key = (id(obj), name, item)
        self.name, self.item, self.original, self.impl, self.kind, self.what = name, item, original, impl, kind, what
        self.count = 0
        self._value, self._ours = value, ours
        try:  # weakly where possible; its death forgets the swap (nothing is left to put back)
            ref = weakref.ref(obj, lambda _, key=self.key, me=weakref.ref(self): _forget(key, me()))
            self._obj = ref
        except TypeError:  # dicts (module globals, sys.modules) and the like live as long as their module
            self._obj = lambda obj=obj: obj

    @property
    def obj(self):
        return self._obj()

    def read(self, obj):
        return obj.get(self.name, MISSING) if self.item else vars(obj).get(self.name, MISSING)

    def write(self, obj, value) -> None:
        if self.item:
            if value is MISSING:
                obj.pop(self.name, None)
            else:
                obj[self.name] = value
        elif value is MISSING:
            if self.name in vars(obj):
                delattr(obj, self.name)
        else:
            setattr(obj, self.name, value)

    def is_ours(self, current) -> bool:
        return self._ours(current) if self._ours is not None else current is self._value

    def __repr__(self):
        return f"Target({self.what}, holds={self.count})"


# Every target swapped now, by (id of its object, name, item).
_targets: dict[tuple, Target] = {}


def _forget(key, target) -> None:
    with _lock:
        if target is not None and _targets.get(key) is target:
            del _targets[key]


def held(obj, name: str, item: bool = False) -> Target | None:
    """The target ``obj.name`` (``obj[name]`` with ``item``) if a handle holds it now."""
    with _lock:
        target = _targets.get((id(obj), name, item))
        return target if target is not None and target.obj is obj else None


class Handle:
    """What one integration call swapped; ``remove()`` gives back its holds (also as a
    context manager, on leaving the ``with`` block). A target goes back to its original
    when the last handle holding it is removed, in any order.

    Attributes:
        swapped: the targets this handle holds now, counted by kind (for example "layer",
            "function by name"): each runs ours at least until ``remove()``.
        already: how many of them were ours already when taken (held by another handle,
            which now shares them), plus places found ours that no handle had swapped (a
            model that its library had already switched to our layer; those are not held).
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._held: list[tuple[Target, bool]] = []  # (target, joined another handle's swap)
        self._holds: set[int] = set()  # ids of the targets in _held (a handle holds a target once)
        self._found_ours = 0

    @property
    def swapped(self) -> Counter:
        with _lock:
            return Counter(t.kind for t, _ in self._held if t.obj is not None)

    @property
    def already(self) -> int:
        with _lock:
            return self._found_ours + sum(joined for t, joined in self._held if t.obj is not None)

    def taken(self) -> int:
        """How many places this handle has met so far (held, or found ours): a call that
        finds nothing to swap leaves it unchanged."""
        return len(self._held) + self._found_ours

    def found_ours(self) -> None:
        """Counts a place that was ours without any handle's swap (not held)."""
        self._found_ours += 1

    def remove(self) -> None:
        """Gives back every hold, the last taken first; a target with no holder left gets its
        original back. A second call does nothing."""
        with _lock:
            _release(self, 0)
            self._found_ours = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"{type(self).__name__}({self.owner}, swapped={dict(self.swapped)}, already={self.already})"


def _release(handle: Handle, keep: int) -> None:
    """Gives back the holds of ``handle`` after its first ``keep``, the last taken first."""
    while len(handle._held) > keep:
        target, _ = handle._held.pop()
        handle._holds.discard(id(target))
        target.count -= 1
        if target.count > 0:
            continue
        if _targets.get(target.key) is target:
            del _targets[target.key]
        obj = target.obj
        if obj is None:
            continue
        current = target.read(obj)
        if target.is_ours(current):
            target.write(obj, target.original)
        else:  # someone else's value since: theirs to keep
            log_once(f"piip_kernels: {target.what} was changed by other code after our swap; it is left as it is")


def swap(handle: Handle, obj, name: str, value, *, kind: str, what: str, impl=None, ours=None, item: bool = False) -> bool:
    """Sets ``obj.name = value`` (``obj[name]`` with ``item``), held by ``handle``.

    If a handle holds this target already with the same ``impl``, ``handle`` holds it too
    (``value`` is not used; a handle that holds it already holds it once); with another
    ``impl`` it is a RuntimeError. ``ours(current)``
    says whether a value is (still) ours; by default the identity with ``value``, which
    is then kept: pass a predicate when ``value`` refers back to ``obj`` (a bound method),
    so that a weakly held ``obj`` can still be collected. ``what`` names the target in
    messages. Returns True if this call set the value, False if it joined a swap.
    """
    with _lock:
        target = held(obj, name, item)
        if target is not None:
            if target.impl is not impl:
                raise RuntimeError(f"{handle.owner}: {target.what} already runs another implementation, installed by a "
                                   "handle still held; remove() that handle first")
            if id(target) not in handle._holds:
                target.count += 1
                handle._held.append((target, True))
                handle._holds.add(id(target))
            return False
        probe = Target(obj, name, item, MISSING, impl, kind, what, None if ours is not None else value, ours)
        probe.original = probe.read(obj)
        probe.write(obj, value)
        probe.count = 1
        _targets[probe.key] = probe
        handle._held.append((probe, False))
        handle._holds.add(id(probe))
        return True


@contextlib.contextmanager
def all_or_nothing(handle: Handle):
    """Within the block, the swaps recorded in ``handle`` are undone if the block raises."""
    with _lock:
        keep, found = len(handle._held), handle._found_ours
        try:
            yield handle
        except BaseException:
            _release(handle, keep)
            handle._found_ours = found
            raise


def swap_references(handle: Handle, old, new, *, kind: str, impl=None, skip=()) -> int:
    """Swaps for ``new`` every module-level name bound to ``old`` (by identity) in the modules
    loaded now, except those named in ``skip``: a library's function or extension module as
    every module that imported it sees it. Names that another handle swapped from ``old``
    are joined. Returns how many names ``handle`` now holds this way."""
    found = 0
    with _lock:
        for target in list(_targets.values()):
            obj = target.obj
            if target.original is old and target.item and obj is not None:
                swap(handle, obj, target.name, new, kind=kind, what=target.what, impl=impl, item=True)
                found += 1
        for name, module in list(sys.modules.items()):
            if name in skip:
                continue
            try:
                scope = vars(module)
            except TypeError:
                continue
            if not isinstance(scope, dict):
                continue
            for attr, value in list(scope.items()):
                if value is old:
                    swap(handle, scope, attr, new, kind=kind, what=f"{name}.{attr}", impl=impl, item=True)
                    found += 1
    return found
