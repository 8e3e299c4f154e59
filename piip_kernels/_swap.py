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
  afterwards must not keep those models alive);
- a target swapped with ``follow=True`` (a place inside a model: a layer's ``forward``, a
  bound function, a ``kernel_config``) follows its object through ``copy.deepcopy``: the
  copy's place is held by the same handles, with the same count, so ``remove()`` puts the
  original back in every live copy too; pickled, the swapped value is the original (no
  handle can hold an object in another process). See :class:`Held` and :func:`as_followed`.

So a fix to handles fixes every integration.
"""
from __future__ import annotations

import contextlib
import copy
import functools
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

    __slots__ = ("key", "name", "item", "original", "impl", "kind", "what", "count", "holders", "follow", "_obj", "_value",
                 "_ours", "__weakref__")

    def __init__(self, obj, name: str, item: bool, original, impl, kind: str, what: str, value, ours, follow: bool = False):
        self.key = (id(obj), name, item)
        self.name, self.item, self.original, self.impl, self.kind, self.what = name, item, original, impl, kind, what
        self.count = 0
        self.holders: list[tuple[weakref.ref, bool]] = []  # (handle, joined another's swap), weakly: copies join them
        self.follow = follow
        # A followed value refers back to its place (a bound method, a model's config): held weakly.
        self._value = weakref.ref(value) if follow and value is not None else value
        self._ours = ours
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
        if self._ours is not None:
            return self._ours(current)
        value = self._value() if isinstance(self._value, weakref.ref) else self._value
        return current is value

    def hold(self, handle: "Handle", joined: bool) -> None:
        self.count += 1
        self.holders.append((weakref.ref(handle), joined))
        handle._held.append((self, joined))
        handle._holds.add(id(self))

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
        target.holders = [(ref, joined) for ref, joined in target.holders if ref() is not handle]
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


def swap(handle: Handle, obj, name: str, value, *, kind: str, what: str, impl=None, ours=None, item: bool = False,
         follow: bool = False) -> bool:
    """Sets ``obj.name = value`` (``obj[name]`` with ``item``), held by ``handle``.

    If a handle holds this target already with the same ``impl``, ``handle`` holds it too
    (``value`` is not used; a handle that holds it already holds it once); with another
    ``impl`` it is a RuntimeError. ``ours(current)``
    says whether a value is (still) ours; by default the identity with ``value``, which
    is then kept: pass a predicate when ``value`` refers back to ``obj`` (a bound method),
    so that a weakly held ``obj`` can still be collected. ``what`` names the target in
    messages. With ``follow`` (an attribute of an object that is deep-copied or pickled with
    its owner: a place inside a model) ``value`` is set as :func:`as_followed` wraps it: deep
    copies of ``obj`` are held by the same handles, and a pickled ``obj`` carries the
    original. Returns True if this call set the value, False if it joined a swap.
    """
    with _lock:
        target = held(obj, name, item)
        if target is not None:
            if target.impl is not impl:
                raise RuntimeError(f"{handle.owner}: {target.what} already runs another implementation, installed by a "
                                   "handle still held; remove() that handle first")
            if id(target) not in handle._holds:
                target.hold(handle, True)
            return False
        if follow:
            if item:
                raise ValueError(f"{handle.owner}: {what}: only an attribute follows its object through copies")
            value = as_followed(value)
        probe = Target(obj, name, item, MISSING, impl, kind, what, None if ours is not None else value, ours, follow)
        probe.original = probe.read(obj)
        if follow:
            value._target = weakref.ref(probe)
        probe.write(obj, value)
        _targets[probe.key] = probe
        probe.hold(handle, False)
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


# ---------------------------------------------------------------------------------------------
# Values that follow their place through deep copies, and pickle as the original

class Held:
    """What a followed value adds (see :func:`as_followed`): ``_target`` (weakly) is the target
    whose value it is, or None once that target is given back.

    ``copy.deepcopy`` of it, as part of its object, holds the copy's place for the same
    handles (:func:`_copy_targets`); alone, outside its object, it copies to its plain
    value, held by nobody. Pickled, it is the target's original (an attribute that was
    absent: the class's, bound to the object, as reading it then gave), or, given back
    already, its plain value."""

    __slots__ = ()

    def _plain(self):
        raise NotImplementedError

    def _copy(self, memo):
        """A copy of the same kind, memoized before its contents are copied (they may
        refer back to it through the object)."""
        raise NotImplementedError

    def __deepcopy__(self, memo):
        new = self._copy(memo)
        target = self._target() if self._target is not None else None
        obj = target.obj if target is not None else None
        with _lock:
            _copy_targets(memo)
        # Copied with its object, its place is held now (here, or by the copy that asked for it).
        return new if obj is not None and id(obj) in memo else _unheld(new, memo)

    def __reduce_ex__(self, protocol):
        target = self._target() if self._target is not None else None
        obj = target.obj if target is not None else None
        if obj is None or _targets.get(target.key) is not target:
            return _same, (self._plain(),)
        if target.original is MISSING:
            return _class_attribute, (obj, target.name)
        return _same, (target.original,)


def _same(value):
    return value


def _class_attribute(obj, name: str):
    """``obj.name`` as read with nothing in the instance's ``__dict__`` (the unpickled
    object's state is not set yet when this runs)."""
    attr = getattr(type(obj), name)
    return attr.__get__(obj, type(obj)) if hasattr(attr, "__get__") else attr


