import os
import sys

# Tests import the shared helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It is
# chosen when a kernel is defined, so the variable must be set before anything imports
# piip_kernels' Triton modules.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The CUDA kernels of csrc/ under the CPU emulation (tests/cuda_emulation/emulated.py),
    compiled once per run for every test file that uses them."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emulation"))
    from emulated import build

    return build(tmp_path_factory.mktemp("emu"))
