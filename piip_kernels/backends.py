"""Backend selection shared by every op.

Each op lists, for each backend, a function ``why_not(device, dtype) -> list[str]``
that returns the reasons the backend cannot run on such inputs (an empty list
means it can). :func:`select` walks the op's priority list for the device;
an explicitly requested backend (argument or ``PIIP_KERNELS_BACKEND``) never
falls back silently: if it cannot run, the error lists every reason.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from ._ext import CUDA_ERROR, EXT_ERROR, has_kernel

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "PIIP_KERNELS_BACKEND"

WhyNot = Callable[[torch.device, torch.dtype], list[str]]


def default_order(device: torch.device) -> tuple[str, ...]:
    """Priority order for tensors on ``device``."""
    if device.type == "cuda":
        return ("cuda", "triton", "reference")
    if device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


# --- reusable reasons -------------------------------------------------------

def compiled_reasons(private_op: str, device: torch.device, want: str) -> list[str]:
    """Reasons the compiled kernel ``piip_C::private_op`` cannot run for tensors on ``device``.

    ``want`` is the device type the backend serves ("cpu" or "cuda").
    """
    reasons = []
    if device.type != want:
        reasons.append(f"tensors are on {device.type}, the {want} backend needs {want} tensors")
    if EXT_ERROR is not None:
        reasons.append(EXT_ERROR)
    elif want == "cuda" and CUDA_ERROR is not None:
        reasons.append(f"CUDA kernels off: {CUDA_ERROR}")
    elif not has_kernel(private_op, want.upper()):
        reasons.append(f"piip_kernels has no {want.upper()} kernel for {private_op}")
    return reasons


def triton_reasons(device: torch.device, implemented: bool) -> list[str]:
    """Reasons a Triton kernel cannot run for tensors on ``device``."""
    reasons = []
    if not implemented:
        reasons.append("no Triton kernel for this op in this version")
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        reasons.append(f"tensors are on {device.type}; Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
    return reasons


def float_reasons(dtype: torch.dtype, allowed=(torch.float32, torch.float64, torch.float16, torch.bfloat16)) -> list[str]:
    if dtype not in allowed:
        return [f"dtype {dtype} is not one of {', '.join(str(d) for d in allowed)}"]
    return []


GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The dtypes each backend of the standard table takes (what it refuses on meta tensors too).
BACKEND_DTYPES = {"reference": None, "cpu": None, "cuda": GPU_DTYPES, "triton": GPU_DTYPES}


def standard_table(private_op: str, triton: bool = True) -> dict[str, WhyNot]:
    """The backend table of an op with a reference, compiled CPU and CUDA kernels
    (``piip_C::<private_op>``) and a Triton kernel; the GPU kernels compute in fp32 and
    take fp32/fp16/bf16 (float64 runs on the cpu and reference backends)."""
    return {
        "reference": lambda device, dtype: float_reasons(dtype),
        "cpu": lambda device, dtype: compiled_reasons(private_op, device, "cpu") + float_reasons(dtype),
        "cuda": lambda device, dtype: compiled_reasons(private_op, device, "cuda") + float_reasons(dtype, GPU_DTYPES),
        "triton": lambda device, dtype: triton_reasons(device, implemented=triton) + float_reasons(dtype, GPU_DTYPES),
    }


# --- selection --------------------------------------------------------------

def requested_backend(backend: str | None) -> str | None:
    """The backend asked for by argument, else by ``PIIP_KERNELS_BACKEND``, else None."""
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if name is not None and name not in BACKENDS:
        source = "backend argument" if backend is not None else f"{ENV_VAR}"
        raise ValueError(f"unknown {source} {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def select(op: str, table: dict[str, WhyNot], device: torch.device, dtype: torch.dtype, backend: str | None) -> str:
    """Name of the backend that runs ``op`` on (device, dtype).

    Raises RuntimeError listing the reasons when a requested backend cannot run.
    """
    name = requested_backend(backend)
    if device.type == "meta":
        return _select_meta(op, table, dtype, name)
    if name is not None:
        reasons = table[name](device, dtype) if name in table else [f"{op} has no {name} backend"]
        if reasons:
            raise RuntimeError(f"{op}: backend {name!r} cannot run on {device.type}/{dtype}:\n  - " + "\n  - ".join(reasons))
        return name
    for candidate in default_order(device):
        if candidate in table and not table[candidate](device, dtype):
            return candidate
    # The reference backend accepts every floating dtype on every device, so we
    # only get here for inputs no backend supports.
    lines = [f"{b}: {'; '.join(table[b](device, dtype))}" for b in table]
    raise RuntimeError(f"{op}: no backend can run on {device.type}/{dtype}:\n  - " + "\n  - ".join(lines))


def _select_meta(op: str, table: dict[str, WhyNot], dtype: torch.dtype, name: str | None) -> str:
    """Meta tensors carry no data, so every backend runs its op's fake kernel there (shapes,
    dtypes and devices only): code written for a GPU backend can be traced on a machine
    without one (the GPU tests' dry run does that). A requested backend still refuses the
    dtypes it refuses on its own device, so those errors show on meta as well."""
    if name is None:
        return "reference"
    if name not in table:
        raise RuntimeError(f"{op}: backend {name!r} cannot run on meta/{dtype}:\n  - {op} has no {name} backend")
    allowed = BACKEND_DTYPES.get(name)
    reasons = float_reasons(dtype) if allowed is None else float_reasons(dtype, allowed)
    if reasons:
        raise RuntimeError(f"{op}: backend {name!r} cannot run on meta/{dtype}:\n  - " + "\n  - ".join(reasons))
    return name


_OPS: dict[str, dict[str, WhyNot]] = {}


def register_op(op: str, table: dict[str, WhyNot]) -> None:
    """Makes an op's backend table visible to :func:`backend_report`."""
    _OPS[op] = table


def backend_report(devices: list[str] | None = None, dtype: torch.dtype = torch.float32, file=None) -> str:
    """A table of which backend can run each op on each device, with the reasons where not.

    Printed to ``file`` (stdout by default) and returned.
    """
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for op, table in _OPS.items():
        for dev in devices:
            device = torch.device(dev)
            for name in BACKENDS:
                if name not in table:
                    continue
                reasons = table[name](device, dtype)
                rows.append((op, dev, name, "yes" if not reasons else "no: " + "; ".join(reasons)))
    widths = [max(len(r[i]) for r in rows + [("op", "device", "backend", "")]) for i in range(3)]
    lines = [f"{'op':<{widths[0]}}  {'device':<{widths[1]}}  {'backend':<{widths[2]}}  available ({dtype})"]
    lines += [f"{o:<{widths[0]}}  {d:<{widths[1]}}  {b:<{widths[2]}}  {s}" for o, d, b, s in rows]
    text = "\n".join(lines)
    print(text, file=file)
    return text
