"""What the integration tests share (transformers, Ultralytics, RF-DETR, the RT-DETRv2 family,
the extension stand-in, mmcv): counting the operators that run, comparing to float64
rounding, and one forward+backward pass with every gradient."""
import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

OUR_OP, THEIR_OP = "piip::ms_deform_attn", "aten::grid_sampler_2d"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import it into a test module: models this small spend their time starting OpenMP
    teams, and stall when the machine's cores are busy; one thread runs them in milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CountOps(TorchDispatchMode):
    """Counts the operators that run (after autograd), by name."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def assert_same(got, want, what: str, names=None):
    """Equal to float64 rounding: within 1e-9 of each tensor's largest finite magnitude,
    plus 1e-12 of the largest in the list (gradients that are zero mathematically, such
    as a bias's before a normalisation, are rounding noise); the same non-finite entries."""
    assert len(got) == len(want), f"{what}: {len(got)} tensors against {len(want)}"

    def scale(t):
        finite = t[t.isfinite()]
        return finite.abs().max().item() if finite.numel() else 0.0

    largest = max((scale(w) for w in want), default=0.0)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * scale(w) + 1e-12 * largest + 1e-300, equal_nan=True,
                                   msg=lambda m, i=i: f"{what} {names[i] if names else f'[{i}]'}: {m}")


def move_offsets_off_centres(model: nn.Module, seed: int = 1) -> None:
    """Moves every sampling-offset projection's parameters a little: a fresh deformable
    attention samples exactly on pixel centres, where the location gradient is one-sided by
    convention and two correct implementations may differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "sampling_offsets", None), nn.Linear):
                for p, spread in ((m.sampling_offsets.bias, 0.3), (m.sampling_offsets.weight, 0.05)):
                    p.add_(spread * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def step(fn, model: nn.Module | None, inputs, count: bool = True):
    """fn(*leaves) once, forward and backward (the loss: the mean square of the output), with
    ``inputs`` as fresh leaves: {"out", "input grads", "grads" (by parameter name), "ops"}."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    if model is not None:
        model.zero_grad(set_to_none=True)
    ops = CountOps()
    with ops if count else contextlib.nullcontext():
        out = fn(*leaves)
        out.to(torch.promote_types(out.dtype, torch.float32)).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} if model is not None else {}
    return {"out": out.detach(), "input grads": [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.grad is not None],
            "grads": grads, "ops": ops.counts}


def assert_runs(result, ours: bool, what: str, theirs_op: str = THEIR_OP):
    ran = {op: result["ops"].get(op, 0) for op in (OUR_OP, theirs_op)}
    if ours:
        assert ran[OUR_OP] > 0 and ran[theirs_op] == 0, f"{what}: expected our op only, ran {ran}"
    else:
        assert ran[OUR_OP] == 0 and ran[theirs_op] > 0, f"{what}: expected the library's own path only, ran {ran}"


def assert_equal_steps(got, want, what: str):
    assert_same([got["out"]], [want["out"]], f"{what} output")
    assert_same(got["input grads"], want["input grads"], f"{what} input gradients")
    assert got["grads"].keys() == want["grads"].keys(), f"{what}: gradients of different parameters"
    names = list(want["grads"])
    assert_same([got["grads"][n] for n in names], [want["grads"][n] for n in names], f"{what} gradient", names)
