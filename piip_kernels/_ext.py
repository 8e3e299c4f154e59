"""Loads the compiled extension ``piip_kernels._C`` if it was built.

Importing piip_kernels never fails because of the extension: when it is
missing or broken, ``EXT`` is None, ``EXT_ERROR`` says why, and one log line
reports it once. The reference backend keeps working.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("piip_kernels")

EXT = None
EXT_ERROR: str | None = None

try:  # pragma: no cover - which branch runs depends on the install
    from . import _C as EXT  # noqa: N811  (loads the TORCH_LIBRARY registrations)
except Exception as exc:  # ImportError, or an OSError from a torch ABI mismatch
    EXT_ERROR = f"compiled extension piip_kernels._C not available ({type(exc).__name__}: {exc}); build it with `pip install --no-build-isolation -e .`"
    log.warning("piip_kernels: %s. Falling back to the reference PyTorch backend.", EXT_ERROR)


def _registered_kernels() -> frozenset[tuple[str, str]]:
    """(private op name, dispatch key) for every kernel the extension registered."""
    if EXT is None:
        return frozenset()
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("piip_C::")]
    return frozenset((n, key) for n in names for key in ("CPU", "CUDA")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"piip_C::{n}", key))


# Fixed once the library is loaded. A set read under torch.compile is a constant with a
# guard, no graph break, and this keeps `import piip_kernels` from importing
# torch._dynamo (which a compile-time decorator here would do, at about 0.7 s).
_KERNELS = _registered_kernels()


def has_kernel(name: str, dispatch_key: str) -> bool:
    """True when the extension registered an implementation of piip_C::<name> for dispatch_key ("CPU" or "CUDA")."""
    return (name, dispatch_key) in _KERNELS
