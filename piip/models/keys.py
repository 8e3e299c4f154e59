"""Checked state-dict loading: one report of every unused, missing and mis-shaped key."""
from __future__ import annotations

from torch import Tensor


def check_state_dict(what: str, expected: dict[str, tuple], given: dict[str, Tensor]) -> None:
    """Raise ValueError listing every key of ``given`` the model does not use, every key of
    ``expected`` (name -> shape) that ``given`` lacks, and every shape that differs."""
    unused = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given))
    wrong = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(s)}"
             for k, s in expected.items() if k in given and tuple(given[k].shape) != tuple(s)]
    if unused or missing or wrong:
        lines = [f"{what} does not match the model ({len(unused)} unused, {len(missing)} missing, {len(wrong)} mis-shaped)"]
        for title, items in (("unused checkpoint keys", unused), ("missing from checkpoint", missing), ("shape mismatches", wrong)):
            if items:
                lines.append(f"  {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))


def strip_ddp_prefix(sd: dict) -> dict:
    """A state dict saved from ``DistributedDataParallel`` (every key under ``module.``) without
    that prefix; any other dict unchanged."""
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def check_materialized(module, what: str) -> None:
    """Raise RuntimeError naming every parameter or buffer of ``module`` still on the meta
    device (a load that left them without values)."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: {len(left)} parameter(s) or buffer(s) are still on the meta device, without values: "
                           + ", ".join(left[:20]) + (" ..." if len(left) > 20 else "")
                           + ". Load a checkpoint that holds them, or build the model on a real device.")
