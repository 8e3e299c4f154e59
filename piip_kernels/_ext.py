"""Loads the compiled kernels, ``piip_kernels._C`` (CPU) and ``piip_kernels._C_cuda`` (CUDA).

Both are built on the LibTorch stable ABI (setup.py): one binary serves every torch from
``_C.TORCH_TARGET`` (2.10) on. Loading registers nothing by itself; ``register("piip_C")``
puts the kernels under ``torch.ops.piip_C`` (a kernels-hub build registers the same
binaries under a namespace of its own).

Importing piip_kernels never fails because of the extension: when it is missing or
broken, ``EXT`` is None, ``EXT_ERROR`` says why, and one log line reports it once. The
reference backend keeps working. The CUDA kernels load only under a CUDA build of torch
whose CUDA major version is the one they were built with; otherwise ``CUDA_ERROR`` says
why (``backend_report()`` shows it) and the Triton backend serves the GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging

import torch

log = logging.getLogger("piip_kernels")

NAMESPACE = "piip_C"

EXT = None
EXT_ERROR: str | None = None
CUDA_EXT = None
CUDA_ERROR: str | None = None

BUILD_HINT = "build it with `pip install --no-build-isolation -e .`, or install a piip-kernels wheel"


def cuda_mismatch(built_cuda: str, torch_cuda: str | None, torch_version: str) -> str | None:
    """Why CUDA kernels built with CUDA ``built_cuda`` ("13.0") cannot serve a torch built with
    ``torch_cuda`` (None for a CPU build), or None when they can (same CUDA major version)."""
    major = built_cuda.split(".")[0]
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU build; the CUDA kernels need a CUDA {major}.x build of torch"
    if torch_cuda.split(".")[0] != major:
        return (f"the CUDA kernels are built with CUDA {built_cuda} and torch {torch_version} with CUDA {torch_cuda}: "
                f"install a CUDA {major}.x build of torch, or build piip-kernels from source against this one")
    return None


def _load_cuda():
    """(piip_kernels._C_cuda registered, None), or (None, why not)."""
    if importlib.util.find_spec(f"{__package__}._C_cuda") is None:
        return None, ("piip_kernels was built without CUDA kernels (they build when nvcc is found and torch is a CUDA build, "
                      "or whenever nvcc is found with PIIP_KERNELS_CUDA=1)")
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build; the CUDA kernels need a CUDA build of torch"
    try:
        module = importlib.import_module(f"{__package__}._C_cuda")
    except Exception as exc:
        return None, f"piip_kernels._C_cuda did not load ({type(exc).__name__}: {exc})"
    why = cuda_mismatch(module.CUDA_VERSION, torch.version.cuda, torch.__version__)
    if why is None:
        module.register(NAMESPACE)
    return (None, why) if why else (module, None)


try:  # pragma: no cover - which branch runs depends on the install
    EXT = importlib.import_module(f"{__package__}._C")
    EXT.register(NAMESPACE)
except Exception as exc:  # ImportError, an OSError from a torch older than the binary's target
    EXT = None
    EXT_ERROR = f"compiled extension piip_kernels._C not available ({type(exc).__name__}: {exc}); {BUILD_HINT}"
    log.warning("piip_kernels: %s. Falling back to the reference PyTorch backend.", EXT_ERROR)
else:
    CUDA_EXT, CUDA_ERROR = _load_cuda()


def _registered_kernels() -> frozenset[tuple[str, str]]:
    """(private op name, dispatch key) for every kernel the extension registered."""
    if EXT is None:
        return frozenset()
    prefix = NAMESPACE + "::"
    names = [n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)]
    return frozenset((n, key) for n in names for key in ("CPU", "CUDA")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(prefix + n, key))


# Fixed once the library is loaded. A set read under torch.compile is a constant with a
# guard, no graph break, and this keeps `import piip_kernels` from importing
# torch._dynamo (which a compile-time decorator here would do, at about 0.7 s).
_KERNELS = _registered_kernels()


def has_kernel(name: str, dispatch_key: str) -> bool:
    """True when the extension registered an implementation of piip_C::<name> for dispatch_key ("CPU" or "CUDA")."""
    return (name, dispatch_key) in _KERNELS
