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


@torch.compiler.assume_constant_result  # fixed once the library is loaded; no graph break
def has_kernel(name: str, dispatch_key: str) -> bool:
    """True when the extension registered an implementation of piip_C::<name> for dispatch_key ("CPU" or "CUDA")."""
    if EXT is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"piip_C::{name}", dispatch_key)
    except RuntimeError:
        return False