def _unheld(new: Held, memo):
    """A followed value deep-copied outside its object: its plain value (memoized)."""
    plain = new._plain()
    for key, value in list(memo.items()):
        if value is new:
            memo[key] = plain
    return plain


class HeldCall(Held):
    """A swapped callable (a bound forward, a function with keywords bound): calls ``fn``.
    A plain Python ``__call__``, so torch.compile traces through it (fullgraph)."""

    __slots__ = ("fn", "_target", "__weakref__")

    def __init__(self, fn):
        self.fn, self._target = fn, None

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def _plain(self):
        return self.fn

    def _copy(self, memo):
        new = HeldCall(None)
        memo[id(self)] = new
        new.fn = copy.deepcopy(self.fn, memo)
        return new

    def __repr__(self):
        return f"HeldCall({self.fn!r})"


@functools.lru_cache(maxsize=None)
def _held_type(cls: type) -> type:
    """``cls`` with :class:`Held` (a dict, a config object): isinstance checks still pass."""
    slots = ("_target",) + (("__weakref__",) if not cls.__weakrefoffset__ else ())

    def _plain(self):
        if issubclass(cls, dict):
            plain = cls(self)
        else:
            plain = cls.__new__(cls)
        if hasattr(self, "__dict__"):
            plain.__dict__.update(vars(self))
        return plain

    def _copy(self, memo):
        new = type(self).__new__(type(self))
        new._target = None
        memo[id(self)] = new
        if isinstance(self, dict):
            new.update(copy.deepcopy(dict(self), memo))
        if hasattr(self, "__dict__"):
            new.__dict__.update(copy.deepcopy(vars(self), memo))
        return new

    return type(cls.__name__, (Held, cls), {"__slots__": slots, "__qualname__": cls.__qualname__,
                                            "_plain": _plain, "_copy": _copy})


def as_followed(value) -> Held:
    """``value`` as a followed value: a callable in a :class:`HeldCall`; a dict or an object
    with a ``__dict__`` (a config) as an instance of a subclass of its type with the same
    contents."""
    if isinstance(value, Held):
        return value
    if callable(value) and not isinstance(value, type):
        return HeldCall(value)
    cls = _held_type(type(value))
    held = cls(value) if isinstance(value, dict) else cls.__new__(cls)
    if hasattr(value, "__dict__"):
        held.__dict__.update(vars(value))
    held._target = None
    return held


_COPIED = "piip_kernels._swap: targets copied"  # a key of deepcopy's memo: the targets this copy has handled


def _copy_targets(memo) -> None:
    """Holds the copies of every followed target whose object this deep copy (``memo``)
    has copied so far, for the same handles with the same count. Run by each followed value
    it copies: whatever of the object was copied first (a layer whose forward transformers
    has re-kernelized holds a plain bound method, and its model's ``kernel_config`` is
    copied after the model's modules)."""
    done = memo.setdefault(_COPIED, set())
    for target in list(_targets.values()):
        obj = target.obj if target.follow else None
        if obj is None or id(target) in done or id(obj) not in memo or _targets.get(target.key) is not target:
            continue
        twin = memo[id(obj)]
        if twin is obj:
            continue
        done.add(id(target))
        value = copy.deepcopy(target.read(obj), memo)
        original = target.original if target.original is MISSING else copy.deepcopy(target.original, memo)
        copied = Target(twin, target.name, False, original, target.impl, target.kind, target.what,
                        None if target._ours is not None else value, target._ours, follow=True)
        if isinstance(value, Held):
            value._target = weakref.ref(copied)
        _targets[copied.key] = copied
        for ref, joined in target.holders:
            handle = ref()
            if handle is not None:
                copied.hold(handle, joined)
        copied.count = target.count  # a holder that died without remove() holds the copy too, as the original
